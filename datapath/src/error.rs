use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Errors of the datapath library. aya's errors are boxed: they are large and rare.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The installer's pinned program or maps are not there (not installed yet, or
    /// removed). Callers map this to "try again later".
    #[error("egress-deny is not installed: {} is missing", path.display())]
    NotInstalled { path: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("loading the eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),

    #[error("{context}: {source}")]
    Program {
        context: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("{context}: {source}")]
    Map {
        context: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },

    #[error("interface {0} not found")]
    NoSuchInterface(String),

    /// A link-layer header neither program parses (InfiniBand, CAN, …): attaching the
    /// L3 program there would judge garbage and let everything through.
    #[error(
        "interface {name}: link type {link_type} has a header egress-deny cannot parse; not filtered"
    )]
    UnsupportedLinkType { name: String, link_type: u16 },

    #[error("rule table: {0}")]
    Table(#[from] crate::table::TableError),

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn program(context: impl Into<String>, source: aya::programs::ProgramError) -> Self {
        Error::Program {
            context: context.into(),
            source: Box::new(source),
        }
    }

    pub fn map(context: impl Into<String>, source: aya::maps::MapError) -> Self {
        Error::Map {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// True when the error means "the installer's state is missing" rather than a fault.
    pub fn is_not_installed(&self) -> bool {
        matches!(self, Error::NotInstalled { .. })
    }
}

/// "Missing means absent", decided in one place: whether `err` says the file, pin or
/// kernel object asked for is not there (ENOENT).
pub(crate) fn is_missing(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound
}

/// Removes a file or pin; already gone is fine (removal must be repeatable).
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if is_missing(&e) => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Turns ENOENT on `path` into `NotInstalled`, anything else into `Io`.
pub(crate) fn missing_is_not_installed(path: &Path, err: io::Error) -> Error {
    if is_missing(&err) {
        Error::NotInstalled {
            path: path.to_path_buf(),
        }
    } else {
        Error::io(format!("opening {}", path.display()), err)
    }
}
