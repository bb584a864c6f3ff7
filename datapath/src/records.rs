//! Attachment records: one JSON file per pod attachment, written by the plugin on ADD
//! and removed on DEL, read by the installer for metrics, repair and cleanup.
//! Written atomically (temp file, fsync, rename) so a reader never sees half a record.
use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    paths::StateLayout,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRecord {
    pub container_id: String,
    /// CNI_IFNAME inside the pod.
    pub ifname: String,
    pub netns: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The pod's host-side veth, where the program is attached (tc ingress).
    pub host_ifname: String,
    pub host_ifindex: u32,
    /// "tcx" or "netlink".
    pub mode: String,
    /// Pinned TCX link (empty in netlink mode).
    #[serde(default)]
    pub link_pin: String,
    pub program_id: u32,
    /// Seconds since the Unix epoch.
    pub attached_at: u64,
}

/// Who a pod attachment belongs to (from CNI: container, interface, netns, K8S_* args).
#[derive(Clone, Debug, Default)]
pub struct PodIdentity {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

impl AttachmentRecord {
    /// The record of a fresh attachment of `pod` on its host veth.
    pub fn new(
        pod: PodIdentity,
        host: &crate::veth::HostVeth,
        attachment: &crate::attach::Attachment,
        link_pin: &Path,
    ) -> Self {
        let tcx = attachment.mode == crate::attach::AttachMode::Tcx;
        Self {
            container_id: pod.container_id,
            ifname: pod.ifname,
            netns: pod.netns,
            pod_namespace: pod.pod_namespace,
            pod_name: pod.pod_name,
            host_ifname: host.ifname.clone(),
            host_ifindex: host.ifindex,
            mode: attachment.mode.as_str().to_owned(),
            link_pin: if tcx {
                link_pin.display().to_string()
            } else {
                String::new()
            },
            program_id: attachment.program_id,
            attached_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    pub fn write(&self, state: &StateLayout) -> Result<PathBuf> {
        let path = state.attachment_record(&self.container_id, &self.ifname);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Invalid(format!("serializing attachment record: {e}")))?;
        write_atomically(&path, &json)?;
        Ok(path)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes =
            fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    /// Removes the record; already gone is fine.
    pub fn remove(state: &StateLayout, container_id: &str, ifname: &str) -> Result<()> {
        let path = state.attachment_record(container_id, ifname);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Every readable record; unreadable ones are logged and skipped.
    pub fn list(state: &StateLayout) -> Result<Vec<(PathBuf, Self)>> {
        let dir = state.attachments_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match Self::read(&path) {
                Ok(record) => out.push((path, record)),
                Err(e) => log::warn!("skipping attachment record: {e}"),
            }
        }
        Ok(out)
    }
}

/// Temp file in the same directory, fsync, rename, fsync the directory: readers see the
/// old or the new content, never a partial or empty file.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("writing {}", path.display()), e)
    })
}
