//! The rules directory: parsing (streaming, line by line) into compact sorted sets, and
//! planning an update as a diff that never opens a gap (see `Plan`).
//!
//! Format (one entry per line): `CIDR` or a bare address denies, `!CIDR` is an
//! allow-exception, `#` starts a comment, blank lines and surrounding whitespace are
//! ignored. Files whose name ends in `.gz` are gzip-compressed. Hidden entries (`.x`,
//! kubelet's `..data`) are skipped; symlinks (kubelet's ConfigMap layout) are followed.
use std::{
    fmt,
    fs::{self, File},
    io::{self, BufRead, BufReader, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
};

use egress_deny_datapath::rules::Action;
use ipnet::IpNet;

/// One rule: a truncated prefix and its action. `A` is u32 (IPv4) or u128 (IPv6), host
/// order, so that sorting is by address then length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry<A> {
    pub addr: A,
    pub len: u8,
    pub action: Action,
}

impl<A: Copy + Ord> Entry<A> {
    fn key(&self) -> (A, u8) {
        (self.addr, self.len)
    }
}

/// A complete rule set, sorted by (address, length) and free of duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub v4: Vec<Entry<u32>>,
    pub v6: Vec<Entry<u128>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub v4_deny: usize,
    pub v4_allow: usize,
    pub v6_deny: usize,
    pub v6_allow: usize,
}

impl RuleSet {
    pub fn counts(&self) -> Counts {
        let deny4 = self.v4.iter().filter(|e| e.action == Action::Deny).count();
        let deny6 = self.v6.iter().filter(|e| e.action == Action::Deny).count();
        Counts {
            v4_deny: deny4,
            v4_allow: self.v4.len() - deny4,
            v6_deny: deny6,
            v6_allow: self.v6.len() - deny6,
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Adds an allow-exception (replacing a deny of exactly that prefix).
    pub fn allow(&mut self, net: IpNet) {
        match net.trunc() {
            IpNet::V4(n) => upsert(
                &mut self.v4,
                Entry {
                    addr: u32::from(n.network()),
                    len: n.prefix_len(),
                    action: Action::Allow,
                },
            ),
            IpNet::V6(n) => upsert(
                &mut self.v6,
                Entry {
                    addr: u128::from(n.network()),
                    len: n.prefix_len(),
                    action: Action::Allow,
                },
            ),
        }
    }

    /// The deny entries that contain `net` (shortest first).
    pub fn denies_covering(&self, net: IpNet) -> Vec<IpNet> {
        let mut out = Vec::new();
        match net.trunc() {
            IpNet::V4(n) => {
                let addr = u32::from(n.network());
                for len in 0..=n.prefix_len() {
                    let key = (mask4(addr, len), len);
                    if let Ok(i) = self.v4.binary_search_by(|e| e.key().cmp(&key))
                        && self.v4[i].action == Action::Deny
                    {
                        out.push(
                            IpNet::new(IpAddr::V4(Ipv4Addr::from(key.0)), len).expect("valid"),
                        );
                    }
                }
            }
            IpNet::V6(n) => {
                let addr = u128::from(n.network());
                for len in 0..=n.prefix_len() {
                    let key = (mask6(addr, len), len);
                    if let Ok(i) = self.v6.binary_search_by(|e| e.key().cmp(&key))
                        && self.v6[i].action == Action::Deny
                    {
                        out.push(
                            IpNet::new(IpAddr::V6(Ipv6Addr::from(key.0)), len).expect("valid"),
                        );
                    }
                }
            }
        }
        out
    }
}

fn upsert<A: Copy + Ord>(entries: &mut Vec<Entry<A>>, entry: Entry<A>) {
    match entries.binary_search_by(|e| e.key().cmp(&entry.key())) {
        Ok(i) => entries[i] = entry,
        Err(i) => entries.insert(i, entry),
    }
}

pub fn mask4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

pub fn mask6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

/// A rejected update: which file and line, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("{file}:{line}: {message}")]
    Line {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{prefix} is listed both as deny ({deny_at}) and as allow ({allow_at})")]
    Conflict {
        prefix: IpNet,
        deny_at: String,
        allow_at: String,
    },
}

/// What was read: the set, plus whether the directory existed at all.
#[derive(Debug)]
pub struct Parsed {
    pub rules: RuleSet,
    pub files: usize,
    pub dir_missing: bool,
}

/// The rule files of `dir` in name order: hidden entries skipped, symlinks followed,
/// only regular files.
pub fn rule_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

pub fn parse_dir(dir: &Path) -> Result<Parsed, RulesError> {
    let files = match rule_files(dir) {
        Ok(files) => files,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Parsed {
                rules: RuleSet::default(),
                files: 0,
                dir_missing: true,
            });
        }
        Err(e) => {
            return Err(RulesError::File {
                file: dir.display().to_string(),
                message: e.to_string(),
            });
        }
    };
    let mut rules = RuleSet::default();
    for file in &files {
        parse_file(file, &mut |entry, _| match entry {
            Rule::V4(e) => rules.v4.push(e),
            Rule::V6(e) => rules.v6.push(e),
        })?;
    }
    let conflict4 = sort_dedup(&mut rules.v4);
    let conflict6 = sort_dedup(&mut rules.v6);
    let conflict = conflict4
        .map(|(a, l)| IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), l).expect("valid"))
        .or_else(|| {
            conflict6.map(|(a, l)| IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), l).expect("valid"))
        });
    if let Some(prefix) = conflict {
        return Err(locate_conflict(&files, prefix));
    }
    Ok(Parsed {
        rules,
        files: files.len(),
        dir_missing: false,
    })
}

