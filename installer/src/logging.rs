//! The daemon's log format: env_logger's text (RFC 3339 times), or one JSON object per
//! line for log pipelines (`--log-format json`).
//!
//! JSON is a custom env_logger format rather than a structured-logging framework
//! (tracing, slog): every log call in the daemon stays as it is, RUST_LOG filtering is
//! unchanged, and env_logger's formatter already gives RFC 3339 timestamps. Deny events
//! get their fields (pod, interface, destination, rule, bytes) as keys, so a pipeline
//! can count denies per pod without a regular expression.
use std::io::Write;

use serde_json::{Map, Value, json};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `[2026-11-22T10:00:00Z INFO  message]`
    #[default]
    Text,
    /// `{"time":"2026-11-22T10:00:00.123Z","level":"INFO","message":"…",…}`
    Json,
}

pub fn init(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format_target(false);
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let mut object = Map::new();
            object.insert(
                "time".into(),
                Value::String(buf.timestamp_millis().to_string()),
            );
            object.insert("level".into(), Value::String(record.level().to_string()));
            object.insert("target".into(), Value::String(record.target().to_owned()));
            let message = record.args().to_string();
            if let Some(fields) = deny_fields(&message) {
                object.extend(fields);
            }
            object.insert("message".into(), Value::String(message));
            writeln!(buf, "{}", Value::Object(object))
        });
    }
    builder.init();
}

/// The fields of a deny event, from its message (daemon.rs `log_deny_events`):
/// `denied: pod shop/cart-1 (veth1) -> 198.51.100.7 (rule 198.51.100.0/24, 98 bytes)`,
/// or `host eth0`, `container <id> (ifname)`, `ifindex N` as the source.
fn deny_fields(message: &str) -> Option<Map<String, Value>> {
    let rest = message.strip_prefix("denied: ")?;
    let mut fields = Map::new();
    fields.insert("event".into(), json!("deny"));
    let (who, what) = match rest.split_once(" -> ") {
        Some((who, what)) => (who, Some(what)),
        None => (rest.split_once(": ").map_or(rest, |(w, _)| w), None),
    };
    let (source, interface) = match who.strip_suffix(')').and_then(|w| w.rsplit_once(" (")) {
        Some((source, ifname)) => (source, Some(ifname)),
        None => (who, None),
    };
    match source.split_once(' ') {
        Some(("pod", name)) => {
            if let Some((ns, pod)) = name.split_once('/') {
                fields.insert("namespace".into(), json!(ns));
                fields.insert("pod".into(), json!(pod));
            }
        }
        Some(("host", ifname)) => {
            fields.insert("interface".into(), json!(ifname));
        }
        Some(("container", id)) => {
            fields.insert("container".into(), json!(id));
        }
        Some(("ifindex", index)) => {
            fields.insert("ifindex".into(), json!(index.parse::<u32>().ok()?));
        }
        _ => return None,
    }
    if let Some(ifname) = interface {
        fields.insert("interface".into(), json!(ifname));
    }
    if let Some(what) = what {
        let (destination, detail) = what.split_once(" (rule ")?;
        let (rule, bytes) = detail.strip_suffix(" bytes)")?.split_once(", ")?;
        fields.insert("destination".into(), json!(destination));
        fields.insert("rule".into(), json!(rule));
        fields.insert("bytes".into(), json!(bytes.parse::<u64>().ok()?));
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_events_become_fields() {
        let f = deny_fields(
            "denied: pod shop/cart-1 (veth53b9994f) -> 198.51.100.7 (rule 198.51.100.0/24, 98 bytes)",
        )
        .unwrap();
        assert_eq!(
            Value::Object(f),
            json!({"event": "deny", "namespace": "shop", "pod": "cart-1", "interface": "veth53b9994f",
                   "destination": "198.51.100.7", "rule": "198.51.100.0/24", "bytes": 98})
        );
        let f = deny_fields("denied: host up0 -> 2001:db8::1 (rule 2001:db8::/32, 1280 bytes)")
            .unwrap();
        assert_eq!(f["interface"], "up0");
        assert_eq!(f["rule"], "2001:db8::/32");
        let f =
            deny_fields("denied: ifindex 7: IP packet too short to read its destination").unwrap();
        assert_eq!(f["ifindex"], 7);
        assert!(!f.contains_key("destination"));
        assert!(deny_fields("rules update rejected").is_none());
        assert!(deny_fields("denied: something else").is_none());
    }
}
