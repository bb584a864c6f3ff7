//! Round trips from the pod to the server: ICMP (ping) and UDP request/response, and a
//! single ping that waits out a slow filter's backlog.
use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::cpu::{CLIENT_CPU, PinThread};
use crate::{
    bench::{
        percentile,
        suite::{
            processes::exec_in,
            topology::{SERVER, Topology},
        },
    },
    probe::bind_in,
};

/// Waits until the path is idle again (a slow filter's backlog drained): one ping gets
/// its answer only after every packet queued before it.
pub fn drain(topo: &Topology) {
    let _ = exec_in(
        &topo.pod.name,
        "ping",
        &["-n", "-q", "-c", "1", "-W", "60", SERVER],
        None,
        Duration::from_secs(70),
    );
}

/// `ping -i 0.001 -c 1000`: (average ms, p99 ms from the per-packet times, loss %).
pub fn ping(topo: &Topology) -> Result<(f64, f64, f64)> {
    let out = exec_in(
        &topo.pod.name,
        "taskset",
        &[
            "-c", CLIENT_CPU, "ping", "-n", "-i", "0.001", "-c", "1000", "-W", "2", "-w", "25",
            SERVER,
        ],
        None,
        Duration::from_secs(40),
    )?;
    let mut times: Vec<f64> = out
        .stdout
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    if times.is_empty() {
        bail!("no ping replies: {}", out.stderr.trim());
    }
    times.sort_by(f64::total_cmp);
    let avg = times.iter().sum::<f64>() / times.len() as f64;
    let loss = 100.0 * (1000usize.saturating_sub(times.len())) as f64 / 1000.0;
    Ok((avg, percentile(&times, 0.99), loss))
}

/// UDP request/response round trips from the pod to an echo responder in the server
/// namespace, one at a time: up to `count` of them or `max` time. (p50 µs, p99 µs, n).
pub fn request_response(topo: &Topology, count: usize, max: Duration) -> Result<(f64, f64, usize)> {
    let server = bind_in(&topo.server, &format!("{SERVER}:0"))?;
    server.set_read_timeout(Some(Duration::from_millis(20)))?;
    let port = server.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Same CPU as the client: the whole round trip (both softirq passes too)
            // then stays on CPU 0, without cross-CPU wake-ups of an idle vCPU, which cost
            // tens of µs on a VM and would drown the filters' sub-µs differences.
            let _pin = PinThread::to(0);
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        })
    };
    let result = (|| -> Result<Vec<f64>> {
        let _pin = PinThread::to(0);
        let client: UdpSocket = bind_in(&topo.pod, "0.0.0.0:0")?;
        client.connect((SERVER, port))?;
        client.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut rtts = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        let mut payload = [0u8; 32];
        let began = Instant::now();
        for i in 0..count as u64 {
            if began.elapsed() > max {
                break;
            }
            payload[..8].copy_from_slice(&i.to_be_bytes());
            let started = Instant::now();
            client.send(&payload)?;
            // Skip stale answers (of requests that timed out before).
            while let Ok(n) = client.recv(&mut buf) {
                if n >= 8 && buf[..8] == i.to_be_bytes() {
                    rtts.push(started.elapsed().as_secs_f64() * 1e6);
                    break;
                }
            }
        }
        Ok(rtts)
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    let mut rtts = result?;
    if rtts.is_empty() {
        bail!("no answers");
    }
    rtts.sort_by(f64::total_cmp);
    Ok((percentile(&rtts, 0.5), percentile(&rtts, 0.99), rtts.len()))
}