/// Sorts, drops duplicates, and returns a prefix listed with both actions, if any.
fn sort_dedup<A: Copy + Ord>(entries: &mut Vec<Entry<A>>) -> Option<(A, u8)> {
    entries.sort_unstable();
    let conflict = entries
        .windows(2)
        .find(|w| w[0].key() == w[1].key() && w[0].action != w[1].action);
    let conflict = conflict.map(|w| w[0].key());
    entries.dedup();
    conflict
}

/// Only on error: scans again to name where both sides of a conflict are.
fn locate_conflict(files: &[PathBuf], prefix: IpNet) -> RulesError {
    let mut deny_at = String::from("?");
    let mut allow_at = String::from("?");
    for file in files {
        let _ = parse_file(file, &mut |rule, line| {
            let (net, action) = match rule {
                Rule::V4(e) => (
                    IpNet::new(IpAddr::V4(Ipv4Addr::from(e.addr)), e.len),
                    e.action,
                ),
                Rule::V6(e) => (
                    IpNet::new(IpAddr::V6(Ipv6Addr::from(e.addr)), e.len),
                    e.action,
                ),
            };
            if net.ok() == Some(prefix) {
                let at = format!("{}:{line}", file.display());
                match action {
                    Action::Deny => deny_at = at,
                    Action::Allow => allow_at = at,
                }
            }
        });
    }
    RulesError::Conflict {
        prefix,
        deny_at,
        allow_at,
    }
}

enum Rule {
    V4(Entry<u32>),
    V6(Entry<u128>),
}

/// Streams one file, calling `sink` for each rule with its line number.
fn parse_file(path: &Path, sink: &mut dyn FnMut(Rule, usize)) -> Result<(), RulesError> {
    let file_name = path.display().to_string();
    let file_error = |message: String| RulesError::File {
        file: file_name.clone(),
        message,
    };
    let file = File::open(path).map_err(|e| file_error(e.to_string()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let mut buf = Vec::with_capacity(128);
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| file_error(format!("read error: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let line_error = |message: String| RulesError::Line {
            file: file_name.clone(),
            line: line_no,
            message,
        };
        let text = std::str::from_utf8(&buf).map_err(|_| line_error("not valid UTF-8".into()))?;
        let text = text.split('#').next().unwrap_or_default().trim();
        if text.is_empty() {
            continue;
        }
        let (action, cidr) = match text.strip_prefix('!') {
            Some(rest) => (Action::Allow, rest.trim()),
            None => (Action::Deny, text),
        };
        let rule = parse_entry(cidr, action).map_err(line_error)?;
        sink(rule, line_no);
    }
}

fn parse_entry(text: &str, action: Action) -> Result<Rule, String> {
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
        IpNet::V4(n) => Rule::V4(Entry {
            addr: u32::from(n.network()),
            len: n.prefix_len(),
            action,
        }),
        IpNet::V6(n) => Rule::V6(Entry {
            addr: u128::from(n.network()),
            len: n.prefix_len(),
            action,
        }),
    })
}

