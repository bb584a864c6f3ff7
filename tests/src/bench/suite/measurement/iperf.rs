//! iperf3: its server in the server namespace, and client runs from the pod.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cpu::{CLIENT_CPU, SERVER_CPU};
use crate::bench::suite::{
    processes::{Daemon, exec_in},
    topology::{SERVER, Topology},
};

/// Starts `iperf3 -s` in the server namespace and waits until it listens.
pub fn start_server(topo: &Topology) -> Result<Daemon> {
    let server = Daemon::start(&topo.server.name, "iperf3", &["-s", "-A", SERVER_CPU])?;
    // The server answers once its socket listens.
    let ready = Instant::now();
    while exec_in(
        &topo.server.name,
        "sh",
        &["-c", "ss -ltn | grep -q ':5201 '"],
        None,
        Duration::from_secs(5),
    )?
    .code
        != Some(0)
    {
        if ready.elapsed() > Duration::from_secs(5) {
            bail!("iperf3 server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

pub fn iperf(topo: &Topology, args: &[&str], secs: u32) -> Result<serde_json::Value> {
    let t = secs.to_string();
    let mut full = vec!["-c", SERVER, "-J", "-A", CLIENT_CPU, "-t", &t];
    full.extend_from_slice(args);
    // With a slow filter the backlog drains for a while after the test: allow for it.
    let out = exec_in(
        &topo.pod.name,
        "iperf3",
        &full,
        None,
        Duration::from_secs(u64::from(secs) + 90),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", out.stderr.trim()))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 {args:?}: {e}");
    }
    Ok(v)
}

/// (received datagrams per second, loss %) of a UDP iperf3 run, as the server saw them.
pub fn udp_received(v: &serde_json::Value) -> Result<(f64, f64)> {
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().context("packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().context("seconds")?.max(1e-3);
    Ok((
        (packets - lost).max(0.0) / seconds,
        100.0 * lost / packets.max(1.0),
    ))
}
