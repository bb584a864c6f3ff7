//! The rule sets measured (the published benchmark's IPv4 mix, an IPv6 mix of the same
//! shape, each holding the hit destination) and, computed from the rules themselves, the
//! share of destinations they deny: what every lookup's verdicts are checked against.
use std::net::{Ipv4Addr, Ipv6Addr};

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::bench::rule_mix;

/// Global unicast, covered by a deliberately inserted /32 deny rule.
pub const HIT_V4: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
/// TEST-NET-1: `rule_mix` never generates anything inside 192.0.0.0/16.
pub const MISS_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Global unicast, covered by a deliberately inserted /128 deny rule.
pub const HIT_V6: Ipv6Addr = Ipv6Addr::new(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1111);
/// Documentation prefix: `rule_mix_v6` never generates anything inside 2001:db8::/32.
pub const MISS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const SEED_V4: u64 = 42;
pub const SEED_V6: u64 = 43;
/// `bench_random`'s spreading multiplier: working-set slot s is destination s × this.
pub const SPREAD: u32 = 0x9E37_79B1;

/// Random global-unicast IPv6 prefixes (2000::/3), ≈89% /128, 10% /64, 1% /48 — the
/// IPv4 mix's host/subnet/block shape — deduplicated, fixed seed, never inside
/// 2001:db8::/32 (the miss destination) and never the hit address.
fn rule_mix_v6(count: usize, seed: u64) -> Vec<(u128, u8)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let doc = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)) >> 96;
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let addr = (rng.random::<u128>() >> 3) | (1u128 << 125); // 001… = 2000::/3
        if addr >> 96 == doc || addr == u128::from(HIT_V6) {
            continue;
        }
        let len: u8 = match rng.random_range(0..100) {
            0 => 48,
            1..=10 => 64,
            _ => 128,
        };
        out.push((addr & (u128::MAX << (128 - u32::from(len))), len));
        if out.len() == count {
            out.sort_unstable();
            out.dedup();
        }
    }
    out
}

/// Exactly `n` IPv4 rules of the mix, one of them the /32 for the hit destination
/// (replacing a random /32 when the mix does not already hold it).
pub fn v4_rules(n: usize) -> Vec<(u32, u8)> {
    let mut rules = rule_mix(n, SEED_V4);
    let hit = (u32::from(HIT_V4), 32u8);
    if n > 0 && rules.binary_search(&hit).is_err() {
        let i = rules.iter().position(|r| r.1 == 32).unwrap_or(0);
        rules[i] = hit;
        rules.sort_unstable();
    }
    rules
}

pub fn v6_rules(n: usize) -> Vec<(u128, u8)> {
    if n == 0 {
        return Vec::new();
    }
    let mut rules = rule_mix_v6(n - 1, SEED_V6);
    rules.push((u128::from(HIT_V6), 128));
    rules.sort_unstable();
    rules
}

/// Share of the IPv4 space the (sorted, deduplicated) prefixes cover. In (addr, len)
/// order a prefix comes before every prefix nested in it.
pub fn covered_share_v4(rules: &[(u32, u8)]) -> f64 {
    let (mut covered, mut end) = (0u64, 0u64);
    for &(addr, len) in rules {
        let addr = u64::from(addr);
        if addr < end {
            continue;
        }
        let size = 1u64 << (32 - u32::from(len));
        covered += size;
        end = addr + size;
    }
    covered as f64 / (1u64 << 32) as f64
}

/// Share of 2000::/3 (where `bench_random` draws IPv6 destinations and every rule of
/// the mix lies) the prefixes cover.
pub fn covered_share_v6(rules: &[(u128, u8)]) -> f64 {
    let (mut covered, mut end) = (0f64, 0u128);
    for &(addr, len) in rules {
        if addr < end {
            continue;
        }
        let size = 1u128 << (128 - u32::from(len));
        covered += size as f64;
        end = addr.saturating_add(size);
    }
    covered / 2f64.powi(125)
}

fn denied_v4(rules: &[(u32, u8)], addr: u32) -> bool {
    (0..=32u8).any(|len| {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        rules.binary_search(&(addr & mask, len)).is_ok()
    })
}

/// Share of `bench_random`'s IPv4 working-set destinations the rules deny.
pub fn working_set_share_v4(rules: &[(u32, u8)], working_set: u32) -> f64 {
    let denied = (0..working_set)
        .filter(|s| denied_v4(rules, s.wrapping_mul(SPREAD)))
        .count();
    denied as f64 / f64::from(working_set)
}

/// The same for IPv6: `bench_random` puts the folded draw into the high 64 bits (under
/// 2000::/3) and a fresh random low half; only rules of /64 or shorter can then match
/// (a /128 with probability 2^-64).
pub fn working_set_share_v6(rules: &[(u128, u8)], working_set: u32) -> f64 {
    let denied = (0..working_set)
        .filter(|s| {
            let draw = u64::from(s.wrapping_mul(SPREAD));
            let hi = (1u64 << 61) | ((draw << 29) & ((1u64 << 61) - 1));
            let addr = u128::from(hi) << 64;
            (0..=64u8).any(|len| {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                rules.binary_search(&(addr & mask, len)).is_ok()
            })
        })
        .count();
    denied as f64 / f64::from(working_set)
}

pub fn mix<T>(rules: &[(T, u8)], lens: [u8; 3]) -> String {
    let count = |l| rules.iter().filter(|r| r.1 == l).count();
    let pct = |c: usize| 100.0 * c as f64 / rules.len().max(1) as f64;
    lens.iter()
        .map(|&l| format!("/{l} {} ({:.2}%)", count(l), pct(count(l))))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_share_counts_nested_prefixes_once() {
        // 10.0.0.0/8 holds 10.1.0.0/16 and 10.1.2.3/32; 11.0.0.0/8 beside it.
        let rules = vec![
            (0x0a00_0000, 8),
            (0x0a01_0000, 16),
            (0x0a01_0203, 32),
            (0x0b00_0000, 8),
        ];
        assert_eq!(covered_share_v4(&rules), 2.0 / 256.0);
        assert!(denied_v4(&rules, 0x0a63_0000));
        assert!(!denied_v4(&rules, 0x0c00_0000));
        assert_eq!(covered_share_v4(&[(0, 0)]), 1.0);
        let v6 = vec![(1u128 << 125, 3)];
        assert_eq!(covered_share_v6(&v6), 1.0);
        assert_eq!(working_set_share_v6(&v6, 64), 1.0);
    }
}
