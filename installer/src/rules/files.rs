//! Finding and opening the rule files: kubelet's ConfigMap layout (every key read from
//! one `..data` snapshot), the names errors show, noticing a swap or an edit from
//! metadata alone ([`Fingerprint`]), and reading a file (gzip or not) line by line.
use std::{
    fs::{self, File},
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// Kubelet's volume layout: each key is a symlink into `..data`, itself a symlink to a
/// timestamped directory that an update replaces by one rename.
const KUBELET_DATA: &str = "..data";

/// The directory the rule files are read from: the one `..data` points to now (one
/// consistent version of every key), or `dir` itself when it is a plain directory.
fn snapshot_dir(dir: &Path) -> PathBuf {
    match fs::read_link(dir.join(KUBELET_DATA)) {
        Ok(target) => dir.join(target),
        Err(_) => dir.to_path_buf(),
    }
}

/// The rule files of `dir` in name order, all from one snapshot (see `snapshot_dir`):
/// reading each key through its own symlink could mix two versions across a swap and
/// lose a prefix that moved between keys. Hidden entries skipped, symlinks followed,
/// only regular files. `NotFound` when the directory does not exist.
pub fn rule_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::metadata(dir)?;
    let snapshot = snapshot_dir(dir);
    let mut files = Vec::new();
    for entry in fs::read_dir(&snapshot)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        if fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A rule file as the operator knows it: the ConfigMap key under the rules directory,
/// not kubelet's timestamped snapshot directory it is read from (whose name changes
/// with every update, so the same error would read differently each time).
pub fn shown(path: &Path) -> String {
    let snapshot = path.parent().filter(|p| {
        p.file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
    });
    match (snapshot.and_then(Path::parent), path.file_name()) {
        (Some(dir), Some(key)) => dir.join(key).display().to_string(),
        _ => path.display().to_string(),
    }
}

/// Whether `files` (from [`rule_files`]) still are the directory's current version:
/// false when kubelet swapped `..data` while they were being read. The caller reads
/// again rather than enforce a version that is already gone.
pub fn still_current(dir: &Path, files: &[PathBuf]) -> bool {
    let snapshot = snapshot_dir(dir);
    files.iter().all(|f| f.parent() == Some(snapshot.as_path()))
}

/// Identity of the rule files' current contents, from metadata only (symlinks
/// resolved): kubelet's `..data` swap changes every inode; an in-place edit changes
/// the size or the modification time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    files: Vec<FileIdentity>,
    /// The newest modification/change time among the files.
    newest: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileIdentity {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    pub fn of(files: &[PathBuf]) -> io::Result<Self> {
        let mut out = Vec::with_capacity(files.len());
        let mut newest: Option<SystemTime> = None;
        for path in files {
            let m = fs::metadata(path)?;
            for t in [m.modified().ok(), ctime(&m)].into_iter().flatten() {
                newest = Some(newest.map_or(t, |n| n.max(t)));
            }
            out.push(FileIdentity {
                path: path.clone(),
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            });
        }
        Ok(Self { files: out, newest })
    }

    /// Whether a parse that started at `parsed_at` certainly saw these contents. File
    /// times come from a coarse clock: a write just before or during that parse could
    /// leave size and times unchanged, so recent changes never count as seen.
    pub fn seen_by_parse_at(&self, earlier: &Fingerprint, parsed_at: SystemTime) -> bool {
        const CLOCK_SLACK: std::time::Duration = std::time::Duration::from_millis(50);
        self == earlier
            && self
                .newest
                .is_none_or(|newest| newest + CLOCK_SLACK < parsed_at)
    }
}

fn ctime(m: &fs::Metadata) -> Option<SystemTime> {
    let secs = u64::try_from(m.ctime()).ok()?;
    Some(
        SystemTime::UNIX_EPOCH
            + std::time::Duration::new(secs, u32::try_from(m.ctime_nsec()).unwrap_or(0)),
    )
}

/// Calls `f` with each line (1-based number, without the newline) of a file, streaming.
pub(super) fn for_each_line(path: &Path, f: &mut dyn FnMut(usize, &[u8])) -> io::Result<()> {
    use io::BufRead;
    let mut reader = io::BufReader::new(open(path)?);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        line_no += 1;
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = if line_no == 1 {
            line.strip_prefix(UTF8_BOM).unwrap_or(line)
        } else {
            line
        };
        f(line_no, line);
    }
}

