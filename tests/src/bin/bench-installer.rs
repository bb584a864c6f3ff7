//! Installer benchmark: set-up time from the rules file's rename (kubelet's ..data swap)
//! to enforcement, for big sets from empty and for a one-line change; daemon RSS and
//! kernel memory per rule.
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
    Netns,
    bench::{machine, meminfo_kib, rule_mix, rules_text, write_section},
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

fn main() -> Result<()> {
    require_root();
    let max: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let mut rows = Vec::new();
    println!(
        "| rules | change | rename → enforced | daemon sync | RSS after | RSS peak | kernel slab B/rule |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for n in [1_000_000usize, 10_000_000]
        .into_iter()
        .filter(|n| *n <= max)
    {
        let ns = Netns::new("edb")?;
        let dirs = InstallerDirs::new()?;
        std::fs::write(
            dirs.conf_dir().join("10-ptp.conflist"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"}]}"#,
        )?;
        let installer = Installer::start(&dirs, Some(&ns), &["--host-interfaces=none"])?;
        installer.wait_ready()?;
        let maps = RuleTables::open(&dirs.layout())?;
        let rules = rule_mix(n, 7);
        let text = rules_text(&rules);
        // The highest address is inserted last (the plan is sorted).
        let (last, _) = *rules.last().context("rules")?;
        let slab_before = meminfo_kib("Slab").unwrap_or(0);
        let started = dirs.publish_rules_timed(&[("feed", text.as_bytes())])?;
        let took = until_denied(&maps, Ipv4Addr::from(last), started)?;
        wait_until("status", Duration::from_secs(60), || {
            daemon_duration_ms(&dirs) > 0
        })?;
        let slab =
            (meminfo_kib("Slab").unwrap_or(0).saturating_sub(slab_before) * 1024) as f64 / n as f64;
        let row = format!(
            "| {n} | empty → {n} | {:.2} s | {:.2} s | {} MiB | {} MiB | {slab:.0} |",
            took.as_secs_f64(),
            daemon_duration_ms(&dirs) as f64 / 1000.0,
            rss_kib(installer.pid(), "VmRSS") / 1024,
            rss_kib(installer.pid(), "VmHWM") / 1024,
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
            "| {n} | +1 line | {:.0} ms | {} ms | {} MiB | {} MiB | |",
            took.as_secs_f64() * 1000.0,
            daemon_duration_ms(&dirs),
            rss_kib(installer.pid(), "VmRSS") / 1024,
            rss_kib(installer.pid(), "VmHWM") / 1024,
        );
        println!("{row}");
        rows.push(row);
        installer.stop()?;
        drop(maps);
        drop(dirs);
    }
    let body = format!(
        "## Installer: set-up time and memory\n\n\
         `cargo build --release --bins && cargo run --release -p egress-deny-tests --bin bench-installer` — {}.\n\n\
         The real daemon (release build) in its own network namespace; rules of the published\n\
         benchmark's mix written as one ConfigMap key and published with kubelet's `..data`\n\
         swap. \"rename → enforced\" runs from the swap until the live map denies the last rule\n\
         the daemon applies (polled every 1 ms); \"daemon sync\" is the daemon's own parse +\n\
         diff + apply time. RSS is the daemon's resident memory after the sync and its peak\n\
         (VmHWM). Kernel slab B/rule is the kernel's slab growth while loading.\n\n\
         | rules | change | rename → enforced | daemon sync | RSS after | RSS peak | kernel slab B/rule |\n\
         |---:|---|---:|---:|---:|---:|---:|\n{}\n",
        machine(),
        rows.join("\n")
    );
    write_section(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md")),
        "installer",
        &body,
    )?;
    Ok(())
}
