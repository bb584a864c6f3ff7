//! Our entry in the node's CNI configuration. Picks the file the runtime uses (the
//! lexically first `.conflist`/`.conf`/`.json`, exactly as libcni's `ConfFiles` lists
//! them), turns a single-plugin `.conf` into a `.conflist`, appends our entry once,
//! keeps every other plugin's configuration as it is, and writes atomically (temp file,
//! fsync, rename) with the replaced file's mode and owner: never a partial or empty file.
//!
//! A primary that rewrites its `.conf` makes that file sort first again (`x.conf` <
//! `x.conflist`): until we convert it again, a runtime that reloads on the change runs
//! new pods without us. The daemon reacts to the conf dir's inotify events at once, so
//! that window is the time of one `ensure` (about a millisecond), not a debounce.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use egress_deny_datapath::records::write_atomically_like;
use serde_json::{Map, Value, json};

pub const PLUGIN_TYPE: &str = "egress-deny";
/// Where a converted `.conf` goes when `<stem>.conflist` belongs to another component.
/// `-` sorts before `.`, so this name sorts before its source and before
/// `<stem>.conflist`: the runtime picks it, and a rewritten source never shows.
const CONVERTED_ELSEWHERE: &str = "-egress-deny.conflist";
/// Appended to a converted `.conf`'s name to keep it out of the runtime's view (not a
/// configuration extension).
const ASIDE: &str = ".egress-deny-orig";
const EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("no CNI configuration in {0} yet")]
    NoPrimary(PathBuf),
    #[error("{}: not valid JSON, left alone: {message}", path.display())]
    Malformed { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{}: cannot convert it to a .conflist: {} belong to another component and are left alone",
        source_file.display(),
        occupied.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ")
    )]
    Occupied {
        source_file: PathBuf,
        occupied: Vec<PathBuf>,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] egress_deny_datapath::Error),
}

impl ConflistError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// What our entry carries: only non-default values are written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub pin_dir: Option<String>,
    pub state_dir: Option<String>,
    pub exclude_namespaces: Vec<String>,
}

impl Entry {
    pub fn to_json(&self) -> Value {
        let mut entry = Map::new();
        entry.insert("type".into(), json!(PLUGIN_TYPE));
        if let Some(pin_dir) = &self.pin_dir {
            entry.insert("pinDir".into(), json!(pin_dir));
        }
        if let Some(state_dir) = &self.state_dir {
            entry.insert("stateDir".into(), json!(state_dir));
        }
        if !self.exclude_namespaces.is_empty() {
            entry.insert("excludeNamespaces".into(), json!(self.exclude_namespaces));
        }
        Value::Object(entry)
    }
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
}

/// Go's `filepath.Ext`: from the last dot, so `.conf` alone and hidden files count.
fn extension(name: &str) -> &str {
    name.rfind('.').map_or("", |i| &name[i..])
}

/// CNI configuration files in the order runtimes consider them: libcni's `ConfFiles`
/// (every non-directory entry with one of the extensions, hidden ones included, by
/// `lstat`) sorted bytewise, as containerd and CRI-O sort them.
pub fn config_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.path())
        .filter(|p| EXTENSIONS.contains(&extension(file_name(p))))
        .collect();
    files.sort();
    Ok(files)
}

pub fn primary(dir: &Path) -> Result<PathBuf, ConflistError> {
    config_files(dir)
        .map_err(|e| ConflistError::io(format!("listing {}", dir.display()), e))?
        .into_iter()
        .next()
        .ok_or_else(|| ConflistError::NoPrimary(dir.to_path_buf()))
}

