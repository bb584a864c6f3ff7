//! Unit tests of the table compiler and reader: a reference longest-prefix match on
//! random rule sets, layouts, limits and malformed images.
use std::{collections::HashMap, time::Instant};

use egress_deny_common::TABLE_MAGIC;

use super::*;

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn u128(&mut self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }
}

/// Addresses the tests can make at random.
trait TestKey: TableKey {
    /// What [`random_rules`] makes.
    const SHAPE: Shape;
    fn random(rng: &mut Rng) -> Self;
    fn flip_last_bit(self) -> Self;
}

impl TestKey for u32 {
    const SHAPE: Shape = Shape {
        hot_len: 8,
        bulk: [(32, 89), (24, 99), (16, 100)],
        chain: [
            (false, 16, Action::Allow),
            (false, 24, Action::Deny),
            (false, 32, Action::Allow),
            (true, 32, Action::Deny),
            (false, 28, Action::Allow),
        ],
    };
    fn random(rng: &mut Rng) -> Self {
        rng.next() as u32
    }
    fn flip_last_bit(self) -> Self {
        self ^ 1
    }
}

impl TestKey for u128 {
    const SHAPE: Shape = Shape {
        hot_len: 32,
        bulk: [(128, 80), (64, 95), (48, 100)],
        chain: [
            (false, 48, Action::Allow),
            (false, 64, Action::Deny),
            (false, 96, Action::Allow),
            (false, 128, Action::Deny),
            (true, 128, Action::Allow),
        ],
    };
    fn random(rng: &mut Rng) -> Self {
        rng.u128()
    }
    fn flip_last_bit(self) -> Self {
        self ^ 1
    }
}

fn entry<K: TableKey>(addr: K, len: u8, action: Action) -> Entry<K> {
    Entry {
        addr: addr & !K::host_mask(len),
        len,
        action,
    }
}

fn normalize<K: TableKey>(mut rules: Vec<Entry<K>>) -> Vec<Entry<K>> {
    rules.sort_unstable();
    rules.dedup_by_key(|e| e.key());
    rules
}

/// The straightforward LPM: per length, a hash map of prefixes.
struct Reference<K> {
    by_len: Vec<(u8, HashMap<K, Action>)>,
}

impl<K: TableKey> Reference<K> {
    fn new(rules: &[Entry<K>]) -> Self {
        let mut by_len: Vec<(u8, HashMap<K, Action>)> = Vec::new();
        for r in rules {
            match by_len.iter_mut().find(|(l, _)| *l == r.len) {
                Some((_, m)) => {
                    m.insert(r.addr, r.action);
                }
                None => by_len.push((r.len, HashMap::from([(r.addr, r.action)]))),
            }
        }
        by_len.sort_by_key(|b| std::cmp::Reverse(b.0));
        Self { by_len }
    }

    fn decide(&self, x: K) -> Option<(Action, u8)> {
        self.by_len.iter().find_map(|(len, m)| {
            m.get(&(x & !K::host_mask(*len)))
                .map(|&action| (action, *len))
        })
    }
}

/// Rule-boundary addresses: first, last, first - 1 and last + 1 of every rule.
fn boundaries<K: TableKey>(rules: &[Entry<K>]) -> Vec<K> {
    let mut out = Vec::with_capacity(rules.len() * 4);
    for r in rules {
        let last = r.addr | K::host_mask(r.len);
        out.extend(
            [Some(r.addr), Some(last), r.addr.pred(), last.succ()]
                .into_iter()
                .flatten(),
        );
    }
    out
}

