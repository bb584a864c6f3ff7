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
    attach::AttachMode,
    error::{Error, Result, is_missing, remove_if_present},
    paths::{AttachmentId, PinLayout, StateLayout},
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRecord {
    /// The CNI network (conflist `name`); `None` in records of versions before the
    /// network was part of the identity (named with the legacy scheme).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
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
    pub mode: AttachMode,
    /// Pinned TCX link (empty in netlink mode).
    #[serde(default)]
    pub link_pin: String,
    pub program_id: u32,
    /// A pod of an excluded namespace: runs the exempt program (marks, never judges).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exempt: bool,
    /// Seconds since the Unix epoch.
    pub attached_at: u64,
}

/// Who a pod attachment belongs to (from CNI: container, interface, netns, K8S_* args).
#[derive(Clone, Debug, Default)]
pub struct PodIdentity {
    /// The CNI network (conflist `name`).
    pub network: String,
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
        let tcx = attachment.mode == AttachMode::Tcx;
        Self {
            network: Some(pod.network),
            container_id: pod.container_id,
            ifname: pod.ifname,
            netns: pod.netns,
            pod_namespace: pod.pod_namespace,
            pod_name: pod.pod_name,
            host_ifname: host.ifname.clone(),
            host_ifindex: host.ifindex,
            mode: attachment.mode,
            link_pin: if tcx {
                link_pin.display().to_string()
            } else {
                String::new()
            },
            program_id: attachment.program_id,
            exempt: attachment.kind == crate::paths::ProgramKind::Exempt,
            attached_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// The identity the record is filed under; `None` for a legacy record.
    pub fn id(&self) -> Option<AttachmentId> {
        self.network
            .as_deref()
            .map(|network| AttachmentId::new(network, &self.container_id, &self.ifname))
    }

    /// Where this record lives (current or legacy naming).
    pub fn path(&self, state: &StateLayout) -> PathBuf {
        match self.id() {
            Some(id) => state.record_for(&id),
            None => state.legacy_record(&self.container_id, &self.ifname),
        }
    }

    /// The TCX link pin of this attachment (current or legacy naming).
    pub fn link_pin_path(&self, layout: &PinLayout) -> PathBuf {
        match self.id() {
            Some(id) => layout.pod_link_for(&id),
            None => layout.legacy_pod_link(&self.container_id, &self.ifname),
        }
    }

    pub fn write(&self, state: &StateLayout) -> Result<PathBuf> {
        let path = self.path(state);
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

    /// The record of `id`: under its own name, else under the legacy name if that
    /// record really is this attachment (legacy names are ambiguous: `a_b`+`c` and
    /// `a`+`b_c` share one, and only the content tells whose it is).
    pub fn find(state: &StateLayout, id: &AttachmentId) -> Option<(PathBuf, Self)> {
        let current = state.record_for(id);
        if let Ok(record) = Self::read(&current) {
            return Some((current, record));
        }
        let legacy = state.legacy_record(&id.container_id, &id.ifname);
        match Self::read(&legacy) {
            Ok(record)
                if record.network.is_none()
                    && record.container_id == id.container_id
                    && record.ifname == id.ifname =>
            {
                Some((legacy, record))
            }
            _ => None,
        }
    }

    /// Removes a record file; already gone is fine.
    pub fn remove_file(path: &Path) -> Result<()> {
        remove_if_present(path)
    }

    /// Every readable record; unreadable ones are logged and skipped.
    pub fn list(state: &StateLayout) -> Result<Vec<(PathBuf, Self)>> {
        let dir = state.attachments_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if is_missing(&e) => return Ok(Vec::new()),
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
    write_atomically_like(path, contents, None)
}

/// [`write_atomically`], the file getting `like`'s owner and mode (a file being replaced
/// keeps them: a 0600 file never shows up 0644, not even for a moment); without `like`,
/// 0644. The temp name ends in no configuration extension: nothing loads it half-written.
pub fn write_atomically_like(
    path: &Path,
    contents: &[u8],
    like: Option<&fs::Metadata>,
) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.egress-deny-tmp{}", std::process::id()));
    let write = || -> io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mode = match like {
            Some(like) => {
                // Owner first: chown may clear set-id bits that chmod then restores. Not
                // being allowed to (not root) leaves the file ours, all we could do.
                let _ = std::os::unix::fs::fchown(&file, Some(like.uid()), Some(like.gid()));
                like.mode() & 0o7777
            }
            None => 0o644,
        };
        // Set explicitly: the mode given to open() is filtered by the umask.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
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

/// The installer's attachment to a host interface (tc egress): how to find and remove
/// it whatever the mode (a cls_bpf filter has no pin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    pub ifname: String,
    pub ifindex: u32,
    pub mode: AttachMode,
}

impl HostRecord {
    pub fn write(&self, state: &StateLayout) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Invalid(format!("serializing host record: {e}")))?;
        write_atomically(&state.host_record(&self.ifname), &json)
    }

    /// Every readable host record.
    pub fn list(state: &StateLayout) -> Vec<(PathBuf, Self)> {
        let Ok(entries) = fs::read_dir(state.host_attachments_dir()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let record = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
                Some((e.path(), record))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_record(mode: &str) -> serde_json::Result<HostRecord> {
        serde_json::from_str(&format!(
            r#"{{"ifname": "eth0", "ifindex": 2, "mode": "{mode}"}}"#
        ))
    }

    #[test]
    fn the_attach_mode_is_read_as_earlier_versions_wrote_it() {
        assert_eq!(host_record("tcx").unwrap().mode, AttachMode::Tcx);
        assert_eq!(host_record("netlink").unwrap().mode, AttachMode::Netlink);
        assert_eq!(host_record("cls_bpf").unwrap().mode, AttachMode::Netlink);
        // Unknown (a later version's): still a readable record, handled as a pinned link.
        assert_eq!(host_record("future").unwrap().mode, AttachMode::Tcx);
    }

    #[test]
    fn the_attach_mode_is_written_as_a_string() {
        let record = HostRecord {
            ifname: "eth0".into(),
            ifindex: 2,
            mode: AttachMode::Netlink,
        };
        let json: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(json["mode"], "netlink");
        assert_eq!(serde_json::from_value::<HostRecord>(json).unwrap(), record);
    }
}