pub(crate) fn open(path: &Path) -> io::Result<Box<dyn Read>> {
    let file = File::open(path)?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

pub(crate) const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::rules::{Limits, parse_dir, parse_files, tests::dir_with};

    #[test]
    fn missing_dir_is_not_found() {
        let err = rule_files(Path::new("/nonexistent/egress-deny")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn kubelet_layout_follows_symlinks_and_skips_data_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_11_22_10_00_00.1");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("list"), "192.0.2.0/24\n").unwrap();
        std::os::unix::fs::symlink("..2026_11_22_10_00_00.1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/list", dir.path().join("list")).unwrap();
        let parsed = parse_dir(dir.path()).unwrap();
        assert_eq!(parsed.rules.counts().v4_deny, 1);
        assert_eq!(parsed.files, 1);

        // The fingerprint follows the swap, and only the swap.
        let files = rule_files(dir.path()).unwrap();
        let before = Fingerprint::of(&files).unwrap();
        let data2 = dir.path().join("..2026_11_22_10_00_01.2");
        fs::create_dir(&data2).unwrap();
        fs::write(data2.join("list"), "192.0.2.0/24\n").unwrap();
        assert_eq!(Fingerprint::of(&files).unwrap(), before);
        assert!(still_current(dir.path(), &files));
        std::os::unix::fs::symlink("..2026_11_22_10_00_01.2", dir.path().join("..tmp")).unwrap();
        fs::rename(dir.path().join("..tmp"), dir.path().join("..data")).unwrap();
        let after = rule_files(dir.path()).unwrap();
        assert_ne!(Fingerprint::of(&after).unwrap(), before);
        // Files listed before the swap are no longer the current version.
        assert!(!still_current(dir.path(), &files));
        assert!(still_current(dir.path(), &after));
    }

    /// A prefix moves from one key to another in an update. Reading key by key through
    /// the symlinks across the swap saw neither copy; a snapshot sees exactly one.
    #[test]
    fn a_swap_during_the_read_never_mixes_two_versions() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("..v1");
        let v2 = dir.path().join("..v2");
        fs::create_dir(&v1).unwrap();
        fs::create_dir(&v2).unwrap();
        fs::write(v1.join("a"), "").unwrap();
        fs::write(v1.join("b"), "198.51.100.0/24\n").unwrap();
        fs::write(v2.join("a"), "198.51.100.0/24\n").unwrap();
        fs::write(v2.join("b"), "").unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        for key in ["a", "b"] {
            std::os::unix::fs::symlink(format!("..data/{key}"), dir.path().join(key)).unwrap();
        }
        let files = rule_files(dir.path()).unwrap();
        // Every key is read from the one version `..data` named at listing time, not
        // through its own symlink (which a swap between two keys' reads would redirect).
        assert!(
            files.iter().all(|f| f.parent() == Some(v1.as_path())),
            "{files:?}"
        );
        // Kubelet swaps between the listing and the read (the old version still there).
        std::os::unix::fs::symlink("..v2", dir.path().join("..tmp")).unwrap();
        fs::rename(dir.path().join("..tmp"), dir.path().join("..data")).unwrap();
        let parsed = parse_files(&files, &Limits::default(), &AtomicBool::new(false)).unwrap();
        assert_eq!(parsed.rules.counts().v4_deny, 1, "one whole version read");
        assert!(
            !still_current(dir.path(), &files),
            "the swap goes unnoticed"
        );
        // Kubelet removes the old version: reading it fails (retried), never a partial set.
        fs::remove_dir_all(&v1).unwrap();
        assert!(parse_files(&files, &Limits::default(), &AtomicBool::new(false)).is_err());
    }

    #[test]
    fn a_recent_change_is_never_taken_as_seen() {
        let dir = dir_with(&[("a", b"1.1.1.1\n")]);
        let files = rule_files(dir.path()).unwrap();
        let fp = Fingerprint::of(&files).unwrap();
        let now = SystemTime::now();
        assert!(!fp.seen_by_parse_at(&fp, now));
        assert!(fp.seen_by_parse_at(&fp, now + std::time::Duration::from_secs(1)));
    }
}
