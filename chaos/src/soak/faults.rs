//! The soak's fault classes: one [`FaultClass`] each (start, stop), and
//! [`rotation`], the one list the soak cycles through. Adding a class is
//! one entry there.
//!
//! The classes reuse what the chaos scenarios make faults with: the demo
//! catalog's fault API, killing and restarting it, the fault proxy between
//! the sidecar and the demo catalog, the admin API, and signals to the
//! sidecar's PID (restarts are the controller's, in `soak::Soak::restart`,
//! which records the restart window and checks the mirror file).

use std::future::Future;
use std::pin::Pin;

use serde_json::{json, Value};

use super::Soak;
use crate::faultproxy::{Latency, Loss, NetFaults, ResetMidBody};
use crate::scenario::{HarnessError, Timings};

/// What a class's start or stop returns.
pub type Step<'a> = Pin<Box<dyn Future<Output = Result<(), HarnessError>> + Send + 'a>>;

/// One fault class in the rotation.
pub trait FaultClass: Send + Sync {
    /// Its name (the CSV's `fault` column, the summary).
    fn name(&self) -> &'static str;
    /// What makes it: `demo catalog`, `kill -9`, `fault-proxy`, `admin API`, `signal`.
    fn mechanism(&self) -> &'static str;
    /// Sets the fault.
    fn start<'a>(&'a self, soak: &'a mut Soak) -> Step<'a>;
    /// Clears it (nothing, for a class that is one event).
    fn stop<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        let _ = soak;
        Box::pin(async { Ok(()) })
    }
}

/// A fault of the demo catalog (`PUT /faults`, cleared with `DELETE /faults`).
struct CatalogFault {
    name: &'static str,
    faults: Value,
}

impl FaultClass for CatalogFault {
    fn name(&self) -> &'static str {
        self.name
    }
    fn mechanism(&self) -> &'static str {
        "demo catalog"
    }
    fn start<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(soak.lab.upstream.set_faults(self.faults.clone()))
    }
    fn stop<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(soak.lab.upstream.clear_faults())
    }
}

/// The demo catalog SIGKILLed, restarted on the same ports to recover (it
/// comes back with its generated catalog: the churn so far is undone,
/// which the sidecar sees as one large change).
struct KillUpstream;

impl FaultClass for KillUpstream {
    fn name(&self) -> &'static str {
        "kill-upstream"
    }
    fn mechanism(&self) -> &'static str {
        "kill -9"
    }
    fn start<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        soak.lab.upstream.kill();
        Box::pin(async { Ok(()) })
    }
    fn stop<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(soak.lab.upstream.restart())
    }
}

/// A network fault made by the fault proxy between the sidecar and the
/// demo catalog.
struct NetFault {
    name: &'static str,
    faults: NetFaults,
}

impl FaultClass for NetFault {
    fn name(&self) -> &'static str {
        self.name
    }
    fn mechanism(&self) -> &'static str {
        "fault-proxy"
    }
    fn start<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        let set = soak.lab.net.as_ref().map(|p| p.set(self.faults.clone()));
        Box::pin(async move {
            set.ok_or_else(|| HarnessError::Http("the soak runs without its fault proxy".into()))
        })
    }
    fn stop<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        if let Some(p) = soak.lab.net.as_ref() {
            p.clear();
        }
        Box::pin(async { Ok(()) })
    }
}

/// An operator forcing the breaker's mode, and back to `auto`.
struct BreakerMode {
    name: &'static str,
    mode: &'static str,
}

impl FaultClass for BreakerMode {
    fn name(&self) -> &'static str {
        self.name
    }
    fn mechanism(&self) -> &'static str {
        "admin API"
    }
    fn start<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(soak.admin_put(
            "/admin/breaker",
            json!({"mode": self.mode, "reason": "soak"}),
        ))
    }
    fn stop<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(soak.admin_put(
            "/admin/breaker",
            json!({"mode": "auto", "reason": "soak: back"}),
        ))
    }
}

/// The demo catalog refuses connections and the operator sets the stale
/// policy to `refuse` (reads of stale data must then answer 503), then
/// back to `serve` and the catalog back. The flips are recorded as a
/// policy window, their sending and acknowledgement timed.
struct StaleRefuse;

impl FaultClass for StaleRefuse {
    fn name(&self) -> &'static str {
        "stale-refuse"
    }
    fn mechanism(&self) -> &'static str {
        "demo catalog + admin API"
    }
    fn start<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(async move {
            soak.lab
                .upstream
                .set_faults(json!({"refuse": true}))
                .await?;
            soak.stale_policy(true).await
        })
    }
    fn stop<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(async move {
            let back = soak.stale_policy(false).await;
            soak.lab.upstream.clear_faults().await?;
            back
        })
    }
}

