//! The compiled rule table: a rule set flattened into disjoint address ranges, each
//! carrying the verdict of the longest prefix covering it, plus a direct table that
//! narrows a lookup to one bucket's ranges. It replaces the kernel LPM trie; the layout
//! (block geometry, [`TableHeader`], [`V4Range`]/[`V6Range`], verdict word) is defined in
//! `egress_deny_common` next to `TABLE_BLOCK_BYTES`.
//!
//! This module is pure logic (no kernel access): [`Plan`]/[`compile`] turn a sorted rule
//! set into a table image, block by block, without holding the image in memory;
//! [`TableView`] validates an image and looks addresses up exactly the way the eBPF
//! program does.
//!
//! [`TableHeader`]: egress_deny_common::TableHeader
//! [`V4Range`]: egress_deny_common::V4Range
//! [`V6Range`]: egress_deny_common::V6Range
use std::{
    fmt::Debug,
    hash::Hash,
    marker::PhantomData,
    mem::{offset_of, size_of},
    ops::{BitAnd, BitOr, Not},
};

use egress_deny_common::{
    MAX_RULES_PER_FAMILY, TABLE_BLOCK_BYTES, TABLE_DIRECT_PER_BLOCK, TABLE_MAGIC,
    TABLE_MAX_DIRECT_BITS, TABLE_MIN_DIRECT_BITS, TABLE_SEARCH_STEPS, TableHeader,
    V4_RANGES_PER_BLOCK, V4Range, V6_RANGES_PER_BLOCK, V6Range, VERDICT_DENY, VERDICT_MATCHED,
    VERDICT_PREFIX_MASK,
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

/// Errors of writing a table through a sink: the rules, or the sink's own error.
#[derive(Debug, thiserror::Error)]
pub enum CompileError<E> {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("writing block {block} of the table: {source}")]
    Sink {
        block: u32,
        #[source]
        source: E,
    },
}

/// Flattens sorted rules into ranges, calling `emit(start, verdict)` for each range in
/// ascending order; the first starts at 0, each lasts until the next one's start, and
/// neighbours never share a verdict word (merging them is exact: the deciding rule is
/// the destination truncated to the stored length). Validates the input on the way.
/// Returns (deny, allow) rule counts.
fn flatten<K: TableKey>(
    entries: &[Entry<K>],
    mut emit: impl FnMut(K, u32) -> Result<(), TableError>,
) -> Result<(u64, u64), TableError> {
    // Rules containing the sweep position, outermost first: (last address, verdict).
    // Prefixes either nest or are disjoint, so this is at most BITS + 1 deep.
    let mut stack: Vec<(K, u32)> = Vec::with_capacity(K::BITS as usize + 1);
    // First address not yet covered by an emitted range. Ranges are emitted once their
    // end is known, but only their start is stored.
    let mut pos = K::ZERO;
    let mut previous: Option<u32> = None;
    let mut out = |start: K, verdict: u32| {
        if previous == Some(verdict) {
            return Ok(());
        }
        previous = Some(verdict);
        emit(start, verdict)
    };
    let (mut deny, mut allow) = (0u64, 0u64);
    for (index, e) in entries.iter().enumerate() {
        if u32::from(e.len) > K::BITS {
            return Err(TableError::PrefixTooLong {
                index,
                len: e.len,
                bits: K::BITS,
            });
        }
        let mask = K::host_mask(e.len);
        if e.addr & mask != K::ZERO {
            return Err(TableError::HostBits {
                index,
                addr: e.addr.widen(),
                len: e.len,
            });
        }
        if index > 0 && entries[index - 1].key() >= e.key() {
            return Err(TableError::Unsorted { index });
        }
        match e.action {
            Action::Deny => deny += 1,
            Action::Allow => allow += 1,
        }
        let first = e.addr;
        // Close the rules that end before this one starts.
        while let Some(&(last, verdict)) = stack.last() {
            if last >= first {
                break;
            }
            if pos <= last {
                out(pos, verdict)?;
                pos = last.succ().expect("ends before another rule starts");
            }
            stack.pop();
        }
        // The gap up to this rule belongs to the innermost rule still open (which
        // contains this one), or to no rule.
        if pos < first {
            out(pos, stack.last().map_or(0, |t| t.1))?;
            pos = first;
        }
        stack.push((first | mask, encode_verdict(e.action, e.len)));
    }
    // Close the rest; `pos` runs off the end once a rule reaching the last address is
    // closed (all rules still open then reach it too).
    let mut pos = Some(pos);
    while let Some((last, verdict)) = stack.pop() {
        if let Some(p) = pos
            && p <= last
        {
            out(p, verdict)?;
            pos = last.succ();
        }
    }
    if let Some(p) = pos {
        out(p, 0)?;
    }
    Ok((deny, allow))
}

