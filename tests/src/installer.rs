//! Running the real `egress-deny-installer run` against temp conf/bin/state/rules dirs and
//! a private pin dir, optionally inside a test "node" namespace.
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use egress_deny_datapath::{loader, netns::NetnsGuard, paths::PinLayout};

use crate::{Netns, binary, random_suffix, wait_until};

/// The installer binary, run in `netns` (only the network namespace: `nsenter --net`
/// keeps the host's mounts, bpffs included) or here.
fn installer_command(netns: Option<&Netns>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.path().display()))
                .arg(binary("egress-deny-installer"));
            c
        }
        None => Command::new(binary("egress-deny-installer")),
    }
}

/// Directories an installer instance works on (the DaemonSet's hostPaths).
pub struct InstallerDirs {
    pub root: tempfile::TempDir,
    pub pin_dir: PathBuf,
}

impl InstallerDirs {
    pub fn new() -> Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("egress-deny-inst-")
            .tempdir()?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/egress-deny-inst-{}", random_suffix()));
        for dir in ["net.d", "bin", "rules", "state"] {
            std::fs::create_dir_all(root.path().join(dir))?;
        }
        Ok(Self { root, pin_dir })
    }

    /// Dirs whose conf dir holds a primary network's conflist (ptp) for the installer to
    /// join: for tests that run no pods.
    pub fn with_placeholder_primary() -> Result<Self> {
        let dirs = Self::new()?;
        std::fs::write(
            dirs.conf_dir().join("10-ptp.conflist"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"}]}"#,
        )?;
        Ok(dirs)
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.root.path().join("net.d")
    }
    pub fn bin_dir(&self) -> PathBuf {
        self.root.path().join("bin")
    }
    pub fn rules_dir(&self) -> PathBuf {
        self.root.path().join("rules")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("state")
    }
    pub fn layout(&self) -> PinLayout {
        PinLayout::new(&self.pin_dir)
    }

    /// Flags shared by every subcommand.
    pub fn state_args(&self) -> Vec<String> {
        vec![
            format!("--pin-dir={}", self.pin_dir.display()),
            format!("--state-dir={}", self.state_dir().display()),
        ]
    }

    pub fn cni_args(&self) -> Vec<String> {
        vec![
            format!("--cni-conf-dir={}", self.conf_dir().display()),
            format!("--cni-bin-dir={}", self.bin_dir().display()),
        ]
    }

    /// Runs a one-shot subcommand (status, lookup, uninstall); returns stdout. `status`
    /// reporting a degraded or not-enforcing node (exit 2 or 3) is an answer, not a
    /// failure: see [`Self::status_code`] for the code.
    pub fn cli(&self, netns: Option<&Netns>, args: &[&str]) -> Result<String> {
        let mut cmd = installer_command(netns);
        let out = cmd.args(args).output()?;
        let answered = args.first() == Some(&"status") && matches!(out.status.code(), Some(2 | 3));
        if !out.status.success() && !answered {
            bail!(
                "installer {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `status` for these dirs: its output (exit codes 2 and 3 are answers, not failures).
    pub fn status(&self, netns: Option<&Netns>) -> Result<String> {
        Ok(self.status_code(netns)?.1)
    }

    /// `status` for this instance's dirs: (exit code, stdout).
    pub fn status_code(&self, netns: Option<&Netns>) -> Result<(i32, String)> {
        let out = installer_command(netns)
            .arg("status")
            .args(self.state_args())
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// `lookup` of `addrs` in this instance's pinned tables; returns its output.
    pub fn lookup(&self, netns: Option<&Netns>, addrs: &[&str]) -> Result<String> {
        let pin_dir = format!("--pin-dir={}", self.pin_dir.display());
        let mut args = vec!["lookup", pin_dir.as_str()];
        args.extend_from_slice(addrs);
        self.cli(netns, &args)
    }

    /// `run` on these dirs, listening on `listen`, with this build's plugin binary (in
    /// `netns` or here): the flags every test daemon shares; callers add their own.
    pub fn run_command(&self, netns: Option<&Netns>, listen: &str) -> Command {
        let mut cmd = installer_command(netns);
        cmd.arg("run")
            .args(self.state_args())
            .args(self.cni_args())
            .arg(format!("--rules-dir={}", self.rules_dir().display()))
            .arg(format!("--listen={listen}"))
            .arg(format!(
                "--plugin-binary={}",
                binary("egress-deny").display()
            ))
            // Outside a cluster: no API server to talk to.
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }

    /// Writes a rules file the way kubelet updates a ConfigMap volume: a new
    /// timestamped directory, then an atomic swap of the `..data` symlink.
    pub fn publish_rules(&self, files: &[(&str, &[u8])]) -> Result<()> {
        self.publish_rules_timed(files).map(|_| ())
    }

    /// `publish_rules`, returning the moment of the `..data` rename (after the files
    /// were written), which is when kubelet's update becomes visible.
    pub fn publish_rules_timed(&self, files: &[(&str, &[u8])]) -> Result<std::time::Instant> {
        publish_like_kubelet(&self.rules_dir(), files)
    }
}

/// Publishes `files` in `dir` the way kubelet updates a ConfigMap volume: the files in a
/// new hidden directory, each key a symlink through `..data`, then an atomic swap of the
/// `..data` symlink and removal of the directory it pointed to. Returns the moment of the
/// swap, when the update becomes visible.
pub fn publish_like_kubelet<K: AsRef<str>, V: AsRef<[u8]>>(
    dir: &Path,
    files: &[(K, V)],
) -> Result<std::time::Instant> {
    let stamp = format!("..{}", random_suffix());
    std::fs::create_dir(dir.join(&stamp))?;
    for (name, content) in files {
        let name = name.as_ref();
        std::fs::write(dir.join(&stamp).join(name), content)?;
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)?;
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    let old = std::fs::read_link(dir.join("..data")).ok();
    let renamed_at = std::time::Instant::now();
    std::fs::rename(&tmp, dir.join("..data"))?;
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(renamed_at)
}

impl Drop for InstallerDirs {
    fn drop(&mut self) {
        let _ = loader::unpin_all(&self.layout());
    }
}

/// A running daemon; SIGTERM on drop.
pub struct Installer {
    child: Option<Child>,
    pub port: u16,
    pub netns: Option<PathBuf>,
    pub log: PathBuf,
}

/// A free TCP port on loopback (of the current namespace).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(19765)
}

impl Installer {
    /// Starts `run` with the given extra flags; waits until /healthz answers.
    pub fn start(dirs: &InstallerDirs, netns: Option<&Netns>, extra: &[&str]) -> Result<Self> {
        Self::start_with_env(dirs, netns, extra, &[])
    }

    /// [`Self::start`] with extra environment variables.
    pub fn start_with_env(
        dirs: &InstallerDirs,
        netns: Option<&Netns>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let port = free_port();
        let log = dirs.root.path().join(format!("installer-{port}.log"));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = dirs.run_command(netns, &format!("127.0.0.1:{port}"));
        cmd.args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().context("starting the installer")?;
        let mut installer = Self {
            child: Some(child),
            port,
            netns: netns.map(Netns::path),
            log,
        };
        wait_until("installer /healthz", Duration::from_secs(30), || {
            installer
                .http("/healthz")
                .is_ok_and(|(code, _)| code == 200)
        })
        .inspect_err(|_| eprintln!("installer log:\n{}", installer.log_text()))?;
        if let Some(Ok(Some(status))) = installer.child.as_mut().map(Child::try_wait) {
            bail!("installer exited: {status}\n{}", installer.log_text());
        }
        Ok(installer)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the daemon's HTTP port (from inside its namespace).
    pub fn http(&self, path: &str) -> Result<(u16, String)> {
        let _guard = match &self.netns {
            Some(ns) => Some(NetnsGuard::enter(ns)?),
            None => None,
        };
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        drop(_guard);
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    }

    pub fn wait_ready(&self) -> Result<()> {
        wait_until("installer /readyz", Duration::from_secs(60), || {
            self.http("/readyz").is_ok_and(|(code, _)| code == 200)
        })
        .inspect_err(|_| eprintln!("installer log:\n{}", self.log_text()))
    }

    /// Waits until the daemon's log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("{text:?} in the installer log"), timeout, || {
            self.log_text().contains(text)
        })
    }

    /// Waits until the daemon's /metrics contains `text`.
    pub fn wait_for_metrics(&self, text: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("{text:?} in /metrics"), timeout, || {
            self.http("/metrics").is_ok_and(|(_, m)| m.contains(text))
        })
    }

    /// SIGTERM and wait; returns how long it took to exit.
    pub fn stop(mut self) -> Result<Duration> {
        let mut child = self.child.take().context("already stopped")?;
        let started = std::time::Instant::now();
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        if !status.success() {
            bail!("installer exited with {status}\n{}", self.log_text());
        }
        Ok(started.elapsed())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL, as when a node's daemon crashes.
    pub fn kill(mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}
