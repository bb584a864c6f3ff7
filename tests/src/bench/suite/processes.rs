//! Everything the suite creates, owned so that it goes away on exit, on error, on panic
//! and on SIGINT/SIGTERM: child processes (run in a namespace, tracked by pid), bpffs
//! pins and namespaces (found by the run's random prefix).
use std::{
    io::{Read, Write as _},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_deny_datapath::{loader, paths::PinLayout};

struct Owned {
    prefix: String,
    pids: Vec<u32>,
}

static OWNED: Mutex<Owned> = Mutex::new(Owned {
    prefix: String::new(),
    pids: Vec::new(),
});

fn owned() -> MutexGuard<'static, Owned> {
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The start of the names of the run's bpffs pin dirs.
pub fn pin_prefix(prefix: &str) -> String {
    format!("egress-deny-bench-{prefix}-")
}

/// Kills the suite's child processes (by pid), unpins its bpffs dirs and deletes its
/// namespaces (their veths, routes, iptables rules and ipsets go with them). Holding the
/// lock keeps the main thread from spawning anything new meanwhile.
fn cleanup_everything(owned: &mut Owned) {
    for pid in owned.pids.drain(..) {
        // SAFETY: kill(2) on a pid this process spawned and has not reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    if owned.prefix.is_empty() {
        return;
    }
    let pins = pin_prefix(&owned.prefix);
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&pins) {
                let _ = loader::unpin_all(&PinLayout::new(e.path()));
            }
        }
    }
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&owned.prefix))
    {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

/// Takes ownership of everything named with `prefix` (namespaces, pins) and of every
/// child spawned from now on; the returned guard removes it all when dropped (main
/// returns, errors or panics), a signal handler when SIGINT or SIGTERM arrives.
pub fn own_everything(prefix: &str) -> Result<CleanupOnExit> {
    owned().prefix = prefix.to_owned();
    install_signal_cleanup()?;
    Ok(CleanupOnExit)
}

fn install_signal_cleanup() -> Result<()> {
    use signal_hook::{
        consts::{SIGINT, SIGTERM},
        iterator::Signals,
    };
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            eprintln!("bench-suite: signal {signal}: cleaning up");
            let mut owned = owned();
            cleanup_everything(&mut owned);
            // Exit with the lock held: the main thread cannot create anything new.
            std::process::exit(128 + signal);
        }
    });
    Ok(())
}

/// Runs the cleanup when main returns, errors or panics.
pub struct CleanupOnExit;

impl Drop for CleanupOnExit {
    fn drop(&mut self) {
        cleanup_everything(&mut owned());
    }
}

fn spawn_tracked(cmd: &mut Command) -> Result<Child> {
    let mut owned = owned();
    let child = cmd.spawn().context("spawn")?;
    owned.pids.push(child.id());
    Ok(child)
}

fn untrack(pid: u32) {
    owned().pids.retain(|p| *p != pid);
}

/// A child that outlived its time limit (it has been killed).
#[derive(Debug)]
pub struct TimedOut(Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "killed after {:.0} s", self.0.as_secs_f64())
    }
}

impl std::error::Error for TimedOut {}

pub struct Output {
    /// The program and its arguments, for errors.
    command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Its stdout, or an error with its stderr unless the program exited 0.
    pub fn success(self) -> Result<String> {
        if self.code != Some(0) {
            bail!(
                "{} failed ({:?}): {}",
                self.command,
                self.code,
                self.stderr.trim()
            );
        }
        Ok(self.stdout)
    }
}

/// `ip netns exec` execs the program in place: the child's pid is the program's.
fn in_netns(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]).args(args);
    cmd
}

/// Runs `program` in namespace `ns` (tracked by pid), feeding `stdin`, killing it when it
/// outlives `timeout`.
pub fn exec_in(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<Arc<String>>,
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = in_netns(ns, program, args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = spawn_tracked(&mut cmd).with_context(|| format!("running {program}"))?;
    let pid = child.id();
    let writer = child.stdin.take().zip(stdin).map(|(mut pipe, input)| {
        std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        })
    });
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    untrack(pid);
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        None => Err(anyhow::Error::new(TimedOut(timeout)).context(format!("{program} {args:?}"))),
        Some(status) => Ok(Output {
            command: format!("{program} {}", args.join(" ")),
            code: status.code(),
            stdout,
            stderr,
        }),
    }
}

/// A long-running child (the iperf3 server), killed by pid on drop.
pub struct Daemon(Child);

impl Daemon {
    /// Starts `program` in namespace `ns`, its output discarded.
    pub fn start(ns: &str, program: &str, args: &[&str]) -> Result<Self> {
        let mut cmd = in_netns(ns, program, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(Self(spawn_tracked(&mut cmd)?))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.0.id();
        let _ = self.0.kill();
        let _ = self.0.wait();
        untrack(pid);
    }
}
