//! Verdict tests: the real program, loaded and pinned by the installer's code, run on
//! crafted packets through BPF_PROG_TEST_RUN.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use egress_deny_datapath::{
    counters::CounterMap,
    paths::ProgramKind,
    rules::{Action, RuleTables},
};
use egress_deny_tests::{
    PinDir,
    packet::{self, Ipv4Options},
    require_root,
};
use ipnet::IpNet;

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX; // -1: "continue" (TCX next)
const LOOPBACK_IFINDEX: u32 = 1; // test runs use the netns's loopback as skb->dev

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Drop,
    Continue,
}

struct Case {
    name: &'static str,
    program: ProgramKind,
    packet: Vec<u8>,
    expect: Expect,
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

const SRC4: &str = "10.0.0.1";
const SRC6: &str = "fd00::1";

fn eth_v4(dst: &str) -> Vec<u8> {
    packet::ethernet(
        &[],
        packet::ETH_P_IP,
        &packet::ipv4(v4(SRC4), v4(dst), &Default::default()),
    )
}

fn eth_v6(dst: &str) -> Vec<u8> {
    packet::ethernet(&[], packet::ETH_P_IPV6, &packet::ipv6(v6(SRC6), v6(dst)))
}

const ETH_P_QINQ_LEGACY: u16 = 0x9100;

/// `count` VID-0 (priority) tags with one TPID.
fn vid0_tags(tpid: u16, count: usize) -> Vec<(u16, u16)> {
    vec![(tpid, 0); count]
}

fn load_rules(pins: &PinDir, rules: &[(&str, Action)]) -> RuleTables {
    let maps = RuleTables::open(&pins.layout).expect("open rule maps");
    for (net, action) in rules {
        maps.insert(net.parse::<IpNet>().unwrap(), *action)
            .expect("insert rule");
    }
    maps
}

fn program(pins: &PinDir, kind: ProgramKind) -> SchedClassifier {
    SchedClassifier::from_pin(pins.layout.program(kind)).expect("pinned program")
}

fn run_cases(pins: &PinDir, cases: &[Case]) {
    let eth = program(pins, ProgramKind::Ethernet);
    let l3 = program(pins, ProgramKind::L3);
    let exempt = program(pins, ProgramKind::Exempt);
    let before = CounterMap::open(&pins.layout)
        .unwrap()
        .get(LOOPBACK_IFINDEX)
        .unwrap();
    let mut failures = Vec::new();
    let (mut drops, mut continues, mut drop_bytes, mut continue_bytes) = (0u64, 0u64, 0u64, 0u64);
    for case in cases {
        let prog = match case.program {
            ProgramKind::Ethernet => &eth,
            ProgramKind::L3 => &l3,
            ProgramKind::Exempt => &exempt,
        };
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&case.packet);
        let result = prog
            .test_run(opts)
            .unwrap_or_else(|e| panic!("{}: test_run: {e}", case.name));
        let got = match result.return_value {
            TC_ACT_SHOT => Expect::Drop,
            TC_ACT_UNSPEC => Expect::Continue,
            other => panic!("{}: unexpected return value {other}", case.name),
        };
        if got != case.expect {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name, case.expect, got
            ));
        }
        match got {
            Expect::Drop => {
                drops += 1;
                drop_bytes += case.packet.len() as u64;
            }
            Expect::Continue => {
                continues += 1;
                continue_bytes += case.packet.len() as u64;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "verdict failures:\n{}",
        failures.join("\n")
    );

    let after = CounterMap::open(&pins.layout)
        .unwrap()
        .get(LOOPBACK_IFINDEX)
        .unwrap();
    assert_eq!(
        after.denied_packets - before.denied_packets,
        drops,
        "denied packet counter"
    );
    assert_eq!(
        after.allowed_packets - before.allowed_packets,
        continues,
        "allowed packet counter"
    );
    assert_eq!(
        after.denied_bytes - before.denied_bytes,
        drop_bytes,
        "denied byte counter"
    );
    assert_eq!(
        after.allowed_bytes - before.allowed_bytes,
        continue_bytes,
        "allowed byte counter"
    );
}

