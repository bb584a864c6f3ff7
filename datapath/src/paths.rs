//! Every bpffs path and object name egress-deny uses, in one place.
//!
//! Layout under the pin dir (DESIGN.md "bpffs layout"):
//! ```text
//! <pinDir>/egress_deny        program for Ethernet devices
//! <pinDir>/egress_deny_l3     program for L3 devices (wireguard, ipip, tun)
//! <pinDir>/egress_deny_staged, egress_deny_l3_staged
//!                             a new program waiting for its new rule maps to be filled
//! <pinDir>/egress_deny_new, …  a program being pinned, renamed over its final pin
//! <pinDir>/v4_table           IPv4 rule table (outer map; the compiled table in slot 0)
//! <pinDir>/v6_table           IPv6 rule table
//! <pinDir>/v4_rules, v6_rules LPM tries of older versions, unpinned on upgrade
//! <pinDir>/counters           per-CPU counters per attachment (ifindex)
//! <pinDir>/config             datapath settings (deny-event rate)
//! <pinDir>/egress_deny_exempt  program for veths of pods in excluded namespaces
//! <pinDir>/events             ring buffer of deny events
//! <pinDir>/settings           judged-packet mark, NAT64 prefixes
//! <pinDir>/links/pod+<network>+<containerID>+<ifname>
//!                             TCX link of a pod attachment (fields escaped, see
//!                             [`AttachmentId::name`]); `pod_<containerID>_<ifname>`
//!                             from versions before the network was part of the name
//! <pinDir>/links/host_<ifname>                TCX link of a host interface
//! ```
use std::path::{Path, PathBuf};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress-deny";
/// Where the plugin records attachments for the installer (tmpfs: same lifetime as pins).
pub const DEFAULT_STATE_DIR: &str = "/run/egress-deny";

/// Map names: the names the eBPF object gives them and their pin names.
/// The compiled rule tables (outer maps; the table in force is in slot 0).
pub const V4_TABLE_MAP: &str = "v4_table";
pub const V6_TABLE_MAP: &str = "v6_table";
pub const COUNTERS_MAP: &str = "counters";
pub const CONFIG_MAP: &str = "config";
pub const EVENTS_MAP: &str = "events";
pub const SETTINGS_MAP: &str = "settings";
pub const ALL_MAPS: [&str; 6] = [
    V4_TABLE_MAP,
    V6_TABLE_MAP,
    COUNTERS_MAP,
    CONFIG_MAP,
    EVENTS_MAP,
    SETTINGS_MAP,
];

/// Pins of maps older versions had (the LPM-trie rule maps): unpinned once the
/// attachments run a program that does not read them.
pub const RETIRED_MAPS: [&str; 2] = ["v4_rules", "v6_rules"];

/// Program (function) names in the eBPF object, also their pin names.
pub const PROGRAM_ETHERNET: &str = "egress_deny";
pub const PROGRAM_L3: &str = "egress_deny_l3";
pub const PROGRAM_EXEMPT: &str = "egress_deny_exempt";

const LINKS_DIR: &str = "links";
const REORDER_LINK_PREFIX: &str = "tmp_";
const STAGED_SUFFIX: &str = "_staged";
const PINNING_SUFFIX: &str = "_new";
const POD_LINK_PREFIX: &str = "pod+";
const LEGACY_POD_LINK_PREFIX: &str = "pod_";
const FIELD_SEPARATOR: char = '+';
const ESCAPE: char = '%';
const RECORD_SUFFIX: &str = ".json";
const HOST_LINK_PREFIX: &str = "host_";
const ATTACHMENTS_DIR: &str = "attachments";
const HOST_ATTACHMENTS_DIR: &str = "hosts";
const DAEMON_LOCK: &str = "daemon.lock";
const DAEMON_STATUS: &str = "status.json";

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

    /// Where a newly loaded program is pinned before it is renamed over its final pin
    /// ([`Self::program`] or [`Self::staged_program`]): a pin appears whole or not at all.
    pub fn pinning_program(&self, kind: ProgramKind) -> PathBuf {
        self.root.join(format!("{}{PINNING_SUFFIX}", kind.name()))
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

    /// Link pin of a pod attachment.
    pub fn pod_link_for(&self, id: &AttachmentId) -> PathBuf {
        self.links_dir().join(id.name())
    }

    /// Where versions before the network was part of the name pinned the link (an
    /// upgrade leaves these behind; DEL, GC and uninstall still remove them).
    pub fn legacy_pod_link(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.links_dir()
            .join(legacy_pod_link_name(container_id, ifname))
    }

    /// For callers that do not know the network (tools, tests): the pin of
    /// (container ID, ifname) on whichever network has one, else the legacy name. The
    /// plugin and the installer use [`Self::pod_link_for`].
    pub fn pod_link(&self, container_id: &str, ifname: &str) -> PathBuf {
        find_named(&self.links_dir(), "", container_id, ifname)
            .unwrap_or_else(|| self.legacy_pod_link(container_id, ifname))
    }

    pub fn host_link(&self, ifname: &str) -> PathBuf {
        self.links_dir()
            .join(bpffs_safe(&format!("{HOST_LINK_PREFIX}{ifname}")))
    }
}