/// Compiles with each layout and checks every view against the reference on the
/// rule boundaries plus `random` addresses (half near a rule, half anywhere); then
/// checks that the reconstructed rules compile to the same ranges.
fn differential<K: TestKey>(rng: &mut Rng, rules: &[Entry<K>], layouts: &[Layout], random: usize) {
    let reference = Reference::new(rules);
    let images: Vec<Vec<u8>> = layouts
        .iter()
        .map(|&l| compile_to_vec(rules, l).unwrap())
        .collect();
    let views: Vec<TableView<K>> = images
        .iter()
        .map(|i| TableView::parse(i).unwrap())
        .collect();
    for (view, layout) in views.iter().zip(layouts) {
        if let Some(bits) = layout.direct_bits {
            assert_eq!(view.header().direct_bits, bits);
        }
    }
    let check = |x: K| {
        let want = reference.decide(x);
        for v in &views {
            assert_eq!(
                v.search(x).decision(),
                want,
                "address {x:#x?}, direct_bits {}",
                v.header().direct_bits
            );
        }
    };
    for x in boundaries(rules) {
        check(x);
    }
    for i in 0..random {
        let x = if i % 2 == 0 && !rules.is_empty() {
            let r = rules[rng.below(rules.len() as u64) as usize];
            r.addr | (K::random(rng) & K::host_mask(r.len))
        } else {
            K::random(rng)
        };
        check(x);
    }
    // Reconstruction: same ranges, hence the same image past the header block.
    let rebuilt = views[0].rules().unwrap();
    let again = compile_to_vec(&rebuilt, layouts[0]).unwrap();
    let view = TableView::<K>::parse(&again).unwrap();
    let (a, b) = (views[0].header(), view.header());
    assert_eq!(
        (a.ranges, a.direct_bits, a.blocks),
        (b.ranges, b.direct_bits, b.blocks)
    );
    assert_eq!(images[0][TABLE_BLOCK_BYTES..], again[TABLE_BLOCK_BYTES..]);
    assert!(rebuilt.len() <= rules.len());
    for x in boundaries(&rebuilt) {
        assert_eq!(view.search(x).decision(), reference.decide(x));
    }
}

/// How a family's random rule sets look: a few hot prefixes of `hot_len`, so that
/// random rules nest and neighbour each other; the bulk at three lengths (picked while
/// a percentile is below each bound); under each hot prefix, chains of exceptions.
struct Shape {
    hot_len: u8,
    bulk: [(u8, u64); 3],
    /// (the address with its last bit flipped, length, action).
    chain: [(bool, u8, Action); 5],
}

fn random_rules<K: TestKey>(rng: &mut Rng, n: usize) -> Vec<Entry<K>> {
    let shape = &K::SHAPE;
    let hot: Vec<K> = (0..4)
        .map(|_| K::random(rng) & !K::host_mask(shape.hot_len))
        .collect();
    let mut rules = Vec::with_capacity(n + n / 50);
    let pick = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            hot[rng.below(4) as usize] | (K::random(rng) & K::host_mask(shape.hot_len))
        } else {
            K::random(rng)
        }
    };
    for _ in 0..n {
        let r = rng.below(100);
        let (len, _) = *shape
            .bulk
            .iter()
            .find(|&&(_, below)| r < below)
            .expect("the last bound is 100");
        let action = if rng.below(10) < 8 {
            Action::Deny
        } else {
            Action::Allow
        };
        rules.push(entry(pick(rng), len, action));
    }
    for &top in &hot {
        rules.push(entry(top, shape.hot_len, Action::Deny));
        for _ in 0..n / 400 + 1 {
            let a = top | (K::random(rng) & K::host_mask(shape.hot_len));
            for &(flip, len, action) in &shape.chain {
                rules.push(entry(if flip { a.flip_last_bit() } else { a }, len, action));
            }
        }
    }
    // Any length, a few.
    for _ in 0..n / 200 + 1 {
        let len = rng.below(u64::from(K::BITS) + 1) as u8;
        let action = if rng.below(2) == 0 {
            Action::Deny
        } else {
            Action::Allow
        };
        rules.push(entry(pick(rng), len, action));
    }
    normalize(rules)
}

fn random_v4(rng: &mut Rng, n: usize) -> Vec<Entry<u32>> {
    random_rules(rng, n)
}

fn random_v6(rng: &mut Rng, n: usize) -> Vec<Entry<u128>> {
    random_rules(rng, n)
}

const LAYOUTS: [Layout; 3] = [
    Layout { direct_bits: None },
    Layout {
        direct_bits: Some(8),
    },
    Layout {
        direct_bits: Some(16),
    },
];

