//! Parsing a set of rule files: a reader thread cuts the files into blocks at line
//! boundaries, a few parser threads parse the blocks (streaming: memory stays at a few
//! blocks whatever the size of the files), and the results are merged into one sorted,
//! deduplicated [`RuleSet`] — or the first error in file and line order.
use std::{
    io::{self, Read},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
};

use egress_deny_datapath::rules::Action;
use ipnet::IpNet;

use super::{
    Address, Entry, FamilyEntry, Limits, Parsed, RuleSet, RulesError, UTF8_BOM,
    files::{for_each_line, open, shown},
    parse::{Rule, fast_line, parse_rule, split_rule},
    sort_dedup,
};
#[cfg(test)]
use {super::rule_files, std::path::Path};

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
    match FamilyEntry::new(net, action) {
        FamilyEntry::V4(e) => out.v4.push(e),
        FamilyEntry::V6(e) => out.v6.push(e),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::rules::{
        DEFAULT_MAX_LINE, parse_dir, rule_files,
        tests::{dir_with, gz},
    };

    #[test]
    fn errors_name_file_and_line() {
        let error =
            |files: &[(&str, &[u8])]| parse_dir(dir_with(files).path()).unwrap_err().to_string();
        let err = error(&[("rules", b"10.0.0.0/8\n\n10.1.2.3/8\n")]);
        assert!(
            err.ends_with("rules:3: 10.1.2.3/8 has host bits set (did you mean 10.0.0.0/8?)"),
            "{err}"
        );
        assert!(error(&[("x", b"1.2.3.4\nbanana\n")]).contains("x:2: \"banana\""));
        let dir = dir_with(&[("x", b"1.2.3.0/33\n")]);
        assert!(parse_dir(dir.path()).is_err());
        let err = error(&[("x", b"1.2.3.4\n"), ("y", b"\xff\xfe\n")]);
        assert!(err.contains("y:1: not valid UTF-8"), "{err}");
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
