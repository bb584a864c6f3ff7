//! The suite's own UDP sender and receiver: iperf3 sends to one address; this one also
//! cycles through thousands, and counts leaks to denied destinations apart from allowed
//! traffic, with the CPU both sides spent.
use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::cpu::{CLIENT_CPU, PinThread, SERVER_CPU, ksoftirqd_ns, pids_named, thread_ns};
use crate::{bench::suite::topology::Topology, probe::bind_in};

/// Datagram payload (64 bytes, as `iperf3 -l 64`); byte 0 says whether the destination
/// is in the rule list, so the receiver can tell leaks from allowed traffic.
const BLAST_PAYLOAD: usize = 64;
/// Upper bound on datagrams per run, whatever the rate (the time limit comes first).
const BLAST_MAX_PACKETS: u64 = 50_000_000;

pub struct Blast {
    pub sent: u64,
    /// Received inside the sending window: to allowed / to denied destinations.
    pub received: u64,
    pub received_denied: u64,
    pub sent_denied: u64,
    pub secs: f64,
    /// Sender thread + ksoftirqd threads, ns.
    pub forward_ns: f64,
    /// Receiver thread, ns.
    pub recv_ns: f64,
}

/// Sends 64-byte datagrams from the pod as fast as one thread can (pinned to the CPU
/// iperf3's client uses) to `dests` in turn, for `secs` (and at most
/// `BLAST_MAX_PACKETS`); a receiver in the server namespace (pinned like iperf3's
/// server) counts what arrives while the sender runs.
pub fn blast(topo: &Topology, dests: &Arc<Vec<(Ipv4Addr, bool)>>, secs: f64) -> Result<Blast> {
    let receiver = bind_in(&topo.server, "0.0.0.0:0")?;
    receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
    // A deep socket buffer: a receiver that falls behind for a moment should not decide
    // the rate; SO_RCVBUFFORCE as root, the plain limit otherwise.
    {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 16 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt on an open socket with a c_int value of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    receiver.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
    let port = receiver.local_addr()?.port();
    let sender = bind_in(&topo.pod, "0.0.0.0:0")?;
    sender.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let recv_thread = {
        let (stop, ready) = (stop.clone(), ready.clone());
        std::thread::spawn(move || {
            let _pin = PinThread::to(SERVER_CPU.parse().unwrap_or(1));
            let started = thread_ns();
            ready.store(true, Ordering::Release);
            let (mut allowed, mut denied) = (0u64, 0u64);
            let mut buf = [0u8; 2048];
            // Bounded by the stop flag, which the caller sets once the sender is done.
            while !stop.load(Ordering::Acquire) {
                if let Ok(n) = receiver.recv(&mut buf)
                    && n >= 1
                {
                    if buf[0] == 1 {
                        denied += 1;
                    } else {
                        allowed += 1;
                    }
                }
            }
            (allowed, denied, thread_ns().saturating_sub(started))
        })
    };
    let waiting = Instant::now();
    while !ready.load(Ordering::Acquire) && waiting.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let ksoftirqd = pids_named("ksoftirqd/", false);
    let k0 = ksoftirqd_ns(&ksoftirqd);
    let send_thread = {
        let dests = dests.clone();
        std::thread::spawn(move || {
            let _pin = PinThread::to(CLIENT_CPU.parse().unwrap_or(0));
            let targets: Vec<(std::net::SocketAddr, bool)> =
                dests.iter().map(|(a, d)| ((*a, port).into(), *d)).collect();
            let mut payload = [0u8; BLAST_PAYLOAD];
            let (mut sent, mut sent_denied) = (0u64, 0u64);
            let cpu0 = thread_ns();
            let started = Instant::now();
            let limit = Duration::from_secs_f64(secs);
            let mut i = 0usize;
            'outer: loop {
                // The clock is read every 64 datagrams (one send is microseconds).
                for _ in 0..64 {
                    let (addr, denied) = targets[i % targets.len()];
                    i += 1;
                    payload[0] = u8::from(denied);
                    payload[1..9].copy_from_slice(&sent.to_be_bytes());
                    if sender.send_to(&payload, addr).is_ok() {
                        sent += 1;
                        sent_denied += u64::from(denied);
                    }
                }
                if started.elapsed() >= limit || sent >= BLAST_MAX_PACKETS {
                    break 'outer;
                }
            }
            (
                sent,
                sent_denied,
                started.elapsed().as_secs_f64(),
                thread_ns().saturating_sub(cpu0),
            )
        })
    };
    let sent = send_thread.join();
    stop.store(true, Ordering::Release);
    let received = recv_thread.join();
    let k1 = ksoftirqd_ns(&ksoftirqd);
    let (Ok((sent, sent_denied, secs, send_ns)), Ok((allowed, denied, recv_ns))) = (sent, received)
    else {
        bail!("sender or receiver thread panicked");
    };
    Ok(Blast {
        sent,
        received: allowed,
        received_denied: denied,
        sent_denied,
        secs,
        forward_ns: (send_ns + k1.saturating_sub(k0)) as f64,
        recv_ns: recv_ns as f64,
    })
}
