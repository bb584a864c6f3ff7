//! The rules directory: finding the rule files (kubelet's ConfigMap layout), parsing
//! them (streaming, in blocks, on several threads) into compact sorted sets, and
//! noticing cheaply when nothing changed.
//!
//! Format (one entry per line): `CIDR`, a bare address or an address range `A-B` (the
//! exact minimal set of prefixes covering it) denies, `!` before any of them makes it an
//! allow-exception, `#` or `;` (Spamhaus DROP) starts a comment, blank lines and
//! surrounding whitespace are ignored. Files whose name ends in `.gz` are gzip-compressed. Hidden entries (`.x`,
//! kubelet's `..data`) are skipped; symlinks (kubelet's ConfigMap layout) are followed.
//! Host bits set, an unparsable line, or one prefix listed as both deny and allow reject
//! the whole update, naming file and line.
use std::{
    fmt,
    fs::{self, File},
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::SystemTime,
};

use egress_deny_datapath::rules::Action;
use ipnet::IpNet;

/// One rule: a truncated prefix and its action (`A` = u32 for IPv4, u128 for IPv6,
/// host order, so that sorting is by address then length; 8 bytes for IPv4). The same
/// type the table compiler reads.
pub use egress_deny_datapath::table::Entry;

/// What the two address families need from their address type.
pub trait Address: Copy + Ord + Send + Sync + fmt::Debug + 'static {
    /// Sorts by (address, length, action) — the derived order, faster.
    fn sort(entries: &mut [Entry<Self>]);
    fn to_net(self, len: u8) -> IpNet;
}

impl Address for u32 {
    fn sort(entries: &mut [Entry<u32>]) {
        // One integer comparison instead of three field comparisons.
        entries.sort_unstable_by_key(|e| {
            (u64::from(e.addr) << 16) | (u64::from(e.len) << 8) | e.action as u64
        });
    }
    fn to_net(self, len: u8) -> IpNet {
        IpNet::new(IpAddr::V4(Ipv4Addr::from(self)), len).expect("valid prefix length")
    }
}

impl Address for u128 {
    fn sort(entries: &mut [Entry<u128>]) {
        entries.sort_unstable();
    }
    fn to_net(self, len: u8) -> IpNet {
        IpNet::new(IpAddr::V6(Ipv6Addr::from(self)), len).expect("valid prefix length")
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
        match net.trunc() {
            IpNet::V4(n) => covering(&self.v4, u32::from(n.network()), n.prefix_len(), mask4),
            IpNet::V6(n) => covering(&self.v6, u128::from(n.network()), n.prefix_len(), mask6),
        }
    }

    /// An order-sensitive 64-bit digest of the set: equal sets, equal digests. Lets a
    /// restarted daemon trust what its predecessor recorded instead of walking millions
    /// of map entries (see `sync::Syncer::open`).
    pub fn digest(&self) -> u64 {
        // FNV-1a over the fields; cheap (a few ms per million entries) and plenty to
        // tell two rule sets apart by accident.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |x: u64| {
            h ^= x;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        };
        mix(self.v4.len() as u64);
        for e in &self.v4 {
            mix((u64::from(e.addr) << 16) | (u64::from(e.len) << 8) | e.action as u64);
        }
        mix(self.v6.len() as u64);
        for e in &self.v6 {
            mix(e.addr as u64);
            mix((e.addr >> 64) as u64);
            mix((u64::from(e.len) << 8) | e.action as u64);
        }
        h
    }
}

fn covering<A: Address>(
    entries: &[Entry<A>],
    addr: A,
    prefix_len: u8,
    mask: fn(A, u8) -> A,
) -> Vec<IpNet> {
    (0..=prefix_len)
        .filter_map(|len| {
            let key = (mask(addr, len), len);
            let i = entries.binary_search_by(|e| e.key().cmp(&key)).ok()?;
            (entries[i].action == Action::Deny).then(|| key.0.to_net(len))
        })
        .collect()
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
    /// Reading failed (I/O, corrupt gzip): may be transient.
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{prefix} is listed both as deny ({deny_at}) and as allow ({allow_at})")]
    Conflict {
        prefix: IpNet,
        deny_at: String,
        allow_at: String,
    },
    /// Over one of the configured [`Limits`].
    #[error("{0}")]
    TooLarge(String),
    #[error("interrupted (shutting down)")]
    Interrupted,
}

