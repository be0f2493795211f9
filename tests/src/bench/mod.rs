//! `vessel-bench`: one command, one table. Starts its own registry, vesseld daemons
//! with private configs (one inside a network namespace it creates, for the CNI
//! rows), and measures each row in the same run as its reference (see
//! docs/benchmarks.md for what each row means).

pub mod agentcalls;
pub mod channel;
pub mod floor;
pub mod guestforks;
pub mod janitor;
pub mod listing;
pub mod machine;
pub mod memory;
pub mod peer;
pub mod peer_cri;
pub mod pods;
mod scenario;
pub mod stats;
pub mod streams;
pub mod table;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use scenario::run;

/// Command-line choices.
#[derive(Debug, Clone)]
pub struct Options {
    /// Fewer samples and a smaller image: a smoke run of a few minutes.
    pub quick: bool,
    /// Compare with containerd: the pull with `ctr`, rows 2-4 with containerd's CRI
    /// and runc (installing Debian's containerd and runc).
    pub peer: bool,
    /// Only these rows (and what they are measured against); None: all.
    pub only: Option<Vec<u32>>,
    /// Where vmlinux and initrd.img are.
    pub guest_dir: PathBuf,
}

/// How many samples and how much data each row gets.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Floor boots, and pods per RunPodSandbox row.
    pub boots: usize,
    /// Container lifecycles.
    pub containers: usize,
    /// Pods started at once, and how often.
    pub parallel: usize,
    pub parallel_rounds: usize,
    /// Row 11: pods changing state at once, and how many lifecycles each runs.
    pub churn_pods: usize,
    pub churn_cycles: usize,
    pub execs: usize,
    pub rtts: usize,
    pub stream_bytes: usize,
    pub streams: usize,
    /// The pull image: 5 gzip layers of `layer_files` files of 1 MiB.
    pub layer_files: usize,
    pub pulls: usize,
    /// Idle time before a pod's memory is read (free-page reporting settles).
    pub settle_secs: u64,
    /// Guest RAM of each pod.
    pub memory_mib: u32,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                boots: 3,
                containers: 3,
                parallel: 4,
                parallel_rounds: 1,
                churn_pods: 10,
                churn_cycles: 1,
                execs: 5,
                rtts: 50,
                stream_bytes: 16 << 20,
                streams: 2,
                layer_files: 4,
                pulls: 1,
                settle_secs: 2,
                memory_mib: 256,
            }
        } else {
            Plan {
                boots: 10,
                containers: 10,
                parallel: 10,
                parallel_rounds: 2,
                churn_pods: 10,
                churn_cycles: 3,
                execs: 20,
                rtts: 500,
                stream_bytes: 64 << 20,
                streams: 3,
                layer_files: 40,
                pulls: 3,
                settle_secs: 5,
                memory_mib: 256,
            }
        }
    }
}

/// The table as far as it got: a failed or interrupted run still shows its rows.
pub type SharedTable = Arc<Mutex<table::Table>>;