fn case(name: &'static str, packet: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        program: ProgramKind::Ethernet,
        packet,
        expect,
    }
}

fn l3_case(name: &'static str, packet: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        program: ProgramKind::L3,
        packet,
        expect,
    }
}

#[test]
fn verdict_table() {
    require_root();
    let pins = PinDir::new().unwrap();
    load_rules(
        &pins,
        &[
            ("203.0.113.0/24", Action::Deny),
            ("203.0.113.128/25", Action::Allow),
            ("203.0.113.200/32", Action::Deny),
            ("198.51.100.7/32", Action::Deny),
            ("2001:db8::/32", Action::Deny),
            ("2001:db8:1::/48", Action::Allow),
            ("2001:db8:1::5/128", Action::Deny),
        ],
    );

    let ip4 = |dst: &str, opts: &Ipv4Options| packet::ipv4(v4(SRC4), v4(dst), opts);
    let default4 = Ipv4Options::default();
    let denied_v4 = ip4("203.0.113.9", &default4);
    let allowed_v4 = ip4("192.0.2.1", &default4);
    let denied_v6 = packet::ipv6(v6(SRC6), v6("2001:db8:ffff::1"));

    let mut with_options = default4.clone();
    with_options.options = vec![0x01; 40]; // 40 bytes of NOP options: IHL 15
    let first_fragment = Ipv4Options {
        more_fragments: true,
        ..Default::default()
    };
    let later_fragment = Ipv4Options {
        fragment_offset: 185,
        ..Default::default()
    };

    let mut bad_ihl = denied_v4.clone();
    bad_ihl[0] = 0x43; // IHL 3 (< 5): malformed, destination still readable
    let mut wrong_version = denied_v4.clone();
    wrong_version[0] = 0x65; // version 6 in an IPv4 frame

    let cases = vec![
        // Longest prefix across deny entries and allow exceptions, IPv4.
        case("v4 inside denied /24", eth_v4("203.0.113.9"), Expect::Drop),
        case(
            "v4 inside allow exception /25",
            eth_v4("203.0.113.130"),
            Expect::Continue,
        ),
        case(
            "v4 deny /32 inside allow exception",
            eth_v4("203.0.113.200"),
            Expect::Drop,
        ),
        case("v4 exact /32 deny", eth_v4("198.51.100.7"), Expect::Drop),
        case(
            "v4 neighbour of /32 deny",
            eth_v4("198.51.100.8"),
            Expect::Continue,
        ),
        case("v4 unlisted", eth_v4("192.0.2.1"), Expect::Continue),
        // IPv6.
        case(
            "v6 inside denied /32",
            eth_v6("2001:db8:ffff::1"),
            Expect::Drop,
        ),
        case(
            "v6 inside allow exception /48",
            eth_v6("2001:db8:1::6"),
            Expect::Continue,
        ),
        case(
            "v6 deny /128 inside allow exception",
            eth_v6("2001:db8:1::5"),
            Expect::Drop,
        ),
        case("v6 unlisted", eth_v6("2001:db9::1"), Expect::Continue),
        // VLAN tags in the packet data (offload off) and QinQ.
        case(
            "802.1Q v4 denied",
            packet::ethernet(&[(packet::ETH_P_8021Q, 100)], packet::ETH_P_IP, &denied_v4),
            Expect::Drop,
        ),
        case(
            "802.1Q v4 allowed",
            packet::ethernet(&[(packet::ETH_P_8021Q, 100)], packet::ETH_P_IP, &allowed_v4),
            Expect::Continue,
        ),
        case(
            "802.1Q v6 denied",
            packet::ethernet(&[(packet::ETH_P_8021Q, 7)], packet::ETH_P_IPV6, &denied_v6),
            Expect::Drop,
        ),
        case(
            "QinQ 802.1ad+802.1Q v4 denied",
            packet::ethernet(
                &[(packet::ETH_P_8021AD, 10), (packet::ETH_P_8021Q, 20)],
                packet::ETH_P_IP,
                &denied_v4,
            ),
            Expect::Drop,
        ),
        case(
            "QinQ 802.1ad+802.1Q v6 denied",
            packet::ethernet(
                &[(packet::ETH_P_8021AD, 10), (packet::ETH_P_8021Q, 20)],
                packet::ETH_P_IPV6,
                &denied_v6,
            ),
            Expect::Drop,
        ),
        case(
            "QinQ allowed",
            packet::ethernet(
                &[(packet::ETH_P_8021AD, 10), (packet::ETH_P_8021Q, 20)],
                packet::ETH_P_IP,
                &allowed_v4,
            ),
            Expect::Continue,
        ),
        // With VLAN offload the tag is out of band: the data is an untagged frame.
        case(
            "offloaded tag (untagged data) denied",
            packet::ethernet(&[], packet::ETH_P_IP, &denied_v4),
            Expect::Drop,
        ),
        // IPv4 options and fragments: the destination decides every fragment.
        case(
            "v4 with 40 bytes of options denied",
            packet::ethernet(&[], packet::ETH_P_IP, &ip4("203.0.113.9", &with_options)),
            Expect::Drop,
        ),
        case(
            "v4 with options allowed",
            packet::ethernet(&[], packet::ETH_P_IP, &ip4("192.0.2.1", &with_options)),
            Expect::Continue,
        ),
        case(
            "v4 first fragment denied",
            packet::ethernet(&[], packet::ETH_P_IP, &ip4("203.0.113.9", &first_fragment)),
            Expect::Drop,
        ),
        case(
            "v4 later fragment denied",
            packet::ethernet(&[], packet::ETH_P_IP, &ip4("203.0.113.9", &later_fragment)),
            Expect::Drop,
        ),
        case(
            "v4 later fragment allowed",
            packet::ethernet(&[], packet::ETH_P_IP, &ip4("192.0.2.1", &later_fragment)),
            Expect::Continue,
        ),
        // Truncated and malformed headers: a readable denied destination is dropped.
        case(
            "v4 truncated right after daddr, denied",
            packet::ethernet(&[], packet::ETH_P_IP, &denied_v4[..20]),
            Expect::Drop,
        ),
        case(
            "v4 truncated right after daddr, allowed",
            packet::ethernet(&[], packet::ETH_P_IP, &allowed_v4[..20]),
            Expect::Continue,
        ),
        // BPF_PROG_TEST_RUN refuses untagged IP frames shorter than a full IP header, so
        // the unreadable-destination cases are VLAN-tagged (the kernel skips that check).
        case(
            "802.1Q v4 truncated inside daddr (unreadable): fail closed",
            packet::ethernet(
                &[(packet::ETH_P_8021Q, 100)],
                packet::ETH_P_IP,
                &denied_v4[..18],
            ),
            Expect::Drop,
        ),
        case(
            "802.1Q v4 truncated inside daddr, allowed prefix: still fail closed",
            packet::ethernet(
                &[(packet::ETH_P_8021Q, 100)],
                packet::ETH_P_IP,
                &allowed_v4[..18],
            ),
            Expect::Drop,
        ),
        case(
            "v4 IHL below 5, denied",
            packet::ethernet(&[], packet::ETH_P_IP, &bad_ihl),
            Expect::Drop,
        ),
        case(
            "v4 wrong version nibble, denied",
            packet::ethernet(&[], packet::ETH_P_IP, &wrong_version),
            Expect::Drop,
        ),
        case(
            "v6 truncated right after daddr, denied",
            packet::ethernet(&[], packet::ETH_P_IPV6, &denied_v6[..40]),
            Expect::Drop,
        ),
        case(
            "802.1Q v6 truncated inside daddr: fail closed",
            packet::ethernet(
                &[(packet::ETH_P_8021Q, 100)],
                packet::ETH_P_IPV6,
                &denied_v6[..30],
            ),
            Expect::Drop,
        ),
        // The kernel strips any number of VID-0 tags and delivers what is inside: a
        // chain the program cannot see the end of is dropped (fail closed).
        case(
            "802.1Q truncated inside the tag: fail closed",
            packet::ethernet(&[], packet::ETH_P_8021Q, &[0x00]),
            Expect::Drop,
        ),
        case(
            "tag chain truncated inside its third tag: fail closed",
            packet::ethernet(
                &vid0_tags(packet::ETH_P_8021Q, 2),
                packet::ETH_P_8021Q,
                &[0],
            ),
            Expect::Drop,
        ),
        case(
            "8 tags v4 denied",
            packet::ethernet(
                &vid0_tags(packet::ETH_P_8021Q, 8),
                packet::ETH_P_IP,
                &denied_v4,
            ),
            Expect::Drop,
        ),
        case(
            "8 tags v6 denied",
            packet::ethernet(
                &vid0_tags(packet::ETH_P_8021AD, 8),
                packet::ETH_P_IPV6,
                &denied_v6,
            ),
            Expect::Drop,
        ),
        case(
            "8 tags v4 allowed: judged",
            packet::ethernet(
                &vid0_tags(packet::ETH_P_8021AD, 8),
                packet::ETH_P_IP,
                &allowed_v4,
            ),
            Expect::Continue,
        ),
        case(
            "8 tags ARP: judged, not IP",
            packet::ethernet(
                &vid0_tags(packet::ETH_P_8021Q, 8),
                packet::ETH_P_ARP,
                &denied_v4,
            ),
            Expect::Continue,
        ),
        case(
            "9 x 802.1Q v4 allowed: deeper than parsed, fail closed",
            packet::ethernet(
                &vid0_tags(packet::ETH_P_8021Q, 9),
                packet::ETH_P_IP,
                &allowed_v4,
            ),
            Expect::Drop,
        ),
        case(
            "9 x 802.1ad v6 denied: deeper than parsed, fail closed",
            packet::ethernet(
                &vid0_tags(packet::ETH_P_8021AD, 9),
                packet::ETH_P_IPV6,
                &denied_v6,
            ),
            Expect::Drop,
        ),
        case(
            "16 tags ARP: deeper than parsed, fail closed",
            packet::ethernet(
                &vid0_tags(packet::ETH_P_8021Q, 16),
                packet::ETH_P_ARP,
                &denied_v4,
            ),
            Expect::Drop,
        ),
        case(
            "legacy 0x9100 tag v4 denied",
            packet::ethernet(&[(ETH_P_QINQ_LEGACY, 0)], packet::ETH_P_IP, &denied_v4),
            Expect::Drop,
        ),
        case(
            "legacy 0x9100 tag v4 allowed",
            packet::ethernet(&[(ETH_P_QINQ_LEGACY, 0)], packet::ETH_P_IP, &allowed_v4),
            Expect::Continue,
        ),
        case(
            "9 x 0x9100 v4 allowed: fail closed",
            packet::ethernet(
                &vid0_tags(ETH_P_QINQ_LEGACY, 9),
                packet::ETH_P_IP,
                &allowed_v4,
            ),
            Expect::Drop,
        ),
        case(
            "802.1Q v4 truncated after daddr, denied",
            packet::ethernet(
                &[(packet::ETH_P_8021Q, 100)],
                packet::ETH_P_IP,
                &denied_v4[..20],
            ),
            Expect::Drop,
        ),
        // Non-IP passes, even when its bytes look like a denied address.
        case(
            "ARP",
            packet::ethernet(&[], packet::ETH_P_ARP, &denied_v4),
            Expect::Continue,
        ),
        case(
            "LLDP",
            packet::ethernet(&[], packet::ETH_P_LLDP, &[0u8; 32]),
            Expect::Continue,
        ),
        case(
            "802.1Q ARP",
            packet::ethernet(&[(packet::ETH_P_8021Q, 5)], packet::ETH_P_ARP, &denied_v4),
            Expect::Continue,
        ),
        // L3 devices (wireguard, ipip): no Ethernet header.
        l3_case("L3 v4 denied", denied_v4.clone(), Expect::Drop),
        l3_case("L3 v4 allowed", allowed_v4.clone(), Expect::Continue),
        l3_case("L3 v6 denied", denied_v6.clone(), Expect::Drop),
        l3_case(
            "L3 v6 allowed",
            packet::ipv6(v6(SRC6), v6("2001:db9::1")),
            Expect::Continue,
        ),
        l3_case(
            "L3 v4 with options denied",
            ip4("203.0.113.9", &with_options),
            Expect::Drop,
        ),
        l3_case(
            "L3 neither v4 nor v6",
            {
                let mut p = denied_v4.clone();
                p[0] = 0x15;
                p
            },
            Expect::Continue,
        ),
    ];
    run_cases(&pins, &cases);
}