fn read(path: &Path) -> Result<(Vec<u8>, fs::Metadata), ConflistError> {
    let context = || format!("reading {}", path.display());
    let mut file = fs::File::open(path).map_err(|e| ConflistError::io(context(), e))?;
    let meta = file
        .metadata()
        .map_err(|e| ConflistError::io(context(), e))?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| ConflistError::io(context(), e))?;
    Ok((bytes, meta))
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Value, ConflistError> {
    serde_json::from_slice(bytes).map_err(|e| ConflistError::Malformed {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn read_json(path: &Path) -> Result<Value, ConflistError> {
    let (bytes, _) = read(path)?;
    parse(path, &bytes)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn has_our_entry(doc: &Value) -> bool {
    doc.get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|p| p.iter().any(is_ours))
}

/// Outcome of one `ensure` pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Ensured {
    AlreadyPresent(PathBuf),
    Written(PathBuf),
}

/// Makes sure the configuration the runtime picks ends with our entry.
pub fn ensure(dir: &Path, entry: &Entry) -> Result<Ensured, ConflistError> {
    let path = primary(dir)?;
    // A conversion we had to name so that it sorts before its source hides the
    // source's rewrites from the lexical pick: convert again when the source is back.
    if let Some(source) = source_of_converted_elsewhere(&path) {
        return convert(&source, entry);
    }
    // Runtimes load only `.conflist` files as lists (a `.conf` or `.json` is one plugin).
    // Decided by name, not content: a primary writing its `.conf` in place is caught
    // empty or half-written, and that must not delay moving it out of the way.
    if extension(file_name(&path)) != ".conflist" {
        return convert(&path, entry);
    }
    let (bytes, meta) = read(&path)?;
    let doc = parse(&path, &bytes)?;
    // Our conversion, and the copy moved aside is as new or newer: a write that landed
    // after we moved it (or an update we could not finish) is still to be converted.
    if has_our_entry(&doc)
        && let Some(aside) = newer_aside(&path, &meta)
    {
        return refresh(&aside, &path, &bytes, entry);
    }
    let mut list = doc;
    if list.get("plugins").is_none() {
        return Err(ConflistError::Invalid {
            path,
            message: "a .conflist without \"plugins\"".into(),
        });
    }
    if !with_our_entry(&mut list, entry, &path, true)? {
        return Ok(Ensured::AlreadyPresent(path));
    }
    write_like(&path, &to_bytes(&list), &meta)?;
    Ok(Ensured::Written(path))
}

/// Puts our entry last, once, keeping keys others (or an operator) added to it.
/// Returns whether `list` changed (always true unless `may_skip`).
fn with_our_entry(
    list: &mut Value,
    entry: &Entry,
    path: &Path,
    may_skip: bool,
) -> Result<bool, ConflistError> {
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ConflistError::Invalid {
            path: path.to_path_buf(),
            message: "\"plugins\" is not a list".into(),
        })?;
    let wanted = entry.to_json();
    let ours: Vec<usize> = plugins
        .iter()
        .enumerate()
        .filter(|(_, p)| is_ours(p))
        .map(|(i, _)| i)
        .collect();
    let last = plugins.len().saturating_sub(1);
    if may_skip && ours == [last] && entry_matches(&plugins[last], &wanted) {
        return Ok(false);
    }
    let mut merged = ours
        .first()
        .map(|i| plugins[*i].clone())
        .unwrap_or_else(|| json!({}));
    for i in ours.iter().rev() {
        plugins.remove(*i);
    }
    if let (Some(m), Some(w)) = (merged.as_object_mut(), wanted.as_object()) {
        for key in ["pinDir", "stateDir", "excludeNamespaces"] {
            m.remove(key);
        }
        for (k, v) in w {
            m.insert(k.clone(), v.clone());
        }
    }
    plugins.push(merged);
    Ok(true)
}

fn to_bytes(list: &Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(list).expect("serializable");
    text.push(b'\n');
    text
}

/// The list a `.conf` (a single plugin: the same network as a one-element list)
/// becomes, our entry last.
fn converted(path: &Path, mut plugin: Value, entry: &Entry) -> Result<Vec<u8>, ConflistError> {
    let mut list = if plugin.get("plugins").is_some() {
        plugin
    } else {
        let obj = plugin
            .as_object_mut()
            .ok_or_else(|| ConflistError::Invalid {
                path: path.to_path_buf(),
                message: "not a JSON object".into(),
            })?;
        let version = obj.remove("cniVersion").unwrap_or(json!("1.0.0"));
        let name = obj.remove("name").unwrap_or(json!("k8s-pod-network"));
        json!({ "cniVersion": version, "name": name, "plugins": [plugin] })
    };
    with_our_entry(&mut list, entry, path, false)?;
    Ok(to_bytes(&list))
}

/// Replaces a `.conf` by a `.conflist` with our entry, and moves the `.conf` aside.
fn convert(source: &Path, entry: &Entry) -> Result<Ensured, ConflistError> {
    let target = conversion_target(source)?;
    let aside = aside_of(source);
    let move_aside = || match fs::rename(source, &aside) {
        Ok(()) => Ok(true),
        // Removed meanwhile: our list is what is left of the network.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ConflistError::io(
            format!("moving {} aside", source.display()),
            e,
        )),
    };
    if target.exists() {
        // Ours, from the previous revision: moved out of the way first, the source no
        // longer sorts before it, so the runtime goes straight from our old list to our
        // new one, never through the source without us (nor a half-written source).
        move_aside()?;
        let (current, _) = read(&target)?;
        refresh(&aside, &target, &current, entry)?;
        return Ok(Ensured::Written(target));
    }
    // The first conversion: our list first, so the runtime never picks whatever sorts
    // after the source meanwhile.
    let (bytes, meta) = read(source)?;
    let doc = parse(source, &bytes)?;
    write_like(&target, &converted(source, doc, entry)?, &meta)?;
    if move_aside()? {
        // A rewrite between our read and the rename was moved aside unseen.
        let (moved, _) = read(&aside)?;
        if moved != bytes {
            let (current, _) = read(&target)?;
            refresh(&aside, &target, &current, entry)?;
        }
    }
    Ok(Ensured::Written(target))
}

