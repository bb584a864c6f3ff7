use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use egress_deny_common::{
    CounterKey, Counters, DatapathConfig, DenyEvent, EVENTS_RING_BYTES, FAMILY_NAT64,
    FAMILY_UNREADABLE, FAMILY_V4, FAMILY_V6, MAX_ATTACHMENTS, MAX_NAT64_PREFIXES, Settings,
    VERDICT_PREFIX_MASK,
};

use crate::table::{self, Corrupt};

// Map names are part of the bpffs layout (see datapath::paths); keep them in sync. The
// rule tables (`v4_table`, `v6_table`) are in `table`.
#[map(name = "counters")]
static COUNTERS: PerCpuHashMap<CounterKey, Counters> =
    PerCpuHashMap::with_max_entries(MAX_ATTACHMENTS, 0);

#[map(name = "config")]
static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map(name = "events")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map(name = "settings")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

const NS_PER_SEC: u64 = 1_000_000_000;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ_LEGACY: u16 = 0x9100;
const VLAN_HLEN: usize = 4;
/// In-band VLAN tags we look through. After tc the kernel strips VID-0 tags (6.18 stops
/// at 8 in all; older kernels need not stop) and routes what is inside, so a deeper
/// chain is dropped, never allowed unjudged. A tag held out of band (skb->vlan_tci; on
/// receive the outer one already is) is not in the data and needs no parsing.
const MAX_VLAN_TAGS: usize = 8;
const IPV4_DADDR_OFFSET: usize = 16;
const IPV6_DADDR_OFFSET: usize = 24;

enum Verdict {
    Allow,
    Deny(Match),
}

/// What a deny event reports: the destination and the deny rule's prefix length.
struct Match {
    family: u8,
    prefix_len: u8,
    daddr: [u8; 16],
}

/// The packet claims to be IP but its destination address cannot be read, or its VLAN
/// tag chain is truncated or deeper than we parse, or the rule table cannot be read. We
/// drop rather than guess (fail closed).
struct Unreadable;

impl From<Corrupt> for Unreadable {
    fn from(_: Corrupt) -> Self {
        Unreadable
    }
}

/// The deny rule's prefix length, when `verdict` denies.
#[inline(always)]
fn denied_by(verdict: u32) -> Option<u8> {
    table::denies(verdict).then_some((verdict & VERDICT_PREFIX_MASK) as u8)
}

const UNREADABLE: Verdict = Verdict::Deny(Match {
    family: FAMILY_UNREADABLE,
    prefix_len: 0,
    daddr: [0; 16],
});

/// Program for devices with an Ethernet header (veth, physical NICs, bonds, VLANs).
#[classifier]
pub fn egress_deny(ctx: TcContext) -> i32 {
    judge(&ctx, try_egress_deny)
}

/// Program for L3 devices without an Ethernet header (wireguard, ipip, tun).
#[classifier]
pub fn egress_deny_l3(ctx: TcContext) -> i32 {
    judge(&ctx, try_egress_deny_l3)
}

/// Program for the veths of pods in excluded namespaces: no lookup, only the mark that
/// tells a filtered host interface not to judge their packets either.
#[classifier]
pub fn egress_deny_exempt(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (ifindex, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    let judged_mark = SETTINGS.get(0).map_or(0, |s| s.judged_mark);
    if judged_mark != 0 {
        ctx.set_mark(mark | judged_mark);
    }
    count(ifindex, Counted::Allowed, ctx.len());
    TC_ACT_UNSPEC
}

/// At a pod's veth (tc ingress: the packet arrived on the interface we run on) the
/// packet is judged and, when allowed and pod verdicts are trusted, marked; at a host
/// interface a forwarded packet carrying the mark was judged (or exempted) at its pod's
/// veth and passes without a second lookup. A pod cannot forge the mark (the kernel
/// clears it when the packet crosses from the pod's network namespace) and a locally
/// generated packet (no ingress interface) is always judged.
#[inline(always)]
fn judge(ctx: &TcContext, decide: fn(&TcContext) -> Result<Verdict, Unreadable>) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (ifindex, ingress_ifindex, mark) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.ifindex, skb.ingress_ifindex, skb.mark)
    };
    let (judged_mark, pod_mark) = SETTINGS
        .get(0)
        .map_or((0, 0), |s| (s.judged_mark, s.pod_mark));
    let at_pod_veth = ingress_ifindex == ifindex;
    if judged_mark != 0 && !at_pod_veth && ingress_ifindex != 0 && mark & judged_mark == judged_mark
    {
        count(ifindex, Counted::JudgedBefore, ctx.len());
        return TC_ACT_UNSPEC;
    }
    let verdict = decide(ctx).unwrap_or(UNREADABLE);
    if at_pod_veth && pod_mark != 0 && matches!(verdict, Verdict::Allow) {
        ctx.set_mark(mark | pod_mark);
    }
    finish(ctx, ifindex, verdict)
}

