//! Packaging: manifests validate against the Kubernetes OpenAPI schemas offline and pass
//! a security scan; the container image is built here (FROM scratch, static binaries),
//! holds exactly what the manifests reference, and runs the installer the way the
//! DaemonSet does.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use egress_deny_tests::{installer::free_port, random_suffix, require_root, wait_until};
use serde_json::Value;

const VENV: &str = "/opt/egress-deny-venv/bin";

fn conf() -> PathBuf {
    // Canonical: checkov mishandles paths with "..".
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conf")
        .canonicalize()
        .expect("conf/")
}

fn k8s(name: &str) -> PathBuf {
    conf().join("kubernetes").join(name)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// YAML → JSON through the venv's PyYAML (a checkov dependency): one value per document.
fn yaml(path: &Path) -> Result<Vec<Value>> {
    let script =
        "import json,sys,yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let out = run(Command::new(format!("{VENV}/python3"))
        .args(["-c", script])
        .arg(path))?;
    Ok(serde_json::from_str(&out)?)
}

/// Manifests of built-in kinds (the PodMonitor is a CRD: no schema to check it against).
const CORE_MANIFESTS: [&str; 3] = [
    "daemonset.yaml",
    "rules-configmap.yaml",
    "uninstall-job.yaml",
];

#[test]
fn manifests_validate_against_kubernetes_schemas() -> Result<()> {
    for name in CORE_MANIFESTS {
        let out = run(Command::new(format!("{VENV}/kubernetes-validate"))
            .arg("--strict")
            .arg(k8s(name)))?;
        ensure!(out.contains("passed"), "{name}: {out}");
        ensure!(
            !out.contains("WARN") && !out.contains("ERROR"),
            "{name}: {out}"
        );
    }
    // The kustomization has no OpenAPI schema; check what it refers to instead.
    let kustomization = &yaml(&k8s("kustomization.yaml"))?[0];
    for resource in kustomization["resources"].as_array().context("resources")? {
        let file = resource.as_str().context("resource path")?;
        ensure!(k8s(file).is_file(), "kustomization lists missing {file}");
    }
    let ds = &yaml(&k8s("daemonset.yaml"))?[0];
    let env = &ds["spec"]["template"]["spec"]["containers"][0]["env"];
    let patches = kustomization["patches"][0]["patch"]
        .as_str()
        .context("patch")?;
    for (index, var) in [
        (2, "EGRESS_DENY_HOST_INTERFACES"),
        (3, "EGRESS_DENY_PROTECT"),
        (4, "EGRESS_DENY_EXCLUDE_NAMESPACES"),
    ] {
        ensure!(
            env[index]["name"] == var,
            "kustomization patch env/{index} is not {var}"
        );
        ensure!(
            patches.contains(&format!("/env/{index}/value")) && patches.contains(var),
            "{var} knob missing"
        );
    }
    ensure!(kustomization["images"][0]["name"] == "egress-deny");
    Ok(())
}

#[test]
fn manifests_pass_the_security_scan_with_every_skip_justified() -> Result<()> {
    let out = Command::new(format!("{VENV}/checkov"))
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "-o",
            "json",
            "-d",
        ])
        .arg(conf().join("kubernetes"))
        .output()?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("checkov output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let summary = &report["summary"];
    ensure!(
        summary["failed"] == 0 && summary["passed"].as_u64().unwrap_or(0) > 100,
        "checkov: {summary}"
    );
    for name in CORE_MANIFESTS {
        for doc in yaml(&k8s(name))? {
            let annotations = doc["metadata"]["annotations"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for (key, value) in annotations
                .iter()
                .filter(|(k, _)| k.starts_with("checkov.io/skip"))
            {
                let (check, reason) = value
                    .as_str()
                    .unwrap_or_default()
                    .split_once('=')
                    .unwrap_or_default();
                ensure!(
                    check.starts_with("CKV") && reason.len() > 20,
                    "{name}: {key} has no justification"
                );
            }
        }
    }
    Ok(())
}

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// Removes the image, containers and pin dir this test made.
struct PodmanGuard {
    image: String,
    containers: Vec<String>,
    pin_dir: PathBuf,
}

impl Drop for PodmanGuard {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman().args(["rm", "-f", "-t", "0", c]).output();
        }
        let _ = podman().args(["rmi", "-f", &self.image]).output();
        let _ = egress_deny_datapath::loader::unpin_all(
            &egress_deny_datapath::paths::PinLayout::new(&self.pin_dir),
        );
    }
}

fn http(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    Some((r.split_whitespace().nth(1)?.parse().ok()?, r))
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    unsafe { libc::getrlimit(resource, &mut limit) };
    limit.rlim_max
}

