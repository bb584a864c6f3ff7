//! Traffic probes between namespaces, decided without sleeps.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use egress_deny_datapath::netns::NetnsGuard;

use crate::Netns;

/// Binds a UDP socket inside `ns` (the socket stays in that namespace).
pub fn bind_in(ns: &Netns, addr: &str) -> Result<UdpSocket> {
    let _guard = NetnsGuard::enter(&ns.path())?;
    let socket = UdpSocket::bind(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(socket)
}

/// Pins the calling thread to the CPU it is on, so that packets it sends through veths
/// are queued on one CPU's backlog and arrive in the order they were sent.
pub struct CpuPin {
    previous: libc::cpu_set_t,
}

impl CpuPin {
    pub fn current() -> Self {
        // SAFETY: libc affinity calls on the current thread with plain cpu_set_t values.
        unsafe {
            let mut previous: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, std::mem::size_of_val(&previous), &mut previous);
            let mut only: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(libc::sched_getcpu().max(0) as usize, &mut only);
            libc::sched_setaffinity(0, std::mem::size_of_val(&only), &only);
            Self { previous }
        }
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved above.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of_val(&self.previous), &self.previous)
        };
    }
}

/// Sends `count` datagrams from `from` to `target`, then a marker to `marker` (another
/// address of the same receiver in `to`, known to be allowed). Sent from one CPU, they
/// arrive in order, so once the marker is in, every probe that was not dropped is in
/// too: returns how many of the probes arrived.
pub fn udp_through(
    from: &Netns,
    to: &Netns,
    target: &str,
    marker: &str,
    count: usize,
) -> Result<usize> {
    let v6 = target.contains(':');
    // An ephemeral port per probe, so probes can run in parallel.
    let receiver = bind_in(to, if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
    let port = receiver.local_addr()?.port();
    let sender = bind_in(from, if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
    let target = SocketAddr::new(target.parse::<IpAddr>()?, port);
    let marker_addr = SocketAddr::new(marker.parse::<IpAddr>()?, port);
    let _pin = CpuPin::current();
    for i in 0..count {
        sender.send_to(format!("probe {i}").as_bytes(), target)?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut through = 0;
    let mut buf = [0u8; 64];
    loop {
        // Re-sent until it arrives: the first packets may wait for neighbour resolution.
        sender.send_to(b"marker", marker_addr)?;
        while let Ok(n) = receiver.recv(&mut buf) {
            if &buf[..n] == b"marker" {
                return Ok(through);
            }
            through += 1;
        }
        if Instant::now() > deadline {
            bail!("marker to {marker} never arrived");
        }
    }
}

/// `ping` from inside `ns`; true when replies came back.
pub fn ping(ns: &Netns, dst: &str) -> bool {
    ns.exec("ping", &["-c", "2", "-i", "0.2", "-W", "1", dst])
        .is_ok()
}

/// A paced UDP flood from `from` to one destination in `to`, counting what is sent and
/// what arrives, until [`Flood::finish`]. For "not one packet leaks" tests.
pub struct Flood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: Option<std::thread::JoinHandle<usize>>,
    receiver: Option<std::thread::JoinHandle<usize>>,
}

impl Flood {
    pub fn start(from: &Netns, to: &Netns, target: &str) -> Result<Self> {
        use std::sync::{Arc, atomic::AtomicBool, atomic::Ordering};
        let receiver = bind_in(to, &format!("{target}:0"))?;
        let port = receiver.local_addr()?.port();
        let target: IpAddr = target.parse()?;
        let sender = bind_in(
            from,
            if target.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            },
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let counting = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut arrived, mut buf) = (0, [0u8; 64]);
                while !stop.load(Ordering::Relaxed) {
                    if receiver.recv(&mut buf).is_ok() {
                        arrived += 1;
                    }
                }
                // Drain what was in flight: until one read timeout passes quietly.
                while receiver.recv(&mut buf).is_ok() {
                    arrived += 1;
                }
                arrived
            })
        };
        let sending = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let _pin = CpuPin::current();
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    if sender.send_to(b"leak?", (target, port)).is_ok() {
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_micros(200)); // pacing, not synchronisation
                }
                sent
            })
        };
        Ok(Self {
            stop,
            sender: Some(sending),
            receiver: Some(counting),
        })
    }

    /// Stops the flood: (sent, arrived). The receiver drains until a read timeout
    /// passes quietly, so a packet in flight is still counted.
    pub fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self.sender.take().map_or(0, |h| h.join().unwrap_or(0));
        let arrived = self.receiver.take().map_or(0, |h| h.join().unwrap_or(0));
        (sent, arrived)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
