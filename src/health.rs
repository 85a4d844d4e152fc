//! Liveness and readiness. Readiness never depends on the upstream: the
//! sidecar is ready when a mirror generation is loaded and the stale policy
//! allows serving it, so an upstream outage cannot take its callers dark.

use crate::config::StalePolicy;
use crate::sidecar::Sidecar;

/// The readiness verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    /// Whether reads can be served.
    pub ready: bool,
    /// Why, in words an on-call engineer can act on.
    pub reason: String,
}

impl Sidecar {
    /// Whether reads can be served now.
    pub fn readiness(&self) -> Readiness {
        let Some(view) = self.view() else {
            return Readiness {
                ready: false,
                reason: "no mirror generation loaded yet: waiting for the first sync (or seed a snapshot with `catalog-cache snapshot import`)".into(),
            };
        };
        let age = self.data_age().unwrap_or_default();
        let fresh_for = self.config.freshness.fresh_for.get();
        let stale = self.flags.stale();
        let age_text = humantime::format_duration(std::time::Duration::from_secs(age.as_secs()));
        if age < fresh_for {
            return Readiness {
                ready: true,
                reason: format!(
                    "mirror generation {} loaded, {} old (fresh)",
                    view.meta.id, age_text
                ),
            };
        }
        match stale.policy {
            StalePolicy::Refuse => Readiness {
                ready: false,
                reason: format!(
                    "mirror generation {} is {} old, past freshness.fresh_for, and the stale policy is 'refuse'",
                    view.meta.id, age_text
                ),
            },
            StalePolicy::Serve if age > stale.max_stale => Readiness {
                ready: false,
                reason: format!(
                    "mirror generation {} is {} old, older than max_stale ({})",
                    view.meta.id,
                    age_text,
                    humantime::format_duration(stale.max_stale)
                ),
            },
            StalePolicy::Serve => Readiness {
                ready: true,
                reason: format!(
                    "mirror generation {} loaded, {} old (stale; served because the stale policy is 'serve')",
                    view.meta.id, age_text
                ),
            },
        }
    }
}
