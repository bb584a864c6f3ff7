//! What the plugin speaks of the CNI spec: its commands and cniVersions, and which
//! commands each version defines. Below the calling convention ([`crate::skel`]) and
//! the commands, above only [`crate::error`], so that the modules depend one way.
use crate::error::PluginError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// The cniVersion to answer in: the caller's when we speak it; otherwise ours, so that
/// a runtime asking with a version we lack still learns what we support.
pub fn reply_version(requested: Option<&str>) -> &'static str {
    requested
        .and_then(|v| SUPPORTED.iter().find(|s| **s == v))
        .copied()
        .unwrap_or(LATEST)
}

fn parse(version: &str) -> (u32, u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Rejects versions we do not speak and commands the version does not define.
pub fn require_supported(version: &str, command: Command) -> Result<(), PluginError> {
    if !SUPPORTED.contains(&version) {
        return Err(PluginError::IncompatibleVersion(format!(
            "cniVersion {version:?} is not supported (supported: {})",
            SUPPORTED.join(", ")
        )));
    }
    let needed = match command {
        Command::Check => Some("0.4.0"),
        Command::Gc | Command::Status => Some("1.1.0"),
        _ => None,
    };
    if let Some(needed) = needed
        && parse(version) < parse(needed)
    {
        return Err(PluginError::IncompatibleVersion(format!(
            "{command:?} needs cniVersion {needed} or later, got {version}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
