//! Command-line parts several subcommands share: the state and CNI directories, the
//! bounds on a rules update, and the list values the daemon's flags take. Each
//! subcommand's own flags are in its file under `commands/`. Every flag here also reads an
//! EGRESS_DENY_* environment variable.
use std::path::PathBuf;

use clap::Args;
use egress_deny_datapath::paths::{DEFAULT_PIN_DIR, DEFAULT_STATE_DIR};
use ipnet::IpNet;

use crate::rules;

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

#[derive(Clone, Debug, Default)]
pub struct CidrList(pub Vec<IpNet>);

#[derive(Clone, Debug, Default)]
pub struct NameList(pub Vec<String>);

fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty())
}

pub fn parse_cidr_list(s: &str) -> Result<CidrList, String> {
    items(s)
        .map(|i| {
            i.parse::<IpNet>()
                .or_else(|_| i.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{i:?} is not a CIDR or address"))
        })
        .collect::<Result<_, _>>()
        .map(CidrList)
}

pub fn parse_name_list(s: &str) -> Result<NameList, String> {
    Ok(NameList(items(s).map(str::to_owned).collect()))
}

#[derive(Clone, Debug, Default)]
pub struct Nat64List(pub Vec<ipnet::Ipv6Net>);

pub fn parse_nat64_list(s: &str) -> Result<Nat64List, String> {
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

pub fn parse_mark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a 32-bit mark (hex 0x... or decimal)"))
}
