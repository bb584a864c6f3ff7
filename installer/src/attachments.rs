//! The live attachments (pods from their records, host interfaces from theirs and from
//! pins older versions left without one), as `status`, `lookup`, `/metrics` and the
//! deny-event log name them.
use std::fmt;

use egress_deny_datapath::{
    attach,
    paths::{PinLayout, StateLayout, host_link_ifname},
    records::{AttachmentRecord, HostRecord},
};

/// What an attachment filters: a pod's veth (ingress, the pod's egress) or a host
/// interface (egress, the node's own traffic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachmentKind {
    Pod,
    Host,
}

impl AttachmentKind {
    pub const ALL: [Self; 2] = [Self::Pod, Self::Host];
}

/// The one text of a kind: `status` lines, `lookup`, and the `kind` label of `/metrics`.
impl fmt::Display for AttachmentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pod => "pod",
            Self::Host => "host",
        })
    }
}

/// One live attachment, as `status` and `/metrics` show it.
#[derive(Clone, Debug)]
pub struct LiveAttachment {
    pub kind: AttachmentKind,
    pub ifname: String,
    pub ifindex: u32,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub container_id: Option<String>,
}

/// The one text of an attachment, for people (`status`, `lookup`, the deny-event log):
/// `pod NAMESPACE/NAME (IFNAME)`, `container ID (IFNAME)` for a pod without Kubernetes
/// names, `host IFNAME`.
impl fmt::Display for LiveAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.pod_namespace, &self.pod_name, &self.container_id) {
            (Some(ns), Some(pod), _) => write!(f, "pod {ns}/{pod} ({})", self.ifname),
            (_, _, Some(container)) => write!(f, "container {container} ({})", self.ifname),
            _ => write!(f, "{} {}", self.kind, self.ifname),
        }
    }
}

impl LiveAttachment {
    fn host(ifname: String, ifindex: u32) -> Self {
        Self {
            kind: AttachmentKind::Host,
            ifname,
            ifindex,
            pod_namespace: None,
            pod_name: None,
            container_id: None,
        }
    }
}

/// Every attachment of the node now, pods first.
pub fn attachments(layout: &PinLayout, state: &StateLayout) -> Vec<LiveAttachment> {
    let mut out = Vec::new();
    for (_, r) in AttachmentRecord::list(state).unwrap_or_default() {
        out.push(LiveAttachment {
            kind: AttachmentKind::Pod,
            ifname: r.host_ifname,
            ifindex: r.host_ifindex,
            pod_namespace: r.pod_namespace,
            pod_name: r.pod_name,
            container_id: Some(r.container_id),
        });
    }
    // Host attachments: recorded (any mode), then pins of older versions without one.
    let recorded = HostRecord::list(state);
    for (_, r) in &recorded {
        out.push(LiveAttachment::host(r.ifname.clone(), r.ifindex));
    }
    if let Ok(entries) = std::fs::read_dir(layout.links_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(ifname) = host_link_ifname(&name) else {
                continue;
            };
            if recorded.iter().any(|(_, r)| r.ifname == ifname) {
                continue;
            }
            let ifindex = attach::pinned_link_state(&entry.path())
                .ok()
                .flatten()
                .map(|s| s.ifindex)
                .unwrap_or(0);
            out.push(LiveAttachment::host(ifname, ifindex));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attachment_reads_the_same_everywhere() {
        let mut pod = LiveAttachment {
            kind: AttachmentKind::Pod,
            ifname: "veth1a2b".into(),
            ifindex: 7,
            pod_namespace: Some("shop".into()),
            pod_name: Some("cart-0".into()),
            container_id: Some("c0ffee".into()),
        };
        assert_eq!(pod.to_string(), "pod shop/cart-0 (veth1a2b)");
        pod.pod_namespace = None;
        assert_eq!(pod.to_string(), "container c0ffee (veth1a2b)");
        assert_eq!(
            LiveAttachment::host("eth0".into(), 2).to_string(),
            "host eth0"
        );
    }
}