/// The DaemonSet asks for `seccompProfile: RuntimeDefault`. containerd's default profile
/// allows bpf(2) to containers holding CAP_BPF; podman 4.3's (Debian 12) only to
/// CAP_SYS_ADMIN. Derive podman's profile with containerd's rule for bpf, so the test
/// runs the capability set the manifest grants under the seccomp policy it gets.
fn runtime_default_seccomp(dir: &Path) -> Result<PathBuf> {
    let mut profile: Value =
        serde_json::from_slice(&std::fs::read("/usr/share/containers/seccomp.json")?)?;
    let rules = profile["syscalls"].as_array_mut().context("syscalls")?;
    for rule in rules.iter_mut() {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| n != "bpf");
        }
    }
    rules.retain(|r| r["names"].as_array().is_some_and(|n| !n.is_empty()));
    rules.push(serde_json::json!({
        "names": ["bpf"], "action": "SCMP_ACT_ALLOW", "args": [], "includes": { "caps": ["CAP_BPF"] }, "excludes": {}
    }));
    let path = dir.join("seccomp-runtime-default.json");
    std::fs::write(&path, serde_json::to_vec(&profile)?)?;
    Ok(path)
}

/// The static binaries tests/run.sh builds for the image.
fn static_binaries() -> Result<PathBuf> {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/x86_64-unknown-linux-gnu/release");
    for name in ["egress-deny", "egress-deny-installer"] {
        let path = dir.join(name);
        ensure!(
            path.is_file(),
            "{} missing: tests/run.sh builds it (see conf/Containerfile)",
            path.display()
        );
        let file = run(Command::new("file").arg(&path))?;
        ensure!(
            file.contains("statically linked") || file.contains("static-pie"),
            "{name} is not static: {file}"
        );
    }
    Ok(dir)
}

