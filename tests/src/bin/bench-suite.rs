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
//! Repetitions are interleaved (rep 1 of every mechanism, then rep 2, …) and within one
//! repetition every test brackets each mechanism with no-filter runs (none, A, none, B,
//! none, …), so each mechanism has its own baseline seconds away and slow drift of a
//! shared machine cancels in the ratio; the report gives median ratios with their spread
//! over repetitions. Besides iperf3's one destination, an own UDP sender cycles through
//! thousands of destinations (some denied) that the server namespace owns, and the
//! kernel's per-program accounting (bpf_stats) gives the eBPF filters' ns per packet
//! under that real traffic. Every repetition applies the rule set afresh, so set-up time
//! is a median too. Everything it creates (namespaces under one
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
use aya::programs::{LinkOrder, ProgramInfo, SchedClassifier, TcAttachType, tc::TcAttachOptions};
use clap::Parser;
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Hook},
    loader,
    netns::NetnsGuard,
    paths::{PinLayout, ProgramKind},
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
/// Probe interval of the set-up test (the issue asks for ≤ 1 ms).
const PROBE_INTERVAL: Duration = Duration::from_micros(500);
/// iperf3 sender on CPU 0 (the forwarding softirq, and so the filter, runs on the
/// sender's CPU: veth hands packets to the local backlog), receiver on CPU 1.
const CLIENT_CPU: &str = "0";
const SERVER_CPU: &str = "1";
/// Repetitions of a full run (≈ 13 min each). At the quick run's spread this gives a
/// 95% confidence interval of about ±3–5% on the 1M paired ratios; ±3% on all of them
/// took 7 (`--reps 7`, see tests/BENCHMARKS.md).
const DEFAULT_REPS: usize = 5;
/// A full run's own stop: well above its expected duration (see tests/BENCHMARKS.md).
const DEFAULT_BUDGET_MINUTES: f64 = 90.0;

#[derive(Parser)]
#[command(about = "Egress filtering benchmark: every mechanism side by side")]
struct Args {
    /// N = 10k, 1M; 3 repetitions; 2 s iperf3 runs, 1 s own-sender runs (about 9 minutes).
    #[arg(long)]
    quick: bool,
    /// Where RESULTS.md, results.csv and the SVG plots go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rule counts (comma list); default 10,100,1000,10000,100000,1000000,10000000
    /// (quick: 10000,1000000).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Mechanisms to run (comma list of none,iptables,ipset,egress-deny,reference-lpm).
    #[arg(long, value_delimiter = ',')]
    mechanisms: Option<Vec<String>>,
    /// Repetitions per (mechanism, N); medians and their spread are reported.
    /// Default 5 (quick: 3).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per iperf3 run. Default 3 (quick: 2).
    #[arg(long)]
    secs: Option<u32>,
    /// Seconds per own-sender run (packets/s, one and many destinations). Default 2
    /// (quick: 1).
    #[arg(long)]
    blast_secs: Option<f64>,
    /// Destinations of the many-destination test.
    #[arg(long, default_value_t = 4096)]
    destinations: usize,
    /// Share of them inside the rule list (denied by every filter).
    #[arg(long, default_value_t = 0.1)]
    deny_share: f64,
    /// A mechanism is not tried at a size whose set-up (extrapolated linearly from the
    /// previous size) would exceed this, and an attempt is killed when it does.
    #[arg(long, default_value_t = 180)]
    setup_budget_secs: u64,
    /// A mechanism whose ICMP latency is already over 1 ms (a per-packet cost that grows
    /// with N) is not tried at a size where, extrapolated linearly, it would exceed this:
    /// every packet then costs the forwarding CPU that long, and the 1000-packet backlog
    /// an unlimited-rate test leaves behind takes minutes to drain.
    #[arg(long, default_value_t = 50.0)]
    max_packet_ms: f64,
    /// Wall-clock budget: repetitions that would start after it are skipped (and
    /// reported). Default 90 min (quick: 15 min).
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

/// The iptables mechanism's rules live in their own chain, entered by one jump from
/// FORWARD, so that the filter can be switched off and on between tests without
/// reloading it (one rule at position 1 of FORWARD; deleting a rule by its
/// specification would make iptables-nft dump the whole table: minutes at 1M rules).
const IPT_CHAIN: &str = "EDBENCH";
const IPSET_NAME: &str = "edbench";
const IPSET_RULE: [&str; 7] = ["-m", "set", "--match-set", IPSET_NAME, "dst", "-j", "DROP"];

impl Prepared {
    fn new(rules: Vec<(u32, u8)>, mechanisms: &[&str]) -> Self {
        let mut iptables = String::new();
        if mechanisms.contains(&"iptables") {
            iptables.reserve(rules.len() * 40 + 64);
            let _ = writeln!(iptables, "*filter\n:{IPT_CHAIN} - [0:0]");
            for (a, l) in &rules {
                let _ = writeln!(iptables, "-A {IPT_CHAIN} -d {} -j DROP", cidr(*a, *l));
            }
            let _ = writeln!(iptables, "-I FORWARD 1 -j {IPT_CHAIN}\nCOMMIT");
        }
        let mut ipset = String::new();
        if mechanisms.contains(&"ipset") {
            ipset.reserve(rules.len() * 26 + 128);
            let _ = writeln!(
                ipset,
                "create {IPSET_NAME} hash:net family inet hashsize 65536 maxelem {}",
                (rules.len() * 2).max(65536)
            );
            for (a, l) in &rules {
                let _ = writeln!(ipset, "add {IPSET_NAME} {}", cidr(*a, *l));
            }
        }
        Self {
            rules,
            iptables: Arc::new(iptables),
            ipset: Arc::new(ipset),
        }
    }
}

/// One mechanism loaded with a rule list. It can be switched off (its rules stay loaded)
/// and on again; `remove` unloads it.
enum Filter {
    None,
    Iptables,
    Ipset,
    EgressDeny(PinLayout),
    Reference(
        Box<aya::Ebpf>,
        Option<aya::programs::tc::SchedClassifierLinkId>,
    ),
}

/// Set-up phases: (name, wall time).
type Phases = Vec<(&'static str, Duration)>;
/// The phases whose time grows with the rule count.
const SIZE_DEPENDENT: [&str; 3] = ["iptables-restore", "ipset restore", "rule inserts"];

struct Applier<'a> {
    topo: &'a Topology,
    prefix: &'a str,
    pins_made: usize,
    setup_budget: Duration,
}

fn ed_link_pin(layout: &PinLayout) -> PathBuf {
    layout.pod_link("bench", "eth0")
}

impl Applier<'_> {
    fn iptables(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-w"];
        full.extend_from_slice(args);
        exec_ok(
            &self.topo.node.name,
            "iptables",
            &full,
            None,
            Duration::from_secs(120),
        )
        .map(drop)
    }

