//! HTTP endpoints for the DaemonSet: `/metrics` (Prometheus text format), `/healthz`
//! (the process answers) and `/readyz` (program and maps pinned, rules synced at least
//! once, conflist entry present).
use std::{fmt::Write as _, net::SocketAddr, sync::Arc, sync::atomic::Ordering, thread};

use anyhow::{Context, Result};
use egress_deny_datapath::{
    counters::CounterMap,
    paths::{ALL_MAPS, ProgramKind},
};

use crate::{conflist, daemon::Shared, status};

pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("listening on {addr}"))?;
    log::info!("serving /metrics, /healthz, /readyz on {addr}");
    thread::Builder::new().name("http".into()).spawn(move || {
        for request in server.incoming_requests() {
            let (code, body, content_type) = match request.url() {
                "/healthz" => (200, "ok\n".to_owned(), "text/plain"),
                "/readyz" => match readiness(&shared) {
                    Ok(()) => (200, "ready\n".to_owned(), "text/plain"),
                    Err(why) => (503, format!("not ready: {why}\n"), "text/plain"),
                },
                "/metrics" => (200, render(&shared), "text/plain; version=0.0.4"),
                _ => (404, "not found\n".to_owned(), "text/plain"),
            };
            let header =
                tiny_http::Header::from_bytes("Content-Type", content_type).expect("static header");
            let response = tiny_http::Response::from_string(body)
                .with_status_code(code)
                .with_header(header);
            let _ = request.respond(response);
        }
    })?;
    Ok(())
}

