//! VERSION, and which commands each cniVersion defines.
use serde_json::json;

use crate::{
    Output,
    error::PluginError,
    skel::{Command, Invocation},
};

pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

pub fn run(inv: &Invocation) -> Output {
    // Answer in the caller's version when we speak it; otherwise in ours, so that a
    // runtime asking with a version we lack still learns what we support.
    let version = inv
        .raw
        .get("cniVersion")
        .and_then(|v| v.as_str())
        .filter(|v| SUPPORTED.contains(v))
        .unwrap_or(LATEST);
    Ok(Some(
        json!({ "cniVersion": version, "supportedVersions": SUPPORTED }).to_string(),
    ))
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
