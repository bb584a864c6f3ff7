//! `run`: the flags of the per-node daemon (DaemonSet). The daemon itself is
//! `crate::daemon`, too large for one file.
use std::{net::SocketAddr, path::PathBuf};

use clap::Args;

use crate::cli::{
    CidrList, CniDirs, LimitArgs, NameList, Nat64List, StateArgs, parse_cidr_list, parse_mark,
    parse_name_list, parse_nat64_list,
};

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
