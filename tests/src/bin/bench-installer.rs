//! Installer benchmark: set-up time from the rules file's rename (kubelet's ..data swap)
//! to enforcement, for big sets from empty and for a one-line change, under the
//! DaemonSet's memory limit; daemon RSS, cgroup peak and table memory per rule.
//!
//!     cargo build --release --bins && cargo run --release -p egress-deny-tests --bin bench-installer -- [max_rules]
use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use egress_deny_datapath::rules::{Action, RuleTables};
use egress_deny_tests::{
    MemoryCgroup, Netns,
    bench::{machine, rule_mix, rules_text, write_section},
    installer::{Installer, InstallerDirs},
    require_root, wait_until,
};

fn rss_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Polls the live maps every millisecond until `addr` is denied.
fn until_denied(maps: &RuleTables, addr: Ipv4Addr, started: Instant) -> Result<Duration> {
    loop {
        if maps.lookup(IpAddr::V4(addr))?.action == Action::Deny {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "never enforced"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn daemon_duration_ms(dirs: &InstallerDirs) -> u64 {
    std::fs::read(dirs.state_dir().join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["lastSync"]["durationMs"].as_u64())
        .unwrap_or(0)
}

/// The memory limit a 10M-rule set needs (conf/README.md, "Sizing").
const TEN_MILLION_LIMIT: u64 = 768 << 20;

/// The DaemonSet's memory limit (`resources.limits.memory` in conf/kubernetes/daemonset.yaml).
fn daemonset_memory_limit() -> Result<u64> {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conf/kubernetes/daemonset.yaml"
    ))?;
    let limits = yaml.find("limits:").context("no limits in the DaemonSet")?;
    let line = yaml[limits..]
        .lines()
        .find(|l| l.trim_start().starts_with("memory:"))
        .context("no memory limit in the DaemonSet")?;
    let value = line.split(':').nth(1).context("memory limit")?.trim();
    let (number, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let scale = match unit {
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "" => 1,
        other => anyhow::bail!("unit {other:?} of the DaemonSet's memory limit"),
    };
    Ok(number.parse::<u64>()? * scale)
}

/// Kernel memory of the tables in force, from the daemon's status.
fn table_bytes(dirs: &InstallerDirs) -> u64 {
    std::fs::read(dirs.state_dir().join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["lastSync"]["tables"]
                .as_array()
                .map(|t| t.iter().filter_map(|t| t["bytes"].as_u64()).sum())
        })
        .unwrap_or(0)
}

/// Set-up time and memory of the real daemon, 1M and 10M rules.
#[derive(clap::Parser)]
struct Args {
    /// Largest rule count measured (1M and 10M up to it).
    #[arg(default_value_t = 10_000_000)]
    max_rules: usize,
}

fn main() -> Result<()> {
    require_root();
    let Args { max_rules: max } = clap::Parser::parse();
    let daemonset_limit = daemonset_memory_limit()?;
    let mut rows = Vec::new();
    println!(
        "| rules | change | memory limit | rename → enforced | daemon sync | RSS after | RSS peak | cgroup peak | table B/rule |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for n in [1_000_000usize, 10_000_000]
        .into_iter()
        .filter(|n| *n <= max)
    {
        let ns = Netns::new("edb")?;
        let dirs = InstallerDirs::with_placeholder_primary()?;
        let installer = Installer::start(&dirs, Some(&ns), &["--host-interfaces=none"])?;
        installer.wait_ready()?;
        // The DaemonSet's limit, charged for the daemon and the tables it creates; a
        // 10M-rule set needs more to be updated (the old and the new table both exist
        // during the swap): the limit conf/README.md's sizing gives for it.
        let limit = if n > 5_000_000 {
            TEN_MILLION_LIMIT
        } else {
            daemonset_limit
        };
        let cgroup = MemoryCgroup::new(limit)?;
        cgroup.add(installer.pid())?;
        let maps = RuleTables::open(&dirs.layout())?;
        let rules = rule_mix(n, 7);
        let text = rules_text(&rules);
        // Any rule of the set: the table is swapped in whole.
        let (last, _) = *rules.last().context("rules")?;
        let status_before = std::fs::read(dirs.state_dir().join("status.json"))?;
        let started = dirs.publish_rules_timed(&[("feed", text.as_bytes())])?;
        let took = until_denied(&maps, Ipv4Addr::from(last), started)?;
        // The status of this sync, not of the empty one at start.
        wait_until("status of the load", Duration::from_secs(60), || {
            std::fs::read(dirs.state_dir().join("status.json")).is_ok_and(|s| s != status_before)
        })?;
        let per_rule = table_bytes(&dirs) as f64 / n as f64;
        let row = format!(
            "| {n} | empty → {n} | {} MiB | {:.2} s | {:.2} s | {} MiB | {} MiB | {} MiB | {per_rule:.1} |",
            limit >> 20,
            took.as_secs_f64(),
            daemon_duration_ms(&dirs) as f64 / 1000.0,
            rss_kib(installer.pid(), "VmRSS") / 1024,
            rss_kib(installer.pid(), "VmHWM") / 1024,
            cgroup.peak().unwrap_or(0) >> 20,
        );
        println!("{row}");
        rows.push(row);

        // One more line.
        let extra = Ipv4Addr::new(198, 51, 100, 99);
        let text2 = format!("{text}{extra}\n");
        let status_before = std::fs::read(dirs.state_dir().join("status.json"))?;
        let started = dirs.publish_rules_timed(&[("feed", text2.as_bytes())])?;
        let took = until_denied(&maps, extra, started)?;
        wait_until(
            "status of the one-line change",
            Duration::from_secs(60),
            || {
                std::fs::read(dirs.state_dir().join("status.json"))
                    .is_ok_and(|s| s != status_before)
            },
        )?;
        let row = format!(
            "| {n} | +1 line | {} MiB | {:.0} ms | {} ms | {} MiB | {} MiB | {} MiB | |",
            limit >> 20,
            took.as_secs_f64() * 1000.0,
            daemon_duration_ms(&dirs),
            rss_kib(installer.pid(), "VmRSS") / 1024,
            rss_kib(installer.pid(), "VmHWM") / 1024,
            cgroup.peak().unwrap_or(0) >> 20,
        );
        println!("{row}");
        rows.push(row);
        installer.stop()?;
        drop(cgroup);
        drop(maps);
        drop(dirs);
    }
    let body = format!(
        "## Installer: set-up time and memory\n\n\
         `cargo build --release --bins && cargo run --release -p egress-deny-tests --bin bench-installer` — {}.\n\n\
         The real daemon (release build) in its own network namespace and in a memory cgroup\n\
         limited to the DaemonSet's `limits.memory` ({} MiB) for 1M rules and to {} MiB for 10M\n\
         (an update of a 10M set needs the old and the new table at once: at 512 MiB it is\n\
         rejected, \"the new rule tables need 182 MiB of kernel memory, but the daemon's cgroup has\n\
         150 MiB left\", and the old set stays enforced); rules of the published\n\
         benchmark's mix written as one ConfigMap key and published with kubelet's `..data`\n\
         swap. \"rename → enforced\" runs from the swap until the live table denies a rule of\n\
         the new set (polled every 1 ms); \"daemon sync\" is the daemon's own parse +\n\
         compile + swap time. RSS is the daemon's resident memory after the sync and its peak\n\
         (VmHWM); cgroup peak is the most the cgroup was charged (daemon and tables, old and\n\
         new table both during a swap). Table B/rule is the kernel memory of the tables in\n\
         force divided by the rule count.\n\n\
         | rules | change | memory limit | rename → enforced | daemon sync | RSS after | RSS peak | cgroup peak | table B/rule |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n{}\n",
        machine(),
        daemonset_limit >> 20,
        TEN_MILLION_LIMIT >> 20,
        rows.join("\n")
    );
    write_section(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md")),
        "installer",
        &body,
    )?;
    Ok(())
}
