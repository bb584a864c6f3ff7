//! Command line: every flag also reads an EGRESS_DENY_* environment variable.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use egress_deny_datapath::paths::{DEFAULT_PIN_DIR, DEFAULT_STATE_DIR};
use ipnet::IpNet;

use crate::rules;

#[derive(Parser, Debug)]
#[command(
    name = "egress-deny-installer",
    version,
    about = "Node-wide egress deny list: installs the egress-deny CNI plugin, owns its eBPF program and maps, syncs the rules"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the per-node daemon (DaemonSet).
    Run(Box<RunArgs>),
    /// Remove the conflist entry, detach everything, unpin, remove the plugin binary.
    Uninstall(UninstallArgs),
    /// Rules per family, attachments, last sync.
    Status(StateArgs),
    /// How the live maps decide each address.
    Lookup(LookupArgs),
    /// Offline tools for rule lists (no node needed): validate, make ConfigMaps.
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Validate rule files or rules directories with the daemon's parser: every error
    /// with file and line, counts per family; exit 1 on any error (a CI step).
    Check(CheckArgs),
    /// Turn rule lists into gzip ConfigMaps under the size limit (deterministic), and
    /// the DaemonSet patch that mounts them all into the rules volume.
    Configmaps(ConfigmapsArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Rule files, or directories read as the daemon reads its rules directory
    /// (kubelet's `..data` layout, hidden entries skipped); all together are one update.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// One JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ManifestFormat {
    /// Multi-document YAML.
    Yaml,
    /// One JSON `List`.
    Json,
}

#[derive(Args, Debug)]
pub struct ConfigmapsArgs {
    /// Prefix of the ConfigMaps' names (each gets the address block it holds appended).
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value = "kube-system")]
    pub namespace: String,
    /// Upper bound on each ConfigMap's `binaryData` as stored (base64); the default
    /// leaves 128 KiB of the API server's 1 MiB for the rest of the object.
    #[arg(long, default_value_t = crate::rules_tools::configmaps::DEFAULT_MAX_BYTES)]
    pub max_bytes: usize,
    #[arg(long, value_enum, default_value = "yaml")]
    pub output: ManifestFormat,
    /// Also write a strategic-merge patch of the DaemonSet that mounts exactly these
    /// ConfigMaps (and the `--also-mount` ones) as the rules volume: a kustomize
    /// `patches:` entry, or `kubectl patch daemonset --patch-file`.
    #[arg(long)]
    pub patch: Option<PathBuf>,
    /// The DaemonSet the patch targets.
    #[arg(long, default_value = "egress-deny")]
    pub daemonset: String,
    /// Other ConfigMaps the rules volume keeps (repeat; empty: none). Default: the
    /// base kustomization's own list, for local exceptions.
    #[arg(long, default_values_t = ["egress-deny-rules".to_owned()])]
    pub also_mount: Vec<String>,
    /// Rule files or rules directories (any format `rules check` accepts); the
    /// ConfigMaps hold them normalised: one prefix per line, sorted, duplicates dropped.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// bpffs directory of the program, maps and links (the DaemonSet's `bpffs` hostPath
    /// volume; written into the conflist entry when not the default).
    #[arg(long, env = "EGRESS_DENY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Attachment records (written by the plugin) and the daemon's sync status (the
    /// DaemonSet's `state` hostPath volume, a tmpfs: same lifetime as the pins).
    #[arg(long, env = "EGRESS_DENY_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct CniDirs {
    /// The node's CNI configuration directory, where the primary CNI's conflist gets our
    /// entry (the DaemonSet's `cni-conf` hostPath volume).
    #[arg(
        long,
        env = "EGRESS_DENY_CNI_CONF_DIR",
        default_value = "/etc/cni/net.d"
    )]
    pub cni_conf_dir: PathBuf,
    /// The node's CNI plugin directory, where the plugin binary is installed (the
    /// DaemonSet's `cni-bin` hostPath volume).
    #[arg(long, env = "EGRESS_DENY_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub cni: CniDirs,
    /// The rule lists: every regular file, kubelet's ConfigMap layout included (the
    /// DaemonSet's projected `rules` volume). A missing directory is an error that keeps
    /// the enforced rules; an empty one means no rules.
    #[arg(
        long,
        env = "EGRESS_DENY_RULES_DIR",
        default_value = "/etc/egress-deny/rules"
    )]
    pub rules_dir: PathBuf,
    /// Host interfaces filtered on tc egress (node traffic): `auto` (the interfaces of
    /// the default routes, followed as they change), `none`, or a comma list.
    #[arg(long, env = "EGRESS_DENY_HOST_INTERFACES", default_value = "auto")]
    pub host_interfaces: String,
    /// CIDRs that must stay reachable whatever the rules say (comma-separated; empty:
    /// none — the DaemonSet sets the variable even when unused).
    #[arg(long, env = "EGRESS_DENY_PROTECT", default_value = "", value_parser = parse_cidr_list)]
    pub protect: CidrList,
    /// The plugin binary to install (default: egress-deny next to this executable).
    #[arg(long, env = "EGRESS_DENY_PLUGIN_BINARY")]
    pub plugin_binary: Option<PathBuf>,
    /// Address of `/metrics`, `/healthz` and `/readyz` (the DaemonSet's probes and
    /// PodMonitor use its port).
    #[arg(long, env = "EGRESS_DENY_LISTEN", default_value = "0.0.0.0:9765")]
    pub listen: SocketAddr,
    /// Namespaces whose pods are not filtered (written into the conflist entry;
    /// comma-separated, empty: none).
    #[arg(long, env = "EGRESS_DENY_EXCLUDE_NAMESPACES", default_value = "", value_parser = parse_name_list)]
    pub exclude_namespaces: NameList,
    /// The container runtime's CNI cache (`results/`): pods it attached while the plugin
    /// was missing are found there and repaired.
    #[arg(
        long,
        env = "EGRESS_DENY_CNI_CACHE_DIR",
        default_value = "/var/lib/cni"
    )]
    pub cni_cache_dir: PathBuf,
    /// Deny events logged per second per attachment and CPU (0: off).
    #[arg(long, env = "EGRESS_DENY_DENY_EVENTS_PER_SECOND", default_value_t = 5)]
    pub deny_events_per_second: u32,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// skb->mark bit(s) the veths of pods in excluded namespaces set (and, with
    /// --trust-pod-verdicts, those of filtered pods on what they allowed), so that a
    /// filtered host interface passes their forwarded packets without a lookup; hex or
    /// decimal, 0 turns it off (excluded namespaces are then exempt only on the node
    /// itself). Pick bits no other component sets (kube-proxy: 0x4000/0x8000, Calico:
    /// its iptablesMarkMask, Cilium: 0x0F00 and identities in the upper 16 bits, Istio:
    /// 0x539, AWS VPC CNI: 0x80).
    #[arg(long, env = "EGRESS_DENY_JUDGED_MARK", default_value = "0x40000000", value_parser = parse_mark)]
    pub judged_mark: u32,
    /// Look a filtered pod's packet up once, at its veth: the host interfaces trust the
    /// judged mark on it too. Off by default: a destination rewritten after the veth (a
    /// Service DNAT'ed to an endpoint outside the node) is then not judged again; turn
    /// it on where no Service points outside the cluster, to save the second lookup
    /// (tests/BENCHMARKS.md, "One verdict per forwarded pod packet").
    #[arg(long, env = "EGRESS_DENY_TRUST_POD_VERDICTS")]
    pub trust_pod_verdicts: bool,
    /// NAT64 /96 prefixes whose embedded IPv4 addresses the IPv4 rules judge
    /// (comma-separated; empty: none).
    #[arg(long, env = "EGRESS_DENY_NAT64_PREFIXES", default_value = "64:ff9b::/96", value_parser = parse_nat64_list)]
    pub nat64_prefixes: Nat64List,
    /// Log lines as text, or as one JSON object per line (time, level, message; deny
    /// events also namespace, pod, interface, destination, rule, bytes) for log pipelines.
    #[arg(
        long,
        env = "EGRESS_DENY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: crate::logging::LogFormat,
}

