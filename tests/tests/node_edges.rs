//! The node's edges, with the real installer binary: a primary CNI that keeps rewriting
//! its `.conf` (issue 10, item 14) and hostile or unlucky HTTP clients and ports
//! (item 16).
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_deny_tests::{
    installer::{Installer, InstallerDirs},
    require_root, wait_until,
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

// ---------------------------------------------------------------------------------
// Item 16: the HTTP listener.

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// GET `path`, timing the whole exchange.
fn timed_get(port: u16, path: &str, deadline: Duration) -> Result<(u16, Duration)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), deadline)?;
    stream.set_read_timeout(Some(deadline))?;
    stream.set_write_timeout(Some(deadline))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, started.elapsed()))
}

/// Whether the server closed `stream` (EOF or reset) within `within`.
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a response (or part of one) first
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn healthz_answers_despite_stalled_and_flooding_clients() -> Result<()> {
    require_root();
    let dirs = InstallerDirs::new()?;
    let installer = Installer::start(&dirs, None, &["--host-interfaces=none"])?;
    let port = installer.port;
    let pid = installer.pid();
    let threads_before = threads_of(pid);

    // A client that pipelines /metrics requests and never reads: the responses fill
    // both socket buffers.
    let mut stalled_reader = TcpStream::connect(("127.0.0.1", port))?;
    stalled_reader.set_write_timeout(Some(Duration::from_secs(2)))?;
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(512);
    for _ in 0..40 {
        // The server may stop reading (or close) once it stalls: that is fine.
        if stalled_reader.write_all(&request).is_err() {
            break;
        }
    }
    // A client that never finishes its request.
    let mut unfinished = TcpStream::connect(("127.0.0.1", port))?;
    unfinished.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")?;
    // Many connections at once that send nothing.
    let mut idle = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
        {
            Ok(s) => idle.push(s),
            Err(_) => break, // refused or backlog full: bounded, as it should be
        }
    }
    eprintln!(
        "{} idle connections opened; daemon threads {threads_before} before, {} now",
        idle.len(),
        threads_of(pid)
    );

    let deadline = Duration::from_secs(1);
    let mut latencies = Vec::new();
    for _ in 0..10 {
        let (code, took) = timed_get(port, "/healthz", deadline)
            .context("/healthz with stalled and idle clients connected")?;
        assert_eq!(code, 200);
        latencies.push(took);
    }
    let (code, _) = timed_get(port, "/metrics", deadline)?;
    assert_eq!(code, 200);
    eprintln!(
        "/healthz with stalled and idle clients: {}",
        stats(&mut latencies)
    );
    let threads_during = threads_of(pid);
    assert!(
        threads_during <= threads_before + 8,
        "connections cost threads: {threads_before} before, {threads_during} with {} open",
        idle.len() + 2
    );

    // Timeouts: the server drops what it cannot finish rather than holding it forever.
    let limit = Duration::from_secs(20);
    assert!(
        closed_by_server(&mut unfinished, limit),
        "an unfinished request is never timed out"
    );
    assert!(
        idle.iter_mut().all(|s| closed_by_server(s, limit)),
        "idle connections are never timed out"
    );
    let _ = stalled_reader.shutdown(Shutdown::Write);
    assert!(
        closed_by_server(&mut stalled_reader, limit),
        "a client that does not read is never timed out"
    );
    let (code, took) = timed_get(port, "/healthz", deadline)?;
    assert_eq!(code, 200);
    eprintln!("/healthz afterwards: {:.2} ms", took.as_secs_f64() * 1000.0);
    Ok(())
}

/// `egress-deny-installer run` started by hand (Installer::start waits for /healthz);
/// SIGTERM and reaped on drop.
struct RawInstaller {
    child: Child,
    log: PathBuf,
}

impl RawInstaller {
    fn start(dirs: &InstallerDirs, listen: &str) -> Result<Self> {
        let log = dirs.root.path().join("installer-raw.log");
        let child = dirs
            .run_command(None, listen)
            .arg("--host-interfaces=none")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the installer")?;
        Ok(Self { child, log })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for RawInstaller {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

#[test]
fn a_taken_port_does_not_prevent_the_first_sync() -> Result<()> {
    require_root();
    let dirs = InstallerDirs::new()?;
    std::fs::write(
        dirs.conf_dir().join("10-ptp.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"}]}"#,
    )?;
    dirs.publish_rules(&[("deny.txt", b"203.0.113.0/24\n2001:db8::/32\n")])?;
    let squatter = TcpListener::bind("127.0.0.1:0")?;
    let port = squatter.local_addr()?.port();
    let mut installer = RawInstaller::start(&dirs, &format!("127.0.0.1:{port}"))?;

    let status_path = dirs.state_dir().join("status.json");
    let synced = || {
        std::fs::read(&status_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|s| {
                s["lastSync"]["ok"] == true
                    && s["lastSync"]["rules"]["v4Deny"] == 1
                    && s["lastSync"]["rules"]["v6Deny"] == 1
            })
    };
    wait_until("the first rules sync", Duration::from_secs(30), synced)
        .inspect_err(|_| eprintln!("installer log:\n{}", installer.log_text()))?;
    assert!(installer.log_text().contains("rules synced"));
    wait_until("the bind failure reported", Duration::from_secs(10), || {
        installer.log_text().contains(&format!("127.0.0.1:{port}"))
    })?;
    assert!(
        installer.running(),
        "the daemon exited:\n{}",
        installer.log_text()
    );
    eprintln!(
        "log with the port taken:\n{}",
        installer
            .log_text()
            .lines()
            .filter(|l| l.contains(&port.to_string()))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The port is freed: the daemon binds it in the background and serves.
    drop(squatter);
    let mut answered = None;
    wait_until(
        "/healthz once the port is free",
        Duration::from_secs(15),
        || {
            answered = timed_get(port, "/healthz", Duration::from_secs(1))
                .ok()
                .map(|(code, _)| code);
            answered == Some(200)
        },
    )
    .inspect_err(|_| eprintln!("installer log:\n{}", installer.log_text()))?;
    assert!(installer.running());
    Ok(())
}
