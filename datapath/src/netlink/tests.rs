//! Replies are built by hand, byte by byte, the way the kernel lays them out.
use super::{link::*, tc::*, wire::*};
use crate::{
    attach::{NETLINK_HANDLE, NETLINK_PRIORITY},
    hook::Hook,
};

const IFLA_INFO_DATA: u16 = 2;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;

fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    push_attr(&mut buf, ty, value);
    buf
}

/// struct nlmsghdr + body, padded to 4 bytes as the kernel sends it.
fn message(ty: u16, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut msg = Vec::new();
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&ty.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    msg.resize(align4(len), 0);
    msg
}

fn ifinfomsg(ifindex: i32) -> Vec<u8> {
    let mut msg = vec![0u8; 16];
    msg[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    msg
}

/// Deterministic bytes for the garbage tests (xorshift).
fn garbage(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn attributes_are_walked_with_their_padding_and_flags_masked() {
    let mut buf = attr(IFLA_IFNAME, b"eth0\0"); // 9 bytes, padded to 12
    buf.extend(attr(IFLA_LINK, &7u32.to_ne_bytes()));
    buf.extend(attr(
        TCA_OPTIONS | NLA_F_NESTED,
        &attr(TCA_BPF_ID, &[1, 0, 0, 0]),
    ));
    buf.extend(attr(IFLA_LINK | NLA_F_NET_BYTEORDER, &[]));
    assert_eq!(buf.len(), 12 + 8 + 12 + 4);
    let walked: Vec<(u16, &[u8])> = attrs(&buf).collect();
    assert_eq!(
        walked,
        vec![
            (IFLA_IFNAME, &b"eth0\0"[..]),
            (IFLA_LINK, &7u32.to_ne_bytes()[..]),
            (TCA_OPTIONS, &attr(TCA_BPF_ID, &[1, 0, 0, 0])[..]),
            (IFLA_LINK, &[][..]),
        ]
    );
}

#[test]
fn the_last_attribute_may_lack_its_padding() {
    let mut buf = attr(IFLA_LINK, &3u32.to_ne_bytes());
    buf.extend_from_slice(&5u16.to_ne_bytes());
    buf.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
    buf.push(b'x');
    let walked: Vec<_> = attrs(&buf).collect();
    assert_eq!(walked.len(), 2);
    assert_eq!(walked[1], (IFLA_IFNAME, &b"x"[..]));
}

#[test]
fn malformed_attributes_end_the_walk() {
    // A length below the header's would loop forever if it were followed.
    for len in [0u16, 1, 3] {
        let mut buf = len.to_ne_bytes().to_vec();
        buf.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        buf.extend(attr(IFLA_LINK, &[0; 4]));
        assert_eq!(attrs(&buf).count(), 0, "len {len}");
    }
    // Longer than what is left: truncated.
    let mut buf = attr(IFLA_LINK, &[0; 4]);
    buf.extend_from_slice(&64u16.to_ne_bytes());
    buf.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
    buf.extend_from_slice(b"eth0");
    assert_eq!(attrs(&buf).count(), 1);
    // Fewer bytes than a header.
    for short in [&[][..], &[8][..], &[8, 0, 3][..]] {
        assert_eq!(attrs(short).count(), 0);
    }
}

#[test]
fn truncated_or_random_bytes_never_panic() {
    let mut link = ifinfomsg(4);
    link.extend(attr(IFLA_LINK, &9u32.to_ne_bytes()));
    link.extend(attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"veth\0")));
    let mut filter = tcmsg(4, NETLINK_HANDLE, 0, 1 << 16);
    filter.extend(attr(TCA_KIND, b"bpf\0"));
    filter.extend(attr(TCA_OPTIONS, &attr(TCA_BPF_ID, &5u32.to_ne_bytes())));
    let mut datagram = message(RTM_NEWLINK, &link);
    datagram.extend(message(NLMSG_ERROR, &[0xed, 0xff, 0xff, 0xff]));
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for whole in [&link, &filter, &datagram] {
        inputs.extend((0..=whole.len()).map(|n| whole[..n].to_vec()));
    }
    inputs.extend((0..200).map(|seed| garbage(seed, seed as usize % 97)));
    for input in &inputs {
        let _ = attrs(input).count();
        let _ = parse_link(input);
        let _ = parse_bpf_filter(input);
        let _ = parse_nsid(&[(RTM_NEWNSID, input.clone())]);
        let _ = read_messages(input, &mut Vec::new());
    }
}

