//! Jobs end to end: pipelines written to files, queues, workers in the test's process or
//! as `sluice worker` processes, and the checks that nothing was lost or loaded twice.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use sluice_engine::RunTrigger;
use sluice_engine::control::PipelineStore;
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::RunHistory;
use sluice_engine::{TenantSlug, Warehouse};
use sluice_pipelines::PipelineSpec;
use sluice_workers::worker::{WorkerEnv, WorkerOptions, run_workers};
use sluice_workers::{QueueSettings, Queues, TriggerRequest};

use super::Expected;
use super::pg::MASTER_KEY_HEX;

/// How a `sluice worker` process is started.
pub struct WorkerProcess {
    /// PostgreSQL warehouse (else the embedded one under the data directory).
    pub database_url: Option<String>,
    /// Redis URL and key prefix (else the embedded queue).
    pub redis: Option<(String, String)>,
    /// The retry policy's first delay.
    pub retry_base_ms: u64,
    /// How long a running job's pipeline lock lasts without renewal.
    pub lease_ms: u64,
}

/// A `sluice worker` process (heartbeat 1 s, one sync at a time).
pub fn sluice_worker(p: &WorkerProcess, data: &Path) -> Child {
    sluice_process(p, data, &["worker", "--concurrency", "1"])
}

/// A `sluice scheduler` process.
pub fn sluice_scheduler(p: &WorkerProcess, data: &Path) -> Child {
    sluice_process(p, data, &["scheduler"])
}

/// A `sluice` process running `command` on the services of `p`.
pub fn sluice_process(p: &WorkerProcess, data: &Path, command: &[&str]) -> Child {
    sluice_process_logged(p, data, command, None)
}

/// As [`sluice_process`], its warnings and errors appended to `log` when given.
pub fn sluice_process_logged(
    p: &WorkerProcess,
    data: &Path,
    command: &[&str],
    log: Option<&Path>,
) -> Child {
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("log file"),
        ),
        None => Stdio::null(),
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.arg("--data-dir").arg(data);
    if let Some(url) = &p.database_url {
        cmd.args(["--database-url", url]);
    }
    if let Some((url, prefix)) = &p.redis {
        cmd.args(["--redis-url", url])
            .args(["--queue-prefix", prefix]);
    }
    cmd.env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_REDIS_URL")
        .args(["--heartbeat-ms", "1000"])
        .args(["--lease-ms", &p.lease_ms.to_string()])
        .args(["--retry-base-ms", &p.retry_base_ms.to_string()])
        .args(command)
        .env("SLUICE_MASTER_KEY", MASTER_KEY_HEX)
        .env("SLUICE_LOG", if log.is_some() { "info" } else { "warn" })
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start a worker")
}

pub fn slug(s: &str) -> TenantSlug {
    TenantSlug::parse(s).expect("slug")
}

pub fn settings(redis: Option<(&str, &str)>, dir: &Path) -> QueueSettings {
    let mut s = QueueSettings::new(redis.map(|(url, _)| url.to_string()), dir.to_path_buf());
    if let Some((_, prefix)) = redis {
        s.prefix = prefix.to_string();
    }
    s.heartbeat = Duration::from_secs(1);
    s.lease_ttl = Duration::from_secs(3);
    s.poll_interval = Duration::from_millis(50);
    s
}

/// Writes a pipeline file (and its CSV) and returns the spec.
pub fn write_pipeline(
    dir: &Path,
    name: &str,
    csv: &str,
    batch_rows: usize,
    cron: Option<&str>,
) -> PipelineSpec {
    let file = dir.join(format!("{name}.csv"));
    std::fs::write(&file, csv).expect("csv");
    let schedule = cron
        .map(|c| format!("[schedule]\ncron = \"{c}\"\n"))
        .unwrap_or_default();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ntenant = \"acme\"\nentity = \"invoices\"\nbatch_rows = {batch_rows}\n[source]\nkind = \"csv\"\npath = \"{name}.csv\"\n{schedule}"
        ),
    )
    .expect("toml");
    PipelineSpec::from_file(&path).expect("spec")
}

pub async fn register<S: PipelineStore>(store: &S, spec: &PipelineSpec) {
    let (fields, secrets) = spec.to_stored();
    store
        .save_pipeline(
            &slug(&spec.tenant),
            &spec.name,
            &fields,
            &secrets,
            &super::shell_change(),
        )
        .await
        .expect("register pipeline");
}

/// Workers running in this test until [`stop_workers`].
pub struct RunningWorkers {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), sluice_workers::WorkerError>>,
}

pub fn start_workers<W>(env: Arc<WorkerEnv<W>>, options: WorkerOptions) -> RunningWorkers
where
    W: Warehouse + PipelineStore + sluice_engine::control::WebhookStore + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        run_workers(env, &options, async move {
            let _ = stopped.await;
        })
        .await
    });
    RunningWorkers { stop, handle }
}

pub async fn stop_workers(workers: RunningWorkers) {
    let _ = workers.stop.send(());
    workers.handle.await.expect("join").expect("workers");
}

