//! Destinations no rule may cut off (the API server, the default gateways, `--protect`):
//! each becomes an allow-exception, with a warning naming the deny rules it overrides.
use std::net::IpAddr;

use ipnet::IpNet;

use super::RuleSet;

/// Destinations that must stay reachable: the API server, the default gateways and the
/// `--protect` CIDRs.
pub fn protected(extra: &[IpNet]) -> Vec<(IpNet, String)> {
    let mut out: Vec<(IpNet, String)> = Vec::new();
    if let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") {
        match host.trim().parse::<IpAddr>() {
            Ok(ip) => out.push((IpNet::from(ip), "the Kubernetes API server".into())),
            Err(_) => {
                log::warn!("KUBERNETES_SERVICE_HOST {host:?} is not an IP address; not protected")
            }
        }
    }
    for (iface, gateway) in crate::node::default_routes() {
        if let Some(gw) = gateway {
            out.push((IpNet::from(gw), format!("the default gateway via {iface}")));
        }
    }
    for net in extra {
        out.push((net.trunc(), "--protect".into()));
    }
    out
}

/// Adds an allow-exception for each protected destination, warning about the deny
/// rules that would have cut it off.
pub fn add_protections(rules: &mut RuleSet, protected: &[(IpNet, String)]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (net, why) in protected {
        let covering = rules.denies_covering(*net);
        if !covering.is_empty() {
            let list: Vec<String> = covering.iter().map(ToString::to_string).collect();
            warnings.push(format!(
                "deny rule(s) {} cover {net} ({why}); keeping it reachable",
                list.join(", ")
            ));
        }
        rules.allow(*net);
    }
    warnings
}