#[test]
fn differential_v4() {
    let mut rng = Rng(4);
    for (i, n) in [20_000, 5_000, 300].into_iter().enumerate() {
        let rules = random_v4(&mut rng, n);
        let layouts: &[Layout] = if i == 0 {
            &[
                LAYOUTS[0],
                LAYOUTS[1],
                LAYOUTS[2],
                Layout {
                    direct_bits: Some(24),
                },
            ]
        } else {
            &LAYOUTS
        };
        differential(&mut rng, &rules, layouts, 600_000);
    }
}

#[test]
fn differential_v6() {
    let mut rng = Rng(6);
    for n in [10_000, 2_000, 100] {
        let rules = random_v6(&mut rng, n);
        differential(&mut rng, &rules, &LAYOUTS, 400_000);
    }
}

fn ranges_of<K: TableKey>(image: &[u8]) -> Vec<(K, Option<(Action, u8)>)> {
    let v = TableView::<K>::parse(image).unwrap();
    (0..v.header().ranges)
        .map(|i| {
            let (s, verdict) = v.range(i);
            (s, decode_verdict(verdict))
        })
        .collect()
}

fn decide<K: TableKey>(image: &[u8], x: K) -> Option<(Action, u8)> {
    TableView::<K>::parse(image).unwrap().search(x).decision()
}

use Action::{Allow, Deny};

#[test]
fn empty_set_is_one_range_of_no_rule() {
    let img = compile_to_vec::<u32>(&[], Layout::default()).unwrap();
    assert_eq!(ranges_of::<u32>(&img), vec![(0, None)]);
    assert_eq!(decide(&img, 0u32), None);
    assert_eq!(decide(&img, u32::MAX), None);
    assert!(
        TableView::<u32>::parse(&img)
            .unwrap()
            .rules()
            .unwrap()
            .is_empty()
    );
    let img = compile_to_vec::<u128>(&[], Layout::default()).unwrap();
    assert_eq!(ranges_of::<u128>(&img), vec![(0, None)]);
    let h = *TableView::<u128>::parse(&img).unwrap().header();
    assert_eq!(
        (h.direct_bits, h.direct_block, h.range_block, h.blocks),
        (TABLE_MIN_DIRECT_BITS, 1, 2, 3)
    );
}

#[test]
fn slash_zero_rules() {
    let deny_all = [entry(0u32, 0, Deny)];
    let img = compile_to_vec(&deny_all, Layout::default()).unwrap();
    assert_eq!(ranges_of::<u32>(&img), vec![(0, Some((Deny, 0)))]);
    assert_eq!(decide(&img, u32::MAX), Some((Deny, 0)));
    let rules = TableView::<u32>::parse(&img).unwrap().rules().unwrap();
    assert_eq!(rules, deny_all);

    let deny_all6 = [entry(0u128, 0, Deny)];
    let img = compile_to_vec(&deny_all6, Layout::default()).unwrap();
    assert_eq!(ranges_of::<u128>(&img), vec![(0, Some((Deny, 0)))]);
    assert_eq!(decide(&img, u128::MAX), Some((Deny, 0)));

    let allow_all = [entry(0u32, 0, Allow), entry(0x0a00_0000, 8, Deny)];
    let img = compile_to_vec(&allow_all, Layout::default()).unwrap();
    assert_eq!(
        ranges_of::<u32>(&img),
        vec![
            (0, Some((Allow, 0))),
            (0x0a00_0000, Some((Deny, 8))),
            (0x0b00_0000, Some((Allow, 0)))
        ]
    );
    assert_eq!(decide(&img, 0x09ff_ffffu32), Some((Allow, 0)));
    assert_eq!(decide(&img, 0x0a12_3456u32), Some((Deny, 8)));
    assert_eq!(decide(&img, u32::MAX), Some((Allow, 0)));
    let rules = TableView::<u32>::parse(&img).unwrap().rules().unwrap();
    assert_eq!(rules, allow_all);
}

