//! The faults the demo catalog can be told to exhibit.
//!
//! A `Faults` value is the whole fault set: setting one replaces the previous
//! set (like `PUT /faults`). `FaultSwitch` is the shared, cloneable handle the
//! server reads on every request and the accept loop watches to close and
//! reopen its listener. Faults touch the catalog listener only, never the
//! control listener.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

/// Trickle the response body: `bytes` every `interval_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowBody {
    /// Bytes sent per interval (at least 1 is used).
    pub bytes: usize,
    /// Pause between chunks, in milliseconds.
    pub interval_ms: u64,
}

/// A fault set. The default is a healthy catalog.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Close the catalog listener (connect errors); reopened on the same port
    /// when cleared. Open connections are dropped too.
    pub refuse: bool,
    /// Accept and read requests, never answer (client timeouts).
    pub black_hole: bool,
    /// Milliseconds added before every answer.
    pub latency: Option<u64>,
    /// Trickle bodies slowly; a body-less answer (a 304) is held for as
    /// long as its headers would take at the same rate.
    pub slow_body: Option<SlowBody>,
    /// Fraction (0..=1) of requests answered 500 or 503, from a seeded RNG.
    pub error_rate: f64,
    /// Answer every request 429 with this `Retry-After` (seconds).
    pub too_many_requests: Option<u64>,
    /// Send bodies that are not valid JSON (with matching Content-Length).
    /// `If-None-Match` is ignored meanwhile (no body-less 304 escapes it).
    pub malformed: bool,
    /// Announce the full Content-Length, send half the body, drop the
    /// connection. `If-None-Match` is ignored meanwhile, as for `malformed`.
    pub truncated: bool,
    /// Answer 200 with a `text/html` page instead of JSON.
    pub wrong_content_type: bool,
    /// Answer 200 with the same `text/html` page, but only requests whose
    /// path below `/api/catalog` starts with one of these prefixes (e.g.
    /// `/locations/`); every other route answers as usual.
    pub wrong_content_type_paths: Vec<String>,
    /// Serve a catalog with zero entities.
    pub empty_catalog: bool,
    /// The Nth page (1-based) of a paging (by-query cursor depth, or
    /// `GET /entities` offset/limit) fails with 500; other pages succeed.
    pub fail_page: Option<u32>,
    /// Alternate up and down (listener closed) every this many milliseconds,
    /// starting up.
    pub flap: Option<u64>,
}

impl Faults {
    /// Whether no fault is set.
    pub fn is_healthy(&self) -> bool {
        *self == Faults::default()
    }

    /// Whether `wrong_content_type_paths` covers this request path (as
    /// received, with the `/api/catalog` mount).
    pub fn html_for(&self, path: &str) -> bool {
        let below = path.strip_prefix(crate::fake::MOUNT).unwrap_or(path);
        self.wrong_content_type_paths
            .iter()
            .any(|prefix| below.starts_with(prefix.as_str()))
    }
}

/// The current fault set and when it was set (flap phases count from then).
#[derive(Debug, Clone)]
pub(crate) struct FaultState {
    pub(crate) faults: Faults,
    pub(crate) since: Instant,
}

/// Shared handle to the fault set of one demo catalog.
#[derive(Debug, Clone)]
pub struct FaultSwitch {
    state: Arc<Mutex<FaultState>>,
    changed: watch::Sender<u64>,
}

impl Default for FaultSwitch {
    fn default() -> Self {
        FaultSwitch::new()
    }
}

impl FaultSwitch {
    /// A healthy switch.
    pub fn new() -> Self {
        FaultSwitch {
            state: Arc::new(Mutex::new(FaultState {
                faults: Faults::default(),
                since: Instant::now(),
            })),
            changed: watch::channel(0).0,
        }
    }

    /// Replaces the whole fault set.
    pub fn set(&self, faults: Faults) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.faults = faults;
            s.since = Instant::now();
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Changes part of the fault set.
    pub fn update(&self, f: impl FnOnce(&mut Faults)) {
        let mut next = self.get();
        f(&mut next);
        self.set(next);
    }

    /// Back to healthy.
    pub fn clear(&self) {
        self.set(Faults::default());
    }

    /// The current fault set.
    pub fn get(&self) -> Faults {
        self.state().faults
    }

    pub(crate) fn state(&self) -> FaultState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many times the fault set has been replaced.
    pub(crate) fn generation(&self) -> u64 {
        *self.changed.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Whether the catalog listener should be accepting at `now`, and when that
/// may next change by itself (flap).
pub(crate) fn listener_phase(state: &FaultState, now: Instant) -> (bool, Option<Instant>) {
    if state.faults.refuse {
        return (false, None);
    }
    match state.faults.flap {
        Some(period) if period > 0 => {
            let elapsed = now.saturating_duration_since(state.since).as_millis() as u64;
            let phase = elapsed / period;
            let next = state.since + std::time::Duration::from_millis((phase + 1) * period);
            (phase % 2 == 0, Some(next))
        }
        _ => (true, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn faults_parse_from_partial_json_and_reject_unknown() {
        let f: Faults = serde_json::from_str(r#"{"latency": 50, "fail_page": 3}"#).unwrap();
        assert_eq!(f.latency, Some(50));
        assert_eq!(f.fail_page, Some(3));
        assert!(!f.refuse);
        assert!(serde_json::from_str::<Faults>(r#"{"refuse_all": true}"#).is_err());
        assert!(Faults::default().is_healthy());
        let scoped: Faults =
            serde_json::from_str(r#"{"wrong_content_type_paths": ["/locations/"]}"#).unwrap();
        assert!(!scoped.is_healthy());
        assert!(scoped.html_for("/api/catalog/locations/abc"));
        assert!(!scoped.html_for("/api/catalog/locations"));
        assert!(!scoped.html_for("/api/catalog/entities/by-name/a/b/c"));
    }

    #[test]
    fn flap_alternates_starting_up() {
        let since = Instant::now();
        let state = FaultState {
            faults: Faults {
                flap: Some(100),
                ..Faults::default()
            },
            since,
        };
        assert!(listener_phase(&state, since + Duration::from_millis(10)).0);
        assert!(!listener_phase(&state, since + Duration::from_millis(110)).0);
        assert!(listener_phase(&state, since + Duration::from_millis(210)).0);
        let refuse = FaultState {
            faults: Faults {
                refuse: true,
                ..Faults::default()
            },
            since,
        };
        assert_eq!(listener_phase(&refuse, since), (false, None));
    }
}