/// Brings our conversion `target` (now `current`) up to date with the `.conf` moved
/// `aside`, with that file's mode and owner.
fn refresh(
    aside: &Path,
    target: &Path,
    current: &[u8],
    entry: &Entry,
) -> Result<Ensured, ConflistError> {
    let (bytes, meta) = read(aside)?;
    // Truncated by a primary that writes in place and is not done: its close is an
    // event, and our list of the previous revision stands until then.
    if bytes.is_empty() {
        return Ok(Ensured::AlreadyPresent(target.to_path_buf()));
    }
    let wanted = converted(aside, parse(aside, &bytes)?, entry)?;
    if wanted == current {
        return Ok(Ensured::AlreadyPresent(target.to_path_buf()));
    }
    write_like(target, &wanted, &meta)?;
    Ok(Ensured::Written(target.to_path_buf()))
}

fn stem(name: &str) -> &str {
    &name[..name.len() - extension(name).len()]
}

fn aside_of(source: &Path) -> PathBuf {
    source.with_file_name(format!("{}{ASIDE}", file_name(source)))
}

/// The names earlier versions moved a `.conf`/`.json` aside under, and today's.
fn asides(source: &Path) -> [PathBuf; 2] {
    [
        aside_of(source),
        source.with_extension(format!("conf{ASIDE}")),
    ]
}

/// The `.conf`/`.json` a `<stem>-egress-deny.conflist` was converted from, if present.
fn source_of_converted_elsewhere(path: &Path) -> Option<PathBuf> {
    let stem = file_name(path).strip_suffix(CONVERTED_ELSEWHERE)?;
    [".conf", ".json"]
        .iter()
        .map(|ext| path.with_file_name(format!("{stem}{ext}")))
        .find(|p| fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()))
}

/// The copy of the source of our conversion `path` moved aside, when it was modified
/// at or after `path` (timestamps are as coarse as a jiffy: "at" counts, and `refresh`
/// then finds nothing to change).
fn newer_aside(path: &Path, meta: &fs::Metadata) -> Option<PathBuf> {
    let name = file_name(path);
    let stem = name
        .strip_suffix(CONVERTED_ELSEWHERE)
        .or_else(|| name.strip_suffix(".conflist"))?;
    let written = meta.modified().ok()?;
    [".conf", ".json"]
        .iter()
        .flat_map(|ext| asides(&path.with_file_name(format!("{stem}{ext}"))))
        .find(|aside| {
            fs::metadata(aside)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= written)
        })
}

