//! The line format: comment and `!` split off (`split_rule`), one rule parsed
//! (`parse_rule`: CIDR, address, or range `A-B`, a range becoming its exact minimal
//! prefix set), and the one-pass fast path for the common canonical IPv4 line.
use std::{net::IpAddr, str::FromStr};

use egress_deny_datapath::rules::Action;
use ipnet::IpNet;

use super::Address;

/// A parsed rule line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rule {
    V4(u32, u8),
    V6(u128, u8),
    /// `A-B`, first and last address included, start ≤ end.
    Range4(u32, u32),
    Range6(u128, u128),
}

impl Rule {
    /// Calls `f` with each prefix of the rule: itself, or a range's minimal prefix set.
    pub(crate) fn for_each_prefix(self, mut f: impl FnMut(IpNet)) {
        match self {
            Rule::V4(a, l) => f(a.to_net(l)),
            Rule::V6(a, l) => f(a.to_net(l)),
            Rule::Range4(start, end) => {
                range_prefixes(start.into(), end.into(), 32, |a, l| f((a as u32).to_net(l)))
            }
            Rule::Range6(start, end) => range_prefixes(start, end, 128, |a, l| f(a.to_net(l))),
        }
    }

    /// Whether `prefix` is one of the rule's prefixes.
    pub(super) fn covers_exactly(self, prefix: IpNet) -> bool {
        let mut found = false;
        self.for_each_prefix(|n| found |= n == prefix);
        found
    }
}

/// The fewest aligned prefixes that cover exactly `start..=end` of a `bits`-bit address
/// space (at most 2 × `bits`), in address order: at each step the largest block that
/// starts at `start` (its alignment) and does not run past `end`.
pub(crate) fn range_prefixes(mut start: u128, end: u128, bits: u32, mut f: impl FnMut(u128, u8)) {
    debug_assert!(start <= end && (bits == 128 || end >> bits == 0));
    loop {
        let align = if start == 0 {
            bits
        } else {
            start.trailing_zeros().min(bits)
        };
        // floor(log2(end - start + 1)), without overflowing on the whole IPv6 space.
        let fit = match (end - start).checked_add(1) {
            Some(count) => 127 - count.leading_zeros(),
            None => 128,
        };
        let k = align.min(fit);
        f(start, (bits - k) as u8);
        let last = if k == 128 {
            u128::MAX
        } else {
            start + ((1u128 << k) - 1)
        };
        if last >= end {
            return;
        }
        start = last + 1;
    }
}

/// The rule part of a line: comment (`#`, or `;` as in Spamhaus DROP) and surrounding
/// whitespace removed, `!` split off.
/// `None` for blank and comment-only lines.
pub(crate) fn split_rule(line: &[u8]) -> Option<(Action, &[u8])> {
    let line = match memchr::memchr2(b'#', b';', line) {
        Some(i) => &line[..i],
        None => line,
    };
    let line = line.trim_ascii();
    match line.split_first()? {
        (b'!', rest) => Some((Action::Allow, rest.trim_ascii())),
        _ => Some((Action::Deny, line)),
    }
}

