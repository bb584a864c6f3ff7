use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{LpmTrie, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use egress_deny_common::{CounterKey, Counters, MAX_ATTACHMENTS, MAX_RULES_PER_FAMILY, RuleValue};

// Map names are part of the bpffs layout (see datapath::paths); keep them in sync.
#[map(name = "v4_rules")]
static V4_RULES: LpmTrie<[u8; 4], RuleValue> = LpmTrie::with_max_entries(MAX_RULES_PER_FAMILY, 0);

#[map(name = "v6_rules")]
static V6_RULES: LpmTrie<[u8; 16], RuleValue> = LpmTrie::with_max_entries(MAX_RULES_PER_FAMILY, 0);

#[map(name = "counters")]
static COUNTERS: PerCpuHashMap<CounterKey, Counters> =
    PerCpuHashMap::with_max_entries(MAX_ATTACHMENTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ_LEGACY: u16 = 0x9100;
const VLAN_HLEN: usize = 4;
/// In-band VLAN tags we look through (QinQ plus one spare). An outer tag held out of
/// band by VLAN offload is not in the packet data at all, so it needs no parsing.
const MAX_VLAN_TAGS: usize = 3;
const IPV4_DADDR_OFFSET: usize = 16;
const IPV6_DADDR_OFFSET: usize = 24;

enum Verdict {
    Allow,
    Deny,
}

/// The packet claims to be IP but its destination address cannot be read. The stack
/// would drop it anyway; we drop it too rather than guess (fail closed).
struct Unreadable;

/// Program for devices with an Ethernet header (veth, physical NICs, bonds, VLANs).
#[classifier]
pub fn egress_deny(ctx: TcContext) -> i32 {
    let verdict = try_egress_deny(&ctx).unwrap_or(Verdict::Deny);
    finish(&ctx, verdict)
}

/// Program for L3 devices without an Ethernet header (wireguard, ipip, tun).
#[classifier]
pub fn egress_deny_l3(ctx: TcContext) -> i32 {
    let verdict = try_egress_deny_l3(&ctx).unwrap_or(Verdict::Deny);
    finish(&ctx, verdict)
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
        ethertype = match read_be16(ctx, l3_offset + 2) {
            Some(inner) => inner,
            None => return Ok(Verdict::Allow),
        };
        l3_offset += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => decide_v4(ctx, l3_offset),
        ETH_P_IPV6 => decide_v6(ctx, l3_offset),
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
    Ok(verdict_of(V4_RULES.get(Key::new(32, daddr))))
}

#[inline(always)]
fn decide_v6(ctx: &TcContext, l3_offset: usize) -> Result<Verdict, Unreadable> {
    let daddr: [u8; 16] = read(ctx, l3_offset + IPV6_DADDR_OFFSET).ok_or(Unreadable)?;
    Ok(verdict_of(V6_RULES.get(Key::new(128, daddr))))
}

#[inline(always)]
fn verdict_of(rule: Option<&RuleValue>) -> Verdict {
    match rule {
        Some(rule) if rule.is_deny() => Verdict::Deny,
        _ => Verdict::Allow,
    }
}

#[inline(always)]
fn finish(ctx: &TcContext, verdict: Verdict) -> i32 {
    let denied = matches!(verdict, Verdict::Deny);
    count(ctx, denied);
    if denied {
        TC_ACT_SHOT
    } else {
        // "Continue" rather than TC_ACT_OK: later tc/TCX programs (the primary CNI's)
        // must still run.
        TC_ACT_UNSPEC
    }
}

#[inline(always)]
fn count(ctx: &TcContext, denied: bool) {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let key = CounterKey {
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    };
    let bytes = u64::from(ctx.len());
    if let Some(counters) = COUNTERS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe { bump(&mut *counters, denied, bytes) };
        return;
    }
    let mut fresh = Counters::default();
    bump(&mut fresh, denied, bytes);
    if COUNTERS
        .insert(&key, &fresh, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU created the entry first (or the map is full): add to it.
        if let Some(counters) = COUNTERS.get_ptr_mut(&key) {
            unsafe { bump(&mut *counters, denied, bytes) };
        }
    }
}

#[inline(always)]
fn bump(counters: &mut Counters, denied: bool, bytes: u64) {
    if denied {
        counters.denied_packets += 1;
        counters.denied_bytes += bytes;
    } else {
        counters.allowed_packets += 1;
        counters.allowed_bytes += bytes;
    }
}

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

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
