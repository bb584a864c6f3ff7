//! The node's edges, with the real installer binary: a primary CNI that keeps rewriting
//! its `.conf` (issue 10, item 14).
use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_deny_tests::{
    installer::{Installer, InstallerDirs},
    require_root,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------
// Item 14: the file the runtime picks.

/// The file a runtime loads, computed independently of the installer: libcni's
/// `ConfFiles` (every non-directory entry whose Go `filepath.Ext` is `.conf`,
/// `.conflist` or `.json`, hidden ones included), sorted bytewise, first.
fn runtime_pick(dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ext = name.rfind('.').map_or("", |i| &name[i..]).to_owned();
            matches!(ext.as_str(), ".conf" | ".conflist" | ".json")
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files.into_iter().next()
}

/// The runtime's view: the picked file and its parsed content.
fn picked(dir: &Path) -> Option<(PathBuf, Value)> {
    let path = runtime_pick(dir)?;
    let doc = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    Some((path, doc))
}

fn has_us(doc: &Value) -> bool {
    doc["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["type"] == "egress-deny"))
}

/// The primary's revision counter, in a converted list or in a bare `.conf`.
fn revision(doc: &Value) -> Option<u64> {
    doc["plugins"][0]["rev"].as_u64().or(doc["rev"].as_u64())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn bridge_conf(rev: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "cniVersion": "0.4.0", "name": "k8s", "type": "bridge", "bridge": "cni0",
        "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}, "rev": rev
    }))
    .unwrap()
}

/// The primary CNI writing its `.conf` with `mode`: atomically (temp + rename, like
/// most installers) or in place (truncate + write, like `cp`).
fn primary_writes(conf: &Path, rev: u64, file_mode: u32, in_place: bool) -> Result<Instant> {
    let path = conf.join("10-bridge.conf");
    if in_place {
        // Through the handle: the installer may move the file aside at any moment.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.set_permissions(std::fs::Permissions::from_mode(file_mode))?;
        file.write_all(&bridge_conf(rev))?;
        return Ok(Instant::now());
    }
    let tmp = conf.join("10-bridge.conf.primary-tmp");
    std::fs::write(&tmp, bridge_conf(rev))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(file_mode))?;
    std::fs::rename(&tmp, &path)?;
    Ok(Instant::now())
}

