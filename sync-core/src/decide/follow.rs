//! The follow loop's decisions: pure, with time passed in. `Backoff` says when the next
//! round is due after one ends; `Stall` says whether pulling goes on, is done, or has
//! stalled. `follow_loop.rs` (and `follower.rs`'s catch-up) drive them.

use std::time::{Duration, Instant};

use crate::Seq;

/// When the loop runs its next round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wake {
    /// The instant the next round is due on its own; `None`: only when asked
    /// (`Follow::sync_now`), after a revocation or a refusal.
    pub at: Option<Instant>,
    /// Whether news (a leader's notice, a write entering the outbox) starts a round
    /// before `at`: not while backing off.
    pub on_news: bool,
}

/// Exponential backoff after failed rounds, polling after good ones.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    poll_interval: Duration,
    retry_delay_min: Duration,
    retry_delay_max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(config: &crate::FollowConfig) -> Backoff {
        Backoff {
            poll_interval: config.poll_interval,
            retry_delay_min: config.retry_delay_min,
            retry_delay_max: config.retry_delay_max,
            failures: 0,
        }
    }

    /// A round ended at `now`: `Ok(())`, or failed, retrying on its own (`retries`) or
    /// not. `jitter` in `[0.5, 1.0)` scales a retry delay, so that followers that lost
    /// one leader together do not all come back in the same instant.
    pub(crate) fn round_ended(
        &mut self,
        outcome: Result<(), bool>,
        now: Instant,
        jitter: f64,
    ) -> Wake {
        let retries = match outcome {
            Ok(()) => {
                self.failures = 0;
                true
            }
            Err(retries) => {
                self.failures = self.failures.saturating_add(1);
                retries
            }
        };
        Wake {
            at: retries.then(|| now + self.delay(jitter)),
            on_news: self.failures == 0,
        }
    }

    /// The delay before the next round: the poll interval after a good round; after
    /// `n` failures `retry_delay_min · 2ⁿ⁻¹`, at most `retry_delay_max`, times `jitter`.
    fn delay(&self, jitter: f64) -> Duration {
        if self.failures == 0 {
            return self.poll_interval;
        }
        let factor = 2u32.saturating_pow(self.failures.saturating_sub(1).min(16));
        self.retry_delay_min
            .saturating_mul(factor)
            .min(self.retry_delay_max)
            .mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// What pulling does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// The position reached the target.
    Done,
    /// Pull again from the position reached.
    Again,
    /// Nothing new twice in a row although the leader claims more: a leader answering
    /// nothing would keep the loop spinning. (Once is tolerated: an entry may not be
    /// visible to the leader's reader yet, on MySQL.)
    Stalled,
}

/// Stall detection over consecutive pulls.
#[derive(Debug, Clone)]
pub(crate) struct Stall {
    reached: Seq,
    idle: u8,
}

impl Stall {
    /// Pulling starts at `position`.
    pub(crate) fn new(position: Seq) -> Stall {
        Stall {
            reached: position,
            idle: 0,
        }
    }

    /// A pull reached `position`; the target is `latest`.
    pub(crate) fn pulled(&mut self, position: Seq, latest: Seq) -> Next {
        if position >= latest {
            return Next::Done;
        }
        if position > self.reached {
            self.reached = position;
            self.idle = 0;
            return Next::Again;
        }
        self.idle += 1;
        if self.idle >= 2 {
            Next::Stalled
        } else {
            Next::Again
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn config() -> crate::FollowConfig {
        crate::FollowConfig {
            batch_len_max: 10,
            poll_interval: Duration::from_secs(5),
            retry_delay_min: Duration::from_millis(100),
            retry_delay_max: Duration::from_secs(3),
        }
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_maximum_and_a_success_resets() {
        let now = Instant::now();
        let mut backoff = Backoff::new(&config());
        let delays: Vec<Duration> = (0..8)
            .map(|_| {
                let wake = backoff.round_ended(Err(true), now, 1.0);
                assert!(!wake.on_news, "backing off ignores news");
                wake.at.expect("retries") - now
            })
            .collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1_600, 3_000, 3_000, 3_000]);
        let wake = backoff.round_ended(Ok(()), now, 0.5);
        assert_eq!(
            wake.at,
            Some(now + Duration::from_secs(5)),
            "polls, no jitter"
        );
        assert!(wake.on_news);
        let again = backoff.round_ended(Err(true), now, 0.5);
        assert_eq!(
            again.at,
            Some(now + Duration::from_millis(50)),
            "jittered, from the start"
        );
    }

    #[test]
    fn a_refusal_waits_until_asked() {
        let now = Instant::now();
        let mut backoff = Backoff::new(&config());
        let wake = backoff.round_ended(Err(false), now, 0.7);
        assert_eq!(wake.at, None);
        assert!(!wake.on_news);
    }

    #[test]
    fn pulling_stops_when_done_and_stalls_on_nothing_new_twice() {
        let mut stall = Stall::new(Seq(3));
        assert_eq!(stall.pulled(Seq(5), Seq(10)), Next::Again);
        assert_eq!(
            stall.pulled(Seq(5), Seq(10)),
            Next::Again,
            "once is tolerated"
        );
        assert_eq!(
            stall.pulled(Seq(6), Seq(10)),
            Next::Again,
            "progress resets"
        );
        assert_eq!(stall.pulled(Seq(6), Seq(10)), Next::Again);
        assert_eq!(stall.pulled(Seq(6), Seq(10)), Next::Stalled);
        assert_eq!(Stall::new(Seq(3)).pulled(Seq(10), Seq(10)), Next::Done);
        assert_eq!(Stall::new(Seq(12)).pulled(Seq(12), Seq(10)), Next::Done);
    }

    proptest! {
        /// Whatever the failures and jitter, a retry is never later than the maximum,
        /// never sooner than half the minimum, and never earlier than the one before it
        /// at full jitter.
        #[test]
        fn retry_delays_stay_in_bounds(failures in 1usize..80, jitter in 0.5f64..1.0) {
            let now = Instant::now();
            let mut backoff = Backoff::new(&config());
            let mut last = Duration::ZERO;
            for _ in 0..failures {
                let full = backoff.clone().round_ended(Err(true), now, 1.0);
                let wake = backoff.round_ended(Err(true), now, jitter);
                let delay = wake.at.expect("retries") - now;
                prop_assert!(delay <= config().retry_delay_max);
                prop_assert!(delay >= config().retry_delay_min / 2);
                let full = full.at.expect("retries") - now;
                prop_assert!(full >= last);
                last = full;
            }
        }
    }
}