#[test]
fn a_veths_kind_peer_and_peer_namespace_are_read() {
    let mut body = ifinfomsg(17);
    body.extend(attr(IFLA_IFNAME, b"cali1234\0"));
    body.extend(attr(IFLA_LINK, &4u32.to_ne_bytes()));
    body.extend(attr(IFLA_LINK_NETNSID, &2i32.to_ne_bytes()));
    let mut info = attr(IFLA_INFO_KIND, b"veth\0");
    info.extend(attr(IFLA_INFO_DATA | NLA_F_NESTED, &attr(1, &[0; 16])));
    body.extend(attr(IFLA_LINKINFO | NLA_F_NESTED, &info));
    assert_eq!(
        parse_link(&body),
        Some(LinkDetails {
            ifindex: 17,
            kind: Some("veth".into()),
            link: Some(4),
            link_netnsid: Some(2),
        })
    );
}

#[test]
fn a_physical_device_has_no_kind_and_short_values_are_ignored() {
    let mut body = ifinfomsg(2);
    body.extend(attr(IFLA_IFNAME, b"eno1\0"));
    body.extend(attr(IFLA_LINK, &[1, 0])); // too short for a u32
    body.extend(attr(IFLA_LINK_NETNSID, &[]));
    assert_eq!(
        parse_link(&body),
        Some(LinkDetails {
            ifindex: 2,
            ..Default::default()
        })
    );
    assert_eq!(parse_link(&ifinfomsg(2)[..15]), None);
}

#[test]
fn a_kind_without_its_nul_is_read_whole() {
    let mut body = ifinfomsg(3);
    body.extend(attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"wireguard")));
    assert_eq!(
        parse_link(&body).unwrap().kind.as_deref(),
        Some("wireguard")
    );
}

fn bpf_filter_message(handle: u32, priority: u16, kind: &[u8], program_id: Option<u32>) -> Vec<u8> {
    let info = (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be());
    let mut body = tcmsg(9, handle, clsact_parent(Hook::Ingress), info);
    body.extend(attr(TCA_KIND, kind));
    let mut options = attr(TCA_BPF_NAME, b"egress_deny\0");
    if let Some(id) = program_id {
        options.extend(attr(TCA_BPF_ID, &id.to_ne_bytes()));
    }
    options.extend(attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes()));
    body.extend(attr(TCA_OPTIONS | NLA_F_NESTED, &options));
    body
}

#[test]
fn a_cls_bpf_filter_gives_its_priority_handle_and_program() {
    let body = bpf_filter_message(NETLINK_HANDLE, NETLINK_PRIORITY, b"bpf\0", Some(311));
    assert_eq!(
        parse_bpf_filter(&body),
        Some(BpfFilter {
            priority: NETLINK_PRIORITY,
            handle: NETLINK_HANDLE,
            program_id: 311,
        })
    );
    let other = bpf_filter_message(0x800, 49152, b"bpf\0", Some(7));
    assert_eq!(parse_bpf_filter(&other).map(|f| f.priority), Some(49152));
}

#[test]
fn other_filters_and_bpf_filters_without_a_program_are_skipped() {
    assert_eq!(
        parse_bpf_filter(&bpf_filter_message(1, 1, b"u32\0", Some(3))),
        None
    );
    assert_eq!(
        parse_bpf_filter(&bpf_filter_message(1, 1, b"bpf\0", None)),
        None
    );
    // The kernel lists a classifier's chain head (no TCA_OPTIONS) before its filters.
    let mut head = tcmsg(9, 0, clsact_parent(Hook::Ingress), 1 << 16);
    head.extend(attr(TCA_KIND, b"bpf\0"));
    assert_eq!(parse_bpf_filter(&head), None);
    assert_eq!(parse_bpf_filter(&[0; 19]), None);
}

