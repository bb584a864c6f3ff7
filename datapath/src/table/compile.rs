//! Compiling a sorted rule set into a table image: flatten to disjoint ranges, then
//! write the header, the direct table and the range blocks, in two streaming passes.

use std::marker::PhantomData;

use egress_deny_common::{
    TABLE_BLOCK_BYTES, TABLE_DIRECT_PER_BLOCK, TABLE_MAGIC, TABLE_MAX_DIRECT_BITS,
    TABLE_MIN_DIRECT_BITS, TableHeader,
};

use super::{
    Action, Entry, MAX_RANGES, RANGES_PER_BUCKET, TableError, TableKey, direct_blocks,
    encode_verdict, header_bytes,
};

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
