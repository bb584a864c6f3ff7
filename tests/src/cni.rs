//! A CNI "node" for tests: a network namespace acting as the host, where a real CNI
//! runtime (the libcni driver in tests/cni-driver) runs real conflists — reference
//! bridge/ptp + host-local from containernetworking-plugins, then egress-deny — and a
//! "server" namespace behind it that answers on a denied and an allowed address.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    Netns, PinDir, binary,
    installer::{Installer, InstallerDirs},
    random_suffix,
};

pub const DENIED: &str = "198.51.100.7";
pub const ALLOWED: &str = "192.0.2.10";
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// Builds the libcni driver once per test binary (offline: Debian's Go sources).
pub fn driver() -> &'static Path {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("cni-driver/main.go");
        let out_dir = binary_dir().join("cni-driver");
        std::fs::create_dir_all(&out_dir).expect("driver dir");
        let tmp = out_dir.join(format!("cni-driver.{}", std::process::id()));
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(&tmp)
            .arg(&source)
            .env("GOPATH", "/usr/share/gocode")
            .env("GO111MODULE", "off")
            .env("GOCACHE", out_dir.join("gocache"))
            .output()
            .expect("running go build (tests/setup.sh installs golang-go)");
        assert!(
            out.status.success(),
            "building the libcni driver: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = out_dir.join("cni-driver");
        std::fs::rename(&tmp, &path).expect("install driver");
        path
    })
}

fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Primary {
    Bridge,
    Ptp,
}

/// A CNI error as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniFailure {
    pub code: u64,
    pub msg: String,
}

/// What a runtime command ends with: its output, or the CNI error it reported (the outer
/// error is the test harness failing, not the plugin).
pub type CniResult<T> = Result<Result<T, CniFailure>>;

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)
    }
}

pub struct CniNode {
    /// Extra plugin directory searched first (an installer's --cni-bin-dir).
    pub extra_cni_path: std::sync::Mutex<Option<PathBuf>>,
    pub node: Netns,
    pub server: Netns,
    pub pins: PinDir,
    pub dir: tempfile::TempDir,
}

impl CniNode {
    /// The set-up most end-to-end tests share: a node whose primary network "k8s" is
    /// `primary`, its conflist in a fresh installer's conf dir (returned: the runtime
    /// runs it), and that installer's plugin dir first on the runtime's plugin path.
    pub fn with_installer_dirs(primary: Primary) -> Result<(Self, InstallerDirs, PathBuf)> {
        let node = Self::new()?;
        let dirs = InstallerDirs::new()?;
        let name = match primary {
            Primary::Bridge => "10-bridge.conflist",
            Primary::Ptp => "10-ptp.conflist",
        };
        let conflist = dirs.conf_dir().join(name);
        let list = json!({ "cniVersion": "1.0.0", "name": "k8s", "plugins": [node.primary_conf(primary)] });
        std::fs::write(&conflist, serde_json::to_vec(&list)?)?;
        *node.extra_cni_path.lock().expect("lock") = Some(dirs.bin_dir());
        Ok((node, dirs, conflist))
    }

    /// [`Self::with_installer_dirs`] with `DENIED/32` published and an installer run
    /// with `flags` in the node, ready (it stops when the returned [`Installer`] drops).
    pub fn with_ready_installer(
        primary: Primary,
        flags: &[&str],
    ) -> Result<(Self, InstallerDirs, PathBuf, Installer)> {
        let (node, dirs, conflist) = Self::with_installer_dirs(primary)?;
        dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
        let installer = Installer::start(&dirs, Some(&node.node), flags)?;
        installer.wait_ready()?;
        Ok((node, dirs, conflist, installer))
    }

