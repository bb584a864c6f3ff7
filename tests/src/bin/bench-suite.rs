//! The published egress-filtering benchmark's methodology (Kinvolk, parts 1 and 2), every
//! mechanism side by side in one run: no filter, iptables (N DROP rules in FORWARD),
//! ipset `hash:net` + one iptables rule (Calico's mechanism), egress-deny (the installer's
//! load path + the plugin's attach path), and the reference tc LPM filter.
//!
//! Topology: pod ns → veth → node ns (routes; the filter sits here: tc ingress of the
//! pod's host-side veth, or FORWARD) → veth → server ns (iperf3, ping target, UDP echo).
//!
//!     cargo run --release -p egress-deny-tests --bin bench-suite -- [--quick] [--out DIR]
//!
//! Repetitions are interleaved (rep 1 of every mechanism, then rep 2, …) so slow drift
//! of a shared machine hits every mechanism alike; every repetition applies the rule set
//! afresh, so set-up time is a median too. Everything it creates (namespaces under one
//! random prefix, bpffs pins under `/sys/fs/bpf/egress-deny-bench-<prefix>-*`, child
//! processes by pid; iptables rules and ipsets live inside its node namespace) is removed
//! on exit, on error, on panic and on SIGINT/SIGTERM.
#[path = "../bench/suite_report.rs"]
mod report;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{Read, Write as _},
    net::{Ipv4Addr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
use clap::Parser;
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Hook},
    loader,
    netns::NetnsGuard,
    paths::PinLayout,
    rules::{Action, RuleMaps},
};
use egress_deny_tests::{
    Netns,
    bench::{percentile, rule_mix},
    probe::bind_in,
    random_suffix, require_root,
};

const SERVER: &str = "10.10.2.2";
const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
pub const MECHANISMS: [&str; 5] = ["none", "iptables", "ipset", "egress-deny", "reference-lpm"];
/// The installer splits map updates over two threads above this many entries
/// (installer/src/sync.rs); egress-deny's set-up here does the same.
const PARALLEL_THRESHOLD: usize = 20_000;
/// Probe interval of the set-up test (the issue asks for ≤ 1 ms).
const PROBE_INTERVAL: Duration = Duration::from_micros(500);
/// iperf3 sender on CPU 0 (the forwarding softirq, and so the filter, runs on the
/// sender's CPU: veth hands packets to the local backlog), receiver on CPU 1.
const CLIENT_CPU: &str = "0";
const SERVER_CPU: &str = "1";

#[derive(Parser)]
#[command(about = "Egress filtering benchmark: every mechanism side by side")]
struct Args {
    /// N = 10, 10k, 1M; one repetition; 2 s iperf3 runs (under 10 minutes).
    #[arg(long)]
    quick: bool,
    /// Where RESULTS.md, results.csv and the SVG plots go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rule counts (comma list); default 10,100,1k,10k,100k,1M,10M (quick: 10,10k,1M).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Mechanisms to run (comma list of none,iptables,ipset,egress-deny,reference-lpm).
    #[arg(long, value_delimiter = ',')]
    mechanisms: Option<Vec<String>>,
    /// Repetitions per (mechanism, N); medians are reported. Default 3 (quick: 1).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per iperf3 run. Default 4 (quick: 2).
    #[arg(long)]
    secs: Option<u32>,
    /// A mechanism is not tried at a size whose set-up (extrapolated linearly from the
    /// previous size) would exceed this, and an attempt is killed when it does.
    #[arg(long, default_value_t = 180)]
    setup_budget_secs: u64,
    /// Wall-clock budget: steps that would start after it are skipped (and reported).
    /// Default 57 min (quick: 9.5 min).
    #[arg(long)]
    budget_minutes: Option<f64>,
    /// Seed of the rule lists.
    #[arg(long, default_value_t = 11)]
    seed: u64,
}

// ---------------------------------------------------------------------------------
// Ownership of everything the suite creates, for the cleanup that runs on a signal.

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

fn pin_prefix(prefix: &str) -> String {
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
struct CleanupOnExit;

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
struct TimedOut(Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "killed after {:.0} s", self.0.as_secs_f64())
    }
}

impl std::error::Error for TimedOut {}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `program` in namespace `ns` (`ip netns exec` execs it, so the tracked pid is the
/// program's), feeding `stdin`, killing it when it outlives `timeout`.
fn exec_in(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<Arc<String>>,
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program])
        .args(args)
        .stdin(if stdin.is_some() {
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
            code: status.code(),
            stdout,
            stderr,
        }),
    }
}

