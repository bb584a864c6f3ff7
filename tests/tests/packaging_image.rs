//! Packaging, the image: built here (FROM scratch, static binaries), it holds exactly
//! what the manifests reference, and runs the installer the way the kubelet would run the
//! rendered DaemonSet: its image, args, env (envFrom included), capabilities, read-only
//! root, hostPath mounts with their propagation, the projected rules volume in kubelet's
//! `..data` layout, and host networking — the node being a private network namespace, so
//! the machine's own interfaces are never touched. At a million rules it fits the
//! DaemonSet's memory request and limit.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use egress_deny_tests::{
    Netns,
    kubelet::{Cleanup, Node, build_image, container_logs, podman},
    manifests::{
        configmap_files, container_env, find, listen_port, quantity, rendered_base, uninstall_job,
        yaml_file,
    },
    random_suffix, require_root, run_command, wait_until,
};
use serde_json::{Value, json};

/// A pod of the node: its own network namespace (where runtimes put them, so it
/// appears in the DaemonSet's /run/netns mount after the daemon started), a veth to the
/// node, and the runtime's CNI cache entry for it. No CNI plugin ran for it: it is a pod
/// that started while egress-deny was not installed yet.
struct Pod {
    netns: Netns,
    host_veth: String,
    name: String,
}

impl Pod {
    fn new(node: &Node) -> Result<Self> {
        let id = random_suffix();
        let netns = Netns::new("edpkg-pod")?;
        let host_veth = format!("edpkg{id}");
        node.netns.ip(&format!(
            "link add {host_veth} type veth peer name eth0 netns {}",
            netns.name
        ))?;
        node.netns
            .ip(&format!("addr add 10.99.0.1/30 dev {host_veth}"))?;
        node.netns.ip(&format!("link set {host_veth} up"))?;
        netns.ip("addr add 10.99.0.2/30 dev eth0")?;
        netns.ip("link set eth0 up")?;
        netns.ip("route add default via 10.99.0.1")?;
        let container_id = format!("{id}{}", "0".repeat(58));
        let name = format!("cart-{id}");
        let cached = json!({
            "kind": "cniCacheV1",
            "containerId": container_id,
            "config": "",
            "ifName": "eth0",
            "networkName": "k8s-pod-network",
            "cniArgs": [["K8S_POD_NAMESPACE", "shop"], ["K8S_POD_NAME", name]],
            "result": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    { "name": host_veth },
                    { "name": "eth0", "sandbox": netns.path() }
                ],
                "ips": [{ "address": "10.99.0.2/30", "interface": 1 }]
            }
        });
        let results = node.host("/var/lib/cni/results");
        std::fs::create_dir_all(&results)?;
        std::fs::write(
            results.join(format!("k8s-pod-network-{container_id}-eth0")),
            serde_json::to_vec(&cached)?,
        )?;
        Ok(Self {
            netns,
            host_veth,
            name,
        })
    }

    /// Pings from the pod; true when answered.
    fn ping(&self, to: &str, count: u32) -> bool {
        self.netns
            .exec(
                "ping",
                &[
                    "-n",
                    "-q",
                    "-c",
                    &count.to_string(),
                    "-i",
                    "0.2",
                    "-W",
                    "1",
                    to,
                ],
            )
            .is_ok()
    }
}

