//! Fixtures for privileged tests: private bpffs pin dirs, network namespaces and veths
//! with random names, all removed by guards that run even when a test fails.
pub mod bench;
pub mod cni;
pub mod installer;
pub mod kubelet;
pub mod manifests;
pub mod packet;
pub mod probe;
pub mod topology;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_deny_datapath::{
    loader,
    paths::PinLayout,
    rules::{Action, RuleTables},
};
use rand::Rng;

/// One `#[test]` fn per case of test bodies that take the case as their argument, each
/// named for its case: `tests_over!(body: name_a => case_a, name_b => case_b; …);`.
#[macro_export]
macro_rules! tests_over {
    ($($body:ident: $($name:ident => $case:expr),+ $(,)?);+ $(;)?) => {
        $($(
            #[test]
            fn $name() -> anyhow::Result<()> {
                $body($case)
            }
        )+)+
    };
}

/// A short random suffix for names (interface names are limited to 15 bytes).
pub fn random_suffix() -> String {
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(b'a' + rng.random_range(0..26)))
        .collect()
}

/// Runs a command, failing with its stderr when it does not succeed.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd`, failing with its stdout and stderr when it does not succeed.
pub fn run_command(cmd: &mut Command) -> Result<String> {
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

/// `ip` with arguments given as one string (test set-up only).
pub fn ip(args: &str) -> Result<String> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// Runs a command inside a named network namespace.
pub fn in_netns(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// A private pin dir with the program and maps loaded by the installer's own code.
pub struct PinDir {
    pub layout: PinLayout,
}

impl PinDir {
    pub fn new() -> Result<Self> {
        let root = PathBuf::from(format!("/sys/fs/bpf/egress-deny-test-{}", random_suffix()));
        let layout = PinLayout::new(root);
        let guard = Self { layout };
        loader::load_and_pin(&guard.layout).context("load_and_pin")?;
        // What the installer does after its first successful sync (the plugin waits
        // for it); tests then manage the rules themselves.
        egress_deny_datapath::events::mark_rules_loaded(&guard.layout)?;
        Ok(guard)
    }

    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// This pin dir's rule tables, with every prefix of `denied` added as a deny rule.
    pub fn deny(&self, denied: &[&str]) -> Result<RuleTables> {
        let tables = RuleTables::open(&self.layout)?;
        for prefix in denied {
            tables.insert(prefix.parse()?, Action::Deny)?;
        }
        Ok(tables)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = loader::unpin_all(&self.layout);
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = format!("{prefix}-{}", random_suffix());
        ip(&format!("netns add {name}"))?;
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        in_netns(&self.name, program, args)
    }

    pub fn ip(&self, args: &str) -> Result<String> {
        let args: Vec<&str> = args.split_whitespace().collect();
        self.exec("ip", &args)
    }

    /// [`open_tun`] inside this namespace.
    pub fn open_tun(&self, name: &str, link_type: Option<u16>) -> Result<std::fs::File> {
        let _inside = egress_deny_datapath::netns::NetnsGuard::enter(&self.path())?;
        open_tun(name, link_type)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A host-side interface in the current namespace, deleted on drop (with its peer).
pub struct HostLink {
    pub name: String,
}

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// Polls `probe` until it returns true or the deadline passes.
pub fn wait_until(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if probe() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fails loudly unless running as root: privileged tests must never skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged tests must run as root"
    );
}

/// Path of a workspace binary (`egress-deny`, `egress-deny-installer`) built by
/// `cargo build --workspace --bins` (tests/run.sh does this before `cargo test`).
/// Test executables live in target/<profile>/deps, binaries one level up.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Test executables live in target/<profile>/deps, benchmark binaries next to ours.
    let dirs = [exe.parent(), exe.parent().and_then(Path::parent)];
    let found = dirs
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} not built next to {}: run `cargo build --workspace --bins` first (tests/run.sh does)", exe.display())
    })
}

/// Opens a TUN device (an L3 device: no Ethernet header) in the current namespace,
/// non-blocking. With `link_type`, the device claims that ARPHRD type instead (TUNSETLINK,
/// before it is up): a stand-in for hardware this machine does not have (InfiniBand…).
pub fn open_tun(name: &str, link_type: Option<u16>) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETLINK: libc::c_ulong = 0x4004_54cd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; the name is shorter than IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads the ifreq we pass; the fd is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        bail!("TUNSETIFF: {}", std::io::Error::last_os_error());
    }
    if let Some(link_type) = link_type {
        // SAFETY: TUNSETLINK takes the type by value; the fd is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETLINK, libc::c_ulong::from(link_type)) } < 0
        {
            bail!("TUNSETLINK: {}", std::io::Error::last_os_error());
        }
    }
    // SAFETY: plain fcntl on our fd.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    Ok(file)
}

/// A memory cgroup of its own for one process (v1 as on this machine kind, or v2),
/// removed on drop after moving the process back to the root.
pub struct MemoryCgroup {
    dir: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl MemoryCgroup {
    /// The most memory the cgroup has been charged since it was created (v1
    /// `memory.max_usage_in_bytes`, v2 `memory.peak`), if the kernel says.
    pub fn peak(&self) -> Option<u64> {
        ["memory.max_usage_in_bytes", "memory.peak"]
            .iter()
            .find_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .and_then(|s| s.trim().parse().ok())
    }

    pub fn new(limit: u64) -> Result<Self> {
        let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
        let (root, limit_file) = if v1.is_dir() {
            (v1.to_path_buf(), "memory.limit_in_bytes")
        } else {
            (std::path::PathBuf::from("/sys/fs/cgroup"), "memory.max")
        };
        let dir = root.join(format!("egress-deny-test-{}", random_suffix()));
        std::fs::create_dir(&dir)?;
        let cgroup = Self { dir, root };
        std::fs::write(cgroup.dir.join(limit_file), limit.to_string())?;
        Ok(cgroup)
    }

    pub fn add(&self, pid: u32) -> Result<()> {
        Ok(std::fs::write(
            self.dir.join("cgroup.procs"),
            pid.to_string(),
        )?)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs `cmd` with `input` on its stdin (written from a thread, so a child that answers
/// before it has read everything cannot deadlock us) and returns its stdout; a non-zero
/// exit is an error with its stderr.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<Vec<u8>> {
    use std::{io::Write, process::Stdio};
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer.join().expect("stdin writer")?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// `base64 -d` of `text`.
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    run_with_input(Command::new("base64").arg("-d"), text.as_bytes())
}