#[inline(always)]
fn try_egress_deny(ctx: &TcContext) -> Result<Verdict, Unreadable> {
    let Some(mut ethertype) = read_be16(ctx, 12) else {
        return Ok(Verdict::Allow); // shorter than an Ethernet header: not IP
    };
    let mut l3_offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ethertype) {
            break;
        }
        // A chain cut short inside a tag: fail closed.
        ethertype = read_be16(ctx, l3_offset + 2).ok_or(Unreadable)?;
        l3_offset += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => decide_v4(ctx, l3_offset),
        ETH_P_IPV6 => decide_v6(ctx, l3_offset),
        // Still tagged after MAX_VLAN_TAGS: we cannot see the end, fail closed.
        t if is_vlan(t) => Err(Unreadable),
        _ => Ok(Verdict::Allow),
    }
}

#[inline(always)]
fn try_egress_deny_l3(ctx: &TcContext) -> Result<Verdict, Unreadable> {
    // Two bytes rather than one: a one-byte bounds check compiles to a form the
    // verifier does not accept as a range check.
    let Some(first) = read::<[u8; 2]>(ctx, 0) else {
        return Ok(Verdict::Allow);
    };
    match first[0] >> 4 {
        4 => decide_v4(ctx, 0),
        6 => decide_v6(ctx, 0),
        _ => Ok(Verdict::Allow),
    }
}

/// Only the destination address is needed: it sits at a fixed offset whatever the
/// header length (options) or fragment offset, so every fragment is judged alike.
#[inline(always)]
fn decide_v4(ctx: &TcContext, l3_offset: usize) -> Result<Verdict, Unreadable> {
    let daddr: [u8; 4] = read(ctx, l3_offset + IPV4_DADDR_OFFSET).ok_or(Unreadable)?;
    let verdict = table::lookup_v4(u32::from_be_bytes(daddr))?;
    Ok(match denied_by(verdict) {
        Some(prefix_len) => {
            let mut wide = [0u8; 16];
            wide[..4].copy_from_slice(&daddr);
            Verdict::Deny(Match {
                family: FAMILY_V4,
                prefix_len,
                daddr: wide,
            })
        }
        None => Verdict::Allow,
    })
}

#[inline(always)]
fn decide_v6(ctx: &TcContext, l3_offset: usize) -> Result<Verdict, Unreadable> {
    let daddr: [u8; 16] = read(ctx, l3_offset + IPV6_DADDR_OFFSET).ok_or(Unreadable)?;
    let (hi, lo) = split_v6(&daddr);
    if let Some(prefix_len) = denied_by(table::lookup_v6(hi, lo)?) {
        return Ok(Verdict::Deny(Match {
            family: FAMILY_V6,
            prefix_len,
            daddr,
        }));
    }
    // An IPv4 address reached through a NAT64 prefix is judged by the IPv4 rules too.
    if let Some(prefix_len) = nat64_deny(&daddr)? {
        return Ok(Verdict::Deny(Match {
            family: FAMILY_NAT64,
            prefix_len,
            daddr,
        }));
    }
    Ok(Verdict::Allow)
}

/// The destination's high and low 64 bits, host order.
#[inline(always)]
fn split_v6(daddr: &[u8; 16]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&daddr[..8]);
    lo.copy_from_slice(&daddr[8..]);
    (u64::from_be_bytes(hi), u64::from_be_bytes(lo))
}