/// The name versions before the network was part of it used: ambiguous (`_` joins
/// fields that may contain `_`; `.` and `~` both become `~`), kept only to find and
/// remove what those versions left.
pub fn legacy_pod_link_name(container_id: &str, ifname: &str) -> String {
    bpffs_safe(&format!("{LEGACY_POD_LINK_PREFIX}{container_id}_{ifname}"))
}

/// bpffs refuses names containing '.', which container IDs and interface names (VLAN
/// devices like `eth0.100`) may hold. Only for host links and legacy pod names: not
/// reversible when the name holds a '~'.
pub fn bpffs_safe(name: &str) -> String {
    name.replace('.', "~")
}

/// Any pod link pin, current or legacy naming.
pub fn is_pod_link_name(name: &str) -> bool {
    name.starts_with(POD_LINK_PREFIX) || name.starts_with(LEGACY_POD_LINK_PREFIX)
}

/// A pod link pin named by a version before the network was part of the name.
pub fn is_legacy_pod_link_name(name: &str) -> bool {
    name.starts_with(LEGACY_POD_LINK_PREFIX)
}

/// One pod attachment as CNI identifies it: network name (the conflist `name`),
/// container ID, interface name inside the pod. Runtimes (and GC's
/// `cni.dev/valid-attachments`) speak per network, so pins and records carry it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttachmentId {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

/// Longest encoded name accepted: the record file adds `.json`, its temp file a dot
/// and `.tmp<pid>`, and a bpffs or tmpfs name has at most 255 bytes.
pub const MAX_ATTACHMENT_NAME: usize = 230;

impl AttachmentId {
    pub fn new(network: &str, container_id: &str, ifname: &str) -> Self {
        Self {
            network: network.to_owned(),
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        }
    }

    /// `pod+<network>+<containerID>+<ifname>`, each field with every byte outside
    /// `[A-Za-z0-9_-]` written as `%XX` (uppercase hex): no field holds a `+`, no name
    /// a `.` (bpffs refuses it), and [`Self::parse_name`] inverts it exactly.
    pub fn name(&self) -> String {
        let mut name = String::from(POD_LINK_PREFIX);
        for (i, field) in [&self.network, &self.container_id, &self.ifname]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                name.push(FIELD_SEPARATOR);
            }
            escape_into(&mut name, field);
        }
        name
    }

    /// The inverse of [`Self::name`]; `None` for anything [`Self::name`] would not
    /// produce (legacy names, other pins, non-canonical escapes).
    pub fn parse_name(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(POD_LINK_PREFIX)?;
        let mut fields = rest.split(FIELD_SEPARATOR);
        let (network, container_id, ifname) = (
            unescape(fields.next()?)?,
            unescape(fields.next()?)?,
            unescape(fields.next()?)?,
        );
        if fields.next().is_some() {
            return None;
        }
        let id = Self {
            network,
            container_id,
            ifname,
        };
        (id.name() == name).then_some(id)
    }

    /// Refuses identities whose name would not fit a file name.
    pub fn check_length(&self) -> Result<(), String> {
        let len = self.name().len();
        if len > MAX_ATTACHMENT_NAME {
            return Err(format!(
                "network {:?}, container {:?}, interface {:?}: encoded name is {len} bytes (at most {MAX_ATTACHMENT_NAME})",
                self.network, self.container_id, self.ifname
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for AttachmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.network, self.container_id, self.ifname)
    }
}

fn escape_into(out: &mut String, field: &str) {
    for byte in field.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(char::from(byte));
        } else {
            out.push(ESCAPE);
            out.push_str(&format!("{byte:02X}"));
        }
    }
}

