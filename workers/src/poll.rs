//! How an idle worker is woken to look for jobs.
//!
//! apalis' `IntervalStrategy` re-arms its timer when it fires without polling the new one,
//! so no waker is registered for the next tick; the next tick is only seen if something
//! else (the fetch it starts, the heartbeat timer) wakes the worker first. When one wake-up
//! finds both the tick elapsed and the fetch it started already answered (a fetch slower
//! than the interval, as on a busy machine or just after Redis restarts), and the heartbeat
//! timer fired during that fetch (the backend does not look at it while a fetch is open),
//! nothing is left to wake the worker: it never fetches again, and jobs wait in the queue
//! for ever. [`EveryInterval`] registers every timer it arms.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy};

/// Wakes the worker every `interval`, keeping a waker registered at all times.
#[derive(Debug)]
pub struct EveryInterval {
    interval: Duration,
    next: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl EveryInterval {
    /// A tick every `interval`.
    pub fn new(interval: Duration) -> Self {
        EveryInterval {
            interval,
            next: None,
        }
    }
}

impl Clone for EveryInterval {
    fn clone(&self) -> Self {
        EveryInterval::new(self.interval)
    }
}

impl PollStrategy for EveryInterval {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let interval = self.interval;
        let next = self
            .next
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
        if next.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let mut again = Box::pin(tokio::time::sleep(interval));
        // Polling the new timer registers this waker for the next tick.
        let _ = again.as_mut().poll(cx);
        self.next = Some(again);
        Poll::Ready(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A tick seen late (the worker was busy when it fired) still leaves a waker armed for
    /// the next one: without it an idle worker is never woken again.
    #[tokio::test]
    async fn a_tick_seen_late_still_arms_the_next_wake_up() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let snapshot = PollSnapshot::default();
        let mut strategy = EveryInterval::new(Duration::from_millis(20));
        assert!(strategy.poll_drive(&mut cx, &snapshot).is_pending());
        // The worker looks again only after the tick has passed.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(strategy.poll_drive(&mut cx, &snapshot).is_ready());
        let before = count.0.load(Ordering::SeqCst);
        // Nobody polls now: the next tick must wake the worker by itself.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            count.0.load(Ordering::SeqCst) > before,
            "no wake-up after a late tick: the worker would sleep for ever"
        );
    }
}