impl RulesError {
    /// Whether reading the same files again gives the same answer (content errors), as
    /// opposed to I/O trouble worth retrying.
    pub fn is_about_content(&self) -> bool {
        matches!(
            self,
            RulesError::Line { .. } | RulesError::Conflict { .. } | RulesError::TooLarge(_)
        )
    }
}

/// Bounds on one update, so that a small hostile input (a `.gz` of one line repeated a
/// billion times) is rejected with a clear error instead of getting the daemon
/// OOM-killed in a loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes read from all files together, after decompression.
    pub max_bytes: u64,
    /// Rule lines (denies and exceptions, both families, duplicates included).
    pub max_rules: u64,
    /// Bytes in one line.
    pub max_line: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            max_rules: DEFAULT_MAX_RULES,
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

/// 10M rules of the usual mix are ~150 MB of text; 1 GiB leaves room for comments.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Twice the rule maps' capacity per family: room for duplicates, while the parsed
/// entries (8 or 24 bytes each) stay within the DaemonSet's memory limit.
pub const DEFAULT_MAX_RULES: u64 = 2 * egress_deny_datapath::common::MAX_RULES_PER_FAMILY as u64;
/// Rule lines are under 60 bytes; feed headers and comments rarely exceed a few hundred.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;

/// What was read: the set, plus whether the directory existed at all.
#[derive(Debug)]
pub struct Parsed {
    pub rules: RuleSet,
    pub files: usize,
    pub lines: usize,
}

/// Kubelet's volume layout: each key is a symlink into `..data`, itself a symlink to a
/// timestamped directory that an update replaces by one rename.
const KUBELET_DATA: &str = "..data";

/// The directory the rule files are read from: the one `..data` points to now (one
/// consistent version of every key), or `dir` itself when it is a plain directory.
fn snapshot_dir(dir: &Path) -> PathBuf {
    match fs::read_link(dir.join(KUBELET_DATA)) {
        Ok(target) => dir.join(target),
        Err(_) => dir.to_path_buf(),
    }
}

/// The rule files of `dir` in name order, all from one snapshot (see `snapshot_dir`):
/// reading each key through its own symlink could mix two versions across a swap and
/// lose a prefix that moved between keys. Hidden entries skipped, symlinks followed,
/// only regular files. `NotFound` when the directory does not exist.
pub fn rule_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::metadata(dir)?;
    let snapshot = snapshot_dir(dir);
    let mut files = Vec::new();
    for entry in fs::read_dir(&snapshot)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
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

/// A rule file as the operator knows it: the ConfigMap key under the rules directory,
/// not kubelet's timestamped snapshot directory it is read from (whose name changes
/// with every update, so the same error would read differently each time).
pub fn shown(path: &Path) -> String {
    let snapshot = path.parent().filter(|p| {
        p.file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
    });
    match (snapshot.and_then(Path::parent), path.file_name()) {
        (Some(dir), Some(key)) => dir.join(key).display().to_string(),
        _ => path.display().to_string(),
    }
}

/// Whether `files` (from [`rule_files`]) still are the directory's current version:
/// false when kubelet swapped `..data` while they were being read. The caller reads
/// again rather than enforce a version that is already gone.
pub fn still_current(dir: &Path, files: &[PathBuf]) -> bool {
    let snapshot = snapshot_dir(dir);
    files.iter().all(|f| f.parent() == Some(snapshot.as_path()))
}