/// The map operations that turn the enforced set `old` into `new`, in an order that never
/// allows a destination both sets deny:
///
/// 1. upsert every entry whose new action is deny (new denies, allow→deny flips);
/// 2. remove old allow entries that `new` does not have;
/// 3. upsert every entry whose new action is allow (new allows, deny→allow flips);
/// 4. remove old deny entries that `new` does not have.
///
/// Why: take a destination both sets deny and the longest entry matching it in any
/// intermediate state. After step 1 that entry is either a new deny or the old set's own
/// longest match (a deny). During step 2 a surviving longer allow would have to be in
/// `new` (then `new` would allow) or be old-only (then `old` would allow) — neither. In
/// step 3 a new allow can only be longest if `new`'s own longest match is an allow.
/// In step 4 the longest entry is `new`'s longest match (deny) or an old deny.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<A> {
    pub upsert_deny: Vec<Entry<A>>,
    pub remove_allow: Vec<Entry<A>>,
    pub upsert_allow: Vec<Entry<A>>,
    pub remove_deny: Vec<Entry<A>>,
}

impl<A> Plan<A> {
    pub fn operations(&self) -> usize {
        self.upsert_deny.len()
            + self.remove_allow.len()
            + self.upsert_allow.len()
            + self.remove_deny.len()
    }
}