/// Options of the table's shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Fixed direct-table width (e.g. 16 for a DXR-style table); `None` chooses about
    /// [`RANGES_PER_BUCKET`] ranges per bucket.
    pub direct_bits: Option<u32>,
}

/// What a compiled table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSummary {
    /// 4 or 6.
    pub family: u32,
    /// Blocks of `TABLE_BLOCK_BYTES` (the inner map's max_entries).
    pub blocks: u32,
    pub ranges: u32,
    pub direct_bits: u32,
    pub deny_rules: u64,
    pub allow_rules: u64,
    /// `blocks * TABLE_BLOCK_BYTES`.
    pub bytes: u64,
}

fn ceil_log2(n: u64) -> u32 {
    if n <= 1 {
        0
    } else {
        64 - (n - 1).leading_zeros()
    }
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

/// The first compilation pass's result: the table's size and header, known before any
/// block is written (so the caller can create the inner map of the right size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan<K> {
    header: TableHeader,
    _key: PhantomData<fn() -> K>,
}

impl<K: TableKey> Plan<K> {
    /// Pass 1: validates the rules (sorted by (addr, len), no duplicates, truncated,
    /// lengths within the family) and counts the ranges. Memory use is independent of
    /// the number of rules.
    pub fn new(entries: &[Entry<K>], layout: Layout) -> Result<Self, TableError> {
        let mut ranges = 0u64;
        let (deny, allow) = flatten(entries, |_, _| {
            ranges += 1;
            if ranges > MAX_RANGES {
                return Err(TableError::TooManyRanges { max: MAX_RANGES });
            }
            Ok(())
        })?;
        let direct_bits = match layout.direct_bits {
            Some(bits) if (TABLE_MIN_DIRECT_BITS..=TABLE_MAX_DIRECT_BITS).contains(&bits) => bits,
            Some(bits) => return Err(TableError::DirectBits(bits)),
            None => ceil_log2(ranges.div_ceil(RANGES_PER_BUCKET))
                .clamp(TABLE_MIN_DIRECT_BITS, TABLE_MAX_DIRECT_BITS),
        };
        let ranges = ranges as u32; // <= MAX_RANGES
        let direct_block = 1;
        let range_block = direct_block + direct_blocks(direct_bits);
        let blocks = range_block + ranges.div_ceil(K::RANGES_PER_BLOCK);
        Ok(Self {
            header: TableHeader {
                magic: TABLE_MAGIC,
                family: K::FAMILY,
                direct_bits,
                direct_block,
                range_block,
                ranges,
                blocks,
                _pad: 0,
                deny_rules: deny,
                allow_rules: allow,
            },
            _key: PhantomData,
        })
    }

    pub fn header(&self) -> TableHeader {
        self.header
    }

    pub fn summary(&self) -> TableSummary {
        let h = &self.header;
        TableSummary {
            family: h.family,
            blocks: h.blocks,
            ranges: h.ranges,
            direct_bits: h.direct_bits,
            deny_rules: h.deny_rules,
            allow_rules: h.allow_rules,
            bytes: u64::from(h.blocks) * TABLE_BLOCK_BYTES as u64,
        }
    }

    /// Pass 2: writes the table through `sink(block_index, block)`, every block exactly
    /// once and exactly `TABLE_BLOCK_BYTES` long. Order: block 0 (the header) first,
    /// then the direct-table blocks and the range blocks interleaved as they fill, each
    /// kind in ascending index order. `entries` must be the rules given to
    /// [`Plan::new`]. Holds two blocks in memory, not the image.
    pub fn write<E>(
        &self,
        entries: &[Entry<K>],
        mut sink: impl FnMut(u32, &[u8]) -> Result<(), E>,
    ) -> Result<TableSummary, CompileError<E>> {
        let h = self.header;
        let mut block = vec![0u8; TABLE_BLOCK_BYTES];
        header_bytes(&h, &mut block);
        sink(0, &block).map_err(|source| CompileError::Sink { block: 0, source })?;
        block.fill(0);

        let mut w = BlockWriter::<K, _, E> {
            sink: &mut sink,
            error: None,
            direct: block,
            direct_len: 0,
            direct_next_block: h.direct_block,
            buckets: 1 << h.direct_bits,
            next_bucket: 0,
            direct_bits: h.direct_bits,
            ranges: vec![0u8; TABLE_BLOCK_BYTES],
            ranges_len: 0,
            range_next_block: h.range_block,
            emitted: 0,
            planned: h.ranges,
            _key: PhantomData,
        };
        let flattened = flatten(entries, |start, verdict| w.range(start, verdict));
        if let Some(e) = w.error.take() {
            return Err(e);
        }
        let (deny, allow) = flattened?;
        if (deny, allow) != (h.deny_rules, h.allow_rules) || w.emitted != h.ranges {
            return Err(TableError::InputChanged.into());
        }
        w.finish()?;
        Ok(self.summary())
    }
}

