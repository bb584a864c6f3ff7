//! Repair: pods that started while the plugin was not installed (or was missing) run
//! unfiltered. The runtime's CNI result cache lists every attachment it made; those of
//! networks that chain egress-deny, in namespaces that network does not exclude, and
//! that we have no record of, are attached now, without restarting the pod.
//! Attachments whose pod is gone are cleaned up.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use egress_deny_datapath::{
    attach::AttachMode,
    lifecycle,
    paths::{AttachmentId, DEFAULT_PIN_DIR, DEFAULT_STATE_DIR, PinLayout, StateLayout},
    records::{AttachmentRecord, PodIdentity},
    settings, veth,
};
use serde::Deserialize;
use serde_json::Value;

use crate::conflist::{PLUGIN_TYPE, config_files};

/// libcni's cache entry (`<cache dir>/results/<network>-<container>-<ifname>`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CachedResult {
    kind: String,
    container_id: String,
    if_name: String,
    #[serde(default)]
    network_name: String,
    /// The network configuration the runtime used (Go `[]byte`: base64).
    #[serde(default)]
    config: String,
    #[serde(default)]
    cni_args: Vec<(String, String)>,
    #[serde(default)]
    result: Value,
}

impl CachedResult {
    fn arg(&self, key: &str) -> Option<String> {
        self.cni_args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

/// What repair does with one cached attachment.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Attach in this mode; `exempt`: a pod of an excluded namespace, which gets the
    /// exempt program (marked, not judged) when the judged mark is on.
    Attach { mode: AttachMode, exempt: bool },
    /// Not ours to filter (the reason is logged once).
    Skip(String),
}

/// Our entry of the cached attachment's network: from the node's configuration as it
/// is now (a pod may predate our entry there, which the installer added since), else
/// from the configuration the runtime used (networks configured elsewhere, e.g. by a
/// meta-plugin). `None`: the network does not chain egress-deny.
fn network_entry(conf_dir: &Path, cached: &CachedResult) -> Option<Value> {
    let current = config_files(conf_dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|path| serde_json::from_slice::<Value>(&std::fs::read(path).ok()?).ok())
        .find(|conf| conf["name"] == cached.network_name.as_str());
    let conf = match current {
        Some(conf) => conf,
        None => serde_json::from_slice(&base64_decode(&cached.config)?).ok()?,
    };
    conf["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["type"] == PLUGIN_TYPE)
        .cloned()
}

/// Applies the network's own entry the way the plugin would have on ADD.
fn decide(
    layout: &PinLayout,
    state: &StateLayout,
    conf_dir: &Path,
    cached: &CachedResult,
) -> Decision {
    let network = &cached.network_name;
    let Some(entry) = network_entry(conf_dir, cached) else {
        return Decision::Skip(format!("network {network:?} does not chain {PLUGIN_TYPE}"));
    };
    let dir = |key: &str, default: &str| PathBuf::from(entry[key].as_str().unwrap_or(default));
    if dir("pinDir", DEFAULT_PIN_DIR) != layout.root()
        || dir("stateDir", DEFAULT_STATE_DIR) != state.root()
    {
        return Decision::Skip(format!(
            "network {network:?} uses another egress-deny installation (pinDir/stateDir)"
        ));
    }
    let excluded = cached.arg("K8S_POD_NAMESPACE").filter(|namespace| {
        entry["excludeNamespaces"]
            .as_array()
            .is_some_and(|list| list.iter().any(|n| *n == namespace.as_str()))
    });
    if let Some(namespace) = &excluded
        && !settings::read(layout).is_ok_and(|s| s.judged_mark != 0)
    {
        return Decision::Skip(format!(
            "namespace {namespace:?} is excluded on network {network:?}"
        ));
    }
    let mode = match entry["attachMode"].as_str() {
        None | Some("auto") => AttachMode::best_available(),
        Some(other) => match AttachMode::parse(other) {
            Some(mode) => mode,
            None => {
                return Decision::Skip(format!(
                    "network {network:?}: unknown attachMode {other:?}"
                ));
            }
        },
    };
    Decision::Attach {
        mode,
        exempt: excluded.is_some(),
    }
}

/// Attaches to pods the runtime's cache knows and we do not, on networks that chain
/// egress-deny. Returns what was repaired. A cached attachment that is skipped or
/// cannot be repaired is logged when that first happens (or changes), not every pass.
pub fn repair_from_cache(
    layout: &PinLayout,
    state: &StateLayout,
    cache_dir: &Path,
    conf_dir: &Path,
) -> Vec<String> {
    static NOTED: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);
    let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
    let noted = noted.get_or_insert_with(HashMap::new);
    let mut seen = Vec::new();
    let mut repaired = Vec::new();
    let Ok(entries) = std::fs::read_dir(cache_dir.join("results")) else {
        return repaired;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Ok(cached) = serde_json::from_slice::<CachedResult>(&bytes) else {
            continue;
        };
        if cached.kind != "cniCacheV1" {
            continue;
        }
        seen.push(path.clone());
        let id = AttachmentId::new(&cached.network_name, &cached.container_id, &cached.if_name);
        if AttachmentRecord::find(state, &id).is_some() {
            noted.remove(&path);
            continue;
        }
        // The pod side's sandbox (netns path) as the primary plugin reported it.
        let sandbox = cached.result["interfaces"].as_array().and_then(|list| {
            list.iter()
                .find(|i| {
                    i["name"] == cached.if_name.as_str()
                        && i["sandbox"].as_str().is_some_and(|s| !s.is_empty())
                })
                .and_then(|i| i["sandbox"].as_str())
                .map(str::to_owned)
        });
        let Some(netns) = sandbox else { continue };
        if !Path::new(&netns).exists() {
            continue; // pod gone; the runtime's own DEL/GC will clear its cache
        }
        let mode = match decide(layout, state, conf_dir, &cached) {
            Decision::Attach { mode, exempt } => (mode, exempt),
            Decision::Skip(why) => {
                if noted.get(&path) != Some(&why) {
                    log::info!("not repairing {id}: {why}");
                    noted.insert(path, why);
                }
                continue;
            }
        };
        match attach_pod(layout, state, &cached, &netns, mode.0, mode.1) {
            Ok(what) => {
                log::warn!(
                    "repaired: {what} was running without egress-deny (network {}); now {}",
                    cached.network_name,
                    if mode.1 {
                        "exempt (excluded namespace)"
                    } else {
                        "filtered"
                    }
                );
                noted.remove(&path);
                repaired.push(what);
            }
            Err(e) => {
                let why = format!("cannot repair {id}: {e}");
                if noted.get(&path) != Some(&why) {
                    log::warn!("{why}");
                    noted.insert(path, why);
                }
            }
        }
    }
    noted.retain(|path, _| seen.contains(path));
    repaired
}

/// Standard base64 with padding (Go's encoding of `[]byte` in JSON).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

fn attach_pod(
    layout: &PinLayout,
    state: &StateLayout,
    cached: &CachedResult,
    netns: &str,
    mode: AttachMode,
    exempt: bool,
) -> egress_deny_datapath::Result<String> {
    let host = veth::host_side(Path::new(netns), &cached.if_name)?;
    let pod = PodIdentity {
        network: cached.network_name.clone(),
        container_id: cached.container_id.clone(),
        ifname: cached.if_name.clone(),
        netns: netns.to_owned(),
        pod_namespace: cached.arg("K8S_POD_NAMESPACE"),
        pod_name: cached.arg("K8S_POD_NAME"),
    };
    let record = lifecycle::attach_pod(layout, state, pod, &host, mode, exempt)?;
    Ok(match (&record.pod_namespace, &record.pod_name) {
        (Some(ns), Some(name)) => format!("pod {ns}/{name} ({})", host.ifname),
        _ => format!("container {} ({})", cached.container_id, host.ifname),
    })
}

/// Removes records, pins and counters of attachments whose host veth is gone (the pod
/// was deleted without a DEL reaching us). Returns how many.
pub fn clean_up_vanished(layout: &PinLayout, state: &StateLayout) -> usize {
    lifecycle::clean_up_vanished(layout, state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_go_encodes_bytes() {
        for (text, plain) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("eyJuYW1lIjoiazhzIn0=", "{\"name\":\"k8s\"}"),
        ] {
            assert_eq!(
                base64_decode(text).as_deref(),
                Some(plain.as_bytes()),
                "{text}"
            );
        }
        assert_eq!(base64_decode("Z!=="), None);
    }

    fn cached(network: &str, namespace: &str, config: &Value) -> CachedResult {
        use std::fmt::Write;
        // Encode as Go does, to exercise the decoder on real input.
        let plain = serde_json::to_vec(config).unwrap();
        let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut encoded = String::new();
        for chunk in plain.chunks(3) {
            let mut n = 0u32;
            for (i, b) in chunk.iter().enumerate() {
                n |= u32::from(*b) << (16 - 8 * i);
            }
            for i in 0..4 {
                if i <= chunk.len() {
                    let _ = write!(
                        encoded,
                        "{}",
                        table[((n >> (18 - 6 * i)) & 63) as usize] as char
                    );
                } else {
                    encoded.push('=');
                }
            }
        }
        CachedResult {
            kind: "cniCacheV1".into(),
            container_id: "c1".into(),
            if_name: "eth0".into(),
            network_name: network.into(),
            config: encoded,
            cni_args: vec![("K8S_POD_NAMESPACE".into(), namespace.into())],
            result: Value::Null,
        }
    }

    #[test]
    fn decisions_follow_the_networks_own_entry() {
        let conf_dir =
            std::env::temp_dir().join(format!("egress-deny-repair-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&conf_dir);
        std::fs::create_dir_all(&conf_dir).unwrap();
        let layout = PinLayout::new("/sys/fs/bpf/x");
        let state = StateLayout::new("/run/x");
        let ours = serde_json::json!({ "type": "egress-deny", "pinDir": "/sys/fs/bpf/x",
            "stateDir": "/run/x", "excludeNamespaces": ["kube-system"], "attachMode": "netlink" });
        let chained = serde_json::json!({ "name": "k8s", "plugins": [{ "type": "bridge" }, ours] });
        let primary_only = serde_json::json!({ "name": "k8s", "plugins": [{ "type": "bridge" }] });
        let secondary = serde_json::json!({ "name": "side", "plugins": [{ "type": "ptp" }] });
        std::fs::write(conf_dir.join("20-side.conflist"), secondary.to_string()).unwrap();

        // The conflists ask for netlink mode; no pod is in an excluded namespace.
        let attach_with_netlink = || Decision::Attach {
            mode: AttachMode::Netlink,
            exempt: false,
        };
        // Only the cache knows network k8s: its cached config decides.
        let decide_for = |network, ns, config: &Value| {
            decide(&layout, &state, &conf_dir, &cached(network, ns, config))
        };
        assert_eq!(
            decide_for("k8s", "default", &chained),
            attach_with_netlink()
        );
        assert!(matches!(
            decide_for("k8s", "kube-system", &chained),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide_for("k8s", "default", &primary_only),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide_for("side", "default", &secondary),
            Decision::Skip(_)
        ));
        // The node's configuration now chains us (the pod predates that): it decides.
        std::fs::write(conf_dir.join("10-k8s.conflist"), chained.to_string()).unwrap();
        assert_eq!(
            decide_for("k8s", "default", &primary_only),
            attach_with_netlink()
        );
        assert!(matches!(
            decide_for("k8s", "kube-system", &primary_only),
            Decision::Skip(_)
        ));
        // Another installation's pin dir.
        let elsewhere = PinLayout::new("/sys/fs/bpf/y");
        assert!(matches!(
            decide(
                &elsewhere,
                &state,
                &conf_dir,
                &cached("k8s", "default", &chained)
            ),
            Decision::Skip(_)
        ));
        std::fs::remove_dir_all(&conf_dir).unwrap();
    }
}
