//! Set-up time: from applying a rule set until a destination inside it is dropped,
//! watched by probes every half millisecond.
use std::{
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    bench::suite::{
        mechanisms::{Applier, Filter, Phases, Prepared, SIZE_DEPENDENT},
        topology::{SERVER, Topology},
    },
    probe::bind_in,
};

/// Probe interval of the set-up test (the issue asks for ≤ 1 ms).
const PROBE_INTERVAL: Duration = Duration::from_micros(500);

/// How applying one mechanism's rule set went (all empty for `none`).
#[derive(Clone, Debug, Default)]
pub struct Setup {
    pub phases: Phases,
    /// Wall time of applying (all phases).
    pub apply: Option<Duration>,
    /// Applying started → the test destination dropped. None: it never was.
    pub effective: Option<Duration>,
}

impl Setup {
    /// The time of the phases that grow with the rule count.
    pub fn size_dependent(&self) -> Duration {
        self.phases
            .iter()
            .filter(|(p, _)| SIZE_DEPENDENT.contains(p))
            .map(|(_, d)| *d)
            .sum()
    }
}

/// A UDP probe every `PROBE_INTERVAL` from the pod to `target` (inside the rule list,
/// routed to the server); the drop began when the first probe that never arrived was
/// sent.
struct Prober {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Instant>>>,
    /// 1 + the highest sequence number received (0: none yet).
    received: Arc<AtomicU64>,
    last_arrival: Arc<Mutex<Option<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(topo: &Topology, target: Ipv4Addr) -> Result<Self> {
        let receiver = bind_in(&topo.server, &format!("{target}:0"))?;
        receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
        let port = receiver.local_addr()?.port();
        let sender = bind_in(&topo.pod, "0.0.0.0:0")?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let received = Arc::new(AtomicU64::new(0));
        let last_arrival = Arc::new(Mutex::new(None));
        let send_thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sent.lock().unwrap().push(Instant::now());
                    let _ = sender.send_to(&seq.to_be_bytes(), (target, port));
                    seq += 1;
                    next += PROBE_INTERVAL;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            })
        };
        let recv_thread = {
            let (stop, received, last_arrival) =
                (stop.clone(), received.clone(), last_arrival.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(8) = receiver.recv(&mut buf) {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                        received.fetch_max(seq + 1, Ordering::Relaxed);
                        *last_arrival.lock().unwrap() = Some(Instant::now());
                    }
                }
            })
        };
        Ok(Self {
            stop,
            sent,
            received,
            last_arrival,
            threads: vec![send_thread, recv_thread],
        })
    }

    fn last_arrival(&self) -> Option<Instant> {
        *self.last_arrival.lock().unwrap()
    }

    /// When the first probe that was dropped (never arrived) was sent.
    fn first_dropped_sent_at(&self) -> Option<Instant> {
        let first_lost = self.received.load(Ordering::Relaxed) as usize;
        self.sent.lock().unwrap().get(first_lost).copied()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
pub struct Applied {
    pub filter: Filter,
    pub setup: Setup,
}

/// The destination the set-up test probes: a /32 from the list, deep in it (iptables
/// evaluates in list order).
pub fn probe_target(rules: &[(u32, u8)]) -> Option<Ipv4Addr> {
    rules
        .iter()
        .rev()
        .find(|(_, l)| *l == 32)
        .map(|(a, _)| Ipv4Addr::from(*a))
}

/// Applies `mechanism`'s rule set while probing a destination inside it.
pub fn apply_timed(applier: &mut Applier<'_>, mechanism: &str, p: &Prepared) -> Result<Applied> {
    let topo = applier.topo;
    let target = probe_target(&p.rules).context("a /32 in the rule list")?;
    topo.server.ip(&format!("addr add {target}/32 dev lo"))?;
    topo.node
        .ip(&format!("route add {target}/32 via {SERVER}"))?;
    let result = (|| -> Result<Applied> {
        let prober = Prober::start(topo, target)?;
        let waiting = Instant::now();
        while prober.last_arrival().is_none() {
            if waiting.elapsed() > Duration::from_secs(3) {
                bail!("set-up probes to {target} do not arrive before any filter");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        let (filter, phases) = applier.apply(mechanism, p)?;
        let apply = started.elapsed();
        // Dropped once no probe arrived for 250 ms (a few hundred probe intervals).
        let deadline = Instant::now() + Duration::from_secs(20);
        let effective = loop {
            let quiet = prober
                .last_arrival()
                .is_none_or(|t| t.elapsed() > Duration::from_millis(250));
            if quiet {
                break prober
                    .first_dropped_sent_at()
                    .map(|t| t.saturating_duration_since(started));
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(Applied {
            filter,
            setup: Setup {
                phases,
                apply: Some(apply),
                effective,
            },
        })
    })();
    let _ = topo.node.ip(&format!("route del {target}/32"));
    let _ = topo.server.ip(&format!("addr del {target}/32 dev lo"));
    result
}