/// `<stem>.conflist` unless another component owns a file of that name, then
/// `<stem>-egress-deny.conflist`. Ours to replace: a file with our entry that we
/// converted from this source before (its aside copy exists) or our own name.
fn conversion_target(source: &Path) -> Result<PathBuf, ConflistError> {
    let stem = stem(file_name(source));
    let usual = source.with_file_name(format!("{stem}.conflist"));
    let elsewhere = source.with_file_name(format!("{stem}{CONVERTED_ELSEWHERE}"));
    let converted_before = asides(source).iter().any(|p| p.exists());
    let mut occupied = Vec::new();
    for (candidate, ours_by_name) in [(usual, false), (elsewhere, true)] {
        match fs::symlink_metadata(&candidate) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(candidate),
            Err(e) => {
                return Err(ConflistError::io(
                    format!("checking {}", candidate.display()),
                    e,
                ));
            }
            Ok(m)
                if m.is_file()
                    && (ours_by_name || converted_before)
                    && read_json(&candidate).is_ok_and(|d| has_our_entry(&d)) =>
            {
                return Ok(candidate);
            }
            Ok(_) => occupied.push(candidate),
        }
    }
    Err(ConflistError::Occupied {
        source_file: source.to_path_buf(),
        occupied,
    })
}

/// Atomically, keeping `like`'s mode and owner (see `write_atomically_like`).
fn write_like(path: &Path, contents: &[u8], like: &fs::Metadata) -> Result<(), ConflistError> {
    Ok(write_atomically_like(path, contents, Some(like))?)
}

fn entry_matches(current: &Value, wanted: &Value) -> bool {
    ["pinDir", "stateDir", "excludeNamespaces"]
        .iter()
        .all(|k| current.get(k) == wanted.get(k))
}

