//! One verdict per packet, with the default deployment (host interfaces filtered): a
//! filtered pod's packet is judged at its veth and not again at the uplink; node traffic
//! and traffic from sources we did not attach are judged at the uplink; pods of excluded
//! namespaces reach denied addresses off the node. Real installer, plugin, libcni
//! runtime (bridge and ptp primaries), iptables marks of a kube-proxy-style neighbour.
use anyhow::{Context, Result};
use egress_deny_datapath::counters::CounterMap;
use egress_deny_tests::{
    cni::{ALLOWED, CniNode, DENIED, Primary, hand_made_pod},
    installer::{Installer, InstallerDirs},
    probe::{ping, udp_through},
    require_root, tests_over, wait_until,
};
use serde_json::json;
use std::time::Duration;

struct Node {
    node: CniNode,
    dirs: InstallerDirs,
    conflist: std::path::PathBuf,
    /// Kept running for the test's length (stopped on drop).
    installer: Installer,
}

/// A node with `primary`, `excluded` as excluded namespaces, DENIED denied and the
/// uplink up0 filtered (as `auto` would pick it on a real node).
fn node(primary: Primary, extra_flags: &[&str]) -> Result<Node> {
    let mut flags = vec!["--host-interfaces=up0", "--exclude-namespaces=kube-system"];
    flags.extend_from_slice(extra_flags);
    let (node, dirs, conflist, installer) = CniNode::with_ready_installer(primary, &flags)?;
    Ok(Node {
        node,
        dirs,
        conflist,
        installer,
    })
}

impl Node {
    /// Adds `rule` (`iptables` arguments) in the node.
    fn iptables(&self, rule: &str) -> Result<()> {
        let args: Vec<&str> = rule.split_whitespace().collect();
        self.node.node.exec("iptables", &args).map(drop)
    }

    fn uplink_counters(&self) -> Result<egress_deny_common::Counters> {
        let ifindex: u32 = self
            .node
            .node
            .exec("cat", &["/sys/class/net/up0/ifindex"])?
            .trim()
            .parse()?;
        Ok(CounterMap::open(&self.dirs.layout())?.get(ifindex)?)
    }
}

/// Filtered pod → allowed server: judged once (at the veth); the uplink counts every
/// packet as judged before. Filtered pod → denied: dropped at the veth. Node → denied:
/// dropped at the uplink.
fn one_lookup_per_forwarded_packet(primary: Primary) -> Result<()> {
    require_root();
    let n = node(primary, &["--trust-pod-verdicts"])?;
    let pod = n
        .node
        .added_pod(&n.conflist, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart")?;
    assert_eq!(
        udp_through(pod.ns(), &n.node.server, DENIED, ALLOWED, 3)?,
        0
    );
    let before = n.uplink_counters()?;
    assert_eq!(
        udp_through(pod.ns(), &n.node.server, ALLOWED, ALLOWED, 200)?,
        200
    );
    let after = n.uplink_counters()?;
    let judged_before = after.judged_before_packets - before.judged_before_packets;
    let forwarded = after.allowed_packets - before.allowed_packets;
    eprintln!("{primary:?}: uplink saw {forwarded} allowed packets, {judged_before} judged before");
    // 200 probes + at least one marker: every one passed without a second lookup. The
    // node's own packets in that time (ARP, neighbour discovery) are looked up there.
    assert!(
        judged_before >= 201,
        "a forwarded pod packet was looked up again: {judged_before} of {forwarded}"
    );
    assert!(
        forwarded - judged_before <= 5,
        "{forwarded} allowed, {judged_before} judged before"
    );
    let (_, metrics) = n.installer.http("/metrics")?;
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "egress_deny_packets_judged_before_total{kind=\"host\",interface=\"up0\""
        ) && l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| v >= 201)),
        "{metrics}"
    );
    assert!(
        !ping(&n.node.node, DENIED),
        "node traffic must be judged at the uplink"
    );
    assert!(ping(&n.node.node, ALLOWED));
    Ok(())
}

