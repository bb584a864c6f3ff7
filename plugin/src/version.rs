//! VERSION: the cniVersions the plugin speaks.
use serde_json::{Value, json};

use crate::{
    Output,
    skel::Invocation,
    spec::{SUPPORTED, reply_version},
};

pub fn run(inv: &Invocation) -> Output {
    let version = reply_version(inv.raw.get("cniVersion").and_then(Value::as_str));
    Ok(Some(
        json!({ "cniVersion": version, "supportedVersions": SUPPORTED }).to_string(),
    ))
}
