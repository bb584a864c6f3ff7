//! `rules check`: the daemon's line parser over files or rules directories, offline,
//! reporting every error instead of stopping at the first (a CI step should show all of
//! them in one run).
use std::{
    collections::HashMap,
    io::{self, BufRead},
    path::{Path, PathBuf},
};

use egress_deny_datapath::rules::Action;
use ipnet::IpNet;
use serde::Serialize;

use crate::rules::{self, Address, Counts, Entry, FamilyEntry, Limits, RulesError};

/// More errors than this are counted, not listed: a wrong file (a binary, a CSV) would
/// otherwise print a million lines.
const MAX_LISTED_ERRORS: usize = 1000;

/// The outcome of checking one update (all the given paths together, as the DaemonSet's
/// projected volume merges its ConfigMaps into one directory).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub valid: bool,
    pub files: Vec<FileReport>,
    /// Enforced prefixes after duplicates are dropped, as the daemon would load them.
    pub rules: FamilyCounts,
    pub errors: Vec<Problem>,
    /// Errors beyond the first [`MAX_LISTED_ERRORS`].
    pub errors_not_listed: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct FileReport {
    pub file: String,
    pub lines: usize,
    /// Lines holding a rule (a range is one line, several prefixes).
    pub rule_lines: usize,
    pub prefixes: usize,
}

#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct FamilyCounts {
    pub ipv4: ActionCounts,
    pub ipv6: ActionCounts,
}

#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActionCounts {
    pub deny: usize,
    pub allow: usize,
}

impl From<Counts> for FamilyCounts {
    fn from(c: Counts) -> Self {
        Self {
            ipv4: ActionCounts {
                deny: c.v4_deny,
                allow: c.v4_allow,
            },
            ipv6: ActionCounts {
                deny: c.v6_deny,
                allow: c.v6_allow,
            },
        }
    }
}