/// The denied-packets counter of one attachment, from `status` output.
fn denied_packets(status: &str, ifname: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.contains(&format!(" {ifname} ")))?;
    line.split("denied ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn image_runs_the_installer_as_the_daemonset_does() -> Result<()> {
    require_root();
    let id = random_suffix();
    let mut cleanup = Cleanup::new("egress-deny-test", "egress-deny-pkg", &id);
    let binaries = build_image(&cleanup)?;
    let docs = rendered_base()?;
    let ds = find(&docs, "DaemonSet", "egress-deny")?;
    let pod_spec = &ds["spec"]["template"]["spec"];
    let container = &pod_spec["containers"][0];

    // The image holds exactly the two binaries: the entrypoint the DaemonSet relies on
    // (it sets only args) and the plugin next to it, which the installer copies to the
    // host.
    let probe = format!("egress-deny-probe-{id}");
    run_command(podman().args(["create", "--name", &probe, &cleanup.image]))?;
    cleanup.containers.push(probe.clone());
    let export = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "podman --runtime runc --cgroup-manager cgroupfs export {probe} | tar -t"
        ))
        .output()?;
    let mut files: Vec<String> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| l.trim_end_matches('/').to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    files.sort();
    // podman adds empty mount points (/dev, /proc, /sys, /etc/hosts, …) to a container.
    let ours: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| {
            !["dev", "proc", "sys", "etc", "run"]
                .iter()
                .any(|m| f == m || f.starts_with(&format!("{m}/")))
        })
        .collect();
    ensure!(
        ours == [
            "usr",
            "usr/local",
            "usr/local/bin",
            "usr/local/bin/egress-deny",
            "usr/local/bin/egress-deny-installer"
        ],
        "image content: {files:?}"
    );
    let inspect: Value = serde_json::from_str(&run_command(podman().args([
        "image",
        "inspect",
        &cleanup.image,
    ]))?)?;
    ensure!(inspect[0]["Config"]["Entrypoint"] == json!(["/usr/local/bin/egress-deny-installer"]));
    ensure!(container["command"].is_null() && container["args"] == json!(["run"]));
    for m in container["volumeMounts"].as_array().context("mounts")? {
        let path = m["mountPath"].as_str().unwrap_or_default();
        ensure!(!path.starts_with("/usr"), "{path} would hide the binaries");
    }

    let node = Node::new(&cleanup.pin_dir)?;
    let env = container_env(container, &docs)?;
    let port = listen_port(&env)?;
    let start = |name: &str, cleanup: &mut Cleanup| -> Result<()> {
        let mut args = node.podman_args(pod_spec, &docs, &cleanup.image)?;
        args.splice(1..1, ["--name".to_owned(), name.to_owned()]);
        run_command(podman().args(&args))?;
        cleanup.containers.push(name.to_owned());
        wait_until(
            "the installer to be ready (/readyz)",
            Duration::from_secs(60),
            || {
                node.http(port, "/readyz")
                    .is_some_and(|(code, _)| code == 200)
            },
        )
        .inspect_err(|_| eprintln!("{}", container_logs(name)))?;
        let (code, _) = node.http(port, "/healthz").context("/healthz")?;
        ensure!(code == 200, "/healthz {code}");
        Ok(())
    };
    let first = format!("egress-deny-ds-{id}");
    start(&first, &mut cleanup)?;

    // Installed like on a node: the plugin in the CNI bin dir, the entry in the conflist.
    ensure!(
        std::fs::read(node.host("/opt/cni/bin/egress-deny"))?
            == std::fs::read(binaries.join("egress-deny"))?,
        "plugin not installed"
    );
    let conflist: Value = serde_json::from_slice(&std::fs::read(
        node.host("/etc/cni/net.d/10-bridge.conflist"),
    )?)?;
    ensure!(
        conflist["plugins"][1]["type"] == "egress-deny",
        "{conflist}"
    );
    ensure!(
        conflist["plugins"][1]["pinDir"] == json!(cleanup.pin_dir),
        "{conflist}"
    );
    let metrics = node.http(port, "/metrics").context("/metrics")?.1;
    ensure!(metrics.contains("egress_deny_ready 1"), "{metrics}");

    // The troubleshooting commands of conf/README.md, run as `kubectl exec` would.
    let exec = |name: &str, args: &[&str]| -> Result<String> {
        run_command(
            podman()
                .args(["exec", name, "/usr/local/bin/egress-deny-installer"])
                .args(args),
        )
    };
    // The example ConfigMap's rules.
    ensure!(
        exec(&first, &["lookup", "198.51.100.7"])?.starts_with("198.51.100.7 deny 198.51.100.0/24")
    );
    ensure!(
        exec(&first, &["lookup", "203.0.113.200"])?
            .starts_with("203.0.113.200 allow 203.0.113.128/25")
    );
    // Host networking is filtered: `auto` found the node's default-route uplink.
    let status = exec(&first, &["status"])?;
    ensure!(status.contains("uplink0"), "{status}");

    // A pod that started before egress-deny (no plugin ran for it) is found in the
    // runtime's cache and attached: this needs the /run/netns mount with HostToContainer
    // propagation (it appeared after the daemon started) and setns (SYS_ADMIN).
    let pod = Pod::new(&node)?;
    wait_until(
        "the pre-existing pod to be repaired",
        Duration::from_secs(20),
        || exec(&first, &["status"]).is_ok_and(|s| s.contains(&format!("pod shop/{}", pod.name))),
    )
    .inspect_err(|_| eprintln!("{}", container_logs(&first)))?;
    // Its traffic: allowed destinations pass, denied ones are dropped and counted.
    ensure!(
        pod.ping("10.99.0.1", 1),
        "allowed traffic from the pod is dropped"
    );
    ensure!(
        pod.ping("192.0.2.9", 1),
        "allowed traffic from the pod is dropped"
    );
    ensure!(!pod.ping("198.51.100.7", 3), "denied traffic passes");
    let denied =
        |name: &str| denied_packets(&exec(name, &["status"]).unwrap_or_default(), &pod.host_veth);
    ensure!(denied(&first) == Some(3), "{}", exec(&first, &["status"])?);

    // An edited ConfigMap (kubelet swaps ..data) is synced.
    let rules_cm = find(&docs, "ConfigMap", "egress-deny-rules")?;
    let mut files = configmap_files(rules_cm)?;
    files[0].1.extend_from_slice(b"192.0.2.0/24\n");
    node.publish_rules(&files)?;
    wait_until(
        "the edited ConfigMap to be enforced",
        Duration::from_secs(20),
        || {
            exec(&first, &["lookup", "192.0.2.9"])
                .is_ok_and(|l| l.starts_with("192.0.2.9 deny 192.0.2.0/24"))
        },
    )?;

    // Rolling update: SIGTERM ends the daemon well within the grace period, cleanly
    // (not killed), and leaves enforcement in place while no daemon runs.
    let grace = pod_spec["terminationGracePeriodSeconds"]
        .as_u64()
        .context("grace")?;
    let stopping = Instant::now();
    run_command(podman().args(["stop", "-t", &grace.to_string(), &first]))?;
    let stop_time = stopping.elapsed();
    ensure!(
        stop_time < Duration::from_secs(grace) / 2,
        "SIGTERM took {stop_time:?}"
    );
    let state: Value = serde_json::from_str(&run_command(podman().args(["inspect", &first]))?)?;
    ensure!(
        state[0]["State"]["ExitCode"] == 0,
        "exit: {}",
        state[0]["State"]
    );
    ensure!(
        !pod.ping("192.0.2.9", 2),
        "enforcement lost when the daemon stopped"
    );
    ensure!(pod.ping("10.99.0.1", 1));

    let second = format!("egress-deny-ds2-{id}");
    start(&second, &mut cleanup)?;
    let logs = container_logs(&second);
    ensure!(logs.contains("reusing the pinned map"), "{logs}");
    // The pod's attachment survived both daemons, and still drops.
    let before = denied(&second).context("the pod's attachment is gone")?;
    ensure!(
        !pod.ping("198.51.100.7", 1),
        "denied traffic passes after the restart"
    );
    ensure!(pod.ping("10.99.0.1", 1));
    ensure!(
        denied(&second) == Some(before + 1),
        "{}",
        exec(&second, &["status"])?
    );
    ensure!(exec(&second, &["lookup", "192.0.2.9"])?.starts_with("192.0.2.9 deny"));
    run_command(podman().args(["stop", "-t", &grace.to_string(), &second]))?;

    // Uninstall: the Job of uninstall-job.yaml on this node.
    let job = &yaml_file(&uninstall_job())?[0];
    let job_spec = &job["spec"]["template"]["spec"];
    ensure!(
        job_spec["hostNetwork"] == true
            && job_spec["containers"][0]["args"] == json!(["uninstall"])
    );
    let mut args = node.podman_args(job_spec, &[], &cleanup.image)?;
    let uninstall = format!("egress-deny-uninstall-{id}");
    args.splice(1..1, ["--name".to_owned(), uninstall.clone()]);
    cleanup.containers.push(uninstall.clone());
    run_command(podman().args(&args))?;
    let code = run_command(podman().args(["wait", &uninstall]))?;
    ensure!(
        code.trim() == "0",
        "uninstall exited {code}: {}",
        container_logs(&uninstall)
    );
    let logs = container_logs(&uninstall);
    ensure!(
        !logs.contains("WARN") && !logs.contains("ERROR"),
        "uninstall: {logs}"
    );
    let conflist: Value = serde_json::from_slice(&std::fs::read(
        node.host("/etc/cni/net.d/10-bridge.conflist"),
    )?)?;
    ensure!(
        conflist["plugins"].as_array().map(Vec::len) == Some(1),
        "{conflist}"
    );
    ensure!(
        !node.host("/opt/cni/bin/egress-deny").exists(),
        "plugin binary left"
    );
    let left: Vec<_> = std::fs::read_dir(&cleanup.pin_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "pins left: {left:?}");
    // Nothing filters the pod any more.
    ensure!(
        pod.ping("198.51.100.7", 1),
        "the pod is still filtered after uninstall"
    );
    let tc = node
        .netns
        .exec("bpftool", &["-j", "net", "show", "dev", &pod.host_veth])?;
    let tc: Value = serde_json::from_str(&tc)?;
    ensure!(
        tc[0]["tc"].as_array().is_some_and(Vec::is_empty),
        "left attached: {tc}"
    );
    Ok(())
}