#[test]
fn rules_at_both_ends_of_the_address_space() {
    let rules = [entry(0u32, 32, Deny), entry(u32::MAX, 32, Deny)];
    let img = compile_to_vec(&rules, Layout::default()).unwrap();
    assert_eq!(
        ranges_of::<u32>(&img),
        vec![
            (0, Some((Deny, 32))),
            (1, None),
            (u32::MAX, Some((Deny, 32)))
        ]
    );
    for (x, want) in [
        (0, Some((Deny, 32))),
        (1, None),
        (u32::MAX - 1, None),
        (u32::MAX, Some((Deny, 32))),
    ] {
        assert_eq!(decide(&img, x), want);
    }

    // Several rules ending at the last address, the innermost an exception.
    let rules6 = [
        entry(0u128, 128, Allow),
        entry(u128::MAX, 1, Deny),
        entry(u128::MAX, 16, Allow),
        entry(u128::MAX, 128, Deny),
    ];
    let img = compile_to_vec(&rules6, Layout::default()).unwrap();
    let top16 = !u128::host_mask(16);
    assert_eq!(
        ranges_of::<u128>(&img),
        vec![
            (0, Some((Allow, 128))),
            (1, None),
            (1 << 127, Some((Deny, 1))),
            (top16, Some((Allow, 16))),
            (u128::MAX, Some((Deny, 128)))
        ]
    );
    assert_eq!(decide(&img, u128::MAX - 1), Some((Allow, 16)));
    assert_eq!(decide(&img, u128::MAX), Some((Deny, 128)));
    let mut rng = Rng(1);
    differential(&mut rng, &rules6, &LAYOUTS, 1000);
    differential(&mut rng, &rules, &LAYOUTS, 1000);
}

#[test]
fn direct_bits_overrides_and_limits() {
    let mut rng = Rng(8);
    let rules = random_v4(&mut rng, 2000);
    for bits in [8, 16, 24] {
        let layout = Layout {
            direct_bits: Some(bits),
        };
        let plan = Plan::new(&rules, layout).unwrap();
        assert_eq!(plan.summary().direct_bits, bits);
        assert_eq!(plan.header().range_block, 1 + direct_blocks(bits));
    }
    for bits in [0, 7, 25, 32] {
        let layout = Layout {
            direct_bits: Some(bits),
        };
        assert_eq!(
            Plan::new(&rules, layout).unwrap_err(),
            TableError::DirectBits(bits)
        );
    }
    // Adaptive: about RANGES_PER_BUCKET ranges per bucket, within the limits.
    let s = Plan::new(&rules, Layout::default()).unwrap().summary();
    assert_eq!(
        1u64 << s.direct_bits,
        u64::from(s.ranges).div_ceil(4).next_power_of_two().max(256)
    );
}

#[test]
fn dense_bucket() {
    // Every address of 10.1.0.0/16, alternating in pairs: 32768 ranges in one bucket
    // of an 8-bit direct table.
    let rules: Vec<_> = (0..65536u32)
        .map(|i| entry(0x0a01_0000 | i, 32, if i & 2 == 0 { Deny } else { Allow }))
        .collect();
    for layout in [
        Layout {
            direct_bits: Some(8),
        },
        Layout::default(),
    ] {
        let img = compile_to_vec(&rules, layout).unwrap();
        let view = TableView::<u32>::parse(&img).unwrap();
        assert_eq!(view.header().ranges, 32768 + 2);
        for x in 0x0a00_ffffu32..=0x0a02_0000 {
            let want = if (0x0a01_0000..0x0a02_0000).contains(&x) {
                Some((if x & 2 == 0 { Deny } else { Allow }, 32))
            } else {
                None
            };
            assert_eq!(view.search(x).decision(), want, "{x:#x}");
        }
        assert_eq!(view.rules().unwrap(), rules);
    }
}

