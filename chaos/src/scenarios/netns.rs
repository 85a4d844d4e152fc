//! Network faults made with real kernel tools: the demo catalog runs in its
//! own network namespace behind a veth pair, and `tc netem` (loss, delay) or
//! a downed link (partition) sits between it and the sidecar.
//!
//! Needs root, `ip netns` and the netem qdisc. `probe` tries all three in a
//! scratch namespace first; where the kernel refuses, the scenarios are
//! skipped with the reason, never failed. Every namespace and link made here
//! is removed by `NetNs`'s `Drop`.

use std::process::Command;

use super::{drive, Inject, Plan, RunOptions};
use crate::scenario::{Failing, HarnessError, Lab, Outcome, Tuning};

/// The kernel network scenarios.
pub const NAMES: [&str; 3] = ["netns-loss", "netns-delay", "netns-partition"];

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this machine lets us make namespaces, veth pairs and netem
/// qdiscs; `Err` says what the kernel refused.
fn probe() -> Result<(), String> {
    let name = format!("ccprobe{}", std::process::id());
    ip(&["netns", "add", &name])?;
    let result = ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]).and_then(|_| {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                "delay", "1ms",
            ])
            .output()
            .map_err(|e| format!("cannot run `tc`: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`tc qdisc add ... netem`: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    });
    let _ = ip(&["netns", "del", &name]);
    result
}

/// A namespace holding one end of a veth pair; removed on drop.
struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    ns_addr: String,
}

impl NetNs {
    fn create() -> Result<NetNs, String> {
        let id = std::process::id() % 10_000;
        let octet = 1 + (std::process::id() % 250);
        let ns = NetNs {
            name: format!("ccchaos{id}"),
            host_if: format!("cch{id}"),
            ns_if: format!("ccn{id}"),
            ns_addr: format!("10.213.{octet}.2"),
        };
        let host_addr = format!("10.213.{octet}.1/30");
        let ns_cidr = format!("{}/30", ns.ns_addr);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host_addr, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&[
            "netns", "exec", &ns.name, "ip", "addr", "add", &ns_cidr, "dev", &ns.ns_if,
        ])?;
        ip(&[
            "netns", "exec", &ns.name, "ip", "link", "set", &ns.ns_if, "up",
        ])?;
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `tc qdisc add` on both ends (each end shapes what it sends).
    fn netem(&self, spec: &[&str]) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        let mut host = own(&["tc", "qdisc", "add", "dev", &self.host_if, "root", "netem"]);
        host.extend(own(spec));
        let mut inner = own(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.ns_if,
            "root",
            "netem",
        ]);
        inner.extend(own(spec));
        let undo = vec![
            own(&["tc", "qdisc", "del", "dev", &self.host_if, "root"]),
            own(&[
                "ip",
                "netns",
                "exec",
                &self.name,
                "tc",
                "qdisc",
                "del",
                "dev",
                &self.ns_if,
                "root",
            ]),
        ];
        (vec![host, inner], undo)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs one kernel network scenario, or skips it with the reason.
pub async fn run(
    name: &str,
    opts: &RunOptions,
    tuning: &Tuning,
    extra: &[(String, String)],
) -> Result<Outcome, HarnessError> {
    if let Err(why) = probe() {
        return Ok(Outcome::skipped(
            name,
            format!("kernel network faults unavailable here ({why}); needs root, ip netns and the netem qdisc"),
        ));
    }
    let ns = NetNs::create().map_err(HarnessError::Http)?;
    let (apply, undo, plan_base) = match name {
        "netns-loss" => {
            let (a, u) = ns.netem(&["loss", "30%"]);
            // Loss slows answers (retransmits) but many still get through:
            // the breaker may or may not open.
            (a, u, Plan::new("netns-loss", Inject::KillUpstream))
        }
        "netns-delay" => {
            let (a, u) = ns.netem(&["delay", "2000ms"]);
            let plan = Plan {
                fails: Some(Failing::AtTimeout),
                ..Plan::new("netns-delay", Inject::KillUpstream)
            };
            (a, u, plan)
        }
        _ => {
            let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
            let plan = Plan {
                fails: Some(Failing::AtTimeout),
                ..Plan::new("netns-partition", Inject::KillUpstream)
            };
            (
                vec![own(&["ip", "link", "set", &ns.host_if, "down"])],
                vec![own(&["ip", "link", "set", &ns.host_if, "up"])],
                plan,
            )
        }
    };
    let plan = Plan {
        inject: Inject::Commands { apply, undo },
        ..plan_base
    };
    let at = (
        format!("{}:7007", ns.ns_addr),
        format!("{}:7017", ns.ns_addr),
        vec![
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            ns.name.clone(),
        ],
    );
    let mut lab = Lab::start_with(
        &opts.sidecar,
        tuning.entities,
        tuning.seed,
        &plan.timings,
        extra,
        Some(at),
    )
    .await?;
    let outcome = drive(&plan, &mut lab, tuning, None).await;
    drop(lab);
    drop(ns);
    outcome
}
