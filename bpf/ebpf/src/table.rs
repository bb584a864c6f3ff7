//! Lookups in the compiled rule tables (layout: `egress_deny_common::TABLE_BLOCK_BYTES`).
//!
//! Each family's outer map holds, in slot 0, the inner array map of the rule set in
//! force; the installer swaps in a new one with a single update, so a packet sees one
//! whole rule set or the other. A lookup is: bucket from the top bits (direct table),
//! then a bounded binary search over the few ranges of that bucket. Each function is its
//! own BPF subprogram (`inline(never)`): the verifier checks it once, not per caller.
use core::hint::black_box;

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps},
    macros::btf_map,
};
use egress_deny_common::{
    TABLE_BLOCK_BYTES, TABLE_DIRECT_PER_BLOCK, TABLE_MAGIC, TABLE_MAP_FLAGS, TABLE_MAX_DIRECT_BITS,
    TABLE_MIN_DIRECT_BITS, TABLE_SEARCH_STEPS, TableHeader, V4_RANGES_PER_BLOCK,
    V6_RANGES_PER_BLOCK, VERDICT_MATCHED,
};

/// One block of a table. u64 words: the program reads aligned 4- and 8-byte fields.
pub type Block = [u64; TABLE_BLOCK_BYTES / 8];
type Table = Array<Block, 1, { TABLE_MAP_FLAGS as usize }>;

// Map names are part of the bpffs layout (see datapath::paths); keep them in sync.
#[btf_map(name = "v4_table")]
pub static V4_TABLE: ArrayOfMaps<Table, 1> = ArrayOfMaps::new();

#[btf_map(name = "v6_table")]
pub static V6_TABLE: ArrayOfMaps<Table, 1> = ArrayOfMaps::new();

/// No table in the slot: nothing compiled yet, decided like an empty rule set.
pub const NO_TABLE: u32 = 0;

/// The table is not what the installer writes (a block missing, a header out of range,
/// a search that does not converge): fail closed.
pub struct Corrupt;

/// The verdict word of the range deciding `daddr` (host order); `NO_TABLE`'s 0 = no rule.
#[inline(never)]
pub fn lookup_v4(daddr: u32) -> Result<u32, Corrupt> {
    let Some(table) = V4_TABLE.get(0) else {
        return Ok(NO_TABLE);
    };
    let header = header(table, 4)?;
    let shift = 32 - header.direct_bits;
    let bucket = (u64::from(daddr) >> shift) as u32;
    let (mut lo, mut hi) = bucket_bounds(table, &header, bucket)?;
    let target = black_box(u64::from(daddr));
    // Nearly always a bucket's ranges share one block: one map lookup for every step.
    let first_block = lo / V4_RANGES_PER_BLOCK;
    if first_block == hi / V4_RANGES_PER_BLOCK {
        let block = table.get(header.range_block + first_block).ok_or(Corrupt)?;
        let base = first_block * V4_RANGES_PER_BLOCK;
        return search_v4_block(block, lo - base, hi - base, target);
    }
    for _ in 0..TABLE_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo).div_ceil(2);
        let (start, _) = v4_range(table, &header, mid)?;
        // 1 when the range starts above the destination (the subtraction borrows).
        let above = target.wrapping_sub(u64::from(start)) >> 63;
        (lo, hi) = narrow(lo, hi, mid, above);
    }
    if lo != hi {
        return Err(Corrupt);
    }
    Ok(v4_range(table, &header, lo)?.1)
}

/// As [`lookup_v4`], for the IPv6 destination's high and low 64 bits (host order).
#[inline(never)]
pub fn lookup_v6(hi_bits: u64, lo_bits: u64) -> Result<u32, Corrupt> {
    let Some(table) = V6_TABLE.get(0) else {
        return Ok(NO_TABLE);
    };
    let header = header(table, 6)?;
    let shift = 64 - header.direct_bits;
    let bucket = (hi_bits >> shift) as u32;
    let (mut lo, mut hi) = bucket_bounds(table, &header, bucket)?;
    let (target_hi, target_lo) = (black_box(hi_bits), black_box(lo_bits));
    let first_block = lo / V6_RANGES_PER_BLOCK;
    if first_block == hi / V6_RANGES_PER_BLOCK {
        let block = table.get(header.range_block + first_block).ok_or(Corrupt)?;
        let base = first_block * V6_RANGES_PER_BLOCK;
        return search_v6_block(block, lo - base, hi - base, target_hi, target_lo);
    }
    for _ in 0..TABLE_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo).div_ceil(2);
        let (start_hi, start_lo, _) = v6_range(table, &header, mid)?;
        (lo, hi) = narrow(
            lo,
            hi,
            mid,
            v6_above(start_hi, start_lo, target_hi, target_lo),
        );
    }
    if lo != hi {
        return Err(Corrupt);
    }
    Ok(v6_range(table, &header, lo)?.2)
}

