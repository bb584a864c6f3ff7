//! The published egress-filtering benchmark's methodology (Kinvolk, parts 1 and 2), every
//! mechanism side by side in one run: no filter, iptables, ipset + one iptables rule
//! (Calico's mechanism), egress-deny (the plugin's attach path), and the reference tc
//! LPM filter. Topology: pod ns → veth → node ns (routes; the filter sits here) → veth →
//! server ns.
//!
//!     cargo run --release -p egress-deny-tests --bin bench-suite -- [--quick] [--out DIR]
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Hook},
    netns::NetnsGuard,
    rules::{Action, RuleMaps},
};
use egress_deny_tests::{
    Netns, PinDir,
    bench::{machine, percentile, rule_mix},
    probe::bind_in,
    random_suffix, require_root,
};

const SERVER: &str = "10.10.2.2";
const MECHANISMS: [&str; 5] = ["none", "iptables", "ipset", "egress-deny", "reference-lpm"];
/// iptables evaluates rules linearly per packet; beyond this its throughput is nil and
/// set-up runs into minutes.
const IPTABLES_MAX: usize = 100_000;

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

/// One mechanism loaded with a rule list; dropping it removes the filter.
enum Filter {
    None,
    Iptables,
    Ipset,
    EgressDeny(PinDir),
    Reference(Box<aya::Ebpf>),
}