/// The result of the job of `run`, within a minute.
pub async fn job_result(queues: &Queues, run: &str) -> sluice_workers::JobResult {
    tokio::time::timeout(
        Duration::from_secs(60),
        queues.wait(run, Duration::from_millis(50)),
    )
    .await
    .expect("the job ends")
    .expect("result")
}

/// The result of the job of `run` once it ends, or `None` after `limit`. A job whose worker
/// died ends only after another takes it over, once the dead one's heartbeat lapses.
pub async fn job_ended(
    queues: &Queues,
    run: &str,
    limit: Duration,
) -> Option<sluice_workers::JobResult> {
    tokio::time::timeout(limit, async {
        loop {
            if let Ok(r) = queues.wait(run, Duration::from_millis(200)).await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .ok()
}

/// The whole job of `run` in tenant `acme`: its result within `limit`, then its ledger over
/// all attempts.
pub async fn finished_job<W: RunHistory>(
    queues: &Queues,
    w: &W,
    run: &str,
    limit: Duration,
) -> (sluice_workers::JobResult, sluice_engine::JobLedger) {
    let result = job_ended(queues, run, limit).await.expect("the job ends");
    let job = w
        .job(&slug("acme"), run)
        .await
        .expect("ledger")
        .expect("the job's runs");
    (result, job)
}

pub fn manual(pipeline: &str) -> TriggerRequest {
    TriggerRequest {
        tenant: "acme".into(),
        pipeline: pipeline.into(),
        trigger: RunTrigger::Manual,
        idempotency_key: None,
        correlation_id: None,
        file: None,
    }
}

/// Polls until `check` holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A PostgreSQL warehouse at `url` with the master key and the tenant `acme`.
pub async fn acme_warehouse(url: &str) -> sluice_engine::warehouse::PostgresWarehouse {
    let w = sluice_engine::warehouse::PostgresWarehouse::connect(url)
        .await
        .expect("connect")
        .with_master_key(master());
    w.create_tenant(&slug("acme"), "Acme", &master())
        .await
        .expect("tenant");
    w
}

pub fn master() -> MasterKey {
    MasterKey::from_hex(MASTER_KEY_HEX).expect("key")
}

pub async fn totals<W: Warehouse>(w: &W) -> (usize, HashMap<String, Decimal>) {
    let invoices = w.invoices(&slug("acme")).await.expect("invoices");
    let mut by = HashMap::new();
    for i in &invoices {
        *by.entry(i.currency.clone()).or_insert(Decimal::ZERO) += i.total;
    }
    (invoices.len(), by)
}

pub fn expected_sums(exp: &Expected) -> HashMap<String, Decimal> {
    exp.sum_of_totals()
        .into_iter()
        .map(|(c, v)| (c.to_string(), v))
        .collect()
}

/// Waits until the run has committed at least one batch.
pub async fn first_batches_committed<W: Warehouse>(w: &W, run_id: &str) {
    eventually(Duration::from_secs(60), "the first batches", || async {
        w.run(&slug("acme"), run_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|l| l.counts.rows_read > 0)
    })
    .await;
}

/// The warehouse holds exactly the generator's winning rows: count and per-currency sums.
pub async fn assert_loaded_exactly<W: Warehouse>(w: &W, exp: &Expected) {
    let (count, sums) = totals(w).await;
    assert_eq!(count, exp.winners.len());
    assert_eq!(sums, expected_sums(exp));
}

pub fn kill_9(child: &mut Child) {
    Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .expect("kill -9");
    let _ = child.wait();
}

/// Child processes killed when the test ends, however it ends.
pub struct Reaper(pub Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sets the currency of quarantined invoices `ids` (tenant `acme` in a PostgreSQL
/// warehouse) from XYZ to USD and marks them fixed, as an admin's PATCH would.
pub async fn fix_currencies(conn: &mut sqlx::PgConnection, ids: &[String]) {
    sqlx::query(
        "UPDATE tenant_acme.quarantine SET raw = jsonb_set(raw, '{currency}', '\"USD\"'), \
         raw_text = replace(raw_text, '\"currency\":\"XYZ\"', '\"currency\":\"USD\"'), status = 'fixed' WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(conn)
    .await
    .expect("fix");
}

/// The runs each cron tick of `tenant`'s `pipeline` produced, by tick (epoch ms), from the
/// scheduler's idempotency keys in Redis.
pub async fn cron_ticks(
    redis_url: &str,
    prefix: &str,
    tenant: &str,
    pipeline: &str,
) -> Vec<(i64, String)> {
    use redis::AsyncCommands;
    let Ok(mut conn) = redis::Client::open(redis_url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
    else {
        return Vec::new();
    };
    let keys: Vec<String> = conn
        .keys(format!("{prefix}:idem:{tenant}:{pipeline}/cron:*"))
        .await
        .unwrap_or_default();
    let mut ticks = Vec::new();
    for key in keys {
        let run: String = conn.get(&key).await.expect("run");
        let at: i64 = key
            .rsplit(':')
            .next()
            .and_then(|t| t.parse().ok())
            .expect("tick");
        ticks.push((at, run));
    }
    ticks.sort();
    ticks
}