fn unescape(field: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(field.len());
    let mut iter = field.bytes();
    while let Some(byte) = iter.next() {
        if byte == ESCAPE as u8 {
            let hex = [iter.next()?, iter.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
        } else {
            bytes.push(byte);
        }
    }
    String::from_utf8(bytes).ok()
}

/// The entry of `dir` named `<current name of (network, container, ifname)><suffix>`
/// for any network.
fn find_named(dir: &Path, suffix: &str, container_id: &str, ifname: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name();
        let id = AttachmentId::parse_name(name.to_str()?.strip_suffix(suffix)?)?;
        (id.container_id == container_id && id.ifname == ifname).then(|| entry.path())
    })
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

    /// Held (flock) by the running daemon: one per node, a second one waits.
    pub fn daemon_lock(&self) -> PathBuf {
        self.root.join(DAEMON_LOCK)
    }

    /// The daemon's last sync, attachments and errors, for `status` (JSON).
    pub fn daemon_status(&self) -> PathBuf {
        self.root.join(DAEMON_STATUS)
    }

    /// Host-interface attachments the installer made (its own, not the plugin's).
    pub fn host_attachments_dir(&self) -> PathBuf {
        self.root.join(HOST_ATTACHMENTS_DIR)
    }

    /// The record of the installer's attachment to host interface `ifname`: a cls_bpf
    /// filter has no pin to find it by (a TCX link has, and gets a record too).
    pub fn host_record(&self, ifname: &str) -> PathBuf {
        let mut name = String::new();
        escape_into(&mut name, ifname);
        self.host_attachments_dir()
            .join(format!("{name}{RECORD_SUFFIX}"))
    }

    pub fn record_for(&self, id: &AttachmentId) -> PathBuf {
        self.attachments_dir()
            .join(format!("{}{RECORD_SUFFIX}", id.name()))
    }

    /// Where versions before the network was part of the name wrote the record.
    pub fn legacy_record(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.attachments_dir().join(format!(
            "{}{RECORD_SUFFIX}",
            legacy_pod_link_name(container_id, ifname)
        ))
    }

    /// For callers that do not know the network (tools, tests): the record of
    /// (container ID, ifname) on whichever network has one, else the legacy name.
    pub fn attachment_record(&self, container_id: &str, ifname: &str) -> PathBuf {
        find_named(&self.attachments_dir(), RECORD_SUFFIX, container_id, ifname)
            .unwrap_or_else(|| self.legacy_record(container_id, ifname))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unambiguous_bpffs_safe_and_reversible() {
        let ids = [
            AttachmentId::new("net", "a_b", "c"),
            AttachmentId::new("net", "a", "b_c"),
            AttachmentId::new("net", "c1", "x.y"),
            AttachmentId::new("net", "c1", "x~y"),
            AttachmentId::new("net", "c1", "x%2Ey"),
            AttachmentId::new("net+a", "b", "c"),
            AttachmentId::new("net", "a+b", "c"),
            AttachmentId::new("my.net", "0123abc.def-1", "eth0"),
            AttachmentId::new("", "c", "\u{e9}th0"),
        ];
        let names: std::collections::HashSet<String> = ids.iter().map(|id| id.name()).collect();
        assert_eq!(names.len(), ids.len(), "{names:?}");
        for id in &ids {
            let name = id.name();
            assert!(!name.contains('.') && !name.contains('/'), "{name}");
            assert!(is_pod_link_name(&name) && !is_legacy_pod_link_name(&name));
            assert_eq!(AttachmentId::parse_name(&name).as_ref(), Some(id), "{name}");
        }
        // Legacy and foreign names, and non-canonical spellings, are not ids.
        for name in [
            "pod_a_b_c",
            "host_eth0",
            "pod+n+c",
            "pod+n+c+i+j",
            "pod+n+c+%2e",
            "pod+n+c+%2",
            "pod+n+c+%41",
            "pod+n+c+a.b",
        ] {
            assert_eq!(AttachmentId::parse_name(name), None, "{name}");
        }
        assert!(is_legacy_pod_link_name("pod_a_b_c") && is_pod_link_name("pod_a_b_c"));
    }

    #[test]
    fn overlong_names_are_refused() {
        let id = AttachmentId::new("net", &".".repeat(100), "eth0");
        assert!(id.check_length().is_err());
        assert!(
            AttachmentId::new("net", &"a".repeat(64), "eth0")
                .check_length()
                .is_ok()
        );
    }

    #[test]
    fn lookups_without_the_network_fall_back_to_the_legacy_name() {
        let dir = tempfile_dir();
        let state = StateLayout::new(&dir);
        assert_eq!(
            state.attachment_record("c", "eth0"),
            state.legacy_record("c", "eth0")
        );
        std::fs::create_dir_all(state.attachments_dir()).unwrap();
        let id = AttachmentId::new("n1", "c", "eth0");
        std::fs::write(state.record_for(&id), b"{}").unwrap();
        assert_eq!(state.attachment_record("c", "eth0"), state.record_for(&id));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hostile_fields_round_trip_into_one_plain_file_name() {
        let long = "x".repeat(200);
        let fields = [
            "",
            ".",
            "..",
            "../../etc",
            "/",
            "a/b",
            "%",
            "%41",
            "+",
            "~",
            "a b",
            "tab\t",
            "nl\n",
            "nul\0",
            "é",
            "日本",
            "🦀",
            "e\u{301}",
            "-_",
            &long,
        ];
        let dir = PinLayout::new("/sys/fs/bpf/egress-deny");
        for field in fields {
            for id in [
                AttachmentId::new(field, "c", "eth0"),
                AttachmentId::new("net", field, "eth0"),
                AttachmentId::new("net", "c", field),
            ] {
                let name = id.name();
                assert!(
                    name.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-+%".contains(&b)),
                    "{name}"
                );
                assert_eq!(name.matches('+').count(), 3, "{name}");
                assert_eq!(AttachmentId::parse_name(&name), Some(id.clone()), "{name}");
                assert_eq!(dir.pod_link_for(&id).parent(), Some(&*dir.links_dir()));
            }
        }
    }

    #[test]
    fn escapes_are_uppercase_per_byte_and_only_canonical_ones_parse() {
        assert_eq!(
            AttachmentId::new("a.b", "é", "x/y").name(),
            "pod+a%2Eb+%C3%A9+x%2Fy"
        );
        for name in [
            "pod+n+c+%c3%a9",
            "pod+n+c+%FF",
            "pod+n+c+%G1",
            "pod+n+c+%",
            "pod+n+c+%%",
            "pod+n+c+-%2",
            "pod+n+c+%2D",
            "pod+n+c+a/b",
            "pod+n+c+é",
            "pod+",
            "",
        ] {
            assert_eq!(AttachmentId::parse_name(name), None, "{name}");
        }
        assert_eq!(
            AttachmentId::parse_name("pod+n+c+%2B").map(|id| id.ifname),
            Some("+".to_owned())
        );
        assert_eq!(
            AttachmentId::parse_name("pod+++"),
            Some(AttachmentId::new("", "", ""))
        );
    }

    #[test]
    fn the_length_limit_counts_escaped_bytes() {
        // "pod+n+" + container + "+e": 8 bytes besides the container ID.
        let at_limit = AttachmentId::new("n", &"a".repeat(MAX_ATTACHMENT_NAME - 8), "e");
        assert_eq!(at_limit.name().len(), MAX_ATTACHMENT_NAME);
        assert!(at_limit.check_length().is_ok());
        let over = AttachmentId::new("n", &"a".repeat(MAX_ATTACHMENT_NAME - 7), "e");
        let err = over.check_length().unwrap_err();
        assert!(err.contains("231 bytes (at most 230)"), "{err}");
        // 'é' is two bytes, each written as three.
        let wide = AttachmentId::new("n", &"é".repeat(38), "e");
        assert_eq!(wide.name().len(), 8 + 38 * 6);
        assert!(wide.check_length().is_err());
    }

    #[test]
    fn host_names_stay_in_their_directory_and_read_back() {
        let state = StateLayout::new("/run/egress-deny");
        for ifname in ["eth0", "eth0.100", "..", "a/../../b", "é"] {
            let record = state.host_record(ifname);
            assert_eq!(record.parent(), Some(&*state.host_attachments_dir()));
            let file = record.file_name().unwrap().to_str().unwrap();
            assert_eq!(file.matches('.').count(), 1, "{file}");
        }
        let pins = PinLayout::new("/sys/fs/bpf/egress-deny");
        let link = pins.host_link("eth0.100");
        let name = link.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "host_eth0~100");
        assert_eq!(host_link_ifname(name).as_deref(), Some("eth0.100"));
        assert_eq!(host_link_ifname("pod+n+c+i"), None);
    }

    #[test]
    fn legacy_names_are_ambiguous_which_is_why_they_were_replaced() {
        assert_eq!(
            legacy_pod_link_name("a_b", "c"),
            legacy_pod_link_name("a", "b_c")
        );
        assert_eq!(legacy_pod_link_name("c1", "x.y"), "pod_c1_x~y");
        assert_eq!(
            legacy_pod_link_name("c1", "x.y"),
            legacy_pod_link_name("c1", "x~y")
        );
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "egress-deny-paths-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
