//! Benchmark anchor, not shipped: the tc-eBPF filter design of the published egress
//! filtering benchmark — Ethernet + IPv4 only, one LPM lookup on the destination, drop
//! on a hit. Kept fixed so datapath changes can be compared against the same baseline.
//! Also the random-destination lookup benchmark of the compiled tables against it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
#[path = "object.rs"]
mod object;
#[cfg(target_arch = "bpf")]
#[path = "table.rs"]
mod table;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT},
        helpers::generated::bpf_get_prandom_u32,
        macros::{classifier, map},
        maps::{LpmTrie, lpm_trie::Key},
        programs::TcContext,
    };

    #[map(name = "ref_v4")]
    static REF_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1 << 24, 0);

    #[classifier]
    pub fn reference_lpm(ctx: TcContext) -> i32 {
        try_reference_lpm(&ctx).unwrap_or(TC_ACT_OK)
    }

    fn try_reference_lpm(ctx: &TcContext) -> Result<i32, ()> {
        let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
        if ethertype != 0x0800 {
            return Ok(TC_ACT_OK);
        }
        let daddr: [u8; 4] = ctx.load(14 + 16).map_err(|_| ())?;
        Ok(match REF_V4.get(Key::new(32, daddr)) {
            Some(_) => TC_ACT_SHOT,
            None => TC_ACT_OK,
        })
    }

    /// Random-destination lookup benchmark (BPF_PROG_TEST_RUN with `repeat`, one lookup
    /// per run; bench-datapath subtracts the `LOOKUP_NONE` run). The test packet's first
    /// bytes say what to do: `[what, 0, 0, 0, working_set: u32 LE]`; a working set of 0
    /// draws uniformly random destinations, W > 0 folds them onto W fixed ones spread
    /// over the address space. Returns the verdict so the lookup cannot be optimised away.
    #[classifier]
    pub fn bench_random(ctx: TcContext) -> i32 {
        let Ok(what) = ctx.load::<u8>(0) else {
            return TC_ACT_OK;
        };
        let working_set = ctx.load::<u32>(4).unwrap_or(0);
        // SAFETY: helper without preconditions.
        let draw = unsafe { bpf_get_prandom_u32() };
        let daddr = if working_set == 0 {
            draw
        } else {
            // Multiplicative hash of the slot: W destinations spread over the space.
            (draw % working_set).wrapping_mul(0x9E37_79B1)
        };
        match what {
            LOOKUP_TABLE => match crate::table::lookup_v4(daddr) {
                Ok(verdict) if crate::table::denies(verdict) => TC_ACT_SHOT,
                Ok(_) => TC_ACT_OK,
                Err(_) => -1,
            },
            LOOKUP_TRIE => match REF_V4.get(Key::new(32, daddr.to_be_bytes())) {
                Some(_) => TC_ACT_SHOT,
                None => TC_ACT_OK,
            },
            LOOKUP_TABLE_V6 => {
                // SAFETY: helper without preconditions.
                let low = unsafe { bpf_get_prandom_u32() };
                // Global unicast (2000::/3), where IPv6 lists live.
                let hi = (1u64 << 61) | ((u64::from(daddr) << 29) & ((1u64 << 61) - 1));
                match crate::table::lookup_v6(hi, u64::from(low)) {
                    Ok(verdict) if crate::table::denies(verdict) => TC_ACT_SHOT,
                    Ok(_) => TC_ACT_OK,
                    Err(_) => -1,
                }
            }
            _ => (daddr & 1) as i32,
        }
    }

    const LOOKUP_TABLE: u8 = 1;
    const LOOKUP_TRIE: u8 = 2;
    const LOOKUP_TABLE_V6: u8 = 3;
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
