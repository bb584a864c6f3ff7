//! Packaging: the manifests (and the rendered kustomizations) validate against the
//! Kubernetes OpenAPI schemas offline and pass a security scan; the container image is
//! built here (FROM scratch, static binaries), holds exactly what the manifests
//! reference, and runs the installer the way the kubelet would run the rendered
//! DaemonSet: its image, args, env (envFrom included), capabilities, read-only root,
//! hostPath mounts with their propagation, the projected rules volume in kubelet's
//! `..data` layout, and host networking — the node being a private network namespace,
//! so the machine's own interfaces are never touched.
use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use egress_deny_tests::{Netns, random_suffix, require_root, wait_until};
use serde_json::{Value, json};

const VENV: &str = "/opt/egress-deny-venv/bin";

fn conf() -> PathBuf {
    // Canonical: checkov mishandles paths with "..".
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conf")
        .canonicalize()
        .expect("conf/")
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

fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<String> {
    Ok(String::from_utf8_lossy(&egress_deny_tests::run_with_input(cmd, input)?).into_owned())
}

/// YAML → JSON through the venv's PyYAML (a checkov dependency): one value per document.
fn yaml(text: &str) -> Result<Vec<Value>> {
    let script = "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))";
    let out = run_with_stdin(
        Command::new(format!("{VENV}/python3")).args(["-c", script]),
        text.as_bytes(),
    )?;
    Ok(serde_json::from_str(&out)?)
}

fn yaml_file(path: &Path) -> Result<Vec<Value>> {
    yaml(&std::fs::read_to_string(path)?)
}

/// `kubectl kustomize` (kubectl ships with this machine kind; Debian's kubernetes-client
/// 1.20 is too old for the `patches` field).
fn render(dir: &Path) -> Result<String> {
    run(Command::new("kubectl").arg("kustomize").arg(dir))
}

fn base_dir() -> PathBuf {
    conf().join("kubernetes")
}

fn large_lists_dir() -> PathBuf {
    conf().join("examples/large-lists")
}

fn uninstall_job() -> PathBuf {
    base_dir().join("uninstall-job.yaml")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

/// A ConfigMap's files as the kubelet writes them: `data` as text, `binaryData` decoded.
fn configmap_files(cm: &Value) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for (key, value) in cm["data"].as_object().into_iter().flatten() {
        files.push((
            key.clone(),
            value.as_str().context("data")?.as_bytes().to_vec(),
        ));
    }
    for (key, value) in cm["binaryData"].as_object().into_iter().flatten() {
        let text: String = value
            .as_str()
            .context("binaryData")?
            .split_whitespace()
            .collect();
        let bytes = egress_deny_tests::base64_decode(&text)?;
        files.push((key.clone(), bytes));
    }
    Ok(files)
}

/// The env of a container as the kubelet builds it: `envFrom` ConfigMaps, then `env`.
fn container_env(container: &Value, docs: &[Value]) -> Result<Vec<(String, String)>> {
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"]
            .as_str()
            .context("only configMapRef envFrom is emulated")?;
        let cm = find(docs, "ConfigMap", name)?;
        for (k, v) in cm["data"].as_object().into_iter().flatten() {
            env.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        env.insert(
            var["name"].as_str().context("env name")?.to_owned(),
            var["value"]
                .as_str()
                .context("only literal env is emulated")?
                .to_owned(),
        );
    }
    Ok(env.into_iter().collect())
}

fn listen_port(env: &[(String, String)]) -> Result<u16> {
    let listen = &env
        .iter()
        .find(|(k, _)| k == "EGRESS_DENY_LISTEN")
        .context("EGRESS_DENY_LISTEN")?
        .1;
    Ok(listen.rsplit_once(':').context("listen")?.1.parse()?)
}

#[test]
fn manifests_validate_against_kubernetes_schemas() -> Result<()> {
    let validate = |what: &str, text: &str| -> Result<()> {
        let out = run_with_stdin(
            Command::new(format!("{VENV}/kubernetes-validate")).args(["--strict", "-"]),
            text.as_bytes(),
        )
        .with_context(|| what.to_owned())?;
        let passed = out.matches("passed").count();
        ensure!(passed > 0, "{what}: {out}");
        ensure!(
            !out.contains("WARN") && !out.contains("ERROR") && !out.contains("failed"),
            "{what}: {out}"
        );
        Ok(())
    };
    let base = render(&base_dir())?;
    let large = render(&large_lists_dir())?;
    validate("rendered conf/kubernetes", &base)?;
    validate("rendered conf/examples/large-lists", &large)?;
    validate(
        "uninstall-job.yaml",
        &std::fs::read_to_string(uninstall_job())?,
    )?;
    // Each source file of built-in kinds on its own too (the PodMonitor is a CRD of the
    // Prometheus Operator: kubernetes-validate has no schema for it, checked below).
    for name in ["daemonset.yaml", "rules-configmap.yaml"] {
        validate(name, &std::fs::read_to_string(base_dir().join(name))?)?;
    }
    let podmonitor = &yaml_file(&base_dir().join("podmonitor.yaml"))?[0];
    ensure!(podmonitor["apiVersion"] == "monitoring.coreos.com/v1");
    ensure!(podmonitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics");

    // What the rendered base holds: the DaemonSet, its rules and its settings, all in
    // kube-system, each reference resolved.
    let docs = yaml(&base)?;
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    ensure!(docs.len() == 3, "rendered base: {kinds:?}");
    for doc in &docs {
        ensure!(doc["metadata"]["namespace"] == "kube-system", "{kinds:?}");
    }
    let ds = find(&docs, "DaemonSet", "egress-deny")?;
    let spec = &ds["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    ensure!(container["image"] == "egress-deny:0.1.0", "image knob");
    // Settings: every knob is there and the listen port agrees with the declared port
    // that the probes and Prometheus use.
    let env = container_env(container, &docs)?;
    for knob in [
        "EGRESS_DENY_LISTEN",
        "EGRESS_DENY_HOST_INTERFACES",
        "EGRESS_DENY_PROTECT",
        "EGRESS_DENY_EXCLUDE_NAMESPACES",
        "EGRESS_DENY_RULES_DIR",
    ] {
        ensure!(
            env.iter().any(|(k, _)| k == knob),
            "{knob} not set: {env:?}"
        );
    }
    let port = listen_port(&env)?;
    ensure!(
        container["ports"][0]["containerPort"] == port
            && container["ports"][0]["name"] == "metrics"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        ensure!(container[probe]["httpGet"]["port"] == "metrics", "{probe}");
    }
    ensure!(container["readinessProbe"]["httpGet"]["path"] == "/readyz");
    ensure!(container["livenessProbe"]["httpGet"]["path"] == "/healthz");
    // The contract of the issue.
    ensure!(spec["priorityClassName"] == "system-node-critical");
    ensure!(spec["hostNetwork"] == true);
    ensure!(spec["automountServiceAccountToken"] == false);
    ensure!(spec["tolerations"] == json!([{ "operator": "Exists" }]));
    ensure!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1);
    let security = &container["securityContext"];
    ensure!(security["privileged"] == false && security["readOnlyRootFilesystem"] == true);
    ensure!(security["capabilities"]["drop"] == json!(["ALL"]));
    let host_paths: Vec<&str> = spec["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for path in [
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/sys/fs/bpf",
        "/var/lib/cni",
        "/run/egress-deny",
        "/run/netns",
    ] {
        ensure!(host_paths.contains(&path), "hostPath {path} missing");
    }
    let rules_env = &env
        .iter()
        .find(|(k, _)| k == "EGRESS_DENY_RULES_DIR")
        .context("rules")?
        .1;
    ensure!(
        container["volumeMounts"]
            .as_array()
            .context("mounts")?
            .iter()
            .any(|m| m["name"] == "rules" && m["mountPath"] == rules_env.as_str()),
        "the rules volume is not mounted at EGRESS_DENY_RULES_DIR"
    );

    // The large-lists overlay: every generated ConfigMap is one source of the projected
    // rules volume, stays under the 1 MiB ConfigMap limit, and its .gz keys are binaryData
    // that decompress to rule lines.
    let docs = yaml(&large)?;
    let ds = find(&docs, "DaemonSet", "egress-deny")?;
    let rules = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .find(|v| v["name"] == "rules")
        .context("rules volume")?;
    let sources: Vec<&str> = rules["projected"]["sources"]
        .as_array()
        .context("sources")?
        .iter()
        .filter_map(|s| s["configMap"]["name"].as_str())
        .collect();
    let feeds: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap" && d["binaryData"].is_object())
        .collect();
    ensure!(
        feeds.len() >= 2,
        "large-lists: {} gzip ConfigMaps",
        feeds.len()
    );
    for cm in feeds {
        let name = cm["metadata"]["name"].as_str().context("name")?;
        ensure!(
            sources.contains(&name),
            "{name} is not in the projected rules volume: {sources:?}"
        );
        let files = configmap_files(cm)?;
        let size: usize = files.iter().map(|(_, b)| b.len()).sum();
        ensure!(size < 1 << 20, "{name}: {size} bytes");
        for (key, bytes) in files {
            ensure!(key.ends_with(".gz"), "{name}/{key}");
            let mut text = String::new();
            std::io::Read::read_to_string(
                &mut flate2::read::GzDecoder::new(&bytes[..]),
                &mut text,
            )?;
            ensure!(
                text.lines().any(|l| l.contains('/')),
                "{name}/{key}: {text}"
            );
        }
    }
    Ok(())
}

#[test]
fn manifests_pass_the_security_scan_with_every_skip_justified() -> Result<()> {
    // What is applied (the rendered kustomizations) plus the Job and the PodMonitor.
    // Not a hidden directory (tempfile's default ".tmp…"): checkov skips those.
    let dir = tempfile::Builder::new()
        .prefix("egress-deny-checkov-")
        .tempdir()?;
    std::fs::write(dir.path().join("base.yaml"), render(&base_dir())?)?;
    std::fs::write(
        dir.path().join("large-lists.yaml"),
        render(&large_lists_dir())?,
    )?;
    for name in ["uninstall-job.yaml", "podmonitor.yaml"] {
        std::fs::copy(base_dir().join(name), dir.path().join(name))?;
    }
    let out = Command::new(format!("{VENV}/checkov"))
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "-o",
            "json",
            "-d",
        ])
        .arg(dir.path())
        .output()?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("checkov output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let summary = &report["summary"];
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| format!("{} {} {}", c["check_id"], c["resource"], c["file_path"]))
        .collect();
    ensure!(summary["failed"] == 0, "checkov: {summary} {failed:#?}");
    ensure!(
        summary["passed"].as_u64().unwrap_or(0) > 150,
        "checkov scanned too little: {summary}"
    );
    // Every skip carries a reason, and names a check that would otherwise fail (a skip
    // of a check that passes anyway is noise).
    let skipped = report["results"]["skipped_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(!skipped.is_empty(), "checkov reported no skips");
    for entry in std::fs::read_dir(dir.path())? {
        for doc in yaml_file(&entry?.path())? {
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
                    check.starts_with("CKV") && reason.len() > 30,
                    "{}: {key} has no justification",
                    doc["metadata"]["name"]
                );
                ensure!(
                    skipped.iter().any(|s| s["check_id"] == check),
                    "{}: skip of {check}, which checkov does not report as skipped",
                    doc["metadata"]["name"]
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The image, run as the kubelet runs the DaemonSet.

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// Removes the containers, image, pins and network namespaces a test made.
struct Cleanup {
    image: String,
    containers: Vec<String>,
    pin_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman().args(["rm", "-f", "-t", "0", c]).output();
        }
        let _ = podman().args(["rmi", "-f", &self.image]).output();
        let _ = egress_deny_datapath::loader::unpin_all(
            &egress_deny_datapath::paths::PinLayout::new(&self.pin_dir),
        );
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
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

/// The static binaries tests/run.sh builds for the image (see conf/Containerfile).
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
        // Runs on any host: no interpreter, no shared library.
        let ldd = Command::new("ldd").arg(&path).output()?;
        let ldd = String::from_utf8_lossy(&ldd.stdout).into_owned()
            + &String::from_utf8_lossy(&ldd.stderr);
        ensure!(
            ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
            "{name}: {ldd}"
        );
    }
    Ok(dir)
}

/// Builds the image from conf/Containerfile exactly as its header says.
fn build_image(cleanup: &Cleanup) -> Result<PathBuf> {
    let binaries = static_binaries()?;
    let context = tempfile::tempdir()?;
    for name in ["egress-deny", "egress-deny-installer"] {
        std::fs::copy(binaries.join(name), context.path().join(name))?;
    }
    run(podman()
        .args(["build", "--quiet", "-f"])
        .arg(conf().join("Containerfile"))
        .args(["-t", &cleanup.image])
        .arg(context.path()))?;
    Ok(binaries)
}

/// A node: a private network namespace with an uplink and a default route (so
/// `EGRESS_DENY_HOST_INTERFACES=auto` finds it), and a temp dir standing for its root
/// filesystem's hostPaths.
struct Node {
    netns: Netns,
    root: tempfile::TempDir,
    pin_dir: PathBuf,
    kubelet_rules: PathBuf,
}

impl Node {
    fn new(pin_dir: &Path) -> Result<Self> {
        let netns = Netns::new("edpkg-node")?;
        // A veth pair inside the node (the dummy driver may not be available).
        netns.ip("link add uplink0 type veth peer name uplink0-peer")?;
        netns.ip("link set uplink0-peer up")?;
        netns.ip("addr add 100.64.0.1/24 dev uplink0")?;
        // Destinations the rules deny, local to the node: a pod's ping to them is
        // answered exactly when nothing filters it.
        netns.ip("addr add 198.51.100.7/32 dev uplink0")?;
        netns.ip("addr add 192.0.2.9/32 dev uplink0")?;
        netns.ip("link set uplink0 up")?;
        netns.ip("route add default via 100.64.0.254 dev uplink0")?;
        let root = tempfile::tempdir()?;
        let kubelet_rules = root.path().join("var/lib/kubelet/pods/uid/volumes/rules");
        std::fs::create_dir_all(&kubelet_rules)?;
        let node = Self {
            netns,
            root,
            pin_dir: pin_dir.to_owned(),
            kubelet_rules,
        };
        std::fs::create_dir_all(node.host("/etc/cni/net.d"))?;
        // The primary CNI's conflist, as a node has it before egress-deny.
        std::fs::write(
            node.host("/etc/cni/net.d/10-bridge.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge","bridge":"cni0"}]}"#,
        )?;
        Ok(node)
    }

    /// Where a hostPath lives: bpffs and the netns directory are the machine's own
    /// (private names inside them), the rest is under the temp root.
    fn host_path(&self, path: &str) -> PathBuf {
        match path {
            "/sys/fs/bpf" | "/run/netns" => PathBuf::from(path),
            _ => self.host(path),
        }
    }

    fn host(&self, path: &str) -> PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    /// Publishes the rules volume as the kubelet does: files in a timestamped hidden
    /// dir, `..data` swapped atomically, every key a symlink through `..data`.
    fn publish_rules(&self, files: &[(String, Vec<u8>)]) -> Result<()> {
        let dir = &self.kubelet_rules;
        let stamp = format!("..2026_{}", random_suffix());
        std::fs::create_dir(dir.join(&stamp))?;
        for (key, bytes) in files {
            std::fs::write(dir.join(&stamp).join(key), bytes)?;
            let link = dir.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{key}"), &link)?;
            }
        }
        std::os::unix::fs::symlink(&stamp, dir.join("..data_tmp"))?;
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
        Ok(())
    }

    /// `podman run` arguments for a pod spec's first container: what the kubelet would
    /// ask of the runtime. Test-only differences: the private pin dir, the node netns.
    fn podman_args(&self, pod: &Value, docs: &[Value], image: &str) -> Result<Vec<String>> {
        let container = &pod["containers"][0];
        let mut args: Vec<String> = vec!["run".into(), "-d".into()];
        ensure!(pod["hostNetwork"] == true, "hostNetwork");
        args.push(format!("--network=ns:{}", self.netns.path().display()));
        let security = &container["securityContext"];
        ensure!(security["privileged"] == false, "privileged");
        if security["readOnlyRootFilesystem"] == true {
            // The kubelet gives no tmpfs on /run or /tmp (podman would by default).
            args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        if security["allowPrivilegeEscalation"] == false {
            args.push("--security-opt=no-new-privileges".into());
        }
        // RuntimeDefault: podman's default seccomp profile (like containerd's, it allows
        // bpf(2), perf_event_open(2) and setns(2) to holders of CAP_SYS_ADMIN).
        ensure!(security["seccompProfile"]["type"] == "RuntimeDefault");
        ensure!(security["capabilities"]["drop"] == json!(["ALL"]));
        args.push("--cap-drop=all".into());
        let caps: Vec<String> = security["capabilities"]["add"]
            .as_array()
            .context("capabilities")?
            .iter()
            .map(|c| format!("CAP_{}", c.as_str().unwrap_or_default()))
            .collect();
        if !caps.is_empty() {
            args.push(format!("--cap-add={}", caps.join(",")));
        }
        args.push(format!(
            "--user={}:0",
            security["runAsUser"].as_u64().unwrap_or(0)
        ));
        // Explicit limits (podman needs them here), within this process's hard limits.
        let nofile = hard_limit(libc::RLIMIT_NOFILE).min(1 << 20);
        let nproc = hard_limit(libc::RLIMIT_NPROC).min(4096);
        args.push(format!("--ulimit=nofile={nofile}:{nofile}"));
        args.push(format!("--ulimit=nproc={nproc}:{nproc}"));
        if let Some(limit) = container["resources"]["limits"]["memory"].as_str() {
            args.push(format!("--memory={}", quantity(limit)?));
            // No swap beyond the limit: a pod has none.
            args.push(format!("--memory-swap={}", quantity(limit)?));
        }
        // Volumes: hostPath and projected ConfigMaps.
        let volumes = pod["volumes"].as_array().context("volumes")?;
        for mount in container["volumeMounts"]
            .as_array()
            .context("volumeMounts")?
        {
            let name = mount["name"].as_str().context("mount name")?;
            let target = mount["mountPath"].as_str().context("mountPath")?;
            let volume = volumes
                .iter()
                .find(|v| v["name"] == name)
                .with_context(|| format!("volume {name}"))?;
            let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
                let source = self.host_path(path);
                match volume["hostPath"]["type"].as_str() {
                    Some("DirectoryOrCreate") => std::fs::create_dir_all(&source)?,
                    Some("Directory") => ensure!(source.is_dir(), "hostPath {path} missing"),
                    other => bail!("hostPath type {other:?} not emulated"),
                }
                source
            } else if volume["projected"].is_object() {
                // The ConfigMaps' current content: what the test last published (an
                // edited ConfigMap stays edited for the next pod), else the manifests'.
                if !self.kubelet_rules.join("..data").exists() {
                    let mut files = Vec::new();
                    for s in volume["projected"]["sources"]
                        .as_array()
                        .context("sources")?
                    {
                        let cm = s["configMap"]["name"]
                            .as_str()
                            .context("configMap source")?;
                        files.extend(configmap_files(find(docs, "ConfigMap", cm)?)?);
                    }
                    self.publish_rules(&files)?;
                }
                self.kubelet_rules.clone()
            } else {
                bail!("volume {name}: kind not emulated");
            };
            let mut spec = format!("type=bind,src={},dst={target}", source.display());
            if mount["readOnly"] == true {
                spec.push_str(",ro=true");
            }
            match mount["mountPropagation"].as_str() {
                None | Some("None") => spec.push_str(",bind-propagation=rprivate"),
                Some("HostToContainer") => spec.push_str(",bind-propagation=rslave"),
                Some(other) => bail!("mountPropagation {other} not emulated"),
            }
            args.push(format!("--mount={spec}"));
        }
        for (k, v) in container_env(container, docs)? {
            args.push(format!("--env={k}={v}"));
        }
        // The one setting that differs from a node: a pin dir of this test's own.
        args.push(format!(
            "--env=EGRESS_DENY_PIN_DIR={}",
            self.pin_dir.display()
        ));
        if let Some(policy) = container["imagePullPolicy"].as_str() {
            ensure!(policy == "IfNotPresent");
        }
        args.push(image.to_owned());
        for a in container["args"].as_array().context("args")? {
            args.push(a.as_str().context("arg")?.to_owned());
        }
        Ok(args)
    }

    /// An HTTP GET from inside the node (the daemon listens on the node's network).
    fn http(&self, port: u16, path: &str) -> Option<(u16, String)> {
        let netns = self.netns.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::io::Read;
                let _in = egress_deny_datapath::netns::NetnsGuard::enter(&netns).ok()?;
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
                stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
                let mut response = String::new();
                stream.read_to_string(&mut response).ok()?;
                Some((response.split_whitespace().nth(1)?.parse().ok()?, response))
            })
            .join()
            .ok()
            .flatten()
        })
    }
}

