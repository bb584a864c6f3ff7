//! Loading the eBPF object and pinning program and maps: the installer's job.
//!
//! The installer owns the map definitions. aya reuses a pinned map without checking
//! that its definition matches (see DESIGN.md), so every pinned map is checked here
//! first: compatible maps are reused (rules stay enforced across restarts), an
//! incompatible one is unpinned deliberately and recreated.
use std::{fs, io, os::fd::AsFd, path::Path};

use aya::{
    EbpfLoader,
    maps::{MapInfo, MapType},
    programs::{ProgramInfo, SchedClassifier},
};
use egress_deny_common::{Counters, EVENTS_RING_BYTES, MAX_ATTACHMENTS, Settings};

use crate::{
    EBPF_OBJECT,
    error::{Error, Result, is_missing},
    paths::{
        CONFIG_MAP, COUNTERS_MAP, EVENTS_MAP, PinLayout, ProgramKind, RETIRED_MAPS, SETTINGS_MAP,
        V4_TABLE_MAP, V6_TABLE_MAP,
    },
};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// What a pinned map must look like to be reused.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapSpec {
    /// One slot: the table in force (an inner map id), swapped by one update.
    const fn table_slot(name: &'static str) -> Self {
        Self {
            name,
            map_type: MapType::ArrayOfMaps,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            flags: 0,
        }
    }

    /// One entry of `value_size` bytes.
    const fn single(name: &'static str, value_size: usize) -> Self {
        Self {
            name,
            map_type: MapType::Array,
            key_size: 4,
            value_size: value_size as u32,
            max_entries: 1,
            flags: 0,
        }
    }
}

