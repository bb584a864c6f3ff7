//! HTTP endpoints for the DaemonSet: `/metrics` (Prometheus text format), `/healthz`
//! (the process answers) and `/readyz` (program and maps pinned, rules synced at least
//! once, conflist entry present).
//!
//! One thread serves every connection from a `mio` event loop with non-blocking
//! sockets: a client that never reads, never finishes its request or never sends one
//! holds a slot in a bounded table and a deadline, never the thread, so `/healthz` (the
//! liveness probe) keeps answering. tiny_http, used before, has no socket timeouts,
//! spawns a thread per connection without a bound and writes responses blocking on
//! the one thread that serves every request. Binding is retried in the background: a
//! taken port must not keep the rules from being synced and enforced.
use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, Read, Write},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use egress_deny_datapath::{
    counters::CounterMap,
    paths::{ALL_MAPS, ProgramKind},
};
use mio::{Events, Interest, Poll, Token, net::TcpListener};

use crate::{
    attachments::{AttachmentKind, attachments},
    conflist,
    daemon::Shared,
};

/// Open connections at most; a new one beyond it takes the slot of the oldest one
/// still waiting for its request (or is closed when every slot is being answered).
const MAX_CONNECTIONS: usize = 64;
/// For the whole request head to arrive, and for the whole response to be taken.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const RESPONSE_DEADLINE: Duration = Duration::from_secs(5);
/// Probes and scrapes send a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
const BIND_RETRY_MAX: Duration = Duration::from_secs(5);
const LISTENER: Token = Token(0);

/// Counters for `/metrics` (process-wide: there is one listener).
static BIND_FAILURES: AtomicU64 = AtomicU64::new(0);
static TIMED_OUT: AtomicU64 = AtomicU64::new(0);
static EVICTED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Starts the listener thread and returns at once: binding (and retrying it) happens
/// there, so that nothing before the first rules sync waits for a port.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> Result<()> {
    thread::Builder::new().name("http".into()).spawn(move || {
        let listener = bind(addr);
        if let Err(e) = serve_on(listener, &shared) {
            log::error!("HTTP listener on {addr} stopped: {e}");
        }
    })?;
    Ok(())
}

fn bind(addr: SocketAddr) -> TcpListener {
    let mut wait = Duration::from_millis(250);
    let mut said: Option<String> = None;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => {
                let failures = BIND_FAILURES.load(Ordering::Relaxed);
                if failures == 0 {
                    log::info!("serving /metrics, /healthz, /readyz on {addr}");
                } else {
                    log::info!(
                        "serving /metrics, /healthz, /readyz on {addr} (after {failures} failed attempts)"
                    );
                }
                return listener;
            }
            Err(e) => {
                BIND_FAILURES.fetch_add(1, Ordering::Relaxed);
                // Once per distinct error: retries every few seconds would flood the log.
                let message = e.to_string();
                if said.as_ref() != Some(&message) {
                    log::error!(
                        "cannot listen on {addr}: {message}; rules are synced and enforced regardless, but /healthz, /readyz and /metrics are unavailable until it binds (retrying in the background)"
                    );
                    said = Some(message);
                }
                thread::sleep(wait);
                wait = (wait * 2).min(BIND_RETRY_MAX);
            }
        }
    }
}

enum Phase {
    /// Collecting the request head.
    Reading(Vec<u8>),
    /// Sending the response; the offset reached.
    Writing(Vec<u8>, usize),
}

struct Connection {
    stream: mio::net::TcpStream,
    accepted: Instant,
    deadline: Instant,
    phase: Phase,
}

fn serve_on(mut listener: TcpListener, shared: &Shared) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut connections: HashMap<Token, Connection> = HashMap::new();
    let mut next = 1usize;
    loop {
        let timeout = connections
            .values()
            .map(|c| c.deadline)
            .min()
            .map(|d| d.saturating_duration_since(Instant::now()));
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in &events {
            if event.token() == LISTENER {
                accept(&listener, &poll, &mut connections, &mut next);
                continue;
            }
            let token = event.token();
            let Some(connection) = connections.get_mut(&token) else {
                continue;
            };
            if !progress(connection, shared) {
                close(&poll, &mut connections, token);
            }
        }
        let now = Instant::now();
        let expired: Vec<Token> = connections
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            TIMED_OUT.fetch_add(1, Ordering::Relaxed);
            close(&poll, &mut connections, token);
        }
    }
}

fn accept(
    listener: &TcpListener,
    poll: &Poll,
    connections: &mut HashMap<Token, Connection>,
    next: &mut usize,
) {
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of file descriptors, or the peer gone before accept: the
                // connection is lost, the listener is not.
                log::debug!("accept: {e}");
                return;
            }
        };
        if connections.len() >= MAX_CONNECTIONS {
            // The oldest connection that has not sent its request yet had the longest
            // to do so; a fresh one (a probe) sends at once.
            let oldest = connections
                .iter()
                .filter(|(_, c)| matches!(c.phase, Phase::Reading(_)))
                .min_by_key(|(_, c)| c.accepted)
                .map(|(t, _)| *t);
            match oldest {
                Some(token) => {
                    EVICTED.fetch_add(1, Ordering::Relaxed);
                    close(poll, connections, token);
                }
                None => {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    continue;
                }
            }
        }
        let token = Token(*next);
        *next = next.checked_add(1).unwrap_or(1);
        if let Err(e) =
            poll.registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
        {
            log::debug!("registering a connection: {e}");
            continue;
        }
        let now = Instant::now();
        connections.insert(
            token,
            Connection {
                stream,
                accepted: now,
                deadline: now + REQUEST_DEADLINE,
                phase: Phase::Reading(Vec::new()),
            },
        );
    }
}