fn exec_ok(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<Arc<String>>,
    timeout: Duration,
) -> Result<String> {
    let out = exec_in(ns, program, args, stdin, timeout)?;
    if out.code != Some(0) {
        bail!(
            "{program} {} failed ({:?}): {}",
            args.join(" "),
            out.code,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// A long-running child (the iperf3 server), killed by pid on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.0.id();
        let _ = self.0.kill();
        let _ = self.0.wait();
        untrack(pid);
    }
}

// ---------------------------------------------------------------------------------
// Topology.

struct Topology {
    pod: Netns,
    node: Netns,
    server: Netns,
}

fn topology(prefix: &str) -> Result<Topology> {
    let pod = Netns::new(&format!("{prefix}p"))?;
    let node = Netns::new(&format!("{prefix}n"))?;
    let server = Netns::new(&format!("{prefix}s"))?;
    node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    node.ip(&format!(
        "link add podveth type veth peer name eth0 netns {}",
        pod.name
    ))?;
    node.ip(&format!(
        "link add srvveth type veth peer name eth0 netns {}",
        server.name
    ))?;
    node.ip("addr add 10.10.1.1/24 dev podveth")?;
    node.ip("addr add 10.10.2.1/24 dev srvveth")?;
    node.ip("link set podveth up")?;
    node.ip("link set srvveth up")?;
    pod.ip("addr add 10.10.1.2/24 dev eth0")?;
    pod.ip("link set eth0 up")?;
    pod.ip("route add default via 10.10.1.1")?;
    server.ip(&format!("addr add {SERVER}/24 dev eth0"))?;
    server.ip("link set eth0 up")?;
    server.ip("route add default via 10.10.2.1")?;
    Ok(Topology { pod, node, server })
}

// ---------------------------------------------------------------------------------
// Mechanisms.

/// The rule list in each mechanism's input format, prepared before any timer starts
/// (generating text is not what is being measured).
struct Prepared {
    rules: Vec<(u32, u8)>,
    iptables: Arc<String>,
    ipset: Arc<String>,
}

fn cidr(addr: u32, len: u8) -> String {
    format!("{}/{len}", Ipv4Addr::from(addr))
}

impl Prepared {
    fn new(rules: Vec<(u32, u8)>, mechanisms: &[&str]) -> Self {
        let mut iptables = String::new();
        if mechanisms.contains(&"iptables") {
            iptables.reserve(rules.len() * 40 + 64);
            iptables.push_str("*filter\n:FORWARD ACCEPT [0:0]\n");
            for (a, l) in &rules {
                let _ = writeln!(iptables, "-A FORWARD -d {} -j DROP", cidr(*a, *l));
            }
            iptables.push_str("COMMIT\n");
        }
        let mut ipset = String::new();
        if mechanisms.contains(&"ipset") {
            ipset.reserve(rules.len() * 26 + 128);
            let _ = writeln!(
                ipset,
                "create bench hash:net family inet hashsize 65536 maxelem {}",
                (rules.len() * 2).max(65536)
            );
            for (a, l) in &rules {
                let _ = writeln!(ipset, "add bench {}", cidr(*a, *l));
            }
        }
        Self {
            rules,
            iptables: Arc::new(iptables),
            ipset: Arc::new(ipset),
        }
    }
}

/// One mechanism loaded with a rule list; `remove` takes it out again.
enum Filter {
    None,
    Iptables,
    Ipset,
    EgressDeny(PinLayout),
    Reference(Box<aya::Ebpf>),
}

/// Set-up phases: (name, wall time).
type Phases = Vec<(&'static str, Duration)>;

struct Applier<'a> {
    topo: &'a Topology,
    prefix: &'a str,
    pins_made: usize,
    setup_budget: Duration,
}

impl Applier<'_> {
    fn apply(&mut self, mechanism: &str, p: &Prepared) -> Result<(Filter, Phases)> {
        let node = &self.topo.node.name;
        let mut phases = Phases::new();
        let mut t = Instant::now();
        let mut lap = |name: &'static str, phases: &mut Phases| {
            phases.push((name, t.elapsed()));
            t = Instant::now();
        };
        let filter = match mechanism {
            "none" => Filter::None,
            "iptables" => {
                let result = exec_ok(
                    node,
                    "iptables-restore",
                    &["-w"],
                    Some(p.iptables.clone()),
                    self.setup_budget,
                );
                if let Err(e) = result {
                    // Restore is one transaction: nothing stays, but make sure.
                    self.remove(Filter::Iptables);
                    return Err(e);
                }
                lap("iptables-restore", &mut phases);
                Filter::Iptables
            }
            "ipset" => {
                let result = exec_ok(
                    node,
                    "ipset",
                    &["restore"],
                    Some(p.ipset.clone()),
                    self.setup_budget,
                )
                .and_then(|_| {
                    lap("ipset restore", &mut phases);
                    exec_ok(
                        node,
                        "iptables",
                        &[
                            "-w",
                            "-A",
                            "FORWARD",
                            "-m",
                            "set",
                            "--match-set",
                            "bench",
                            "dst",
                            "-j",
                            "DROP",
                        ],
                        None,
                        Duration::from_secs(60),
                    )
                });
                if let Err(e) = result {
                    self.remove(Filter::Ipset);
                    return Err(e);
                }
                lap("iptables rule", &mut phases);
                Filter::Ipset
            }
            "egress-deny" => {
                // The installer's load path: program and maps loaded and pinned, then
                // the rules written into the pinned maps (two threads above the
                // installer's threshold), then the plugin's ADD: TCX on tc ingress of
                // the pod's host-side veth.
                self.pins_made += 1;
                let layout = PinLayout::new(format!(
                    "/sys/fs/bpf/{}{}",
                    pin_prefix(self.prefix),
                    self.pins_made
                ));
                let filter = Filter::EgressDeny(layout.clone());
                let result = (|| -> Result<()> {
                    loader::load_and_pin(&layout).context("load_and_pin")?;
                    egress_deny_datapath::events::mark_rules_loaded(&layout)?;
                    lap("load_and_pin", &mut phases);
                    insert_egress_deny(&layout, &p.rules)?;
                    lap("rule inserts", &mut phases);
                    let _guard = NetnsGuard::enter(&self.topo.node.path())?;
                    let link_pin = layout.pod_link("bench", "eth0");
                    attach::attach(
                        &layout,
                        &AttachRequest {
                            ifname: "podveth",
                            hook: Hook::Ingress,
                            link_pin: &link_pin,
                            mode: AttachMode::Tcx,
                        },
                    )?;
                    lap("attach (TCX)", &mut phases);
                    Ok(())
                })();
                if let Err(e) = result {
                    self.remove(filter);
                    return Err(e);
                }
                filter
            }
            "reference-lpm" => {
                let mut ebpf =
                    aya::EbpfLoader::new().load(egress_deny_datapath::REFERENCE_LPM_OBJECT)?;
                {
                    let prog: &mut SchedClassifier = ebpf
                        .program_mut("reference_lpm")
                        .context("program")?
                        .try_into()?;
                    prog.load()?;
                }
                lap("load", &mut phases);
                {
                    let mut trie: aya::maps::lpm_trie::LpmTrie<_, [u8; 4], u32> =
                        aya::maps::lpm_trie::LpmTrie::try_from(
                            ebpf.map_mut("ref_v4").context("ref_v4")?,
                        )?;
                    for (a, l) in &p.rules {
                        trie.insert(
                            &aya::maps::lpm_trie::Key::new(u32::from(*l), a.to_be_bytes()),
                            1,
                            0,
                        )?;
                    }
                }
                lap("rule inserts", &mut phases);
                let prog: &mut SchedClassifier = ebpf
                    .program_mut("reference_lpm")
                    .context("program")?
                    .try_into()?;
                let _guard = NetnsGuard::enter(&self.topo.node.path())?;
                prog.attach_with_options(
                    "podveth",
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )?;
                lap("attach (TCX)", &mut phases);
                Filter::Reference(Box::new(ebpf))
            }
            other => bail!("unknown mechanism {other}"),
        };
        Ok((filter, phases))
    }

    fn remove(&self, filter: Filter) {
        let node = &self.topo.node.name;
        let long = Duration::from_secs(600);
        match filter {
            Filter::Iptables => {
                let _ = exec_in(node, "iptables", &["-w", "-F", "FORWARD"], None, long);
            }
            Filter::Ipset => {
                let _ = exec_in(node, "iptables", &["-w", "-F", "FORWARD"], None, long);
                let _ = exec_in(node, "ipset", &["destroy", "bench"], None, long);
            }
            // Removing the pins drops the link (detach) and the last map references.
            Filter::EgressDeny(layout) => {
                let _ = loader::unpin_all(&layout);
            }
            Filter::Reference(ebpf) => drop(ebpf), // aya detaches its links on drop
            Filter::None => {}
        }
    }
}