/// Polls (without sleeping: the window is milliseconds) until the picked file has our
/// entry and the primary's revision `rev`; returns how long the pick lacked our entry.
fn covered_after(conf: &Path, written: Instant, rev: u64, limit: Duration) -> Result<Duration> {
    let mut uncovered_until = None;
    loop {
        let view = picked(conf);
        let ours = view.as_ref().is_some_and(|(_, d)| has_us(d));
        if ours && uncovered_until.is_none() {
            uncovered_until = Some(written.elapsed());
        }
        if ours && view.as_ref().and_then(|(_, d)| revision(d)) == Some(rev) {
            return Ok(uncovered_until.unwrap_or_default());
        }
        if !ours {
            uncovered_until = None;
        }
        if written.elapsed() > limit {
            bail!(
                "revision {rev}: the runtime's pick {:?} lacks egress-deny or this revision {:?} after the primary's write",
                view.as_ref().map(|(p, _)| p),
                limit
            );
        }
        // Polling every 50 µs: fine enough for the window, leaves the CPU to the daemon.
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn stats(samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "min {:.2} ms, median {:.2} ms, max {:.2} ms over {}",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

/// Bound asserted on the window: a regression to a debounce that every write pushes
/// back (the window then lasts until the 2 s safety tick) fails it; scheduling delays on
/// a loaded CI machine do not.
const WINDOW_BOUND: Duration = Duration::from_millis(250);

#[test]
fn a_primary_rewriting_its_conf_is_covered_within_a_bound_and_keeps_its_mode() -> Result<()> {
    require_root();
    let dirs = InstallerDirs::new()?;
    let conf = dirs.conf_dir();
    primary_writes(&conf, 0, 0o640, false)?;
    let installer = Installer::start(&dirs, None, &["--host-interfaces=none"])?;
    covered_after(&conf, Instant::now(), 0, Duration::from_secs(10))?;
    let converted = conf.join("10-bridge.conflist");
    assert_eq!(runtime_pick(&conf), Some(converted.clone()));
    assert_eq!(mode(&converted), 0o640, "the converted file keeps the mode");

    // One rewrite at a time: from the primary's write until the file the runtime picks
    // has our entry again.
    let mut windows = Vec::new();
    for rev in 1..=30 {
        let written = primary_writes(&conf, rev, 0o640, rev % 3 == 0)?;
        windows.push(covered_after(&conf, written, rev, Duration::from_secs(5))?);
        assert_eq!(mode(&converted), 0o640, "revision {rev}: mode kept");
    }
    let max = *windows.iter().max().unwrap();
    eprintln!(
        "single rewrites: the runtime's pick lacked egress-deny for {}",
        stats(&mut windows)
    );

    // A primary rewriting continuously (every 5 ms for 3 s): the longest stretch of time
    // during which the runtime's pick lacked our entry.
    let stop = Arc::new(AtomicBool::new(false));
    let last_rev = Arc::new(AtomicU64::new(0));
    let writer = {
        let (conf, stop, last_rev) = (conf.clone(), Arc::clone(&stop), Arc::clone(&last_rev));
        std::thread::spawn(move || -> Result<()> {
            let mut rev = 100;
            while !stop.load(Ordering::Relaxed) {
                primary_writes(&conf, rev, 0o640, rev % 2 == 0)?;
                last_rev.store(rev, Ordering::Relaxed);
                rev += 1;
                // Pacing the primary, not synchronising with the installer.
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };
    let started = Instant::now();
    let (mut longest, mut uncovered_since, mut samples, mut uncovered_samples) =
        (Duration::ZERO, None::<Instant>, 0u64, 0u64);
    while started.elapsed() < Duration::from_secs(3) {
        let ours = picked(&conf).is_some_and(|(_, d)| has_us(&d));
        samples += 1;
        if ours {
            if let Some(since) = uncovered_since.take() {
                longest = longest.max(since.elapsed());
            }
        } else {
            uncovered_samples += 1;
            uncovered_since.get_or_insert_with(Instant::now);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    if let Some(since) = uncovered_since {
        longest = longest.max(since.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread")?;
    let rev = last_rev.load(Ordering::Relaxed);
    eprintln!(
        "continuous rewrites (up to revision {rev}): longest stretch without egress-deny {:.2} ms; {uncovered_samples} of {samples} samples without it",
        longest.as_secs_f64() * 1000.0
    );
    // The last write is not lost, even if it landed between a read and the rename.
    covered_after(&conf, Instant::now(), rev, Duration::from_secs(5))?;
    assert_eq!(runtime_pick(&conf), Some(converted.clone()));
    assert_eq!(mode(&converted), 0o640);
    assert!(
        max < WINDOW_BOUND && longest < WINDOW_BOUND,
        "the runtime ran without egress-deny for up to {max:?} (single) / {longest:?} (continuous)"
    );
    installer.wait_ready()?;
    Ok(())
}

#[test]
fn a_foreign_conflist_of_the_same_name_is_never_overwritten() -> Result<()> {
    require_root();
    let dirs = InstallerDirs::new()?;
    let conf = dirs.conf_dir();
    let foreign_path = conf.join("10-bridge.conflist");
    let foreign = br#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp"}]}"#;
    std::fs::write(&foreign_path, foreign)?;
    std::fs::set_permissions(&foreign_path, std::fs::Permissions::from_mode(0o644))?;
    primary_writes(&conf, 0, 0o600, false)?;
    let installer = Installer::start(&dirs, None, &["--host-interfaces=none"])?;
    covered_after(&conf, Instant::now(), 0, Duration::from_secs(10))?;

    let check = |what: &str| -> Result<()> {
        let (path, doc) = picked(&conf).context("nothing picked")?;
        assert_ne!(
            path, foreign_path,
            "{what}: the foreign list became the pick"
        );
        assert_eq!(doc["plugins"][0]["type"], "bridge", "{what}");
        assert_eq!(doc["name"], "k8s", "{what}");
        assert_eq!(mode(&path), 0o600, "{what}: mode of the .conf kept");
        assert_eq!(
            std::fs::read(&foreign_path)?,
            foreign,
            "{what}: foreign list overwritten"
        );
        assert_eq!(mode(&foreign_path), 0o644, "{what}");
        Ok(())
    };
    check("after start")?;
    let mut windows = Vec::new();
    for rev in 1..=20 {
        let written = primary_writes(&conf, rev, 0o600, rev % 2 == 0)?;
        windows.push(covered_after(&conf, written, rev, Duration::from_secs(5))?);
        check(&format!("revision {rev}"))?;
    }
    eprintln!(
        "next to a foreign .conflist: the runtime's pick lacked egress-deny for {}",
        stats(&mut windows)
    );
    installer.wait_ready()?;
    Ok(())
}
