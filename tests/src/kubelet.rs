//! A node that runs the image as the kubelet would run a pod spec: podman with the
//! spec's security context, limits, env and volumes (hostPaths under a temp root, the
//! projected rules volume in kubelet's `..data` layout), in a private network namespace
//! standing for the node's host network; and the image built from conf/Containerfile.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{
    Netns,
    installer::publish_like_kubelet,
    manifests::{conf, configmap_files, container_env, find, quantity},
    run_command,
};

/// podman as this machine kind runs it: runc, cgroupfs.
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// Removes the containers, image, pins and network namespaces a test made.
pub struct Cleanup {
    pub image: String,
    pub containers: Vec<String>,
    pub pin_dir: PathBuf,
}

impl Cleanup {
    /// For a test run `id`: the image `localhost/{image}:{id}`, the pin dir
    /// `/sys/fs/bpf/{pins}-{id}`, no containers yet.
    pub fn new(image: &str, pins: &str, id: &str) -> Self {
        Self {
            image: format!("localhost/{image}:{id}"),
            containers: Vec::new(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{pins}-{id}")),
        }
    }
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
        let file = run_command(Command::new("file").arg(&path))?;
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
pub fn build_image(cleanup: &Cleanup) -> Result<PathBuf> {
    let binaries = static_binaries()?;
    let context = tempfile::tempdir()?;
    for name in ["egress-deny", "egress-deny-installer"] {
        std::fs::copy(binaries.join(name), context.path().join(name))?;
    }
    run_command(
        podman()
            .args(["build", "--quiet", "-f"])
            .arg(conf().join("Containerfile"))
            .args(["-t", &cleanup.image])
            .arg(context.path()),
    )?;
    Ok(binaries)
}

/// A node: a private network namespace with an uplink and a default route (so
/// `EGRESS_DENY_HOST_INTERFACES=auto` finds it), and a temp dir standing for its root
/// filesystem's hostPaths.
pub struct Node {
    pub netns: Netns,
    root: tempfile::TempDir,
    pin_dir: PathBuf,
    kubelet_rules: PathBuf,
}

impl Node {
    pub fn new(pin_dir: &Path) -> Result<Self> {
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

    pub fn host(&self, path: &str) -> PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    /// Publishes the rules volume as the kubelet does.
    pub fn publish_rules(&self, files: &[(String, Vec<u8>)]) -> Result<()> {
        publish_like_kubelet(&self.kubelet_rules, files).map(|_| ())
    }

    /// `podman run` arguments for a pod spec's first container: what the kubelet would
    /// ask of the runtime. Test-only differences: the private pin dir, the node netns.
    pub fn podman_args(&self, pod: &Value, docs: &[Value], image: &str) -> Result<Vec<String>> {
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
    pub fn http(&self, port: u16, path: &str) -> Option<(u16, String)> {
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

/// A container's stdout and stderr, for a failure's message.
pub fn container_logs(name: &str) -> String {
    podman()
        .args(["logs", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
}