/// The binary search within one block (indexes relative to the block).
///
/// The four searches (IPv4/IPv6, across blocks and within one) are written out on
/// purpose: one shared `bisect` taking the step's comparison as a closure verified and
/// gave the same verdicts, but its code spilled more registers and cost 3–5 ns more per
/// packet on the same-packet path at 1M rules (bench-datapath, A/B runs interleaved).
#[inline(always)]
fn search_v4_block(block: &Block, mut lo: u32, mut hi: u32, target: u64) -> Result<u32, Corrupt> {
    for _ in 0..TABLE_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo).div_ceil(2);
        let start = block_word(block, mid as usize) as u32;
        (lo, hi) = narrow(lo, hi, mid, target.wrapping_sub(u64::from(start)) >> 63);
    }
    if lo != hi {
        return Err(Corrupt);
    }
    Ok((block_word(block, lo as usize) >> 32) as u32)
}

#[inline(always)]
fn search_v6_block(
    block: &Block,
    mut lo: u32,
    mut hi: u32,
    target_hi: u64,
    target_lo: u64,
) -> Result<u32, Corrupt> {
    for _ in 0..TABLE_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo).div_ceil(2);
        let (start_hi, start_lo, _) = v6_record(block, mid)?;
        (lo, hi) = narrow(
            lo,
            hi,
            mid,
            v6_above(start_hi, start_lo, target_hi, target_lo),
        );
    }
    if lo != hi {
        return Err(Corrupt);
    }
    Ok(v6_record(block, lo)?.2)
}

/// 1 when the range starting at (start_hi, start_lo) starts above the destination: the
/// 128-bit subtraction destination - start borrows out of its high word.
#[inline(always)]
fn v6_above(start_hi: u64, start_lo: u64, target_hi: u64, target_lo: u64) -> u64 {
    let low_borrow = borrow(target_lo, start_lo, target_lo.wrapping_sub(start_lo));
    let high = target_hi.wrapping_sub(start_hi).wrapping_sub(low_borrow);
    borrow(target_hi, start_hi, high)
}

/// The u64 word `word` of a block (masked into it: always in bounds).
#[inline(always)]
fn block_word(block: &Block, word: usize) -> u64 {
    // SAFETY: the mask keeps the index below the block's TABLE_BLOCK_BYTES / 8 words.
    unsafe {
        block
            .as_ptr()
            .add(word & (TABLE_BLOCK_BYTES / 8 - 1))
            .read()
    }
}

/// (start high bits, start low bits, verdict) of the IPv6 record `index` of a block.
#[inline(always)]
fn v6_record(block: &Block, index: u32) -> Result<(u64, u64, u32), Corrupt> {
    // The compiler knows this is below the limit and would drop the check; the verifier
    // does not follow a modulo by a non-power of two and needs it: hide the value.
    let word = black_box((index % V6_RANGES_PER_BLOCK) as usize * 3);
    if word > TABLE_BLOCK_BYTES / 8 - 3 {
        return Err(Corrupt);
    }
    // SAFETY: word + 2 < TABLE_BLOCK_BYTES / 8 (checked just above).
    unsafe {
        let base = block.as_ptr().add(word);
        Ok((base.read(), base.add(1).read(), base.add(2).read() as u32))
    }
}

