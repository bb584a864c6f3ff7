//! Repair: pods that started while the plugin was not installed (or was missing) run
//! unfiltered. The runtime's CNI result cache lists every attachment it made; those we
//! have no record of are attached now, without restarting the pod. Attachments whose
//! pod is gone are cleaned up.
use std::path::Path;

use egress_deny_datapath::{
    attach::AttachMode,
    lifecycle,
    paths::{AttachmentId, PinLayout, StateLayout},
    records::{AttachmentRecord, PodIdentity},
    veth,
};
use serde::Deserialize;

/// libcni's cache entry (`<cache dir>/results/<network>-<container>-<ifname>`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CachedResult {
    kind: String,
    container_id: String,
    if_name: String,
    #[serde(default)]
    network_name: String,
    #[serde(default)]
    cni_args: Vec<(String, String)>,
    #[serde(default)]
    result: serde_json::Value,
}

/// Attaches to pods the runtime's cache knows and we do not. Returns what was repaired.
pub fn repair_from_cache(layout: &PinLayout, state: &StateLayout, cache_dir: &Path) -> Vec<String> {
    let mut repaired = Vec::new();
    let Ok(entries) = std::fs::read_dir(cache_dir.join("results")) else {
        return repaired;
    };
    for entry in entries.flatten() {
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let Ok(cached) = serde_json::from_slice::<CachedResult>(&bytes) else {
            continue;
        };
        if cached.kind != "cniCacheV1" {
            continue;
        }
        let id = AttachmentId::new(&cached.network_name, &cached.container_id, &cached.if_name);
        if AttachmentRecord::find(state, &id).is_some() {
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
        match attach_pod(layout, state, &cached, &netns) {
            Ok(what) => {
                log::warn!(
                    "repaired: {what} was running unfiltered (network {}); now filtered",
                    cached.network_name
                );
                repaired.push(what);
            }
            Err(e) => log::warn!("cannot repair container {}: {e}", cached.container_id),
        }
    }
    repaired
}

fn attach_pod(
    layout: &PinLayout,
    state: &StateLayout,
    cached: &CachedResult,
    netns: &str,
) -> egress_deny_datapath::Result<String> {
    let host = veth::host_side(Path::new(netns), &cached.if_name)?;
    let arg = |key: &str| {
        cached
            .cni_args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let pod = PodIdentity {
        network: cached.network_name.clone(),
        container_id: cached.container_id.clone(),
        ifname: cached.if_name.clone(),
        netns: netns.to_owned(),
        pod_namespace: arg("K8S_POD_NAMESPACE"),
        pod_name: arg("K8S_POD_NAME"),
    };
    let record = lifecycle::attach_pod(layout, state, pod, &host, AttachMode::best_available())?;
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