#[test]
fn equal_neighbours_merge() {
    let rules = [
        entry(0x0102_0304u32, 32, Deny),
        entry(0x0102_0305, 32, Deny),
    ];
    let img = compile_to_vec(&rules, Layout::default()).unwrap();
    assert_eq!(
        ranges_of::<u32>(&img),
        vec![
            (0, None),
            (0x0102_0304, Some((Deny, 32))),
            (0x0102_0306, None)
        ]
    );
    assert_eq!(
        TableView::<u32>::parse(&img).unwrap().rules().unwrap(),
        rules
    );
    // A rule split by an exception comes back once.
    let rules = [
        entry(0x0a00_0000u32, 8, Deny),
        entry(0x0a01_0000, 16, Allow),
    ];
    let img = compile_to_vec(&rules, Layout::default()).unwrap();
    assert_eq!(ranges_of::<u32>(&img).len(), 5);
    assert_eq!(
        TableView::<u32>::parse(&img).unwrap().rules().unwrap(),
        rules
    );
}

#[test]
fn bad_input_is_rejected() {
    let unsorted = [entry(2u32, 32, Deny), entry(1, 32, Deny)];
    assert_eq!(
        compile_to_vec(&unsorted, Layout::default()),
        Err(TableError::Unsorted { index: 1 })
    );
    let duplicate = [entry(1u32, 32, Deny), entry(1, 32, Allow)];
    assert_eq!(
        compile_to_vec(&duplicate, Layout::default()),
        Err(TableError::Unsorted { index: 1 })
    );
    let host_bits = [Entry {
        addr: 0x0a00_0001u32,
        len: 8,
        action: Deny,
    }];
    assert!(matches!(
        compile_to_vec(&host_bits, Layout::default()),
        Err(TableError::HostBits { index: 0, .. })
    ));
    let too_long = [Entry {
        addr: 1u32,
        len: 33,
        action: Deny,
    }];
    assert!(matches!(
        compile_to_vec(&too_long, Layout::default()),
        Err(TableError::PrefixTooLong { index: 0, .. })
    ));
    // Pass 2 with other rules than pass 1.
    let plan = Plan::new(&[entry(1u32, 32, Deny)], Layout::default()).unwrap();
    let res = plan.write(&[entry(1u32, 32, Deny), entry(3, 32, Deny)], |_, _| {
        Ok::<(), std::io::Error>(())
    });
    assert!(matches!(
        res,
        Err(CompileError::Table(TableError::InputChanged))
    ));
    let res = plan.write(&[entry(1u32, 32, Allow)], |_, _| {
        Ok::<(), std::io::Error>(())
    });
    assert!(matches!(
        res,
        Err(CompileError::Table(TableError::InputChanged))
    ));
}

#[test]
fn streaming_sink_gets_every_block_once() {
    let mut rng = Rng(9);
    for layout in [
        Layout::default(),
        Layout {
            direct_bits: Some(16),
        },
    ] {
        let rules = random_v4(&mut rng, 30_000);
        let plan = Plan::new(&rules, layout).unwrap();
        let mut blocks: Vec<Option<Vec<u8>>> = vec![None; plan.summary().blocks as usize];
        let mut order = Vec::new();
        let summary = plan
            .write(&rules, |i, b| {
                assert_eq!(b.len(), TABLE_BLOCK_BYTES);
                assert!(blocks[i as usize].is_none(), "block {i} twice");
                blocks[i as usize] = Some(b.to_vec());
                order.push(i);
                Ok::<(), std::io::Error>(())
            })
            .unwrap();
        assert_eq!(summary, plan.summary());
        assert!(summary.ranges as u64 > 2 * u64::from(V4_RANGES_PER_BLOCK));
        assert_eq!(order[0], 0);
        let joined: Vec<u8> = blocks
            .into_iter()
            .flat_map(|b| b.expect("every block"))
            .collect();
        assert_eq!(joined, compile_to_vec(&rules, layout).unwrap());
        assert_eq!(summary.bytes, joined.len() as u64);
        let (deny, allow) = rules.iter().fold((0, 0), |(d, a), r| match r.action {
            Deny => (d + 1, a),
            Allow => (d, a + 1),
        });
        assert_eq!((summary.deny_rules, summary.allow_rules), (deny, allow));
    }
    // The sink's error stops the compilation and names the block.
    let rules = random_v6(&mut rng, 10_000);
    let res = compile(&rules, Layout::default(), |i, _| {
        if i == 3 {
            Err(std::io::Error::other("full"))
        } else {
            Ok(())
        }
    });
    assert!(
        matches!(res, Err(CompileError::Sink { block: 3, .. })),
        "{res:?}"
    );
}

