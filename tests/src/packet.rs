//! Crafted packets for BPF_PROG_TEST_RUN verdict tests and benchmarks.
use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_LLDP: u16 = 0x88CC;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// Ethernet header (with optional VLAN tags, outermost first) followed by `payload`.
pub fn ethernet(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    p.extend_from_slice(&DST_MAC);
    p.extend_from_slice(&SRC_MAC);
    for (tpid, vid) in tags {
        p.extend_from_slice(&tpid.to_be_bytes());
        p.extend_from_slice(&vid.to_be_bytes());
    }
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

#[derive(Clone, Debug)]
pub struct Ipv4Options {
    /// Extra header bytes (IP options), a multiple of 4, at most 40.
    pub options: Vec<u8>,
    pub more_fragments: bool,
    pub fragment_offset: u16,
    pub protocol: u8,
}

impl Default for Ipv4Options {
    fn default() -> Self {
        Self {
            options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            protocol: 17,
        }
    }
}

/// IPv4 header (+ options) followed by a small UDP payload.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, opts: &Ipv4Options) -> Vec<u8> {
    assert!(opts.options.len().is_multiple_of(4) && opts.options.len() <= 40);
    let ihl = 5 + opts.options.len() / 4;
    let payload = udp(40000, 9, b"egress-deny");
    let total = ihl * 4 + payload.len();
    let mut h = Vec::with_capacity(total);
    h.push(0x40 | ihl as u8);
    h.push(0);
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&0x1234u16.to_be_bytes());
    let frag = (u16::from(opts.more_fragments) << 13) | (opts.fragment_offset & 0x1fff);
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(64);
    h.push(opts.protocol);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&opts.options);
    let csum = checksum(&h);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h.extend_from_slice(&payload);
    h
}

/// IPv6 header followed by a small UDP payload.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let payload = udp(40000, 9, b"egress-deny");
    let mut h = Vec::with_capacity(40 + payload.len());
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(17);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&payload);
    h
}

/// UDP header + payload (checksum 0: not checked by the program).
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + data.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
