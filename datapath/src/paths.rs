//! Every bpffs path and object name egress-deny uses, in one place.
//!
//! Layout under the pin dir (DESIGN.md "bpffs layout"):
//! ```text
//! <pinDir>/egress_deny        program for Ethernet devices
//! <pinDir>/egress_deny_l3     program for L3 devices (wireguard, ipip, tun)
//! <pinDir>/egress_deny_staged, egress_deny_l3_staged
//!                             a new program waiting for its new rule maps to be filled
//! <pinDir>/v4_rules           LPM trie, IPv4 rules
//! <pinDir>/v6_rules           LPM trie, IPv6 rules
//! <pinDir>/counters           per-CPU counters per attachment (ifindex)
//! <pinDir>/config             datapath settings (deny-event rate)
//! <pinDir>/egress_deny_exempt  program for veths of pods in excluded namespaces
//! <pinDir>/events             ring buffer of deny events
//! <pinDir>/settings           judged-packet mark, NAT64 prefixes
//! <pinDir>/links/pod_<containerID>_<ifname>   TCX link of a pod attachment
//! <pinDir>/links/host_<ifname>                TCX link of a host interface
//! ```
use std::path::{Path, PathBuf};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress-deny";
/// Where the plugin records attachments for the installer (tmpfs: same lifetime as pins).
pub const DEFAULT_STATE_DIR: &str = "/run/egress-deny";

/// Map names: the names the eBPF object gives them and their pin names.
pub const V4_RULES_MAP: &str = "v4_rules";
pub const V6_RULES_MAP: &str = "v6_rules";
pub const COUNTERS_MAP: &str = "counters";
pub const CONFIG_MAP: &str = "config";
pub const EVENTS_MAP: &str = "events";
pub const SETTINGS_MAP: &str = "settings";
pub const ALL_MAPS: [&str; 6] = [
    V4_RULES_MAP,
    V6_RULES_MAP,
    COUNTERS_MAP,
    CONFIG_MAP,
    EVENTS_MAP,
    SETTINGS_MAP,
];

/// Program (function) names in the eBPF object, also their pin names.
pub const PROGRAM_ETHERNET: &str = "egress_deny";
pub const PROGRAM_L3: &str = "egress_deny_l3";
pub const PROGRAM_EXEMPT: &str = "egress_deny_exempt";

const LINKS_DIR: &str = "links";
const REORDER_LINK_PREFIX: &str = "tmp_";
const STAGED_SUFFIX: &str = "_staged";
const POD_LINK_PREFIX: &str = "pod_";
const HOST_LINK_PREFIX: &str = "host_";
const ATTACHMENTS_DIR: &str = "attachments";

/// Which of the two program sections an interface needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    Ethernet,
    L3,
    /// Pods of excluded namespaces: marked, not judged (see the program).
    Exempt,
}

impl ProgramKind {
    pub const ALL: [ProgramKind; 3] = [ProgramKind::Ethernet, ProgramKind::L3, ProgramKind::Exempt];

    pub fn name(self) -> &'static str {
        match self {
            ProgramKind::Ethernet => PROGRAM_ETHERNET,
            ProgramKind::L3 => PROGRAM_L3,
            ProgramKind::Exempt => PROGRAM_EXEMPT,
        }
    }
}

/// The pinned objects under one pin dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn program(&self, kind: ProgramKind) -> PathBuf {
        self.root.join(kind.name())
    }

    /// A newly loaded program whose rule maps are not filled yet (an upgrade that
    /// replaced a rule map): promoted to [`Self::program`] by rename once they are.
    pub fn staged_program(&self, kind: ProgramKind) -> PathBuf {
        self.root.join(format!("{}{STAGED_SUFFIX}", kind.name()))
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join(LINKS_DIR)
    }

    /// Where a link re-attached at the front of its hook is pinned for a moment before
    /// it is renamed over the attachment's pin (see `order`).
    pub fn reorder_link(&self, old_link_id: u32) -> PathBuf {
        self.links_dir().join(format!(
            "{REORDER_LINK_PREFIX}{}_{old_link_id}",
            std::process::id()
        ))
    }

    /// Link pin of a pod attachment, keyed like CNI's attachment identity
    /// (container ID + interface name).
    pub fn pod_link(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.links_dir().join(pod_link_name(container_id, ifname))
    }

    pub fn host_link(&self, ifname: &str) -> PathBuf {
        self.links_dir()
            .join(bpffs_safe(&format!("{HOST_LINK_PREFIX}{ifname}")))
    }
}

pub fn pod_link_name(container_id: &str, ifname: &str) -> String {
    bpffs_safe(&format!("{POD_LINK_PREFIX}{container_id}_{ifname}"))
}

/// bpffs refuses names containing '.', which container IDs and interface names (VLAN
/// devices like `eth0.100`) may hold; '~' appears in neither.
pub fn bpffs_safe(name: &str) -> String {
    name.replace('.', "~")
}

/// Splits a pod link pin name back into (container ID, ifname). Interface names may
/// contain '_', container IDs (CNI: alphanumerics, '-', '.', '_') may too, so the
/// attachment record is the source of truth; this is only for listing.
pub fn is_pod_link_name(name: &str) -> bool {
    name.starts_with(POD_LINK_PREFIX)
}

/// A [`PinLayout::reorder_link`] pin (a leftover, when its daemon was killed).
pub fn is_reorder_link_name(name: &str) -> bool {
    name.starts_with(REORDER_LINK_PREFIX)
}

pub fn host_link_ifname(name: &str) -> Option<String> {
    name.strip_prefix(HOST_LINK_PREFIX)
        .map(|n| n.replace('~', "."))
}

/// Attachment records written by the plugin (JSON, one file per attachment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn attachments_dir(&self) -> PathBuf {
        self.root.join(ATTACHMENTS_DIR)
    }

    pub fn attachment_record(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.attachments_dir()
            .join(format!("{}.json", pod_link_name(container_id, ifname)))
    }
}
