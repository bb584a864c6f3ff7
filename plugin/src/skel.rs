//! The CNI calling convention: command and parameters from the environment, the
//! network configuration on stdin.
use std::{collections::HashMap, io::Read, path::PathBuf};

use serde_json::Value;

use crate::{
    config::NetConf,
    error::PluginError,
    spec::{self, Command},
};

pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// CNI_ARGS (`K=V;K=V`), e.g. K8S_POD_NAMESPACE, K8S_POD_NAME.
    pub args: HashMap<String, String>,
    /// Parsed configuration (None for VERSION).
    pub config: Option<NetConf>,
    /// The configuration as received: prevResult is taken from here verbatim.
    pub raw: Value,
}

impl Invocation {
    /// The invocation of this process, and the request's cniVersion whenever stdin was
    /// read that far (error results answer in it, even when the invocation is invalid).
    pub fn from_process() -> (Result<Self, PluginError>, Option<String>) {
        let mut requested_version = None;
        let invocation = Self::parse(
            |name| std::env::var(name).ok(),
            std::io::stdin().lock(),
            &mut requested_version,
        );
        (invocation, requested_version)
    }

    /// [`Self::from_process`] with the environment as a lookup and stdin as a reader.
    /// stdin is read only once CNI_COMMAND is valid.
    fn parse(
        lookup: impl Fn(&str) -> Option<String>,
        mut stdin: impl Read,
        requested_version: &mut Option<String>,
    ) -> Result<Self, PluginError> {
        // An empty variable counts as unset.
        let env = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let required_env = |name: &str| {
            env(name).ok_or_else(|| PluginError::InvalidEnvironment(format!("{name} is not set")))
        };
        let command = match env("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("GC") => Command::Gc,
            Some("STATUS") => Command::Status,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(PluginError::InvalidEnvironment(format!(
                    "unknown CNI_COMMAND {other:?}"
                )));
            }
            None => {
                return Err(PluginError::InvalidEnvironment(
                    "CNI_COMMAND is not set".into(),
                ));
            }
        };

        let mut input = Vec::new();
        stdin
            .read_to_end(&mut input)
            .map_err(|e| PluginError::Decode(format!("reading stdin: {e}")))?;
        let raw: Value = if input.iter().all(u8::is_ascii_whitespace) && command == Command::Version
        {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(&input).map_err(|e| PluginError::Decode(e.to_string()))?
        };
        if let Some(v) = raw.get("cniVersion").and_then(Value::as_str) {
            *requested_version = Some(v.to_owned());
        }

        let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let (container_id, ifname) = if per_attachment {
            (
                required_env("CNI_CONTAINERID")?,
                required_env("CNI_IFNAME")?,
            )
        } else {
            (
                env("CNI_CONTAINERID").unwrap_or_default(),
                env("CNI_IFNAME").unwrap_or_default(),
            )
        };
        if per_attachment {
            validate_container_id(&container_id)?;
            validate_ifname(&ifname)?;
        }
        // DEL may come without a namespace (it is already gone); ADD and CHECK need one.
        let netns = env("CNI_NETNS").map(PathBuf::from);
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(PluginError::InvalidEnvironment(
                "CNI_NETNS is not set".into(),
            ));
        }
        let args = env("CNI_ARGS").map(|a| parse_args(&a)).unwrap_or_default();

        let config = if command == Command::Version {
            None
        } else {
            let conf: NetConf = serde_json::from_value(raw.clone())
                .map_err(|e| PluginError::InvalidConfig(e.to_string()))?;
            spec::require_supported(&conf.cni_version, command)?;
            Some(conf)
        };
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            config,
            raw,
        })
    }

    pub fn config(&self) -> &NetConf {
        self.config
            .as_ref()
            .expect("configuration is parsed for every command but VERSION")
    }

    pub fn pod_namespace(&self) -> Option<&str> {
        self.args.get("K8S_POD_NAMESPACE").map(String::as_str)
    }

    pub fn pod_name(&self) -> Option<&str> {
        self.args.get("K8S_POD_NAME").map(String::as_str)
    }

    /// prevResult verbatim, labelled with the request's cniVersion.
    pub fn prev_result(&self) -> Option<Value> {
        let mut prev = self
            .raw
            .get("prevResult")
            .filter(|v| v.is_object())?
            .clone();
        prev["cniVersion"] = Value::String(self.config().cni_version.clone());
        Some(prev)
    }
}

fn parse_args(args: &str) -> HashMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// CNI: alphanumerics plus '_', '.', '-'. It ends up in file and pin names.
fn validate_container_id(id: &str) -> Result<(), PluginError> {
    let ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok && id.len() <= 128 {
        Ok(())
    } else {
        Err(PluginError::InvalidEnvironment(format!(
            "invalid CNI_CONTAINERID {id:?}"
        )))
    }
}

fn validate_ifname(name: &str) -> Result<(), PluginError> {
    let ok =
        name.len() < 16 && !name.contains(['/', ':']) && !name.chars().any(char::is_whitespace);
    if ok && name != "." && name != ".." {
        Ok(())
    } else {
        Err(PluginError::InvalidEnvironment(format!(
            "invalid CNI_IFNAME {name:?}"
        )))
    }
}

#[cfg(test)]
mod tests;