fn close(poll: &Poll, connections: &mut HashMap<Token, Connection>, token: Token) {
    if let Some(mut connection) = connections.remove(&token) {
        let _ = poll.registry().deregister(&mut connection.stream);
    }
}

/// Reads and writes what the socket takes without blocking (edge-triggered: until it
/// would block). Returns false when the connection is done or failed.
fn progress(connection: &mut Connection, shared: &Shared) -> bool {
    if let Phase::Reading(buffer) = &mut connection.phase {
        let mut chunk = [0u8; 2048];
        let response = loop {
            match connection.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    buffer.extend_from_slice(&chunk[..n]);
                    if let Some(response) = respond_to(buffer, shared) {
                        break response;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        };
        connection.phase = Phase::Writing(response, 0);
        connection.deadline = Instant::now() + RESPONSE_DEADLINE;
    }
    let Phase::Writing(response, offset) = &mut connection.phase else {
        return true;
    };
    while *offset < response.len() {
        match connection.stream.write(&response[*offset..]) {
            Ok(0) => return false,
            Ok(n) => *offset += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    // Everything is in the socket: closing sends it, then FIN (`Connection: close`).
    false
}

/// The response once `buffer` holds a whole request head (or can no longer become a
/// valid one).
fn respond_to(buffer: &[u8], shared: &Shared) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let (code, body, content_type, head_only) = match request.parse(buffer) {
        Ok(httparse::Status::Partial) if buffer.len() < MAX_REQUEST => return None,
        Ok(httparse::Status::Partial) => {
            (431, "request head too large\n".into(), "text/plain", false)
        }
        Err(_) => (400, "bad request\n".into(), "text/plain", false),
        Ok(httparse::Status::Complete(_)) => {
            let head_only = request.method == Some("HEAD");
            if request.method != Some("GET") && !head_only {
                (405, "only GET and HEAD\n".into(), "text/plain", false)
            } else {
                let (code, body, content_type) = endpoint(request.path.unwrap_or("/"), shared);
                (code, body, content_type, head_only)
            }
        }
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    Some(out)
}

fn endpoint(path: &str, shared: &Shared) -> (u16, String, &'static str) {
    // Probes may add a query string; the endpoints take none.
    match path.split('?').next().unwrap_or(path) {
        "/healthz" => (200, "ok\n".to_owned(), "text/plain"),
        "/readyz" => match readiness(shared) {
            Ok(()) => (200, "ready\n".to_owned(), "text/plain"),
            Err(why) => (503, format!("not ready: {why}\n"), "text/plain"),
        },
        "/metrics" => (200, render(shared), "text/plain; version=0.0.4"),
        _ => (404, "not found\n".to_owned(), "text/plain"),
    }
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
    if let Some(who) = shared.not_started.lock().expect("lock state").as_ref() {
        return Err(who.clone());
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
    // One gauge per table property, one sample per address family.
    type TableValue = fn(&crate::status::TableStatus) -> Option<f64>;
    let table_gauges: [(&str, &str, TableValue); 4] = [
        (
            "egress_deny_table_bytes",
            "Kernel memory of the compiled rule table in force, per address family.",
            |t| Some(t.bytes as f64),
        ),
        (
            "egress_deny_table_ranges",
            "Address ranges the rules compiled into, per address family.",
            |t| Some(f64::from(t.ranges)),
        ),
        (
            "egress_deny_table_build_seconds",
            "Time to compile and write the last table swapped in, per address family.",
            |t| t.build_seconds,
        ),
        (
            "egress_deny_table_swap_seconds",
            "Time of the map update that put the last table in force (includes the kernel's wait for programs still reading the old one), per address family.",
            |t| t.swap_seconds,
        ),
    ];
    for (name, help, value) in table_gauges {
        metric(&mut out, name, "gauge", help);
        for t in &sync.tables {
            if let Some(v) = value(t) {
                let _ = writeln!(out, "{name}{{family=\"ipv{}\"}} {v}", t.family);
            }
        }
    }
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

    let attachments = attachments(&shared.layout, &shared.state);
    metric(
        &mut out,
        "egress_deny_attachments",
        "gauge",
        "Interfaces the program is attached to, by kind.",
    );
    for kind in AttachmentKind::ALL {
        let n = attachments.iter().filter(|a| a.kind == kind).count();
        let _ = writeln!(out, "egress_deny_attachments{{kind=\"{kind}\"}} {n}");
    }
    let counters = CounterMap::open(&shared.layout).ok();
    let mut packets = String::new();
    let mut bytes = String::new();
    let mut suppressed = String::new();
    let mut judged_before = String::new();
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
        if a.kind == AttachmentKind::Host {
            let _ = writeln!(
                judged_before,
                "egress_deny_packets_judged_before_total{{{labels}}} {}",
                c.judged_before_packets
            );
        }
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
    metric(
        &mut out,
        "egress_deny_packets_judged_before_total",
        "counter",
        "Host interfaces: forwarded packets passed without a lookup because a pod's veth already judged or exempted them (included in the allowed packets).",
    );
    out.push_str(&judged_before);
    metric(
        &mut out,
        "egress_deny_http_bind_failures_total",
        "counter",
        "Failed attempts to bind the HTTP listener (port taken); retried in the background.",
    );
    let _ = writeln!(
        out,
        "egress_deny_http_bind_failures_total {}",
        BIND_FAILURES.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "egress_deny_http_connections_dropped_total",
        "counter",
        "HTTP connections closed unanswered: past a deadline, evicted for a newer one at the connection limit, or refused at it.",
    );
    for (reason, n) in [
        ("timeout", &TIMED_OUT),
        ("evicted", &EVICTED),
        ("refused", &REFUSED),
    ] {
        let _ = writeln!(
            out,
            "egress_deny_http_connections_dropped_total{{reason=\"{reason}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    out
}
