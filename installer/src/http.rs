//! The HTTP listener for `/metrics`, `/healthz` (the process answers) and `/readyz`
//! (see [`Shared::readiness`]).
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
    io::{self, Read, Write},
    net::SocketAddr,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use mio::{Events, Interest, Poll, Token, net::TcpListener};
use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::daemon::shared::Shared;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropReason {
    reason: &'static str,
}

/// The listener's own health, exported with the node's metrics.
struct ListenerCounters {
    bind_failures: Counter,
    dropped: Family<DropReason, Counter>,
}

impl ListenerCounters {
    /// `Registry::register` ends each help text with a full stop.
    fn register(registry: &mut Registry) -> Self {
        let counters = Self {
            bind_failures: Counter::default(),
            dropped: Family::default(),
        };
        registry.register(
            "http_bind_failures",
            "Failed attempts to bind the HTTP listener (port taken); retried in the background",
            counters.bind_failures.clone(),
        );
        registry.register(
            "http_connections_dropped",
            "HTTP connections closed unanswered: past a deadline, evicted for a newer one at the connection limit, or refused at it",
            counters.dropped.clone(),
        );
        // Every reason from the start, so that a rate over them never sees a new series.
        for reason in ["timeout", "evicted", "refused"] {
            drop(counters.dropped.get_or_create(&DropReason { reason }));
        }
        counters
    }

    fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&DropReason { reason }).inc();
    }
}

/// What the listener thread answers with.
struct Endpoints {
    shared: Arc<Shared>,
    registry: Registry,
    counters: ListenerCounters,
}

/// Starts the listener thread and returns at once: binding (and retrying it) happens
/// there, so that nothing before the first rules sync waits for a port. `registry`
/// holds the node's metrics; the listener adds its own.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>, mut registry: Registry) -> Result<()> {
    let counters = ListenerCounters::register(&mut registry);
    let endpoints = Endpoints {
        shared,
        registry,
        counters,
    };
    thread::Builder::new().name("http".into()).spawn(move || {
        let listener = bind(addr, &endpoints.counters);
        if let Err(e) = serve_on(listener, &endpoints) {
            log::error!("HTTP listener on {addr} stopped: {e}");
        }
    })?;
    Ok(())
}

fn bind(addr: SocketAddr, counters: &ListenerCounters) -> TcpListener {
    let mut wait = Duration::from_millis(250);
    let mut said: Option<String> = None;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => {
                let failures = counters.bind_failures.get();
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
                counters.bind_failures.inc();
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

fn serve_on(mut listener: TcpListener, endpoints: &Endpoints) -> io::Result<()> {
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
                accept(
                    &listener,
                    &poll,
                    &mut connections,
                    &mut next,
                    &endpoints.counters,
                );
                continue;
            }
            let token = event.token();
            let Some(connection) = connections.get_mut(&token) else {
                continue;
            };
            if !progress(connection, endpoints) {
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
            endpoints.counters.dropped("timeout");
            close(&poll, &mut connections, token);
        }
    }
}

fn accept(
    listener: &TcpListener,
    poll: &Poll,
    connections: &mut HashMap<Token, Connection>,
    next: &mut usize,
    counters: &ListenerCounters,
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
                    counters.dropped("evicted");
                    close(poll, connections, token);
                }
                None => {
                    counters.dropped("refused");
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
fn progress(connection: &mut Connection, endpoints: &Endpoints) -> bool {
    if let Phase::Reading(buffer) = &mut connection.phase {
        let mut chunk = [0u8; 2048];
        let response = loop {
            match connection.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    buffer.extend_from_slice(&chunk[..n]);
                    if let Some(response) = respond_to(buffer, endpoints) {
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
fn respond_to(buffer: &[u8], endpoints: &Endpoints) -> Option<Vec<u8>> {
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
                let (code, body, content_type) = endpoints.answer(request.path.unwrap_or("/"));
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
        500 => "Internal Server Error",
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

impl Endpoints {
    /// Status, body and content type for a GET of `path`.
    fn answer(&self, path: &str) -> (u16, String, &'static str) {
        // Probes may add a query string; the endpoints take none.
        match path.split('?').next().unwrap_or(path) {
            "/healthz" => (200, "ok\n".to_owned(), "text/plain"),
            "/readyz" => match self.shared.readiness() {
                Ok(()) => (200, "ready\n".to_owned(), "text/plain"),
                Err(why) => (503, format!("not ready: {why}\n"), "text/plain"),
            },
            "/metrics" => {
                let mut body = String::new();
                match prometheus_text::encode(&mut body, &self.registry) {
                    Ok(()) => (200, body, prometheus_text::CONTENT_TYPE),
                    Err(_) => (
                        500,
                        "encoding the metrics failed\n".to_owned(),
                        "text/plain",
                    ),
                }
            }
            _ => (404, "not found\n".to_owned(), "text/plain"),
        }
    }
}