    pub fn new() -> Result<Self> {
        let node = Netns::new("edn")?;
        let server = Netns::new("eds")?;
        let pins = PinDir::new()?;
        let dir = tempfile::Builder::new()
            .prefix("egress-deny-cni-")
            .tempdir()?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        node.ip(&format!(
            "link add up0 type veth peer name eth0 netns {}",
            server.name
        ))?;
        node.ip("addr add 172.30.0.1/24 dev up0")?;
        node.ip("link set up0 up")?;
        server.ip("addr add 172.30.0.2/24 dev eth0")?;
        server.ip("link set eth0 up")?;
        server.ip(&format!("addr add {DENIED}/32 dev lo"))?;
        server.ip(&format!("addr add {ALLOWED}/32 dev lo"))?;
        server.ip("route add 10.244.0.0/16 via 172.30.0.1")?;
        node.ip("route add 198.51.100.0/24 via 172.30.0.2")?;
        node.ip("route add 192.0.2.0/24 via 172.30.0.2")?;

        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin)?;
        for plugin in ["bridge", "host-local", "ptp", "loopback"] {
            std::os::unix::fs::symlink(
                Path::new(REFERENCE_PLUGINS).join(plugin),
                bin.join(plugin),
            )?;
        }
        std::os::unix::fs::symlink(binary("egress-deny"), bin.join("egress-deny"))?;
        Ok(Self {
            extra_cni_path: std::sync::Mutex::new(None),
            node,
            server,
            pins,
            dir,
        })
    }

    fn cni_path(&self) -> String {
        match &*self.extra_cni_path.lock().expect("lock") {
            Some(extra) => format!("{}:{}", extra.display(), REFERENCE_PLUGINS),
            None => self.bin_dir().display().to_string(),
        }
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The runtime's CNI cache (libcni's), where an installer finds pods started
    /// without the plugin.
    pub fn cni_cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Starts an installer that repairs from this node's CNI cache, with no host
    /// interfaces and `extra` flags; returns it ready.
    pub fn repairing_installer(&self, dirs: &InstallerDirs, extra: &[&str]) -> Result<Installer> {
        let cache = format!("--cni-cache-dir={}", self.cni_cache_dir().display());
        let mut flags = vec!["--host-interfaces=none", cache.as_str()];
        flags.extend_from_slice(extra);
        let installer = Installer::start(dirs, Some(&self.node), &flags)?;
        installer.wait_ready()?;
        Ok(installer)
    }

    pub fn plugin_log(&self) -> PathBuf {
        self.dir.path().join("plugin.log")
    }

    /// Our plugin's conflist entry for this node, plus `extra` keys.
    pub fn egress_deny_entry(&self, extra: Value) -> Value {
        let mut entry = json!({
            "type": "egress-deny",
            "pinDir": self.pins.root(),
            "stateDir": self.state_dir(),
            "log": { "level": "debug", "target": self.plugin_log() },
        });
        if let (Some(entry), Value::Object(extra)) = (entry.as_object_mut(), extra) {
            entry.extend(extra);
        }
        entry
    }

    /// The primary plugin's configuration (with host-local IPAM).
    pub fn primary_conf(&self, primary: Primary) -> Value {
        let ipam = |subnet: &str| {
            json!({
                "type": "host-local",
                "subnet": subnet,
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": self.dir.path().join("ipam"),
            })
        };
        match primary {
            Primary::Bridge => json!({
                "type": "bridge", "bridge": "edbr0", "isGateway": true, "ipMasq": false,
                "ipam": ipam("10.244.1.0/24"),
            }),
            Primary::Ptp => {
                json!({ "type": "ptp", "ipMasq": false, "ipam": ipam("10.244.2.0/24") })
            }
        }
    }

    /// Writes `[primary(host-local), egress-deny]` at `version` and returns its path.
    pub fn conflist(&self, version: &str, primary: Primary, extra: Value) -> Result<PathBuf> {
        let primary_conf = self.primary_conf(primary);
        let name = format!("test-{}", random_suffix());
        let list = json!({
            "cniVersion": version,
            "name": name,
            "plugins": [primary_conf, self.egress_deny_entry(extra)],
        });
        let path = self.dir.path().join(format!("{name}.conflist"));
        std::fs::write(&path, serde_json::to_vec_pretty(&list)?)?;
        Ok(path)
    }

    /// Runs the libcni driver inside the node namespace. `nsenter --net` rather than
    /// `ip netns exec`: the latter remounts /sys, hiding the bpffs at /sys/fs/bpf, which
    /// a real runtime (host mount namespace) sees.
    pub fn runtime(
        &self,
        command: &str,
        conflist: &Path,
        container_id: &str,
        netns: &Path,
        args: &str,
    ) -> CniResult<String> {
        self.runtime_on(command, conflist, container_id, netns, "eth0", args)
    }

    /// [`Self::runtime`] for a pod interface other than `eth0`.
    pub fn runtime_on(
        &self,
        command: &str,
        conflist: &Path,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        args: &str,
    ) -> CniResult<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.node.path().display()))
            .arg(driver())
            .arg(command)
            .arg(conflist)
            .arg(container_id)
            .arg(netns)
            .arg(ifname)
            // Runtimes add IgnoreUnknown so that plugins without K8S_* args accept them.
            .arg(if args.is_empty() {
                String::new()
            } else {
                format!("IgnoreUnknown=1;{args}")
            })
            .env("CNI_PATH", self.cni_path())
            .env("CNI_CACHE_DIR", self.cni_cache_dir())
            .output()
            .context("running the CNI driver")?;
        if out.status.success() {
            return Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let parsed: Option<Value> = stderr
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok());
        match parsed {
            Some(err) => Ok(Err(CniFailure {
                code: err.get("code").and_then(Value::as_u64).unwrap_or(0),
                msg: format!(
                    "{} {}",
                    err.get("msg").and_then(Value::as_str).unwrap_or_default(),
                    err.get("details")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                ),
            })),
            None => bail!("CNI driver failed without an error result: {stderr}"),
        }
    }

    /// A new pod namespace (not yet added) with the given container ID.
    pub fn pod_with_id(&self, container_id: &str) -> Result<Pod<'_>> {
        Ok(Pod {
            node: self,
            ns: Some(Netns::new("edp")?),
            container_id: container_id.to_owned(),
        })
    }

    /// A new pod namespace (not yet added).
    pub fn pod(&self) -> Result<Pod<'_>> {
        self.pod_with_id(&format!("ctr-{}", random_suffix()))
    }

    /// A new pod, added through `conflist` with CNI_ARGS `args`: a CNI error fails the
    /// test (tests that expect one call [`Pod::add`] themselves).
    pub fn added_pod(&self, conflist: &Path, args: &str) -> Result<Pod<'_>> {
        let pod = self.pod()?;
        pod.add(conflist, args)?.map_err(anyhow::Error::msg)?;
        Ok(pod)
    }
}

