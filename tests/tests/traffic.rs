//! Real traffic through a real veth: the program attached on the host side's tc ingress
//! (where a pod's packets enter the host) drops UDP and ICMP to denied destinations,
//! lets the rest through, and follows map updates without being re-attached.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType};
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Hook},
    counters::CounterMap,
    iface,
    netns::NetnsGuard,
    rules::Action,
};
use egress_deny_tests::{
    Netns, PinDir,
    probe::{self, bind_in, udp_through},
    require_root, tests_over,
    topology::PodHost,
};

const DENIED_V4: &str = "198.51.100.7";
const ALLOWED_V4: &str = "192.0.2.10";
const DENIED_V6: &str = "2001:db8:dead::7";
const ALLOWED_V6: &str = "2001:db8:beef::10";
const UDP_PORT: u16 = 9999;

type Topology = PodHost;

/// "pod" and "host" namespaces joined by a veth; the host answers on four addresses.
fn topology() -> Result<Topology> {
    let destinations =
        [DENIED_V4, ALLOWED_V4, DENIED_V6, ALLOWED_V6].map(|a| a.parse().expect("address"));
    PodHost::new("edt", &destinations, None)
}

fn datagrams_through(topo: &Topology, target: &str, marker: &str, count: usize) -> Result<usize> {
    udp_through(&topo.pod, &topo.host, target, marker, count)
}

fn ping(topo: &Topology, dst: &str) -> bool {
    probe::ping(&topo.pod, dst)
}

/// Datagrams from the pod to the denied IPv4 and IPv6 destinations (behind each, a
/// marker to the allowed one of its family): how many of `count` got through, per family.
fn denied_datagrams_through(topo: &Topology, count: usize) -> Result<[usize; 2]> {
    Ok([
        datagrams_through(topo, DENIED_V4, ALLOWED_V4, count)?,
        datagrams_through(topo, DENIED_V6, ALLOWED_V6, count)?,
    ])
}

fn enforce_and_release(mode: AttachMode) -> Result<()> {
    require_root();
    let pins = PinDir::new()?;
    let topo = topology()?;
    let rules = pins.deny(&[&format!("{DENIED_V4}/32"), "2001:db8:dead::/48"])?;

    // Before attaching, the "denied" destination is reachable: the topology works.
    assert_eq!(
        datagrams_through(&topo, DENIED_V4, ALLOWED_V4, 5)?,
        5,
        "baseline before attach"
    );

    let attachment = topo.attach_host_side(&pins, mode)?;
    assert_eq!(attachment.mode, mode);
    let ifindex = topo.host_ifindex()?;
    let counters = CounterMap::open(&pins.layout)?;
    let before = counters.get(ifindex)?;

    assert_eq!(
        denied_datagrams_through(&topo, 20)?,
        [0, 0],
        "denied UDP leaked (IPv4, IPv6)"
    );
    for (dst, answered) in [
        (DENIED_V4, false),
        (DENIED_V6, false),
        (ALLOWED_V4, true),
        (ALLOWED_V6, true),
    ] {
        assert_eq!(ping(&topo, dst), answered, "ping to {dst}");
    }

    let after = counters.get(ifindex)?;
    // 40 UDP datagrams + at least one echo request per denied ping.
    assert!(
        after.denied_packets - before.denied_packets >= 42,
        "denied counter: {before:?} -> {after:?}"
    );
    assert!(
        after.allowed_packets > before.allowed_packets,
        "allowed counter did not move"
    );

    // Removing the rule restores traffic without touching the attachment.
    assert!(rules.remove(format!("{DENIED_V4}/32").parse()?)?);
    assert!(rules.remove("2001:db8:dead::/48".parse()?)?);
    assert_eq!(
        denied_datagrams_through(&topo, 5)?,
        [5, 5],
        "UDP not restored (IPv4, IPv6)"
    );
    assert!(
        ping(&topo, DENIED_V4),
        "ping not restored after removing the rule"
    );
    if mode == AttachMode::Tcx {
        let state = attach::pinned_link_state(&pins.layout.host_link(&topo.host_veth))?
            .context("link pin vanished")?;
        assert_eq!(state.id, attachment.link_id, "the link was replaced");
        assert_eq!(state.ifindex, ifindex);
    }

    // A rule added while attached takes effect for the flowing traffic.
    rules.insert(format!("{DENIED_V4}/32").parse()?, Action::Deny)?;
    assert_eq!(
        datagrams_through(&topo, DENIED_V4, ALLOWED_V4, 5)?,
        0,
        "re-added rule not enforced"
    );

    // Detaching is idempotent and restores traffic.
    {
        let _guard = NetnsGuard::enter(&topo.host.path())?;
        let pin = pins.layout.host_link(&topo.host_veth);
        attach::detach(Some(&topo.host_veth), Hook::Ingress, &pin, mode)?;
        attach::detach(Some(&topo.host_veth), Hook::Ingress, &pin, mode)?;
        assert!(!Path::new(&pin).exists());
    }
    // The kernel releases a link asynchronously once its last reference is gone.
    egress_deny_tests::wait_until("detach to take effect", Duration::from_secs(5), || {
        datagrams_through(&topo, DENIED_V4, ALLOWED_V4, 1).is_ok_and(|n| n == 1)
    })?;
    Ok(())
}

