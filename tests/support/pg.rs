//! A PostgreSQL database of its own for each test, dropped when the test ends (even when it
//! fails). Needs a server at `SLUICE_TEST_PG_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`), which `scripts/test` starts.

#![allow(dead_code, unreachable_pub, missing_docs)]

use sqlx::{AssertSqlSafe, Connection, PgConnection};

pub const MASTER_KEY_HEX: &str = "4f6e6520737472696e6720746f2072756c65207468656d20616c6c2c206f6e65";

pub struct TestDb {
    pub url: String,
    admin: String,
    name: String,
}

pub fn admin_url() -> String {
    std::env::var("SLUICE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin = admin_url();
        let name = format!("sluice_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL must be reachable at {admin} (set SLUICE_TEST_PG_URL): {e}")
        });
        let create = format!("CREATE DATABASE {name}");
        sqlx::raw_sql(AssertSqlSafe(create))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(b, _)| b)
            .to_string();
        TestDb {
            url: format!("{base}/{name}"),
            admin,
            name,
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs outside any async context we could borrow: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::raw_sql(AssertSqlSafe(drop)).execute(&mut conn).await;
                }
            });
        })
        .join();
    }
}