/// Pass 2's state: the direct-table block and the range block being filled.
struct BlockWriter<'s, K, S, E> {
    sink: &'s mut S,
    /// A sink error, kept here because `flatten`'s callback can only fail with a
    /// `TableError`.
    error: Option<CompileError<E>>,
    direct: Vec<u8>,
    /// Entries in `direct`.
    direct_len: u32,
    direct_next_block: u32,
    buckets: u32,
    next_bucket: u32,
    direct_bits: u32,
    ranges: Vec<u8>,
    /// Ranges in `ranges`.
    ranges_len: u32,
    range_next_block: u32,
    emitted: u32,
    planned: u32,
    _key: PhantomData<fn() -> K>,
}

impl<K: TableKey, S: FnMut(u32, &[u8]) -> Result<(), E>, E> BlockWriter<'_, K, S, E> {
    fn range(&mut self, start: K, verdict: u32) -> Result<(), TableError> {
        if self.emitted == self.planned {
            return Err(TableError::InputChanged);
        }
        if self.emitted > 0 {
            // Buckets whose first address lies before `start` end in the previous range
            // (or an earlier one, already filled).
            let end = match start.pred() {
                Some(p) => p.bucket(self.direct_bits) + 1,
                None => 0,
            };
            self.fill_direct(end, self.emitted - 1)?;
        }
        let at = self.ranges_len as usize * K::RANGE_BYTES;
        K::write_range(&mut self.ranges[at..at + K::RANGE_BYTES], start, verdict);
        self.ranges_len += 1;
        self.emitted += 1;
        if self.ranges_len == K::RANGES_PER_BLOCK {
            self.flush_ranges()?;
        }
        Ok(())
    }

    /// Sets the direct entries of buckets up to (excluding) `end` to `index`.
    fn fill_direct(&mut self, end: u32, index: u32) -> Result<(), TableError> {
        let end = end.min(self.buckets);
        while self.next_bucket < end {
            let n = (end - self.next_bucket).min(TABLE_DIRECT_PER_BLOCK - self.direct_len);
            let bytes = index.to_ne_bytes();
            let from = self.direct_len as usize * 4;
            for slot in self.direct[from..from + n as usize * 4].chunks_exact_mut(4) {
                slot.copy_from_slice(&bytes);
            }
            self.direct_len += n;
            self.next_bucket += n;
            if self.direct_len == TABLE_DIRECT_PER_BLOCK {
                self.flush_direct()?;
            }
        }
        Ok(())
    }

    fn send(&mut self, block: u32, direct: bool) -> Result<(), TableError> {
        let bytes = if direct { &self.direct } else { &self.ranges };
        if let Err(source) = (self.sink)(block, bytes) {
            self.error = Some(CompileError::Sink { block, source });
            // Stops `flatten`; `write` reports `self.error` instead.
            return Err(TableError::InputChanged);
        }
        Ok(())
    }

    fn flush_direct(&mut self) -> Result<(), TableError> {
        let used = self.direct_len as usize * 4;
        self.direct[used..].fill(0);
        self.send(self.direct_next_block, true)?;
        self.direct_next_block += 1;
        self.direct_len = 0;
        Ok(())
    }

    fn flush_ranges(&mut self) -> Result<(), TableError> {
        let used = self.ranges_len as usize * K::RANGE_BYTES;
        self.ranges[used..].fill(0);
        self.send(self.range_next_block, false)?;
        self.range_next_block += 1;
        self.ranges_len = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<(), CompileError<E>> {
        let last = self.emitted - 1;
        let mut done = self.fill_direct(self.buckets, last);
        if done.is_ok() && self.direct_len > 0 {
            done = self.flush_direct();
        }
        if done.is_ok() && self.ranges_len > 0 {
            done = self.flush_ranges();
        }
        match (done, self.error.take()) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
            (Ok(()), None) => Ok(()),
        }
    }
}

