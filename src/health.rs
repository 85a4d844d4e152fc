//! Readiness. It never depends on the upstream: the sidecar is ready when a
//! mirror generation is loaded and the stale policy allows serving it, so
//! an upstream outage cannot take its callers dark. A pure function of the
//! generation, its age and the policy; the admin listener and `check` ask it.

use std::time::Duration;

use crate::config::StalePolicy;
use crate::generation::Generation;

/// The readiness verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    /// Whether reads can be served.
    pub ready: bool,
    /// Why, in words an on-call engineer can act on.
    pub reason: String,
}

/// Whether reads can be served: `generation` (with data `age` old) under
/// the stale `policy` and `max_stale`, fresh for `fresh_for`.
pub fn readiness(
    generation: Option<&Generation>,
    age: Duration,
    fresh_for: Duration,
    policy: StalePolicy,
    max_stale: Duration,
) -> Readiness {
    let Some(generation) = generation else {
        return Readiness {
            ready: false,
            reason: "no mirror generation loaded yet: waiting for the first sync (or seed a snapshot with `catalog-cache snapshot import`)".into(),
        };
    };
    let id = generation.meta.id;
    let age_text = humantime::format_duration(Duration::from_secs(age.as_secs()));
    if age < fresh_for {
        return Readiness {
            ready: true,
            reason: format!("mirror generation {id} loaded, {age_text} old (fresh)"),
        };
    }
    match policy {
        StalePolicy::Refuse => Readiness {
            ready: false,
            reason: format!(
                "mirror generation {id} is {age_text} old, past freshness.fresh_for, and the stale policy is 'refuse'"
            ),
        },
        StalePolicy::Serve if age > max_stale => Readiness {
            ready: false,
            reason: format!(
                "mirror generation {id} is {age_text} old, older than max_stale ({})",
                humantime::format_duration(max_stale)
            ),
        },
        StalePolicy::Serve => Readiness {
            ready: true,
            reason: format!(
                "mirror generation {id} loaded, {age_text} old (stale; served because the stale policy is 'serve')"
            ),
        },
    }
}
