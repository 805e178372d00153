//! Pipeline locks and idempotency keys.
//!
//! A lock per (tenant, pipeline) keeps two syncs of one pipeline from running at once: `SET
//! key value NX PX ttl` with a random token, renewed while the run lasts, released by
//! compare-and-delete so a worker can only ever release its own lease. The lock's value
//! names the run: a trigger arriving while it is still queued joins it; one arriving while
//! it runs queues one run behind it (`next`), which later triggers join and to which the
//! release hands the lock over. Correctness never rests on the lock alone: the warehouse's
//! commit fence stops a worker whose lease expired.
//!
//! Idempotency keys map a caller's key to the run it started, for 24 hours.

use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use crate::error::{WorkerError, WorkerErrorKind};

use super::{Acquired, Behind, IDEMPOTENCY_TTL, Lease, Released};

/// Redis-backed locks and idempotency keys, all under one key prefix (tests use their own).
#[derive(Clone)]
pub struct RedisLocks {
    conn: ConnectionManager,
    prefix: String,
}

/// Renews only while we still hold the lease.
const RENEW: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Takes the lock over for a lease handed over with a job: when it is free, still holds
/// the queued value (ARGV[1]) or already holds this worker's value (ARGV[2]); otherwise
/// returns the holder's value.
/// A run that starts is no longer waiting: its entry in KEYS[2] goes.
const CLAIM: &str = r"local v = redis.call('GET', KEYS[1]) if v == false or v == ARGV[1] or v == ARGV[2] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) if redis.call('HGET', KEYS[2], 'lease') == ARGV[1] then redis.call('DEL', KEYS[2]) end return '' end return v";
/// Takes a free lock (KEYS[1]) for a queued lease (ARGV[1]) and records its job (ARGV[2])
/// as waiting (KEYS[2]) until it is pushed, so that whoever finds it there can push it if
/// the trigger dies first; with an idempotency key (ARGV[4] = '1'), records KEYS[3] -> the
/// run (ARGV[5], for ARGV[6] s) in the same step, or answers the run the key produced
/// before. A run already waiting for a lock nobody holds (its predecessor died before
/// handing over) takes the lock instead, and this trigger pushes its job. Answers {kind,
/// value[, job]}.
const ACQUIRE: &str = r"
if ARGV[4] == '1' then
  local m = redis.call('GET', KEYS[3])
  if m then return {'repeated', m} end
end
local v = redis.call('GET', KEYS[1])
if v then return {'busy', v} end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = redis.call('HGET', KEYS[2], 'lease')
if n then
  redis.call('SET', KEYS[1], n, 'PX', ARGV[3])
  redis.call('HSET', KEYS[2], 'at', now)
  local run = string.match(n, '^[^|]*')
  if ARGV[4] == '1' then redis.call('SET', KEYS[3], run, 'EX', ARGV[6]) end
  return {'waiting', run, redis.call('HGET', KEYS[2], 'job')}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], 'lease', ARGV[1], 'job', ARGV[2], 'at', now) end
if ARGV[4] == '1' then redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6]) end
return {'held', ''}";
/// The job of the queued run holding the lock (KEYS[1]) while it is still recorded as
/// waiting (KEYS[2]) ARGV[1] ms after it took the lock: its push may not have happened.
const PENDING: &str = r"
local v = redis.call('GET', KEYS[1])
if v and redis.call('HGET', KEYS[2], 'lease') == v then
  local t = redis.call('TIME')
  local at = tonumber(redis.call('HGET', KEYS[2], 'at') or '0')
  if t[1] * 1000 + math.floor(t[2] / 1000) - at >= tonumber(ARGV[1]) then
    return redis.call('HGET', KEYS[2], 'job')
  end
