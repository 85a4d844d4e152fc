//! Wall-clock time as the sidecar sees it. Every wall-clock read — when a
//! sync confirmed the mirror, when an override expires, when an audit entry
//! or an upstream error happened, how old data is — goes through one
//! [`Clock`], so that tests age data and expire overrides by moving it
//! instead of sleeping. Elapsed time (timeouts, the breaker's open periods)
//! uses `tokio::time::Instant`, which paused-time tests drive.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The sidecar's wall clock: the system clock plus an offset that tests
/// move forward. Cheap to clone; clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Now.
    pub fn now(&self) -> SystemTime {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        let now = SystemTime::now();
        if offset >= 0 {
            now + Duration::from_millis(offset as u64)
        } else {
            now - Duration::from_millis(offset.unsigned_abs())
        }
    }

    /// How long ago `then` was (zero for a time in the future).
    pub fn since(&self, then: SystemTime) -> Duration {
        self.now().duration_since(then).unwrap_or_default()
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_move_together_and_ages_never_go_negative() {
        let clock = Clock::system();
        let other = clock.clone();
        let start = clock.now();
        other.advance(Duration::from_secs(3600));
        assert!(clock.since(start) >= Duration::from_secs(3600));
        assert_eq!(
            clock.since(clock.now() + Duration::from_secs(60)),
            Duration::ZERO
        );
    }
}