/// The prefix length of the IPv4 deny rule that decides the address embedded in
/// `daddr`, when `daddr` is in one of the configured NAT64 /96 prefixes.
#[inline(never)]
fn nat64_deny(daddr: &[u8; 16]) -> Result<Option<u8>, Corrupt> {
    let Some(settings) = SETTINGS.get(0) else {
        return Ok(None);
    };
    let count = settings.nat64_prefix_count as usize;
    let mut i = 0;
    while i < MAX_NAT64_PREFIXES && i < count {
        if daddr[..12] == settings.nat64_prefixes[i] {
            let embedded = u32::from_be_bytes([daddr[12], daddr[13], daddr[14], daddr[15]]);
            return Ok(denied_by(table::lookup_v4(embedded)?));
        }
        i += 1;
    }
    Ok(None)
}

#[inline(always)]
fn finish(ctx: &TcContext, ifindex: u32, verdict: Verdict) -> i32 {
    let len = ctx.len();
    match verdict {
        Verdict::Allow => {
            count(ifindex, Counted::Allowed, len);
            // "Continue" rather than TC_ACT_OK: later tc/TCX programs (the primary
            // CNI's) must still run.
            TC_ACT_UNSPEC
        }
        Verdict::Deny(matched) => {
            if let Some(counters) = count(ifindex, Counted::Denied, len) {
                // SAFETY: per-CPU value, only this CPU writes it while we run.
                report(unsafe { &mut *counters }, ifindex, len, &matched);
            }
            TC_ACT_SHOT
        }
    }
}

#[derive(Clone, Copy)]
enum Counted {
    Allowed,
    Denied,
    JudgedBefore,
}

/// Counts the packet; returns the attachment's per-CPU entry.
#[inline(always)]
fn count(ifindex: u32, what: Counted, len: u32) -> Option<*mut Counters> {
    let key = CounterKey { ifindex };
    let bytes = u64::from(len);
    if let Some(counters) = COUNTERS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe { bump(&mut *counters, what, bytes) };
        return Some(counters);
    }
    let mut fresh = Counters::default();
    bump(&mut fresh, what, bytes);
    if COUNTERS
        .insert(&key, &fresh, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return COUNTERS.get_ptr_mut(&key);
    }
    // Another CPU created the entry first (or the map is full): add to it.
    let counters = COUNTERS.get_ptr_mut(&key)?;
    unsafe { bump(&mut *counters, what, bytes) };
    Some(counters)
}

/// Deny path only: emits a deny event unless events are off or this attachment is over
/// its per-CPU budget for the current one-second window. The allow path never gets here.
#[inline(always)]
fn report(counters: &mut Counters, ifindex: u32, len: u32, matched: &Match) {
    let per_second = match CONFIG.get(0) {
        Some(config) if config.events_per_second > 0 => config.events_per_second,
        _ => return,
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(counters.events_window_start_ns) >= NS_PER_SEC {
        counters.events_window_start_ns = now;
        counters.events_in_window = 0;
    }
    if counters.events_in_window >= per_second {
        counters.events_suppressed = counters.events_suppressed.wrapping_add(1);
        return;
    }
    let event = DenyEvent {
        timestamp_ns: now,
        ifindex,
        packet_len: len,
        family: matched.family,
        prefix_len: matched.prefix_len,
        _pad: [0; 6],
        daddr: matched.daddr,
    };
    if EVENTS.output::<DenyEvent>(&event, 0).is_ok() {
        counters.events_in_window += 1;
    } else {
        counters.events_suppressed = counters.events_suppressed.wrapping_add(1);
    }
}

#[inline(always)]
fn bump(counters: &mut Counters, what: Counted, bytes: u64) {
    match what {
        Counted::Denied => {
            counters.denied_packets += 1;
            counters.denied_bytes += bytes;
        }
        Counted::Allowed => {
            counters.allowed_packets += 1;
            counters.allowed_bytes += bytes;
        }
        Counted::JudgedBefore => {
            counters.allowed_packets += 1;
            counters.allowed_bytes += bytes;
            counters.judged_before_packets += 1;
        }
    }
}

/// 0x9100 is not stripped by the kernel, but a switch beyond the node may read it.
#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_LEGACY)
}

#[inline(always)]
fn read_be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    read::<u16>(ctx, offset).map(u16::from_be)
}

/// Reads from the linear data when it is there (fast path), otherwise through
/// `bpf_skb_load_bytes`, which also sees paged (non-linear) data.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() <= end {
        // SAFETY: bounds checked against data_end just above.
        Some(unsafe { ((start + offset) as *const T).read_unaligned() })
    } else {
        ctx.load::<T>(offset).ok()
    }
}