#[test]
fn zero_length_prefixes_and_exceptions() {
    require_root();
    let pins = PinDir::new().unwrap();
    let maps = load_rules(
        &pins,
        &[
            ("0.0.0.0/0", Action::Deny),
            ("192.0.2.0/24", Action::Allow),
            ("::/0", Action::Deny),
            ("fd00::/8", Action::Allow),
        ],
    );
    let cases = vec![
        case("v4 caught by /0", eth_v4("8.8.8.8"), Expect::Drop),
        case(
            "v4 allow exception inside /0",
            eth_v4("192.0.2.77"),
            Expect::Continue,
        ),
        case("v6 caught by ::/0", eth_v6("2606:4700::1"), Expect::Drop),
        case(
            "v6 allow exception inside ::/0",
            eth_v6("fd00::2"),
            Expect::Continue,
        ),
    ];
    run_cases(&pins, &cases);
    // The userspace lookup names the deciding prefix exactly as the program decides.
    let d = maps.lookup(IpAddr::V4(v4("8.8.8.8"))).unwrap();
    assert_eq!(
        (d.action, d.prefix),
        (Action::Deny, Some("0.0.0.0/0".parse().unwrap()))
    );
    let d = maps.lookup(IpAddr::V4(v4("192.0.2.77"))).unwrap();
    assert_eq!(
        (d.action, d.prefix),
        (Action::Allow, Some("192.0.2.0/24".parse().unwrap()))
    );
}

