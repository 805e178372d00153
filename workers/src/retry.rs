//! The retry policy, defined once: a transient failure (network, 5xx, 429, an unavailable
//! database) is retried with exponential backoff (1 s, 2 s, 4 s, 8 s, plus jitter) for five
//! attempts in all; a permanent failure (bad pipeline, refused credentials, a file that is
//! not a CSV) is not retried. After the last attempt the job is dead, with every attempt's
//! error and time, ready for a dead letter.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How failed work is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: usize,
    /// The first wait; each next one doubles.
    pub base: Duration,
    /// Whether to add up to one wait's length of random jitter, so retries of many jobs
    /// that failed together spread out.
    pub jitter: bool,
    /// How long one attempt may run (`--job-timeout`): past it the attempt fails as
    /// transient, is retried, and its pipeline lock is released if no retry is left.
    pub attempt_timeout: Duration,
}

/// The default wall-clock limit of one attempt.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base: Duration::from_secs(1),
            jitter: true,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }
}

impl RetryPolicy {
    /// The production policy with a different first wait (tests run it scaled down).
    pub fn with_base(base: Duration) -> Self {
        RetryPolicy {
            base,
            ..RetryPolicy::default()
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.base)
            .with_factor(2.0)
            .with_max_delay(self.base * 64)
            .with_max_times(self.attempts.saturating_sub(1));
        if self.jitter {
            builder.with_jitter().build()
        } else {
            builder.build()
        }
    }

    /// The waits between attempts without jitter: `base * 2^n`.
    pub fn planned_waits(&self) -> Vec<Duration> {
        (0..self.attempts.saturating_sub(1))
            .map(|n| self.base * 2u32.pow(n as u32))
            .collect()
    }
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based.
    pub number: u32,
    /// When it failed.
    pub at: DateTime<Utc>,
    /// What went wrong.
    pub error: String,
    /// Whether it was worth retrying.
    pub transient: bool,
}

/// How a retried piece of work ended.
#[derive(Debug)]
pub enum Outcome<T> {
    /// It succeeded; `failed` lists the attempts before the one that did.
    Succeeded {
        /// The result.
        value: T,
        /// Failed attempts before the success.
        failed: Vec<Attempt>,
    },
    /// It is dead: a permanent failure, or the last attempt failed.
    Dead {
        /// Every attempt, in order.
        failed: Vec<Attempt>,
        /// Why no further attempt was made.
        reason: String,
    },
}

/// Runs `op(attempt_number)` under `policy`. `is_transient` decides which errors are
/// retried. Also returns the waits actually slept, for observability and tests.
pub async fn run_with_retries<T, E, F, Fut>(
    policy: &RetryPolicy,
    op: F,
    is_transient: impl Fn(&E) -> bool,
) -> (Outcome<T>, Vec<Duration>)
where
    E: std::fmt::Display,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    continue_with_retries(policy, Vec::new(), op, is_transient).await
}

