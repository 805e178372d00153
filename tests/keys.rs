//! Key rotation on both warehouses: the master key re-wraps every tenant's data key, a
//! tenant's data key re-seals its pipelines' secrets; each in one transaction, so a
//! failure or a lost connection part-way leaves every secret readable with the key that
//! read it before, and a save racing a rotation stays readable after it.

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use sqlx::{Connection, PgConnection};

use sluice_engine::control::{KeyRotation, PipelineChange, PipelineStore};
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::{FaultHook, FaultPoint, PostgresWarehouse};
use sluice_engine::{SqliteWarehouse, TenantSlug};
use support::pg::{MASTER_KEY_HEX, TestDb};

const NEW_HEX: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const STRANGER_HEX: &str = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f";

fn key(hex: &str) -> MasterKey {
    MasterKey::from_hex(hex).expect("key")
}

fn slug(s: &str) -> TenantSlug {
    TenantSlug::parse(s).expect("slug")
}

fn secrets(password: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("source.password".into(), json!(password));
    m
}

async fn save<W: PipelineStore>(w: &W, tenant: &str, name: &str, password: &str) {
    w.save_pipeline(
        &slug(tenant),
        name,
        &json!({ "name": name, "source": { "kind": "postgres", "url": "postgres://erp@db/erp" } }),
        &secrets(password),
        &PipelineChange::shell_register(json!({})),
    )
    .await
    .expect("save pipeline");
}