#[test]
fn removing_a_rule_changes_the_verdict_and_empty_maps_allow_everything() {
    require_root();
    let pins = PinDir::new().unwrap();
    run_cases(
        &pins,
        &[case(
            "empty rule set",
            eth_v4("203.0.113.9"),
            Expect::Continue,
        )],
    );
    let maps = load_rules(
        &pins,
        &[
            ("203.0.113.9/32", Action::Deny),
            ("2001:db8::1/128", Action::Deny),
        ],
    );
    run_cases(
        &pins,
        &[
            case("after insert v4", eth_v4("203.0.113.9"), Expect::Drop),
            case("after insert v6", eth_v6("2001:db8::1"), Expect::Drop),
        ],
    );
    assert!(maps.remove("203.0.113.9/32".parse().unwrap()).unwrap());
    assert!(
        !maps.remove("203.0.113.9/32".parse().unwrap()).unwrap(),
        "second remove finds nothing"
    );
    assert!(maps.remove("2001:db8::1/128".parse().unwrap()).unwrap());
    run_cases(
        &pins,
        &[
            case("after remove v4", eth_v4("203.0.113.9"), Expect::Continue),
            case("after remove v6", eth_v6("2001:db8::1"), Expect::Continue),
        ],
    );
    assert!(maps.entries().unwrap().is_empty());
}