/// Both passes: [`Plan::new`] then [`Plan::write`]. Use the two steps when the
/// destination must be sized before the first block arrives.
pub fn compile<K: TableKey, E>(
    entries: &[Entry<K>],
    layout: Layout,
    sink: impl FnMut(u32, &[u8]) -> Result<(), E>,
) -> Result<TableSummary, CompileError<E>> {
    Plan::new(entries, layout)?.write(entries, sink)
}

/// The whole table image in memory, for tests and small rule sets.
pub fn compile_to_vec<K: TableKey>(
    entries: &[Entry<K>],
    layout: Layout,
) -> Result<Vec<u8>, TableError> {
    let plan = Plan::new(entries, layout)?;
    let mut image = vec![0u8; plan.summary().bytes as usize];
    let written = plan.write(entries, |block, bytes| {
        let at = block as usize * TABLE_BLOCK_BYTES;
        image[at..at + TABLE_BLOCK_BYTES].copy_from_slice(bytes);
        Ok::<(), std::convert::Infallible>(())
    });
    match written {
        Ok(_) => Ok(image),
        Err(CompileError::Table(e)) => Err(e),
        Err(CompileError::Sink { source, .. }) => match source {},
    }
}

/// Result of a lookup: the verdict word and the index of the range that decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub verdict: u32,
    pub range: u32,
}

impl Lookup {
    /// See [`decode_verdict`].
    pub fn decision(&self) -> Option<(Action, u8)> {
        decode_verdict(self.verdict)
    }
}

/// A table image (e.g. an mmap of an inner table map) for one family, validated.
#[derive(Clone, Copy, Debug)]
pub struct TableView<'a, K> {
    bytes: &'a [u8],
    header: TableHeader,
    _key: PhantomData<fn() -> K>,
}