/// Merge-walks two sorted, deduplicated sets.
pub fn plan<A: Copy + Ord>(old: &[Entry<A>], new: &[Entry<A>]) -> Plan<A> {
    let mut plan = Plan {
        upsert_deny: Vec::new(),
        remove_allow: Vec::new(),
        upsert_allow: Vec::new(),
        remove_deny: Vec::new(),
    };
    let (mut i, mut j) = (0, 0);
    let add = |plan: &mut Plan<A>, e: Entry<A>| match e.action {
        Action::Deny => plan.upsert_deny.push(e),
        Action::Allow => plan.upsert_allow.push(e),
    };
    let remove = |plan: &mut Plan<A>, e: Entry<A>| match e.action {
        Action::Deny => plan.remove_deny.push(e),
        Action::Allow => plan.remove_allow.push(e),
    };
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o.key() == n.key() => {
                if o.action != n.action {
                    add(&mut plan, *n);
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.key() < n.key() => {
                remove(&mut plan, *o);
                i += 1;
            }
            (Some(_), Some(n)) => {
                add(&mut plan, *n);
                j += 1;
            }
            (Some(o), None) => {
                remove(&mut plan, *o);
                i += 1;
            }
            (None, Some(n)) => {
                add(&mut plan, *n);
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    plan
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IPv4 {} deny / {} allow, IPv6 {} deny / {} allow",
            self.v4_deny, self.v4_allow, self.v6_deny, self.v6_allow
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            fs::write(dir.path().join(name), content).unwrap();
        }
        dir
    }

    fn gz(text: &str) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn every_format_feature() {
        let dir = dir_with(&[
            ("a", b"# comment\n\n  203.0.113.0/24  # trailing\n198.51.100.7\n!203.0.113.128/25\n2001:db8::/32\n! 2001:db8:1::/48\n203.0.113.0/24\n"),
            ("b.gz", &gz("10.0.0.0/8\n!10.1.2.0/24\n")),
            (".hidden", b"not a rule"),
        ]);
        let parsed = parse_dir(dir.path()).unwrap();
        let c = parsed.rules.counts();
        assert_eq!((c.v4_deny, c.v4_allow, c.v6_deny, c.v6_allow), (3, 2, 1, 1));
        assert_eq!(parsed.files, 2);
        assert!(parsed.rules.v4.contains(&Entry {
            addr: u32::from(Ipv4Addr::new(198, 51, 100, 7)),
            len: 32,
            action: Action::Deny
        }));
    }

    #[test]
    fn errors_name_file_and_line() {
        let dir = dir_with(&[("rules", b"10.0.0.0/8\n\n10.1.2.3/8\n")]);
        let err = parse_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.ends_with("rules:3: 10.1.2.3/8 has host bits set (did you mean 10.0.0.0/8?)"),
            "{err}"
        );
        let dir = dir_with(&[("x", b"1.2.3.4\nbanana\n")]);
        assert!(
            parse_dir(dir.path())
                .unwrap_err()
                .to_string()
                .contains("x:2: \"banana\"")
        );
        let dir = dir_with(&[("x", b"1.2.3.0/33\n")]);
        assert!(parse_dir(dir.path()).is_err());
        let dir = dir_with(&[("x", b"1.2.3.4\n"), ("y", b"\xff\xfe\n")]);
        assert!(
            parse_dir(dir.path())
                .unwrap_err()
                .to_string()
                .contains("y:1: not valid UTF-8")
        );
        let dir = dir_with(&[("x.gz", b"not gzip")]);
        assert!(
            parse_dir(dir.path())
                .unwrap_err()
                .to_string()
                .contains("x.gz")
        );
    }

    #[test]
    fn deny_and_allow_of_the_same_prefix_is_an_error_naming_both() {
        let dir = dir_with(&[("a", b"10.0.0.0/8\n"), ("b", b"# x\n!10.0.0.0/8\n")]);
        let err = parse_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("10.0.0.0/8 is listed both as deny (")
                && err.contains("a:1")
                && err.contains("b:2"),
            "{err}"
        );
    }

    #[test]
    fn missing_dir_is_an_empty_set() {
        let parsed = parse_dir(Path::new("/nonexistent/egress-deny")).unwrap();
        assert!(parsed.dir_missing && parsed.rules.len() == 0);
    }

    #[test]
    fn kubelet_layout_follows_symlinks_and_skips_data_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_11_22_10_00_00.1");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("list"), "192.0.2.0/24\n").unwrap();
        std::os::unix::fs::symlink("..2026_11_22_10_00_00.1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/list", dir.path().join("list")).unwrap();
        let parsed = parse_dir(dir.path()).unwrap();
        assert_eq!(parsed.rules.counts().v4_deny, 1);
        assert_eq!(parsed.files, 1);
    }

    fn e(addr: u32, len: u8, action: Action) -> Entry<u32> {
        Entry { addr, len, action }
    }

    /// Longest-prefix decision over a set of entries (the datapath's semantics).
    fn decide(entries: &[Entry<u32>], dst: u32) -> Action {
        entries
            .iter()
            .filter(|x| mask4(dst, x.len) == x.addr)
            .max_by_key(|x| x.len)
            .map(|x| x.action)
            .unwrap_or(Action::Allow)
    }

    #[test]
    fn plan_never_allows_what_both_sets_deny() {
        // Exhaustive over small random sets in a tiny address space (8 bits, lengths 24..=32
        // on 0xC0000000 + x): every intermediate state after every single operation.
        let base = 0xC000_0000u32;
        let mut seed = 7u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut make = || {
                let mut set: Vec<Entry<u32>> = (0..(rand() % 6))
                    .map(|_| {
                        let len = 24 + (rand() % 9) as u8;
                        let action = if rand() % 2 == 0 {
                            Action::Deny
                        } else {
                            Action::Allow
                        };
                        e(mask4(base + (rand() % 256) as u32, len), len, action)
                    })
                    .collect();
                set.sort_unstable();
                set.dedup_by_key(|x| x.key());
                set
            };
            let (old, new) = (make(), make());
            let p = plan(&old, &new);
            let mut state = old.clone();
            let check = |state: &Vec<Entry<u32>>| {
                for dst in 0..256u32 {
                    let d = base + dst;
                    if decide(&old, d) == Action::Deny && decide(&new, d) == Action::Deny {
                        assert_eq!(
                            decide(state, d),
                            Action::Deny,
                            "old {old:?} new {new:?} state {state:?}"
                        );
                    }
                }
            };
            let apply_upsert = |state: &mut Vec<Entry<u32>>, x: &Entry<u32>| {
                state.retain(|y| y.key() != x.key());
                state.push(*x);
            };
            for x in &p.upsert_deny {
                apply_upsert(&mut state, x);
                check(&state);
            }
            for x in &p.remove_allow {
                state.retain(|y| y.key() != x.key());
                check(&state);
            }
            for x in &p.upsert_allow {
                apply_upsert(&mut state, x);
                check(&state);
            }
            for x in &p.remove_deny {
                state.retain(|y| y.key() != x.key());
                check(&state);
            }
            state.sort_unstable();
            assert_eq!(state, new, "plan does not reach the new set");
        }
    }
}