/// Pins the calling thread to one CPU: counters and the event budget are per CPU.
fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on the current thread with a zeroed cpu_set_t.
    unsafe {
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0
        );
    }
}

#[test]
fn deny_events_name_the_rule_and_are_rate_limited() {
    use egress_deny_datapath::events::{self, EventReader};
    require_root();
    pin_to_current_cpu();
    let pins = PinDir::new().unwrap();
    load_rules(
        &pins,
        &[
            ("203.0.113.0/24", Action::Deny),
            ("2001:db8::/32", Action::Deny),
        ],
    );
    let eth = program(&pins, ProgramKind::Ethernet);
    let mut reader = EventReader::open(&pins.layout).unwrap();
    let run = |packet: &[u8], repeat: u32| {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.repeat = repeat;
        eth.test_run(opts).unwrap().return_value
    };

    // Off by default: drops, but no events.
    assert_eq!(events::events_per_second(&pins.layout).unwrap(), 0);
    assert_eq!(run(&eth_v4("203.0.113.9"), 5), TC_ACT_SHOT);
    assert!(reader.next_event().is_none(), "events while turned off");

    events::set_events_per_second(&pins.layout, 3).unwrap();
    let before = CounterMap::open(&pins.layout)
        .unwrap()
        .get(LOOPBACK_IFINDEX)
        .unwrap();
    assert_eq!(run(&eth_v4("203.0.113.9"), 10), TC_ACT_SHOT);
    assert_eq!(run(&eth_v4("192.0.2.1"), 10), TC_ACT_UNSPEC);
    let mut seen = Vec::new();
    while let Some(event) = reader.next_event() {
        seen.push(event);
    }
    assert_eq!(seen.len(), 3, "budget of 3 per second: {seen:?}");
    for event in &seen {
        assert_eq!(event.ifindex, LOOPBACK_IFINDEX);
        assert_eq!(event.destination, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(event.rule, Some("203.0.113.0/24".parse().unwrap()));
    }
    let after = CounterMap::open(&pins.layout)
        .unwrap()
        .get(LOOPBACK_IFINDEX)
        .unwrap();
    assert_eq!(after.events_suppressed - before.events_suppressed, 7);

    // IPv6 events carry the v6 rule (the window still holds: raise the budget).
    events::set_events_per_second(&pins.layout, 1000).unwrap();
    assert_eq!(run(&eth_v6("2001:db8::99"), 1), TC_ACT_SHOT);
    let event = reader.next_event().expect("v6 event");
    assert_eq!(event.rule, Some("2001:db8::/32".parse().unwrap()));
    assert!(reader.next_event().is_none());
}

/// The benchmark anchor (the published benchmark's plain LPM filter) loads and decides.
#[test]
fn reference_lpm_program_loads_and_drops_hits() {
    use aya::{EbpfLoader, maps::lpm_trie::LpmTrie};
    require_root();
    let mut ebpf = EbpfLoader::new()
        .load(egress_deny_datapath::REFERENCE_LPM_OBJECT)
        .unwrap();
    let mut trie: LpmTrie<_, [u8; 4], u32> =
        LpmTrie::try_from(ebpf.map_mut("ref_v4").unwrap()).unwrap();
    trie.insert(&aya::maps::lpm_trie::Key::new(24, [203, 0, 113, 0]), 1, 0)
        .unwrap();
    let prog: &mut SchedClassifier = ebpf
        .program_mut("reference_lpm")
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    let run = |packet: Vec<u8>| {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&packet);
        prog.test_run(opts).unwrap().return_value
    };
    assert_eq!(run(eth_v4("203.0.113.9")), TC_ACT_SHOT);
    assert_eq!(run(eth_v4("192.0.2.1")), 0, "TC_ACT_OK on a miss");
}