fn put(img: &mut [u8], field: usize, v: u32) {
    put_u32(img, field, v);
}

#[test]
fn parse_rejects_corrupt_images() {
    let mut rng = Rng(10);
    let rules = random_v4(&mut rng, 3000);
    let good = compile_to_vec(&rules, Layout::default()).unwrap();
    let h = *TableView::<u32>::parse(&good).unwrap().header();
    let range_at = |i: usize| h.range_block as usize * TABLE_BLOCK_BYTES + i * 8;

    for len in [0, 10, 47, 48, TABLE_BLOCK_BYTES - 1, good.len() - 1] {
        assert!(TableView::<u32>::parse(&good[..len]).is_err(), "{len}");
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; TABLE_BLOCK_BYTES]);
    assert!(matches!(
        TableView::<u32>::parse(&longer),
        Err(TableError::LengthMismatch { .. })
    ));

    let corrupt = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut img = good.clone();
        f(&mut img);
        img
    };
    let bad_magic = corrupt(&|i| put(i, 0, 0x4544_5432));
    assert_eq!(
        TableView::<u32>::parse(&bad_magic).unwrap_err(),
        TableError::BadMagic(0x4544_5432)
    );
    assert!(matches!(
        TableView::<u128>::parse(&good),
        Err(TableError::WrongFamily {
            found: 4,
            expected: 6
        })
    ));
    let bits = corrupt(&|i| put(i, offset_of!(TableHeader, direct_bits), 25));
    assert_eq!(
        TableView::<u32>::parse(&bits).unwrap_err(),
        TableError::DirectBits(25)
    );
    let no_ranges = corrupt(&|i| put(i, offset_of!(TableHeader, ranges), 0));
    assert!(matches!(
        TableView::<u32>::parse(&no_ranges),
        Err(TableError::Geometry(_))
    ));
    let overlap = corrupt(&|i| put(i, offset_of!(TableHeader, range_block), 1));
    assert!(matches!(
        TableView::<u32>::parse(&overlap),
        Err(TableError::Geometry(_))
    ));
    let many = corrupt(&|i| {
        put(
            i,
            offset_of!(TableHeader, ranges),
            h.ranges + V4_RANGES_PER_BLOCK,
        )
    });
    assert!(matches!(
        TableView::<u32>::parse(&many),
        Err(TableError::Geometry(_))
    ));

    // Content errors pass the header-only check.
    let unsorted = corrupt(&|i| put(i, range_at(5), 0xffff_ffff));
    assert!(TableView::<u32>::parse_header(&unsorted).is_ok());
    assert_eq!(
        TableView::<u32>::parse(&unsorted).unwrap_err(),
        TableError::UnsortedRanges { index: 6 }
    );
    let not_zero = corrupt(&|i| put(i, range_at(0), 1));
    assert!(matches!(
        TableView::<u32>::parse(&not_zero),
        Err(TableError::FirstRangeNotZero { start: 1 })
    ));
    let verdict = corrupt(&|i| put(i, range_at(3) + 4, VERDICT_MATCHED | 33));
    assert!(matches!(
        TableView::<u32>::parse(&verdict),
        Err(TableError::BadVerdict { index: 3, .. })
    ));
    let direct = corrupt(&|i| put(i, TABLE_BLOCK_BYTES + 4 * 7, 1_000_000));
    assert!(matches!(
        TableView::<u32>::parse(&direct),
        Err(TableError::BadDirect { bucket: 7, .. })
    ));
    // A header-only view of it still answers in bounds.
    let view = TableView::<u32>::parse_header(&direct).unwrap();
    for _ in 0..1000 {
        view.search(rng.next() as u32);
    }
}

