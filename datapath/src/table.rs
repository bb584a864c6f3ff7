//! The compiled rule table: a rule set flattened into disjoint address ranges, each
//! carrying the verdict of the longest prefix covering it, plus a direct table that
//! narrows a lookup to one bucket's ranges. It replaces the kernel LPM trie; the layout
//! (block geometry, [`TableHeader`], [`V4Range`]/[`V6Range`], verdict word) is defined in
//! `egress_deny_common` next to `TABLE_BLOCK_BYTES`.
//!
//! Pure logic (no kernel access). This file is the format both sides share: rules
//! ([`Entry`]), address widths ([`TableKey`]), verdict words and the header codec.
//! `compile.rs`: [`Plan`]/[`compile`] turn a sorted rule set into a table image, block
//! by block, without holding the image in memory. `view.rs`: [`TableView`] validates an
//! image and looks addresses up exactly the way the eBPF program does.
//!
//! [`TableHeader`]: egress_deny_common::TableHeader
//! [`V4Range`]: egress_deny_common::V4Range
//! [`V6Range`]: egress_deny_common::V6Range
use std::{
    fmt::Debug,
    hash::Hash,
    mem::{offset_of, size_of},
    ops::{BitAnd, BitOr, Not},
};

use egress_deny_common::{
    TABLE_BLOCK_BYTES, TABLE_DIRECT_PER_BLOCK, TABLE_MAX_DIRECT_BITS, TABLE_MIN_DIRECT_BITS,
    TABLE_SEARCH_STEPS, TableHeader, V4_RANGES_PER_BLOCK, V4Range, V6_RANGES_PER_BLOCK, V6Range,
    VERDICT_DENY, VERDICT_MATCHED, VERDICT_PREFIX_MASK,
};

/// What a rule does to the addresses it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Deny,
    Allow,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deny => "deny",
            Action::Allow => "allow",
        }
    }
}

/// One rule: a truncated prefix and its action. `A` is u32 (IPv4) or u128 (IPv6), host
/// order, so that sorting is by address then length (a nested prefix sorts after the
/// prefix containing it). 8 bytes for IPv4: a million rules take 8 MB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry<A> {
    pub addr: A,
    pub len: u8,
    pub action: Action,
}

impl<A: Copy + Ord> Entry<A> {
    pub fn key(&self) -> (A, u8) {
        (self.addr, self.len)
    }
}

/// Default density of the adaptive direct table: about this many ranges per bucket, so a
/// lookup's binary search takes two or three steps.
pub const RANGES_PER_BUCKET: u64 = 4;

/// Most ranges a table may have: the program's binary search (at most
/// `TABLE_SEARCH_STEPS` halvings) must be able to cover a bucket holding all of them.
pub const MAX_RANGES: u64 = 1 << TABLE_SEARCH_STEPS;

mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for u128 {}
}

/// An address family's address type as stored in a table: `u32` (IPv4) or `u128`
/// (IPv6), host order. Sealed: the table layout exists for these two only.
pub trait TableKey:
    sealed::Sealed
    + Copy
    + Ord
    + Hash
    + Debug
    + Send
    + Sync
    + 'static
    + BitOr<Output = Self>
    + BitAnd<Output = Self>
    + Not<Output = Self>
{
    /// Address width in bits.
    const BITS: u32;
    /// `TableHeader::family`: 4 or 6.
    const FAMILY: u32;
    const ZERO: Self;
    const MAX: Self;
    /// Size of one range record.
    const RANGE_BYTES: usize;
    const RANGES_PER_BLOCK: u32;

    /// The host bits of a prefix of length `len` (`len <= BITS`): all ones below it.
    fn host_mask(len: u8) -> Self;
    /// The direct-table bucket of this address: its top `direct_bits` bits.
    fn bucket(self, direct_bits: u32) -> u32;
    /// The first address of a bucket.
    fn bucket_start(bucket: u32, direct_bits: u32) -> Self;
    /// `self + 1`, `None` past the last address.
    fn succ(self) -> Option<Self>;
    /// `self - 1`, `None` before address 0.
    fn pred(self) -> Option<Self>;
    /// Writes a range record (`RANGE_BYTES` long, padding zeroed).
    fn write_range(out: &mut [u8], start: Self, verdict: u32);
    /// Reads a range record's start and verdict.
    fn read_range(range: &[u8]) -> (Self, u32);
    /// As u128, for error messages.
    fn widen(self) -> u128;
}

