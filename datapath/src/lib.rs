//! Userspace side of the egress-deny datapath, shared by the plugin and the installer.

/// The compiled eBPF object (built by build.rs from `bpf/ebpf`).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-deny-ebpf"));

/// The published benchmark's plain tc LPM filter, for side-by-side benchmarks only.
#[cfg(feature = "reference")]
pub static REFERENCE_LPM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reference-lpm"));

pub mod attach;
pub mod counters;
pub mod error;
pub mod events;
pub mod hook;
pub mod iface;
pub mod lifecycle;
pub mod loader;
pub mod netlink;
pub mod netns;
pub mod order;
pub mod paths;
mod pinned;
pub mod records;
pub mod rules;
pub mod settings;
pub mod sys;
pub mod table;
pub mod veth;

pub use egress_deny_common as common;
pub use error::{Error, Result};