    fn ed_attach(&self, layout: &PinLayout) -> Result<()> {
        let _guard = NetnsGuard::enter(&self.topo.node.path())?;
        let link_pin = ed_link_pin(layout);
        attach::attach(
            layout,
            &AttachRequest {
                ifname: "podveth",
                hook: Hook::Ingress,
                link_pin: &link_pin,
                mode: AttachMode::Tcx,
                exempt: false,
            },
        )?;
        Ok(())
    }

    fn ref_attach(&self, ebpf: &mut aya::Ebpf) -> Result<aya::programs::tc::SchedClassifierLinkId> {
        let prog: &mut SchedClassifier = ebpf
            .program_mut("reference_lpm")
            .context("program")?
            .try_into()?;
        let _guard = NetnsGuard::enter(&self.topo.node.path())?;
        Ok(prog.attach_with_options(
            "podveth",
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )?)
    }

    /// Loads the rule set and switches the filter on.
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
                // One transaction: the chain with its N rules and the jump to it.
                let result = exec_ok(
                    node,
                    "iptables-restore",
                    &["-w", "--noflush"],
                    Some(p.iptables.clone()),
                    self.setup_budget,
                );
                if let Err(e) = result {
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
                    let mut rule = vec!["-I", "FORWARD", "1"];
                    rule.extend(IPSET_RULE);
                    self.iptables(&rule)
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
                // the rules compiled into a table and swapped in, then the plugin's ADD:
                // TCX on tc ingress of the pod's host-side veth.
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
                    self.ed_attach(&layout)?;
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
                let link = self.ref_attach(&mut ebpf)?;
                lap("attach (TCX)", &mut phases);
                Filter::Reference(Box::new(ebpf), Some(link))
            }
            other => bail!("unknown mechanism {other}"),
        };
        Ok((filter, phases))
    }

    /// Switches a loaded filter on or off (at most one is on at a time: the FORWARD
    /// chain then holds at most one rule, at position 1).
    fn set_enabled(&self, filter: &mut Filter, on: bool) -> Result<()> {
        match filter {
            Filter::None => Ok(()),
            Filter::Iptables if on => self.iptables(&["-I", "FORWARD", "1", "-j", IPT_CHAIN]),
            Filter::Ipset if on => {
                let mut rule = vec!["-I", "FORWARD", "1"];
                rule.extend(IPSET_RULE);
                self.iptables(&rule)
            }
            Filter::Iptables | Filter::Ipset => self.iptables(&["-D", "FORWARD", "1"]),
            Filter::EgressDeny(layout) if on => self.ed_attach(layout),
            Filter::EgressDeny(layout) => Ok(attach::detach(
                Some("podveth"),
                Hook::Ingress,
                &ed_link_pin(layout),
                AttachMode::Tcx,
            )?),
            Filter::Reference(ebpf, link) => {
                if on {
                    if link.is_none() {
                        *link = Some(self.ref_attach(ebpf)?);
                    }
                } else if let Some(id) = link.take() {
                    let prog: &mut SchedClassifier = ebpf
                        .program_mut("reference_lpm")
                        .context("program")?
                        .try_into()?;
                    prog.detach(id)?;
                }
                Ok(())
            }
        }
    }

    fn remove(&self, filter: Filter) {
        let node = &self.topo.node.name;
        let long = Duration::from_secs(600);
        match filter {
            Filter::Iptables => {
                let _ = exec_in(node, "iptables", &["-w", "-F", "FORWARD"], None, long);
                let _ = exec_in(node, "iptables", &["-w", "-F", IPT_CHAIN], None, long);
                let _ = exec_in(node, "iptables", &["-w", "-X", IPT_CHAIN], None, long);
            }
            Filter::Ipset => {
                let _ = exec_in(node, "iptables", &["-w", "-F", "FORWARD"], None, long);
                let _ = exec_in(node, "ipset", &["destroy", IPSET_NAME], None, long);
            }
            // Removing the pins drops the link (detach) and the last map references.
            Filter::EgressDeny(layout) => {
                let _ = loader::unpin_all(&layout);
            }
            Filter::Reference(ebpf, _) => drop(ebpf), // aya detaches its links on drop
            Filter::None => {}
        }
    }
}