fn ne_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn ne_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(out: &mut [u8], at: usize, v: u64) {
    out[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// The parts of [`TableKey`] that read the same for every unsigned address width.
macro_rules! unsigned_address {
    ($t:ty) => {
        const BITS: u32 = <$t>::BITS;
        const ZERO: Self = 0;
        const MAX: Self = <$t>::MAX;

        fn host_mask(len: u8) -> Self {
            <$t>::MAX.checked_shr(u32::from(len)).unwrap_or(0)
        }
        fn bucket(self, direct_bits: u32) -> u32 {
            (self >> (Self::BITS - direct_bits)) as u32
        }
        fn bucket_start(bucket: u32, direct_bits: u32) -> Self {
            <$t>::from(bucket) << (Self::BITS - direct_bits)
        }
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
        fn pred(self) -> Option<Self> {
            self.checked_sub(1)
        }
        fn widen(self) -> u128 {
            self.into()
        }
    };
}

impl TableKey for u32 {
    unsigned_address!(u32);
    const FAMILY: u32 = 4;
    const RANGE_BYTES: usize = size_of::<V4Range>();
    const RANGES_PER_BLOCK: u32 = V4_RANGES_PER_BLOCK;

    fn write_range(out: &mut [u8], start: Self, verdict: u32) {
        put_u32(out, offset_of!(V4Range, start), start);
        put_u32(out, offset_of!(V4Range, verdict), verdict);
    }
    fn read_range(range: &[u8]) -> (Self, u32) {
        (
            ne_u32(range, offset_of!(V4Range, start)),
            ne_u32(range, offset_of!(V4Range, verdict)),
        )
    }
}

impl TableKey for u128 {
    unsigned_address!(u128);
    const FAMILY: u32 = 6;
    const RANGE_BYTES: usize = size_of::<V6Range>();
    const RANGES_PER_BLOCK: u32 = V6_RANGES_PER_BLOCK;

    fn write_range(out: &mut [u8], start: Self, verdict: u32) {
        put_u64(out, offset_of!(V6Range, start_hi), (start >> 64) as u64);
        put_u64(out, offset_of!(V6Range, start_lo), start as u64);
        put_u32(out, offset_of!(V6Range, verdict), verdict);
        put_u32(out, offset_of!(V6Range, _pad), 0);
    }
    fn read_range(range: &[u8]) -> (Self, u32) {
        let hi = ne_u64(range, offset_of!(V6Range, start_hi));
        let lo = ne_u64(range, offset_of!(V6Range, start_lo));
        (
            (u128::from(hi) << 64) | u128::from(lo),
            ne_u32(range, offset_of!(V6Range, verdict)),
        )
    }
}

/// The verdict word of a range decided by a rule of length `len`.
pub fn encode_verdict(action: Action, len: u8) -> u32 {
    let deny = match action {
        Action::Deny => VERDICT_DENY,
        Action::Allow => 0,
    };
    VERDICT_MATCHED | deny | u32::from(len)
}

/// The deciding rule's action and prefix length; `None`: no rule (allowed by default).
pub fn decode_verdict(verdict: u32) -> Option<(Action, u8)> {
    if verdict & VERDICT_MATCHED == 0 {
        return None;
    }
    let action = if verdict & VERDICT_DENY != 0 {
        Action::Deny
    } else {
        Action::Allow
    };
    Some((action, (verdict & VERDICT_PREFIX_MASK) as u8))
}

fn verdict_is_valid<K: TableKey>(verdict: u32) -> bool {
    verdict == 0
        || (verdict & VERDICT_MATCHED != 0
            && verdict & !(VERDICT_MATCHED | VERDICT_DENY | VERDICT_PREFIX_MASK) == 0
            && verdict & VERDICT_PREFIX_MASK <= K::BITS)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("rule {index}: prefix length {len} is longer than the address ({bits} bits)")]
    PrefixTooLong { index: usize, len: u8, bits: u32 },
    #[error("rule {index}: address {addr:#x} has host bits set below /{len}")]
    HostBits { index: usize, addr: u128, len: u8 },
    #[error(
        "rule {index} does not come after the rule before it in (address, length) order \
         (a rule set must be sorted and free of duplicates)"
    )]
    Unsorted { index: usize },
    #[error(
        "the rules flatten into more than {max} ranges, more than the program's \
         {TABLE_SEARCH_STEPS}-step binary search can cover"
    )]
    TooManyRanges { max: u64 },
    #[error("direct_bits {0} is outside {TABLE_MIN_DIRECT_BITS}..={TABLE_MAX_DIRECT_BITS}")]
    DirectBits(u32),
    #[error("the rules given to the second compilation pass differ from the first pass's")]
    InputChanged,
    #[error("table image of {len} bytes is too short to hold a header")]
    Truncated { len: usize },
    #[error("bad magic {0:#010x}: not a compiled rule table")]
    BadMagic(u32),
    #[error("the table is for family {found}, expected IPv{expected}")]
    WrongFamily { found: u32, expected: u32 },
    #[error("inconsistent table header: {0}")]
    Geometry(String),
    #[error("table image is {len} bytes, its header says {blocks} blocks of {TABLE_BLOCK_BYTES}")]
    LengthMismatch { len: usize, blocks: u32 },
    #[error("the first range starts at {start:#x}, not at address 0")]
    FirstRangeNotZero { start: u128 },
    #[error("range {index} does not start after the range before it")]
    UnsortedRanges { index: u32 },
    #[error("range {index} has an invalid verdict word {verdict:#010x}")]
    BadVerdict { index: u32, verdict: u32 },
    #[error("direct entry {bucket} is {found}, the bucket's first address is in range {expected}")]
    BadDirect {
        bucket: u32,
        found: u32,
        expected: u32,
    },
    #[error("the table decides by more than {max} distinct rules")]
    TooManyRules { max: usize },
}

