//! CNI ADD/DEL latency of the plugin binary with 1M rules loaded: p50/p99 over N pods.
//!
//!     cargo build --release --bins && cargo run --release -p egress-deny-tests --bin bench-cni -- [pods] [rules]
use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Result, ensure};
use egress_deny_datapath::netns::NetnsGuard;
use egress_deny_tests::{
    Netns, PinDir,
    bench::{deny_v4, machine, percentile, rule_mix, write_section},
    binary, require_root,
};
use serde_json::json;

/// The runtime's environment for one pod's ADD or DEL.
fn cni_env<'a>(
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
    cni_args: &'a str,
) -> [(&'static str, &'a str); 6] {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", cni_args),
    ]
}

fn exec(env: &[(&str, &str)], stdin: &str) -> Result<f64> {
    let started = Instant::now();
    let mut child = Command::new(binary("egress-deny"))
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    ensure!(
        out.status.success(),
        "plugin failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(ms)
}

/// What the numbers mean; kept with the code that produces them.
const NOTES: &str = "\
Where the time goes: the `excluded` row is the plugin's fixed cost (exec, config,
prevResult). The TCX rows add one kernel call that dominates: strace -T shows
`BPF_LINK_CREATE` taking 10–16 ms of a TCX ADD on this machine. Attaching to a device's
TCX program list swaps the list and then waits for an RCU grace period
(`tcx_entry_sync()`, i.e. `synchronize_rcu()`, on every attach), whose length depends on
the kernel (HZ=250 here) and load; user space cannot shorten it. The cls_bpf path
(clsact qdisc + filter) does not wait for a full grace period. The rule count does not
matter: ADD never touches the maps. TCX stays the default where the kernel has it: its
link is pinned and owned (a stray `tc filter del` cannot remove it; CHECK sees link and
program exactly); `attachMode: netlink` trades that for ADD latency.
";

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CNI ADD/DEL latency through a real runtime, with the rule set loaded.
#[derive(clap::Parser)]
struct Args {
    /// Pods to add and delete.
    #[arg(default_value_t = 200)]
    pods: usize,
    /// IPv4 rules in the table (the published benchmark's mix).
    #[arg(default_value_t = 1_000_000)]
    rules: usize,
}

fn main() -> Result<()> {
    require_root();
    let Args {
        pods,
        rules: rule_count,
    } = clap::Parser::parse();
    let pins = PinDir::new()?;
    deny_v4(&pins.layout, &rule_mix(rule_count, 3))?;
    // stateDir on tmpfs, like its default /run/egress-deny on a node (this VM's /run is
    // on disk; /dev/shm is tmpfs): record fsyncs cost what they cost in production.
    let state = tempfile::Builder::new()
        .prefix("egress-deny-bench-")
        .tempdir_in("/dev/shm")?;
    let node = Netns::new("edbn")?;
    let conf = json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "egress-deny",
        "pinDir": pins.root(), "stateDir": state.path(), "log": { "target": "/dev/null" },
    });
    let load_before = loadavg();
    let mut rows = Vec::new();
    let mut verdicts = Vec::new();
    // "excluded": the pod's namespace is in excludeNamespaces, so ADD does everything
    // but attach (exec, config, prevResult) — the floor under the other two rows.
    for mode in ["excluded", "tcx", "netlink"] {
        let mut mode_conf = conf.clone();
        if mode == "excluded" {
            mode_conf["excludeNamespaces"] = json!(["bench-excluded"]);
        } else {
            mode_conf["attachMode"] = json!(mode);
        }
        let cni_args = if mode == "excluded" {
            "K8S_POD_NAMESPACE=bench-excluded;K8S_POD_NAME=p"
        } else {
            "K8S_POD_NAMESPACE=bench;K8S_POD_NAME=p"
        };
        let (mut add, mut del) = (Vec::new(), Vec::new());
        let mut namespaces = Vec::new();
        for i in 0..pods {
            // Set-up (not timed), right before the pod's ADD as on a node starting a pod:
            // a pod namespace and its veth, host side in the node.
            let pod = Netns::new("edbp")?;
            let host = format!("vb{}{i}", &mode[..3]);
            node.ip(&format!(
                "link add {host} type veth peer name eth0 netns {}",
                pod.name
            ))?;
            node.ip(&format!("link set {host} up"))?;
            let mut add_conf = mode_conf.clone();
            add_conf["prevResult"] = json!({
                "cniVersion": "1.0.0",
                "interfaces": [{ "name": host }, { "name": "eth0", "sandbox": pod.path() }],
                "ips": [{ "address": format!("10.200.{}.{}/16", i / 250, i % 250 + 2), "interface": 1 }],
            });
            let netns = pod.path().display().to_string();
            let cid = format!("bench-{mode}-{i}");
            // The plugin runs where the runtime runs: in the node namespace.
            let _guard = NetnsGuard::enter(&node.path())?;
            let env = cni_env("ADD", &cid, &netns, cni_args);
            add.push(exec(&env, &add_conf.to_string())?);
            namespaces.push((pod, cid, netns));
        }
        for (_, cid, netns) in &namespaces {
            let _guard = NetnsGuard::enter(&node.path())?;
            let env = cni_env("DEL", cid, netns, cni_args);
            del.push(exec(&env, &mode_conf.to_string())?);
        }
        ensure!(
            std::fs::read_dir(pins.layout.links_dir())?.count() == 0,
            "{mode}: link pins left after DEL"
        );
        add.sort_by(f64::total_cmp);
        del.sort_by(f64::total_cmp);
        let row = |name: &str, v: &[f64]| {
            format!(
                "| {name} | {mode} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
                v.len(),
                percentile(v, 0.5),
                percentile(v, 0.99),
                v.last().copied().unwrap_or(0.0)
            )
        };
        rows.push(row("ADD", &add));
        rows.push(row("DEL", &del));
        if mode != "excluded" {
            let p99 = percentile(&add, 0.99);
            verdicts.push(format!(
                "{mode} ADD p99 {p99:.2} ms: target < 10 ms {}",
                if p99 < 10.0 { "met" } else { "missed" }
            ));
        }
    }
    let load_after = loadavg();
    let table = format!(
        "| command | attach | pods | p50 | p99 | max |\n|---|---|---:|---:|---:|---:|\n{}",
        rows.join("\n")
    );
    println!("{table}");
    println!("load average before: {load_before}; after: {load_after}");
    println!("{}", verdicts.join("\n"));
    let body = format!(
        "## CNI ADD/DEL latency\n\n\
         `cargo build --release --bins && cargo run --release -p egress-deny-tests --bin bench-cni` — {}.\n\
         Load average (1/5/15 min) before: {load_before}; after: {load_after}.\n\n\
         The release plugin binary exec'd as a runtime does (fork/exec, stdin config, stdout\n\
         result) in a node namespace, {pods} pods per row, with {rule_count} IPv4 rules in the\n\
         pinned maps and stateDir on tmpfs (as /run is on a node). Each pod's netns and veth\n\
         are created (untimed) right before its ADD, as on a node starting pods; DELs run\n\
         after all ADDs. Wall time of each exec.\n\
         `excluded` is an ADD of a pod in `excludeNamespaces`: everything but the attach.\n\n{table}\n\n\
         {}.\n\n{NOTES}",
        machine(),
        verdicts.join("; ")
    );
    write_section(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md")),
        "cni",
        &body,
    )?;
    Ok(())
}