fn insert_egress_deny(layout: &PinLayout, rules: &[(u32, u8)]) -> Result<()> {
    egress_deny_tests::bench::deny_v4(layout, rules).map(drop)
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
// Traffic metrics (destinations outside the rule list, or a known share inside it).

/// Declares [`Sample`]: every per-run number, NaN until the test that measures it ran.
/// One list of fields gives the struct, its CSV header and field-wise averaging.
macro_rules! sample {
    ($($(#[$m:meta])* $f:ident),* $(,)?) => {
        #[derive(Clone, Copy, Debug)]
        pub struct Sample { $($(#[$m])* pub $f: f64,)* }

        impl Sample {
            pub const NAMES: &[&str] = &[$(stringify!($f)),*];

            pub fn values(&self) -> Vec<f64> {
                vec![$(self.$f),*]
            }

            fn from_values(v: &[f64]) -> Self {
                let mut it = v.iter().copied();
                Self { $($f: it.next().unwrap_or(f64::NAN)),* }
            }
        }

        impl Default for Sample {
            fn default() -> Self {
                Self { $($f: f64::NAN),* }
            }
        }
    };
}

sample! {
    /// iperf3 1470-byte datagrams, unlimited rate: received Mbit/s.
    udp_mbps,
    udp_loss_pct,
    /// Own sender, 64-byte datagrams, one destination: received packets/s.
    pps,
    /// Own sender, one destination: datagrams handed to the kernel per second.
    pps_sent,
    /// Own sender, many destinations: packets/s that reached allowed destinations.
    pps_many,
    /// Own sender, many destinations: share of the packets to denied destinations that
    /// arrived anyway (1 without a filter, 0 with a working one).
    many_denied_arrived,
    /// bpf_stats of the attached program: ns per run, one destination / many.
    ns_pkt,
    ns_pkt_many,
    /// Program runs per packet sent (sanity: ≈ 1 when nothing is dropped earlier).
    runs_per_sent,
    /// CPU of the forwarding CPU's work (sender thread + ksoftirqd, schedstat ns) per
    /// packet that got through the path to a verdict, one destination / many. Time the
    /// sender spends descheduled (other people's work) is not in it, so it is far less
    /// sensitive to a shared machine's load than packets/s.
    cpu_ns_pkt_single,
    cpu_ns_pkt_many,
    /// The receiver thread's CPU per packet received, one destination / many.
    recv_ns_pkt_single,
    recv_ns_pkt_many,
    /// iperf3 at a fixed 1 Gbit/s: CPU of client + server + ksoftirqd (schedstat ns), %
    /// of one core and ns per received datagram, and the rate reached.
    cpu_pct,
    cpu_ns_pkt,
    cpu_rate_mbps,
    /// Busy share of the whole machine (all cores, /proc/stat) in the same window:
    /// context only (it includes other people's work).
    machine_busy_pct,
    ping_avg_ms,
    ping_p99_ms,
    ping_loss_pct,
    rr_p50_us,
    rr_p99_us,
    rr_count,
}

impl Sample {
    /// Field-wise mean of the finite values (NaN where none is).
    fn mean(samples: &[Sample]) -> Sample {
        let rows: Vec<Vec<f64>> = samples.iter().map(Sample::values).collect();
        let mean: Vec<f64> = (0..Sample::NAMES.len())
            .map(|i| {
                let finite: Vec<f64> = rows
                    .iter()
                    .map(|r| r[i])
                    .filter(|v| v.is_finite())
                    .collect();
                if finite.is_empty() {
                    f64::NAN
                } else {
                    finite.iter().sum::<f64>() / finite.len() as f64
                }
            })
            .collect();
        Sample::from_values(&mean)
    }

    /// Takes over every field `other` has measured.
    fn merge(&mut self, other: &Sample) {
        let mut mine = self.values();
        for (m, o) in mine.iter_mut().zip(other.values()) {
            if o.is_finite() {
                *m = o;
            }
        }
        *self = Sample::from_values(&mine);
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

/// Time a task has run on a CPU, in ns (`schedstat`'s first field: the scheduler's own
/// clock, not tick samples). This kernel has no IRQ time accounting, so softirq work
/// served in a task's context (the whole veth → forward → veth → socket path runs in the
/// sender's `sendto`) is in that task's time; ksoftirqd holds the rest.
fn schedstat_ns(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Run time of every thread of `pid`, ns.
fn process_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| schedstat_ns(&format!("{}/schedstat", t.path().display())))
        .sum()
}

/// Run time of the calling thread, ns.
fn thread_ns() -> u64 {
    schedstat_ns("/proc/thread-self/schedstat").unwrap_or(0)
}

/// Children of this process named `comm` (`ip netns exec` execs the program in place),
/// and kernel threads whose name starts with `ksoftirqd/` when `comm` is that.
fn pids_named(comm: &str, children_only: bool) -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let (Some(open), Some((head, tail))) = (stat.find('('), stat.rsplit_once(')')) else {
                return false;
            };
            let name = &head[open + 1..];
            let ppid = tail.split_whitespace().nth(1).unwrap_or("");
            name.starts_with(comm) && (!children_only || ppid == me)
        })
        .collect()
}

fn ksoftirqd_ns(pids: &[u32]) -> u64 {
    pids.iter().map(|p| process_ns(*p)).sum()
}

/// While the client runs: (CPU ns of the iperf3 client + server + ksoftirqd threads,
/// wall seconds, busy % of all cores), over `window`.
fn traffic_cpu(server_pid: u32, window: Duration) -> (f64, f64, f64) {
    let client = pids_named("iperf3", true);
    let mut pids = pids_named("ksoftirqd/", false);
    pids.push(server_pid);
    pids.extend(client.iter().filter(|p| **p != server_pid));
    let sum = |pids: &[u32]| pids.iter().map(|p| process_ns(*p)).sum::<u64>();
    let (t0, i0) = cpu_ticks();
    let p0 = sum(&pids);
    let started = Instant::now();
    std::thread::sleep(window);
    let p1 = sum(&pids);
    let (t1, i1) = cpu_ticks();
    let wall = started.elapsed().as_secs_f64();
    let process = if client.is_empty() {
        f64::NAN
    } else {
        p1.saturating_sub(p0) as f64
    };
    let machine = 100.0 * (1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64);
    (process, wall, machine)
}

/// Share of all cores spent in the kernel (system, irq, softirq) over `window`.
fn kernel_share(window: Duration) -> f64 {
    let read = || -> Vec<u64> {
        std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|f| f.parse().ok())
            .collect()
    };
    let a = read();
    std::thread::sleep(window);
    let b = read();
    if a.len() < 8 || b.len() < 8 {
        return 0.0;
    }
    let d: Vec<u64> = (0..8).map(|i| b[i].saturating_sub(a[i])).collect();
    (d[2] + d[5] + d[6]) as f64 / d.iter().sum::<u64>().max(1) as f64
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

// ---------------------------------------------------------------------------------
// Own UDP sender: iperf3 sends to one address; this one also cycles through thousands,
// so the filters' lookups walk different parts of their tries and hash tables.

/// Datagram payload (64 bytes, as `iperf3 -l 64`); byte 0 says whether the destination
/// is in the rule list, so the receiver can tell leaks from allowed traffic.
const BLAST_PAYLOAD: usize = 64;
/// Upper bound on datagrams per run, whatever the rate (the time limit comes first).
const BLAST_MAX_PACKETS: u64 = 50_000_000;

/// The traffic destinations of the many-destination mode: (address, denied by the
/// rules). All of them are owned by the server namespace (`local` routes) and routed
/// to it by the node namespace, so nothing leaves the run's namespaces.
struct Destinations {
    list: Arc<Vec<(Ipv4Addr, bool)>>,
}

/// Not in 0/8, 10/8 (the topology), 100.64/10, 127/8, 169.254/16, 172.16/12, 192.0/16,
/// 192.168/16, 198.51/16, 203.0/16, 224/3: the space `rule_mix` draws from.
fn global_unicast(a: u32) -> bool {
    let first = a >> 24;
    !(matches!(first, 0 | 10 | 127 | 224..=255)
        || (a >> 22) == (100 << 2 | 1)
        || (a >> 16) == (169 << 8 | 254)
        || (a >> 20) == (172 << 4 | 1)
        || (a >> 16) == (192 << 8 | 168)
        || (a >> 16) == (192 << 8)
        || (a >> 16) == (198 << 8 | 51)
        || (a >> 16) == (203 << 8))
}

/// Whether a sorted rule list covers `addr` (one binary search per prefix length in use:
/// 10M rules × thousands of addresses must not be a linear scan).
fn covers(rules: &[(u32, u8)], lens: &[u8], addr: u32) -> bool {
    lens.iter().any(|&len| {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        rules.binary_search(&(addr & mask, len)).is_ok()
    })
}

fn prefix_lens(rules: &[(u32, u8)]) -> Vec<u8> {
    let set: BTreeSet<u8> = rules.iter().map(|(_, l)| *l).collect();
    set.into_iter().collect()
}

impl Destinations {
    /// `count` distinct addresses, `deny_share` of them inside a random rule each (a
    /// random host of the prefix), the rest random global-unicast addresses no rule
    /// covers; shuffled, so denied and allowed packets interleave. `avoid`: addresses the
    /// run uses otherwise.
    fn new(
        rules: &[(u32, u8)],
        count: usize,
        deny_share: f64,
        seed: u64,
        avoid: &[Ipv4Addr],
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng, seq::SliceRandom};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_de57);
        let lens = prefix_lens(rules);
        let mut seen: BTreeSet<u32> = avoid.iter().map(|a| u32::from(*a)).collect();
        let mut list = Vec::with_capacity(count);
        let denied = ((count as f64 * deny_share).round() as usize).min(count);
        // Bounded: a small rule list (N = 10, mostly /32s) may hold fewer distinct
        // addresses than asked for; it then gets what it has (the rest are allowed).
        let mut attempts = 0usize;
        while list.len() < denied && !rules.is_empty() {
            attempts += 1;
            if attempts > denied * 100 {
                break;
            }
            let (net, len) = rules[rng.random_range(0..rules.len())];
            let host = if len == 32 {
                0
            } else {
                rng.random::<u32>() >> len
            };
            let a = net | host;
            if seen.insert(a) {
                list.push((Ipv4Addr::from(a), true));
            }
        }
        attempts = 0;
        while list.len() < count {
            attempts += 1;
            if attempts > count * 1000 {
                bail!("cannot find {count} allowed destinations outside the rule list");
            }
            let a: u32 = rng.random();
            if global_unicast(a) && !covers(rules, &lens, a) && seen.insert(a) {
                list.push((Ipv4Addr::from(a), false));
            }
        }
        list.shuffle(&mut rng);
        Ok(Self {
            list: Arc::new(list),
        })
    }

    /// Server namespace: a `local` route per address (it accepts them as its own); node
    /// namespace: a route to the server for each.
    fn install(&self, topo: &Topology) -> Result<()> {
        self.batch(topo, "add")
    }

    fn uninstall(&self, topo: &Topology) -> Result<()> {
        self.batch(topo, "del")
    }

    fn batch(&self, topo: &Topology, verb: &str) -> Result<()> {
        let mut server = String::new();
        let mut node = String::new();
        for (a, _) in self.list.iter() {
            let _ = writeln!(server, "route {verb} local {a}/32 dev lo");
            let _ = writeln!(node, "route {verb} {a}/32 via {SERVER}");
        }
        let t = Duration::from_secs(60);
        exec_ok(
            &topo.server.name,
            "ip",
            &["-batch", "-"],
            Some(Arc::new(server)),
            t,
        )?;
        exec_ok(
            &topo.node.name,
            "ip",
            &["-batch", "-"],
            Some(Arc::new(node)),
            t,
        )?;
        Ok(())
    }
}

struct Blast {
    sent: u64,
    /// Received inside the sending window: to allowed / to denied destinations.
    received: u64,
    received_denied: u64,
    sent_denied: u64,
    secs: f64,
    /// Sender thread + ksoftirqd threads, ns.
    forward_ns: f64,
    /// Receiver thread, ns.
    recv_ns: f64,
}

/// Sends 64-byte datagrams from the pod as fast as one thread can (pinned to the CPU
/// iperf3's client uses) to `dests` in turn, for `secs` (and at most
/// `BLAST_MAX_PACKETS`); a receiver in the server namespace (pinned like iperf3's
/// server) counts what arrives while the sender runs.
fn blast(topo: &Topology, dests: &Arc<Vec<(Ipv4Addr, bool)>>, secs: f64) -> Result<Blast> {
    let receiver = bind_in(&topo.server, "0.0.0.0:0")?;
    receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
    // A deep socket buffer: a receiver that falls behind for a moment should not decide
    // the rate; SO_RCVBUFFORCE as root, the plain limit otherwise.
    {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 16 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt on an open socket with a c_int value of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    receiver.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
    let port = receiver.local_addr()?.port();
    let sender = bind_in(&topo.pod, "0.0.0.0:0")?;
    sender.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let recv_thread = {
        let (stop, ready) = (stop.clone(), ready.clone());
        std::thread::spawn(move || {
            let _pin = PinThread::to(SERVER_CPU.parse().unwrap_or(1));
            let started = thread_ns();
            ready.store(true, Ordering::Release);
            let (mut allowed, mut denied) = (0u64, 0u64);
            let mut buf = [0u8; 2048];
            // Bounded by the stop flag, which the caller sets once the sender is done.
            while !stop.load(Ordering::Acquire) {
                if let Ok(n) = receiver.recv(&mut buf)
                    && n >= 1
                {
                    if buf[0] == 1 {
                        denied += 1;
                    } else {
                        allowed += 1;
                    }
                }
            }
            (allowed, denied, thread_ns().saturating_sub(started))
        })
    };
    let waiting = Instant::now();
    while !ready.load(Ordering::Acquire) && waiting.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let ksoftirqd = pids_named("ksoftirqd/", false);
    let k0 = ksoftirqd_ns(&ksoftirqd);
    let send_thread = {
        let dests = dests.clone();
        std::thread::spawn(move || {
            let _pin = PinThread::to(CLIENT_CPU.parse().unwrap_or(0));
            let targets: Vec<(std::net::SocketAddr, bool)> =
                dests.iter().map(|(a, d)| ((*a, port).into(), *d)).collect();
            let mut payload = [0u8; BLAST_PAYLOAD];
            let (mut sent, mut sent_denied) = (0u64, 0u64);
            let cpu0 = thread_ns();
            let started = Instant::now();
            let limit = Duration::from_secs_f64(secs);
            let mut i = 0usize;
            'outer: loop {
                // The clock is read every 64 datagrams (one send is microseconds).
                for _ in 0..64 {
                    let (addr, denied) = targets[i % targets.len()];
                    i += 1;
                    payload[0] = u8::from(denied);
                    payload[1..9].copy_from_slice(&sent.to_be_bytes());
                    if sender.send_to(&payload, addr).is_ok() {
                        sent += 1;
                        sent_denied += u64::from(denied);
                    }
                }
                if started.elapsed() >= limit || sent >= BLAST_MAX_PACKETS {
                    break 'outer;
                }
            }
            (
                sent,
                sent_denied,
                started.elapsed().as_secs_f64(),
                thread_ns().saturating_sub(cpu0),
            )
        })
    };
    let sent = send_thread.join();
    stop.store(true, Ordering::Release);
    let received = recv_thread.join();
    let k1 = ksoftirqd_ns(&ksoftirqd);
    let (Ok((sent, sent_denied, secs, send_ns)), Ok((allowed, denied, recv_ns))) = (sent, received)
    else {
        bail!("sender or receiver thread panicked");
    };
    Ok(Blast {
        sent,
        received: allowed,
        received_denied: denied,
        sent_denied,
        secs,
        forward_ns: (send_ns + k1.saturating_sub(k0)) as f64,
        recv_ns: recv_ns as f64,
    })
}

/// The attached eBPF program's cumulative (run time ns, run count) from the kernel's
/// own accounting (bpf_stats); None for the mechanisms that are not an eBPF program.
fn prog_stats(filter: &Filter) -> Option<(u64, u64)> {
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
            let prog: &SchedClassifier = ebpf.program("reference_lpm")?.try_into().ok()?;
            let info = prog.info().ok()?;
            Some((info.run_time().as_nanos() as u64, info.run_count()))
        }
        _ => None,
    }
}