impl<'a, K: TableKey> TableView<'a, K> {
    /// Validates the header and the whole table, O(size): first range at 0, starts
    /// strictly ascending, valid verdict words, every direct entry naming the range
    /// that covers its bucket's first address.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, TableError> {
        let view = Self::parse_header(bytes)?;
        view.validate()?;
        Ok(view)
    }

    /// Validates the header and the image's length only, O(1). Lookups in a table whose
    /// contents are corrupt stay in bounds (never panic) but may answer wrongly.
    pub fn parse_header(bytes: &'a [u8]) -> Result<Self, TableError> {
        if bytes.len() < size_of::<TableHeader>() {
            return Err(TableError::Truncated { len: bytes.len() });
        }
        let h = read_header(bytes);
        if h.magic != TABLE_MAGIC {
            return Err(TableError::BadMagic(h.magic));
        }
        if h.family != K::FAMILY {
            return Err(TableError::WrongFamily {
                found: h.family,
                expected: K::FAMILY,
            });
        }
        if !(TABLE_MIN_DIRECT_BITS..=TABLE_MAX_DIRECT_BITS).contains(&h.direct_bits) {
            return Err(TableError::DirectBits(h.direct_bits));
        }
        if h.ranges == 0 || u64::from(h.ranges) > MAX_RANGES {
            return Err(TableError::Geometry(format!(
                "{} ranges (1..={MAX_RANGES})",
                h.ranges
            )));
        }
        let direct_end = u64::from(h.direct_block) + u64::from(direct_blocks(h.direct_bits));
        let range_end =
            u64::from(h.range_block) + u64::from(h.ranges.div_ceil(K::RANGES_PER_BLOCK));
        if h.direct_block == 0 || direct_end > u64::from(h.range_block) {
            return Err(TableError::Geometry(format!(
                "direct table at block {} ({} blocks) overlaps the header or the ranges at block {}",
                h.direct_block,
                direct_blocks(h.direct_bits),
                h.range_block
            )));
        }
        if range_end > u64::from(h.blocks) {
            return Err(TableError::Geometry(format!(
                "{} ranges from block {} do not fit in {} blocks",
                h.ranges, h.range_block, h.blocks
            )));
        }
        if bytes.len() as u64 != u64::from(h.blocks) * TABLE_BLOCK_BYTES as u64 {
            return Err(TableError::LengthMismatch {
                len: bytes.len(),
                blocks: h.blocks,
            });
        }
        Ok(Self {
            bytes,
            header: h,
            _key: PhantomData,
        })
    }

    fn validate(&self) -> Result<(), TableError> {
        let ranges = self.header.ranges;
        let (first, _) = self.range(0);
        if first != K::ZERO {
            return Err(TableError::FirstRangeNotZero {
                start: first.widen(),
            });
        }
        let mut previous = K::ZERO;
        for index in 0..ranges {
            let (start, verdict) = self.range(index);
            if index > 0 && start <= previous {
                return Err(TableError::UnsortedRanges { index });
            }
            if !verdict_is_valid::<K>(verdict) {
                return Err(TableError::BadVerdict { index, verdict });
            }
            previous = start;
        }
        let bits = self.header.direct_bits;
        let mut expected = 0;
        for bucket in 0..1u32 << bits {
            let first = K::bucket_start(bucket, bits);
            while expected + 1 < ranges && self.range(expected + 1).0 <= first {
                expected += 1;
            }
            let found = self.direct(bucket);
            if found != expected {
                return Err(TableError::BadDirect {
                    bucket,
                    found,
                    expected,
                });
            }
        }
        Ok(())
    }

    pub fn header(&self) -> &TableHeader {
        &self.header
    }

    fn direct(&self, bucket: u32) -> u32 {
        let at = self.header.direct_block as usize * TABLE_BLOCK_BYTES + bucket as usize * 4;
        ne_u32(self.bytes, at)
    }

    /// Range `index`'s start and verdict word; `index < header().ranges`.
    pub fn range(&self, index: u32) -> (K, u32) {
        let per = K::RANGES_PER_BLOCK;
        let at = (self.header.range_block + index / per) as usize * TABLE_BLOCK_BYTES
            + (index % per) as usize * K::RANGE_BYTES;
        K::read_range(&self.bytes[at..at + K::RANGE_BYTES])
    }

    /// The lookup the eBPF program does: the bucket's direct entries bound a binary
    /// search (at most `TABLE_SEARCH_STEPS` steps) for the last range starting at or
    /// below `addr`.
    pub fn search(&self, addr: K) -> Lookup {
        let h = &self.header;
        let last = h.ranges - 1;
        let bucket = addr.bucket(h.direct_bits);
        // The clamps only matter for a table that passed `parse_header` alone.
        let mut hi = if bucket + 1 < 1 << h.direct_bits {
            self.direct(bucket + 1).min(last)
        } else {
            last
        };
        let mut lo = self.direct(bucket).min(hi);
        for _ in 0..TABLE_SEARCH_STEPS {
            if lo >= hi {
                break;
            }
            // The program's `lo + (hi - lo + 1) / 2`: the upper middle, so `lo = mid`
            // always moves.
            let mid = lo + (hi - lo).div_ceil(2);
            if self.range(mid).0 <= addr {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Lookup {
            verdict: self.range(lo).1,
            range: lo,
        }
    }

    /// The deciding rules, sorted by (addr, len): for every matched range, each prefix
    /// of the stored length overlapping it. They compile to a table that decides every
    /// address identically (rules that decide no address are gone). Fails rather than
    /// allocate without bound on a corrupt table claiming more than
    /// `MAX_RULES_PER_FAMILY` rules.
    pub fn rules(&self) -> Result<Vec<Entry<K>>, TableError> {
        let max = MAX_RULES_PER_FAMILY as usize;
        let mut rules = Vec::new();
        // Per length, the last prefix produced: ranges ascend, so a rule spanning several
        // ranges (split by its exceptions) repeats right there.
        let mut last_of_len: Vec<Option<K>> = vec![None; K::BITS as usize + 1];
        let ranges = self.header.ranges;
        for index in 0..ranges {
            let (start, verdict) = self.range(index);
            let Some((action, len)) = decode_verdict(verdict) else {
                continue;
            };
            if u32::from(len) > K::BITS {
                continue; // Only a table that skipped `parse` gets here.
            }
            let end = if index + 1 < ranges {
                match self.range(index + 1).0.pred() {
                    Some(end) => end,
                    None => continue,
                }
            } else {
                K::MAX
            };
            let mask = K::host_mask(len);
            let mut addr = start & !mask;
            loop {
                if last_of_len[len as usize] != Some(addr) {
                    if rules.len() == max {
                        return Err(TableError::TooManyRules { max });
                    }
                    rules.push(Entry { addr, len, action });
                    last_of_len[len as usize] = Some(addr);
                }
                let last = addr | mask;
                if last >= end {
                    break;
                }
                addr = last.succ().expect("below end");
            }
        }
        rules.sort_unstable();
        Ok(rules)
    }
}

#[cfg(test)]
mod tests;