/// NAT64: an IPv6 destination in a configured /96 prefix is judged by the IPv4 rules on
/// its embedded address (exceptions included); outside the prefixes, or with none
/// configured, it is not. The exempt program (excluded namespaces) never drops.
#[test]
fn nat64_destinations_follow_the_ipv4_rules_and_exempt_never_drops() {
    require_root();
    let pins = PinDir::new().expect("pin dir");
    let _maps = load_rules(
        &pins,
        &[
            ("198.51.100.0/24", Action::Deny),
            ("198.51.100.128/25", Action::Allow),
            ("2001:db8:dead::/48", Action::Deny),
        ],
    );
    let settings = |prefixes: &[&str]| egress_deny_datapath::settings::DatapathSettings {
        judged_mark: 0,
        nat64_prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
        trust_pod_verdicts: false,
    };
    egress_deny_datapath::settings::write(
        &pins.layout,
        &settings(&["64:ff9b::/96", "2001:db8:64::/96"]),
    )
    .unwrap();
    let exempt = |name, packet| Case {
        name,
        program: ProgramKind::Exempt,
        packet,
        expect: Expect::Continue,
    };
    run_cases(
        &pins,
        &[
            case(
                "well-known prefix, denied v4",
                eth_v6("64:ff9b::198.51.100.7"),
                Expect::Drop,
            ),
            case(
                "well-known prefix, v4 exception",
                eth_v6("64:ff9b::198.51.100.130"),
                Expect::Continue,
            ),
            case(
                "well-known prefix, allowed v4",
                eth_v6("64:ff9b::192.0.2.1"),
                Expect::Continue,
            ),
            case(
                "network-specific prefix, denied v4",
                eth_v6("2001:db8:64::198.51.100.7"),
                Expect::Drop,
            ),
            case(
                "outside every prefix",
                eth_v6("64:ff9b:1::198.51.100.7"),
                Expect::Continue,
            ),
            case(
                "v6 rule still applies",
                eth_v6("2001:db8:dead::1"),
                Expect::Drop,
            ),
            l3_case(
                "L3 device, well-known prefix, denied v4",
                packet::ipv6(v6(SRC6), v6("64:ff9b::198.51.100.7")),
                Expect::Drop,
            ),
            exempt("exempt: denied v4 continues", eth_v4("198.51.100.7")),
            exempt("exempt: denied v6 continues", eth_v6("2001:db8:dead::1")),
        ],
    );
    egress_deny_datapath::settings::write(&pins.layout, &settings(&[])).unwrap();
    run_cases(
        &pins,
        &[case(
            "no NAT64 prefix configured",
            eth_v6("64:ff9b::198.51.100.7"),
            Expect::Continue,
        )],
    );
}