/// Parses one rule: a fast path for canonical IPv4 (the bulk of every list), the
/// standard parsers for everything else (and for every error message).
pub(crate) fn parse_rule(text: &[u8]) -> Result<Rule, String> {
    if let Some((addr, len)) = fast_v4(text)
        && addr.mask(len) == addr
    {
        return Ok(Rule::V4(addr, len));
    }
    let text = std::str::from_utf8(text)
        .map_err(|_| "not valid UTF-8".to_owned())?
        .trim();
    // No address or CIDR contains a `-`.
    if let Some((first, last)) = text.split_once('-') {
        return parse_range(text, first.trim(), last.trim());
    }
    let net = if text.contains('/') {
        let net =
            IpNet::from_str(text).map_err(|_| format!("{text:?} is not a CIDR or address"))?;
        if net.trunc() != net {
            return Err(format!(
                "{text} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        net
    } else {
        let addr =
            IpAddr::from_str(text).map_err(|_| format!("{text:?} is not a CIDR or address"))?;
        IpNet::from(addr)
    };
    Ok(match net {
        IpNet::V4(n) => Rule::V4(u32::from(n.network()), n.prefix_len()),
        IpNet::V6(n) => Rule::V6(u128::from(n.network()), n.prefix_len()),
    })
}

/// `A-B`: two addresses of one family, A ≤ B (a reversed range is a typo, not an empty
/// set: an error rather than silently denying nothing).
fn parse_range(text: &str, first: &str, last: &str) -> Result<Rule, String> {
    let addr = |s: &str| {
        IpAddr::from_str(s).map_err(|_| {
            format!("{text:?} is not a range (A-B, two addresses): {s:?} is not an address")
        })
    };
    match (addr(first)?, addr(last)?) {
        (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => Ok(Rule::Range4(a.into(), b.into())),
        (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => Ok(Rule::Range6(a.into(), b.into())),
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => Err(format!(
            "range {first}-{last} runs backwards: its start is above its end"
        )),
        _ => Err(format!(
            "range {first}-{last} mixes IPv4 and IPv6 addresses"
        )),
    }
}

/// The common line in one pass: optional whitespace, optional `!`, canonical IPv4
/// (see `fast_v4`) with host bits clear, then only whitespace or a comment. `None`
/// means "not that simple": the caller takes the general path (`split_rule` +
/// `parse_rule`), which decides everything this does not, errors included.
pub(crate) fn fast_line(line: &[u8]) -> Option<(Action, u32, u8)> {
    let mut i = 0;
    while i < line.len() && (line[i] == b' ' || line[i] == b'\t') {
        i += 1;
    }
    let action = if line.get(i) == Some(&b'!') {
        i += 1;
        while i < line.len() && (line[i] == b' ' || line[i] == b'\t') {
            i += 1;
        }
        Action::Allow
    } else {
        Action::Deny
    };
    let start = i;
    while i < line.len() && (line[i].is_ascii_digit() || line[i] == b'.' || line[i] == b'/') {
        i += 1;
    }
    let (addr, len) = fast_v4(&line[start..i])?;
    if addr.mask(len) != addr {
        return None;
    }
    match line[i..].iter().find(|b| !b.is_ascii_whitespace()) {
        None | Some(b'#' | b';') => Some((action, addr, len)),
        Some(_) => None,
    }
}

/// `a.b.c.d` or `a.b.c.d/len` in canonical form (no leading zeros, octets ≤ 255,
/// length ≤ 32). Anything else — valid or not — returns `None` and goes to the
/// standard parser, so this never accepts what the standard parser would reject.
fn fast_v4(text: &[u8]) -> Option<(u32, u8)> {
    fn number(text: &[u8], i: &mut usize, max: u32) -> Option<u32> {
        let start = *i;
        let mut value = 0u32;
        while *i < text.len() && text[*i].is_ascii_digit() && *i - start < 3 {
            value = value * 10 + u32::from(text[*i] - b'0');
            *i += 1;
        }
        let digits = *i - start;
        let leading_zero = digits > 1 && text[start] == b'0';
        (digits > 0 && !leading_zero && value <= max).then_some(value)
    }
    let mut i = 0;
    let mut addr = 0u32;
    for octet in 0..4 {
        if octet > 0 {
            if text.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        addr = (addr << 8) | number(text, &mut i, 255)?;
    }
    let len = match text.get(i) {
        None => return Some((addr, 32)),
        Some(b'/') => {
            i += 1;
            number(text, &mut i, 32)? as u8
        }
        Some(_) => return None,
    };
    (i == text.len()).then_some((addr, len))
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        path::{Path, PathBuf},
        sync::atomic::AtomicBool,
    };

    use super::*;
    use crate::rules::{
        Entry, Limits, parse_dir, parse_files, rule_files,
        tests::{dir_with, gz},
    };

    #[test]
    fn every_format_feature() {
        let dir = dir_with(&[
            ("a", b"# comment\n\n  203.0.113.0/24  # trailing\n198.51.100.7\n!203.0.113.128/25\n2001:db8::/32\n! 2001:db8:1::/48\n203.0.113.0/24\r\n\t0.0.0.0/0 # everything \xe2\x80\x94 em dash in a comment\n"),
            ("b.gz", &gz("10.0.0.0/8\n!10.1.2.0/24\n2001:DB8:2::1")),
            (".hidden", b"not a rule"),
        ]);
        let parsed = parse_dir(dir.path()).unwrap();
        let c = parsed.rules.counts();
        assert_eq!((c.v4_deny, c.v4_allow, c.v6_deny, c.v6_allow), (4, 2, 2, 1));
        assert_eq!(parsed.files, 2);
        assert_eq!(parsed.lines, 12);
        assert!(parsed.rules.v4.contains(&Entry {
            addr: u32::from(Ipv4Addr::new(198, 51, 100, 7)),
            len: 32,
            action: Action::Deny
        }));
        assert!(parsed.rules.v4.contains(&Entry {
            addr: 0,
            len: 0,
            action: Action::Deny
        }));
        assert!(parsed.rules.v6.contains(&Entry {
            addr: u128::from("2001:db8:2::1".parse::<Ipv6Addr>().unwrap()),
            len: 128,
            action: Action::Deny
        }));
    }

    #[test]
    fn fast_path_agrees_with_the_standard_parsers() {
        for text in [
            "1.2.3.4",
            "1.2.3.4/32",
            "0.0.0.0/0",
            "255.255.255.255",
            "10.0.0.0/8",
            "01.2.3.4",
            "1.2.3.04/32",
            "256.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.4/33",
            "1.2.3.4/",
            "1.2.3.4/08",
            "1.2.3.4 /8",
            "1.2.3.4/8x",
            "1..2.3",
            "1.2.3.4/32/1",
            "1234.1.1.1",
            "::1",
            "",
        ] {
            let fast = fast_v4(text.as_bytes());
            let std = if text.contains('/') {
                text.parse::<ipnet::Ipv4Net>()
                    .ok()
                    .map(|n| (u32::from(n.addr()), n.prefix_len()))
            } else {
                text.parse::<Ipv4Addr>().ok().map(|a| (u32::from(a), 32))
            };
            if let Some(f) = fast {
                assert_eq!(Some(f), std, "{text:?}");
            }
        }
    }

    #[test]
    fn fast_line_agrees_with_the_general_path() {
        let lines: [&[u8]; 18] = [
            b"1.10.16.0/20 ; SBL256894\n",
            b"1.10.16.0/20;SBL256894",
            b"1.2.3.4-1.2.3.5",
            b"; 1.2.3.4",
            b"1.2.3.4\n",
            b"  !  10.0.0.0/8  # x\r\n",
            b"\t1.2.3.0/24#c",
            b"1.2.3.4/8\n",
            b"1.2.3.4 5.6.7.8",
            b"!!1.2.3.4",
            b"1.2.3.4/\n",
            b"# 1.2.3.4",
            b"",
            b"   \n",
            b"1.2.3.4x",
            b"1.2.3.4\x0b",
            b"::1",
            b"1.2.3.4/32 # \xff",
        ];
        for line in lines {
            let general = split_rule(line).map(|(a, t)| (a, parse_rule(t)));
            match fast_line(line) {
                Some((action, addr, len)) => {
                    assert_eq!(general, Some((action, Ok(Rule::V4(addr, len)))), "{line:?}")
                }
                // Only vertical tab (whitespace to `str::trim`, not to the byte trim)
                // is simple yet left to the general path.
                None => assert!(
                    !matches!(general, Some((_, Ok(Rule::V4(..))))) || line.contains(&0x0b),
                    "{line:?}: fast path missed a simple line"
                ),
            }
        }
    }

    /// Brute force on random ranges: the prefixes are aligned, contiguous and exactly
    /// cover the range, and minimal (no two neighbours merge into one aligned prefix).
    #[test]
    fn ranges_become_the_exact_minimal_prefix_set() {
        fn check(start: u128, end: u128, bits: u32) -> Vec<(u128, u8)> {
            let mut out = Vec::new();
            range_prefixes(start, end, bits, |a, l| out.push((a, l)));
            let size = |l: u8| -> u128 {
                let k = bits - u32::from(l);
                if k == 128 {
                    u128::MAX
                } else {
                    (1u128 << k) - 1
                }
            };
            let mut next = start;
            for &(a, l) in &out {
                assert_eq!(a, next, "{start}-{end}: {out:?}");
                assert_eq!(a & size(l), 0, "unaligned {a}/{l}");
                next = a.wrapping_add(size(l)).wrapping_add(1);
            }
            assert_eq!(next.wrapping_sub(1), end, "{start}-{end}: {out:?}");
            for w in out.windows(2) {
                let ((a, l), (_, m)) = (w[0], w[1]);
                let mergeable = l == m && l > 0 && a & (size(l - 1)) == 0;
                assert!(!mergeable, "{start}-{end}: {out:?} not minimal");
            }
            assert!(out.len() <= 2 * bits as usize);
            out
        }
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20_000 {
            let (a, b) = (rnd() as u32 >> (rnd() % 32), rnd() as u32 >> (rnd() % 32));
            check(a.min(b).into(), a.max(b).into(), 32);
            let (a, b) = (
                u128::from(rnd()) << 64 | u128::from(rnd()),
                u128::from(rnd()) << 64 | u128::from(rnd()),
            );
            check(a.min(b), a.max(b), 128);
        }
        assert_eq!(check(0, u32::MAX.into(), 32), [(0, 0)]);
        assert_eq!(check(0, u128::MAX, 128), [(0, 0)]);
        assert_eq!(check(7, 7, 32), [(7, 32)]);
        assert_eq!(check(1, u128::MAX, 128).len(), 128);
        assert_eq!(check(1, u32::MAX as u128 - 1, 32).len(), 62);
    }

    #[test]
    fn feed_formats_spamhaus_firehol_and_ranges() {
        let spamhaus = b"; Spamhaus DROP List 2026/11/22 - (c) 2026 The Spamhaus Project SLR\n; Last-Modified: Sun, 22 Nov 2026 10:00:00 GMT\n1.10.16.0/20 ; SBL256894\n2.56.192.0/22;SBL459831\n2001:db8:4000::/36 ; SBL123\n";
        let firehol = b"#\n# firehol_level1\n#\n0.0.0.0/8\n1.19.0.0/16\n5.134.128.1\n";
        let ranges = b"10.0.0.1-10.0.0.6\n 192.0.2.0 - 192.0.2.255 # spaces are fine\n!10.0.0.4-10.0.0.4 ; an exception\n2001:db8::-2001:db8::ff\n";
        let dir = dir_with(&[
            ("drop.txt", spamhaus),
            ("level1.netset", firehol),
            ("r", ranges),
        ]);
        let parsed = parse_dir(dir.path()).unwrap();
        fn with<A: Address>(entries: &[Entry<A>], action: Action) -> impl Iterator<Item = IpNet> {
            entries
                .iter()
                .filter(move |e| e.action == action)
                .map(|e| e.addr.to_net(e.len))
        }
        let nets = |action| -> Vec<String> {
            with(&parsed.rules.v4, action)
                .chain(with(&parsed.rules.v6, action))
                .map(|n| n.to_string())
                .collect()
        };
        assert_eq!(
            nets(Action::Deny),
            [
                "0.0.0.0/8",
                "1.10.16.0/20",
                "1.19.0.0/16",
                "2.56.192.0/22",
                "5.134.128.1/32",
                "10.0.0.1/32",
                "10.0.0.2/31",
                "10.0.0.4/31",
                "10.0.0.6/32",
                "192.0.2.0/24",
                "2001:db8::/120",
                "2001:db8:4000::/36",
            ]
        );
        assert_eq!(nets(Action::Allow), ["10.0.0.4/32"]);

        // Errors name file and line; a reversed range is not an empty one.
        for (text, wanted) in [
            (
                &b"1.1.1.1\n10.0.0.9-10.0.0.1\n"[..],
                "r:2: range 10.0.0.9-10.0.0.1 runs backwards",
            ),
            (
                b"2001:db8::ff-2001:db8::1\n",
                "r:1: range 2001:db8::ff-2001:db8::1 runs backwards",
            ),
            (
                b"# x\n\n10.0.0.1-2001:db8::1\n",
                "r:3: range 10.0.0.1-2001:db8::1 mixes IPv4 and IPv6",
            ),
            (
                b"10.0.0.0/8-10.1.0.0\n",
                "r:1: \"10.0.0.0/8-10.1.0.0\" is not a range",
            ),
            (b"10.0.0.1-\n", "r:1: \"10.0.0.1-\" is not a range"),
        ] {
            let dir = dir_with(&[("r", text)]);
            let err = parse_dir(dir.path()).unwrap_err().to_string();
            assert!(err.contains(wanted), "{err}");
        }
        // A range's prefix both denied and allowed elsewhere is located on its line.
        let dir = dir_with(&[("a", b"10.0.0.2/31\n"), ("b", b"!10.0.0.0-10.0.0.3\n")]);
        assert!(
            parse_dir(dir.path()).is_ok(),
            "10.0.0.0/30 is not 10.0.0.2/31"
        );
        let dir = dir_with(&[("a", b"10.0.0.2/31\n"), ("b", b"# x\n!10.0.0.1-10.0.0.3\n")]);
        let err = parse_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a:1") && err.contains("b:2"), "{err}");
    }

    /// The samples under conf/examples/feeds/ parse (conf/README.md shows `rules check` on them).
    #[test]
    fn the_feed_samples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/examples/feeds");
        let files: Vec<PathBuf> = rule_files(&dir)
            .unwrap()
            .into_iter()
            .filter(|f| f.extension().is_none_or(|e| e != "md"))
            .collect();
        assert_eq!(files.len(), 3, "{files:?}");
        let parsed = parse_files(&files, &Limits::default(), &AtomicBool::new(false)).unwrap();
        let c = parsed.rules.counts();
        assert_eq!(
            (c.v4_deny, c.v4_allow, c.v6_deny, c.v6_allow),
            (12, 1, 2, 0)
        );
    }

    #[test]
    fn a_byte_order_mark_crlf_and_tabs_are_accepted() {
        let text = "\u{feff}198.51.100.0/24\r\n\t2001:db8::/32\t# tab-separated comment\r\n!198.51.100.128/25\r\n";
        let dir = dir_with(&[("feed", text.as_bytes()), ("feed2.gz", &gz(text))]);
        let parsed = parse_dir(dir.path()).unwrap();
        let c = parsed.rules.counts();
        assert_eq!((c.v4_deny, c.v4_allow, c.v6_deny), (1, 1, 1));
        // Only at the start of a file: a mark inside is an error naming the line.
        let dir = dir_with(&[("feed", "10.0.0.0/8\n\u{feff}192.0.2.0/24\n".as_bytes())]);
        assert!(
            parse_dir(dir.path())
                .unwrap_err()
                .to_string()
                .contains(":2:")
        );
    }
}