/// Forwarded traffic from a source we did not attach (a pod whose attachment is
/// missing, a secondary network that does not chain us, a VM routed through the node)
/// carries no mark: the uplink judges it.
#[test]
fn traffic_from_an_unattached_source_is_judged_at_the_uplink() -> Result<()> {
    require_root();
    let n = node(Primary::Ptp, &[])?;
    let (pod, host) = hand_made_pod(&n.node)?;
    n.node
        .node
        .ip(&format!("addr add 10.250.0.1/32 dev {host}"))?;
    n.node
        .node
        .ip(&format!("route add 10.250.0.2/32 dev {host}"))?;
    pod.ip("addr add 10.250.0.2/32 dev eth0")?;
    pod.ip("link set eth0 up")?;
    pod.ip("route add 10.250.0.1/32 dev eth0")?;
    pod.ip("route add default via 10.250.0.1")?;
    n.node.server.ip("route add 10.250.0.0/24 via 172.30.0.1")?;
    assert_eq!(udp_through(&pod, &n.node.server, ALLOWED, ALLOWED, 3)?, 3);
    assert_eq!(
        udp_through(&pod, &n.node.server, DENIED, ALLOWED, 5)?,
        0,
        "unattached source reached a denied address"
    );
    Ok(())
}

/// A kube-proxy-style neighbour ORs its own bits into the mark of forwarded packets
/// (0x4000 masquerade); another clears the whole mark. Neither opens a path: ORed bits
/// leave ours alone (one lookup still), a cleared mark only costs a second lookup.
#[test]
fn other_components_marks_neither_open_a_path_nor_break_one_lookup() -> Result<()> {
    require_root();
    let n = node(Primary::Bridge, &["--trust-pod-verdicts"])?;
    n.iptables("-t mangle -A FORWARD -j MARK --or-mark 0x4000")?;
    let pod = n.node.added_pod(&n.conflist, "")?;
    let before = n.uplink_counters()?;
    assert_eq!(
        udp_through(pod.ns(), &n.node.server, ALLOWED, ALLOWED, 50)?,
        50
    );
    let after = n.uplink_counters()?;
    assert!(after.judged_before_packets - before.judged_before_packets >= 51);
    assert_eq!(
        udp_through(pod.ns(), &n.node.server, DENIED, ALLOWED, 5)?,
        0
    );

    n.iptables("-t mangle -A FORWARD -j MARK --set-mark 0")?;
    let before = n.uplink_counters()?;
    assert_eq!(
        udp_through(pod.ns(), &n.node.server, ALLOWED, ALLOWED, 50)?,
        50
    );
    let after = n.uplink_counters()?;
    assert_eq!(
        after.judged_before_packets, before.judged_before_packets,
        "a cleared mark must mean a second lookup"
    );
    assert_eq!(
        udp_through(pod.ns(), &n.node.server, DENIED, ALLOWED, 5)?,
        0
    );
    Ok(())
}
/// CNI_ARGS of a pod in the excluded namespace.
const EXEMPT_POD: &str = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns";

