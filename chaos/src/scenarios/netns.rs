//! The network scenarios: faults between the sidecar and the demo catalog
//! below HTTP, each made by the best mechanism this machine has.
//!
//! - **kernel**: the demo catalog runs in its own network namespace behind
//!   a veth pair; a partition sets the link down, a bandwidth limit is a
//!   `tbf` qdisc on both ends.
//! - **netem**: on a kernel with the netem qdisc, latency, delay and loss
//!   are `tc qdisc add … netem` on both ends of that veth pair.
//! - **fault-proxy**: what the kernel here cannot make is made by
//!   [`crate::faultproxy`], a userspace TCP proxy on loopback between the
//!   sidecar and the demo catalog: latency with jitter, a bandwidth limit,
//!   resets mid-body, half-open connections, loss stalls, a partition.
//!
//! `probe` finds out once per run, in a scratch namespace, what the kernel
//! lets us make (it needs root and `ip`); each scenario takes the first
//! mechanism that works, in the order above, and the table says which made
//! the fault. `--net-mechanism fault-proxy` makes every fault with the
//! proxy. Every namespace and link made here is removed by `NetNs`'s
//! `Drop`.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::{drive, Inject, Plan, RunOptions};
use crate::faultproxy::{Latency, Loss, NetFaults, ResetMidBody};
use crate::scenario::{
    Failing, HarnessError, Lab, LabOptions, Outcome, Timings, Tuning, SCHEDULING_MARGIN,
};

/// The network scenarios, in run order.
pub const NAMES: [&str; 7] = [
    "net-partition",
    "net-half-open",
    "net-reset-mid-body",
    "net-latency",
    "net-delay",
    "net-bandwidth",
    "net-loss",
];

/// The network scenarios the quick run leaves out: `net-partition`,
/// `net-half-open` and `net-reset-mid-body` stay in it (a silent link at
/// connect and at read time, and a broken answer), these add slowness of
/// several kinds and take longer.
pub const FULL_ONLY: [&str; 4] = ["net-latency", "net-delay", "net-bandwidth", "net-loss"];

/// `net-latency`'s one-way delay and jitter: calls take 0.2–1 s, longer
/// than the revalidate budget and shorter than `upstream.timeout`.
const LATENCY: Latency = Latency {
    ms: 300,
    jitter_ms: 200,
};
/// `net-bandwidth`'s limit, each direction: 2 MiB/s.
const BANDWIDTH: u64 = 2 * 1024 * 1024;
/// `net-bandwidth`'s `upstream.max_in_flight`: the reads' upstream calls
/// at once, which share the link with the sync.
const BANDWIDTH_MAX_IN_FLIGHT: u64 = 2;
/// The demo catalog's entities average about 1.4 KB of JSON; with 10 % to
/// spare, the bytes one entity takes on the wire in a sync page.
const ENTITY_WIRE_BYTES: u64 = 1540;
/// The sidecar's default `mirror.page_size`, which the scenarios keep.
const PAGE_SIZE: u64 = 500;
/// `net-loss`: the chance a segment is lost, and the first
/// retransmission timeout (Linux's floor).
const LOSS: Loss = Loss {
    probability: 0.2,
    rto_ms: 200,
};

/// Which mechanism makes a network fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `ip link set … down` on the veth pair.
    LinkDown,
    /// A `tbf` qdisc on both ends of the veth pair.
    Tbf,
    /// A `netem` qdisc on both ends of the veth pair.
    Netem,
    /// The userspace fault proxy.
    FaultProxy,
}

impl Mechanism {
    /// Its name in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::LinkDown => "kernel link-down",
            Mechanism::Tbf => "kernel tbf",
            Mechanism::Netem => "netem",
            Mechanism::FaultProxy => "fault-proxy",
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run_tool("ip", args)
}