fn insert_egress_deny(layout: &PinLayout, rules: &[(u32, u8)]) -> Result<()> {
    let insert = |maps: &mut RuleMaps, part: &[(u32, u8)]| -> Result<()> {
        for (a, l) in part {
            maps.insert_v4(a.to_be_bytes(), *l, Action::Deny)?;
        }
        Ok(())
    };
    let mut maps = RuleMaps::open(layout)?;
    if rules.len() < PARALLEL_THRESHOLD {
        return insert(&mut maps, rules);
    }
    let (first, second) = rules.split_at(rules.len() / 2);
    let mut other = RuleMaps::open(layout)?;
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| insert(&mut other, second));
        let mine = insert(&mut maps, first);
        let theirs = helper
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("insert thread panicked")));
        mine.and(theirs)
    })
}

// ---------------------------------------------------------------------------------
// Set-up time: from applying the rule set until a destination inside it is dropped.

/// A UDP probe every `PROBE_INTERVAL` from the pod to `target` (inside the rule list,
/// routed to the server); the drop began when the first probe that never arrived was
/// sent.
struct Prober {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Instant>>>,
    /// 1 + the highest sequence number received (0: none yet).
    received: Arc<AtomicU64>,
    last_arrival: Arc<Mutex<Option<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(topo: &Topology, target: Ipv4Addr) -> Result<Self> {
        let receiver = bind_in(&topo.server, &format!("{target}:0"))?;
        receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
        let port = receiver.local_addr()?.port();
        let sender = bind_in(&topo.pod, "0.0.0.0:0")?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let received = Arc::new(AtomicU64::new(0));
        let last_arrival = Arc::new(Mutex::new(None));
        let send_thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sent.lock().unwrap().push(Instant::now());
                    let _ = sender.send_to(&seq.to_be_bytes(), (target, port));
                    seq += 1;
                    next += PROBE_INTERVAL;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            })
        };
        let recv_thread = {
            let (stop, received, last_arrival) =
                (stop.clone(), received.clone(), last_arrival.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(8) = receiver.recv(&mut buf) {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                        received.fetch_max(seq + 1, Ordering::Relaxed);
                        *last_arrival.lock().unwrap() = Some(Instant::now());
                    }
                }
            })
        };
        Ok(Self {
            stop,
            sent,
            received,
            last_arrival,
            threads: vec![send_thread, recv_thread],
        })
    }

    fn last_arrival(&self) -> Option<Instant> {
        *self.last_arrival.lock().unwrap()
    }

    /// When the first probe that was dropped (never arrived) was sent.
    fn first_dropped_sent_at(&self) -> Option<Instant> {
        let first_lost = self.received.load(Ordering::Relaxed) as usize;
        self.sent.lock().unwrap().get(first_lost).copied()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Applied {
    filter: Filter,
    phases: Phases,
    /// Wall time of applying (all phases).
    apply: Duration,
    /// Applying started → the test destination dropped. None: it never was.
    effective: Option<Duration>,
}

fn apply_timed(applier: &mut Applier<'_>, mechanism: &str, p: &Prepared) -> Result<Applied> {
    let topo = applier.topo;
    // A /32 from the list, deep in it (iptables evaluates in list order).
    let target = p
        .rules
        .iter()
        .rev()
        .find(|(_, l)| *l == 32)
        .map(|(a, _)| Ipv4Addr::from(*a))
        .context("a /32 in the rule list")?;
    topo.server.ip(&format!("addr add {target}/32 dev lo"))?;
    topo.node
        .ip(&format!("route add {target}/32 via {SERVER}"))?;
    let result = (|| -> Result<Applied> {
        let prober = Prober::start(topo, target)?;
        let waiting = Instant::now();
        while prober.last_arrival().is_none() {
            if waiting.elapsed() > Duration::from_secs(3) {
                bail!("set-up probes to {target} do not arrive before any filter");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        let (filter, phases) = applier.apply(mechanism, p)?;
        let apply = started.elapsed();
        // Dropped once no probe arrived for 250 ms (a few hundred probe intervals).
        let deadline = Instant::now() + Duration::from_secs(20);
        let effective = loop {
            let quiet = prober
                .last_arrival()
                .is_none_or(|t| t.elapsed() > Duration::from_millis(250));
            if quiet {
                break prober
                    .first_dropped_sent_at()
                    .map(|t| t.saturating_duration_since(started));
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(Applied {
            filter,
            phases,
            apply,
            effective,
        })
    })();
    let _ = topo.node.ip(&format!("route del {target}/32"));
    let _ = topo.server.ip(&format!("addr del {target}/32 dev lo"));
    result
}

// ---------------------------------------------------------------------------------
// Traffic metrics (destination outside the rule list).

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub udp_mbps: f64,
    pub udp_loss_pct: f64,
    pub pps: f64,
    pub cpu_pct: f64,
    pub cpu_rate_mbps: f64,
    pub ping_avg_ms: f64,
    pub ping_p99_ms: f64,
    pub ping_loss_pct: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    pub rr_count: f64,
}

impl Default for Sample {
    fn default() -> Self {
        Self {
            udp_mbps: f64::NAN,
            udp_loss_pct: f64::NAN,
            pps: f64::NAN,
            cpu_pct: f64::NAN,
            cpu_rate_mbps: f64::NAN,
            ping_avg_ms: f64::NAN,
            ping_p99_ms: f64::NAN,
            ping_loss_pct: f64::NAN,
            rr_p50_us: f64::NAN,
            rr_p99_us: f64::NAN,
            rr_count: f64::NAN,
        }
    }
}

fn iperf(topo: &Topology, args: &[&str], secs: u32) -> Result<serde_json::Value> {
    let t = secs.to_string();
    let mut full = vec!["-c", SERVER, "-J", "-A", CLIENT_CPU, "-t", &t];
    full.extend_from_slice(args);
    // With a slow filter the backlog drains for a while after the test: allow for it.
    let out = exec_in(
        &topo.pod.name,
        "iperf3",
        &full,
        None,
        Duration::from_secs(u64::from(secs) + 90),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", out.stderr.trim()))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 {args:?}: {e}");
    }
    Ok(v)
}

/// (received datagrams per second, loss %) of a UDP iperf3 run, as the server saw them.
fn udp_received(v: &serde_json::Value) -> Result<(f64, f64)> {
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().context("packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().context("seconds")?.max(1e-3);
    Ok((
        (packets - lost).max(0.0) / seconds,
        100.0 * lost / packets.max(1.0),
    ))
}

fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total, idle)
}

/// Busy fraction of the whole machine over `window`.
fn busy_over(window: Duration) -> f64 {
    let (t0, i0) = cpu_ticks();
    std::thread::sleep(window);
    let (t1, i1) = cpu_ticks();
    1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64
}

/// Waits until the path is idle again (a slow filter's backlog drained): one ping gets
/// its answer only after every packet queued before it.
fn drain(topo: &Topology) {
    let _ = exec_in(
        &topo.pod.name,
        "ping",
        &["-n", "-q", "-c", "1", "-W", "60", SERVER],
        None,
        Duration::from_secs(70),
    );
}

struct Measurer<'a> {
    topo: &'a Topology,
    secs: u32,
    notes: &'a mut BTreeSet<String>,
}

impl Measurer<'_> {
    fn note_err<T>(&mut self, what: &str, label: &str, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("  {label}: {what} failed: {e:#}");
                self.notes.insert(format!("{label}: {what} failed: {e:#}"));
                None
            }
        }
    }

    fn measure(&mut self, label: &str) -> Sample {
        let (topo, secs) = (self.topo, self.secs);
        let mut s = Sample::default();
        drain(topo);
        let r = iperf(topo, &["-u", "-b", "0", "-l", "1470"], secs).and_then(|v| udp_received(&v));
        if let Some((pps, loss)) = self.note_err("UDP throughput", label, r) {
            s.udp_mbps = pps * 1470.0 * 8.0 / 1e6;
            s.udp_loss_pct = loss;
        }
        drain(topo);
        let r = iperf(topo, &["-u", "-b", "0", "-l", "64"], secs).and_then(|v| udp_received(&v));
        if let Some((pps, _)) = self.note_err("64-byte packets/s", label, r) {
            s.pps = pps;
        }
        drain(topo);
        // CPU of the whole machine while 1 Gbit/s flows, sampled inside the run (not its
        // start-up and tear-down).
        let sampler = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            busy_over(Duration::from_secs_f64(f64::from(secs) - 0.7))
        });
        let r = iperf(topo, &["-u", "-b", "1G", "-l", "1470"], secs).and_then(|v| udp_received(&v));
        let busy = sampler.join().unwrap_or(f64::NAN);
        if let Some((pps, _)) = self.note_err("CPU at 1 Gbit/s", label, r) {
            s.cpu_pct = 100.0 * busy;
            s.cpu_rate_mbps = pps * 1470.0 * 8.0 / 1e6;
        }
        drain(topo);
        let r = ping(topo);
        if let Some((avg, p99, loss)) = self.note_err("ping", label, r) {
            s.ping_avg_ms = avg;
            s.ping_p99_ms = p99;
            s.ping_loss_pct = loss;
        }
        drain(topo);
        let r = request_response(topo, 2000, Duration::from_secs(5));
        if let Some((p50, p99, n)) = self.note_err("UDP request/response", label, r) {
            s.rr_p50_us = p50;
            s.rr_p99_us = p99;
            s.rr_count = n as f64;
        }
        s
    }
}