/// Memory of a container's cgroup: (current, peak) bytes. cgroup v1 (this machine kind)
/// or v2. Kernel memory (the BPF maps) is charged there too.
fn container_memory(name: &str) -> Result<(u64, u64)> {
    let pid = run_command(podman().args(["inspect", "--format", "{{.State.Pid}}", name]))?;
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", pid.trim()))?;
    let read = |path: PathBuf| -> Result<u64> {
        Ok(std::fs::read_to_string(&path)
            .with_context(|| path.display().to_string())?
            .trim()
            .parse()?)
    };
    if let Some(line) = cgroups
        .lines()
        .find(|l| l.split(':').nth(1) == Some("memory"))
    {
        let dir = Path::new("/sys/fs/cgroup/memory").join(
            line.splitn(3, ':')
                .nth(2)
                .context("cgroup")?
                .trim_start_matches('/'),
        );
        return Ok((
            read(dir.join("memory.usage_in_bytes"))?,
            read(dir.join("memory.max_usage_in_bytes"))?,
        ));
    }
    let line = cgroups
        .lines()
        .find(|l| l.starts_with("0::"))
        .context("no memory cgroup")?;
    let dir = Path::new("/sys/fs/cgroup").join(line[3..].trim_start_matches('/'));
    Ok((
        read(dir.join("memory.current"))?,
        read(dir.join("memory.peak"))?,
    ))
}

