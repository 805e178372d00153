//! Request gates kept in Redis, so that every worker process of a deployment, on any
//! machine, keeps under one service account's limits together (QuickBooks allows a company
//! 500 requests a minute and 10 at once, whoever sends them). Each admission is one Lua
//! script on Redis' own clock: a sorted set of request start times for the window and a
//! sorted set of leases for the requests in flight. A lease expires on its own (after
//! `lease`), so a process killed mid-request does not hold its slot for ever.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use sluice_connectors::saas::{Gate, GateMaker, Limits, Pass, counted_window};
use sluice_connectors::{SourceError, SourceErrorKind};

/// Admits one request, or says how long to wait (ms). KEYS: window set, in-flight set.
/// ARGV: window ms, requests, concurrent, member, lease ms.
const ENTER: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, requests, concurrent = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= concurrent then
  return 20
end
if redis.call('ZCARD', KEYS[1]) >= requests then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]))
return 0
";

/// A service account's gate in Redis.
#[derive(Clone)]
pub struct RedisGate {
    conn: ConnectionManager,
    window_key: String,
    flight_key: String,
    limits: Limits,
    lease: Duration,
}

impl RedisGate {
    /// The gate of account `key` under `prefix`, over `conn`.
    pub fn new(conn: ConnectionManager, prefix: &str, key: &str, limits: Limits) -> Self {
        let key = format!("{prefix}:gate:{key}");
        RedisGate {
            conn,
            window_key: format!("{key}:window"),
            flight_key: format!("{key}:flight"),
            limits,
            lease: Duration::from_secs(120),
        }
    }

    /// A [`GateMaker`] for [`sluice_connectors::saas::share_limits`]: every account's gate
    /// in Redis under `prefix`.
    pub fn maker(conn: ConnectionManager, prefix: &str) -> GateMaker {
        let prefix = prefix.to_string();
        Arc::new(move |key: &str, limits: Limits| {
            Arc::new(RedisGate::new(conn.clone(), &prefix, key, limits)) as Arc<dyn Gate>
        })
    }
}

/// A request's lease; dropping it frees the slot (and it expires by itself).
struct Lease {
    conn: ConnectionManager,
    flight_key: String,
    member: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (mut conn, key, member) = (
            self.conn.clone(),
            self.flight_key.clone(),
            std::mem::take(&mut self.member),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _: Result<i64, _> = redis::cmd("ZREM")
                    .arg(&key)
                    .arg(&member)
                    .query_async(&mut conn)
                    .await;
            });
        }
    }
}

impl Gate for RedisGate {
    fn enter(&self) -> Pin<Box<dyn Future<Output = Result<Pass, SourceError>> + Send + '_>> {
        Box::pin(async move {
            let member = uuid::Uuid::new_v4().to_string();
            let window = counted_window(&self.limits).as_millis() as u64;
            let mut conn = self.conn.clone();
            loop {
                let wait: u64 = redis::Script::new(ENTER)
                    .key(&self.window_key)
                    .key(&self.flight_key)
                    .arg(window)
                    .arg(self.limits.requests.max(1))
                    .arg(self.limits.concurrent.max(1))
                    .arg(&member)
                    .arg(self.lease.as_millis() as u64)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| {
                        SourceError::new(
                            SourceErrorKind::Transient,
                            format!("the shared request limits in Redis: {e}"),
                        )
                    })?;
                if wait == 0 {
                    return Ok(Pass::new(Lease {
                        conn: self.conn.clone(),
                        flight_key: self.flight_key.clone(),
                        member,
                    }));
                }
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        })
    }
}

/// Makes this process's API sources keep their limits in the Redis at `url`, under
/// `prefix`, together with every other process that does the same.
pub async fn share_limits_in_redis(url: &str, prefix: &str) -> Result<(), crate::WorkerError> {
    let locks = crate::coord::RedisLocks::connect(url, prefix).await?;
    sluice_connectors::saas::share_limits(RedisGate::maker(locks.connection(), prefix));
    Ok(())
}