/// Identity of the rule files' current contents, from metadata only (symlinks
/// resolved): kubelet's `..data` swap changes every inode; an in-place edit changes
/// the size or the modification time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    files: Vec<FileIdentity>,
    /// The newest modification/change time among the files.
    newest: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileIdentity {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    pub fn of(files: &[PathBuf]) -> io::Result<Self> {
        let mut out = Vec::with_capacity(files.len());
        let mut newest: Option<SystemTime> = None;
        for path in files {
            let m = fs::metadata(path)?;
            for t in [m.modified().ok(), ctime(&m)].into_iter().flatten() {
                newest = Some(newest.map_or(t, |n| n.max(t)));
            }
            out.push(FileIdentity {
                path: path.clone(),
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            });
        }
        Ok(Self { files: out, newest })
    }

    /// Whether a parse that started at `parsed_at` certainly saw these contents. File
    /// times come from a coarse clock: a write just before or during that parse could
    /// leave size and times unchanged, so recent changes never count as seen.
    pub fn seen_by_parse_at(&self, earlier: &Fingerprint, parsed_at: SystemTime) -> bool {
        const CLOCK_SLACK: std::time::Duration = std::time::Duration::from_millis(50);
        self == earlier
            && self
                .newest
                .is_none_or(|newest| newest + CLOCK_SLACK < parsed_at)
    }
}

fn ctime(m: &fs::Metadata) -> Option<SystemTime> {
    let secs = u64::try_from(m.ctime()).ok()?;
    Some(
        SystemTime::UNIX_EPOCH
            + std::time::Duration::new(secs, u32::try_from(m.ctime_nsec()).unwrap_or(0)),
    )
}

/// Parses `files` into one sorted, deduplicated set. `cancel` aborts (shutdown).
pub fn parse_files(
    files: &[PathBuf],
    limits: &Limits,
    cancel: &AtomicBool,
) -> Result<Parsed, RulesError> {
    let (mut v4, mut v6, lines) = pipeline(files, limits, cancel)?;
    let conflict = sort_dedup(&mut v4)
        .map(|(a, l)| a.to_net(l))
        .or_else(|| sort_dedup(&mut v6).map(|(a, l)| a.to_net(l)));
    if let Some(prefix) = conflict {
        return Err(locate_conflict(files, prefix, cancel));
    }
    Ok(Parsed {
        rules: RuleSet { v4, v6 },
        files: files.len(),
        lines,
    })
}

/// `rule_files` + `parse_files`; a missing directory is an error (`File`) here: the
/// caller decides what a missing directory means.
#[cfg(test)]
pub fn parse_dir(dir: &Path) -> Result<Parsed, RulesError> {
    let files = rule_files(dir).map_err(|e| RulesError::File {
        file: dir.display().to_string(),
        message: e.to_string(),
    })?;
    parse_files(&files, &Limits::default(), &AtomicBool::new(false))
}

/// Sorts, drops duplicates, and returns a prefix listed with both actions, if any.
/// Frees the slack: sets live as long as they are enforced.
fn sort_dedup<A: Address>(entries: &mut Vec<Entry<A>>) -> Option<(A, u8)> {
    A::sort(entries);
    // One pass: drop duplicates, spot a prefix with both actions (adjacent after the
    // sort, as the action is the last sort key).
    let mut conflict = None;
    let mut kept = 0;
    for i in 0..entries.len() {
        let e = entries[i];
        if kept > 0 {
            let last = entries[kept - 1];
            if last.key() == e.key() {
                if last.action != e.action && conflict.is_none() {
                    conflict = Some(e.key());
                }
                continue;
            }
        }
        entries[kept] = e;
        kept += 1;
    }
    entries.truncate(kept);
    entries.shrink_to_fit();
    conflict
}

