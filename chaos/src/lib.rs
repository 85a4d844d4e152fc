//! catalog-chaos: the chaos runner that proves catalog-cache keeps serving
//! through upstream faults, behind `catalog-chaos run`, and holds up
//! against hostile clients, behind `catalog-chaos abuse`.
//!
//! `scenario` is the harness: it starts the demo catalog (`catalog-chaos
//! fake-catalog`, whose server is the `catalog-fake` library) and the real
//! `catalog-cache` binary as child processes, drives readers and samples
//! the sidecar's status. `scenarios` holds the faults and the invariants
//! each one must keep. The demo catalog itself lives in `catalog-fake`, so
//! the sidecar's production build never links this runner. `abuse` holds
//! the attacks of the abuse suite and the invariants each one must keep,
//! on the same harness. `faultproxy` is the userspace network fault proxy
//! the network scenarios put between the sidecar and the demo catalog
//! where the kernel cannot make a fault. `fleet` runs many sidecars at
//! once, behind `catalog-chaos fleet`: direct against tiered, full walk
//! against id-walk, outages and a restart storm, and a model of a larger
//! fleet. `soak` runs one sidecar for a long time under mixed load, churn,
//! every fault class in rotation, operator toggles and restarts, behind
//! `catalog-chaos soak`, and checks its reads and that its resources stay
//! flat.

pub mod abuse;
pub mod faultproxy;
pub mod fleet;
pub mod scenario;
pub mod scenarios;
pub mod soak;
