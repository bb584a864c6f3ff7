//! The repo's Kubernetes manifests (conf/) as the packaging tests read them: rendered
//! with `kubectl kustomize`, YAML turned into JSON, and a container's env and a
//! ConfigMap's files built from them the way the kubelet builds them.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{run_command, run_with_input};

/// The venv tests/setup.sh installs the offline validators (and PyYAML) into.
pub const VENV: &str = "/opt/egress-deny-venv/bin";

/// The repo's conf/ directory.
pub fn conf() -> PathBuf {
    // Canonical: checkov mishandles paths with "..".
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conf")
        .canonicalize()
        .expect("conf/")
}

/// [`run_with_input`], its stdout as text.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<String> {
    Ok(String::from_utf8_lossy(&run_with_input(cmd, input)?).into_owned())
}

/// YAML → JSON through the venv's PyYAML (a checkov dependency): one value per document.
pub fn yaml(text: &str) -> Result<Vec<Value>> {
    let script = "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))";
    let out = run_with_stdin(
        Command::new(format!("{VENV}/python3")).args(["-c", script]),
        text.as_bytes(),
    )?;
    Ok(serde_json::from_str(&out)?)
}

/// [`yaml`] of a file.
pub fn yaml_file(path: &Path) -> Result<Vec<Value>> {
    yaml(&std::fs::read_to_string(path)?)
}

/// `kubectl kustomize` (kubectl ships with this machine kind; Debian's kubernetes-client
/// 1.20 is too old for the `patches` field).
pub fn render(dir: &Path) -> Result<String> {
    run_command(Command::new("kubectl").arg("kustomize").arg(dir))
}

/// The base kustomization: what a cluster applies.
pub fn base_dir() -> PathBuf {
    conf().join("kubernetes")
}

/// The overlay that ships big rule lists as gzip ConfigMaps.
pub fn large_lists_dir() -> PathBuf {
    conf().join("examples/large-lists")
}

/// The Job that removes egress-deny from a node.
pub fn uninstall_job() -> PathBuf {
    base_dir().join("uninstall-job.yaml")
}

/// The document of this kind and name.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

pub fn configmap_files(cm: &Value) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for (key, value) in cm["data"].as_object().into_iter().flatten() {
        files.push((
            key.clone(),
            value.as_str().context("data")?.as_bytes().to_vec(),
        ));
    }
    for (key, value) in cm["binaryData"].as_object().into_iter().flatten() {
        let text: String = value
            .as_str()
            .context("binaryData")?
            .split_whitespace()
            .collect();
        let bytes = crate::base64_decode(&text)?;
        files.push((key.clone(), bytes));
    }
    Ok(files)
}

/// The env of a container as the kubelet builds it: `envFrom` ConfigMaps, then `env`.
pub fn container_env(container: &Value, docs: &[Value]) -> Result<Vec<(String, String)>> {
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"]
            .as_str()
            .context("only configMapRef envFrom is emulated")?;
        let cm = find(docs, "ConfigMap", name)?;
        for (k, v) in cm["data"].as_object().into_iter().flatten() {
            env.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        env.insert(
            var["name"].as_str().context("env name")?.to_owned(),
            var["value"]
                .as_str()
                .context("only literal env is emulated")?
                .to_owned(),
        );
    }
    Ok(env.into_iter().collect())
}

/// The metrics port the daemon listens on (`EGRESS_DENY_LISTEN`).
pub fn listen_port(env: &[(String, String)]) -> Result<u16> {
    let listen = &env
        .iter()
        .find(|(k, _)| k == "EGRESS_DENY_LISTEN")
        .context("EGRESS_DENY_LISTEN")?
        .1;
    Ok(listen.rsplit_once(':').context("listen")?.1.parse()?)
}

/// A Kubernetes memory quantity in bytes (the suffixes the manifests use).
pub fn quantity(q: &str) -> Result<u64> {
    let (number, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = number.parse()?;
    Ok(n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => bail!("quantity {q}"),
    })
}

/// The rendered base kustomization (conf/kubernetes), one value per document.
pub fn rendered_base() -> Result<Vec<Value>> {
    yaml(&render(&base_dir())?)
}