/// Only on error: scans again to name where both sides of a conflict are.
fn locate_conflict(files: &[PathBuf], prefix: IpNet, cancel: &AtomicBool) -> RulesError {
    let mut deny_at = String::from("?");
    let mut allow_at = String::from("?");
    for file in files {
        if cancel.load(Ordering::Relaxed) {
            return RulesError::Interrupted;
        }
        let name = shown(file);
        let _ = for_each_line(file, &mut |line_no, line| {
            if let Some((Ok(rule), action)) = split_rule(line).map(|(a, t)| (parse_rule(t), a))
                && rule.covers_exactly(prefix)
            {
                let at = format!("{name}:{line_no}");
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

/// Calls `f` with each line (1-based number, without the newline) of a file, streaming.
fn for_each_line(path: &Path, f: &mut dyn FnMut(usize, &[u8])) -> io::Result<()> {
    use io::BufRead;
    let mut reader = io::BufReader::new(open(path)?);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        line_no += 1;
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = if line_no == 1 {
            line.strip_prefix(UTF8_BOM).unwrap_or(line)
        } else {
            line
        };
        f(line_no, line);
    }
}

pub(crate) fn open(path: &Path) -> io::Result<Box<dyn Read>> {
    let file = File::open(path)?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

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
    fn covers_exactly(self, prefix: IpNet) -> bool {
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
        && mask4(addr, len) == addr
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
    if mask4(addr, len) != addr {
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

pub(crate) const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Lines are read in blocks of about this size, cut at a newline.
const BLOCK: usize = 1 << 20;
/// Entries are collected in fixed chunks (no doubling slack, no big copy at the end).
const CHUNK: usize = 1 << 16;

struct Block {
    file: usize,
    seq: usize,
    data: Vec<u8>,
}

/// Grows in fixed-size chunks: a million pushes never reallocate a large buffer.
struct Chunked<T> {
    chunks: Vec<Vec<T>>,
}

impl<T: Copy> Chunked<T> {
    fn new() -> Self {
        Self { chunks: Vec::new() }
    }

    fn push(&mut self, item: T) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(item),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(item);
                self.chunks.push(chunk);
            }
        }
    }

    fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Moves everything into one exactly-sized vector, freeing chunks as it goes.
    fn concat(parts: Vec<Self>) -> Vec<T> {
        let mut out = Vec::with_capacity(parts.iter().map(Self::len).sum());
        for part in parts {
            for chunk in part.chunks {
                out.extend_from_slice(&chunk);
            }
        }
        out
    }
}

/// What one parser thread produced.
struct Output {
    v4: Chunked<Entry<u32>>,
    v6: Chunked<Entry<u128>>,
    /// (file, seq, lines in that block).
    lines: Vec<(usize, usize, usize)>,
    /// The first error this thread saw: (file, seq, line within the block, message).
    error: Option<(usize, usize, usize, String)>,
}

/// Reader (this thread) → bounded queue of blocks → parser threads. Memory stays at a
/// few blocks whatever the size of the files.
#[allow(clippy::type_complexity)]
fn pipeline(
    files: &[PathBuf],
    limits: &Limits,
    cancel: &AtomicBool,
) -> Result<(Vec<Entry<u32>>, Vec<Entry<u128>>, usize), RulesError> {
    // Rule entries parsed so far, all threads: checked after each block.
    let parsed_rules = AtomicU64::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let (block_tx, block_rx) = mpsc::sync_channel::<Block>(workers * 2);
    let block_rx = Mutex::new(block_rx);
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    // Position (file << 32 | seq) of the earliest block with an error: later blocks
    // are only counted, not parsed, and the reader stops.
    let first_error = AtomicU64::new(u64::MAX);

    let (outputs, read_result) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (block_rx, spare_tx, first_error) = (&block_rx, spare_tx.clone(), &first_error);
                let parsed_rules = &parsed_rules;
                let max_line = limits.max_line;
                scope.spawn(move || {
                    parse_blocks(block_rx, spare_tx, first_error, parsed_rules, max_line)
                })
            })
            .collect();
        drop(spare_tx);
        let read_result = read_blocks(
            files,
            limits,
            &block_tx,
            &spare_rx,
            &first_error,
            &parsed_rules,
            cancel,
        );
        drop(block_tx);
        let outputs: Vec<Output> = handles
            .into_iter()
            .map(|h| h.join().expect("parser thread panicked"))
            .collect();
        (outputs, read_result)
    });
    read_result?;
    let rules = parsed_rules.load(Ordering::Relaxed);
    if rules > limits.max_rules {
        return Err(too_many_rules(rules, limits));
    }

    // Report the earliest error (file order, then line).
    if let Some((file, seq, line, message)) = outputs
        .iter()
        .filter_map(|o| o.error.clone())
        .min_by_key(|(f, s, l, _)| (*f, *s, *l))
    {
        let before: usize = outputs
            .iter()
            .flat_map(|o| &o.lines)
            .filter(|(f, s, _)| *f == file && *s < seq)
            .map(|(_, _, n)| n)
            .sum();
        return Err(RulesError::Line {
            file: shown(&files[file]),
            line: before + line,
            message,
        });
    }
    let lines = outputs
        .iter()
        .flat_map(|o| &o.lines)
        .map(|(_, _, n)| n)
        .sum();
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for o in outputs {
        v4.push(o.v4);
        v6.push(o.v6);
    }
    Ok((Chunked::concat(v4), Chunked::concat(v6), lines))
}

