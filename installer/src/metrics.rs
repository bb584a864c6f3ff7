//! The node's metrics for `/metrics`: read from the daemon's state, the persisted
//! status and the pinned counter map at each scrape (a collector, not counters kept in
//! step), with names written once and every label value escaped by `prometheus-client`.
use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
};

use egress_deny_datapath::counters::{CounterMap, Counters};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    attachments::{AttachmentKind, attachments},
    daemon::shared::Shared,
    status::TableStatus,
};

/// Every name gets it.
const PREFIX: &str = "egress_deny";

/// A registry holding the node's metrics, prefixed `egress_deny_`.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(NodeMetrics { shared }));
    registry
}

struct NodeMetrics {
    shared: Arc<Shared>,
}

impl fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeMetrics")
    }
}

type Labels = Vec<(&'static str, String)>;

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    one(encoder, name, help, ConstGauge::new(value))
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    one(encoder, name, help, ConstCounter::new(value))
}

fn one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One gauge with a sample per label set.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(encoder, name, help, MetricType::Gauge, samples)
}

/// One counter with a sample per label set.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(encoder, name, help, MetricType::Counter, samples)
}

/// `kind` is given, not taken from a sample: a family may have none (its HELP and TYPE
/// lines are still written, so that every name is always exported).
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, sample) in samples {
        sample.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for NodeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let shared = &self.shared;
        let status = shared.status.lock().expect("status").clone();
        let sync = status.last_sync.clone().unwrap_or_default();
        let e = &mut encoder;

        gauges(
            e,
            "rules",
            "Rules enforced, by address family and action (protections included).",
            [
                ("ipv4", "deny", sync.rules.v4_deny),
                ("ipv4", "allow", sync.rules.v4_allow),
                ("ipv6", "deny", sync.rules.v6_deny),
                ("ipv6", "allow", sync.rules.v6_allow),
            ]
            .map(|(family, action, n)| ([("family", family), ("action", action)], n)),
        )?;
        gauge(
            e,
            "last_sync_timestamp_seconds",
            "Unix time of the last rules sync attempt.",
            sync.time,
        )?;
        gauge(
            e,
            "last_sync_duration_seconds",
            "Duration of the last rules sync attempt.",
            sync.duration_ms as f64 / 1000.0,
        )?;
        gauge(
            e,
            "last_sync_success",
            "1 if the last rules sync was applied, 0 if it was rejected.",
            u32::from(sync.ok),
        )?;
        gauge(
            e,
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last applied rules sync.",
            status.last_success,
        )?;
        counter(
            e,
            "sync_errors",
            "Rules updates rejected since the daemon started.",
            status.sync_errors_total,
        )?;
        table_gauges(e, &sync.tables)?;
        gauge(
            e,
            "host_interfaces_unfiltered",
            "Host interfaces that should be filtered but are not (unsupported link type, attach error); see `status`.",
            status.host_interfaces_unfiltered.len() as u64,
        )?;
        counter(
            e,
            "attachment_repairs",
            "Attachments found behind another program on their hook (or on an old program) and repaired.",
            shared.repairs.load(Ordering::Relaxed),
        )?;
        gauge(
            e,
            "ready",
            "1 when /readyz would answer 200.",
            u32::from(shared.readiness().is_ok()),
        )?;
        attachment_metrics(e, shared)
    }
}

/// One gauge per table property, one sample per address family.
fn table_gauges(e: &mut DescriptorEncoder, tables: &[TableStatus]) -> fmt::Result {
    let family = |t: &TableStatus| [("family", format!("ipv{}", t.family))];
    gauges(
        e,
        "table_bytes",
        "Kernel memory of the compiled rule table in force, per address family.",
        tables.iter().map(|t| (family(t), t.bytes)),
    )?;
    gauges(
        e,
        "table_ranges",
        "Address ranges the rules compiled into, per address family.",
        tables.iter().map(|t| (family(t), t.ranges)),
    )?;
    gauges(
        e,
        "table_build_seconds",
        "Time to compile and write the last table swapped in, per address family.",
        tables
            .iter()
            .filter_map(|t| Some((family(t), t.build_seconds?))),
    )?;
    gauges(
        e,
        "table_swap_seconds",
        "Time of the map update that put the last table in force (includes the kernel's wait for programs still reading the old one), per address family.",
        tables
            .iter()
            .filter_map(|t| Some((family(t), t.swap_seconds?))),
    )
}

