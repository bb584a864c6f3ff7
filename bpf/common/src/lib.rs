//! Types shared by the egress-deny eBPF program and userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel, the eBPF program
//! and userspace agree on the byte layout without relying on compiler padding.
#![no_std]

/// Maximum rules per address family (a ceiling, not a reservation: each table is sized
/// to its rule set); it must stay above 10,000,000.
pub const MAX_RULES_PER_FAMILY: u32 = 1 << 24;

/// Maximum number of attachments (pod veths + host interfaces) with live counters.
pub const MAX_ATTACHMENTS: u32 = 1 << 16;

/// Compiled rule tables: one per address family, held in an inner array map that the
/// installer creates per rule set and swaps into slot 0 of the family's outer
/// (`BPF_MAP_TYPE_ARRAY_OF_MAPS`) map with one update. The inner map is an array of
/// `TABLE_BLOCK_BYTES` blocks; byte `o` of the table image is byte `o %
/// TABLE_BLOCK_BYTES` of block `o / TABLE_BLOCK_BYTES`. Block 0 starts with a
/// [`TableHeader`]; the direct table (one `u32` per bucket: the index of the range
/// covering the bucket's first address) starts at block `direct_block`; the ranges
/// (sorted by start, the first starting at address 0, disjoint, covering everything)
/// start at block `range_block`, `ranges_per_block` to a block, never straddling one.
/// A destination `x` is in bucket `x >> (BITS - direct_bits)`; the range deciding it is
/// the last one starting at or below `x`, between the bucket's direct entry and the
/// next bucket's (binary search).
pub const TABLE_BLOCK_BYTES: usize = 1 << 16;
/// `TableHeader::magic`: "EDT1".
pub const TABLE_MAGIC: u32 = 0x4544_5431;
pub const TABLE_MIN_DIRECT_BITS: u32 = 8;
pub const TABLE_MAX_DIRECT_BITS: u32 = 24;
/// Direct-table entries per block.
pub const TABLE_DIRECT_PER_BLOCK: u32 = (TABLE_BLOCK_BYTES / 4) as u32;
pub const V4_RANGES_PER_BLOCK: u32 = (TABLE_BLOCK_BYTES / core::mem::size_of::<V4Range>()) as u32;
pub const V6_RANGES_PER_BLOCK: u32 = (TABLE_BLOCK_BYTES / core::mem::size_of::<V6Range>()) as u32;
/// Binary-search steps the program takes at most: enough for any bucket of a table of
/// 2^26 ranges (more than 2 × `MAX_RULES_PER_FAMILY` + 1).
pub const TABLE_SEARCH_STEPS: usize = 27;
/// Flags of the inner table maps (and of the template the outer maps are created with):
/// `BPF_F_INNER_MAP` (inner maps of any size fit the slot) | `BPF_F_MMAPABLE`.
pub const TABLE_MAP_FLAGS: u32 = 0x1000 | 0x400;

/// Verdict word of a range: 0 when no rule covers it; otherwise `VERDICT_MATCHED`, plus
/// `VERDICT_DENY` for a deny rule (none for a `!` exception), plus the deciding rule's
/// prefix length in the low byte (the rule is the destination truncated to it).
pub const VERDICT_MATCHED: u32 = 1 << 31;
pub const VERDICT_DENY: u32 = 1 << 8;
pub const VERDICT_PREFIX_MASK: u32 = 0xff;

/// Start of block 0 of every table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableHeader {
    pub magic: u32,
    /// 4 or 6.
    pub family: u32,
    /// `TABLE_MIN_DIRECT_BITS..=TABLE_MAX_DIRECT_BITS`.
    pub direct_bits: u32,
    pub direct_block: u32,
    pub range_block: u32,
    /// Number of ranges (at least 1).
    pub ranges: u32,
    /// Blocks in the table (the inner map's max_entries).
    pub blocks: u32,
    pub _pad: u32,
    /// Rules compiled into the table, for `status` and `lookup`.
    pub deny_rules: u64,
    pub allow_rules: u64,
}

/// One IPv4 range: from `start` (host order) to the next range's start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Range {
    pub start: u32,
    pub verdict: u32,
}

/// One IPv6 range; the start in host order, high and low 64 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Range {
    pub start_hi: u64,
    pub start_lo: u64,
    pub verdict: u32,
    pub _pad: u32,
}

/// Key of the per-CPU counter map: the interface the program runs on. Pod attachments
/// are host-side veths (tc ingress), host attachments are uplinks (tc egress); both live
/// in the host network namespace, so the ifindex identifies the attachment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub ifindex: u32,
}

