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

trait Bits: Address {
    fn wide(self) -> u128;
}

impl Bits for u32 {
    fn wide(self) -> u128 {
        self.into()
    }
}

impl Bits for u128 {
    fn wide(self) -> u128 {
        self
    }
}

/// The rules of block `base/len` (sorted `entries`, all inside it): one chunk if they
/// fit, else the two halves. `estimate`: the gzip size the parent's suggests; far over
/// the limit, the block is split without compressing it (each level would otherwise
/// compress everything once more).
fn split<A: Bits>(
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
    let mid = entries.partition_point(|e| e.addr.wide() < half);
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
        other => Some(other.to_string()),
    }
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