/// A churn step with deletions, then an operator's
/// `POST /admin/sync {"accept_deletions": true}` (the upstream is healthy:
/// what it accepts is what the catalog really deleted).
struct AcceptDeletions;

impl FaultClass for AcceptDeletions {
    fn name(&self) -> &'static str {
        "accept-deletions"
    }
    fn mechanism(&self) -> &'static str {
        "admin API"
    }
    fn start<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(async move {
            soak.churn_step(5).await?;
            soak.admin_post("/admin/sync", json!({"accept_deletions": true}))
                .await
        })
    }
}

/// The sidecar restarted: SIGTERM (graceful) or SIGKILL.
struct Restart {
    graceful: bool,
}

impl FaultClass for Restart {
    fn name(&self) -> &'static str {
        if self.graceful {
            "restart-sigterm"
        } else {
            "restart-sigkill"
        }
    }
    fn mechanism(&self) -> &'static str {
        "signal"
    }
    fn start<'a>(&'a self, soak: &'a mut Soak) -> Step<'a> {
        Box::pin(soak.restart(self.graceful))
    }
}

/// Every fault class, in the order the soak runs them (then again).
pub fn rotation(t: &Timings) -> Vec<Box<dyn FaultClass>> {
    let catalog = |name, faults| -> Box<dyn FaultClass> { Box::new(CatalogFault { name, faults }) };
    let net = |name, faults| -> Box<dyn FaultClass> { Box::new(NetFault { name, faults }) };
    let none = NetFaults::default();
    vec![
        catalog("refuse", json!({"refuse": true})),
        net(
            "net-latency",
            NetFaults {
                latency: Some(Latency {
                    ms: 300,
                    jitter_ms: 200,
                }),
                ..none.clone()
            },
        ),
        Box::new(BreakerMode {
            name: "breaker-open",
            mode: "open",
        }),
        catalog("black-hole", json!({"black_hole": true})),
        net(
            "net-bandwidth",
            NetFaults {
                bandwidth: Some(256 * 1024),
                ..none.clone()
            },
        ),
        Box::new(Restart { graceful: true }),
        catalog(
            "latency-2s",
            json!({"latency": t.upstream_timeout.as_millis() as u64}),
        ),
        net(
            "net-reset-mid-body",
            NetFaults {
                reset_mid_body: Some(ResetMidBody {
                    min_bytes: 1,
                    max_bytes: 64,
                }),
                ..none.clone()
            },
        ),
        Box::new(StaleRefuse),
        catalog("slow-body", t.slow_body_fault()),
        net(
            "net-half-open",
            NetFaults {
                half_open: true,
                ..none.clone()
            },
        ),
        Box::new(BreakerMode {
            name: "breaker-closed",
            mode: "closed",
        }),
        catalog("errors-50pct", json!({"error_rate": 0.5})),
        net(
            "net-loss",
            NetFaults {
                loss: Some(Loss {
                    probability: 0.2,
                    rto_ms: 200,
                }),
                ..none.clone()
            },
        ),
        Box::new(Restart { graceful: false }),
        catalog("flap-1s", json!({"flap": 1000})),
        net(
            "net-partition",
            NetFaults {
                partition: true,
                ..none.clone()
            },
        ),
        catalog("rate-limited", json!({"too_many_requests": 2})),
        Box::new(KillUpstream),
        catalog("malformed", json!({"malformed": true})),
        catalog("truncated", json!({"truncated": true})),
        Box::new(AcceptDeletions),
        catalog("wrong-content-type", json!({"wrong_content_type": true})),
        catalog("empty-catalog", json!({"empty_catalog": true})),
        catalog("fail-page", json!({"fail_page": 3})),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_names_each_class_once_and_covers_every_mechanism() {
        let r = rotation(&Timings::BASE);
        let mut names: Vec<&str> = r.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a class twice in the rotation");
        for m in [
            "demo catalog",
            "kill -9",
            "fault-proxy",
            "admin API",
            "signal",
        ] {
            assert!(r.iter().any(|c| c.mechanism() == m), "no class made by {m}");
        }
        for net in [
            "net-latency",
            "net-bandwidth",
            "net-reset-mid-body",
            "net-half-open",
            "net-loss",
            "net-partition",
        ] {
            assert!(names.contains(&net), "{net} missing");
        }
    }
}