fn too_many_rules(seen: u64, limits: &Limits) -> RulesError {
    RulesError::TooLarge(format!(
        "more than {} rule lines (at least {seen}; --max-rules)",
        limits.max_rules
    ))
}

#[allow(clippy::too_many_arguments)]
fn read_blocks(
    files: &[PathBuf],
    limits: &Limits,
    blocks: &mpsc::SyncSender<Block>,
    spares: &mpsc::Receiver<Vec<u8>>,
    first_error: &AtomicU64,
    parsed_rules: &AtomicU64,
    cancel: &AtomicBool,
) -> Result<(), RulesError> {
    let mut total: u64 = 0;
    for (file_index, path) in files.iter().enumerate() {
        let file_error = |message: String| RulesError::File {
            file: shown(path),
            message,
        };
        let mut reader = open(path).map_err(|e| file_error(e.to_string()))?;
        let mut carry: Vec<u8> = Vec::new();
        // A UTF-8 byte-order mark (files saved by Windows tools, some feed exports) is
        // not part of the first line.
        let mut at_start = true;
        let mut seq = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(RulesError::Interrupted);
            }
            if first_error.load(Ordering::Relaxed) != u64::MAX {
                return Ok(()); // the update is rejected anyway
            }
            let rules = parsed_rules.load(Ordering::Relaxed);
            if rules > limits.max_rules {
                return Err(too_many_rules(rules, limits));
            }
            let mut buf = spares.try_recv().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(&carry);
            carry.clear();
            // Fill to at least BLOCK bytes holding a newline (or to EOF), then cut after
            // the last newline; the partial line after it starts the next block.
            let mut eof = false;
            loop {
                // Only the partial line at the end can still grow (complete lines are
                // checked by the parsers).
                let tail = buf.len() - memchr::memrchr(b'\n', &buf).map_or(0, |i| i + 1);
                if tail > limits.max_line {
                    return Err(RulesError::TooLarge(format!(
                        "{}: a line longer than {} bytes: not a rules file (--max-line-bytes)",
                        shown(path),
                        limits.max_line,
                    )));
                }
                if buf.len() >= BLOCK && memchr::memrchr(b'\n', &buf).is_some() {
                    break;
                }
                let filled = buf.len();
                buf.resize(filled + BLOCK, 0);
                let n = read_retrying(&mut reader, &mut buf[filled..])
                    .map_err(|e| file_error(format!("read error: {e}")))?;
                buf.truncate(filled + n);
                if at_start && (buf.len() >= UTF8_BOM.len() || n == 0) {
                    if buf.starts_with(UTF8_BOM) {
                        buf.drain(..UTF8_BOM.len());
                    }
                    at_start = false;
                }
                total += n as u64;
                if total > limits.max_bytes {
                    return Err(RulesError::TooLarge(format!(
                        "the rule files hold more than {} bytes (after decompression; --max-rules-bytes); stopped in {}",
                        limits.max_bytes,
                        shown(path)
                    )));
                }
                if n == 0 {
                    eof = true;
                    break;
                }
            }
            if !eof {
                let cut = memchr::memrchr(b'\n', &buf).expect("checked above") + 1;
                carry.extend_from_slice(&buf[cut..]);
                buf.truncate(cut);
            }
            if !buf.is_empty() {
                let block = Block {
                    file: file_index,
                    seq,
                    data: buf,
                };
                seq += 1;
                if blocks.send(block).is_err() {
                    return Ok(());
                }
            }
            if eof {
                break;
            }
        }
    }
    Ok(())
}

