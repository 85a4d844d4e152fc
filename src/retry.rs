//! Exponential backoff with jitter: retries inside one upstream call, and the
//! sync loop's pause between failed syncs.
//!
//! This is the only module that uses the `backoff` crate. It is unmaintained
//! (RUSTSEC-2025-0012) but chosen deliberately; keeping it behind [`retry`] and
//! [`next_delays`] means replacing it touches this file alone. Time comes from
//! `tokio::time`, so paused-time tests drive both the sleeps and `max_elapsed`.
//! Retries run inside one breaker permit: the breaker sees one outcome per call.

use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::exponential::ExponentialBackoff;

/// First delay of a [`RetryPolicy::default`].
pub const DEFAULT_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay of a [`RetryPolicy::default`].
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_secs(30);
/// Growth of each delay over the previous one.
pub const DEFAULT_MULTIPLIER: f64 = 2.0;
/// Relative jitter on each delay (0.2 = ±20 %).
pub const DEFAULT_RANDOMIZATION: f64 = 0.2;

/// How to space out attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Ceiling on every delay, jitter included.
    pub max_interval: Duration,
    /// Growth factor between delays (values below 1 are taken as 1).
    pub multiplier: f64,
    /// Relative jitter on each delay, clamped to `[0, 1]`.
    pub randomization: f64,
    /// Give up once this much time has passed since the first attempt;
    /// `None` retries for ever.
    pub max_elapsed: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: DEFAULT_INITIAL,
            max_interval: DEFAULT_MAX_INTERVAL,
            multiplier: DEFAULT_MULTIPLIER,
            randomization: DEFAULT_RANDOMIZATION,
            max_elapsed: None,
        }
    }
}

/// A failed attempt, and whether another one could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt<E> {
    /// Worth retrying (connect error, timeout, 5xx).
    Transient(E),
    /// Retrying cannot help (4xx, malformed request); returned at once.
    Permanent(E),
}

/// Runs `op` until it succeeds, fails permanently, or `max_elapsed` runs
/// out; the error returned is the last attempt's.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    backoff::future::retry(Capped::new(policy), || {
        let attempt = op();
        async move {
            attempt.await.map_err(|error| match error {
                Attempt::Transient(e) => backoff::Error::transient(e),
                Attempt::Permanent(e) => backoff::Error::permanent(e),
            })
        }
    })
    .await
}

/// The delays between consecutive failures: exponential with jitter, each at
/// most `max_interval`. Ends once `max_elapsed` (counted from this call) has
/// passed; with `None` it never ends. Start a new one after a success.
pub fn next_delays(policy: &RetryPolicy) -> impl Iterator<Item = Duration> {
    let mut backoff = Capped::new(policy);
    backoff.reset();
    std::iter::from_fn(move || backoff.next_backoff())
}

/// Like [`next_delays`], with full jitter: each delay is drawn uniformly
/// from zero up to what the exponential schedule (without its own jitter)
/// reaches at that step. Many sidecars failing together then spread their
/// next attempts over the whole window instead of coming back in a wave.
pub fn next_delays_full_jitter(policy: &RetryPolicy) -> impl Iterator<Item = Duration> {
    let ceilings = next_delays(&RetryPolicy {
        randomization: 0.0,
        ..policy.clone()
    });
    ceilings.map(|ceiling| {
        use rand::Rng;
        ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
    })
}

/// `backoff`'s clock, read from tokio so that paused time counts.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl backoff::Clock for TokioClock {
    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// `ExponentialBackoff` lets jitter overshoot `max_interval`; this makes the
/// ceiling hard, which is what an operator reading the config expects.
struct Capped {
    inner: ExponentialBackoff<TokioClock>,
    max_interval: Duration,
}

