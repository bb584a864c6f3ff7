//! A hostile pod (CAP_NET_RAW) sends raw Ethernet frames with stacked VID-0 VLAN tags
//! through a real veth. On receive the kernel moves the outer tag out of the data before
//! tc ingress and strips further VID-0 (priority) tags after it, then delivers the inner
//! IP packet: the program must judge what is inside or drop the frame. BPF_PROG_TEST_RUN
//! cannot show this (it strips nothing), hence real frames here.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use egress_deny_datapath::{attach::AttachMode, counters::CounterMap, iface, netns::NetnsGuard};
use egress_deny_tests::{
    Netns, PinDir, packet,
    probe::CpuPin,
    require_root,
    topology::{Macs, PodHost},
};

const DENIED_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const DENIED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xdead, 0, 0, 0, 0, 7);
const ALLOWED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbeef, 0, 0, 0, 0, 0x10);
const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const HOST_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 1];
const POD_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 2];
const PORT: u16 = 9999;
const SPORT: u16 = 40000;
/// Tag counts sent: 0..=12, past the program's parse depth.
const MAX_TAGS_SENT: usize = 12;
/// Unfiltered, the kernel delivers at least this many stacked VID-0 tags (6.18 drops
/// deeper chains in __netif_receive_skb_core with RECURSION_LIMIT; older kernels may not).
const KERNEL_DELIVERS_TAGS: usize = 8;
/// In-band tags the program parses (bpf/ebpf/src/program.rs MAX_VLAN_TAGS). The kernel
/// has moved the outer tag out of band before tc, so one more tag than this is judged;
/// anything deeper must be dropped unjudged.
const PROGRAM_TAG_DEPTH: usize = 8;
const FRAMES_PER_CASE: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Dest {
    Denied,
    Allowed,
}

/// Which TPIDs the tag chain uses, outermost first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Tpids {
    Dot1q,
    Dot1ad,
    /// 802.1ad outer, 802.1Q for the rest (the usual QinQ shape).
    Qinq,
}

impl Tpids {
    fn chain(self, count: usize) -> Vec<(u16, u16)> {
        (0..count)
            .map(|i| {
                let tpid = match self {
                    Tpids::Dot1q => packet::ETH_P_8021Q,
                    Tpids::Dot1ad => packet::ETH_P_8021AD,
                    Tpids::Qinq if i == 0 => packet::ETH_P_8021AD,
                    Tpids::Qinq => packet::ETH_P_8021Q,
                };
                (tpid, 0) // VID 0, PCP 0: a priority tag the kernel strips
            })
            .collect()
    }
}

type CaseKey = (Family, Tpids, Dest, usize);

type Topology = PodHost;

/// "pod" and "host" namespaces joined by a veth with fixed MACs (the frames are written
/// by hand); the host owns the four destinations, so whatever the kernel delivers as IP
/// reaches a UDP socket there.
fn topology() -> Result<Topology> {
    let destinations = [
        IpAddr::V4(DENIED_V4),
        IpAddr::V4(ALLOWED_V4),
        IpAddr::V6(DENIED_V6),
        IpAddr::V6(ALLOWED_V6),
    ];
    let macs = Macs {
        host: HOST_MAC,
        pod: POD_MAC,
    };
    PodHost::new("edv", &destinations, Some(macs))
}