/// One error, in the daemon's words (`message` is what its log and `status` would say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub file: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl From<&RulesError> for Problem {
    fn from(e: &RulesError) -> Self {
        match e {
            RulesError::Line {
                file,
                line,
                message,
            } => Problem {
                file: Some(file.clone()),
                line: Some(*line),
                message: message.clone(),
            },
            RulesError::File { file, message } => Problem {
                file: Some(file.clone()),
                line: None,
                message: message.clone(),
            },
            other => Problem {
                file: None,
                line: None,
                message: other.to_string(),
            },
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: {}", self.message),
            (Some(file), None) => write!(f, "{file}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

/// The rule files of `paths`: a directory contributes its rule files as the daemon
/// reads them (kubelet's `..data` snapshot, hidden entries skipped), a file itself.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, RulesError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| RulesError::File {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        if meta.is_dir() {
            files.extend(rules::rule_files(path).map_err(|e| RulesError::File {
                file: path.display().to_string(),
                message: e.to_string(),
            })?);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

struct Collector {
    v4: Vec<Entry<u32>>,
    v6: Vec<Entry<u128>>,
    errors: Vec<Problem>,
    errors_not_listed: usize,
}

impl Collector {
    fn error(&mut self, e: &RulesError) {
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push(e.into());
        } else {
            self.errors_not_listed += 1;
        }
    }

    fn push(&mut self, net: IpNet, action: Action) {
        match FamilyEntry::new(net, action) {
            FamilyEntry::V4(e) => self.v4.push(e),
            FamilyEntry::V6(e) => self.v6.push(e),
        }
    }
}

/// Checks `paths` as one update under `limits`.
pub fn check(paths: &[PathBuf], limits: &Limits) -> Report {
    let mut c = Collector {
        v4: Vec::new(),
        v6: Vec::new(),
        errors: Vec::new(),
        errors_not_listed: 0,
    };
    let mut report = Report::default();
    let files = match expand(paths) {
        Ok(files) => files,
        Err(e) => {
            c.error(&e);
            Vec::new()
        }
    };
    let mut budget = limits.max_bytes;
    for path in &files {
        let name = rules::shown(path);
        let mut file = FileReport {
            file: name.clone(),
            ..FileReport::default()
        };
        let before = c.v4.len() + c.v6.len();
        let result = scan_file(path, limits.max_line, &mut budget, &mut |line_no, line| {
            file.lines = line_no;
            let line_error = |message: String| RulesError::Line {
                file: name.clone(),
                line: line_no,
                message,
            };
            let Some(line) = line else {
                c.error(&line_error(format!(
                    "a line longer than {} bytes (--max-line-bytes)",
                    limits.max_line
                )));
                return;
            };
            if let Some((action, addr, len)) = rules::fast_line(line) {
                file.rule_lines += 1;
                c.v4.push(Entry { addr, len, action });
                return;
            }
            let Some((action, text)) = rules::split_rule(line) else {
                return;
            };
            match rules::parse_rule(text) {
                Ok(rule) => {
                    file.rule_lines += 1;
                    rule.for_each_prefix(|net| c.push(net, action));
                }
                Err(message) => c.error(&line_error(message)),
            }
        });
        file.prefixes = c.v4.len() + c.v6.len() - before;
        report.files.push(file);
        match result {
            Ok(()) => {}
            Err(ScanError::Io(e)) => c.error(&RulesError::File {
                file: name,
                message: format!("read error: {e}"),
            }),
            Err(ScanError::TooLarge) => {
                c.error(&RulesError::TooLarge(format!(
                    "the rule files hold more than {} bytes (after decompression; --max-rules-bytes); stopped in {name}",
                    limits.max_bytes
                )));
                break;
            }
        }
    }
    let lines = (c.v4.len() + c.v6.len()) as u64;
    if lines > limits.max_rules {
        c.error(&RulesError::TooLarge(format!(
            "more than {} rule lines (at least {lines}; --max-rules)",
            limits.max_rules
        )));
    }
    let mut conflicts = dedup_conflicts(&mut c.v4);
    conflicts.extend(dedup_conflicts(&mut c.v6));
    if !conflicts.is_empty() {
        for e in locate_conflicts(&files, &conflicts) {
            c.error(&e);
        }
    }
    report.rules = rules::RuleSet {
        v4: std::mem::take(&mut c.v4),
        v6: std::mem::take(&mut c.v6),
    }
    .counts()
    .into();
    report.valid = c.errors.is_empty();
    report.errors = c.errors;
    report.errors_not_listed = c.errors_not_listed;
    report
}

/// Sorts, drops duplicates, and returns every prefix listed with both actions (at most
/// [`MAX_LISTED_ERRORS`]).
fn dedup_conflicts<A: Address>(entries: &mut Vec<Entry<A>>) -> Vec<IpNet> {
    A::sort(entries);
    let mut conflicts = Vec::new();
    for w in entries.windows(2) {
        if w[0].key() == w[1].key()
            && w[0].action != w[1].action
            && conflicts.len() < MAX_LISTED_ERRORS
        {
            conflicts.push(w[0].addr.to_net(w[0].len));
        }
    }
    entries.dedup_by_key(|e| e.key());
    conflicts
}

/// Where each side of each conflict is first listed, in one more pass over the files.
fn locate_conflicts(files: &[PathBuf], conflicts: &[IpNet]) -> Vec<RulesError> {
    let mut at: HashMap<IpNet, (Option<String>, Option<String>)> =
        conflicts.iter().map(|n| (*n, (None, None))).collect();
    for path in files {
        let name = rules::shown(path);
        let mut budget = u64::MAX;
        let _ = scan_file(path, usize::MAX, &mut budget, &mut |line_no, line| {
            let Some((action, text)) = line.and_then(rules::split_rule) else {
                return;
            };
            let Ok(rule) = rules::parse_rule(text) else {
                return;
            };
            rule.for_each_prefix(|net| {
                if let Some((deny, allow)) = at.get_mut(&net) {
                    let side = if action == Action::Deny { deny } else { allow };
                    side.get_or_insert_with(|| format!("{name}:{line_no}"));
                }
            });
        });
    }
    conflicts
        .iter()
        .map(|prefix| {
            let (deny, allow) = at.remove(prefix).unwrap_or_default();
            RulesError::Conflict {
                prefix: *prefix,
                deny_at: deny.unwrap_or_else(|| "?".into()),
                allow_at: allow.unwrap_or_else(|| "?".into()),
            }
        })
        .collect()
}

enum ScanError {
    Io(io::Error),
    TooLarge,
}

/// Calls `f` with each line of a file (1-based number; the bytes without the newline,
/// or `None` for a line longer than `max_line`, which is skipped without being held in
/// memory: a 50 MB line costs no 50 MB). Stops once more than `budget` bytes were read.
fn scan_file(
    path: &Path,
    max_line: usize,
    budget: &mut u64,
    f: &mut dyn FnMut(usize, Option<&[u8]>),
) -> Result<(), ScanError> {
    let mut reader =
        io::BufReader::with_capacity(1 << 16, rules::open(path).map_err(ScanError::Io)?);
    let mut line = Vec::new();
    let mut too_long = false;
    let mut line_no = 0;
    let mut emit = |line_no: usize, line: &[u8], too_long: bool| {
        let line = if line_no == 1 {
            line.strip_prefix(rules::UTF8_BOM).unwrap_or(line)
        } else {
            line
        };
        f(line_no, (!too_long).then_some(line));
    };
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ScanError::Io(e)),
        };
        if buf.is_empty() {
            if !line.is_empty() || too_long {
                emit(line_no + 1, &line, too_long);
            }
            return Ok(());
        }
        let (part, used, ended) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        *budget = budget.checked_sub(used as u64).ok_or(ScanError::TooLarge)?;
        if !too_long {
            if line.len() + part.len() > max_line {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(part);
            }
        }
        reader.consume(used);
        if ended {
            line_no += 1;
            emit(line_no, &line, too_long);
            line.clear();
            too_long = false;
        }
    }
}