#[test]
fn the_namespace_id_is_read_unless_unassigned() {
    let reply = |ty: u16, id: i32| {
        let mut body = vec![0u8; 4];
        body.extend(attr(NETNSA_NSID, &id.to_ne_bytes()));
        (ty, body)
    };
    assert_eq!(parse_nsid(&[reply(RTM_NEWNSID, 3)]), Some(3));
    assert_eq!(parse_nsid(&[reply(RTM_NEWNSID, 0)]), Some(0));
    // NETNSA_NSID_NOT_ASSIGNED.
    assert_eq!(parse_nsid(&[reply(RTM_NEWNSID, -1)]), None);
    assert_eq!(parse_nsid(&[reply(RTM_NEWLINK, 3)]), None);
    assert_eq!(parse_nsid(&[(RTM_NEWNSID, vec![0; 3])]), None);
    assert_eq!(parse_nsid(&[]), None);
}

#[test]
fn a_dump_is_collected_until_done() {
    let first = bpf_filter_message(1, 1, b"bpf\0", Some(10));
    let second = ifinfomsg(5);
    let mut datagram = message(RTM_NEWTFILTER, &first);
    datagram.extend(message(RTM_NEWLINK, &second[..13])); // padded
    let mut out = Vec::new();
    assert!(
        read_messages(&datagram, &mut out).is_none(),
        "more may follow"
    );
    assert_eq!(
        out,
        vec![
            (RTM_NEWTFILTER, first),
            (RTM_NEWLINK, second[..13].to_vec())
        ]
    );
    let mut done = message(RTM_NEWLINK, &second);
    done.extend(message(NLMSG_DONE, &[0; 4]));
    done.extend(message(RTM_NEWLINK, &second)); // after DONE: not read
    assert!(matches!(read_messages(&done, &mut out), Some(Ok(()))));
    assert_eq!(out.len(), 3);
}

#[test]
fn the_kernels_error_is_its_errno_and_zero_is_an_ack() {
    let error = |errno: i32| {
        // struct nlmsgerr: the negative errno, then the request's header.
        let mut body = errno.to_ne_bytes().to_vec();
        body.extend_from_slice(&[0; NLMSG_HDRLEN]);
        message(NLMSG_ERROR, &body)
    };
    let mut out = Vec::new();
    let err = read_messages(&error(-libc::EEXIST), &mut out)
        .unwrap()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert!(matches!(read_messages(&error(0), &mut out), Some(Ok(()))));
    // Too short to hold an errno: not an error report.
    let short = message(NLMSG_ERROR, &[0xff, 0xff]);
    assert!(matches!(read_messages(&short, &mut out), Some(Ok(()))));
    assert!(out.is_empty());
}

#[test]
fn a_truncated_message_stops_the_datagram() {
    let whole = message(RTM_NEWLINK, &ifinfomsg(1));
    let mut datagram = whole.clone();
    datagram.extend_from_slice(&whole[..whole.len() - 1]);
    let mut out = Vec::new();
    assert!(read_messages(&datagram, &mut out).is_none());
    assert_eq!(out.len(), 1);
    // A header claiming less than itself.
    let mut bogus = whole.clone();
    bogus[0..4].copy_from_slice(&8u32.to_ne_bytes());
    let mut out = Vec::new();
    assert!(read_messages(&bogus, &mut out).is_none());
    assert!(out.is_empty());
}

#[test]
fn requests_are_laid_out_as_the_kernel_reads_them() {
    assert_eq!(clsact_parent(Hook::Ingress), 0xffff_fff2);
    assert_eq!(clsact_parent(Hook::Egress), 0xffff_fff3);
    let msg = tcmsg(7, 0xed01, 0xffff_fff2, 0x0001_0300);
    assert_eq!(msg.len(), 20);
    assert_eq!(&msg[4..8], &7i32.to_ne_bytes());
    assert_eq!(&msg[8..12], &0xed01u32.to_ne_bytes());
    assert_eq!(&msg[12..16], &0xffff_fff2u32.to_ne_bytes());
    assert_eq!(&msg[16..20], &0x0001_0300u32.to_ne_bytes());
    assert_eq!(nul_terminated("eth0"), b"eth0\0");
    let mut buf = Vec::new();
    push_attr(&mut buf, TCA_KIND, b"clsact\0");
    assert_eq!(buf.len(), 12);
    assert_eq!(&buf[0..2], &11u16.to_ne_bytes());
    assert_eq!(&buf[11..], &[0]);
}