/// Whatever the bytes, parse answers with an error or a view that searches in bounds.
fn survive<K: TestKey>(rng: &mut Rng, bytes: &[u8]) {
    let full = TableView::<K>::parse(bytes);
    if let Ok(view) = TableView::<K>::parse_header(bytes) {
        for _ in 0..64 {
            let l = view.search(K::random(rng));
            assert!(l.range < view.header().ranges);
        }
        if let Ok(view) = full {
            let _ = view.range(view.header().ranges - 1);
        }
    } else {
        assert!(full.is_err());
    }
}

#[test]
fn parse_survives_garbage() {
    let mut rng = Rng(11);
    for _ in 0..2000 {
        let len = match rng.below(3) {
            0 => rng.below(200) as usize,
            1 => TABLE_BLOCK_BYTES * rng.below(4) as usize,
            _ => rng.below(4 * TABLE_BLOCK_BYTES as u64) as usize,
        };
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Often a plausible header, so that the later checks are reached.
        if len >= 48 && rng.below(2) == 0 {
            put(&mut bytes, 0, TABLE_MAGIC);
            put(&mut bytes, 4, if rng.below(2) == 0 { 4 } else { 6 });
            put(&mut bytes, 8, 8 + rng.below(3) as u32);
            put(&mut bytes, 12, rng.below(3) as u32);
            put(&mut bytes, 16, rng.below(4) as u32);
            put(&mut bytes, 20, rng.below(20_000) as u32);
            put(&mut bytes, 24, (len / TABLE_BLOCK_BYTES) as u32);
        }
        survive::<u32>(&mut rng, &bytes);
        survive::<u128>(&mut rng, &bytes);
    }
    // Mutations of real tables.
    let v4 = compile_to_vec(&random_v4(&mut rng, 2000), Layout::default()).unwrap();
    let v6 = compile_to_vec(&random_v6(&mut rng, 2000), Layout::default()).unwrap();
    for _ in 0..300 {
        for good in [&v4, &v6] {
            let mut img = good.clone();
            for _ in 0..1 + rng.below(4) {
                // Mostly the used parts: header, first direct entries, first ranges.
                let block = rng.below(img.len() as u64 / TABLE_BLOCK_BYTES as u64) as usize;
                let at = block * TABLE_BLOCK_BYTES + rng.below(4096) as usize;
                img[at] ^= 1 << rng.below(8);
            }
            survive::<u32>(&mut rng, &img);
            survive::<u128>(&mut rng, &img);
        }
    }
}

fn big_v4(n: usize) -> Vec<Entry<u32>> {
    let mut rng = Rng(12);
    let rules = (0..n)
        .map(|_| {
            let r = rng.below(100);
            let len = if r < 89 {
                32
            } else if r < 99 {
                24
            } else {
                16
            };
            let action = if rng.below(10) < 9 { Deny } else { Allow };
            entry(rng.next() as u32, len, action)
        })
        .collect();
    normalize(rules)
}

/// `cargo test --release -p egress-deny-datapath --lib table::tests::compile_speed -- --ignored --nocapture`
#[test]
#[ignore = "timing; run in release"]
fn compile_speed() {
    for n in [1_000_000, 10_000_000] {
        let rules = big_v4(n);
        for layout in [
            Layout::default(),
            Layout {
                direct_bits: Some(16),
            },
        ] {
            let t = Instant::now();
            let plan = Plan::new(&rules, layout).unwrap();
            let pass1 = t.elapsed();
            let mut sum = 0u64;
            let s = plan
                .write(&rules, |i, b| {
                    sum = sum.wrapping_add(u64::from(i) ^ u64::from(b[b.len() - 1]));
                    Ok::<(), std::io::Error>(())
                })
                .unwrap();
            let total = t.elapsed();
            std::hint::black_box(sum);
            let t = Instant::now();
            let img = compile_to_vec(&rules, layout).unwrap();
            let to_vec = t.elapsed();
            println!(
                "{} rules ({} after dedup), {layout:?}: {} ranges, direct_bits {}, {} MiB; \
                 pass 1 {pass1:?}, both passes {total:?}, compile_to_vec {to_vec:?}",
                n,
                rules.len(),
                s.ranges,
                s.direct_bits,
                img.len() >> 20
            );
        }
    }
}
