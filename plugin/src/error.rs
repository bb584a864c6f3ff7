//! Plugin errors and their CNI error codes, mapped in this one place. Depends on no
//! other module of the plugin: they all return these.
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("incompatible CNI version: {0}")]
    IncompatibleVersion(String),
    #[error("invalid environment: {0}")]
    InvalidEnvironment(String),
    #[error("failed to decode network configuration: {0}")]
    Decode(String),
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// The installer's pinned program/maps are missing: the runtime retries the pod
    /// rather than starting it unfiltered.
    #[error("egress-deny is not ready on this node (try again later): {0}")]
    NotReady(String),
    #[error("egress-deny is not available on this node: {0}")]
    NotAvailable(String),
    #[error("{0}")]
    CheckFailed(String),
    #[error("{context}: {source}")]
    Datapath {
        context: String,
        #[source]
        source: egress_deny_datapath::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// CNI spec error codes.
const CODE_INCOMPATIBLE_VERSION: u32 = 1;
const CODE_INVALID_ENV: u32 = 4;
const CODE_DECODE: u32 = 6;
const CODE_INVALID_CONFIG: u32 = 7;
const CODE_TRY_AGAIN_LATER: u32 = 11;
const CODE_PLUGIN_NOT_AVAILABLE: u32 = 50;
/// Plugin-specific codes start at 100.
const CODE_CHECK_FAILED: u32 = 100;
const CODE_DATAPATH: u32 = 101;
const CODE_OTHER: u32 = 999;

impl PluginError {
    pub fn datapath(context: impl Into<String>, source: egress_deny_datapath::Error) -> Self {
        if source.is_not_installed() {
            return PluginError::NotReady(source.to_string());
        }
        PluginError::Datapath {
            context: context.into(),
            source,
        }
    }

    pub fn code(&self) -> u32 {
        match self {
            PluginError::IncompatibleVersion(_) => CODE_INCOMPATIBLE_VERSION,
            PluginError::InvalidEnvironment(_) => CODE_INVALID_ENV,
            PluginError::Decode(_) => CODE_DECODE,
            PluginError::InvalidConfig(_) => CODE_INVALID_CONFIG,
            PluginError::NotReady(_) => CODE_TRY_AGAIN_LATER,
            PluginError::NotAvailable(_) => CODE_PLUGIN_NOT_AVAILABLE,
            PluginError::CheckFailed(_) => CODE_CHECK_FAILED,
            PluginError::Datapath { .. } => CODE_DATAPATH,
            PluginError::Other(_) => CODE_OTHER,
        }
    }

    /// The spec's error result, labelled `cni_version` (the caller picks it: see
    /// `spec::reply_version`).
    pub fn to_cni_json(&self, cni_version: &str) -> String {
        let (msg, details) = match self {
            PluginError::Datapath { context, source } => (context.clone(), source.to_string()),
            other => (other.to_string(), String::new()),
        };
        let mut body = json!({ "cniVersion": cni_version, "code": self.code(), "msg": msg });
        if !details.is_empty() {
            body["details"] = json!(details);
        }
        body.to_string()
    }
}
