//! Reading a table image: validating it (its header only, or whole) and looking
//! addresses up exactly the way the eBPF program does.

use std::marker::PhantomData;

use egress_deny_common::{
    MAX_RULES_PER_FAMILY, TABLE_BLOCK_BYTES, TABLE_MAGIC, TABLE_MAX_DIRECT_BITS,
    TABLE_MIN_DIRECT_BITS, TABLE_SEARCH_STEPS, TableHeader,
};

use super::{
    Action, Entry, MAX_RANGES, TableError, TableKey, decode_verdict, direct_blocks, ne_u32,
    read_header, verdict_is_valid,
};

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
