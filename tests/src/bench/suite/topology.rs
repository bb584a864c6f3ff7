//! The namespaces the suite builds: pod → veth → node (forwards; the filter under test
//! sits here: tc ingress of the pod's veth, or FORWARD) → veth → server (iperf3, ping
//! target, UDP echo, and every traffic destination as a local address).
use std::net::Ipv4Addr;

use anyhow::Result;

use crate::Netns;

/// The server's own address (eth0): iperf3's, ping's and the echo's destination.
pub const SERVER: &str = "10.10.2.2";
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
/// The node's end of the pod's veth: where the eBPF filters attach (tc ingress).
pub const POD_VETH: &str = "podveth";

pub struct Topology {
    pub pod: Netns,
    pub node: Netns,
    pub server: Netns,
}

impl Topology {
    /// Namespaces `<prefix>p-…`, `<prefix>n-…`, `<prefix>s-…`: the pod on 10.10.1.0/24,
    /// the server on 10.10.2.0/24, the node .1 on both.
    pub fn new(prefix: &str) -> Result<Self> {
        let pod = Netns::new(&format!("{prefix}p"))?;
        let node = Netns::new(&format!("{prefix}n"))?;
        let server = Netns::new(&format!("{prefix}s"))?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        join_to_node(&node, &pod, POD_VETH, 1)?;
        join_to_node(&node, &server, "srvveth", 2)?;
        Ok(Self { pod, node, server })
    }
}

/// A veth from `node_end` (10.10.`subnet`.1/24) in the node to eth0 (10.10.`subnet`.2/24)
/// in `ns`, whose default route then points at the node.
fn join_to_node(node: &Netns, ns: &Netns, node_end: &str, subnet: u8) -> Result<()> {
    let (node_addr, ns_addr) = (
        Ipv4Addr::new(10, 10, subnet, 1),
        Ipv4Addr::new(10, 10, subnet, 2),
    );
    node.ip(&format!(
        "link add {node_end} type veth peer name eth0 netns {}",
        ns.name
    ))?;
    for (side, dev, addr) in [(node, node_end, node_addr), (ns, "eth0", ns_addr)] {
        side.ip(&format!("addr add {addr}/24 dev {dev}"))?;
        side.ip(&format!("link set {dev} up"))?;
    }
    ns.ip(&format!("route add default via {node_addr}"))?;
    Ok(())
}