/// One binary-search step without a branch: keeps [mid, hi] when the range at `mid`
/// starts at or below the destination (`above` = 0), [lo, mid - 1] otherwise (1). A
/// branch here would double the paths the verifier walks at every step (2^27); masks
/// keep it one path. `black_box` stops the compiler from turning the masks back into a
/// branch.
#[inline(always)]
fn narrow(lo: u32, hi: u32, mid: u32, above: u64) -> (u32, u32) {
    let keep_low = black_box(0u32.wrapping_sub(above as u32));
    (
        mid.wrapping_sub((mid - lo) & keep_low),
        hi.wrapping_sub((hi - mid + 1) & keep_low),
    )
}

/// The borrow out of `a - b - borrow_in` given its wrapped `difference`, as 0 or 1,
/// without a comparison (which would compile to a branch; Hacker's Delight 2-13).
#[inline(always)]
fn borrow(a: u64, b: u64, difference: u64) -> u64 {
    ((!a & b) | (!(a ^ b) & difference)) >> 63
}

/// Whether a verdict word denies.
#[inline(always)]
pub fn denies(verdict: u32) -> bool {
    verdict & VERDICT_MATCHED != 0 && verdict & egress_deny_common::VERDICT_DENY != 0
}

#[inline(always)]
fn header(table: &Table, family: u32) -> Result<TableHeader, Corrupt> {
    let block = table.get(0).ok_or(Corrupt)?;
    // SAFETY: a TableHeader (48 bytes, 8-aligned) at the start of a 64 KiB block.
    let header = unsafe { (block.as_ptr() as *const TableHeader).read() };
    if header.magic != TABLE_MAGIC
        || header.family != family
        || header.direct_bits < TABLE_MIN_DIRECT_BITS
        || header.direct_bits > TABLE_MAX_DIRECT_BITS
        || header.ranges == 0
    {
        return Err(Corrupt);
    }
    Ok(header)
}

/// The first and last range index that can decide an address of `bucket`.
#[inline(always)]
fn bucket_bounds(table: &Table, header: &TableHeader, bucket: u32) -> Result<(u32, u32), Corrupt> {
    let block = table
        .get(header.direct_block + bucket / TABLE_DIRECT_PER_BLOCK)
        .ok_or(Corrupt)?;
    let slot = bucket % TABLE_DIRECT_PER_BLOCK;
    let lo = direct_entry(block, slot);
    let hi = if bucket + 1 >= (1u32 << header.direct_bits) {
        header.ranges - 1
    } else if slot + 1 < TABLE_DIRECT_PER_BLOCK {
        direct_entry(block, slot + 1)
    } else {
        direct(table, header, bucket + 1)?
    };
    if lo > hi || hi >= header.ranges {
        return Err(Corrupt);
    }
    Ok((lo, hi))
}

#[inline(always)]
fn direct(table: &Table, header: &TableHeader, bucket: u32) -> Result<u32, Corrupt> {
    let block = table
        .get(header.direct_block + bucket / TABLE_DIRECT_PER_BLOCK)
        .ok_or(Corrupt)?;
    Ok(direct_entry(block, bucket % TABLE_DIRECT_PER_BLOCK))
}

/// Direct-table entry `slot` of a block.
#[inline(always)]
fn direct_entry(block: &Block, slot: u32) -> u32 {
    let offset = (slot as usize * 4) & (TABLE_BLOCK_BYTES - 4);
    // SAFETY: offset is 4-aligned and at most TABLE_BLOCK_BYTES - 4.
    unsafe { (block.as_ptr().cast::<u8>().add(offset) as *const u32).read() }
}

/// (start, verdict) of IPv4 range `index`.
#[inline(always)]
fn v4_range(table: &Table, header: &TableHeader, index: u32) -> Result<(u32, u32), Corrupt> {
    let block = table
        .get(header.range_block + index / V4_RANGES_PER_BLOCK)
        .ok_or(Corrupt)?;
    let value = block_word(block, (index % V4_RANGES_PER_BLOCK) as usize);
    Ok((value as u32, (value >> 32) as u32))
}

/// (start high bits, start low bits, verdict) of IPv6 range `index`.
#[inline(always)]
fn v6_range(table: &Table, header: &TableHeader, index: u32) -> Result<(u64, u64, u32), Corrupt> {
    let block = table
        .get(header.range_block + index / V6_RANGES_PER_BLOCK)
        .ok_or(Corrupt)?;
    v6_record(block, index)
}
