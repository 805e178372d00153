//! A MariaDB/MySQL database of its own for each test, dropped when the test ends. Needs a
//! server at `SLUICE_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`), which
//! `scripts/services` starts.

#![allow(dead_code, unreachable_pub, missing_docs)]

use sqlx::{AssertSqlSafe, Connection, MySqlConnection};

pub struct TestMysql {
    pub url: String,
    admin: String,
    name: String,
}

pub fn admin_url() -> String {
    std::env::var("SLUICE_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

impl TestMysql {
    pub async fn create() -> TestMysql {
        let admin = admin_url();
        let name = format!("sluice_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = MySqlConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("MariaDB/MySQL must be reachable at {admin} (set SLUICE_TEST_MYSQL_URL): {e}")
        });
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(b, _)| b)
            .to_string();
        TestMysql {
            url: format!("{base}/{name}"),
            admin,
            name,
        }
    }

    pub async fn connect(&self) -> MySqlConnection {
        MySqlConnection::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestMysql {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = MySqlConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}