/// Removes our entry from every configuration file in `dir` (uninstall).
pub fn remove(dir: &Path) -> Result<Vec<PathBuf>, ConflistError> {
    let mut changed = Vec::new();
    let files = config_files(dir)
        .map_err(|e| ConflistError::io(format!("listing {}", dir.display()), e))?;
    for path in files {
        let Ok((bytes, meta)) = read(&path) else {
            continue;
        };
        let Ok(mut doc) = parse(&path, &bytes) else {
            continue;
        };
        let Some(plugins) = doc.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            write_like(&path, &to_bytes(&doc), &meta)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Whether the configuration the runtime picks has our entry (readiness).
pub fn present(dir: &Path) -> bool {
    primary(dir)
        .ok()
        .and_then(|p| read_json(&p).ok())
        .is_some_and(|doc| has_our_entry(&doc))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const BRIDGE_CONF: &str = r#"{"cniVersion":"0.3.1","name":"k8s","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.1.0.0/16"},"zzz":1}"#;

    #[test]
    fn conf_becomes_conflist_with_our_entry_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("10-bridge.conf"), BRIDGE_CONF).unwrap();
        let entry = Entry::default();
        let target = match ensure(dir.path(), &entry).unwrap() {
            Ensured::Written(p) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(target, dir.path().join("10-bridge.conflist"));
        assert!(!dir.path().join("10-bridge.conf").exists());
        let doc: Value = serde_json::from_slice(&fs::read(&target).unwrap()).unwrap();
        assert_eq!(doc["cniVersion"], "0.3.1");
        assert_eq!(doc["name"], "k8s");
        assert_eq!(doc["plugins"][0]["bridge"], "cni0");
        assert_eq!(doc["plugins"][0]["zzz"], 1);
        assert_eq!(doc["plugins"][1], json!({"type": "egress-deny"}));
        assert_eq!(
            ensure(dir.path(), &entry).unwrap(),
            Ensured::AlreadyPresent(target.clone())
        );
        assert!(present(dir.path()));
        assert_eq!(remove(dir.path()).unwrap(), vec![target.clone()]);
        let doc: Value = serde_json::from_slice(&fs::read(&target).unwrap()).unwrap();
        assert_eq!(doc["plugins"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn non_default_dirs_are_written_and_updated() {
        let dir = tempfile::tempdir().unwrap();
        let list = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"},{"type":"egress-deny","custom":true}]}"#;
        fs::write(dir.path().join("05-x.conflist"), list).unwrap();
        let entry = Entry {
            pin_dir: Some("/sys/fs/bpf/x".into()),
            ..Default::default()
        };
        ensure(dir.path(), &entry).unwrap();
        let doc: Value =
            serde_json::from_slice(&fs::read(dir.path().join("05-x.conflist")).unwrap()).unwrap();
        assert_eq!(
            doc["plugins"][1],
            json!({"type": "egress-deny", "custom": true, "pinDir": "/sys/fs/bpf/x"})
        );
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn conversion_keeps_the_mode_and_never_overwrites_a_foreign_conflist() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("10-bridge.conf");
        fs::write(&conf, BRIDGE_CONF).unwrap();
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();
        let foreign = dir.path().join("10-bridge.conflist");
        let theirs = r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp"}]}"#;
        fs::write(&foreign, theirs).unwrap();
        let elsewhere = dir.path().join("10-bridge-egress-deny.conflist");
        assert_eq!(
            ensure(dir.path(), &Entry::default()).unwrap(),
            Ensured::Written(elsewhere.clone())
        );
        assert_eq!(fs::read_to_string(&foreign).unwrap(), theirs);
        assert_eq!(mode_of(&elsewhere), 0o600);
        assert_eq!(primary(dir.path()).unwrap(), elsewhere);
        assert!(present(dir.path()));

        // The primary writes its .conf again: converted again from it, still ours.
        fs::write(&conf, BRIDGE_CONF.replace("cni0", "cni1")).unwrap();
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            ensure(dir.path(), &Entry::default()).unwrap(),
            Ensured::Written(elsewhere.clone())
        );
        let doc: Value = serde_json::from_slice(&fs::read(&elsewhere).unwrap()).unwrap();
        assert_eq!(doc["plugins"][0]["bridge"], "cni1");
        assert_eq!(mode_of(&elsewhere), 0o640);
        assert!(!conf.exists());
        assert_eq!(fs::read_to_string(&foreign).unwrap(), theirs);

        // Both names taken by others: nothing is written, and it says why.
        fs::remove_file(&elsewhere).unwrap();
        fs::write(&elsewhere, theirs).unwrap();
        fs::write(&conf, BRIDGE_CONF).unwrap();
        assert!(matches!(
            ensure(dir.path(), &Entry::default()),
            Err(ConflistError::Occupied { .. })
        ));
        assert_eq!(fs::read_to_string(&foreign).unwrap(), theirs);
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), theirs);
    }

    #[test]
    fn a_rewritten_conf_is_moved_aside_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("10-bridge.conf");
        fs::write(&conf, BRIDGE_CONF).unwrap();
        let list = dir.path().join("10-bridge.conflist");
        ensure(dir.path(), &Entry::default()).unwrap();
        // Caught truncated by a primary writing in place: out of the way at once, our
        // list of the previous revision stays the pick.
        let before = fs::read(&list).unwrap();
        fs::write(&conf, "").unwrap();
        assert_eq!(
            ensure(dir.path(), &Entry::default()).unwrap(),
            Ensured::Written(list.clone())
        );
        assert!(!conf.exists());
        assert_eq!(fs::read(&list).unwrap(), before);
        // The primary finishes writing (into the moved file): converted on the next pass.
        let aside = dir.path().join("10-bridge.conf.egress-deny-orig");
        fs::write(&aside, BRIDGE_CONF.replace("cni0", "cni2")).unwrap();
        assert_eq!(
            ensure(dir.path(), &Entry::default()).unwrap(),
            Ensured::Written(list.clone())
        );
        let doc: Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
        assert_eq!(doc["plugins"][0]["bridge"], "cni2");
        assert_eq!(
            ensure(dir.path(), &Entry::default()).unwrap(),
            Ensured::AlreadyPresent(list)
        );
    }

    #[test]
    fn files_are_picked_as_libcni_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "20-b.conflist",
            ".10-hidden.conf",
            "05-x.conf.tmp",
            "00-dir.conf",
        ] {
            if name.starts_with("00") {
                fs::create_dir(dir.path().join(name)).unwrap();
            } else {
                fs::write(dir.path().join(name), "{}").unwrap();
            }
        }
        // Hidden files count (Go's ReadDir + filepath.Ext); directories and other
        // extensions do not.
        assert_eq!(
            config_files(dir.path()).unwrap(),
            vec![
                dir.path().join(".10-hidden.conf"),
                dir.path().join("20-b.conflist")
            ]
        );
    }

    #[test]
    fn malformed_primary_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("10-x.conflist"), "{ nope").unwrap();
        assert!(matches!(
            ensure(dir.path(), &Entry::default()),
            Err(ConflistError::Malformed { .. })
        ));
        assert_eq!(
            fs::read_to_string(dir.path().join("10-x.conflist")).unwrap(),
            "{ nope"
        );
    }
}