end
return ''";
/// Moves a pipeline's last fired tick forward, never back.
const ADVANCE_TICK: &str = r"local v = redis.call('GET', KEYS[1]) if v == false or tonumber(v) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end return 1";
/// Releases only our own lease (ARGV[1]); hands the lock (KEYS[1]) over, for ARGV[2] ms, to
/// the run queued behind ours (KEYS[2]) and returns its job, which stays there until pushed
/// (one that is our own run was pushed and has now ended: it is forgotten).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'not-ours'} end
local lease = redis.call('HGET', KEYS[2], 'lease')
if lease and string.match(lease, '^[^|]*') ~= string.match(ARGV[1], '^[^|]*') then
  redis.call('SET', KEYS[1], lease, 'PX', ARGV[2])
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], 'at', t[1] * 1000 + math.floor(t[2] / 1000))
  return {'handed-over', redis.call('HGET', KEYS[2], 'job')}
end
if lease then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[1])
return {'free'}";
/// A trigger finding the lock (KEYS[1]) taken: joins the run holding it while that run is
/// queued (`run|token`), or the run already queued behind a running one (KEYS[2]), or
/// queues its own (lease ARGV[1], job ARGV[2], run ARGV[3]) behind it. With a key
/// (ARGV[4] = '1'), the idempotency key KEYS[3] keeps (ARGV[5] s) the run obtained, or
/// names the run it produced before.
const QUEUE_BEHIND: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return {'free', ''} end
local target = nil
local _, bars = string.gsub(v, '|', '|')
if bars < 2 then
  target = string.match(v, '^[^|]*')
else
  local n = redis.call('HGET', KEYS[2], 'lease')
  if n and string.match(n, '^[^|]*') ~= string.match(v, '^[^|]*') then target = string.match(n, '^[^|]*') end
end
if ARGV[4] == '1' then
  local m = redis.call('GET', KEYS[3])
  if m then return {'repeated', m} end
end
local kind = 'joined'
if not target then
  redis.call('HSET', KEYS[2], 'lease', ARGV[1], 'job', ARGV[2])
  target = ARGV[3]
  kind = 'queued'
end
if ARGV[4] == '1' then redis.call('SET', KEYS[3], target, 'EX', ARGV[5]) end
return {kind, target}";
/// Forgets the run queued behind (KEYS[1]) once its job is pushed, if it is still ARGV[1].
const FOLLOWED: &str = r"if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

fn redis_error(context: &str, e: redis::RedisError) -> WorkerError {
    WorkerError::new(WorkerErrorKind::Queue, context).with_source(e)
}

