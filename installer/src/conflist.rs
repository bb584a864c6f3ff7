//! Our entry in the node's CNI configuration. Picks the file the runtime uses (the
//! lexically first `.conflist`/`.conf`/`.json`), turns a single-plugin `.conf` into a
//! `.conflist`, appends our entry once, keeps every other plugin's configuration as it
//! is, and writes atomically (temp file, fsync, rename): never a partial or empty file.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use egress_deny_datapath::records::write_atomically;
use serde_json::{Map, Value, json};

pub const PLUGIN_TYPE: &str = "egress-deny";

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("no CNI configuration in {0} yet")]
    NoPrimary(PathBuf),
    #[error("{}: not valid JSON, left alone: {message}", path.display())]
    Malformed { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] egress_deny_datapath::Error),
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

fn is_cni_config(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    !name.starts_with('.')
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("conflist" | "conf" | "json")
        )
}

/// CNI configuration files in the order runtimes consider them.
pub fn config_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_cni_config(p) && p.is_file())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    files.sort();
    Ok(files)
}

pub fn primary(dir: &Path) -> Result<PathBuf, ConflistError> {
    config_files(dir)
        .map_err(|source| ConflistError::Io {
            context: format!("listing {}", dir.display()),
            source,
        })?
        .into_iter()
        .next()
        .ok_or_else(|| ConflistError::NoPrimary(dir.to_path_buf()))
}

fn read_json(path: &Path) -> Result<Value, ConflistError> {
    let bytes = fs::read(path).map_err(|source| ConflistError::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ConflistError::Malformed {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Outcome of one `ensure` pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Ensured {
    AlreadyPresent(PathBuf),
    Written(PathBuf),
}

/// Makes sure the primary configuration ends with our entry.
pub fn ensure(dir: &Path, entry: &Entry) -> Result<Ensured, ConflistError> {
    let path = primary(dir)?;
    let doc = read_json(&path)?;
    let (target, mut list) = if doc.get("plugins").is_some() {
        (path.clone(), doc)
    } else {
        // A single-plugin .conf: the same network as a one-element list.
        let mut plugin = doc.clone();
        let obj = plugin
            .as_object_mut()
            .ok_or_else(|| ConflistError::Invalid {
                path: path.clone(),
                message: "not a JSON object".into(),
            })?;
        let version = obj.remove("cniVersion").unwrap_or(json!("1.0.0"));
        let name = obj.get("name").cloned().unwrap_or(json!("k8s-pod-network"));
        obj.remove("name");
        let list = json!({ "cniVersion": version, "name": name, "plugins": [plugin] });
        (path.with_extension("conflist"), list)
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ConflistError::Invalid {
            path: path.clone(),
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
    if target == path && ours == [last] && entry_matches(&plugins[last], &wanted) {
        return Ok(Ensured::AlreadyPresent(path));
    }
    // Keep keys others (or an operator) added to our entry; ours must be last and once.
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
    let mut text = serde_json::to_vec_pretty(&list).expect("serializable");
    text.push(b'\n');
    write_atomically(&target, &text)?;
    if target != path {
        // The .conf would still sort first; keep it aside, out of the runtime's view.
        let aside = path.with_extension("conf.egress-deny-orig");
        fs::rename(&path, &aside).map_err(|source| ConflistError::Io {
            context: format!("moving {} aside", path.display()),
            source,
        })?;
    }
    Ok(Ensured::Written(target))
}

fn entry_matches(current: &Value, wanted: &Value) -> bool {
    ["pinDir", "stateDir", "excludeNamespaces"]
        .iter()
        .all(|k| current.get(k) == wanted.get(k))
}

/// Removes our entry from every configuration file in `dir` (uninstall).
pub fn remove(dir: &Path) -> Result<Vec<PathBuf>, ConflistError> {
    let mut changed = Vec::new();
    let files = config_files(dir).map_err(|source| ConflistError::Io {
        context: format!("listing {}", dir.display()),
        source,
    })?;
    for path in files {
        let Ok(mut doc) = read_json(&path) else {
            continue;
        };
        let Some(plugins) = doc.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            let mut text = serde_json::to_vec_pretty(&doc).expect("serializable");
            text.push(b'\n');
            write_atomically(&path, &text)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Whether the primary configuration currently has our entry (readiness).
pub fn present(dir: &Path) -> bool {
    primary(dir)
        .ok()
        .and_then(|p| read_json(&p).ok())
        .and_then(|doc| {
            doc.get("plugins")
                .and_then(Value::as_array)
                .map(|p| p.iter().any(is_ours))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
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