/// Like [`run_with_retries`], for work that already used up the `prior` attempts (a job
/// taken over after its worker died): numbering goes on from them, and they count towards
/// the policy's limit, so a job that keeps killing its worker ends up dead, not looping.
pub async fn continue_with_retries<T, E, F, Fut>(
    policy: &RetryPolicy,
    prior: Vec<Attempt>,
    mut op: F,
    is_transient: impl Fn(&E) -> bool,
) -> (Outcome<T>, Vec<Duration>)
where
    E: std::fmt::Display,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut waits = policy.backoff().skip(prior.len().saturating_sub(1));
    let mut slept = Vec::new();
    if prior.len() >= policy.attempts.max(1) {
        let reason = format!("all {} attempts failed", prior.len());
        return (
            Outcome::Dead {
                failed: prior,
                reason,
            },
            slept,
        );
    }
    if !prior.is_empty()
        && let Some(wait) = waits.next()
    {
        let started = Instant::now();
        tokio::time::sleep(wait).await;
        slept.push(started.elapsed());
    }
    let mut failed = prior;
    loop {
        let number = failed.len() as u32 + 1;
        match op(number).await {
            Ok(value) => return (Outcome::Succeeded { value, failed }, slept),
            Err(e) => {
                let transient = is_transient(&e);
                let error = e.to_string();
                tracing::warn!(attempt = number, transient, %error, "attempt failed");
                failed.push(Attempt {
                    number,
                    at: Utc::now(),
                    error: error.clone(),
                    transient,
                });
                if !transient {
                    return (
                        Outcome::Dead {
                            failed,
                            reason: format!("permanent failure, not retried: {error}"),
                        },
                        slept,
                    );
                }
                match waits.next() {
                    Some(wait) => {
                        let started = Instant::now();
                        tokio::time::sleep(wait).await;
                        slept.push(started.elapsed());
                    }
                    None => {
                        let reason =
                            format!("all {} attempts failed; the last: {error}", failed.len());
                        return (Outcome::Dead { failed, reason }, slept);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug)]
    struct Failure(bool);
    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(if self.0 {
                "connection reset"
            } else {
                "not a CSV file"
            })
        }
    }

    #[test]
    fn production_waits_are_one_two_four_eight_seconds() {
        let secs: Vec<u64> = RetryPolicy::default()
            .planned_waits()
            .iter()
            .map(Duration::as_secs)
            .collect();
        assert_eq!(secs, [1, 2, 4, 8]);
    }

    #[tokio::test]
    async fn three_transient_failures_then_success_on_attempt_four_with_backoff_observed() {
        let policy = RetryPolicy::with_base(Duration::from_millis(20));
        let calls = AtomicU32::new(0);
        let (outcome, slept) = run_with_retries(
            &policy,
            |n| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { if n <= 3 { Err(Failure(true)) } else { Ok(n) } }
            },
            |e: &Failure| e.0,
        )
        .await;
        match outcome {
            Outcome::Succeeded { value, failed } => {
                assert_eq!(value, 4);
                assert_eq!(
                    failed.iter().map(|a| a.number).collect::<Vec<_>>(),
                    [1, 2, 3]
                );
            }
            Outcome::Dead { .. } => panic!("should have succeeded"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Each wait is at least the planned one (20, 40, 80 ms) and at most twice it (jitter),
        // with room for a busy machine oversleeping.
        for (got, planned) in slept.iter().zip(policy.planned_waits()) {
            assert!(
                *got >= planned && *got < planned * 2 + Duration::from_millis(250),
                "{got:?} vs {planned:?}"
            );
        }
        assert_eq!(slept.len(), 3);
    }

    #[tokio::test]
    async fn a_permanent_failure_is_dead_at_once_and_a_transient_one_after_five_attempts() {
        let policy = RetryPolicy::with_base(Duration::from_millis(1));
        let (outcome, _) = run_with_retries(
            &policy,
            |_| async { Err::<(), _>(Failure(false)) },
            |e: &Failure| e.0,
        )
        .await;
        match outcome {
            Outcome::Dead { failed, reason } => {
                assert_eq!(failed.len(), 1);
                assert!(reason.contains("permanent"));
                assert_eq!(failed[0].error, "not a CSV file");
            }
            Outcome::Succeeded { .. } => panic!("cannot succeed"),
        }
        let (outcome, slept) = run_with_retries(
            &policy,
            |_| async { Err::<(), _>(Failure(true)) },
            |e: &Failure| e.0,
        )
        .await;
        match outcome {
            Outcome::Dead { failed, reason } => {
                assert_eq!(
                    failed.iter().map(|a| a.number).collect::<Vec<_>>(),
                    [1, 2, 3, 4, 5]
                );
                assert!(reason.contains("all 5 attempts"));
            }
            Outcome::Succeeded { .. } => panic!("cannot succeed"),
        }
        assert_eq!(slept.len(), 4);
    }
}