fn run_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `{tool}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{tool} {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What the kernel here lets us make; each `Err` says what was refused.
#[derive(Debug, Clone)]
struct KernelCaps {
    /// Namespaces and veth pairs (and so a link set down).
    netns: Result<(), String>,
    /// The netem qdisc.
    netem: Result<(), String>,
    /// The tbf qdisc.
    tbf: Result<(), String>,
}

/// Tries each kernel mechanism once, in a scratch namespace (so nothing
/// outside it is touched), and remembers the answer for the run.
fn caps() -> &'static KernelCaps {
    static CAPS: OnceLock<KernelCaps> = OnceLock::new();
    CAPS.get_or_init(probe)
}

fn probe() -> KernelCaps {
    let name = format!("ccprobe{}", std::process::id());
    let refused = |why: &str| KernelCaps {
        netns: Err(why.to_string()),
        netem: Err(why.to_string()),
        tbf: Err(why.to_string()),
    };
    if let Err(why) = ip(&["netns", "add", &name]) {
        return refused(&why);
    }
    let inside = |args: &[&str]| {
        let mut all = vec!["netns", "exec", &name];
        all.extend_from_slice(args);
        ip(&all)
    };
    let netns = inside(&["ip", "link", "set", "lo", "up"]).and_then(|_| {
        inside(&[
            "ip", "link", "add", "ccpa", "type", "veth", "peer", "name", "ccpb",
        ])
    });
    let qdisc = |kind: &[&str]| {
        let mut args = vec!["tc", "qdisc", "add", "dev", "lo", "root"];
        args.extend_from_slice(kind);
        let added = inside(&args);
        let _ = inside(&["tc", "qdisc", "del", "dev", "lo", "root"]);
        added
    };
    let caps = KernelCaps {
        netem: netns
            .clone()
            .and_then(|_| qdisc(&["netem", "delay", "1ms"])),
        tbf: netns.clone().and_then(|_| {
            qdisc(&[
                "tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms",
            ])
        }),
        netns,
    };
    let _ = ip(&["netns", "del", &name]);
    caps
}

/// A namespace holding one end of a veth pair; removed on drop.
///
/// Its /30 also gets a `blackhole` route on the host (metric 1000, below
/// the link's own route): should the link's route ever go, packets for the
/// namespace are dropped here instead of following the default route off
/// the machine.
struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    ns_addr: String,
    net: String,
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
            net: format!("10.213.{octet}.0/30"),
        };
        // A namespace left by an earlier run of the same PID is replaced.
        let _ = ip(&["link", "del", &ns.host_if]);
        let _ = ip(&["netns", "del", &ns.name]);
        let _ = ip(&["route", "del", "blackhole", &ns.net, "metric", "1000"]);
        ip(&["route", "add", "blackhole", &ns.net, "metric", "1000"])?;
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

    /// `tc qdisc add … root KIND…` on both ends (each end shapes what it
    /// sends), and the commands that remove them.
    fn qdisc(&self, kind: &[&str]) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        let mut host = own(&["tc", "qdisc", "add", "dev", &self.host_if, "root"]);
        host.extend(own(kind));
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
        ]);
        inner.extend(own(kind));
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

    /// The namespace's end of the link set down, and up again. The host's
    /// end stays up with its route (marked `linkdown`), so packets for the
    /// namespace still go to the veth, which drops them: silence, as in a
    /// real partition. (Downing the host's end would remove that route.)
    fn link_down(&self) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        let set = |state: &str| {
            own(&[
                "ip",
                "netns",
                "exec",
                &self.name,
                "ip",
                "link",
                "set",
                &self.ns_if,
                state,
            ])
        };
        (vec![set("down")], vec![set("up")])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
        // Last: nothing sends to the namespace's addresses any more.
        let _ = ip(&["route", "del", "blackhole", &self.net, "metric", "1000"]);
    }
}

/// The mechanism for a scenario, and why better ones were passed over.
fn choose(name: &str, proxy_only: bool) -> (Mechanism, Option<String>) {
    if proxy_only {
        return (
            Mechanism::FaultProxy,
            Some("--net-mechanism fault-proxy".into()),
        );
    }
    let kernel = |m: Mechanism| {
        let caps = caps();
        let with = match m {
            Mechanism::Tbf => &caps.tbf,
            Mechanism::Netem => &caps.netem,
            _ => &caps.netns,
        };
        match (&caps.netns, with) {
            (Ok(()), Ok(())) => (m, None),
            (Err(why), _) | (_, Err(why)) => (
                Mechanism::FaultProxy,
                Some(format!("{} unavailable here: {why}", m.as_str())),
            ),
        }
    };
    match name {
        "net-partition" => kernel(Mechanism::LinkDown),
        "net-bandwidth" => kernel(Mechanism::Tbf),
        "net-latency" | "net-delay" | "net-loss" => kernel(Mechanism::Netem),
        // A reset in the middle of an answer's body and a peer that
        // accepts then hangs need to know where answers are and to hold
        // connections: no qdisc or link state does that.
        _ => (
            Mechanism::FaultProxy,
            Some("no kernel mechanism makes this fault; the fault proxy does".into()),
        ),
    }
}

/// The fault, in the proxy's terms and, for kernel mechanisms, the qdisc.
struct Fault {
    proxy: NetFaults,
    /// `tc qdisc` arguments after `root`, for netem and tbf.
    qdisc: Vec<String>,
}

/// The plan of a network scenario (without its injection) and its fault.
fn plan_for(name: &'static str, tuning: &Tuning, mechanism: Mechanism) -> (Plan, Fault) {
    let base = Timings::BASE;
    let plan = |fails| Plan {
        fails,
        ..Plan::new(name, Inject::KillUpstream)
    };
    let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    match name {
        "net-partition" => (
            plan(Some(Failing::AtTimeout)),
            Fault {
                proxy: NetFaults {
                    partition: true,
                    ..NetFaults::default()
                },
                qdisc: Vec::new(),
            },
        ),
        "net-half-open" => (
            plan(Some(Failing::AtTimeout)),
            Fault {
                proxy: NetFaults {
                    half_open: true,
                    ..NetFaults::default()
                },
                qdisc: Vec::new(),
            },
        ),
        // Every answer the demo catalog gives has a body longer than 64
        // bytes (its smallest, a 404, has 227), so every call fails.
        "net-reset-mid-body" => (
            Plan {
                generation_unchanged: true,
                mutate: 100,
                ..plan(Some(Failing::AtOnce))
            },
            Fault {
                proxy: NetFaults {
                    reset_mid_body: Some(ResetMidBody {
                        min_bytes: 1,
                        max_bytes: 64,
                    }),
                    ..NetFaults::default()
                },
                qdisc: Vec::new(),
            },
        ),
        "net-latency" => {
            let worst = Duration::from_millis(2 * (LATENCY.ms + LATENCY.jitter_ms));
            let mut about = vec![format!(
                "latency {}ms ± {}ms each way: a call takes {}..{}ms on the wire, over the revalidate budget {}ms and under upstream.timeout {}ms",
                LATENCY.ms,
                LATENCY.jitter_ms,
                2 * (LATENCY.ms - LATENCY.jitter_ms),
                worst.as_millis(),
                base.budget.as_millis(),
                base.upstream_timeout.as_millis()
            )];
            // Through the proxy the connect is local and a call's time on
            // the wire is two one-way delays, so no call can time out. Under
            // netem the handshake and TCP's congestion window add round
            // trips, so the breaker is reported, not judged.
            let stays_closed = mechanism == Mechanism::FaultProxy;
            if stays_closed {
                about.push(format!(
                    "the breaker must stay closed: the worst call spends {}ms on the wire, which leaves {}ms of upstream.timeout {}ms for the demo catalog's answer and scheduling",
                    worst.as_millis(),
                    (base.upstream_timeout - worst).as_millis(),
                    base.upstream_timeout.as_millis()
                ));
            }
            (
                Plan {
                    hold: Duration::from_secs(6),
                    stays_closed,
                    about,
                    ..plan(None)
                },
                Fault {
                    proxy: NetFaults {
                        latency: Some(LATENCY),
                        ..NetFaults::default()
                    },
                    qdisc: own(&[
                        "netem",
                        "delay",
                        &format!("{}ms", LATENCY.ms),
                        &format!("{}ms", LATENCY.jitter_ms),
                    ]),
                },
            )
        }
        // One way takes upstream.timeout, so every call times out.
        "net-delay" => {
            let ms = base.upstream_timeout.as_millis() as u64;
            (
                plan(Some(Failing::AtTimeout)),
                Fault {
                    proxy: NetFaults {
                        latency: Some(Latency { ms, jitter_ms: 0 }),
                        ..NetFaults::default()
                    },
                    qdisc: own(&["netem", "delay", &format!("{ms}ms")]),
                },
            )
        }
        "net-bandwidth" => {
            let page = PAGE_SIZE * ENTITY_WIRE_BYTES;
            let share = BANDWIDTH / (BANDWIDTH_MAX_IN_FLIGHT + 1);
            let page_time = Duration::from_secs_f64(page as f64 / share as f64);
            let catalog = tuning.entities as u64 * ENTITY_WIRE_BYTES;
            // The readers' revalidations (one entity each, once the data
            // is older than fresh_for) share the link with the sync: at
            // most upstream.max_in_flight of them at once, so the sync gets
            // a share of 1 / (max_in_flight + 1) at least.
            let sync_time = Duration::from_secs_f64(catalog as f64 / share as f64);
            // A sync in flight when the limit comes may still take a whole
            // catalog's time (and may miss the edits); the next one starts
            // within an interval (+ jitter) and reads the whole catalog
            // over the thin link.
            let hold = base.sync_interval.mul_f64(1.0 + base.sync_jitter)
                + sync_time.mul_f64(2.0 * 1.25)
                + SCHEDULING_MARGIN;
            let about = vec![format!(
                "bandwidth {} KiB/s each way, upstream.max_in_flight {BANDWIDTH_MAX_IN_FLIGHT}: the sync's share is 1/{} of the link at least, so a page of {PAGE_SIZE} entities (~{} KB) takes {}ms at most, under upstream.timeout {}ms; held {:.1}s = sync_interval {}ms + jitter + 2 syncs (one in flight, the next) of the catalog (~{} KB) at that share × 1.25 ({:.1}s) + margin {}ms, so a sync must get through",
                BANDWIDTH / 1024,
                BANDWIDTH_MAX_IN_FLIGHT + 1,
                page / 1000,
                page_time.as_millis(),
                base.upstream_timeout.as_millis(),
                hold.as_secs_f64(),
                base.sync_interval.as_millis(),
                catalog / 1000,
                sync_time.mul_f64(2.0 * 1.25).as_secs_f64(),
                SCHEDULING_MARGIN.as_millis()
            )];
            (
                Plan {
                    hold: hold.max(Duration::from_secs(5)),
                    mutate: 100,
                    sync_during: true,
                    about,
                    env: vec![(
                        "CATALOG_CACHE_UPSTREAM_MAX_IN_FLIGHT".into(),
                        BANDWIDTH_MAX_IN_FLIGHT.to_string(),
                    )],
                    ..plan(None)
                },
                Fault {
                    proxy: NetFaults {
                        bandwidth: Some(BANDWIDTH),
                        ..NetFaults::default()
                    },
                    // tc's `bps` is bytes per second; the queue holds up to
                    // half a second of data.
                    qdisc: own(&[
                        "tbf",
                        "rate",
                        &format!("{BANDWIDTH}bps"),
                        "burst",
                        "64kb",
                        "latency",
                        "500ms",
                    ]),
                },
            )
        }
        // "net-loss"
        _ => (
            Plan {
                hold: Duration::from_secs(6),
                about: vec![format!(
                    "each segment lost with p = {}; a lost one arrives after {}ms, doubled per retry (TCP's retransmission); the breaker may or may not open",
                    LOSS.probability, LOSS.rto_ms
                )],
                ..plan(None)
            },
            Fault {
                proxy: NetFaults {
                    loss: Some(LOSS),
                    ..NetFaults::default()
                },
                qdisc: own(&[
                    "netem",
                    "loss",
                    &format!("{}%", (LOSS.probability * 100.0).round()),
                ]),
            },
        ),
    }
}

/// Runs one network scenario with the best mechanism this machine has.
pub async fn run(
    name: &str,
    opts: &RunOptions,
    tuning: &Tuning,
    extra: &[(String, String)],
) -> Result<Outcome, HarnessError> {
    let name: &'static str = NAMES
        .iter()
        .copied()
        .find(|n| *n == name)
        .ok_or_else(|| HarnessError::Http(format!("no network scenario {name}")))?;
    let (mechanism, passed_over) = choose(name, opts.proxy_only);
    let (mut plan, fault) = plan_for(name, tuning, mechanism);
    let mut options = LabOptions::new(tuning.entities, tuning.seed, plan.timings);
    // The plan's own settings first; a weakening's come after and win.
    options.extra_env = plan.env.clone();
    options.extra_env.extend(extra.iter().cloned());
    let mut ns = None;
    match mechanism {
        Mechanism::FaultProxy => {
            options.fault_proxy = true;
            plan.inject = Inject::Proxy(fault.proxy);
        }
        kernel => {
            let made = NetNs::create().map_err(HarnessError::Http)?;
            let (apply, undo) = match kernel {
                Mechanism::LinkDown => made.link_down(),
                _ => {
                    let args: Vec<&str> = fault.qdisc.iter().map(String::as_str).collect();
                    made.qdisc(&args)
                }
            };
            plan.inject = Inject::Commands {
                apply,
                undo,
                mechanism: kernel.as_str(),
            };
            options.upstream_at = Some((
                format!("{}:7007", made.ns_addr),
                format!("{}:7017", made.ns_addr),
                vec![
                    "ip".to_string(),
                    "netns".into(),
                    "exec".into(),
                    made.name.clone(),
                ],
            ));
            ns = Some(made);
        }
    }
    if let Some(why) = passed_over {
        plan.about
            .push(format!("mechanism {}: {why}", mechanism.as_str()));
    }
    let mut lab = Lab::start_opts(&opts.sidecar, options).await?;
    let outcome = drive(&plan, &mut lab, tuning, None).await;
    drop(lab);
    drop(ns);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_network_scenario_has_a_plan_and_the_quick_ones_are_named() {
        let tuning = Tuning::new(true, 1);
        for name in NAMES {
            let (plan, fault) = plan_for(name, &tuning, Mechanism::FaultProxy);
            assert_eq!(plan.name, name);
            assert!(!fault.proxy.is_clear(), "{name} sets a proxy fault");
        }
        for name in FULL_ONLY {
            assert!(NAMES.contains(&name), "{name}");
        }
    }

    #[test]
    fn the_proxy_is_forced_on_asking_and_the_hung_peer_faults_have_no_kernel_mechanism() {
        assert_eq!(choose("net-partition", true).0, Mechanism::FaultProxy);
        for name in ["net-half-open", "net-reset-mid-body"] {
            let (m, why) = choose(name, false);
            assert_eq!(m, Mechanism::FaultProxy);
            assert!(why.is_some());
        }
    }

    #[test]
    fn a_call_under_net_latency_cannot_time_out() {
        let worst = Duration::from_millis(2 * (LATENCY.ms + LATENCY.jitter_ms));
        assert!(worst < Timings::BASE.upstream_timeout);
        assert!(
            Duration::from_millis(2 * (LATENCY.ms - LATENCY.jitter_ms)) < Timings::BASE.budget
                || worst > Timings::BASE.budget
        );
    }

    #[test]
    fn a_sync_page_fits_the_timeout_at_its_share_of_the_bandwidth_limit() {
        let share = BANDWIDTH / (BANDWIDTH_MAX_IN_FLIGHT + 1);
        let page = Duration::from_secs_f64((PAGE_SIZE * ENTITY_WIRE_BYTES) as f64 / share as f64);
        assert!(
            page < Timings::BASE.upstream_timeout.mul_f64(0.6),
            "{page:?}"
        );
        // Alone on the link, a page takes longer than `short-timeout`'s 250 ms.
        let alone =
            Duration::from_secs_f64((PAGE_SIZE * ENTITY_WIRE_BYTES) as f64 / BANDWIDTH as f64);
        assert!(alone > Duration::from_millis(250), "{alone:?}");
    }
}