/// `ping -i 0.001 -c 1000`: (average ms, p99 ms from the per-packet times, loss %).
fn ping(topo: &Topology) -> Result<(f64, f64, f64)> {
    let out = exec_in(
        &topo.pod.name,
        "ping",
        &[
            "-n", "-i", "0.001", "-c", "1000", "-W", "2", "-w", "25", SERVER,
        ],
        None,
        Duration::from_secs(40),
    )?;
    let mut times: Vec<f64> = out
        .stdout
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    if times.is_empty() {
        bail!("no ping replies: {}", out.stderr.trim());
    }
    times.sort_by(f64::total_cmp);
    let avg = times.iter().sum::<f64>() / times.len() as f64;
    let loss = 100.0 * (1000usize.saturating_sub(times.len())) as f64 / 1000.0;
    Ok((avg, percentile(&times, 0.99), loss))
}

/// UDP request/response round trips from the pod to an echo responder in the server
/// namespace, one at a time: up to `count` of them or `max` time. (p50 µs, p99 µs, n).
fn request_response(topo: &Topology, count: usize, max: Duration) -> Result<(f64, f64, usize)> {
    let server = bind_in(&topo.server, &format!("{SERVER}:0"))?;
    server.set_read_timeout(Some(Duration::from_millis(20)))?;
    let port = server.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        })
    };
    let result = (|| -> Result<Vec<f64>> {
        let client: UdpSocket = bind_in(&topo.pod, "0.0.0.0:0")?;
        client.connect((SERVER, port))?;
        client.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut rtts = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        let mut payload = [0u8; 32];
        let began = Instant::now();
        for i in 0..count as u64 {
            if began.elapsed() > max {
                break;
            }
            payload[..8].copy_from_slice(&i.to_be_bytes());
            let started = Instant::now();
            client.send(&payload)?;
            // Skip stale answers (of requests that timed out before).
            while let Ok(n) = client.recv(&mut buf) {
                if n >= 8 && buf[..8] == i.to_be_bytes() {
                    rtts.push(started.elapsed().as_secs_f64() * 1e6);
                    break;
                }
            }
        }
        Ok(rtts)
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    let mut rtts = result?;
    if rtts.is_empty() {
        bail!("no answers");
    }
    rtts.sort_by(f64::total_cmp);
    Ok((percentile(&rtts, 0.5), percentile(&rtts, 0.99), rtts.len()))
}

// ---------------------------------------------------------------------------------
// The run.

/// One repetition of one (mechanism, N).
#[derive(Clone, Debug)]
pub struct Run {
    pub rep: usize,
    pub sample: Sample,
    pub phases: Phases,
    pub apply: Option<Duration>,
    pub effective: Option<Duration>,
    pub teardown: Duration,
}

pub type Results = BTreeMap<(usize, usize), Vec<Run>>; // (mechanism index, N)

pub struct Suite {
    pub quick: bool,
    pub sizes: Vec<usize>,
    pub mechanisms: Vec<&'static str>,
    pub reps: usize,
    pub secs: u32,
    pub seed: u64,
    pub setup_budget: Duration,
    pub results: Results,
    pub notes: BTreeSet<String>,
    /// Why a mechanism stopped, and at which N.
    pub stopped: BTreeMap<&'static str, (usize, String)>,
    pub took: Duration,
    pub background_before: f64,
    pub background_after: f64,
    pub command: String,
}

fn covers(rules: &[(u32, u8)], addr: Ipv4Addr) -> bool {
    let a = u32::from(addr);
    rules.iter().any(|(net, len)| {
        let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
        a & mask == *net
    })
}

fn main() -> Result<()> {
    require_root();
    let args = Args::parse();
    let quick = args.quick;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results"));
    let sizes = args.sizes.clone().unwrap_or_else(|| {
        if quick {
            vec![10, 10_000, 1_000_000]
        } else {
            vec![10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000]
        }
    });
    let mechanisms: Vec<&'static str> = match &args.mechanisms {
        None => MECHANISMS.to_vec(),
        Some(list) => {
            let mut picked = Vec::new();
            for m in list {
                match MECHANISMS.iter().find(|k| **k == m.as_str()) {
                    Some(k) => picked.push(*k),
                    None => bail!("unknown mechanism {m} (known: {})", MECHANISMS.join(",")),
                }
            }
            // Table order, whatever the command line order.
            MECHANISMS
                .iter()
                .copied()
                .filter(|m| picked.contains(m))
                .collect()
        }
    };
    let reps = args.reps.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let secs = args.secs.unwrap_or(if quick { 2 } else { 4 }).max(1);
    let budget = Duration::from_secs_f64(
        60.0 * args
            .budget_minutes
            .unwrap_or(if quick { 9.5 } else { 57.0 }),
    );
    let setup_budget = Duration::from_secs(args.setup_budget_secs);
    for tool in ["iperf3", "ping", "iptables", "iptables-restore", "ipset"] {
        which(tool)?;
    }

    let prefix = format!("bs{}", &random_suffix()[..4]);
    owned().prefix = prefix.clone();
    install_signal_cleanup()?;
    let _cleanup = CleanupOnExit;
    println!(
        "bench-suite: namespaces {prefix}*, pins /sys/fs/bpf/{}*; sizes {sizes:?}, {reps} rep(s), {secs} s per iperf3 run",
        pin_prefix(&prefix)
    );
    let background_before = busy_over(Duration::from_secs(2));

    let topo = topology(&prefix)?;
    let _iperf_server = {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &topo.server.name,
            "iperf3",
            "-s",
            "-A",
            SERVER_CPU,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        Daemon(spawn_tracked(&mut cmd)?)
    };
    // The server answers once its socket listens.
    let ready = Instant::now();
    while exec_in(
        &topo.server.name,
        "sh",
        &["-c", "ss -ltn | grep -q ':5201 '"],
        None,
        Duration::from_secs(5),
    )?
    .code
        != Some(0)
    {
        if ready.elapsed() > Duration::from_secs(5) {
            bail!("iperf3 server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut suite = Suite {
        quick,
        sizes: sizes.clone(),
        mechanisms: mechanisms.clone(),
        reps,
        secs,
        seed: args.seed,
        setup_budget,
        results: Results::new(),
        notes: BTreeSet::new(),
        stopped: BTreeMap::new(),
        took: Duration::ZERO,
        background_before,
        background_after: f64::NAN,
        command: format!(
            "cargo run --release -p egress-deny-tests --bin bench-suite --{}",
            std::env::args()
                .skip(1)
                .map(|a| format!(" {a}"))
                .collect::<String>()
        ),
    };
    let mut applier = Applier {
        topo: &topo,
        prefix: &prefix,
        pins_made: 0,
        setup_budget,
    };
    let suite_started = Instant::now();
    // Last successful apply time per mechanism, for extrapolating the next size.
    let mut last_apply: BTreeMap<&str, (usize, Duration)> = BTreeMap::new();
    let mut out_of_time = false;
    for &n in &sizes {
        let generated = Instant::now();
        let rules = rule_mix(n.max(1), args.seed);
        if covers(&rules, SERVER_ADDR) {
            bail!("the traffic destination {SERVER} is inside the rule list");
        }
        let prepared = Prepared::new(rules, &mechanisms);
        println!(
            "N={n}: {} rules generated and formatted in {:.1} s",
            prepared.rules.len(),
            generated.elapsed().as_secs_f64()
        );
        for rep in 0..reps {
            for (mi, &mechanism) in mechanisms.iter().enumerate() {
                if suite.stopped.contains_key(mechanism) {
                    continue;
                }
                if suite_started.elapsed() > budget {
                    out_of_time = true;
                    break;
                }
                if rep == 0
                    && mechanism != "none"
                    && let Some(&(prev_n, prev)) = last_apply.get(mechanism)
                {
                    let predicted = prev.mul_f64(n as f64 / prev_n as f64);
                    if predicted > setup_budget {
                        let why = format!(
                            "set-up of {n} rules predicted at {:.0} s (linear from {:.1} s at {prev_n}), over the {} s set-up budget",
                            predicted.as_secs_f64(),
                            prev.as_secs_f64(),
                            setup_budget.as_secs()
                        );
                        println!("{mechanism:>14} N={n:>8}: stopped: {why}");
                        suite.stopped.insert(mechanism, (n, why));
                        continue;
                    }
                }
                let label = format!("{mechanism} N={n} rep {}", rep + 1);
                let step = Instant::now();
                let applied = if mechanism == "none" {
                    Applied {
                        filter: Filter::None,
                        phases: Vec::new(),
                        apply: Duration::ZERO,
                        effective: None,
                    }
                } else {
                    match apply_timed(&mut applier, mechanism, &prepared) {
                        Ok(a) => a,
                        Err(e) => {
                            let why = if e.downcast_ref::<TimedOut>().is_some() {
                                format!(
                                    "set-up of {n} rules did not finish within the {} s set-up budget",
                                    setup_budget.as_secs()
                                )
                            } else {
                                format!("set-up of {n} rules failed: {e:#}")
                            };
                            println!("{mechanism:>14} N={n:>8}: stopped: {why}");
                            suite.stopped.insert(mechanism, (n, why));
                            continue;
                        }
                    }
                };
                if mechanism != "none" {
                    last_apply.insert(mechanism, (n, applied.apply));
                    if applied.effective.is_none() {
                        suite.notes.insert(format!(
                            "{label}: FAILED: the destination inside the list was not dropped within 20 s"
                        ));
                    }
                }
                let sample = Measurer {
                    topo: &topo,
                    secs,
                    notes: &mut suite.notes,
                }
                .measure(&label);
                let torn = Instant::now();
                applier.remove(applied.filter);
                let teardown = torn.elapsed();
                // The kernel frees big tries and rule sets in the background: let that
                // finish before the next measurement.
                if n >= 100_000 && mechanism != "none" {
                    let settle = Instant::now();
                    while busy_over(Duration::from_millis(200)) > 0.45
                        && settle.elapsed() < Duration::from_secs(5)
                    {}
                }
                println!(
                    "{mechanism:>14} N={n:>8} rep {}: {:>6.0} Mbit/s {:>8.0} pps cpu {:>5.1}% ({:.0} Mbit/s) ping {:.3}/{:.3} ms rr {:.0}/{:.0} us set-up {} (apply {:.3} s) teardown {:.2} s [{:.0} s]",
                    rep + 1,
                    sample.udp_mbps,
                    sample.pps,
                    sample.cpu_pct,
                    sample.cpu_rate_mbps,
                    sample.ping_avg_ms,
                    sample.ping_p99_ms,
                    sample.rr_p50_us,
                    sample.rr_p99_us,
                    applied
                        .effective
                        .map(|d| format!("{:.3} s", d.as_secs_f64()))
                        .unwrap_or_else(|| "-".into()),
                    applied.apply.as_secs_f64(),
                    teardown.as_secs_f64(),
                    step.elapsed().as_secs_f64()
                );
                suite.results.entry((mi, n)).or_default().push(Run {
                    rep,
                    sample,
                    phases: applied.phases,
                    apply: (mechanism != "none").then_some(applied.apply),
                    effective: applied.effective,
                    teardown,
                });
            }
            if out_of_time {
                break;
            }
        }
        if out_of_time {
            suite.notes.insert(format!(
                "The {:.0}-minute time budget ran out at N={n}: later steps were not run.",
                budget.as_secs_f64() / 60.0
            ));
            break;
        }
    }
    suite.took = suite_started.elapsed();
    suite.background_after = busy_over(Duration::from_secs(2));
    drop(_iperf_server);
    drop(topo);
    report::write(&out_dir, &suite)?;
    println!(
        "bench-suite: done in {:.1} min; wrote {}",
        suite.took.as_secs_f64() / 60.0,
        out_dir.join("RESULTS.md").display()
    );
    Ok(())
}

fn which(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{tool} not found: run tests/setup.sh");
    }
    Ok(())
}
