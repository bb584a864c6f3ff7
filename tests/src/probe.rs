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
