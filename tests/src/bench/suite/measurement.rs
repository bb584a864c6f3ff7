//! The traffic tests, each run with one filter switched on: iperf3 UDP throughput and
//! CPU at a fixed rate, the own sender's packets/s to one and to many destinations (with
//! the filter program's bpf_stats and the path's schedstat CPU), ping and UDP
//! request/response latency. One run of one test gives a [`Sample`].
pub mod blast;
pub mod bpf_stats;
pub mod cpu;
pub mod destinations;
pub mod iperf;
pub mod latency;
pub mod sample;
pub mod setup_time;

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::Result;

use self::{
    blast::blast,
    bpf_stats::program_stats,
    cpu::traffic_cpu,
    iperf::{iperf, udp_received},
    latency::{drain, ping, request_response},
    sample::Sample,
};
use super::{mechanisms::Filter, topology::Topology};

#[derive(Clone, Copy, Debug)]
pub enum Test {
    Udp,
    PpsSingle,
    PpsMany,
    Cpu,
    Ping,
    RequestResponse,
}

pub const TESTS: [Test; 6] = [
    Test::Udp,
    Test::PpsSingle,
    Test::PpsMany,
    Test::Cpu,
    Test::Ping,
    Test::RequestResponse,
];

pub struct Measurer<'a> {
    pub topo: &'a Topology,
    pub server_pid: u32,
    pub secs: u32,
    pub blast_secs: f64,
    pub many: Arc<Vec<(Ipv4Addr, bool)>>,
    pub single: Arc<Vec<(Ipv4Addr, bool)>>,
    pub notes: &'a mut BTreeSet<String>,
}

impl Measurer<'_> {
    fn note_err<T>(&mut self, what: &str, label: &str, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("  {label}: {what} failed: {e:#}");
                self.notes.insert(format!("{label}: {what} failed: {e:#}"));
                None
            }
        }
    }

    /// Runs one test (with the filter under test switched on) and returns its numbers.
    pub fn run(&mut self, test: Test, label: &str, filter: &Filter) -> Sample {
        let (topo, secs) = (self.topo, self.secs);
        let mut s = Sample::default();
        drain(topo);
        match test {
            Test::Udp => {
                let r = iperf(topo, &["-u", "-b", "0", "-l", "1470"], secs)
                    .and_then(|v| udp_received(&v));
                if let Some((pps, loss)) = self.note_err("UDP throughput", label, r) {
                    s.udp_mbps = pps * 1470.0 * 8.0 / 1e6;
                    s.udp_loss_pct = loss;
                }
            }
            Test::PpsSingle | Test::PpsMany => {
                let many = matches!(test, Test::PpsMany);
                let dests = if many { &self.many } else { &self.single };
                let before = program_stats(filter);
                let r = blast(topo, dests, self.blast_secs);
                let after = program_stats(filter);
                let what = if many {
                    "packets/s, many destinations"
                } else {
                    "packets/s, one destination"
                };
                if let Some(b) = self.note_err(what, label, r) {
                    let (ns, runs) = match (before, after) {
                        (Some(b0), Some(b1)) if b1.1 > b0.1 => (
                            (b1.0 - b0.0) as f64 / (b1.1 - b0.1) as f64,
                            (b1.1 - b0.1) as f64,
                        ),
                        _ => (f64::NAN, f64::NAN),
                    };
                    let secs = b.secs.max(1e-3);
                    // Packets that reached a verdict: the allowed ones that arrived,
                    // scaled by the sent mix (with a filter the denied ones are dropped
                    // by it; without, they arrive too). Packets dropped before the
                    // filter (a full backlog behind a slow one) are not counted.
                    let allowed_sent = b.sent.saturating_sub(b.sent_denied).max(1) as f64;
                    let processed = (b.received as f64 * b.sent as f64 / allowed_sent).max(1.0);
                    let cpu = b.forward_ns / processed;
                    let recv = b.recv_ns / ((b.received + b.received_denied).max(1) as f64);
                    if many {
                        s.pps_many = b.received as f64 / secs;
                        s.many_denied_arrived =
                            b.received_denied as f64 / (b.sent_denied.max(1) as f64);
                        s.ns_pkt_many = ns;
                        s.cpu_ns_pkt_many = cpu;
                        s.recv_ns_pkt_many = recv;
                    } else {
                        s.pps = b.received as f64 / secs;
                        s.pps_sent = b.sent as f64 / secs;
                        s.ns_pkt = ns;
                        s.runs_per_sent = runs / b.sent.max(1) as f64;
                        s.cpu_ns_pkt_single = cpu;
                        s.recv_ns_pkt_single = recv;
                    }
                }
            }
            Test::Cpu => {
                // CPU while 1 Gbit/s flows, sampled inside the run (not its start-up
                // and tear-down).
                let server_pid = self.server_pid;
                let sampler = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(400));
                    traffic_cpu(server_pid, Duration::from_secs_f64(f64::from(secs) - 0.7))
                });
                let r = iperf(topo, &["-u", "-b", "1G", "-l", "1470"], secs)
                    .and_then(|v| udp_received(&v));
                let (cpu_ns, wall, machine) =
                    sampler.join().unwrap_or((f64::NAN, f64::NAN, f64::NAN));
                if let Some((pps, _)) = self.note_err("CPU at 1 Gbit/s", label, r) {
                    s.cpu_pct = 100.0 * cpu_ns / 1e9 / wall;
                    s.cpu_ns_pkt = cpu_ns / (pps * wall).max(1.0);
                    s.machine_busy_pct = machine;
                    s.cpu_rate_mbps = pps * 1470.0 * 8.0 / 1e6;
                }
            }
            Test::Ping => {
                let r = ping(topo);
                if let Some((avg, p99, loss)) = self.note_err("ping", label, r) {
                    s.ping_avg_ms = avg;
                    s.ping_p99_ms = p99;
                    s.ping_loss_pct = loss;
                }
            }
            Test::RequestResponse => {
                let r = request_response(topo, 2000, Duration::from_secs(5));
                if let Some((p50, p99, n)) = self.note_err("UDP request/response", label, r) {
                    s.rr_p50_us = p50;
                    s.rr_p99_us = p99;
                    s.rr_count = n as f64;
                }
            }
        }
        s
    }
}