impl Capped {
    fn new(policy: &RetryPolicy) -> Self {
        let clock = TokioClock;
        let randomization = if policy.randomization.is_nan() {
            0.0
        } else {
            policy.randomization.clamp(0.0, 1.0)
        };
        let multiplier = if policy.multiplier >= 1.0 {
            policy.multiplier
        } else {
            1.0
        };
        Capped {
            inner: ExponentialBackoff {
                current_interval: policy.initial,
                initial_interval: policy.initial,
                randomization_factor: randomization,
                multiplier,
                max_interval: policy.max_interval,
                start_time: backoff::Clock::now(&clock),
                max_elapsed_time: policy.max_elapsed,
                clock,
            },
            max_interval: policy.max_interval,
        }
    }
}

impl Backoff for Capped {
    fn reset(&mut self) {
        self.inner.reset();
    }

    fn next_backoff(&mut self) -> Option<Duration> {
        self.inner
            .next_backoff()
            .map(|delay| delay.min(self.max_interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(2),
            multiplier: 2.0,
            randomization: 0.0,
            max_elapsed: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let attempts = AtomicU32::new(0);
        let start = Instant::now();
        let result: Result<u32, &str> = retry(&policy(), || async {
            let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            if n < 4 {
                Err(Attempt::Transient("upstream 503"))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(result, Ok(4));
        // Three waits without jitter: 100 + 200 + 400 ms of paused time.
        assert_eq!(start.elapsed(), Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_error_stops_at_once() {
        let attempts = AtomicU32::new(0);
        let start = Instant::now();
        let result: Result<(), &str> = retry(&policy(), || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err(Attempt::Permanent("upstream 400"))
        })
        .await;
        assert_eq!(result, Err("upstream 400"));
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn max_elapsed_gives_up_with_the_last_error() {
        let attempts = AtomicU32::new(0);
        let start = Instant::now();
        let result: Result<(), u32> = retry(
            &RetryPolicy {
                max_elapsed: Some(Duration::from_secs(1)),
                ..policy()
            },
            || async { Err(Attempt::Transient(attempts.fetch_add(1, Ordering::SeqCst))) },
        )
        .await;
        // Waits of 100, 200, 400 ms fit in 1s; the next (800 ms) would not.
        assert_eq!(result, Err(3));
        assert_eq!(attempts.load(Ordering::SeqCst), 4);
        assert_eq!(start.elapsed(), Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_and_stay_under_max_interval() {
        let delays: Vec<_> = next_delays(&policy()).take(8).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            delays,
            vec![
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(2000),
                ms(2000),
                ms(2000)
            ]
        );

        let jittery = RetryPolicy {
            randomization: 0.5,
            ..policy()
        };
        for _ in 0..20 {
            let delays: Vec<_> = next_delays(&jittery).take(12).collect();
            assert!(
                delays.iter().all(|d| *d <= jittery.max_interval),
                "{delays:?}"
            );
            // Jitter of ±50 % keeps each delay within its band (backoff adds up to 1ns).
            assert!((ms(50)..ms(151)).contains(&delays[0]), "{delays:?}");
            assert!((ms(400)..ms(1201)).contains(&delays[3]), "{delays:?}");
            assert!(delays[11] >= ms(1000), "{delays:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn full_jitter_spreads_each_delay_over_zero_to_its_ceiling() {
        let ms = |n| Duration::from_millis(n);
        let mut firsts = Vec::new();
        for _ in 0..200 {
            let delays: Vec<_> = next_delays_full_jitter(&policy()).take(8).collect();
            let ceilings = [100, 200, 400, 800, 1600, 2000, 2000, 2000];
            for (d, c) in delays.iter().zip(ceilings) {
                assert!(*d <= ms(c), "{delays:?}");
            }
            firsts.push(delays[5]);
        }
        // Spread over the whole window, not bunched at its ceiling.
        assert!(firsts.iter().any(|d| *d < ms(500)), "{firsts:?}");
        assert!(firsts.iter().any(|d| *d > ms(1500)), "{firsts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn next_delays_end_after_max_elapsed() {
        let mut delays = next_delays(&RetryPolicy {
            max_elapsed: Some(Duration::from_secs(1)),
            ..policy()
        });
        assert_eq!(delays.next(), Some(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(delays.next(), None);
    }
}
