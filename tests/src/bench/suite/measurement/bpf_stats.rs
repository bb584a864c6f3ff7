//! The kernel's per-program accounting (bpf_stats): kept on for the run, and read for
//! the eBPF filters' ns per packet under real traffic.
use anyhow::{Context, Result};
use aya::programs::{ProgramInfo, SchedClassifier};
use egress_deny_datapath::paths::ProgramKind;

use crate::bench::suite::mechanisms::{Filter, REFERENCE_PROGRAM};

/// Keeps the kernel's per-program run time accounting on while held. Preferably
/// `BPF_ENABLE_STATS` (a reference the kernel drops when the fd closes, even if this
/// process is killed, and that nobody else's write to the sysctl can switch off);
/// otherwise `kernel.bpf_stats_enabled` = 1, restored to its previous value on drop.
pub enum BpfStats {
    Fd(#[allow(dead_code)] std::os::fd::OwnedFd),
    Sysctl(String),
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<Self> {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Ok(Self::Fd(fd)),
            Err(e) => {
                eprintln!("bench-suite: BPF_ENABLE_STATS failed ({e}); using the sysctl");
                let was = std::fs::read_to_string(BPF_STATS_SYSCTL)
                    .context("reading bpf_stats_enabled")?;
                std::fs::write(BPF_STATS_SYSCTL, "1").context("enabling bpf_stats")?;
                Ok(Self::Sysctl(was.trim().to_owned()))
            }
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Self::Fd(_) => {
                "`BPF_ENABLE_STATS` (the same accounting as `kernel.bpf_stats_enabled`, held by an fd for the run; the sysctl itself is not touched)"
            }
            Self::Sysctl(_) => {
                "`kernel.bpf_stats_enabled` = 1 for the run, restored to its previous value afterwards"
            }
        }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Self::Sysctl(was) = self {
            let _ = std::fs::write(BPF_STATS_SYSCTL, was.as_str());
        }
    }
}

/// The attached eBPF program's cumulative (run time ns, run count) from the kernel's
/// own accounting (bpf_stats); None for the mechanisms that are not an eBPF program.
pub fn program_stats(filter: &Filter) -> Option<(u64, u64)> {
    match filter {
        // Whichever of the pinned programs is attached (veth: the Ethernet one); the
        // others do not run.
        Filter::EgressDeny(layout) => {
            let mut total = (0u64, 0u64);
            for kind in ProgramKind::ALL {
                if let Ok(info) = ProgramInfo::from_pin(layout.program(kind)) {
                    total.0 += info.run_time().as_nanos() as u64;
                    total.1 += info.run_count();
                }
            }
            Some(total)
        }
        Filter::Reference(ebpf, _) => {
            let prog: &SchedClassifier = ebpf.program(REFERENCE_PROGRAM)?.try_into().ok()?;
            let info = prog.info().ok()?;
            Some((info.run_time().as_nanos() as u64, info.run_count()))
        }
        _ => None,
    }
}
