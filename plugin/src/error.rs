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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn cni_json(err: &PluginError, cni_version: &str) -> Value {
        serde_json::from_str(&err.to_cni_json(cni_version)).unwrap()
    }

    #[test]
    fn the_error_result_carries_the_given_version_code_and_message() {
        let err = PluginError::InvalidEnvironment("CNI_IFNAME is not set".into());
        assert_eq!(
            cni_json(&err, "0.4.0"),
            json!({
                "cniVersion": "0.4.0",
                "code": 4,
                "msg": "invalid environment: CNI_IFNAME is not set",
            })
        );
    }

    #[test]
    fn datapath_errors_put_their_cause_in_details() {
        let source = egress_deny_datapath::Error::Invalid("short RTM_NEWLINK".into());
        let err = PluginError::datapath("attaching to cali1", source);
        assert_eq!(
            cni_json(&err, "1.1.0"),
            json!({
                "cniVersion": "1.1.0",
                "code": 101,
                "msg": "attaching to cali1",
                "details": "short RTM_NEWLINK",
            })
        );
    }

    #[test]
    fn a_missing_installation_is_try_again_later() {
        let source = egress_deny_datapath::Error::NotInstalled {
            path: "/sys/fs/bpf/egress-deny/egress_deny".into(),
        };
        let err = PluginError::datapath("attaching", source);
        assert!(matches!(err, PluginError::NotReady(_)), "{err:?}");
        assert_eq!(err.code(), 11);
        assert!(cni_json(&err, "1.1.0").get("details").is_none());
    }

    #[test]
    fn codes_follow_the_spec_and_plugin_codes_start_at_100() {
        let codes = [
            (PluginError::IncompatibleVersion(String::new()), 1),
            (PluginError::InvalidEnvironment(String::new()), 4),
            (PluginError::Decode(String::new()), 6),
            (PluginError::InvalidConfig(String::new()), 7),
            (PluginError::NotReady(String::new()), 11),
            (PluginError::NotAvailable(String::new()), 50),
            (PluginError::CheckFailed(String::new()), 100),
            (PluginError::Other(String::new()), 999),
        ];
        for (err, code) in codes {
            assert_eq!(err.code(), code, "{err:?}");
        }
    }
}