struct Measurer<'a> {
    topo: &'a Topology,
    server_pid: u32,
    secs: u32,
    blast_secs: f64,
    many: Arc<Vec<(Ipv4Addr, bool)>>,
    single: Arc<Vec<(Ipv4Addr, bool)>>,
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

    /// Runs one test (with the filter under test switched on) and returns its numbers.
    fn run(&mut self, test: Test, label: &str, filter: &Filter) -> Sample {
        let (topo, secs) = (self.topo, self.secs);
        let mut s = Sample::default();
        drain(topo);
        match test {
            Test::Udp => {
                let r = iperf(topo, &["-u", "-b", "0", "-l", "1470"], secs)
                    .and_then(|v| udp_received(&v));
                if let Some((pps, loss)) = self.note_err("UDP throughput", label, r) {
                    s.udp_mbps = pps * 1470.0 * 8.0 / 1e6;
                    s.udp_loss_pct = loss;
                }
            }
            Test::PpsSingle | Test::PpsMany => {
                let many = matches!(test, Test::PpsMany);
                let dests = if many { &self.many } else { &self.single };
                let before = prog_stats(filter);
                let r = blast(topo, dests, self.blast_secs);
                let after = prog_stats(filter);
                let what = if many {
                    "packets/s, many destinations"
                } else {
                    "packets/s, one destination"
                };
                if let Some(b) = self.note_err(what, label, r) {
                    let (ns, runs) = match (before, after) {
                        (Some(b0), Some(b1)) if b1.1 > b0.1 => (
                            (b1.0 - b0.0) as f64 / (b1.1 - b0.1) as f64,
                            (b1.1 - b0.1) as f64,
                        ),
                        _ => (f64::NAN, f64::NAN),
                    };
                    let secs = b.secs.max(1e-3);
                    // Packets that reached a verdict: the allowed ones that arrived,
                    // scaled by the sent mix (with a filter the denied ones are dropped
                    // by it; without, they arrive too). Packets dropped before the
                    // filter (a full backlog behind a slow one) are not counted.
                    let allowed_sent = b.sent.saturating_sub(b.sent_denied).max(1) as f64;
                    let processed = (b.received as f64 * b.sent as f64 / allowed_sent).max(1.0);
                    let cpu = b.forward_ns / processed;
                    let recv = b.recv_ns / ((b.received + b.received_denied).max(1) as f64);
                    if many {
                        s.pps_many = b.received as f64 / secs;
                        s.many_denied_arrived =
                            b.received_denied as f64 / (b.sent_denied.max(1) as f64);
                        s.ns_pkt_many = ns;
                        s.cpu_ns_pkt_many = cpu;
                        s.recv_ns_pkt_many = recv;
                    } else {
                        s.pps = b.received as f64 / secs;
                        s.pps_sent = b.sent as f64 / secs;
                        s.ns_pkt = ns;
                        s.runs_per_sent = runs / b.sent.max(1) as f64;
                        s.cpu_ns_pkt_single = cpu;
                        s.recv_ns_pkt_single = recv;
                    }
                }
            }
            Test::Cpu => {
                // CPU while 1 Gbit/s flows, sampled inside the run (not its start-up
                // and tear-down).
                let server_pid = self.server_pid;
                let sampler = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(400));
                    traffic_cpu(server_pid, Duration::from_secs_f64(f64::from(secs) - 0.7))
                });
                let r = iperf(topo, &["-u", "-b", "1G", "-l", "1470"], secs)
                    .and_then(|v| udp_received(&v));
                let (cpu_ns, wall, machine) =
                    sampler.join().unwrap_or((f64::NAN, f64::NAN, f64::NAN));
                if let Some((pps, _)) = self.note_err("CPU at 1 Gbit/s", label, r) {
                    s.cpu_pct = 100.0 * cpu_ns / 1e9 / wall;
                    s.cpu_ns_pkt = cpu_ns / (pps * wall).max(1.0);
                    s.machine_busy_pct = machine;
                    s.cpu_rate_mbps = pps * 1470.0 * 8.0 / 1e6;
                }
            }
            Test::Ping => {
                let r = ping(topo);
                if let Some((avg, p99, loss)) = self.note_err("ping", label, r) {
                    s.ping_avg_ms = avg;
                    s.ping_p99_ms = p99;
                    s.ping_loss_pct = loss;
                }
            }
            Test::RequestResponse => {
                let r = request_response(topo, 2000, Duration::from_secs(5));
                if let Some((p50, p99, n)) = self.note_err("UDP request/response", label, r) {
                    s.rr_p50_us = p50;
                    s.rr_p99_us = p99;
                    s.rr_count = n as f64;
                }
            }
        }
        s
    }
}