/// The DaemonSet's memory request and limit hold a million rules (the published
/// benchmark's mix: 89% /32, 10% /24, 1% /16), shipped as the large-lists pattern does
/// (gzip keys of several ConfigMaps, each under 1 MiB): the pod's cgroup, which pays for
/// the daemon and for the kernel memory of the maps it fills, peaks under the limit with
/// headroom, and settles under the request.
#[test]
fn memory_at_a_million_rules_fits_the_limit() -> Result<()> {
    use rand::{Rng, SeedableRng};
    require_root();
    let id = random_suffix();
    let mut cleanup = Cleanup::new("egress-deny-test-mem", "egress-deny-pkgmem", &id);
    build_image(&cleanup)?;
    let docs = rendered_base()?;
    let ds = find(&docs, "DaemonSet", "egress-deny")?;
    let pod_spec = &ds["spec"]["template"]["spec"];
    let container = &pod_spec["containers"][0];
    let limit = quantity(
        container["resources"]["limits"]["memory"]
            .as_str()
            .context("limit")?,
    )?;
    let request = quantity(
        container["resources"]["requests"]["memory"]
            .as_str()
            .context("request")?,
    )?;

    const RULES: usize = 1_000_000;
    const PER_CONFIGMAP: usize = 150_000; // conf/examples/large-lists: split -l 150000
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut lines = Vec::with_capacity(RULES);
    while lines.len() < RULES {
        let a: u8 = rng.random_range(1..=223);
        if a == 127 || a == 10 || a == 100 {
            continue; // keep clear of the node's own addresses in this test
        }
        let (b, c, d): (u8, u8, u8) = (rng.random(), rng.random(), rng.random());
        lines.push(match rng.random_range(0..100) {
            0..89 => format!("{a}.{b}.{c}.{d}"),
            89..99 => format!("{a}.{b}.{c}.0/24"),
            _ => format!("{a}.{b}.0.0/16"),
        });
    }
    let probe_rule = lines[RULES / 2].clone();
    let mut files = Vec::new();
    for (i, chunk) in lines.chunks(PER_CONFIGMAP).enumerate() {
        let text = chunk.join("\n") + "\n";
        let gz = {
            let mut child = Command::new("gzip")
                .arg("-9n")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut stdin = child.stdin.take().context("stdin")?;
            let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
            let out = child.wait_with_output()?;
            writer.join().expect("gzip writer")?;
            out.stdout
        };
        ensure!(
            gz.len() < 1 << 20,
            "part {i}: {} bytes gzipped: over a ConfigMap's 1 MiB",
            gz.len()
        );
        files.push((format!("feed-{i:02}.txt.gz"), gz));
    }

    let node = Node::new(&cleanup.pin_dir)?;
    // The kubelet's projection of those ConfigMaps (podman_args keeps what is published).
    node.publish_rules(&files)?;
    let env = container_env(container, &docs)?;
    let port = listen_port(&env)?;
    let name = format!("egress-deny-mem-{id}");
    let mut args = node.podman_args(pod_spec, &docs, &cleanup.image)?;
    args.splice(1..1, ["--name".to_owned(), name.clone()]);
    let started = Instant::now();
    run_command(podman().args(&args))?;
    cleanup.containers.push(name.clone());
    // Within the startup probe's budget.
    let startup = &container["startupProbe"];
    let budget = startup["periodSeconds"].as_u64().context("period")?
        * startup["failureThreshold"].as_u64().context("threshold")?;
    wait_until(
        "a million rules loaded (/readyz)",
        Duration::from_secs(budget),
        || {
            node.http(port, "/readyz")
                .is_some_and(|(code, _)| code == 200)
        },
    )
    .inspect_err(|_| eprintln!("{}", container_logs(&name)))?;
    let ready_after = started.elapsed();
    let lookup = run_command(
        podman()
            .args([
                "exec",
                &name,
                "/usr/local/bin/egress-deny-installer",
                "lookup",
            ])
            .arg(probe_rule.split('/').next().context("rule")?),
    )?;
    ensure!(lookup.contains(" deny "), "{lookup}");
    let status = run_command(podman().args([
        "exec",
        &name,
        "/usr/local/bin/egress-deny-installer",
        "status",
    ]))?;
    let (current, peak) = container_memory(&name)?;
    let state: Value = serde_json::from_str(&run_command(podman().args(["inspect", &name]))?)?;
    ensure!(state[0]["State"]["OOMKilled"] == false && state[0]["State"]["Running"] == true);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "1M rules: ready after {ready_after:.1?}; pod memory {:.0} MiB now, {:.0} MiB peak (request {:.0} MiB, limit {:.0} MiB)\n{status}",
        mib(current),
        mib(peak),
        mib(request),
        mib(limit)
    );
    // The tables' kernel memory is charged to the pod: a current usage below the IPv4
    // table's own size (≈17 MiB at 1M rules, from `status`) would mean it was not, and
    // the sizing rationale (conf/README.md) would be wrong.
    let table_mib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("IPv4 table: "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|l| l.strip_suffix(" MiB of kernel memory"))
        .and_then(|l| l.parse().ok())
        .context("IPv4 table size in status")?;
    // The daemon's own resident memory, from the host (the container's main process).
    let pid = run_command(podman().args(["inspect", "--format", "{{.State.Pid}}", &name]))?;
    let rss_kib: f64 = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    ensure!(
        mib(current) > rss_kib / 1024.0 + table_mib * 0.9,
        "pod memory {:.0} MiB, daemon RSS {:.0} MiB, table {table_mib} MiB: table memory not charged to the pod?",
        mib(current),
        rss_kib / 1024.0
    );
    ensure!(
        peak > 20 << 20,
        "peak {:.0} MiB: map memory not charged to the pod?",
        mib(peak)
    );
    ensure!(
        peak < limit * 3 / 4,
        "peak {:.0} MiB leaves under 25% headroom to the {:.0} MiB limit",
        mib(peak),
        mib(limit)
    );
    ensure!(
        current < request,
        "steady {:.0} MiB over the {:.0} MiB request",
        mib(current),
        mib(request)
    );
    Ok(())
}