/// Human output: every error (`file:line: message`, as compilers print them), then
/// per-file counts and the verdict.
pub fn render_text(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for e in &report.errors {
        let _ = writeln!(out, "{e}");
    }
    if report.errors_not_listed > 0 {
        let _ = writeln!(out, "... and {} more errors", report.errors_not_listed);
    }
    for f in &report.files {
        let _ = writeln!(
            out,
            "{}: {} lines, {} rules, {} prefixes",
            f.file, f.lines, f.rule_lines, f.prefixes
        );
    }
    let r = &report.rules;
    let lines: usize = report.files.iter().map(|f| f.lines).sum();
    let summary = format!(
        "{} files, {lines} lines: IPv4 {} deny / {} allow, IPv6 {} deny / {} allow (duplicates dropped)",
        report.files.len(),
        r.ipv4.deny,
        r.ipv4.allow,
        r.ipv6.deny,
        r.ipv6.allow
    );
    if report.valid {
        let _ = writeln!(out, "ok: {summary}");
    } else {
        let _ = writeln!(
            out,
            "INVALID: {} errors; the daemon would reject this update whole (the rules it enforces stay)\n{summary}",
            report.errors.len() + report.errors_not_listed
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{io::Write, sync::atomic::AtomicBool};

    use super::*;

    fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        dir
    }

    fn gz(text: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(text).unwrap();
        enc.finish().unwrap()
    }

    fn daemon(dir: &Path) -> Result<rules::Parsed, RulesError> {
        rules::parse_files(
            &rules::rule_files(dir).unwrap(),
            &Limits::default(),
            &AtomicBool::new(false),
        )
    }

    /// `check` and the daemon agree: valid/invalid, the counts, and the daemon's (first)
    /// error is `check`'s first.
    #[test]
    fn agrees_with_the_daemon() {
        let mut cut = gz(b"10.0.0.0/8\n192.0.2.0/24\n");
        cut.truncate(cut.len() - 10);
        let cases: Vec<Vec<(&str, Vec<u8>)>> = vec![
            vec![(
                "a",
                b"10.0.0.0/8\n!10.1.0.0/16 ; x\n2001:db8::/32\n192.0.2.1-192.0.2.6\n".to_vec(),
            )],
            vec![
                ("a", b"1.1.1.1\nbanana\n".to_vec()),
                ("b", b"10.0.0.9-10.0.0.1\n".to_vec()),
            ],
            vec![
                ("a", b"10.0.0.0/8\n".to_vec()),
                ("b", b"# x\n!10.0.0.0/8\n".to_vec()),
            ],
            vec![("a", b"\xef\xbb\xbf1.2.3.4/8\r\n".to_vec())],
            vec![("cut.gz", cut)],
            vec![("x", b"\xff\n".to_vec())],
            vec![(
                "x",
                [
                    b"1.1.1.1\n# ".as_slice(),
                    &vec![b'c'; 70_000],
                    b"\n".as_slice(),
                ]
                .concat(),
            )],
        ];
        for files in cases {
            let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
            let dir = dir_with(&refs);
            let report = check(&[dir.path().to_path_buf()], &Limits::default());
            match daemon(dir.path()) {
                Ok(parsed) => {
                    assert!(report.valid, "{:?}", report.errors);
                    assert_eq!(report.rules, parsed.rules.counts().into());
                }
                Err(e) => {
                    assert!(!report.valid);
                    let first = &report.errors[0];
                    match &e {
                        // The daemon names a long line per file (it cuts blocks).
                        RulesError::TooLarge(m) => assert!(
                            m.contains("a line longer") && first.message.contains("a line longer"),
                            "{e} / {first}"
                        ),
                        _ => assert_eq!(first, &Problem::from(&e), "{e}"),
                    }
                }
            }
        }
    }

    #[test]
    fn every_error_is_listed_with_file_and_line() {
        let dir = dir_with(&[
            ("a", b"10.0.0.0/8\nbanana\n10.1.2.3/8\n10.0.0.9-10.0.0.1\n"),
            ("b.gz", &gz(b"2001:db8::1/32\n!10.0.0.0/8\n")),
        ]);
        let report = check(&[dir.path().to_path_buf()], &Limits::default());
        let shown: Vec<String> = report
            .errors
            .iter()
            .map(|e| {
                let file = e.file.as_deref().map(|f| {
                    Path::new(f)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                });
                format!(
                    "{}:{}: {}",
                    file.unwrap_or_default(),
                    e.line.unwrap_or(0),
                    e.message
                )
            })
            .collect();
        assert_eq!(shown.len(), 5, "{shown:#?}");
        assert!(shown[0].starts_with("a:2: \"banana\""), "{shown:#?}");
        assert!(
            shown[1].starts_with("a:3: 10.1.2.3/8 has host bits set"),
            "{shown:#?}"
        );
        assert!(
            shown[2].starts_with("a:4: range 10.0.0.9-10.0.0.1 runs backwards"),
            "{shown:#?}"
        );
        assert!(
            shown[3].starts_with("b.gz:1: 2001:db8::1/32 has host bits set"),
            "{shown:#?}"
        );
        assert!(
            shown[4].contains("10.0.0.0/8 is listed both as deny (")
                && shown[4].contains("a:1")
                && shown[4].contains("b.gz:2"),
            "{shown:#?}"
        );
        assert!(!report.valid);
        assert_eq!(report.files[0].lines, 4);
        let text = render_text(&report);
        assert!(text.contains("INVALID: 5 errors"), "{text}");
    }

    #[test]
    fn a_truncated_gzip_and_a_50_mb_line_are_errors_not_memory() {
        let mut cut = gz(b"10.0.0.0/8\n192.0.2.0/24\n");
        cut.truncate(cut.len() - 10);
        let mut huge = b"192.0.2.0/24\n".to_vec();
        huge.extend(std::iter::repeat_n(b'1', 50 << 20));
        huge.extend(b"\n198.51.100.0/24\n");
        let dir = dir_with(&[("cut.gz", &cut), ("huge", &huge)]);
        let report = check(&[dir.path().to_path_buf()], &Limits::default());
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        assert!(
            report.errors[0]
                .file
                .as_deref()
                .unwrap()
                .ends_with("cut.gz")
                && report.errors[0].line.is_none()
        );
        assert_eq!(report.errors[1].line, Some(2));
        assert!(
            report.errors[1]
                .message
                .contains("a line longer than 65536 bytes")
        );
        // The lines after the long one are still read.
        assert_eq!(report.files[1].lines, 3);
        assert_eq!(report.rules.ipv4.deny, 2 + 1);
    }

    #[test]
    fn over_the_byte_budget_stops() {
        let dir = dir_with(&[("bomb.gz", &gz("1.2.3.4\n".repeat(300_000).as_bytes()))]);
        let limits = Limits {
            max_bytes: 1 << 20,
            ..Limits::default()
        };
        let report = check(&[dir.path().to_path_buf()], &limits);
        assert!(
            report.errors[0].message.contains("--max-rules-bytes"),
            "{:?}",
            report.errors
        );
    }

    #[test]
    fn missing_path_is_an_error() {
        let report = check(&[PathBuf::from("/nonexistent/rules")], &Limits::default());
        assert!(!report.valid);
        assert!(
            report.errors[0]
                .to_string()
                .starts_with("/nonexistent/rules: ")
        );
    }
}