pub const MAP_SPECS: [MapSpec; 6] = [
    MapSpec::table_slot(V4_TABLE_MAP),
    MapSpec::table_slot(V6_TABLE_MAP),
    MapSpec {
        name: COUNTERS_MAP,
        map_type: MapType::PerCpuHash,
        key_size: 4,
        value_size: std::mem::size_of::<Counters>() as u32,
        max_entries: MAX_ATTACHMENTS,
        flags: 0,
    },
    MapSpec::single(CONFIG_MAP, 8),
    MapSpec::single(SETTINGS_MAP, std::mem::size_of::<Settings>()),
    MapSpec {
        name: EVENTS_MAP,
        map_type: MapType::RingBuf,
        key_size: 0,
        value_size: 0,
        max_entries: EVENTS_RING_BYTES,
        flags: 0,
    },
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOutcome {
    Created,
    Reused,
    /// The pinned map had another definition (an older or newer egress-deny); it was
    /// unpinned and a new one created. Programs still attached keep the old map alive
    /// until they are moved to the new program.
    Replaced {
        was: String,
    },
}

#[derive(Debug)]
pub struct LoadReport {
    pub maps: Vec<(&'static str, MapOutcome)>,
    /// Kernel program IDs of the freshly pinned programs.
    pub programs: Vec<(ProgramKind, u32)>,
    /// The new programs read rule maps that the program in use does not (a rule map was
    /// replaced now or by an earlier, interrupted start): they are pinned at the staged
    /// paths, and every attachment keeps the program in use and its rules until
    /// [`promote_staged`] runs after the new maps hold a valid rule set.
    pub staged: bool,
}

/// Loads the embedded object, reusing compatible pinned maps, and pins both programs:
/// in place of the current ones (atomically, by rename) when they read the same rule
/// maps, staged otherwise (see [`LoadReport::staged`]).
pub fn load_and_pin(layout: &PinLayout) -> Result<LoadReport> {
    ensure_bpffs(layout.root())?;
    for dir in [layout.root().to_path_buf(), layout.links_dir()] {
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }

    // The rule maps the attachments read today, before anything is replaced.
    let in_use = rule_maps_in_use(layout)?;
    let mut maps = Vec::new();
    for spec in MAP_SPECS {
        let path = layout.map(spec.name);
        let outcome = match MapInfo::from_pin(&path) {
            Ok(info) => match describe_mismatch(&spec, &info) {
                None => MapOutcome::Reused,
                Some(was) => {
                    log::warn!(
                        "pinned map {} is incompatible ({was}); replacing it",
                        path.display()
                    );
                    fs::remove_file(&path)
                        .map_err(|e| Error::io(format!("unpinning {}", path.display()), e))?;
                    MapOutcome::Replaced { was }
                }
            },
            Err(_) if !path.exists() => MapOutcome::Created,
            Err(e) => return Err(Error::map(format!("inspecting {}", path.display()), e)),
        };
        maps.push((spec.name, outcome));
    }

    let mut ebpf = load_object(layout)?;

    let pinned_rules = crate::rules::rule_map_ids(layout)?;
    let staged = in_use
        .as_ref()
        .is_some_and(|ids| !ids.contains(&pinned_rules.0) || !ids.contains(&pinned_rules.1));
    let mut programs = Vec::new();
    for kind in ProgramKind::ALL {
        let program = load_program(&mut ebpf, kind)?;
        let id = program
            .info()
            .map_err(|e| Error::program("reading program info", e))?
            .id();
        let final_path = if staged {
            layout.staged_program(kind)
        } else {
            // A staged program of an interrupted upgrade is superseded by this one.
            let _ = fs::remove_file(layout.staged_program(kind));
            unpin_retired_maps(layout);
            layout.program(kind)
        };
        let tmp_path = layout.pinning_program(kind);
        let _ = fs::remove_file(&tmp_path);
        program.pin(&tmp_path).map_err(|e| Error::Pin {
            path: tmp_path.clone(),
            source: Box::new(e),
        })?;
        fs::rename(&tmp_path, &final_path)
            .map_err(|e| Error::io(format!("replacing {}", final_path.display()), e))?;
        programs.push((kind, id));
    }
    Ok(LoadReport {
        maps,
        programs,
        staged,
    })
}

/// A second instance of a program, reading the pinned maps. TCX refuses the same
/// program twice on one hook; putting an attachment back at the front of its hook
/// attaches this copy first, drops the old link, then switches the new link to the
/// program in use (see `order`). Only while nothing is staged: it reads the pinned maps.
pub fn load_copy(layout: &PinLayout, kind: ProgramKind) -> Result<std::os::fd::OwnedFd> {
    let mut ebpf = load_object(layout)?;
    let program = load_program(&mut ebpf, kind)?;
    let fd = program
        .fd()
        .map_err(|e| Error::program("program fd", e))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating the program fd", e))?;
    Ok(fd)
}

/// Loads (verifies) one program section of the object.
fn load_program(ebpf: &mut aya::Ebpf, kind: ProgramKind) -> Result<&mut SchedClassifier> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(kind.name())
        .ok_or_else(|| Error::Invalid(format!("program {} missing from object", kind.name())))?
        .try_into()
        .map_err(|e| Error::program(format!("program {}", kind.name()), e))?;
    program
        .load()
        .map_err(|e| Error::program(format!("loading program {}", kind.name()), e))?;
    Ok(program)
}

/// The embedded object, its maps bound to the pins under `layout` (created there when
/// missing, reused otherwise; compatibility is checked by `load_and_pin` first).
fn load_object(layout: &PinLayout) -> Result<aya::Ebpf> {
    let mut loader = EbpfLoader::new();
    let map_paths: Vec<_> = MAP_SPECS
        .iter()
        .map(|s| (s.name, layout.map(s.name)))
        .collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .load(EBPF_OBJECT)
        .map_err(|e| Error::Load(Box::new(e)))
}

/// IDs of the maps the pinned (in use) Ethernet program reads; `None` when no program
/// is pinned (first start, or after `uninstall`).
fn rule_maps_in_use(layout: &PinLayout) -> Result<Option<Vec<u32>>> {
    let path = layout.program(ProgramKind::Ethernet);
    if !path.exists() {
        return Ok(None);
    }
    let info = ProgramInfo::from_pin(&path)
        .map_err(|e| Error::program(format!("inspecting {}", path.display()), e))?;
    info.map_ids()
        .map_err(|e| Error::program(format!("map IDs of {}", path.display()), e))
}

/// Makes the staged programs the ones in use (each by an atomic rename). Call once the
/// pinned rule maps hold a valid rule set; attachments are then moved to the new
/// program by the caller. Returns whether anything was staged.
pub fn promote_staged(layout: &PinLayout) -> Result<bool> {
    let mut promoted = false;
    for kind in ProgramKind::ALL {
        let staged = layout.staged_program(kind);
        if !staged.exists() {
            continue;
        }
        let path = layout.program(kind);
        fs::rename(&staged, &path)
            .map_err(|e| Error::io(format!("promoting {}", staged.display()), e))?;
        promoted = true;
    }
    if promoted {
        unpin_retired_maps(layout);
    }
    Ok(promoted)
}

/// Unpins the rule maps of older versions once no pinned program reads them (attached
/// programs keep their maps alive until they are moved; the kernel frees them then).
fn unpin_retired_maps(layout: &PinLayout) {
    for name in RETIRED_MAPS {
        let path = layout.map(name);
        match fs::remove_file(&path) {
            Ok(()) => log::info!(
                "unpinned {}, the rule map of an older version",
                path.display()
            ),
            Err(e) if is_missing(&e) => {}
            Err(e) => log::warn!("unpinning {}: {e}", path.display()),
        }
    }
}

fn describe_mismatch(spec: &MapSpec, info: &MapInfo) -> Option<String> {
    let map_type = info.map_type().ok();
    let actual = (
        map_type,
        info.key_size(),
        info.value_size(),
        info.max_entries(),
        info.map_flags(),
    );
    let expected = (
        Some(spec.map_type),
        spec.key_size,
        spec.value_size,
        spec.max_entries,
        spec.flags,
    );
    (actual != expected).then(|| {
        format!(
            "type {:?} key {} value {} max_entries {} flags {:#x}",
            actual.0, actual.1, actual.2, actual.3, actual.4
        )
    })
}

/// Makes sure `dir` will be on a bpffs: if its closest existing ancestor is not one,
/// mounts bpffs on the pin dir's parent (normally /sys/fs/bpf).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(probe)? {
        return Ok(());
    }
    let mount_point = dir.parent().unwrap_or(dir);
    fs::create_dir_all(mount_point)
        .map_err(|e| Error::io(format!("creating {}", mount_point.display()), e))?;
    log::info!("mounting bpffs on {}", mount_point.display());
    nix::mount::mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        Error::io(
            format!("mounting bpffs on {}", mount_point.display()),
            e.into(),
        )
    })
}

pub fn is_bpffs(path: &Path) -> Result<bool> {
    let stat = nix::sys::statfs::statfs(path)
        .map_err(|e| Error::io(format!("statfs {}", path.display()), io::Error::from(e)))?;
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Removes every pin under the pin dir (programs, maps, links) and the dir itself.
/// Missing entries are fine: uninstall must be repeatable.
pub fn unpin_all(layout: &PinLayout) -> Result<()> {
    match fs::remove_dir_all(layout.root()) {
        Ok(()) => Ok(()),
        Err(e) if is_missing(&e) => Ok(()),
        Err(e) => Err(Error::io(
            format!("removing {}", layout.root().display()),
            e,
        )),
    }
}