impl RedisLocks {
    /// Connects (the connection reconnects by itself after a Redis restart).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, WorkerError> {
        let client = redis::Client::open(url).map_err(|e| redis_error("invalid Redis URL", e))?;
        let conn = client
            .get_connection_manager()
            .await
            .map_err(|e| redis_error("connecting to Redis", e))?;
        Ok(RedisLocks {
            conn,
            prefix: prefix.to_string(),
        })
    }

    fn lock_key(&self, tenant: &str, pipeline: &str) -> String {
        format!("{}:lock:{tenant}:{pipeline}", self.prefix)
    }

    /// Where the run queued behind the holder of `lock_key` waits.
    fn next_key(lock_key: &str) -> String {
        format!("{lock_key}:next")
    }

    fn idempotency_key(&self, tenant: &str, key: &str) -> String {
        format!("{}:idem:{tenant}:{key}", self.prefix)
    }

    /// The lease a trigger handed over with a job.
    pub fn lease(&self, tenant: &str, pipeline: &str, run_id: &str, token: &str) -> Lease {
        Lease {
            key: self.lock_key(tenant, pipeline),
            run_id: run_id.to_string(),
            token: token.to_string(),
        }
    }

    /// Takes the (tenant, pipeline) lock for `run_id` for `ttl`, or names the run that has it.
    pub async fn acquire(
        &self,
        tenant: &str,
        pipeline: &str,
        run_id: &str,
        ttl: Duration,
    ) -> Result<Acquired, WorkerError> {
        let lease = Lease {
            key: self.lock_key(tenant, pipeline),
            run_id: run_id.to_string(),
            token: uuid::Uuid::new_v4().simple().to_string(),
        };
        self.acquire_queued(&lease, None, ttl, None).await
    }

    /// See [`super::Coordinator::acquire_queued`]; `key` is (tenant, scoped key).
    pub async fn acquire_queued(
        &self,
        lease: &Lease,
        job: Option<&str>,
        ttl: Duration,
        key: Option<(&str, &str)>,
    ) -> Result<Acquired, WorkerError> {
        let mut conn = self.conn.clone();
        let idem = key.map(|(tenant, key)| self.idempotency_key(tenant, key));
        let answer: Vec<String> = redis::Script::new(ACQUIRE)
            .key(&lease.key)
            .key(Self::next_key(&lease.key))
            .key(
                idem.clone()
                    .unwrap_or_else(|| format!("{}:idem:-", self.prefix)),
            )
            .arg(lease.value())
            .arg(job.unwrap_or_default())
            .arg(ttl.as_millis() as u64)
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(&lease.run_id)
            .arg(IDEMPOTENCY_TTL.as_secs())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("taking the pipeline lock", e))?;
        Acquired::parse(lease, &answer)
    }

    /// See [`super::Coordinator::pending`].
    pub async fn pending(
        &self,
        lock_key: &str,
        grace: Duration,
    ) -> Result<Option<String>, WorkerError> {
        let mut conn = self.conn.clone();
        let job: String = redis::Script::new(PENDING)
            .key(lock_key)
            .key(Self::next_key(lock_key))
            .arg(grace.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("reading the run waiting for the lock", e))?;
        Ok(Some(job).filter(|j| !j.is_empty()))
    }

    /// Takes over `lease` (handed over with a queued job) for the worker `holder`, for
    /// `ttl`: `Ok(lease)` with the worker's own lease, or `Err(run)` naming the run whose
    /// live worker holds the lock.
    pub async fn claim(
        &self,
        lease: &Lease,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lease, String>, WorkerError> {
        let held = lease.held_by(holder);
        let mut conn = self.conn.clone();
        let current: String = redis::Script::new(CLAIM)
            .key(&lease.key)
            .key(Self::next_key(&lease.key))
            .arg(lease.value())
            .arg(held.value())
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("claiming the pipeline lock", e))?;
        Ok(if current.is_empty() {
            Ok(held)
        } else {
            Err(current.split('|').next().unwrap_or_default().to_string())
        })
    }

    /// Records how a job ended, for whoever waits on its run (kept 24 hours).
    pub async fn save_result(&self, run_id: &str, result: &str) -> Result<(), WorkerError> {
        let mut conn = self.conn.clone();
        let _: () = conn
            .set_ex(
                format!("{}:result:{run_id}", self.prefix),
                result,
                IDEMPOTENCY_TTL.as_secs(),
            )
            .await
            .map_err(|e| redis_error("recording the job result", e))?;
        Ok(())
    }

    /// How the job of `run_id` ended, once it has.
    pub async fn result(&self, run_id: &str) -> Result<Option<String>, WorkerError> {
        let mut conn = self.conn.clone();
        conn.get(format!("{}:result:{run_id}", self.prefix))
            .await
            .map_err(|e| redis_error("reading the job result", e))
    }

    /// The last tick (Unix milliseconds) fired for a pipeline.
    pub async fn last_tick(
        &self,
        tenant: &str,
        pipeline: &str,
    ) -> Result<Option<i64>, WorkerError> {
        let mut conn = self.conn.clone();
        conn.get(format!("{}:tick:{tenant}:{pipeline}", self.prefix))
            .await
            .map_err(|e| redis_error("reading the last tick", e))
    }

    /// Records that the tick at `at_ms` fired (never moves back).
    pub async fn advance_tick(
        &self,
        tenant: &str,
        pipeline: &str,
        at_ms: i64,
    ) -> Result<(), WorkerError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(ADVANCE_TICK)
            .key(format!("{}:tick:{tenant}:{pipeline}", self.prefix))
            .arg(at_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("recording the tick", e))?;
        Ok(())
    }

    /// The connection, for the queues that share it.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Extends our lease; false when it is no longer ours (expired and taken).
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, WorkerError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::Script::new(RENEW)
            .key(&lease.key)
            .arg(lease.value())
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("renewing the pipeline lock", e))?;
        Ok(n == 1)
    }

    /// Releases our lease, handing the lock over to the run queued behind ours (for
    /// `queued_ttl`) when there is one.
    pub async fn release(
        &self,
        lease: &Lease,
        queued_ttl: Duration,
    ) -> Result<Released, WorkerError> {
        let mut conn = self.conn.clone();
        let answer: Vec<String> = redis::Script::new(RELEASE)
            .key(&lease.key)
            .key(Self::next_key(&lease.key))
            .arg(lease.value())
            .arg(queued_ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("releasing the pipeline lock", e))?;
        Ok(match (answer.first().map(String::as_str), answer.get(1)) {
            (Some("handed-over"), Some(job)) => Released::HandedOver(job.clone()),
            (Some("free"), _) => Released::Free,
            _ => Released::NotOurs,
        })
    }

    /// See [`super::Coordinator::queue_behind`]; `key` is (tenant, scoped key).
    pub async fn queue_behind(
        &self,
        lease: &Lease,
        job: &str,
        key: Option<(&str, &str)>,
    ) -> Result<Behind, WorkerError> {
        let mut conn = self.conn.clone();
        let idem = key.map(|(tenant, key)| self.idempotency_key(tenant, key));
        let answer: Vec<String> = redis::Script::new(QUEUE_BEHIND)
            .key(&lease.key)
            .key(Self::next_key(&lease.key))
            .key(
                idem.clone()
                    .unwrap_or_else(|| format!("{}:idem:-", self.prefix)),
            )
            .arg(lease.value())
            .arg(job)
            .arg(&lease.run_id)
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(IDEMPOTENCY_TTL.as_secs())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("queueing a run behind the running one", e))?;
        let mut answer = answer.into_iter();
        let kind = answer.next().unwrap_or_default();
        Behind::parse(&kind, answer.next().unwrap_or_default())
    }

    /// See [`super::Coordinator::followed`].
    pub async fn followed(&self, lease: &Lease) -> Result<(), WorkerError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(FOLLOWED)
            .key(Self::next_key(&lease.key))
            .arg(lease.value())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("forgetting the run queued behind", e))?;
        Ok(())
    }

    /// Records `key` -> `run_id` unless the key is known; returns the run the key maps to.
    pub async fn remember(
        &self,
        tenant: &str,
        key: &str,
        run_id: &str,
    ) -> Result<String, WorkerError> {
        let k = self.idempotency_key(tenant, key);
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(&k)
            .arg(run_id)
            .arg("NX")
            .arg("EX")
            .arg(IDEMPOTENCY_TTL.as_secs())
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("recording the idempotency key", e))?;
        if set.is_some() {
            return Ok(run_id.to_string());
        }
        let existing: Option<String> = conn
            .get(&k)
            .await
            .map_err(|e| redis_error("reading the idempotency key", e))?;
        Ok(existing.unwrap_or_else(|| run_id.to_string()))
    }

    /// Deletes every key under this prefix (tests clean up with it).
    pub async fn clear_prefix(&self) -> Result<(), WorkerError> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = conn
            .keys(format!("{}:*", self.prefix))
            .await
            .map_err(|e| redis_error("listing keys", e))?;
        if !keys.is_empty() {
            let _: () = conn
                .del(keys)
                .await
                .map_err(|e| redis_error("deleting keys", e))?;
        }
        Ok(())
    }
}