/// Per-CPU packet/byte counters of one attachment, plus the per-CPU state of its
/// deny-event rate limit (kept here because the deny path already holds this entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub denied_packets: u64,
    pub denied_bytes: u64,
    /// Start (bpf_ktime_get_ns) of the current one-second event window.
    pub events_window_start_ns: u64,
    /// Deny events emitted in the current window.
    pub events_in_window: u32,
    /// Deny events not emitted: over the rate limit, or the ring buffer was full.
    pub events_suppressed: u32,
    /// Host interfaces: forwarded packets passed without a lookup because a pod veth
    /// already judged (or exempted) them (`Settings::judged_mark`).
    pub judged_before_packets: u64,
}

impl Counters {
    /// Adds another CPU's (or attachment's) counters to this one.
    pub fn add(&mut self, other: &Counters) {
        self.allowed_packets += other.allowed_packets;
        self.allowed_bytes += other.allowed_bytes;
        self.denied_packets += other.denied_packets;
        self.denied_bytes += other.denied_bytes;
        self.events_suppressed = self.events_suppressed.wrapping_add(other.events_suppressed);
        self.judged_before_packets += other.judged_before_packets;
    }
}

/// Size of the deny-event ring buffer (a power of two multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Single-entry array: the datapath's runtime settings, written by the installer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Deny events per second per attachment and CPU; 0 turns events off.
    pub events_per_second: u32,
    /// `CONFIG_RULES_LOADED`, …: state userspace shares through the pinned map.
    pub flags: u32,
}

/// Set by the installer once a valid rule set is enforced in these maps. The plugin
/// does not attach (pods are retried) before that: an empty map after a node reboot
/// must not look like "nothing is denied".
pub const CONFIG_RULES_LOADED: u32 = 1;

/// NAT64 prefixes (/96) whose embedded IPv4 address the IPv4 rules judge.
pub const MAX_NAT64_PREFIXES: usize = 4;

/// Single-entry array: how attachments cooperate, written by the installer at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `skb->mark` bit(s) a pod veth's program sets on every packet it allowed (or
    /// exempted); a host interface's program passes forwarded packets carrying them
    /// without a second lookup. 0: off (every packet is judged wherever it passes).
    pub judged_mark: u32,
    /// The mark a filtered pod's veth sets on what it allowed: `judged_mark` when pod
    /// verdicts are trusted (`--trust-pod-verdicts`), else 0. Off by default: a
    /// destination rewritten after the pod's veth (a Service DNAT'ed to an endpoint
    /// outside the node) would not be judged again.
    pub pod_mark: u32,
    /// How many of `nat64_prefixes` are in use.
    pub nat64_prefix_count: u32,
    /// The first 12 bytes (a /96) of each NAT64 prefix.
    pub nat64_prefixes: [[u8; 12]; MAX_NAT64_PREFIXES],
    pub _pad: u32,
}

/// `DenyEvent::family` for an IP packet whose destination could not be read.
pub const FAMILY_UNREADABLE: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// An IPv6 destination in a NAT64 prefix, denied by the IPv4 rule (`prefix_len`) that
/// decides its embedded IPv4 address (the last four bytes of `daddr`).
pub const FAMILY_NAT64: u8 = 64;

/// One denied packet, reported through the ring buffer (rate-limited).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    pub timestamp_ns: u64,
    /// Attachment (interface) that dropped it.
    pub ifindex: u32,
    pub packet_len: u32,
    /// FAMILY_V4, FAMILY_V6 or FAMILY_UNREADABLE.
    pub family: u8,
    /// Prefix length of the deny rule that matched (the rule is `daddr/prefix_len`).
    pub prefix_len: u8,
    pub _pad: [u8; 6],
    /// Destination; IPv4 in the first four bytes.
    pub daddr: [u8; 16],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no implicit padding.
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::DenyEvent {}
    unsafe impl aya::Pod for super::TableHeader {}
    unsafe impl aya::Pod for super::V4Range {}
    unsafe impl aya::Pod for super::V6Range {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<CounterKey>(), 4);
        assert_eq!(size_of::<Counters>(), 56);
        assert_eq!(size_of::<Settings>(), 64);
        assert_eq!(size_of::<DatapathConfig>(), 8);
        assert_eq!(size_of::<DenyEvent>(), 40);
        assert_eq!(size_of::<TableHeader>(), 48);
        assert_eq!(size_of::<V4Range>(), 8);
        assert_eq!(size_of::<V6Range>(), 24);
        assert_eq!(V4_RANGES_PER_BLOCK, 8192);
        assert_eq!(V6_RANGES_PER_BLOCK, 2730);
    }
}
