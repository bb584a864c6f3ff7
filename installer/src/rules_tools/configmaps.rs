//! `rules configmaps`: a rule set as gzip ConfigMaps under the API server's size limit,
//! plus the DaemonSet patch that mounts them all.
//!
//! Deterministic and stable under small edits. The input is normalised (the daemon's
//! parser: one prefix per line, sorted, duplicates dropped, ranges expanded), then each
//! family's address space is split in halves, recursively, until the rules in a block
//! gzip under the limit. A ConfigMap is named after its block (`feed-v4-10.0.0.0-8`):
//! an edit changes only the block it falls in (and, when that block crosses the limit,
//! splits it in two, or merges it back with its sibling), so `kubectl apply` updates a
//! few ConfigMaps and the daemons load a small difference. Chunking by line count
//! instead would shift every later chunk on one insertion. Blocks also give readable
//! names: which ConfigMap holds 10.x is in its name.
use std::io::Write;

use base64::Engine;
use egress_deny_datapath::rules::Action;
use serde_json::{Value, json};

use crate::rules::{Address, Entry, RuleSet};

/// Base64 of the gzip, per ConfigMap: 896 KiB, leaving 128 KiB of the API server's
/// 1 MiB request budget for metadata and the rest of the object.
pub const DEFAULT_MAX_BYTES: usize = 896 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigmapsError {
    #[error(
        "--name {0:?}: must be a lowercase DNS label (a-z, 0-9, '-', at most 40 characters: the block is appended)"
    )]
    BadName(String),
    #[error("--max-bytes {0}: too small to hold any block (at least 4096)")]
    TooSmall(usize),
}

/// One ConfigMap's worth: the rules of one address block, gzipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// `v4-10.0.0.0-8`: the block, in a form valid in a ConfigMap name and key.
    pub block: String,
    pub prefixes: usize,
    pub gzip: Vec<u8>,
}

/// Splits `rules` into chunks whose base64 gzip stays within `max_bytes`.
pub fn chunks(rules: &RuleSet, max_bytes: usize) -> Result<Vec<Chunk>, ConfigmapsError> {
    if max_bytes < 4096 {
        return Err(ConfigmapsError::TooSmall(max_bytes));
    }
    // Base64 turns 3 bytes into 4.
    let max_gzip = max_bytes / 4 * 3;
    let mut out = Vec::new();
    split(&rules.v4, 0, 0, 32, max_gzip, None, &mut out);
    split(&rules.v6, 0, 0, 128, max_gzip, None, &mut out);
    Ok(out)
}

/// The rules of block `base/len` (sorted `entries`, all inside it): one chunk if they
/// fit, else the two halves. `estimate`: the gzip size the parent's suggests; far over
/// the limit, the block is split without compressing it (each level would otherwise
/// compress everything once more).
fn split<A: Address>(
    entries: &[Entry<A>],
    base: u128,
    len: u8,
    bits: u8,
    max_gzip: usize,
    estimate: Option<usize>,
    out: &mut Vec<Chunk>,
) {
    if entries.is_empty() {
        return;
    }
    let text = render(entries);
    let gzip = match estimate {
        Some(e) if e > 2 * max_gzip && len < bits => None,
        _ => Some(gzip(&text)),
    };
    if let Some(gzip) = &gzip
        && (gzip.len() <= max_gzip || len == bits)
    {
        out.push(Chunk {
            block: block_name(base, len, bits),
            prefixes: entries.len(),
            gzip: gzip.clone(),
        });
        return;
    }
    let gz_len = gzip.map_or(estimate.unwrap_or(0), |g| g.len());
    let half = base | (1u128 << (bits - len - 1));
    let mid = entries.partition_point(|e| e.addr.widen() < half);
    for (part, start) in [(&entries[..mid], base), (&entries[mid..], half)] {
        let estimate = gz_len * part.len() / entries.len();
        split(part, start, len + 1, bits, max_gzip, Some(estimate), out);
    }
}

