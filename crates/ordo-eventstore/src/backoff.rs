//! The back-off of every retry loop in ordo (connecting, restarting a consumer, retrying a saga
//! step or a notification): exponential from a first delay, capped, with jitter so that
//! instances do not retry in step, and reset after a success so that one outage does not leave
//! the next one waiting at the cap. The delays come from `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// A long-running task that ran this long before it ended was healthy.
pub const HEALTHY_RUN: Duration = Duration::from_secs(30);

pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    cap: Duration,
}

impl Backoff {
    /// Delays from about `first`, doubling, never above `cap` (jitter included).
    pub fn new(first: Duration, cap: Duration) -> Self {
        // backon's jitter adds up to the delay once more: halve both bounds to stay within them.
        let builder = ExponentialBuilder::new()
            .with_min_delay(first / 2)
            .with_max_delay(cap / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            cap,
        }
    }

    /// The delay before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.cap).min(self.cap)
    }

    /// Sleeps for the next delay and returns it.
    pub async fn wait(&mut self) -> Duration {
        let delay = self.next_delay();
        tokio::time::sleep(delay).await;
        delay
    }

    /// After a success: the next failure starts from the first delay again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// The delay before restarting a long-running task (a consumer, a projector's term) that
    /// ended after running for `ran`: one that ran for [`HEALTHY_RUN`] was healthy, so the
    /// back-off starts over.
    pub fn after_run(&mut self, ran: Duration) -> Duration {
        if ran >= HEALTHY_RUN {
            self.reset();
        }
        self.next_delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_under_the_cap_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let later: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(later.iter().all(|delay| *delay <= Duration::from_secs(2)));
        assert!(
            later.last().unwrap() >= &Duration::from_secs(1),
            "{later:?}"
        );
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
        for _ in 0..20 {
            backoff.next_delay();
        }
        assert!(backoff.after_run(HEALTHY_RUN) <= Duration::from_millis(100));
        assert!(backoff.after_run(Duration::from_secs(1)) > Duration::from_millis(100));
    }
}