/// A Kubernetes memory quantity in bytes (the suffixes the manifests use).
fn quantity(q: &str) -> Result<u64> {
    let (number, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = number.parse()?;
    Ok(n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => bail!("quantity {q}"),
    })
}

fn container_logs(name: &str) -> String {
    podman()
        .args(["logs", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
}

fn rendered_base() -> Result<Vec<Value>> {
    yaml(&render(&base_dir())?)
}

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
    let mut cleanup = Cleanup {
        image: format!("localhost/egress-deny-test:{id}"),
        containers: Vec::new(),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/egress-deny-pkg-{id}")),
    };
    let binaries = build_image(&cleanup)?;
    let docs = rendered_base()?;
    let ds = find(&docs, "DaemonSet", "egress-deny")?;
    let pod_spec = &ds["spec"]["template"]["spec"];
    let container = &pod_spec["containers"][0];

    // The image holds exactly the two binaries: the entrypoint the DaemonSet relies on
    // (it sets only args) and the plugin next to it, which the installer copies to the
    // host.
    let probe = format!("egress-deny-probe-{id}");
    run(podman().args(["create", "--name", &probe, &cleanup.image]))?;
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
    let inspect: Value =
        serde_json::from_str(&run(podman().args(["image", "inspect", &cleanup.image]))?)?;
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
        run(podman().args(&args))?;
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
        run(podman()
            .args(["exec", name, "/usr/local/bin/egress-deny-installer"])
            .args(args))
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
    run(podman().args(["stop", "-t", &grace.to_string(), &first]))?;
    let stop_time = stopping.elapsed();
    ensure!(
        stop_time < Duration::from_secs(grace) / 2,
        "SIGTERM took {stop_time:?}"
    );
    let state: Value = serde_json::from_str(&run(podman().args(["inspect", &first]))?)?;
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
    run(podman().args(["stop", "-t", &grace.to_string(), &second]))?;

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
    run(podman().args(&args))?;
    let code = run(podman().args(["wait", &uninstall]))?;
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
    let pid = run(podman().args(["inspect", "--format", "{{.State.Pid}}", name]))?;
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
    let mut cleanup = Cleanup {
        image: format!("localhost/egress-deny-test-mem:{id}"),
        containers: Vec::new(),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/egress-deny-pkgmem-{id}")),
    };
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
    run(podman().args(&args))?;
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
    let lookup = run(podman()
        .args([
            "exec",
            &name,
            "/usr/local/bin/egress-deny-installer",
            "lookup",
        ])
        .arg(probe_rule.split('/').next().context("rule")?))?;
    ensure!(lookup.contains(" deny "), "{lookup}");
    let status = run(podman().args([
        "exec",
        &name,
        "/usr/local/bin/egress-deny-installer",
        "status",
    ]))?;
    let (current, peak) = container_memory(&name)?;
    let state: Value = serde_json::from_str(&run(podman().args(["inspect", &name]))?)?;
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
    let pid = run(podman().args(["inspect", "--format", "{{.State.Pid}}", &name]))?;
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