/// The normalised text of some rules: `CIDR` or `!CIDR`, one per line.
pub fn render<A: Address>(entries: &[Entry<A>]) -> Vec<u8> {
    let mut text = Vec::with_capacity(entries.len() * 16);
    for e in entries {
        if e.action == Action::Allow {
            text.push(b'!');
        }
        let _ = writeln!(text, "{}", e.addr.to_net(e.len));
    }
    text
}

/// Gzip with a fixed header (no name, mtime 0, OS "unknown") at the best level: the
/// same text gives the same bytes (flate2's default backend, miniz_oxide, is pure Rust
/// and deterministic).
pub fn gzip(text: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(text).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

/// `v4-10.0.0.0-8`, `v6-2001.db8.0.0.0.0.0.0-32`: DNS-subdomain-safe (no `:` or `/`).
fn block_name(base: u128, len: u8, bits: u8) -> String {
    if bits == 32 {
        format!("v4-{}-{len}", std::net::Ipv4Addr::from(base as u32))
    } else {
        let groups: Vec<String> = std::net::Ipv6Addr::from(base)
            .segments()
            .iter()
            .map(|g| format!("{g:x}"))
            .collect();
        format!("v6-{}-{len}", groups.join("."))
    }
}

fn valid_name(name: &str) -> bool {
    // The name becomes a label value too (at most 63), and carries a block of up to
    // ~50 characters in ConfigMap names (at most 253).
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

pub struct Manifests {
    pub configmaps: Vec<Value>,
    pub patch: Value,
}

/// The ConfigMaps for `chunks` and the DaemonSet patch that mounts them.
pub fn manifests(
    name: &str,
    namespace: &str,
    daemonset: &str,
    also_mount: &[String],
    chunks: &[Chunk],
) -> Result<Manifests, ConfigmapsError> {
    if !valid_name(name) {
        return Err(ConfigmapsError::BadName(name.to_owned()));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let configmaps: Vec<Value> = chunks
        .iter()
        .map(|c| {
            let cm = format!("{name}-{}", c.block);
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": cm,
                    "namespace": namespace,
                    "labels": {
                        "app.kubernetes.io/name": "egress-deny",
                        // `kubectl delete cm -l egress-deny/rule-set=NAME`, or
                        // `kubectl apply --prune -l ...`, removes blocks that went away.
                        "egress-deny/rule-set": name,
                    },
                    "annotations": {
                        "egress-deny/prefixes": c.prefixes.to_string(),
                    },
                },
                "binaryData": { format!("{cm}.txt.gz"): b64.encode(&c.gzip) },
            })
        })
        .collect();
    let sources: Vec<Value> = also_mount
        .iter()
        .filter(|n| !n.is_empty())
        .map(|n| n.as_str())
        .chain(
            configmaps
                .iter()
                .filter_map(|c| c["metadata"]["name"].as_str()),
        )
        .map(|n| json!({ "configMap": { "name": n } }))
        .collect();
    // A strategic-merge patch: `volumes` merge by name, and a projected volume's
    // `sources` list has no merge key, so it is replaced whole: blocks that went away
    // are unmounted too (JSON-patch `add`s would only ever accumulate).
    let patch = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": { "name": daemonset, "namespace": namespace },
        "spec": { "template": { "spec": { "volumes": [
            { "name": "rules", "projected": { "sources": sources } }
        ] } } },
    });
    Ok(Manifests { configmaps, patch })
}

/// YAML for the simple shape of these manifests (maps, lists, strings, numbers): every
/// string double-quoted in JSON syntax, which YAML reads as is, so there is no escaping
/// or plain-scalar ambiguity (`yes`, `0x10`, a leading `+`) to get wrong. serde_yaml is
/// unmaintained (archived 2024) and its forks are young; this shape does not need one.
pub fn to_yaml(docs: &[Value], header: &str) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
    }
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 || !header.is_empty() {
            out.push_str("---\n");
        }
        emit(doc, 0, &mut out);
    }
    out
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) if m.is_empty() => Some("{}".into()),
        Value::Array(a) if a.is_empty() => Some("[]".into()),
        Value::Object(_) | Value::Array(_) => None,
        Value::String(s) if plain(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Strings left unquoted for readability: a letter first (never a number, in YAML 1.1
/// or 1.2), then only name characters, and not one of YAML 1.1's booleans or null.
fn plain(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null"
        )
}

fn key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        && !k.starts_with(['-', '.'])
    {
        k.to_owned()
    } else {
        Value::from(k).to_string()
    }
}

