//! Request rates: a token bucket for every API key seen, and one per client address for
//! failed authentications (a missing, unknown or revoked key), so guessing keys is slowed
//! to a trickle. Over the rate, a request gets 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Token-bucket settings per key.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Requests a key may make at once.
    pub burst: f64,
    /// Requests per second refilled.
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            burst: 200.0,
            per_second: 100.0,
        }
    }
}

/// Buckets of every key seen.
#[derive(Debug, Default)]
pub struct Buckets(Mutex<HashMap<String, (f64, Instant)>>);

/// Failed authentications a client address may make at once, then per second.
pub const FAILED_AUTH: RateLimit = RateLimit {
    burst: 20.0,
    per_second: 1.0,
};

/// Buckets kept before full ones are dropped (a full bucket is the same as none).
const MAX_BUCKETS: usize = 100_000;

impl Buckets {
    /// Takes a token for `key`, or says how many seconds until one is there.
    pub fn take(&self, key: &str, limit: RateLimit) -> Result<(), u64> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() >= MAX_BUCKETS {
            map.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * limit.per_second < limit.burst
            });
        }
        let (tokens, at) = map.entry(key.to_string()).or_insert((limit.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * limit.per_second).min(limit.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / limit.per_second.max(1e-9);
            Err(wait.ceil().max(1.0) as u64)
        }
    }
}