/// Attachments by kind, and each attachment's packet, byte and event counters.
fn attachment_metrics(e: &mut DescriptorEncoder, shared: &Shared) -> fmt::Result {
    let attachments = attachments(&shared.layout, &shared.state);
    gauges(
        e,
        "attachments",
        "Interfaces the program is attached to, by kind.",
        AttachmentKind::ALL.map(|kind| {
            let n = attachments.iter().filter(|a| a.kind == kind).count() as u64;
            ([("kind", kind.to_string())], n)
        }),
    )?;
    let map = CounterMap::open(&shared.layout).ok();
    let rows: Vec<(Labels, bool, _)> = attachments
        .iter()
        .map(|a| {
            let labels = vec![
                ("kind", a.kind.to_string()),
                ("interface", a.ifname.clone()),
                ("namespace", a.pod_namespace.clone().unwrap_or_default()),
                ("pod", a.pod_name.clone().unwrap_or_default()),
            ];
            let c = map
                .as_ref()
                .and_then(|m| m.get(a.ifindex).ok())
                .unwrap_or_default();
            (labels, a.kind == AttachmentKind::Host, c)
        })
        .collect();
    type ByVerdict = fn(&Counters) -> [(&'static str, u64); 2];
    let by_verdict: [(&str, &str, ByVerdict); 2] = [
        ("packets", "Packets seen per attachment and verdict.", |c| {
            [("denied", c.denied_packets), ("allowed", c.allowed_packets)]
        }),
        ("bytes", "Bytes seen per attachment and verdict.", |c| {
            [("denied", c.denied_bytes), ("allowed", c.allowed_bytes)]
        }),
    ];
    for (name, help, values) in by_verdict {
        counters(
            e,
            name,
            help,
            rows.iter().flat_map(|(l, _, c)| {
                values(c).map(|(verdict, n)| {
                    let mut labels = l.clone();
                    labels.push(("verdict", verdict.to_owned()));
                    (labels, n)
                })
            }),
        )?;
    }
    counters(
        e,
        "deny_events_suppressed",
        "Deny events not logged (rate limit or full ring buffer).",
        rows.iter()
            .map(|(l, _, c)| (l.clone(), u64::from(c.events_suppressed))),
    )?;
    counters(
        e,
        "packets_judged_before",
        "Host interfaces: forwarded packets passed without a lookup because a pod's veth already judged or exempted them (included in the allowed packets).",
        rows.iter()
            .filter(|(_, host, _)| *host)
            .map(|(l, _, c)| (l.clone(), c.judged_before_packets)),
    )
}

#[cfg(test)]
mod tests {
    use egress_deny_datapath::paths::{PinLayout, StateLayout};
    use prometheus_client::encoding::prometheus_text;

    use super::*;

    /// The names the dashboard and the alerts query, in the Prometheus text format,
    /// rendered for a node with nothing pinned yet (no root needed).
    #[test]
    fn every_metric_keeps_its_name_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(Shared::new(
            PinLayout::new(dir.path().join("pins")),
            StateLayout::new(dir.path().join("state")),
            dir.path().join("net.d"),
        ));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry(shared)).unwrap();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "egress_deny_rules gauge",
                "egress_deny_last_sync_timestamp_seconds gauge",
                "egress_deny_last_sync_duration_seconds gauge",
                "egress_deny_last_sync_success gauge",
                "egress_deny_last_successful_sync_timestamp_seconds gauge",
                "egress_deny_sync_errors_total counter",
                "egress_deny_table_bytes gauge",
                "egress_deny_table_ranges gauge",
                "egress_deny_table_build_seconds gauge",
                "egress_deny_table_swap_seconds gauge",
                "egress_deny_host_interfaces_unfiltered gauge",
                "egress_deny_attachment_repairs_total counter",
                "egress_deny_ready gauge",
                "egress_deny_attachments gauge",
                "egress_deny_packets_total counter",
                "egress_deny_bytes_total counter",
                "egress_deny_deny_events_suppressed_total counter",
                "egress_deny_packets_judged_before_total counter",
            ]
        );
        assert!(text.contains("egress_deny_rules{family=\"ipv6\",action=\"allow\"} 0\n"));
        assert!(text.contains("egress_deny_ready 0\n"));
        assert!(
            text.contains("egress_deny_attachments{kind=\"host\"} 0\n"),
            "{text}"
        );
    }
}
