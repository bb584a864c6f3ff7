//! Benchmark anchor, not shipped: the tc-eBPF filter design of the published egress
//! filtering benchmark — Ethernet + IPv4 only, one LPM lookup on the destination, drop
//! on a hit. Kept fixed so datapath changes can be compared against the same baseline.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT},
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

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