/// Longest-prefix match the obvious way, for the differential test.
fn reference_decision<A: Copy + Eq + std::hash::Hash>(
    rules: &std::collections::HashMap<(A, u8), Action>,
    addr: A,
    bits: u8,
    truncate: impl Fn(A, u8) -> A,
) -> Option<Action> {
    (0..=bits)
        .rev()
        .find_map(|len| rules.get(&(truncate(addr, len), len)).copied())
}

/// The program's own search (bpf/ebpf/src/table.rs, not the userspace reader) against a
/// straightforward longest-prefix reference: random IPv4 and IPv6 rule sets with
/// exceptions nested four levels deep, judged by BPF_PROG_TEST_RUN at the first and last
/// address of every rule, one past each end, and random addresses. The compiler and
/// the userspace search have their own, larger differential test (datapath::table).
#[test]
fn the_programs_table_search_agrees_with_a_reference_lpm() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::collections::HashMap;
    require_root();
    let pins = PinDir::new().unwrap();
    let tables = RuleTables::open(&pins.layout).unwrap();
    let eth = program(&pins, ProgramKind::Ethernet);
    let mut rng = StdRng::seed_from_u64(11);
    let mask4 = |a: u32, len: u8| {
        if len == 0 {
            0
        } else {
            a & (u32::MAX << (32 - len))
        }
    };
    let mask6 = |a: u128, len: u8| {
        if len == 0 {
            0
        } else {
            a & (u128::MAX << (128 - len))
        }
    };

    // Nested chains deny /8 > allow /16 > deny /24 > allow /32 around a few hot /8s,
    // plus loose /32 and /24 denies everywhere.
    let mut rules4: HashMap<(u32, u8), Action> = HashMap::new();
    for _ in 0..4 {
        let top: u32 = rng.random::<u32>() & 0xff00_0000;
        rules4.insert((top, 8), Action::Deny);
        for _ in 0..40 {
            let a16 = top | (rng.random::<u32>() & 0x00ff_0000);
            rules4.insert((a16, 16), Action::Allow);
            for _ in 0..5 {
                let a24 = a16 | (rng.random::<u32>() & 0x0000_ff00);
                rules4.insert((a24, 24), Action::Deny);
                let a32 = a24 | (rng.random::<u32>() & 0xff);
                rules4.insert((a32, 32), Action::Allow);
            }
        }
    }
    for _ in 0..2000 {
        let len = if rng.random_range(0..10) == 0 { 24 } else { 32 };
        rules4
            .entry((mask4(rng.random(), len), len))
            .or_insert(Action::Deny);
    }
    // One bucket whose ranges fill more than one 64 KiB block (8192 IPv4 ranges): the
    // program's search across blocks, not only within one.
    let dense4 = 0x2d00_0000u32 | (rng.random::<u32>() & 0x00ff_0000);
    for i in 0..5000u32 {
        rules4.insert((dense4 + 2 * i, 32), Action::Deny);
    }
    let mut rules6: HashMap<(u128, u8), Action> = HashMap::new();
    for _ in 0..4 {
        let top = mask6((rng.random::<u128>() >> 3) | (1 << 125), 32);
        rules6.insert((top, 32), Action::Deny);
        for _ in 0..40 {
            let a48 = mask6(top | (rng.random::<u128>() >> 32), 48);
            rules6.insert((a48, 48), Action::Allow);
            let a64 = mask6(a48 | (rng.random::<u128>() >> 48), 64);
            rules6.insert((a64, 64), Action::Deny);
            let a128 = a64 | (rng.random::<u128>() >> 64);
            rules6.insert((a128, 128), Action::Allow);
        }
    }
    // The same for IPv6 (2730 ranges to a block).
    let dense6 = mask6((rng.random::<u128>() >> 3) | (1 << 125), 64);
    for i in 0..2000u128 {
        rules6.insert((dense6 + 2 * i, 128), Action::Deny);
    }
    for _ in 0..2000 {
        let len = [48u8, 64, 128][rng.random_range(0..3)];
        rules6
            .entry((mask6((rng.random::<u128>() >> 3) | (1 << 125), len), len))
            .or_insert(Action::Deny);
    }
    let rules: Vec<(IpNet, Action)> = rules4
        .iter()
        .map(|(&(a, l), &act)| (IpNet::new(Ipv4Addr::from(a).into(), l).unwrap(), act))
        .chain(
            rules6
                .iter()
                .map(|(&(a, l), &act)| (IpNet::new(Ipv6Addr::from(a).into(), l).unwrap(), act)),
        )
        .collect();
    tables.replace_all(&rules).unwrap();

    let mut probes4: Vec<u32> = Vec::new();
    for &(a, l) in rules4.keys() {
        let last = a | !(if l == 0 { 0 } else { u32::MAX << (32 - l) });
        probes4.extend([a, last, a.wrapping_sub(1), last.wrapping_add(1)]);
    }
    probes4.extend((0..3000).map(|_| rng.random::<u32>()));
    let mut probes6: Vec<u128> = Vec::new();
    for &(a, l) in rules6.keys() {
        let last = a | !mask6(u128::MAX, l);
        probes6.extend([a, last, a.wrapping_sub(1), last.wrapping_add(1)]);
    }
    probes6.extend((0..3000).map(|_| (rng.random::<u128>() >> 3) | (1 << 125)));

    let judge = |packet: Vec<u8>| -> Expect {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&packet);
        match eth.test_run(opts).expect("test_run").return_value {
            TC_ACT_SHOT => Expect::Drop,
            TC_ACT_UNSPEC => Expect::Continue,
            other => panic!("unexpected return value {other}"),
        }
    };
    let expected = |d: Option<Action>| match d {
        Some(Action::Deny) => Expect::Drop,
        _ => Expect::Continue,
    };
    let mut wrong = Vec::new();
    for &addr in &probes4 {
        let want = expected(reference_decision(&rules4, addr, 32, mask4));
        let dst = Ipv4Addr::from(addr);
        let got = judge(packet::ethernet(
            &[],
            packet::ETH_P_IP,
            &packet::ipv4(v4(SRC4), dst, &Default::default()),
        ));
        if got != want {
            wrong.push(format!("{dst}: program {got:?}, reference {want:?}"));
        }
    }
    for &addr in &probes6 {
        let want = expected(reference_decision(&rules6, addr, 128, mask6));
        let dst = Ipv6Addr::from(addr);
        let got = judge(packet::ethernet(
            &[],
            packet::ETH_P_IPV6,
            &packet::ipv6(v6(SRC6), dst),
        ));
        if got != want {
            wrong.push(format!("{dst}: program {got:?}, reference {want:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} destinations judged differently, e.g.:\n{}",
        wrong.len(),
        probes4.len() + probes6.len(),
        wrong[..wrong.len().min(20)].join("\n")
    );
}