fn emit(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match scalar(v) {
                    Some(s) => out.push_str(&format!("{pad}{}: {s}\n", key(k))),
                    None => {
                        out.push_str(&format!("{pad}{}:\n", key(k)));
                        emit(v, indent + 2, out);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match scalar(item) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        // The item's first line goes after the dash.
                        let mut inner = String::new();
                        emit(item, indent + 2, &mut inner);
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&inner[indent + 2..]);
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{other}\n")),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::atomic::AtomicBool};

    use super::*;
    use crate::rules::{self, Limits};

    /// A list like the published benchmark's mix (89% /32, 10% /24, 1% /16), some IPv6
    /// and exceptions.
    fn feed(n: usize, seed: u64) -> String {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut text = String::from("# a feed\n");
        for i in 0..n {
            let r = next();
            let a = std::net::Ipv4Addr::from((r >> 32) as u32);
            let line = match r % 100 {
                0..89 => format!("{a}"),
                89..99 => format!("{}/24", std::net::Ipv4Addr::from(u32::from(a) & !0xff)),
                _ => format!("{}/16", std::net::Ipv4Addr::from(u32::from(a) & !0xffff)),
            };
            text.push_str(&line);
            text.push('\n');
            if i % 50 == 0 {
                text.push_str(&format!("2001:db8:{:x}::/48\n", r & 0xffff));
            }
            if i % 97 == 0 {
                // /25s are never denied here: no deny-and-allow conflict.
                let net = std::net::Ipv4Addr::from(((r >> 32) as u32 & !0xff) | 0x80);
                text.push_str(&format!("!{net}/25 ; exception\n"));
            }
        }
        text
    }

    fn parse_text(text: &str) -> RuleSet {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("feed"), text).unwrap();
        let files = rules::rule_files(dir.path()).unwrap();
        rules::parse_files(&files, &Limits::default(), &AtomicBool::new(false))
            .unwrap()
            .rules
    }

    /// What kubelet does with a projected volume of these ConfigMaps: every binaryData
    /// key decoded into a timestamped directory, `..data` pointing at it, one symlink
    /// per key.
    fn kubelet_dir(configmaps: &[Value]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let stamp = dir.path().join("..2026_11_22_10_00_00.123");
        std::fs::create_dir(&stamp).unwrap();
        for cm in configmaps {
            for (key, value) in cm["binaryData"].as_object().unwrap() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(value.as_str().unwrap())
                    .unwrap();
                std::fs::write(stamp.join(key), bytes).unwrap();
                std::os::unix::fs::symlink(format!("..data/{key}"), dir.path().join(key)).unwrap();
            }
        }
        std::os::unix::fs::symlink("..2026_11_22_10_00_00.123", dir.path().join("..data")).unwrap();
        dir
    }

    fn generate(rules: &RuleSet, max: usize) -> Vec<Value> {
        let chunks = chunks(rules, max).unwrap();
        manifests(
            "feed",
            "kube-system",
            "egress-deny",
            &["egress-deny-rules".into()],
            &chunks,
        )
        .unwrap()
        .configmaps
    }

    #[test]
    fn round_trip_through_a_kubelet_rules_dir_gives_the_same_rule_set() {
        let input = parse_text(&feed(60_000, 7));
        let max = 64 * 1024;
        let configmaps = generate(&input, max);
        assert!(configmaps.len() >= 4, "{}", configmaps.len());
        for cm in &configmaps {
            for v in cm["binaryData"].as_object().unwrap().values() {
                assert!(v.as_str().unwrap().len() <= max);
            }
        }
        let dir = kubelet_dir(&configmaps);
        let files = rules::rule_files(dir.path()).unwrap();
        assert_eq!(files.len(), configmaps.len());
        let back = rules::parse_files(&files, &Limits::default(), &AtomicBool::new(false)).unwrap();
        assert_eq!(back.rules, input);
        assert!(input.counts().v4_allow > 0 && input.counts().v6_deny > 0);
    }

    #[test]
    fn the_same_input_gives_byte_identical_output() {
        // Different order, duplicates, comments: the same rule set, the same bytes.
        let text = feed(5_000, 3);
        let mut lines: Vec<&str> = text.lines().collect();
        lines.reverse();
        let shuffled = lines.join("\n") + "\n# another comment\n" + &lines[..100].join("\n");
        let a = to_yaml(&generate(&parse_text(&text), 8192), "h");
        let b = to_yaml(&generate(&parse_text(&shuffled), 8192), "h");
        assert_eq!(a, b);
        // The gzip header carries no time or name.
        let g = gzip(b"10.0.0.0/8\n");
        assert_eq!(&g[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
    }

    /// One prefix added and one removed: only the ConfigMaps of their blocks change.
    #[test]
    fn a_small_change_changes_few_configmaps() {
        let text = feed(60_000, 11);
        let before = generate(&parse_text(&text), 32 * 1024);
        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(30_000);
        let edited = lines.join("\n") + "\n203.0.113.77\n";
        let after = generate(&parse_text(&edited), 32 * 1024);
        let by_name = |cms: &[Value]| -> BTreeMap<String, Value> {
            cms.iter()
                .map(|c| {
                    (
                        c["metadata"]["name"].as_str().unwrap().to_owned(),
                        c.clone(),
                    )
                })
                .collect()
        };
        let (b, a) = (by_name(&before), by_name(&after));
        let changed = b.iter().filter(|(n, c)| a.get(*n) != Some(c)).count()
            + a.keys().filter(|n| !b.contains_key(*n)).count();
        assert!(b.len() >= 10, "{}", b.len());
        assert!(
            (1..=4).contains(&changed),
            "{changed} of {} ConfigMaps changed",
            b.len()
        );
    }

    #[test]
    fn names_and_the_patch() {
        let rules = parse_text("10.0.0.0/8\n2001:db8::/32\n");
        let chunks = chunks(&rules, DEFAULT_MAX_BYTES).unwrap();
        let m = manifests(
            "feed",
            "ns",
            "egress-deny",
            &["local".into(), String::new()],
            &chunks,
        )
        .unwrap();
        let names: Vec<&str> = m
            .configmaps
            .iter()
            .map(|c| c["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["feed-v4-0.0.0.0-0", "feed-v6-0.0.0.0.0.0.0.0-0"]);
        let sources = &m.patch["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"];
        assert_eq!(sources.as_array().unwrap().len(), 3);
        assert_eq!(sources[0]["configMap"]["name"], "local");
        assert!(manifests("Feed", "ns", "ds", &[], &chunks).is_err());
        assert!(manifests("feed-", "ns", "ds", &[], &chunks).is_err());
        assert!(super::chunks(&rules, 100).is_err());
        assert_eq!(
            block_name(0x2001_0db8 << 96, 32, 128),
            "v6-2001.db8.0.0.0.0.0.0-32"
        );
        assert_eq!(block_name(0x0a00_0000, 8, 32), "v4-10.0.0.0-8");
    }

    #[test]
    fn yaml_quotes_what_would_not_read_back_as_a_string() {
        let doc = json!({"a": "v1", "b": "10", "c": "yes", "d": "1e5", "e": "x: y", "f": [], "g": {"h": [{"i": 1, "j": "k"}]}, "l": "+AB/="});
        let y = to_yaml(&[doc], "");
        assert_eq!(
            y,
            "a: v1\nb: \"10\"\nc: \"yes\"\nd: \"1e5\"\ne: \"x: y\"\nf: []\ng:\n  h:\n    - i: 1\n      j: k\nl: \"+AB/=\"\n"
        );
    }
}
