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
    /// A mechanism whose ICMP latency is already over 1 ms (a per-packet cost that grows
    /// with N) is not tried at a size where, extrapolated linearly, it would exceed this:
    /// every packet then costs the forwarding CPU that long, and the 1000-packet backlog
    /// an unlimited-rate test leaves behind takes minutes to drain.
    #[arg(long, default_value_t = 50.0)]
    max_packet_ms: f64,
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
    /// CPU time of the iperf3 client and server and the ksoftirqd threads during the
    /// 1 Gbit/s run, % of one core. Ticks of softirq work served in a task's context are
    /// charged to that task (tick accounting, no IRQ time accounting here), so this holds
    /// the forwarding path and the filter, and not other people's work on the machine.
    pub cpu_pct: f64,
    /// Busy share of the whole machine (all cores) during the same window.
    pub cpu_machine_pct: f64,
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
            cpu_machine_pct: f64::NAN,
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

/// utime + stime of a task, in clock ticks.
fn task_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
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

/// While the client runs: (CPU of the iperf3 client + server + ksoftirqd threads in % of
/// one core, busy % of all cores), over `window`.
fn traffic_cpu(server_pid: u32, window: Duration) -> (f64, f64) {
    let client = pids_named("iperf3", true);
    let mut pids = pids_named("ksoftirqd/", false);
    pids.push(server_pid);
    pids.extend(client.iter().filter(|p| **p != server_pid));
    let sum = |pids: &[u32]| pids.iter().filter_map(|p| task_ticks(*p)).sum::<u64>();
    let (t0, i0) = cpu_ticks();
    let p0 = sum(&pids);
    let started = Instant::now();
    std::thread::sleep(window);
    let p1 = sum(&pids);
    let (t1, i1) = cpu_ticks();
    let wall = started.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let process = if client.is_empty() {
        f64::NAN
    } else {
        100.0 * p1.saturating_sub(p0) as f64 / hz / wall
    };
    let machine = 100.0 * (1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64);
    (process, machine)
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

struct Measurer<'a> {
    topo: &'a Topology,
    server_pid: u32,
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

    /// Runs one test (with the filter under test switched on) into `s`.
    fn run(&mut self, test: Test, label: &str, s: &mut Sample) {
        let (topo, secs) = (self.topo, self.secs);
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
            Test::Pps => {
                let r = iperf(topo, &["-u", "-b", "0", "-l", "64"], secs)
                    .and_then(|v| udp_received(&v));
                if let Some((pps, _)) = self.note_err("64-byte packets/s", label, r) {
                    s.pps = pps;
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
                let (process, machine) = sampler.join().unwrap_or((f64::NAN, f64::NAN));
                if let Some((pps, _)) = self.note_err("CPU at 1 Gbit/s", label, r) {
                    s.cpu_pct = process;
                    s.cpu_machine_pct = machine;
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
    }
}

#[derive(Clone, Copy, Debug)]
enum Test {
    Udp,
    Pps,
    Cpu,
    Ping,
    RequestResponse,
}

const TESTS: [Test; 5] = [
    Test::Udp,
    Test::Pps,
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
    let mut last_apply: BTreeMap<&str, (usize, Duration, Duration)> = BTreeMap::new();
    // Last ICMP average per mechanism (ms), for the per-packet cost criterion.
    let mut last_ping: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
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
            if suite_started.elapsed() > budget {
                out_of_time = true;
                break;
            }
            // 1. Every mechanism's rule set applied afresh (set-up timed), then switched
            //    off but kept loaded.
            let mut loaded: Vec<(usize, &'static str, Filter, Run)> = Vec::new();
            for (mi, &mechanism) in mechanisms.iter().enumerate() {
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
                        phases: applied.phases,
                        apply: (mechanism != "none").then_some(applied.apply),
                        effective: applied.effective,
                        teardown: Duration::ZERO,
                        settle: Duration::ZERO,
                    },
                ));
            }
            // 2. Each test run for every mechanism back to back (seconds apart, so the
            //    load of a shared machine hits them alike), one filter switched on at a
            //    time; the order rotates with the repetition.
            let traffic = Instant::now();
            {
                let mut measurer = Measurer {
                    topo: &topo,
                    server_pid: iperf_server.0.id(),
                    secs,
                    notes: &mut suite.notes,
                };
                let k = loaded.len();
                for test in TESTS {
                    for j in 0..k {
                        let (_, mechanism, filter, run) = &mut loaded[(j + rep) % k];
                        let label = format!("{mechanism} N={n} rep {}", rep + 1);
                        if let Err(e) = applier.set_enabled(filter, true) {
                            measurer
                                .notes
                                .insert(format!("{label}: switching the filter on failed: {e:#}"));
                            continue;
                        }
                        measurer.run(test, &label, &mut run.sample);
                        applier
                            .set_enabled(filter, false)
                            .with_context(|| format!("{label}: switching the filter off"))?;
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
            for (mi, mechanism, mut run) in done {
                run.settle = settle;
                let sample = &run.sample;
                println!(
                    "{mechanism:>14} N={n:>8} rep {}: {:>6.0} Mbit/s {:>8.0} pps cpu {:>5.1}% of a core, machine {:>3.0}% ({:.0} Mbit/s) ping {:.3}/{:.3} ms rr {:.0}/{:.0} us teardown {:.2} s",
                    rep + 1,
                    sample.udp_mbps,
                    sample.pps,
                    sample.cpu_pct,
                    sample.cpu_machine_pct,
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