pub struct Pod<'a> {
    pub node: &'a CniNode,
    /// `None` once the namespace was deleted (to test DEL after the netns is gone).
    pub ns: Option<Netns>,
    pub container_id: String,
}

impl Pod<'_> {
    pub fn ns(&self) -> &Netns {
        self.ns.as_ref().expect("pod namespace was deleted")
    }

    /// Waits until `installer` has repaired this pod, started without the plugin: its
    /// packets to DENIED dropped, then the repair of `pod` (`namespace/name`) logged.
    pub fn wait_for_repair(&self, installer: &Installer, pod: &str) -> Result<()> {
        crate::wait_until(
            &format!("{pod} to be filtered"),
            std::time::Duration::from_secs(10),
            || {
                crate::probe::udp_through(self.ns(), &self.node.server, DENIED, ALLOWED, 1)
                    .is_ok_and(|n| n == 0)
            },
        )?;
        // The attachment takes effect a moment before the daemon records and logs it.
        installer.wait_for_log(
            &format!("repaired: pod {pod}"),
            std::time::Duration::from_secs(10),
        )
    }

    fn netns_path(&self) -> PathBuf {
        match &self.ns {
            Some(ns) => ns.path(),
            None => PathBuf::from(format!("/var/run/netns/deleted-{}", self.container_id)),
        }
    }

    /// One runtime command on this pod's `ifname`: the plugin chain's stdout, or the
    /// CNI error it ended with.
    fn run_on(
        &self,
        command: &str,
        conflist: &Path,
        ifname: &str,
        args: &str,
    ) -> CniResult<String> {
        self.node.runtime_on(
            command,
            conflist,
            &self.container_id,
            &self.netns_path(),
            ifname,
            args,
        )
    }

    pub fn add(&self, conflist: &Path, args: &str) -> CniResult<Value> {
        self.add_on(conflist, "eth0", args)
    }

    pub fn check(&self, conflist: &Path, args: &str) -> CniResult<()> {
        self.check_on(conflist, "eth0", args)
    }

    pub fn del(&self, conflist: &Path, args: &str) -> CniResult<()> {
        self.del_on(conflist, "eth0", args)
    }

    /// ADD with pod interface `ifname`.
    pub fn add_on(&self, conflist: &Path, ifname: &str, args: &str) -> CniResult<Value> {
        Ok(self
            .run_on("add", conflist, ifname, args)?
            .map(|out| serde_json::from_str(&out).unwrap_or(Value::Null)))
    }

    /// CHECK with pod interface `ifname`.
    pub fn check_on(&self, conflist: &Path, ifname: &str, args: &str) -> CniResult<()> {
        Ok(self.run_on("check", conflist, ifname, args)?.map(drop))
    }

    /// DEL with pod interface `ifname`.
    pub fn del_on(&self, conflist: &Path, ifname: &str, args: &str) -> CniResult<()> {
        Ok(self.run_on("del", conflist, ifname, args)?.map(drop))
    }

    /// The attachment record of this pod's `ifname` (whichever network, any naming).
    pub fn record_of(
        &self,
        ifname: &str,
    ) -> Result<egress_deny_datapath::records::AttachmentRecord> {
        let state = egress_deny_datapath::paths::StateLayout::new(self.node.state_dir());
        Ok(egress_deny_datapath::records::AttachmentRecord::read(
            &state.attachment_record(&self.container_id, ifname),
        )?)
    }

    /// The attachment record of this pod's `eth0`.
    pub fn record(&self) -> Result<egress_deny_datapath::records::AttachmentRecord> {
        self.record_of("eth0")
    }
}