/// An AF_PACKET raw socket on the pod's eth0: sends frames exactly as given.
struct RawSender {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawSender {
    fn open(pod: &Netns) -> Result<Self> {
        let _guard = NetnsGuard::enter(&pod.path())?;
        // Protocol 0: send only, receive nothing.
        // SAFETY: plain socket(2); the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ifindex = iface::ifindex("eth0")? as i32;
        Ok(Self { fd, ifindex })
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&HOST_MAC);
        // SAFETY: frame and addr are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

fn frame(tags: &[(u16, u16)], family: Family, dst: IpAddr, data: &[u8]) -> Vec<u8> {
    let (ethertype, l3) = match (family, dst) {
        (Family::V4, IpAddr::V4(dst)) => (packet::ETH_P_IP, ipv4_udp(dst, data)),
        (Family::V6, IpAddr::V6(dst)) => (packet::ETH_P_IPV6, ipv6_udp(dst, data)),
        _ => unreachable!("family and address disagree"),
    };
    let mut f = packet::ethernet(tags, ethertype, &l3);
    f[..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(&POD_MAC);
    f
}

fn ipv4_udp(dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let udp = packet::udp(SPORT, PORT, data); // checksum 0: "none", valid for IPv4
    let total = (20 + udp.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]); // DF, TTL 64, UDP
    h.extend_from_slice(&POD_V4.octets());
    h.extend_from_slice(&dst.octets());
    let csum = packet::checksum(&h);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h.extend_from_slice(&udp);
    h
}

/// IPv6 + UDP with a real checksum (a zero UDP checksum is invalid over IPv6).
fn ipv6_udp(dst: Ipv6Addr, data: &[u8]) -> Vec<u8> {
    let mut udp = packet::udp(SPORT, PORT, data);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&POD_V6.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    let csum = match packet::checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&csum.to_be_bytes());
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    h.extend_from_slice(&[17, 64]);
    h.extend_from_slice(&POD_V6.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&udp);
    h
}

/// UDP sockets in the host namespace on the four destinations.
struct Receivers {
    sockets: Vec<UdpSocket>,
}

impl Receivers {
    fn bind(host: &Netns) -> Result<Self> {
        let _guard = NetnsGuard::enter(&host.path())?;
        let sockets = [
            IpAddr::V4(DENIED_V4),
            IpAddr::V4(ALLOWED_V4),
            IpAddr::V6(DENIED_V6),
            IpAddr::V6(ALLOWED_V6),
        ]
        .into_iter()
        .map(|ip| {
            let s = UdpSocket::bind(SocketAddr::new(ip, PORT))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Self { sockets })
    }

    /// Every datagram waiting, as text.
    fn drain(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        for s in &self.sockets {
            loop {
                match s.recv(&mut buf) {
                    Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(out)
    }
}

fn case_label(key: &CaseKey) -> String {
    let (family, tpids, dest, tags) = key;
    format!("{family:?}/{tpids:?}/{dest:?}/{tags}")
}

/// Sends every case's frames, then an untagged marker to the allowed IPv4 address, all
/// from one CPU: frames are processed in order, and each is delivered (or not) before
/// the next, so once the marker is in, everything that got through is in. Returns how
/// many frames of each case arrived.
fn send_all(
    sender: &RawSender,
    receivers: &Receivers,
    round: &str,
) -> Result<HashMap<CaseKey, usize>> {
    let mut arrived: HashMap<CaseKey, usize> = HashMap::new();
    let mut labels: HashMap<String, CaseKey> = HashMap::new();
    let _pin = CpuPin::current();
    for family in [Family::V4, Family::V6] {
        for tpids in [Tpids::Dot1q, Tpids::Dot1ad, Tpids::Qinq] {
            for dest in [Dest::Denied, Dest::Allowed] {
                let dst = match (family, dest) {
                    (Family::V4, Dest::Denied) => IpAddr::V4(DENIED_V4),
                    (Family::V4, Dest::Allowed) => IpAddr::V4(ALLOWED_V4),
                    (Family::V6, Dest::Denied) => IpAddr::V6(DENIED_V6),
                    (Family::V6, Dest::Allowed) => IpAddr::V6(ALLOWED_V6),
                };
                for tags in 0..=MAX_TAGS_SENT {
                    let key = (family, tpids, dest, tags);
                    let label = format!("{round} {}", case_label(&key));
                    arrived.insert(key, 0);
                    labels.insert(label.clone(), key);
                    let f = frame(&tpids.chain(tags), family, dst, label.as_bytes());
                    for _ in 0..FRAMES_PER_CASE {
                        sender.send(&f)?;
                    }
                }
            }
            // Drain per batch so no socket buffer overflows.
            for text in receivers.drain()? {
                if let Some(key) = labels.get(&text) {
                    *arrived.get_mut(key).unwrap() += 1;
                }
            }
        }
    }
    let marker = format!("{round} marker");
    let marker_frame = frame(&[], Family::V4, IpAddr::V4(ALLOWED_V4), marker.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next_send = Instant::now();
    loop {
        if Instant::now() >= next_send {
            sender.send(&marker_frame)?;
            next_send = Instant::now() + Duration::from_millis(200);
        }
        let mut seen_marker = false;
        for text in receivers.drain()? {
            if let Some(key) = labels.get(&text) {
                *arrived.get_mut(key).unwrap() += 1;
            } else if text == marker {
                seen_marker = true;
            }
        }
        if seen_marker {
            return Ok(arrived);
        }
        if Instant::now() > deadline {
            bail!("{round}: the untagged marker to an allowed address never arrived");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn mismatches(
    arrived: &HashMap<CaseKey, usize>,
    expect: impl Fn(&CaseKey) -> usize,
) -> Vec<String> {
    let mut out: Vec<String> = arrived
        .iter()
        .filter(|(key, got)| **got != expect(key))
        .map(|(key, got)| {
            format!(
                "{}: {got} of {FRAMES_PER_CASE} arrived, expected {}",
                case_label(key),
                expect(key)
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn stacked_vid0_vlan_tags_do_not_bypass_the_filter() -> Result<()> {
    require_root();
    let pins = PinDir::new()?;
    let topo = topology()?;
    pins.deny(&[&format!("{DENIED_V4}/32"), "2001:db8:dead::/48"])?;
    let sender = RawSender::open(&topo.pod)?;
    let receivers = Receivers::bind(&topo.host)?;

    // Unfiltered, the kernel strips the VID-0 tags and delivers the inner packet: the
    // attack path is real on this kernel. Deeper chains are up to the kernel.
    let baseline = send_all(&sender, &receivers, "baseline")?;
    let wrong = mismatches(&baseline, |key| {
        if key.3 <= KERNEL_DELIVERS_TAGS {
            FRAMES_PER_CASE
        } else {
            baseline[key]
        }
    });
    assert!(
        wrong.is_empty(),
        "without the program, tagged frames should be delivered:\n{}",
        wrong.join("\n")
    );

    topo.attach_host_side(&pins, AttachMode::Tcx)?;
    let ifindex = topo.host_ifindex()?;
    let counters = CounterMap::open(&pins.layout)?;
    let before = counters.get(ifindex)?;

    let filtered = send_all(&sender, &receivers, "filtered")?;
    // Denied: nothing, whatever the tags. Allowed: judged and delivered as long as the
    // program can see the end of the chain, dropped unjudged beyond that.
    let judged = |tags: usize| tags <= PROGRAM_TAG_DEPTH + 1;
    let expect = |key: &CaseKey| match key {
        (_, _, Dest::Denied, _) => 0,
        (.., tags) if judged(*tags) => baseline[key],
        _ => 0,
    };
    let wrong = mismatches(&filtered, expect);
    assert!(
        wrong.is_empty(),
        "with the program attached:\n{}",
        wrong.join("\n")
    );
    // The control that matters most: plain and QinQ-tagged allowed traffic flows.
    for (key, got) in &filtered {
        if key.2 == Dest::Allowed && key.3 <= 2 {
            assert_eq!(*got, FRAMES_PER_CASE, "{}", case_label(key));
        }
    }

    // The program itself dropped (and counted) every denied frame, and every frame whose
    // tag chain it could not see the end of (the kernel may drop those too, after tc).
    let after = counters.get(ifindex)?;
    let dropped = filtered
        .keys()
        .filter(|&&(_, _, dest, tags)| dest == Dest::Denied || !judged(tags))
        .count()
        * FRAMES_PER_CASE;
    assert_eq!(
        after.denied_packets - before.denied_packets,
        dropped as u64,
        "denied counter: {before:?} -> {after:?}"
    );
    Ok(())
}