pub fn readiness(shared: &Shared) -> Result<(), String> {
    for kind in ProgramKind::ALL {
        if !shared.layout.program(kind).exists() {
            return Err(format!("{} is not pinned", kind.name()));
        }
    }
    for map in ALL_MAPS {
        if !shared.layout.map(map).exists() {
            return Err(format!("map {map} is not pinned"));
        }
    }
    if shared.staged.load(Ordering::Relaxed) {
        return Err(
            "upgrade staged: the replaced rule maps do not hold a valid rule set yet (the previous program keeps enforcing)".into(),
        );
    }
    // A valid rule set enforced in the pinned maps: synced by this daemon, or by a
    // previous one whose rules are still in force while the current files are rejected.
    if !shared.synced_once.load(Ordering::Relaxed)
        && !egress_deny_datapath::events::rules_loaded(&shared.layout).unwrap_or(false)
    {
        return Err("no valid rule set loaded yet".into());
    }
    if !conflist::present(&shared.conf_dir) {
        return Err(format!(
            "no egress-deny entry in the primary CNI configuration in {}",
            shared.conf_dir.display()
        ));
    }
    Ok(())
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(shared: &Shared) -> String {
    let mut out = String::new();
    let status = shared.status.lock().expect("status").clone();
    let sync = status.last_sync.clone().unwrap_or_default();

    metric(
        &mut out,
        "egress_deny_rules",
        "gauge",
        "Rules enforced, by address family and action (protections included).",
    );
    for (family, action, n) in [
        ("ipv4", "deny", sync.rules.v4_deny),
        ("ipv4", "allow", sync.rules.v4_allow),
        ("ipv6", "deny", sync.rules.v6_deny),
        ("ipv6", "allow", sync.rules.v6_allow),
    ] {
        let _ = writeln!(
            out,
            "egress_deny_rules{{family=\"{family}\",action=\"{action}\"}} {n}"
        );
    }
    metric(
        &mut out,
        "egress_deny_last_sync_timestamp_seconds",
        "gauge",
        "Unix time of the last rules sync attempt.",
    );
    let _ = writeln!(out, "egress_deny_last_sync_timestamp_seconds {}", sync.time);
    metric(
        &mut out,
        "egress_deny_last_sync_duration_seconds",
        "gauge",
        "Duration of the last rules sync attempt.",
    );
    let _ = writeln!(
        out,
        "egress_deny_last_sync_duration_seconds {}",
        sync.duration_ms as f64 / 1000.0
    );
    metric(
        &mut out,
        "egress_deny_last_sync_success",
        "gauge",
        "1 if the last rules sync was applied, 0 if it was rejected.",
    );
    let _ = writeln!(out, "egress_deny_last_sync_success {}", u8::from(sync.ok));
    metric(
        &mut out,
        "egress_deny_last_successful_sync_timestamp_seconds",
        "gauge",
        "Unix time of the last applied rules sync.",
    );
    let _ = writeln!(
        out,
        "egress_deny_last_successful_sync_timestamp_seconds {}",
        status.last_success
    );
    metric(
        &mut out,
        "egress_deny_sync_errors_total",
        "counter",
        "Rules updates rejected since the daemon started.",
    );
    let _ = writeln!(
        out,
        "egress_deny_sync_errors_total {}",
        status.sync_errors_total
    );
    metric(
        &mut out,
        "egress_deny_rules_pending_operations",
        "gauge",
        "After a map update failed part-way: map operations between the maps and the desired rules (retried every tick; 0 when converged).",
    );
    let _ = writeln!(
        out,
        "egress_deny_rules_pending_operations {}",
        sync.pending_operations.unwrap_or(0)
    );
    metric(
        &mut out,
        "egress_deny_host_interfaces_unfiltered",
        "gauge",
        "Host interfaces that should be filtered but are not (unsupported link type, attach error); see `status`.",
    );
    let _ = writeln!(
        out,
        "egress_deny_host_interfaces_unfiltered {}",
        status.host_interfaces_unfiltered.len()
    );
    metric(
        &mut out,
        "egress_deny_attachment_repairs_total",
        "counter",
        "Attachments found behind another program on their hook (or on an old program) and repaired.",
    );
    let _ = writeln!(
        out,
        "egress_deny_attachment_repairs_total {}",
        shared.repairs.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "egress_deny_ready",
        "gauge",
        "1 when /readyz would answer 200.",
    );
    let _ = writeln!(
        out,
        "egress_deny_ready {}",
        u8::from(readiness(shared).is_ok())
    );

    let attachments = status::attachments(&shared.layout, &shared.state);
    metric(
        &mut out,
        "egress_deny_attachments",
        "gauge",
        "Interfaces the program is attached to, by kind.",
    );
    for kind in ["pod", "host"] {
        let n = attachments.iter().filter(|a| a.kind == kind).count();
        let _ = writeln!(out, "egress_deny_attachments{{kind=\"{kind}\"}} {n}");
    }
    let counters = CounterMap::open(&shared.layout).ok();
    let mut packets = String::new();
    let mut bytes = String::new();
    let mut suppressed = String::new();
    for a in &attachments {
        let c = counters
            .as_ref()
            .and_then(|m| m.get(a.ifindex).ok())
            .unwrap_or_default();
        let labels = format!(
            "kind=\"{}\",interface=\"{}\",namespace=\"{}\",pod=\"{}\"",
            a.kind,
            escape(&a.ifname),
            escape(a.pod_namespace.as_deref().unwrap_or("")),
            escape(a.pod_name.as_deref().unwrap_or(""))
        );
        let _ = writeln!(
            packets,
            "egress_deny_packets_total{{{labels},verdict=\"denied\"}} {}",
            c.denied_packets
        );
        let _ = writeln!(
            packets,
            "egress_deny_packets_total{{{labels},verdict=\"allowed\"}} {}",
            c.allowed_packets
        );
        let _ = writeln!(
            bytes,
            "egress_deny_bytes_total{{{labels},verdict=\"denied\"}} {}",
            c.denied_bytes
        );
        let _ = writeln!(
            bytes,
            "egress_deny_bytes_total{{{labels},verdict=\"allowed\"}} {}",
            c.allowed_bytes
        );
        let _ = writeln!(
            suppressed,
            "egress_deny_deny_events_suppressed_total{{{labels}}} {}",
            c.events_suppressed
        );
    }
    metric(
        &mut out,
        "egress_deny_packets_total",
        "counter",
        "Packets seen per attachment and verdict.",
    );
    out.push_str(&packets);
    metric(
        &mut out,
        "egress_deny_bytes_total",
        "counter",
        "Bytes seen per attachment and verdict.",
    );
    out.push_str(&bytes);
    metric(
        &mut out,
        "egress_deny_deny_events_suppressed_total",
        "counter",
        "Deny events not logged (rate limit or full ring buffer).",
    );
    out.push_str(&suppressed);
    out
}