/// The password `w` reads back for `tenant`/`name`, or the error's text.
async fn password<W: PipelineStore>(w: &W, tenant: &str, name: &str) -> Result<String, String> {
    match w.pipeline(&slug(tenant), name).await {
        Ok(Some(p)) => Ok(p.secrets["source.password"]
            .as_str()
            .unwrap_or_default()
            .to_string()),
        Ok(None) => Err("no pipeline".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The passwords of acme's and globex's pipeline `erp`, read by `w`.
async fn all_read<W: PipelineStore>(w: &W) -> Vec<Result<String, String>> {
    let mut out = Vec::new();
    for t in ["acme", "globex"] {
        out.push(password(w, t, "erp").await);
    }
    out
}

fn readable() -> Vec<Result<String, String>> {
    vec![Ok("pw-acme".into()), Ok("pw-globex".into())]
}

/// The master key rotation on one warehouse; `open` gives the warehouse under a key, and
/// `make_tenant` makes a tenant whose data key the given key wraps.
async fn master_rotation<W, Open, OpenFut, Make, Fut>(open: Open, make_tenant: Make)
where
    W: KeyRotation + PipelineStore,
    Open: Fn(MasterKey) -> OpenFut,
    OpenFut: std::future::Future<Output = W>,
    Make: Fn(&'static str, MasterKey) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for t in ["acme", "globex"] {
        make_tenant(t, key(MASTER_KEY_HEX)).await;
        save(
            &open(key(MASTER_KEY_HEX)).await,
            t,
            "erp",
            &format!("pw-{t}"),
        )
        .await;
    }
    // A tenant whose key the current master key cannot open, last in the rotation's order:
    // the rotation fails there, after re-wrapping the two before it in its transaction.
    make_tenant("zeta", key(STRANGER_HEX)).await;
    save(&open(key(STRANGER_HEX)).await, "zeta", "erp", "pw-zeta").await;
    let err = open(key(MASTER_KEY_HEX))
        .await
        .rewrap_tenant_keys(&key(NEW_HEX))
        .await
        .expect_err("zeta's key does not open");
    assert!(err.to_string().contains("zeta"), "{err}");
    assert_eq!(all_read(&open(key(MASTER_KEY_HEX)).await).await, readable());
    assert!(
        all_read(&open(key(NEW_HEX)).await)
            .await
            .iter()
            .all(Result::is_err)
    );

    // Given the key that opens zeta's as its previous one, it re-wraps all three at once.
    let rotating = open(key(MASTER_KEY_HEX).with_previous(key(STRANGER_HEX))).await;
    assert_eq!(
        rotating
            .rewrap_tenant_keys(&key(NEW_HEX))
            .await
            .expect("rotate"),
        3
    );
    assert_eq!(all_read(&open(key(NEW_HEX)).await).await, readable());
    assert_eq!(
        password(&open(key(NEW_HEX)).await, "zeta", "erp").await,
        Ok("pw-zeta".into())
    );
    let old_alone = all_read(&open(key(MASTER_KEY_HEX)).await).await;
    assert!(old_alone.iter().all(Result::is_err), "{old_alone:?}");
    // While the processes are restarted: the new key with the old one as previous reads.
    let rolling = open(key(NEW_HEX).with_previous(key(MASTER_KEY_HEX))).await;
    assert_eq!(all_read(&rolling).await, readable());
    // A secret saved now is sealed under a key the new master key wraps.
    save(&rolling, "acme", "crm", "pw-crm").await;
    assert_eq!(
        password(&open(key(NEW_HEX)).await, "acme", "crm").await,
        Ok("pw-crm".into())
    );
}

#[tokio::test]
async fn the_master_key_rotation_rewraps_every_tenant_key_or_none_on_the_embedded_warehouse() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().to_path_buf();
    master_rotation(
        |k| {
            let path = path.clone();
            async move { SqliteWarehouse::new(&path).with_master_key(k) }
        },
        |_, _| async {},
    )
    .await;
}

#[tokio::test]
async fn the_master_key_rotation_rewraps_every_tenant_key_or_none_on_postgres() {
    let db = TestDb::create().await;
    let w = PostgresWarehouse::connect(&db.url).await.expect("connect");
    let url = db.url.clone();
    master_rotation(
        |k| {
            let url = url.clone();
            async move {
                PostgresWarehouse::connect(&url)
                    .await
                    .expect("connect")
                    .with_master_key(k)
            }
        },
        |t, k| {
            let w = &w;
            async move {
                w.create_tenant(&slug(t), t, &k).await.expect("tenant");
            }
        },
    )
    .await;
}

/// A PostgreSQL warehouse (under the current master key) with tenants acme and globex,
/// each with a pipeline `erp` whose password is `pw-<tenant>`.
async fn two_tenants_on_postgres() -> (TestDb, PostgresWarehouse) {
    let db = TestDb::create().await;
    let w = PostgresWarehouse::connect(&db.url)
        .await
        .expect("connect")
        .with_master_key(key(MASTER_KEY_HEX));
    for t in ["acme", "globex"] {
        w.create_tenant(&slug(t), t, &key(MASTER_KEY_HEX))
            .await
            .expect("tenant");
        save(&w, t, "erp", &format!("pw-{t}")).await;
    }
    (db, w)
}

/// A hook that terminates the rotation's connection just before it commits.
fn kill_before_commit(url: String) -> FaultHook {
    Arc::new(move |p: FaultPoint| {
        let url = url.clone();
        Box::pin(async move {
            if p.name == "rotation_before_commit" {
                let mut admin = PgConnection::connect(&url).await.expect("admin");
                let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                    .bind(p.backend_pid)
                    .fetch_one(&mut admin)
                    .await
                    .expect("terminate");
            }
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_whose_connection_dies_before_commit_changes_nothing() {
    let (db, plain) = two_tenants_on_postgres().await;
    let sealed_before = sealed(&db, "acme").await;
    let dying = PostgresWarehouse::connect(&db.url)
        .await
        .expect("connect")
        .with_master_key(key(MASTER_KEY_HEX))
        .with_fault_hook(kill_before_commit(db.url.clone()));
    assert!(dying.rewrap_tenant_keys(&key(NEW_HEX)).await.is_err());
    assert!(dying.rotate_tenant_key(&slug("acme")).await.is_err());
    assert_eq!(all_read(&plain).await, readable());
    assert_eq!(sealed(&db, "acme").await, sealed_before);
}

/// The sealed secrets of `tenant`'s pipeline `erp` and its wrapped key, as stored.
async fn sealed(db: &TestDb, tenant: &str) -> (Vec<u8>, Vec<u8>) {
    let mut conn = db.connect().await;
    sqlx::query_as(
        "SELECT p.secrets, t.wrapped_key FROM sluice.pipelines p JOIN sluice.tenants t ON t.slug = p.tenant \
         WHERE p.tenant = $1 AND p.name = 'erp'",
    )
    .bind(tenant)
    .fetch_one(&mut conn)
    .await
    .expect("sealed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_rotation_reseals_its_secrets_and_a_save_racing_it_stays_readable() {
    let (db, plain) = two_tenants_on_postgres().await;
    let (acme_before, globex_before) = (sealed(&db, "acme").await, sealed(&db, "globex").await);

    // Just before the rotation commits, another process saves a pipeline of the tenant:
    // its save waits for the rotation and seals under the new key.
    let racer: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let (url, slot) = (db.url.clone(), racer.clone());
    let hook: FaultHook = Arc::new(move |p: FaultPoint| {
        let (url, slot) = (url.clone(), slot.clone());
        Box::pin(async move {
            if p.name == "rotation_before_commit" {
                let save_task = tokio::spawn(async move {
                    let other = PostgresWarehouse::connect(&url)
                        .await
                        .expect("connect")
                        .with_master_key(key(MASTER_KEY_HEX));
                    save(&other, "acme", "crm", "pw-crm").await;
                });
                *slot.lock().expect("slot") = Some(save_task);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    });
    let rotating = PostgresWarehouse::connect(&db.url)
        .await
        .expect("connect")
        .with_master_key(key(MASTER_KEY_HEX))
        .with_fault_hook(hook);
    assert_eq!(
        rotating
            .rotate_tenant_key(&slug("acme"))
            .await
            .expect("rotate"),
        1
    );
    let save_task = racer.lock().expect("slot").take().expect("the racer ran");
    save_task.await.expect("the racing save");

    let acme_after = sealed(&db, "acme").await;
    assert_ne!(acme_after.0, acme_before.0, "secrets re-sealed");
    assert_ne!(acme_after.1, acme_before.1, "a new data key");
    assert_eq!(
        sealed(&db, "globex").await,
        globex_before,
        "other tenants untouched"
    );
    assert_eq!(all_read(&plain).await, readable());
    assert_eq!(password(&plain, "acme", "crm").await, Ok("pw-crm".into()));
}

#[tokio::test]
async fn the_cli_rotates_the_master_key_and_a_tenant_key_on_the_embedded_warehouse() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let old = SqliteWarehouse::new(&data).with_master_key(key(MASTER_KEY_HEX));
    for t in ["acme", "globex"] {
        save(&old, t, "erp", &format!("pw-{t}")).await;
    }
    drop(old);
    let new_file = dir.path().join("new.key");
    std::fs::write(&new_file, format!("{NEW_HEX}\n")).expect("key file");
    let sluice = |master: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--data-dir")
            .arg(&data)
            .env_remove("SLUICE_DATABASE_URL")
            .env_remove("SLUICE_MASTER_KEY_FILE")
            .env_remove("SLUICE_MASTER_KEY_PREVIOUS")
            .env("SLUICE_MASTER_KEY", master)
            .args(args)
            .output()
            .expect("sluice")
    };
    let same = dir.path().join("same.key");
    std::fs::write(&same, MASTER_KEY_HEX).expect("key file");
    let refused = sluice(
        MASTER_KEY_HEX,
        &[
            "master-key",
            "rotate",
            "--new-key-file",
            same.to_str().expect("path"),
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("a key of its own"));

    let out = sluice(
        MASTER_KEY_HEX,
        &[
            "master-key",
            "rotate",
            "--new-key-file",
            new_file.to_str().expect("path"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 tenant(s)"));
    let out = sluice(NEW_HEX, &["tenant", "rotate-key", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 secret(s)"));
    let out = sluice(MASTER_KEY_HEX, &["tenant", "rotate-key", "acme"]);
    assert!(
        !out.status.success(),
        "the old key no longer opens acme's key"
    );

    let new = SqliteWarehouse::new(&data).with_master_key(key(NEW_HEX));
    assert_eq!(all_read(&new).await, readable());
}
