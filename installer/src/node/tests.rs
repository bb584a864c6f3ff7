use super::*;

/// A node with a default route through 192.168.1.1 on eth0, a default device route on
/// wg0, and two non-default routes (as `cat /proc/net/route` prints them).
const PROC_NET_ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
wg0\t00000000\t00000000\t0001\t0\t0\t200\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
cni0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";

/// A default route via fe80::1 on eth0, a link-local route, and the loopback's
/// unreachable default route the kernel always lists.
const PROC_NET_IPV6_ROUTE: &str = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

fn v4(a: u8, b: u8, c: u8, d: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
}

#[test]
fn ipv4_default_routes_give_interface_and_gateway_in_network_order() {
    assert_eq!(
        ipv4_default_routes(PROC_NET_ROUTE),
        vec![("eth0".into(), v4(192, 168, 1, 1)), ("wg0".into(), None)]
    );
}

#[test]
fn ipv6_default_routes_skip_the_loopback() {
    assert_eq!(
        ipv6_default_routes(PROC_NET_IPV6_ROUTE),
        vec![("eth0".into(), Some("fe80::1".parse().unwrap()))]
    );
}

#[test]
fn a_route_with_a_destination_or_mask_is_not_a_default_route() {
    // 0.0.0.0 with a mask, and a mask-less non-zero destination (a corrupt line).
    let text = "\
Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
eth1 00000000 0101A8C0 0003 0 0 0 000000FF 0 0 0
eth2 0A000000 0101A8C0 0003 0 0 0 00000000 0 0 0
";
    assert!(ipv4_default_routes(text).is_empty());
    let text = "\
00000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000003 eth1
20010db8000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000003 eth2
";
    assert!(ipv6_default_routes(text).is_empty());
}

#[test]
fn empty_and_truncated_files_give_no_routes() {
    for text in ["", "\n", "Iface\tDestination\tGateway\n"] {
        assert!(ipv4_default_routes(text).is_empty(), "{text:?}");
        assert!(ipv6_default_routes(text).is_empty(), "{text:?}");
    }
    // Every line cut short: too few fields to be a route.
    let cut_v4: String = PROC_NET_ROUTE
        .lines()
        .map(|l| format!("{}\n", &l[..l.len().min(30)]))
        .collect();
    assert!(ipv4_default_routes(&cut_v4).is_empty());
    let cut_v6: String = PROC_NET_IPV6_ROUTE
        .lines()
        .map(|l| format!("{}\n", &l[..l.len().min(120)]))
        .collect();
    assert!(ipv6_default_routes(&cut_v6).is_empty());
}

#[test]
fn a_gateway_that_is_not_hex_leaves_the_route_without_one() {
    let text = "\
Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
eth0 00000000 0101A8ZZ 0003 0 0 100 00000000 0 0 0
eth1 00000000 1FFFFFFFF 0003 0 0 100 00000000 0 0 0
";
    assert_eq!(
        ipv4_default_routes(text),
        vec![("eth0".into(), None), ("eth1".into(), None)]
    );
    let text = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe80::1 00000400 00000001 00000000 00000003 eth0\n";
    assert_eq!(ipv6_default_routes(text), vec![("eth0".into(), None)]);
}

#[test]
fn the_first_line_of_proc_net_route_is_its_header() {
    let without_header: String = PROC_NET_ROUTE
        .lines()
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        ipv4_default_routes(&without_header),
        vec![("wg0".into(), None)]
    );
}

#[test]
fn listed_host_interfaces_are_trimmed_sorted_and_unique() {
    assert!(host_interfaces("none").is_empty());
    assert!(host_interfaces("  ").is_empty());
    assert_eq!(
        host_interfaces(" eth1, eth0,,eth1 ,bond0.100"),
        vec!["bond0.100", "eth0", "eth1"]
    );
}
