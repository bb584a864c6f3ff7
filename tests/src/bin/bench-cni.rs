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
use egress_deny_datapath::{
    netns::NetnsGuard,
    rules::{Action, RuleMaps},
};
use egress_deny_tests::{
    Netns, PinDir,
    bench::{machine, percentile, rule_mix, write_section},
    binary, require_root,
};
use serde_json::json;

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

fn main() -> Result<()> {
    require_root();
    let mut args = std::env::args().skip(1);
    let pods: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let rule_count: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let pins = PinDir::new()?;
    let mut maps = RuleMaps::open(&pins.layout)?;
    for (addr, len) in rule_mix(rule_count, 3) {
        maps.insert_v4(addr.to_be_bytes(), len, Action::Deny)?;
    }
    let state = tempfile::tempdir()?;
    let node = Netns::new("edbn")?;
    let conf = json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "egress-deny",
        "pinDir": pins.root(), "stateDir": state.path(), "log": { "target": "/dev/null" },
    });
    let mut rows = Vec::new();
    for mode in ["tcx", "netlink"] {
        let (mut add, mut del) = (Vec::new(), Vec::new());
        let mut namespaces = Vec::new();
        for i in 0..pods {
            // Set-up (not timed): a pod namespace and its veth, host side in the node.
            let pod = Netns::new("edbp")?;
            let host = format!("vb{mode}{i}");
            node.ip(&format!(
                "link add {host} type veth peer name eth0 netns {}",
                pod.name
            ))?;
            node.ip(&format!("link set {host} up"))?;
            let mut add_conf = conf.clone();
            add_conf["prevResult"] = json!({
                "cniVersion": "1.0.0",
                "interfaces": [{ "name": host }, { "name": "eth0", "sandbox": pod.path() }],
                "ips": [{ "address": format!("10.200.{}.{}/16", i / 250, i % 250 + 2), "interface": 1 }],
            });
            let netns = pod.path().display().to_string();
            let cid = format!("bench-{i}");
            let env = [
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", cid.as_str()),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/usr/lib/cni"),
            ];
            // The plugin runs where the runtime runs: in the node namespace.
            let _guard = NetnsGuard::enter(&node.path())?;
            add.push(exec(&env, &add_conf.to_string())?);
            namespaces.push((pod, cid, netns));
        }
        for (_, cid, netns) in &namespaces {
            let env = [
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", cid.as_str()),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/usr/lib/cni"),
            ];
            let _guard = NetnsGuard::enter(&node.path())?;
            del.push(exec(&env, &conf.to_string())?);
        }
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
    }
    let table = format!(
        "| command | attach | pods | p50 | p99 | max |\n|---|---|---:|---:|---:|---:|\n{}",
        rows.join("\n")
    );
    println!("{table}");
    let body = format!(
        "## CNI ADD/DEL latency\n\n\
         `cargo build --release --bins && cargo run --release -p egress-deny-tests --bin bench-cni` — {}.\n\n\
         The release plugin binary exec'd as a runtime does (fork/exec, stdin config, stdout\n\
         result) in a node namespace, for {pods} pods created beforehand (netns + veth, not\n\
         timed), with {rule_count} IPv4 rules in the pinned maps. Wall time of each exec.\n\n{table}\n\n\
         The TCX path is dominated by one kernel call: `BPF_LINK_CREATE` for TCX commits the\n\
         device's new program list with an RCU grace period (`synchronize_rcu`), ~15 ms on this\n\
         2-core VM (strace -T). The rule count does not matter: ADD never touches the maps.\n\
         The cls_bpf path (which first adds a clsact qdisc to the new veth) measured no better.\n\
         Both include the background kernel work of the namespace and veth created right before\n\
         each ADD, as on a node starting pods. Target p99 < 10 ms: missed.\n",
        machine()
    );
    write_section(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md")),
        "cni",
        &body,
    )?;
    Ok(())
}