tests_over!(enforce_and_release:
    tcx_attachment_enforces_and_follows_map_updates => AttachMode::Tcx,
    netlink_attachment_enforces_and_follows_map_updates => AttachMode::Netlink,
);

#[test]
fn attachment_survives_the_attaching_process_and_reattach_is_idempotent() -> Result<()> {
    require_root();
    let pins = PinDir::new()?;
    let topo = topology()?;
    pins.deny(&[&format!("{DENIED_V4}/32")])?;
    let first = topo.attach_host_side(&pins, AttachMode::Tcx)?;
    // Every handle this process had is dropped; only the pin keeps the link.
    let again = topo.attach_host_side(&pins, AttachMode::Tcx)?;
    assert_eq!(
        first.link_id, again.link_id,
        "re-attach created a second link"
    );
    assert_eq!(datagrams_through(&topo, DENIED_V4, ALLOWED_V4, 10)?, 0);
    // Exactly one TCX program on the interface: ours, once. (Debian 12's bpftool
    // predates TCX, so ask the kernel through aya.)
    let programs = {
        let _guard = NetnsGuard::enter(&topo.host.path())?;
        SchedClassifier::query_tcx(&topo.host_veth, TcAttachType::Ingress)?.1
    };
    let ids: Vec<u32> = programs.iter().map(|p| p.id()).collect();
    assert_eq!(
        ids,
        vec![first.program_id],
        "TCX ingress programs on the host veth"
    );
    Ok(())
}

/// Host interfaces are filtered on tc egress; an L3 device (TUN here; wireguard and
/// ipip behave the same) gets the L3 program. Whatever leaves through the TUN device is
/// readable from its fd, so the test sees exactly what got out.
#[test]
fn l3_device_on_tc_egress_gets_the_l3_program_and_drops_denied() -> Result<()> {
    use std::io::Read;
    require_root();
    let pins = PinDir::new()?;
    let host = Netns::new("edt-l3")?;
    let tun_name = "edtun0";
    let mut tun = host.open_tun(tun_name, None)?;
    host.ip(&format!("addr add 10.88.0.1/32 dev {tun_name}"))?;
    host.ip(&format!("link set {tun_name} up"))?;
    host.ip(&format!("route add 198.51.100.0/24 dev {tun_name}"))?;
    host.ip(&format!("route add 192.0.2.0/24 dev {tun_name}"))?;
    pins.deny(&[&format!("{DENIED_V4}/32")])?;

    let attachment = {
        let _guard = NetnsGuard::enter(&host.path())?;
        let link_pin = pins.layout.host_link(tun_name);
        attach::attach(
            &pins.layout,
            &AttachRequest {
                ifname: tun_name,
                hook: Hook::Egress,
                link_pin: &link_pin,
                mode: AttachMode::Tcx,
                exempt: false,
            },
        )?
    };
    assert_eq!(
        attachment.kind,
        egress_deny_datapath::paths::ProgramKind::L3
    );

    let sender = bind_in(&host, "0.0.0.0:0")?;
    for i in 0..10 {
        sender.send_to(format!("probe {i}").as_bytes(), (DENIED_V4, UDP_PORT))?;
    }
    sender.send_to(b"marker", (ALLOWED_V4, UDP_PORT))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    let mut denied_out = 0;
    loop {
        match tun.read(&mut buf) {
            Ok(n) if n >= 20 && buf[0] >> 4 == 4 => {
                let dst = std::net::Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                if dst.to_string() == ALLOWED_V4 {
                    break;
                }
                if dst.to_string() == DENIED_V4 {
                    denied_out += 1;
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("the allowed marker never left through the TUN device");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(denied_out, 0, "denied packets left through the L3 device");
    let ifindex = {
        let _guard = NetnsGuard::enter(&host.path())?;
        iface::ifindex(tun_name)?
    };
    let counters = CounterMap::open(&pins.layout)?.get(ifindex)?;
    assert_eq!(counters.denied_packets, 10, "{counters:?}");
    assert!(counters.allowed_packets >= 1, "{counters:?}");
    Ok(())
}
