//! The plugin's entry in the conflist (stdin). Unknown keys are ignored; `prevResult`
//! is kept as raw JSON by the caller and never parsed into types.
use std::path::PathBuf;

use egress_deny_datapath::{attach::AttachMode, paths};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    /// The network (conflist `name`): attachments are recorded, pinned and collected
    /// per network, as runtimes track them.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `auto` (TCX where the kernel has it), `tcx` or `netlink`. The env var
    /// EGRESS_DENY_ATTACH_MODE overrides it (tests force the fallback with it).
    #[serde(default)]
    pub attach_mode: AttachModeSetting,
    #[serde(default)]
    pub log: LogConfig,
    /// GC: the attachments the runtime still knows about.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Missing installer state fails ADD with "try again later": never start a pod
    /// unfiltered.
    #[default]
    Fail,
    /// Missing installer state lets the pod start unfiltered (logged).
    Ignore,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachModeSetting {
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl NetConf {
    /// `EGRESS_DENY_ATTACH_MODE` wins over the conflist's `attachMode` (how tests force
    /// the cls_bpf fallback on a kernel with TCX).
    pub fn attach_mode(&self) -> AttachMode {
        self.attach_mode_given(AttachMode::forced())
    }

    fn attach_mode_given(&self, forced: Option<AttachMode>) -> AttachMode {
        if let Some(mode) = forced {
            return mode;
        }
        match self.attach_mode {
            AttachModeSetting::Auto => AttachMode::best_available(),
            AttachModeSetting::Tcx => AttachMode::Tcx,
            AttachModeSetting::Netlink => AttachMode::Netlink,
        }
    }

    pub fn pin_layout(&self) -> paths::PinLayout {
        paths::PinLayout::new(&self.pin_dir)
    }

    pub fn state_layout(&self) -> paths::StateLayout {
        paths::StateLayout::new(&self.state_dir)
    }

    /// This network's identity of the attachment (container ID, ifname).
    pub fn attachment_id(&self, container_id: &str, ifname: &str) -> paths::AttachmentId {
        paths::AttachmentId::new(&self.name, container_id, ifname)
    }

    pub fn is_excluded(&self, namespace: Option<&str>) -> bool {
        namespace.is_some_and(|ns| self.exclude_namespaces.iter().any(|e| e == ns))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogConfig {
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `syslog`, `stderr`, or a file path.
    #[serde(default = "default_log_target")]
    pub target: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            target: default_log_target(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(paths::DEFAULT_PIN_DIR)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(paths::DEFAULT_STATE_DIR)
}

fn default_log_level() -> String {
    "info".into()
}

fn default_log_target() -> String {
    "syslog".into()
}

#[cfg(test)]
mod tests;