/// The network name (`name`) of a conflist file.
pub fn network_name(conflist: &Path) -> Result<String> {
    let list: Value = serde_json::from_slice(&std::fs::read(conflist)?)?;
    list["name"]
        .as_str()
        .map(str::to_owned)
        .context("conflist without a name")
}

/// What a direct exec of the plugin produced.
#[derive(Debug)]
pub struct PluginRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the plugin binary directly inside the node namespace, as a runtime would (for
/// what libcni 1.1.2 cannot drive: GC, STATUS, 1.1.0, malformed input), with only the
/// given environment (plus PATH and CNI_PATH).
pub fn run_plugin(node: &CniNode, env: &[(&str, &str)], stdin: &str) -> Result<PluginRun> {
    run_plugin_under(node, &[], env, stdin)
}

/// [`run_plugin`] under a wrapper command (e.g. strace).
pub fn run_plugin_under(
    node: &CniNode,
    wrapper: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> Result<PluginRun> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.node.path().display()))
        .args(wrapper)
        .arg(node.bin_dir().join("egress-deny"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_PATH", node.bin_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    // A plugin that rejects its environment exits before reading stdin: a broken pipe
    // here is its answer, not a test failure (its exit and output tell).
    match child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    let out = child.wait_with_output()?;
    Ok(PluginRun {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// [`run_plugin`], returning (success, stdout parsed as JSON or Null when empty).
pub fn exec_plugin(node: &CniNode, env: &[(&str, &str)], stdin: &str) -> Result<(bool, Value)> {
    let run = run_plugin(node, env, stdin)?;
    let value = if run.stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(run.stdout.trim())
            .with_context(|| format!("stdout is not one JSON document: {:?}", run.stdout))?
    };
    Ok((run.ok, value))
}

/// The environment of a direct exec of `command` for `container_id`'s eth0 in `netns`.
pub fn pod_env<'a>(
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
    ]
}

/// The plugin's entry alone as a 1.1.0 network configuration (for direct execs).
pub fn entry_1_1(node: &CniNode, extra: Value) -> Value {
    let mut conf = node.egress_deny_entry(extra);
    conf["cniVersion"] = json!("1.1.0");
    conf["name"] = json!("direct");
    conf
}

/// A pod namespace with a veth whose host side is in the node namespace, made by hand.
pub fn hand_made_pod(node: &CniNode) -> Result<(Netns, String)> {
    let pod = Netns::new("edx")?;
    let host = format!("vx{}", &pod.name[pod.name.len() - 6..]);
    node.node.ip(&format!(
        "link add {host} type veth peer name eth0 netns {}",
        pod.name
    ))?;
    node.node.ip(&format!("link set {host} up"))?;
    Ok((pod, host))
}

/// The programs on `ifname`'s tc ingress inside the node namespace: (TCX program IDs,
/// cls_bpf program IDs). Proves what is attached independently of pins and records.
pub fn ingress_programs(node: &CniNode, ifname: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    use aya::programs::{SchedClassifier, TcAttachType};
    use egress_deny_datapath::{attach::Hook, iface, netlink, netns::NetnsGuard};
    let _guard = NetnsGuard::enter(&node.node.path())?;
    let (_, tcx) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)?;
    let tcx = tcx.iter().map(|p| p.id()).collect();
    let cls = netlink::bpf_filter_program_ids(iface::ifindex(ifname)?, Hook::Ingress)?
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    Ok((tcx, cls))
}
