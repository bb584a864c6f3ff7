//! Why an update is rejected (reading the files: [`RulesError`]; making it the set in
//! force: [`SyncError`]) and the bounds on one update ([`Limits`]).
use ipnet::IpNet;

/// A parsed set that could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Map(#[from] egress_deny_datapath::Error),
    /// The set does not fit (rule count or memory): rejected before anything changed.
    #[error("{0}")]
    TooLarge(String),
}

/// A rejected update: which file and line, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("{file}:{line}: {message}")]
    Line {
        file: String,
        line: usize,
        message: String,
    },
    /// Reading failed (I/O, corrupt gzip): may be transient.
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{prefix} is listed both as deny ({deny_at}) and as allow ({allow_at})")]
    Conflict {
        prefix: IpNet,
        deny_at: String,
        allow_at: String,
    },
    /// Over one of the configured [`Limits`].
    #[error("{0}")]
    TooLarge(String),
    #[error("interrupted (shutting down)")]
    Interrupted,
}

impl RulesError {
    /// Whether reading the same files again gives the same answer (content errors), as
    /// opposed to I/O trouble worth retrying.
    pub fn is_about_content(&self) -> bool {
        matches!(
            self,
            RulesError::Line { .. } | RulesError::Conflict { .. } | RulesError::TooLarge(_)
        )
    }
}

/// Bounds on one update, so that a small hostile input (a `.gz` of one line repeated a
/// billion times) is rejected with a clear error instead of getting the daemon
/// OOM-killed in a loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes read from all files together, after decompression.
    pub max_bytes: u64,
    /// Rule lines (denies and exceptions, both families, duplicates included).
    pub max_rules: u64,
    /// Bytes in one line.
    pub max_line: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            max_rules: DEFAULT_MAX_RULES,
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

/// 10M rules of the usual mix are ~150 MB of text; 1 GiB leaves room for comments.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Twice the rule maps' capacity per family: room for duplicates, while the parsed
/// entries (8 or 24 bytes each) stay within the DaemonSet's memory limit.
pub const DEFAULT_MAX_RULES: u64 = 2 * egress_deny_datapath::common::MAX_RULES_PER_FAMILY as u64;
/// Rule lines are under 60 bytes; feed headers and comments rarely exceed a few hundred.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;