fn read_retrying(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn position(file: usize, seq: usize) -> u64 {
    ((file as u64) << 32) | seq as u64
}

fn parse_blocks(
    blocks: &Mutex<mpsc::Receiver<Block>>,
    spares: mpsc::Sender<Vec<u8>>,
    first_error: &AtomicU64,
    parsed_rules: &AtomicU64,
    max_line: usize,
) -> Output {
    let mut out = Output {
        v4: Chunked::new(),
        v6: Chunked::new(),
        lines: Vec::new(),
        error: None,
    };
    let mut counted = 0u64;
    loop {
        let block = match blocks.lock().expect("block queue").recv() {
            Ok(block) => block,
            Err(_) => return out,
        };
        let here = position(block.file, block.seq);
        let mut lines = 0;
        if first_error.load(Ordering::Relaxed) < here {
            // An earlier block is bad: the update is rejected; only count lines.
            lines = memchr::memchr_iter(b'\n', &block.data).count()
                + usize::from(!block.data.ends_with(b"\n"));
        } else {
            let mut rest = &block.data[..];
            while !rest.is_empty() {
                let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
                let line = &rest[..end];
                rest = &rest[end..];
                lines += 1;
                if line.strip_suffix(b"\n").unwrap_or(line).len() > max_line {
                    if out.error.is_none() {
                        out.error = Some((
                            block.file,
                            block.seq,
                            lines,
                            format!("a line longer than {max_line} bytes (--max-line-bytes)"),
                        ));
                    }
                    first_error.fetch_min(here, Ordering::Relaxed);
                    break;
                }
                if let Some((action, addr, len)) = fast_line(line) {
                    out.v4.push(Entry { addr, len, action });
                    continue;
                }
                let Some((action, text)) = split_rule(line) else {
                    continue;
                };
                match parse_rule(text) {
                    Ok(Rule::V4(addr, len)) => out.v4.push(Entry { addr, len, action }),
                    Ok(Rule::V6(addr, len)) => out.v6.push(Entry { addr, len, action }),
                    Ok(range) => range.for_each_prefix(|net| push_net(&mut out, net, action)),
                    Err(message) => {
                        if out.error.is_none() {
                            out.error = Some((block.file, block.seq, lines, message));
                        }
                        first_error.fetch_min(here, Ordering::Relaxed);
                        // The rest of the block only needs counting.
                        break;
                    }
                }
            }
            if out
                .error
                .as_ref()
                .is_some_and(|e| (e.0, e.1) == (block.file, block.seq))
            {
                lines = memchr::memchr_iter(b'\n', &block.data).count()
                    + usize::from(!block.data.ends_with(b"\n"));
            }
        }
        out.lines.push((block.file, block.seq, lines));
        let entries = (out.v4.len() + out.v6.len()) as u64;
        parsed_rules.fetch_add(entries - counted, Ordering::Relaxed);
        counted = entries;
        let _ = spares.send(block.data);
    }
}

fn push_net(out: &mut Output, net: IpNet, action: Action) {
    match net {
        IpNet::V4(n) => out.v4.push(Entry {
            addr: n.network().into(),
            len: n.prefix_len(),
            action,
        }),
        IpNet::V6(n) => out.v6.push(Entry {
            addr: n.network().into(),
            len: n.prefix_len(),
            action,
        }),
    }
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
        let nets = |action| -> Vec<String> {
            let v4 = parsed
                .rules
                .v4
                .iter()
                .filter(|e| e.action == action)
                .map(|e| e.addr.to_net(e.len));
            let v6 = parsed
                .rules
                .v6
                .iter()
                .filter(|e| e.action == action)
                .map(|e| e.addr.to_net(e.len));
            v4.chain(v6).map(|n| n.to_string()).collect()
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
        let err = parse_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("x.gz") && !err.is_about_content());
    }

    #[test]
    fn the_first_error_is_reported_with_its_line_across_blocks() {
        // Several blocks, errors in more than one: the first one, with its line.
        let mut text = String::new();
        for i in 0..400_000u32 {
            text.push_str(&format!("{}\n", Ipv4Addr::from(0x0b00_0000 + i)));
        }
        text.push_str("11.0.0.1/8\n"); // line 400001
        for i in 0..300_000u32 {
            text.push_str(&format!("{}\n", Ipv4Addr::from(0x0c00_0000 + i)));
        }
        text.push_str("nonsense\n");
        let dir = dir_with(&[
            ("a", b"1.1.1.1\n"),
            ("big", text.as_bytes()),
            ("z", b"bad\n"),
        ]);
        let err = parse_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("big:400001: 11.0.0.1/8 has host bits set"),
            "{err}"
        );
        // Without the errors: every line counted, every rule kept.
        let good = text.replace("11.0.0.1/8\n", "").replace("nonsense\n", "");
        let dir = dir_with(&[("big.gz", &gz(&good)), ("big2", good.as_bytes())]);
        let parsed = parse_dir(dir.path()).unwrap();
        assert_eq!(parsed.lines, 1_400_000);
        assert_eq!(parsed.rules.v4.len(), 700_000);
        assert!(parsed.rules.v4.windows(2).all(|w| w[0] < w[1]));
    }

    fn parse_with(dir: &Path, limits: Limits) -> Result<Parsed, RulesError> {
        parse_files(&rule_files(dir).unwrap(), &limits, &AtomicBool::new(false))
    }

    #[test]
    fn limits_reject_a_gzip_bomb_a_huge_line_and_too_many_rules() {
        // 2 MiB of one repeated line compress to a few KiB: bounded by bytes and rules.
        let bomb = "1.2.3.4\n".repeat(256 * 1024);
        let dir = dir_with(&[("bomb.gz", &gz(&bomb))]);
        let small = Limits {
            max_bytes: 1 << 20,
            ..Limits::default()
        };
        let err = parse_with(dir.path(), small).unwrap_err();
        assert!(matches!(err, RulesError::TooLarge(_)), "{err}");
        assert!(err.to_string().contains("--max-rules-bytes"), "{err}");
        assert!(err.is_about_content());
        let few = Limits {
            max_rules: 1000,
            ..Limits::default()
        };
        let err = parse_with(dir.path(), few).unwrap_err();
        assert!(
            err.to_string().contains("more than 1000 rule lines"),
            "{err}"
        );
        // Within the defaults the same list is fine (duplicates are harmless).
        assert_eq!(
            parse_with(dir.path(), Limits::default())
                .unwrap()
                .rules
                .v4
                .len(),
            1
        );

        // A 50 MB line (no newline at all), and a long line between good ones.
        let dir = dir_with(&[("one-line", &vec![b'1'; 50 << 20])]);
        let err = parse_with(dir.path(), Limits::default()).unwrap_err();
        assert!(err.to_string().contains("--max-line-bytes"), "{err}");
        let mut text = b"10.0.0.0/8\n# ".to_vec();
        text.extend(vec![b'c'; 100 * 1024]);
        text.extend(b"\n192.0.2.0/24\n");
        let dir = dir_with(&[("a", &text)]);
        let err = parse_with(dir.path(), Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains(":2: a line longer than 65536"),
            "{err}"
        );
        // A truncated gzip is an error naming the file, not a partial set.
        let mut cut = gz("10.0.0.0/8\n192.0.2.0/24\n");
        cut.truncate(cut.len() - 10);
        let dir = dir_with(&[("cut.gz", &cut)]);
        let err = parse_with(dir.path(), Limits::default()).unwrap_err();
        assert!(err.to_string().contains("cut.gz"), "{err}");
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

    #[test]
    fn a_last_line_without_newline_and_a_huge_line() {
        let dir = dir_with(&[("a", b"1.1.1.1\n2.2.2.2")]);
        assert_eq!(parse_dir(dir.path()).unwrap().rules.v4.len(), 2);
        let dir = dir_with(&[("a", &vec![b'x'; 3 * DEFAULT_MAX_LINE])]);
        assert!(
            parse_dir(dir.path())
                .unwrap_err()
                .to_string()
                .contains("a line longer than")
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
    fn missing_dir_is_not_found() {
        let err = rule_files(Path::new("/nonexistent/egress-deny")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
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

        // The fingerprint follows the swap, and only the swap.
        let files = rule_files(dir.path()).unwrap();
        let before = Fingerprint::of(&files).unwrap();
        let data2 = dir.path().join("..2026_11_22_10_00_01.2");
        fs::create_dir(&data2).unwrap();
        fs::write(data2.join("list"), "192.0.2.0/24\n").unwrap();
        assert_eq!(Fingerprint::of(&files).unwrap(), before);
        assert!(still_current(dir.path(), &files));
        std::os::unix::fs::symlink("..2026_11_22_10_00_01.2", dir.path().join("..tmp")).unwrap();
        fs::rename(dir.path().join("..tmp"), dir.path().join("..data")).unwrap();
        let after = rule_files(dir.path()).unwrap();
        assert_ne!(Fingerprint::of(&after).unwrap(), before);
        // Files listed before the swap are no longer the current version.
        assert!(!still_current(dir.path(), &files));
        assert!(still_current(dir.path(), &after));
    }

    /// A prefix moves from one key to another in an update. Reading key by key through
    /// the symlinks across the swap saw neither copy; a snapshot sees exactly one.
    #[test]
    fn a_swap_during_the_read_never_mixes_two_versions() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("..v1");
        let v2 = dir.path().join("..v2");
        fs::create_dir(&v1).unwrap();
        fs::create_dir(&v2).unwrap();
        fs::write(v1.join("a"), "").unwrap();
        fs::write(v1.join("b"), "198.51.100.0/24\n").unwrap();
        fs::write(v2.join("a"), "198.51.100.0/24\n").unwrap();
        fs::write(v2.join("b"), "").unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        for key in ["a", "b"] {
            std::os::unix::fs::symlink(format!("..data/{key}"), dir.path().join(key)).unwrap();
        }
        let files = rule_files(dir.path()).unwrap();
        // Every key is read from the one version `..data` named at listing time, not
        // through its own symlink (which a swap between two keys' reads would redirect).
        assert!(
            files.iter().all(|f| f.parent() == Some(v1.as_path())),
            "{files:?}"
        );
        // Kubelet swaps between the listing and the read (the old version still there).
        std::os::unix::fs::symlink("..v2", dir.path().join("..tmp")).unwrap();
        fs::rename(dir.path().join("..tmp"), dir.path().join("..data")).unwrap();
        let parsed = parse_files(&files, &Limits::default(), &AtomicBool::new(false)).unwrap();
        assert_eq!(parsed.rules.counts().v4_deny, 1, "one whole version read");
        assert!(
            !still_current(dir.path(), &files),
            "the swap goes unnoticed"
        );
        // Kubelet removes the old version: reading it fails (retried), never a partial set.
        fs::remove_dir_all(&v1).unwrap();
        assert!(parse_files(&files, &Limits::default(), &AtomicBool::new(false)).is_err());
    }

    #[test]
    fn a_recent_change_is_never_taken_as_seen() {
        let dir = dir_with(&[("a", b"1.1.1.1\n")]);
        let files = rule_files(dir.path()).unwrap();
        let fp = Fingerprint::of(&files).unwrap();
        let now = SystemTime::now();
        assert!(!fp.seen_by_parse_at(&fp, now));
        assert!(fp.seen_by_parse_at(&fp, now + std::time::Duration::from_secs(1)));
    }

    #[test]
    fn digest_tells_sets_apart() {
        let dir = dir_with(&[("a", b"1.1.1.1\n!2.2.2.0/24\n")]);
        let a = parse_dir(dir.path()).unwrap().rules;
        let dir = dir_with(&[("a", b"1.1.1.1\n2.2.2.0/24\n")]);
        let b = parse_dir(dir.path()).unwrap().rules;
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), a.clone().digest());
    }

    /// `cargo test --release -p egress-deny-installer -- --ignored --nocapture parse_speed`
    #[test]
    #[ignore]
    fn parse_speed() {
        let mut text = String::new();
        let mut s = 88172645463325252u64;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let addr = (s >> 32) as u32;
            text.push_str(&format!("{}\n", Ipv4Addr::from(addr)));
        }
        let dir = dir_with(&[("feed", text.as_bytes())]);
        let files = rule_files(dir.path()).unwrap();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let mut n = 0u64;
            let mut rest = text.as_bytes();
            while !rest.is_empty() {
                let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
                let line = &rest[..end];
                rest = &rest[end..];
                if let Some((_, a, _)) = fast_line(line) {
                    n = n.wrapping_add(u64::from(a));
                }
            }
            eprintln!("single thread, in memory: {:?} ({n})", t.elapsed());
        }
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let (mut v4, _, _) =
                pipeline(&files, &Limits::default(), &AtomicBool::new(false)).unwrap();
            let parsed = t.elapsed();
            sort_dedup(&mut v4);
            eprintln!(
                "1M lines: {:?} ({:?} parsing, {} rules)",
                t.elapsed(),
                parsed,
                v4.len()
            );
        }
    }
}