#[test]
fn image_runs_the_installer_as_the_daemonset_does() -> Result<()> {
    require_root();
    let binaries = static_binaries()?;
    let id = random_suffix();
    let mut guard = PodmanGuard {
        image: format!("localhost/egress-deny-test:{id}"),
        containers: Vec::new(),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/egress-deny-pkg-{id}")),
    };
    let context = tempfile::tempdir()?;
    for name in ["egress-deny", "egress-deny-installer"] {
        std::fs::copy(binaries.join(name), context.path().join(name))?;
    }
    run(podman()
        .args(["build", "--quiet", "-f"])
        .arg(conf().join("Containerfile"))
        .args(["-t", &guard.image])
        .arg(context.path()))?;

    // Exactly the two binaries the manifests use (entrypoint = the installer, plugin next to it).
    let probe = format!("egress-deny-probe-{id}");
    run(podman().args(["create", "--name", &probe, &guard.image]))?;
    guard.containers.push(probe.clone());
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
    let expected_files = [
        "usr",
        "usr/local",
        "usr/local/bin",
        "usr/local/bin/egress-deny",
        "usr/local/bin/egress-deny-installer",
    ];
    // podman adds empty mount points for /dev, /proc, /sys, /etc/{hosts,resolv.conf,…}.
    let ours: Vec<&String> = files.iter().filter(|f| f.starts_with("usr")).collect();
    ensure!(
        ours == expected_files.iter().collect::<Vec<_>>()
            || ours.iter().map(|s| s.as_str()).eq(expected_files),
        "image content: {files:?}"
    );
    let inspect: Value =
        serde_json::from_str(&run(podman().args(["image", "inspect", &guard.image]))?)?;
    ensure!(
        inspect[0]["Config"]["Entrypoint"]
            == serde_json::json!(["/usr/local/bin/egress-deny-installer"])
    );
    let ds = &yaml(&k8s("daemonset.yaml"))?[0];
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    ensure!(container["args"] == serde_json::json!(["run"]));

    // The DaemonSet's hostPaths recreated under a temp root, kubelet's ConfigMap layout.
    let root = tempfile::tempdir()?;
    let host = |p: &str| root.path().join(p.trim_start_matches('/'));
    let seccomp = runtime_default_seccomp(root.path())?;
    for dir in [
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/lib/cni",
        "/run/egress-deny",
        "/rules",
    ] {
        std::fs::create_dir_all(host(dir))?;
    }
    std::fs::write(
        host("/etc/cni/net.d/10-bridge.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
    )?;
    let publish = |content: &str| -> Result<()> {
        let stamp = format!("..{}", random_suffix());
        std::fs::create_dir(host("/rules").join(&stamp))?;
        std::fs::write(host("/rules").join(&stamp).join("base.txt"), content)?;
        let _ = std::os::unix::fs::symlink("..data/base.txt", host("/rules/base.txt"));
        std::os::unix::fs::symlink(&stamp, host("/rules/..data_tmp"))?;
        std::fs::rename(host("/rules/..data_tmp"), host("/rules/..data"))?;
        Ok(())
    };
    publish("198.51.100.0/24\n")?;

    let port = free_port();
    let mut env: Vec<String> = Vec::new();
    for var in container["env"].as_array().context("env")? {
        let (name, value) = (
            var["name"].as_str().unwrap_or_default(),
            var["value"].as_str().unwrap_or_default(),
        );
        let value = match name {
            // Differences from the DaemonSet, for a test on a shared machine: a loopback
            // port and no host interfaces (never touch this machine's uplink).
            "EGRESS_DENY_LISTEN" => format!("127.0.0.1:{port}"),
            "EGRESS_DENY_HOST_INTERFACES" => "none".into(),
            _ => value.to_owned(),
        };
        env.extend(["--env".into(), format!("{name}={value}")]);
    }
    env.extend([
        "--env".into(),
        format!("EGRESS_DENY_PIN_DIR={}", guard.pin_dir.display()),
    ]);
    // Explicit limits (podman needs them here), within this process's hard limits.
    let (nofile, nproc) = (
        hard_limit(libc::RLIMIT_NOFILE).min(65536),
        hard_limit(libc::RLIMIT_NPROC).min(4096),
    );
    let caps = container["securityContext"]["capabilities"]["add"]
        .as_array()
        .context("caps")?;
    let caps: Vec<String> = caps
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap_or_default()))
        .collect();
    let start = |name: &str| -> Result<()> {
        let mut cmd = podman();
        cmd.args([
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "all",
        ])
        .args(["--cap-add", &caps.join(",")])
        .args(["--security-opt", "no-new-privileges", "--security-opt"])
        .arg(format!("seccomp={}", seccomp.display()))
        .arg("--ulimit")
        .arg(format!("nofile={nofile}:{nofile}"))
        .arg("--ulimit")
        .arg(format!("nproc={nproc}:{nproc}"))
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/opt/cni/bin",
            host("/opt/cni/bin").display()
        ))
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/etc/cni/net.d",
            host("/etc/cni/net.d").display()
        ))
        .arg("--mount")
        .arg("type=bind,src=/sys/fs/bpf,dst=/sys/fs/bpf,bind-propagation=rslave")
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/var/lib/cni,ro=true",
            host("/var/lib/cni").display()
        ))
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/run/egress-deny",
            host("/run/egress-deny").display()
        ))
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/etc/egress-deny/rules,ro=true",
            host("/rules").display()
        ))
        .args(&env)
        .arg(&guard.image)
        .arg("run");
        run(&mut cmd)?;
        Ok(())
    };
    let first = format!("egress-deny-ds-{id}");
    start(&first)?;
    guard.containers.push(first.clone());
    let ready = || http(port, "/readyz").is_some_and(|(code, _)| code == 200);
    wait_until(
        "the containerized installer to be ready",
        Duration::from_secs(60),
        ready,
    )
    .inspect_err(|_| {
        let logs = podman().args(["logs", &first]).output();
        eprintln!(
            "{:?}",
            logs.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
    })?;

    // Installed like on a node: binary in the CNI bin dir, entry in the conflist.
    let installed = host("/opt/cni/bin/egress-deny");
    ensure!(
        std::fs::read(&installed)? == std::fs::read(binaries.join("egress-deny"))?,
        "plugin not installed"
    );
    let conflist: Value =
        serde_json::from_slice(&std::fs::read(host("/etc/cni/net.d/10-bridge.conflist"))?)?;
    ensure!(
        conflist["plugins"][1]["type"] == "egress-deny",
        "{conflist}"
    );
    ensure!(
        conflist["plugins"][1]["pinDir"] == serde_json::json!(guard.pin_dir),
        "{conflist}"
    );

    let lookup = |addr: &str| -> Result<String> {
        run(
            Command::new(egress_deny_tests::binary("egress-deny-installer"))
                .args(["lookup", "--pin-dir"])
                .arg(&guard.pin_dir)
                .arg(addr),
        )
    };
    ensure!(lookup("198.51.100.7")?.starts_with("198.51.100.7 deny 198.51.100.0/24"));
    // An edited ConfigMap is synced.
    publish("198.51.100.0/24\n203.0.113.0/24\n")?;
    wait_until(
        "the edited ConfigMap to be enforced",
        Duration::from_secs(20),
        || lookup("203.0.113.5").is_ok_and(|l| l.starts_with("203.0.113.5 deny 203.0.113.0/24")),
    )?;

    // Restart (as on a rolling update): enforcement stays throughout.
    run(podman().args(["stop", "-t", "10", &first]))?;
    ensure!(
        lookup("203.0.113.5")?.starts_with("203.0.113.5 deny"),
        "enforcement lost when the pod stopped"
    );
    let second = format!("egress-deny-ds2-{id}");
    start(&second)?;
    guard.containers.push(second.clone());
    wait_until(
        "the restarted installer to be ready",
        Duration::from_secs(60),
        ready,
    )?;
    let logs = run(podman().args(["logs", &second]))?;
    let logs = logs + &String::from_utf8_lossy(&podman().args(["logs", &second]).output()?.stderr);
    ensure!(logs.contains("reusing the pinned map"), "{logs}");
    ensure!(lookup("203.0.113.5")?.starts_with("203.0.113.5 deny"));
    Ok(())
}