#[derive(Clone, Copy, Debug)]
enum Test {
    Udp,
    PpsSingle,
    PpsMany,
    Cpu,
    Ping,
    RequestResponse,
}

const TESTS: [Test; 6] = [
    Test::Udp,
    Test::PpsSingle,
    Test::PpsMany,
    Test::Cpu,
    Test::Ping,
    Test::RequestResponse,
];

/// Pins the calling thread to one CPU until dropped (then restores its mask).
struct PinThread(libc::cpu_set_t);

impl PinThread {
    fn to(cpu: usize) -> Self {
        // SAFETY: affinity calls on the calling thread with plain cpu_set_t values.
        unsafe {
            let mut previous: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, std::mem::size_of_val(&previous), &mut previous);
            let mut only: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut only);
            libc::sched_setaffinity(0, std::mem::size_of_val(&only), &only);
            Self(previous)
        }
    }
}

impl Drop for PinThread {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved above.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&self.0), &self.0) };
    }
}

/// `ping -i 0.001 -c 1000`: (average ms, p99 ms from the per-packet times, loss %).
fn ping(topo: &Topology) -> Result<(f64, f64, f64)> {
    let out = exec_in(
        &topo.pod.name,
        "taskset",
        &[
            "-c", CLIENT_CPU, "ping", "-n", "-i", "0.001", "-c", "1000", "-W", "2", "-w", "25",
            SERVER,
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
            // Same CPU as the client: the whole round trip (both softirq passes too)
            // then stays on CPU 0, without cross-CPU wake-ups of an idle vCPU, which cost
            // tens of µs on a VM and would drown the filters' sub-µs differences.
            let _pin = PinThread::to(0);
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        })
    };
    let result = (|| -> Result<Vec<f64>> {
        let _pin = PinThread::to(0);
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
    /// The paired baseline: for each test, the mean of the no-filter runs right before
    /// and right after this mechanism's run (same repetition). For `none` itself, the
    /// mean of all its runs in the repetition (so its ratio is 1).
    pub base: Sample,
    pub phases: Phases,
    pub apply: Option<Duration>,
    pub effective: Option<Duration>,
    pub teardown: Duration,
    /// After the teardown, until the kernel's background freeing had finished.
    pub settle: Duration,
}

pub type Results = BTreeMap<(usize, usize), Vec<Run>>; // (mechanism index, N)

pub struct Suite {
    pub quick: bool,
    pub sizes: Vec<usize>,
    pub mechanisms: Vec<&'static str>,
    pub reps: usize,
    pub secs: u32,
    pub blast_secs: f64,
    pub destinations: usize,
    pub deny_share: f64,
    pub seed: u64,
    pub setup_budget: Duration,
    /// How the kernel's per-program run time accounting was switched on.
    pub stats_mode: String,
    /// Wall time of each (N, repetition): set-up, traffic tests, teardown.
    pub rep_times: Vec<(usize, usize, Duration)>,
    pub results: Results,
    pub notes: BTreeSet<String>,
    /// Why a mechanism stopped, and at which N.
    pub stopped: BTreeMap<&'static str, (usize, String)>,
    pub took: Duration,
    pub background_before: f64,
    pub background_after: f64,
    pub command: String,
}

/// Keeps the kernel's per-program run time accounting on while held. Preferably
/// `BPF_ENABLE_STATS` (a reference the kernel drops when the fd closes, even if this
/// process is killed, and that nobody else's write to the sysctl can switch off);
/// otherwise `kernel.bpf_stats_enabled` = 1, restored to its previous value on drop.
enum BpfStats {
    Fd(#[allow(dead_code)] std::os::fd::OwnedFd),
    Sysctl(String),
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
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

    fn describe(&self) -> &'static str {
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
            vec![10_000, 1_000_000]
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
    let reps = args
        .reps
        .unwrap_or(if quick { 3 } else { DEFAULT_REPS })
        .max(1);
    let secs = args.secs.unwrap_or(if quick { 2 } else { 3 }).max(1);
    let blast_secs = args
        .blast_secs
        .unwrap_or(if quick { 1.0 } else { 2.0 })
        .clamp(0.2, 30.0);
    let budget = Duration::from_secs_f64(
        60.0 * args
            .budget_minutes
            .unwrap_or(if quick { 15.0 } else { DEFAULT_BUDGET_MINUTES }),
    );
    if !(0.0..=0.5).contains(&args.deny_share) {
        bail!("--deny-share must be within 0..0.5");
    }
    let destination_count = args.destinations.clamp(1, 65_536);
    let setup_budget = Duration::from_secs(args.setup_budget_secs);
    for tool in [
        "iperf3",
        "ping",
        "iptables",
        "iptables-restore",
        "ipset",
        "taskset",
        "ss",
    ] {
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
    let bpf_stats = BpfStats::enable()?;

    let topo = topology(&prefix)?;
    let iperf_server = {
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
        blast_secs,
        destinations: destination_count,
        deny_share: args.deny_share,
        seed: args.seed,
        setup_budget,
        stats_mode: bpf_stats.describe().to_owned(),
        rep_times: Vec::new(),
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
    let mut last_apply: BTreeMap<&str, (usize, Duration, Duration)> = BTreeMap::new();
    // Last ICMP average per mechanism (ms), for the per-packet cost criterion.
    let mut last_ping: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    let mut out_of_time = false;
    for &n in &sizes {
        let generated = Instant::now();
        let rules = rule_mix(n.max(1), args.seed);
        if covers(&rules, &prefix_lens(&rules), u32::from(SERVER_ADDR)) {
            bail!("the traffic destination {SERVER} is inside the rule list");
        }
        // The same destinations for every mechanism at this N (they depend on the rule
        // list: the denied ones are inside it). Never the set-up test's target.
        let setup_target = rules
            .iter()
            .rev()
            .find(|(_, l)| *l == 32)
            .map(|(a, _)| Ipv4Addr::from(*a))
            .unwrap_or(SERVER_ADDR);
        let many = Destinations::new(
            &rules,
            destination_count,
            args.deny_share,
            args.seed,
            &[SERVER_ADDR, setup_target],
        )?;
        many.install(&topo)?;
        let denied_now = many.list.iter().filter(|(_, d)| *d).count();
        let denied_asked = (destination_count as f64 * args.deny_share).round() as usize;
        if denied_now < denied_asked {
            suite.notes.insert(format!(
                "N={n}: the rule list holds only {denied_now} distinct denied destinations (asked for {denied_asked}); the many-destination test used those."
            ));
        }
        let prepared = Prepared::new(rules, &mechanisms);
        println!(
            "N={n}: {} rules generated and formatted, {} destinations routed ({} denied) in {:.1} s",
            prepared.rules.len(),
            many.list.len(),
            many.list.iter().filter(|(_, d)| *d).count(),
            generated.elapsed().as_secs_f64()
        );
        for rep in 0..reps {
            if suite_started.elapsed() > budget {
                out_of_time = true;
                break;
            }
            let rep_started = Instant::now();
            // 1. Every mechanism's rule set applied afresh (set-up timed), then switched
            //    off but kept loaded.
            let mut loaded: Vec<(usize, &'static str, Filter, Run)> = Vec::new();
            for &mechanism in &mechanisms {
                // Results are keyed by the position in MECHANISMS (what the report
                // looks up), not in the --mechanisms selection.
                let mi = MECHANISMS.iter().position(|m| *m == mechanism).unwrap_or(0);
                if suite.stopped.contains_key(mechanism) {
                    continue;
                }
                if rep == 0 && mechanism != "none" {
                    let mut why = Vec::new();
                    // The size-dependent phase (restore, inserts) scaled linearly, the
                    // rest (program load, attach, process start) kept.
                    let predicted = last_apply.get(mechanism).map(|&(prev_n, total, dep)| {
                        (
                            prev_n,
                            total,
                            total - dep + dep.mul_f64(n as f64 / prev_n as f64),
                        )
                    });
                    if let Some((prev_n, prev, predicted)) = predicted
                        && predicted > setup_budget
                    {
                        why.push(format!(
                            "its set-up is predicted at {:.0} s ({:.1} s at {prev_n} rules, the rule loading scaled linearly), over the {} s set-up budget",
                            predicted.as_secs_f64(),
                            prev.as_secs_f64(),
                            setup_budget.as_secs()
                        ));
                    }
                    if let Some(&(prev_n, ping_ms)) = last_ping.get(mechanism) {
                        let predicted = ping_ms * n as f64 / prev_n as f64;
                        if ping_ms > 1.0 && predicted > args.max_packet_ms {
                            why.push(format!(
                                "its per-packet cost grows linearly (ICMP round trip {ping_ms:.1} ms at {prev_n} rules, predicted {predicted:.0} ms), over the {:.0} ms limit: every test would leave a backlog that takes minutes to drain",
                                args.max_packet_ms
                            ));
                        }
                    }
                    if !why.is_empty() {
                        if let Some((_, _, predicted)) = predicted
                            && predicted <= setup_budget
                        {
                            why.push(format!(
                                "(its set-up would take about {:.0} s)",
                                predicted.as_secs_f64()
                            ));
                        }
                        let why = why.join("; ").replace("; (", " (");
                        println!("{mechanism:>14} N={n:>8}: stopped: {why}");
                        suite.stopped.insert(mechanism, (n, why));
                        continue;
                    }
                }
                let label = format!("{mechanism} N={n} rep {}", rep + 1);
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
                let mut filter = applied.filter;
                if mechanism != "none" {
                    let dependent = applied
                        .phases
                        .iter()
                        .filter(|(p, _)| SIZE_DEPENDENT.contains(p))
                        .map(|(_, d)| *d)
                        .sum();
                    last_apply.insert(mechanism, (n, applied.apply, dependent));
                    if applied.effective.is_none() {
                        suite.notes.insert(format!(
                            "{label}: FAILED: the destination inside the list was not dropped within 20 s"
                        ));
                    }
                    println!(
                        "{mechanism:>14} N={n:>8} rep {}: set-up {} (apply {:.3} s: {})",
                        rep + 1,
                        applied
                            .effective
                            .map(|d| format!("{:.3} s", d.as_secs_f64()))
                            .unwrap_or_else(|| "NOT DROPPED".into()),
                        applied.apply.as_secs_f64(),
                        applied
                            .phases
                            .iter()
                            .map(|(p, d)| format!("{p} {:.3}", d.as_secs_f64()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                applier
                    .set_enabled(&mut filter, false)
                    .with_context(|| format!("{label}: switching the filter off"))?;
                loaded.push((
                    mi,
                    mechanism,
                    filter,
                    Run {
                        rep,
                        sample: Sample::default(),
                        base: Sample::default(),
                        phases: applied.phases,
                        apply: (mechanism != "none").then_some(applied.apply),
                        effective: applied.effective,
                        teardown: Duration::ZERO,
                        settle: Duration::ZERO,
                    },
                ));
            }
            // 2. Each test runs for every mechanism back to back, one filter switched on at
            //    a time, with a no-filter run before the first and after every mechanism
            //    (none, A, none, B, none, …): each mechanism's baseline is the mean of the
            //    two no-filter runs around it, seconds away, so slow drift of a shared
            //    machine cancels (to first order) in the ratio. The mechanisms' order
            //    rotates with the repetition.
            let traffic = Instant::now();
            {
                let mut measurer = Measurer {
                    topo: &topo,
                    server_pid: iperf_server.0.id(),
                    secs,
                    blast_secs,
                    many: many.list.clone(),
                    single: Arc::new(vec![(SERVER_ADDR, false)]),
                    notes: &mut suite.notes,
                };
                let none_pos = loaded.iter().position(|l| l.1 == "none");
                let others: Vec<usize> =
                    (0..loaded.len()).filter(|i| Some(*i) != none_pos).collect();
                let rotated: Vec<usize> = (0..others.len())
                    .map(|j| others[(j + rep) % others.len()])
                    .collect();
                let order: Vec<usize> = match none_pos {
                    Some(np) => std::iter::once(np)
                        .chain(rotated.iter().flat_map(|&i| [i, np]))
                        .collect(),
                    None => rotated,
                };
                for test in TESTS {
                    let mut got = Vec::with_capacity(order.len());
                    for &i in &order {
                        let (_, mechanism, filter, _) = &mut loaded[i];
                        let label = format!("{mechanism} N={n} rep {}", rep + 1);
                        if let Err(e) = applier.set_enabled(filter, true) {
                            measurer
                                .notes
                                .insert(format!("{label}: switching the filter on failed: {e:#}"));
                            got.push(Sample::default());
                            continue;
                        }
                        got.push(measurer.run(test, &label, filter));
                        applier
                            .set_enabled(filter, false)
                            .with_context(|| format!("{label}: switching the filter off"))?;
                    }
                    for (pos, &i) in order.iter().enumerate() {
                        if Some(i) == none_pos {
                            continue;
                        }
                        let run = &mut loaded[i].3;
                        run.sample.merge(&got[pos]);
                        if none_pos.is_some() {
                            run.base.merge(&Sample::mean(&[got[pos - 1], got[pos + 1]]));
                        }
                    }
                    if let Some(np) = none_pos {
                        let nones: Vec<Sample> = order
                            .iter()
                            .zip(&got)
                            .filter(|(i, _)| **i == np)
                            .map(|(_, s)| *s)
                            .collect();
                        let mean = Sample::mean(&nones);
                        loaded[np].3.sample.merge(&mean);
                        loaded[np].3.base.merge(&mean);
                    }
                }
            }
            let traffic = traffic.elapsed();
            // 3. Unload everything; the kernel frees big tries (kworker) and sets (RCU
            //    callbacks, in softirq) after that returns: let it finish before the
            //    next set-up. Kernel time, not busy time (a shared machine's builds are
            //    mostly user time), and capped (others' kernel work may never stop).
            let mut done = Vec::new();
            for (mi, mechanism, filter, mut run) in loaded {
                let torn = Instant::now();
                applier.remove(filter);
                run.teardown = torn.elapsed();
                done.push((mi, mechanism, run));
            }
            let settled = Instant::now();
            let cap = Duration::from_secs((n / 700_000).min(15) as u64);
            while settled.elapsed() < cap && kernel_share(Duration::from_millis(250)) > 0.12 {}
            let settle = settled.elapsed();
            println!(
                "N={n} rep {}: traffic tests {:.0} s, settled {:.1} s",
                rep + 1,
                traffic.as_secs_f64(),
                settle.as_secs_f64()
            );
            suite.rep_times.push((n, rep, rep_started.elapsed()));
            for (mi, mechanism, mut run) in done {
                run.settle = settle;
                let (sample, base) = (&run.sample, &run.base);
                println!(
                    "{mechanism:>14} N={n:>8} rep {}: {:>6.0} Mbit/s ({:.3}) pps {:>7.0} ({:.3}) many {:>7.0} ({:.3}, leaked {:.2}) ns/pkt {:.0}/{:.0} cpu@1G {:.0} ns/pkt {:.1}% ({:.0} Mbit/s) ping {:.3}/{:.3} ms rr {:.0}/{:.0} us teardown {:.2} s",
                    rep + 1,
                    sample.udp_mbps,
                    sample.udp_mbps / base.udp_mbps,
                    sample.pps,
                    sample.pps / base.pps,
                    sample.pps_many,
                    sample.pps_many / base.pps_many,
                    sample.many_denied_arrived,
                    sample.ns_pkt,
                    sample.ns_pkt_many,
                    sample.cpu_ns_pkt,
                    sample.cpu_pct,
                    sample.cpu_rate_mbps,
                    sample.ping_avg_ms,
                    sample.ping_p99_ms,
                    sample.rr_p50_us,
                    sample.rr_p99_us,
                    run.teardown.as_secs_f64(),
                );
                if sample.ping_avg_ms.is_finite() {
                    last_ping.insert(mechanism, (n, sample.ping_avg_ms));
                }
                suite.results.entry((mi, n)).or_default().push(run);
            }
        }
        if let Err(e) = many.uninstall(&topo) {
            suite.notes.insert(format!(
                "N={n}: removing the destination routes failed: {e:#}"
            ));
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
    drop(bpf_stats);
    suite.background_after = busy_over(Duration::from_secs(2));
    drop(iperf_server);
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