fn direct_blocks(direct_bits: u32) -> u32 {
    (1u32 << direct_bits).div_ceil(TABLE_DIRECT_PER_BLOCK)
}

fn header_bytes(h: &TableHeader, out: &mut [u8]) {
    put_u32(out, offset_of!(TableHeader, magic), h.magic);
    put_u32(out, offset_of!(TableHeader, family), h.family);
    put_u32(out, offset_of!(TableHeader, direct_bits), h.direct_bits);
    put_u32(out, offset_of!(TableHeader, direct_block), h.direct_block);
    put_u32(out, offset_of!(TableHeader, range_block), h.range_block);
    put_u32(out, offset_of!(TableHeader, ranges), h.ranges);
    put_u32(out, offset_of!(TableHeader, blocks), h.blocks);
    put_u32(out, offset_of!(TableHeader, _pad), h._pad);
    put_u64(out, offset_of!(TableHeader, deny_rules), h.deny_rules);
    put_u64(out, offset_of!(TableHeader, allow_rules), h.allow_rules);
}

fn read_header(bytes: &[u8]) -> TableHeader {
    TableHeader {
        magic: ne_u32(bytes, offset_of!(TableHeader, magic)),
        family: ne_u32(bytes, offset_of!(TableHeader, family)),
        direct_bits: ne_u32(bytes, offset_of!(TableHeader, direct_bits)),
        direct_block: ne_u32(bytes, offset_of!(TableHeader, direct_block)),
        range_block: ne_u32(bytes, offset_of!(TableHeader, range_block)),
        ranges: ne_u32(bytes, offset_of!(TableHeader, ranges)),
        blocks: ne_u32(bytes, offset_of!(TableHeader, blocks)),
        _pad: ne_u32(bytes, offset_of!(TableHeader, _pad)),
        deny_rules: ne_u64(bytes, offset_of!(TableHeader, deny_rules)),
        allow_rules: ne_u64(bytes, offset_of!(TableHeader, allow_rules)),
    }
}

mod compile;
mod view;

pub use compile::{CompileError, Layout, Plan, TableSummary, compile, compile_to_vec};
pub use view::{Lookup, TableView};

#[cfg(test)]
mod tests;