fn restore(ns: &Netns, program: &[&str], input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(program)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn cidr(addr: u32, len: u8) -> String {
    format!("{}/{len}", Ipv4Addr::from(addr))
}

fn apply(mechanism: &str, topo: &Topology, rules: &[(u32, u8)]) -> Result<Filter> {
    Ok(match mechanism {
        "none" => Filter::None,
        "iptables" => {
            let mut input = String::from("*filter\n:FORWARD ACCEPT [0:0]\n");
            for (a, l) in rules {
                let _ = writeln!(input, "-A FORWARD -d {} -j DROP", cidr(*a, *l));
            }
            input.push_str("COMMIT\n");
            restore(&topo.node, &["iptables-restore"], &input)?;
            Filter::Iptables
        }
        "ipset" => {
            let mut input = format!(
                "create bench hash:net family inet hashsize 65536 maxelem {}\n",
                rules.len().max(1024) * 2
            );
            for (a, l) in rules {
                let _ = writeln!(input, "add bench {}", cidr(*a, *l));
            }
            restore(&topo.node, &["ipset", "restore"], &input)?;
            topo.node.exec(
                "iptables",
                &[
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
            )?;
            Filter::Ipset
        }
        "egress-deny" => {
            let pins = PinDir::new()?;
            let mut maps = RuleMaps::open(&pins.layout)?;
            for (a, l) in rules {
                maps.insert_v4(a.to_be_bytes(), *l, Action::Deny)?;
            }
            // Exactly what the plugin does on ADD: the host side of the pod's veth.
            let _guard = NetnsGuard::enter(&topo.node.path())?;
            let link_pin = pins.layout.pod_link("bench", "eth0");
            attach::attach(
                &pins.layout,
                &AttachRequest {
                    ifname: "podveth",
                    hook: Hook::Ingress,
                    link_pin: &link_pin,
                    mode: AttachMode::Tcx,
                },
            )?;
            Filter::EgressDeny(pins)
        }
        "reference-lpm" => {
            let mut ebpf =
                aya::EbpfLoader::new().load(egress_deny_datapath::REFERENCE_LPM_OBJECT)?;
            {
                let mut trie: aya::maps::lpm_trie::LpmTrie<_, [u8; 4], u32> =
                    aya::maps::lpm_trie::LpmTrie::try_from(
                        ebpf.map_mut("ref_v4").context("ref_v4")?,
                    )?;
                for (a, l) in rules {
                    trie.insert(
                        &aya::maps::lpm_trie::Key::new(u32::from(*l), a.to_be_bytes()),
                        1,
                        0,
                    )?;
                }
            }
            let prog: &mut SchedClassifier = ebpf
                .program_mut("reference_lpm")
                .context("program")?
                .try_into()?;
            prog.load()?;
            let _guard = NetnsGuard::enter(&topo.node.path())?;
            prog.attach_with_options(
                "podveth",
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )?;
            Filter::Reference(Box::new(ebpf))
        }
        other => bail!("unknown mechanism {other}"),
    })
}

fn remove(filter: Filter, topo: &Topology) {
    match filter {
        Filter::Iptables => {
            let _ = topo.node.exec("iptables", &["-F", "FORWARD"]);
        }
        Filter::Ipset => {
            let _ = topo.node.exec("iptables", &["-F", "FORWARD"]);
            let _ = topo.node.exec("ipset", &["destroy", "bench"]);
        }
        Filter::EgressDeny(pins) => drop(pins), // unpinning detaches
        Filter::Reference(ebpf) => drop(ebpf),  // links are dropped with it
        Filter::None => {}
    }
}

fn iperf(topo: &Topology, args: &[&str]) -> Result<serde_json::Value> {
    let mut full = vec!["-c", SERVER, "-J"];
    full.extend_from_slice(args);
    let out = topo.pod.exec("iperf3", &full)?;
    Ok(serde_json::from_str(&out)?)
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
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (fields.iter().sum(), idle)
}

#[derive(Default, Clone)]
struct Sample {
    udp_mbps: f64,
    pps: f64,
    cpu_pct: f64,
    ping_avg_ms: f64,
    ping_p99_ms: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
}

fn measure(topo: &Topology, secs: u32) -> Result<Sample> {
    let t = secs.to_string();
    let mut s = Sample::default();
    let udp = iperf(topo, &["-u", "-b", "0", "-l", "1470", "-t", &t])?;
    let sum = &udp["end"]["sum"];
    s.udp_mbps = sum["bits_per_second"].as_f64().unwrap_or(0.0)
        * (1.0 - sum["lost_percent"].as_f64().unwrap_or(0.0) / 100.0)
        / 1e6;
    let small = iperf(topo, &["-u", "-b", "0", "-l", "64", "-t", &t])?;
    let sum = &small["end"]["sum"];
    let received =
        sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
    s.pps = received / sum["seconds"].as_f64().unwrap_or(1.0).max(0.001);
    let (total0, idle0) = cpu_ticks();
    iperf(topo, &["-u", "-b", "1G", "-l", "1470", "-t", &t])?;
    let (total1, idle1) = cpu_ticks();
    s.cpu_pct = 100.0 * (1.0 - (idle1 - idle0) as f64 / (total1 - total0).max(1) as f64);
    let ping = topo
        .pod
        .exec("ping", &["-i", "0.001", "-c", "1000", "-W", "1", SERVER])?;
    let mut times: Vec<f64> = ping
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
    times.sort_by(f64::total_cmp);
    s.ping_avg_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
    s.ping_p99_ms = percentile(&times, 0.99);
    let (p50, p99) = request_response(topo)?;
    s.rr_p50_us = p50;
    s.rr_p99_us = p99;
    Ok(s)
}

/// UDP request/response round trips between the pod and the server.
fn request_response(topo: &Topology) -> Result<(f64, f64)> {
    let server = bind_in(&topo.server, &format!("{SERVER}:0"))?;
    let port = server.local_addr()?.port();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..2000 {
            match server.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    let _ = server.send_to(&buf[..n], peer);
                }
                Err(_) => return,
            }
        }
    });
    let client: UdpSocket = bind_in(&topo.pod, "0.0.0.0:0")?;
    client.connect((SERVER, port))?;
    let mut rtts = Vec::with_capacity(2000);
    let mut buf = [0u8; 64];
    for i in 0..2000u32 {
        let started = Instant::now();
        client.send(&i.to_be_bytes())?;
        if client.recv(&mut buf).is_ok() {
            rtts.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let _ = echo.join();
    rtts.sort_by(f64::total_cmp);
    Ok((percentile(&rtts, 0.5), percentile(&rtts, 0.99)))
}

/// From applying the rule set until a destination inside it is dropped (probe per ms).
fn setup_time(mechanism: &str, topo: &Topology, rules: &[(u32, u8)]) -> Result<(Duration, Filter)> {
    let (target, _) = *rules
        .iter()
        .find(|(_, l)| *l == 32)
        .context("a /32 in the list")?;
    let target = Ipv4Addr::from(target);
    topo.server.ip(&format!("addr add {target}/32 dev lo"))?;
    topo.node
        .ip(&format!("route add {target}/32 via {SERVER}"))?;
    let receiver = bind_in(&topo.server, &format!("{target}:0"))?;
    receiver.set_read_timeout(Some(Duration::from_millis(1)))?;
    let port = receiver.local_addr()?.port();
    let sender = bind_in(&topo.pod, "0.0.0.0:0")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let last_seen = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let prober = {
        let (stop, last_seen) = (stop.clone(), last_seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = sender.send_to(b"p", (target, port));
                if receiver.recv(&mut buf).is_ok() {
                    *last_seen.lock().unwrap() = Instant::now();
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50)); // let probes flow before the rules
    let started = Instant::now();
    let filter = apply(mechanism, topo, rules)?;
    let applied = started.elapsed();
    // Dropped once no probe arrived for 100 ms after the last one seen.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let seen = *last_seen.lock().unwrap();
        if (Instant::now() >= started + applied && seen.elapsed() > Duration::from_millis(100))
            || Instant::now() > deadline
        {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = prober.join();
            // The last probe that got through marks when the drop began.
            let took = seen.saturating_duration_since(started);
            let _ = topo.node.ip(&format!("route del {target}/32"));
            let _ = topo.server.ip(&format!("addr del {target}/32 dev lo"));
            return Ok((took, filter));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<()> {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results"));
    let (sizes, reps, secs): (Vec<usize>, usize, u32) = if quick {
        (vec![10, 10_000, 1_000_000], 1, 2)
    } else {
        (
            vec![10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000],
            3,
            4,
        )
    };
    let prefix = format!("eb{}", &random_suffix()[..3]);
    cleanup_on_signal(prefix.clone())?;
    let topo = topology(&prefix)?;
    Command::new("ip")
        .args(["netns", "exec", &topo.server.name, "iperf3", "-s", "-D"])
        .status()?;
    let mut results: BTreeMap<(String, usize), (Sample, Duration)> = BTreeMap::new();
    let mut notes = Vec::new();
    let suite_started = Instant::now();
    for &n in &sizes {
        let rules = rule_mix(n.max(1), 11);
        for mechanism in MECHANISMS {
            if mechanism == "iptables" && n > IPTABLES_MAX {
                notes.push(format!("iptables not run at {n}: capped at {IPTABLES_MAX} rules (every packet walks every rule; see how it collapses already at 10k)"));
                continue;
            }
            if mechanism == "ipset" && n > 1_000_000 {
                notes.push(format!("ipset skipped at {n} (hash:net memory and restore time; the published benchmark saw Calico crash-loop near 10M)"));
                continue;
            }
            let (setup, filter) = if mechanism == "none" {
                (Duration::ZERO, Filter::None)
            } else {
                setup_time(mechanism, &topo, &rules)?
            };
            let mut samples = Vec::new();
            for _ in 0..reps {
                samples.push(measure(&topo, secs)?);
            }
            let pick =
                |f: fn(&Sample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
            let sample = Sample {
                udp_mbps: pick(|s| s.udp_mbps),
                pps: pick(|s| s.pps),
                cpu_pct: pick(|s| s.cpu_pct),
                ping_avg_ms: pick(|s| s.ping_avg_ms),
                ping_p99_ms: pick(|s| s.ping_p99_ms),
                rr_p50_us: pick(|s| s.rr_p50_us),
                rr_p99_us: pick(|s| s.rr_p99_us),
            };
            println!(
                "{mechanism:>14} N={n:>8}: {:>7.0} Mbit/s {:>8.0} pps cpu {:>5.1}% ping {:.3}/{:.3} ms rr {:.0}/{:.0} us setup {:.3} s",
                sample.udp_mbps,
                sample.pps,
                sample.cpu_pct,
                sample.ping_avg_ms,
                sample.ping_p99_ms,
                sample.rr_p50_us,
                sample.rr_p99_us,
                setup.as_secs_f64()
            );
            results.insert((mechanism.to_owned(), n), (sample, setup));
            remove(filter, &topo);
        }
    }
    // The server namespace goes with `topo`; its iperf3 daemon with it.
    let _ = topo.server.exec("pkill", &["iperf3"]);
    write_results(
        &out_dir,
        &results,
        &sizes,
        quick,
        &notes,
        suite_started.elapsed(),
    )?;
    Ok(())
}

fn cleanup_on_signal(prefix: String) -> Result<()> {
    use signal_hook::{
        consts::{SIGINT, SIGTERM},
        iterator::Signals,
    };
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            // Namespaces take their veths, iptables rules and ipsets with them.
            let list = Command::new("ip")
                .args(["netns", "list"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for name in list
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(&prefix))
            {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
            if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
                for e in entries.flatten().filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("egress-deny-test-")
                }) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
            std::process::exit(130);
        }
    });
    Ok(())
}

/// What limits each mechanism (the "why" behind the tables).
const LIMITS: &str = "\
- Everything runs on one 2-core VM: sender, router and receiver share the CPUs, so absolute
  numbers are low and noisy; compare mechanisms within a run, and prefer the full run
  (medians of 3) over `--quick` (one repetition).
- **iptables**: every packet walks the FORWARD rules linearly, so per-packet cost grows
  with N and throughput collapses by 10k rules; restoring large rule sets also takes long.
- **ipset + iptables** (Calico's mechanism): one `hash:net` set probed once per distinct
  prefix length in the set (3 here), so the packet cost stays nearly flat; set-up is
  `ipset restore` of the whole list, and memory grows with N.
- **egress-deny**: one LPM-trie lookup per packet (~150–250 ns at 1M–10M rules in
  BPF_PROG_TEST_RUN, tests/BENCHMARKS.md), plus VLAN parsing and per-pod counters; set-up
  is limited by one bpf() syscall per rule (the installer splits big updates over two
  threads; this suite inserts from one).
- **reference LPM**: the same lookup without VLAN/IPv6 parsing and counters, reading the
  packet through `bpf_skb_load_bytes`; the fixed anchor for future datapath work.";

type Results = BTreeMap<(String, usize), (Sample, Duration)>;
/// Extracts one metric from a sample (and the set-up time).
type MetricOf = fn(&Sample, &Duration) -> f64;

fn write_results(
    dir: &Path,
    results: &Results,
    sizes: &[usize],
    quick: bool,
    notes: &[String],
    took: Duration,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let date = String::from_utf8_lossy(
        &Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()?
            .stdout,
    )
    .trim()
    .to_owned();
    let mut md = format!(
        "# Egress filtering benchmark: side by side\n\n\
         `cargo run --release -p egress-deny-tests --bin bench-suite{}` — {}, {date}, {} min.\n\n\
         Methodology of the published egress-filtering benchmark (Kinvolk, parts 1 and 2) on one\n\
         machine: a pod namespace sends through a veth into a node namespace that routes (the\n\
         filter sits there: tc ingress of the pod's veth for the eBPF filters, FORWARD for\n\
         iptables/ipset) to a server namespace. Rules: random global-unicast IPv4 prefixes,\n\
         ≈89% /32, 10% /24, 1% /16, seed 11; the traffic tests' destination is outside the list,\n\
         the set-up test's inside it. {} — medians.\n\n",
        if quick { " -- --quick" } else { "" },
        machine(),
        took.as_secs() / 60,
        if quick {
            "Quick mode: one repetition, 2 s per iperf3 run"
        } else {
            "Three repetitions, 4 s per iperf3 run"
        }
    );
    let metrics: [(&str, &str, MetricOf); 8] = [
        (
            "udp_throughput",
            "UDP throughput, 1470-byte datagrams (Mbit/s)",
            |s, _| s.udp_mbps,
        ),
        ("udp_pps", "UDP packets/s, 64-byte datagrams", |s, _| s.pps),
        (
            "cpu",
            "CPU utilisation at 1 Gbit/s UDP (% of the machine)",
            |s, _| s.cpu_pct,
        ),
        (
            "ping_avg",
            "ICMP latency, 1 ms interval ×1000, average (ms)",
            |s, _| s.ping_avg_ms,
        ),
        ("ping_p99", "ICMP latency p99 (ms)", |s, _| s.ping_p99_ms),
        (
            "rr_p50",
            "UDP request/response round trip p50 (µs)",
            |s, _| s.rr_p50_us,
        ),
        (
            "rr_p99",
            "UDP request/response round trip p99 (µs)",
            |s, _| s.rr_p99_us,
        ),
        (
            "setup",
            "Set-up time: rules applied → destination dropped (s)",
            |_, d| d.as_secs_f64(),
        ),
    ];
    for (key, title, get) in metrics {
        let _ = writeln!(md, "## {title}\n\n![{key}]({key}.svg)\n");
        let _ = writeln!(
            md,
            "| rules | {} |\n|---:|{}",
            MECHANISMS.join(" | "),
            "---:|".repeat(MECHANISMS.len())
        );
        let mut series: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
        for mechanism in MECHANISMS {
            let points: Vec<(usize, f64)> = sizes
                .iter()
                .filter_map(|n| {
                    results
                        .get(&(mechanism.to_owned(), *n))
                        .map(|(s, d)| (*n, get(s, d)))
                })
                .collect();
            series.push((mechanism.to_owned(), points));
        }
        for n in sizes {
            let cells: Vec<String> = MECHANISMS
                .iter()
                .map(|m| {
                    results
                        .get(&(m.to_string(), *n))
                        .map(|(s, d)| format!("{:.3}", get(s, d)))
                        .unwrap_or_else(|| "—".into())
                })
                .collect();
            let _ = writeln!(md, "| {n} | {} |", cells.join(" | "));
        }
        md.push('\n');
        std::fs::write(dir.join(format!("{key}.svg")), svg(title, &series))?;
    }
    // Headline ratios at 1M.
    let at = |m: &str, n: usize| results.get(&(m.to_owned(), n));
    let _ = writeln!(md, "## Headline at 1M rules\n");
    if let Some((base, _)) = at("none", 1_000_000) {
        for m in MECHANISMS.iter().skip(1) {
            match at(m, 1_000_000) {
                Some((s, d)) => {
                    let _ = writeln!(
                        md,
                        "- {m}: {:.0}% of the no-filter UDP throughput, {:.0}% of its packets/s; set-up {:.2} s.",
                        100.0 * s.udp_mbps / base.udp_mbps.max(1e-9),
                        100.0 * s.pps / base.pps.max(1e-9),
                        d.as_secs_f64()
                    );
                }
                None => {
                    let _ = writeln!(md, "- {m}: not measured at 1M (see notes).");
                }
            }
        }
    }
    let _ = writeln!(md, "\n## Notes\n");
    for note in notes.iter().collect::<std::collections::BTreeSet<_>>() {
        let _ = writeln!(md, "- {note}");
    }
    let _ = writeln!(md, "{LIMITS}");
    std::fs::write(dir.join("RESULTS.md"), md)?;
    println!("wrote {}", dir.join("RESULTS.md").display());
    Ok(())
}

/// A small line chart: x = rule count (log scale), one polyline per mechanism.
fn svg(title: &str, series: &[(String, Vec<(usize, f64)>)]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 400.0, 90.0, 50.0, 40.0, 160.0);
    let all: Vec<&(usize, f64)> = series.iter().flat_map(|(_, p)| p.iter()).collect();
    let max_y = all.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let min_x = all
        .iter()
        .map(|p| (p.0.max(1) as f64).log10())
        .fold(f64::MAX, f64::min)
        .min(1.0);
    let max_x = all
        .iter()
        .map(|p| (p.0.max(1) as f64).log10())
        .fold(0.0f64, f64::max)
        .max(min_x + 1.0);
    let x = |n: usize| {
        left + ((n.max(1) as f64).log10() - min_x) / (max_x - min_x) * (w - left - right)
    };
    let y = |v: f64| h - bottom - v / max_y * (h - bottom - top);
    let colors = ["#888888", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"24\" font-size=\"14\">{title}</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for exp in (min_x.floor() as i32)..=(max_x.ceil() as i32) {
        let n = 10usize.pow(exp.max(0) as u32);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">1e{exp}</text>",
            x(n),
            h - bottom + 18.0
        );
    }
    for i in 0..=4 {
        let v = max_y * f64::from(i) / 4.0;
        let label = if max_y >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.3}")
        };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            left - 6.0,
            y(v) + 4.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">rules</text>",
        (left + w - right) / 2.0,
        h - 12.0
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(n, v)| format!("{:.1},{:.1}", x(*n), y(*v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for (n, v) in points {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                x(*n),
                y(*v)
            );
        }
        let ly = top + 20.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            w - right + 12.0,
            ly,
            w - right + 30.0,
            ly + 11.0
        );
    }
    s.push_str("</svg>\n");
    s
}