/// A pod in an excluded namespace reaches a denied address off the node (its veth gets
/// the exempt program, which marks without judging); a filtered pod on the same node
/// stays filtered.
fn excluded_pods_are_exempt_off_the_node(primary: Primary) -> Result<()> {
    require_root();
    let n = node(primary, &[])?;
    let exempt = n.node.added_pod(&n.conflist, EXEMPT_POD)?;
    let filtered = n
        .node
        .added_pod(&n.conflist, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart")?;
    wait_until("the exempt pod out", Duration::from_secs(5), || {
        udp_through(exempt.ns(), &n.node.server, DENIED, ALLOWED, 3).is_ok_and(|n| n == 3)
    })
    .context("a pod of an excluded namespace cannot reach a denied address off the node")?;
    assert_eq!(
        udp_through(filtered.ns(), &n.node.server, DENIED, ALLOWED, 3)?,
        0
    );
    assert!(!ping(&n.node.node, DENIED));
    // DEL removes the exempt attachment like any other.
    exempt
        .del(&n.conflist, EXEMPT_POD)?
        .map_err(anyhow::Error::msg)?;
    assert!(
        !n.dirs
            .layout()
            .pod_link(&exempt.container_id, "eth0")
            .exists(),
        "the exempt attachment outlived DEL"
    );
    Ok(())
}

// The tests above, once per primary plugin.
tests_over!(
    one_lookup_per_forwarded_packet:
        bridge_pod_packets_are_judged_once => Primary::Bridge,
        ptp_pod_packets_are_judged_once => Primary::Ptp;
    excluded_pods_are_exempt_off_the_node:
        excluded_pods_are_exempt_off_the_node_bridge => Primary::Bridge,
        excluded_pods_are_exempt_off_the_node_ptp => Primary::Ptp;
);

/// NAT64 on an IPv6-only path: a pod (dual-stack bridge network through the real
/// runtime) sends to `64:ff9b::198.51.100.7`, which only the IPv4 rule
/// `198.51.100.7/32` covers: dropped at its veth; `64:ff9b::192.0.2.10` passes; and
/// `lookup` explains the decision.
#[test]
fn nat64_destinations_follow_the_ipv4_rules_through_a_real_runtime() -> Result<()> {
    require_root();
    let n = node(Primary::Bridge, &[])?;
    // IPv6 between node and server, and the NAT64 addresses on the server.
    n.node.node.ip("addr add fd00:30::1/64 dev up0 nodad")?;
    n.node.server.ip("addr add fd00:30::2/64 dev eth0 nodad")?;
    n.node.server.ip("addr add 64:ff9b::c633:6407/128 dev lo")?;
    n.node.server.ip("addr add 64:ff9b::c000:20a/128 dev lo")?;
    n.node.server.ip("route add fd00:244::/64 via fd00:30::1")?;
    n.node.node.ip("route add 64:ff9b::/96 via fd00:30::2")?;
    n.node
        .node
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
    let dual = json!({ "cniVersion": "1.0.0", "name": "k8s-dual", "plugins": [{
        "type": "bridge", "bridge": "edbr6", "isGateway": true, "ipMasq": false,
        "ipam": { "type": "host-local",
            "ranges": [[{ "subnet": "10.244.6.0/24" }], [{ "subnet": "fd00:244::/64" }]],
            "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }],
            "dataDir": n.node.dir.path().join("ipam6") } }] });
    let conflist = n.dirs.conf_dir().join("05-dual.conflist");
    std::fs::write(&conflist, serde_json::to_vec(&dual)?)?;
    wait_until(
        "our entry in the dual-stack conflist",
        Duration::from_secs(10),
        || std::fs::read_to_string(&conflist).is_ok_and(|c| c.contains("egress-deny")),
    )?;
    let pod = n.node.added_pod(&conflist, "")?;
    let (allowed, denied) = ("64:ff9b::c000:20a", "64:ff9b::c633:6407");
    // The bridge's IPv6 gateway address may still be tentative (DAD) at first.
    wait_until("IPv6 through the bridge", Duration::from_secs(10), || {
        udp_through(pod.ns(), &n.node.server, allowed, allowed, 1).is_ok_and(|n| n == 1)
    })?;
    assert_eq!(
        udp_through(pod.ns(), &n.node.server, denied, allowed, 5)?,
        0,
        "an IPv4-denied address reached through NAT64"
    );
    let lookup = n.dirs.lookup(Some(&n.node.node), &[denied])?;
    assert!(
        lookup.starts_with(&format!("{denied} deny {DENIED}/32"))
            && lookup.contains("through the NAT64 prefix 64:ff9b::/96"),
        "{lookup}"
    );
    Ok(())
}

/// A Service whose endpoint is outside the node: the pod sends to the Service's virtual
/// IP (allowed at its veth), the node DNATs it to a denied address. By default the
/// uplink judges the rewritten destination and drops it; with --trust-pod-verdicts the
/// veth's verdict on the virtual IP stands (the documented price of one lookup), which
/// this test also shows, so that the default's zero is not an artefact of the set-up.
#[test]
fn a_service_dnat_to_a_denied_endpoint_is_judged_at_the_uplink() -> Result<()> {
    require_root();
    for (trust, expect) in [(false, 0), (true, 3)] {
        let flags: &[&str] = if trust {
            &["--trust-pod-verdicts"]
        } else {
            &[]
        };
        let n = node(Primary::Bridge, flags)?;
        n.iptables(&format!(
            "-t nat -A PREROUTING -d 10.96.0.10 -p udp -j DNAT --to-destination {DENIED}"
        ))?;
        let pod = n.node.added_pod(&n.conflist, "")?;
        assert_eq!(
            udp_through(pod.ns(), &n.node.server, "10.96.0.10", ALLOWED, 3)?,
            expect,
            "trust pod verdicts: {trust}"
        );
    }
    Ok(())
}