#[derive(Clone, Debug, Default)]
pub struct Nat64List(pub Vec<ipnet::Ipv6Net>);

fn parse_nat64_list(s: &str) -> Result<Nat64List, String> {
    let prefixes = items(s)
        .map(|i| {
            i.parse::<ipnet::Ipv6Net>()
                .map_err(|_| format!("{i:?} is not an IPv6 prefix"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let settings = egress_deny_datapath::settings::DatapathSettings {
        judged_mark: 0,
        nat64_prefixes: prefixes.clone(),
        trust_pod_verdicts: false,
    };
    settings.validate().map_err(|e| e.to_string())?;
    Ok(Nat64List(prefixes))
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a 32-bit mark (hex 0x... or decimal)"))
}

/// Bounds on one rules update: an update over any of them is rejected whole (the
/// enforced rules stay) with an error naming the limit, rather than exhausting the
/// daemon's memory.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Bytes of all rule files together, after gzip decompression.
    #[arg(long, env = "EGRESS_DENY_MAX_RULES_BYTES", default_value_t = rules::DEFAULT_MAX_BYTES)]
    pub max_rules_bytes: u64,
    /// Rule lines (denies and exceptions, both families, duplicates included).
    #[arg(long, env = "EGRESS_DENY_MAX_RULES", default_value_t = rules::DEFAULT_MAX_RULES)]
    pub max_rules: u64,
    /// Bytes in one line of a rule file.
    #[arg(long, env = "EGRESS_DENY_MAX_LINE_BYTES", default_value_t = rules::DEFAULT_MAX_LINE)]
    pub max_line_bytes: usize,
    /// Kernel memory the compiled rule tables of both families may take together (about
    /// 18 bytes per IPv4 rule); a rule set compiling to more is rejected whole. 0: bounded
    /// only by what the daemon's memory cgroup has left.
    #[arg(long, env = "EGRESS_DENY_MAX_TABLE_BYTES", default_value_t = 0)]
    pub max_table_bytes: u64,
}

impl LimitArgs {
    pub fn limits(&self) -> rules::Limits {
        rules::Limits {
            max_bytes: self.max_rules_bytes,
            max_rules: self.max_rules,
            max_line: self.max_line_bytes,
        }
    }
}

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub cni: CniDirs,
}

#[derive(Args, Debug)]
pub struct LookupArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Addresses to decide, IPv4 or IPv6.
    #[arg(required = true)]
    pub addresses: Vec<std::net::IpAddr>,
}

#[derive(Clone, Debug, Default)]
pub struct CidrList(pub Vec<IpNet>);

#[derive(Clone, Debug, Default)]
pub struct NameList(pub Vec<String>);

fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty())
}

fn parse_cidr_list(s: &str) -> Result<CidrList, String> {
    items(s)
        .map(|i| {
            i.parse::<IpNet>()
                .or_else(|_| i.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{i:?} is not a CIDR or address"))
        })
        .collect::<Result<_, _>>()
        .map(CidrList)
}

fn parse_name_list(s: &str) -> Result<NameList, String> {
    Ok(NameList(items(s).map(str::to_owned).collect()))
}
