//! Every number one run of one test yields, and their averaging over paired runs.
/// Declares [`Sample`]: every per-run number, NaN until the test that measures it ran.
/// One list of fields gives the struct, its CSV header and field-wise averaging.
macro_rules! sample {
    ($($(#[$m:meta])* $f:ident),* $(,)?) => {
        #[derive(Clone, Copy, Debug)]
        pub struct Sample { $($(#[$m])* pub $f: f64,)* }

        impl Sample {
            pub const NAMES: &[&str] = &[$(stringify!($f)),*];

            pub fn values(&self) -> Vec<f64> {
                vec![$(self.$f),*]
            }

            fn from_values(v: &[f64]) -> Self {
                let mut it = v.iter().copied();
                Self { $($f: it.next().unwrap_or(f64::NAN)),* }
            }
        }

        impl Default for Sample {
            fn default() -> Self {
                Self { $($f: f64::NAN),* }
            }
        }
    };
}

sample! {
    /// iperf3 1470-byte datagrams, unlimited rate: received Mbit/s.
    udp_mbps,
    udp_loss_pct,
    /// Own sender, 64-byte datagrams, one destination: received packets/s.
    pps,
    /// Own sender, one destination: datagrams handed to the kernel per second.
    pps_sent,
    /// Own sender, many destinations: packets/s that reached allowed destinations.
    pps_many,
    /// Own sender, many destinations: share of the packets to denied destinations that
    /// arrived anyway (1 without a filter, 0 with a working one).
    many_denied_arrived,
    /// bpf_stats of the attached program: ns per run, one destination / many.
    ns_pkt,
    ns_pkt_many,
    /// Program runs per packet sent (sanity: ≈ 1 when nothing is dropped earlier).
    runs_per_sent,
    /// CPU of the forwarding CPU's work (sender thread + ksoftirqd, schedstat ns) per
    /// packet that got through the path to a verdict, one destination / many. Time the
    /// sender spends descheduled (other people's work) is not in it, so it is far less
    /// sensitive to a shared machine's load than packets/s.
    cpu_ns_pkt_single,
    cpu_ns_pkt_many,
    /// The receiver thread's CPU per packet received, one destination / many.
    recv_ns_pkt_single,
    recv_ns_pkt_many,
    /// iperf3 at a fixed 1 Gbit/s: CPU of client + server + ksoftirqd (schedstat ns), %
    /// of one core and ns per received datagram, and the rate reached.
    cpu_pct,
    cpu_ns_pkt,
    cpu_rate_mbps,
    /// Busy share of the whole machine (all cores, /proc/stat) in the same window:
    /// context only (it includes other people's work).
    machine_busy_pct,
    ping_avg_ms,
    ping_p99_ms,
    ping_loss_pct,
    rr_p50_us,
    rr_p99_us,
    rr_count,
}

impl Sample {
    /// Field-wise mean of the finite values (NaN where none is).
    pub fn mean(samples: &[Sample]) -> Sample {
        let rows: Vec<Vec<f64>> = samples.iter().map(Sample::values).collect();
        let mean: Vec<f64> = (0..Sample::NAMES.len())
            .map(|i| {
                let finite: Vec<f64> = rows
                    .iter()
                    .map(|r| r[i])
                    .filter(|v| v.is_finite())
                    .collect();
                if finite.is_empty() {
                    f64::NAN
                } else {
                    finite.iter().sum::<f64>() / finite.len() as f64
                }
            })
            .collect();
        Sample::from_values(&mean)
    }

    /// Takes over every field `other` has measured.
    pub fn merge(&mut self, other: &Sample) {
        let mut mine = self.values();
        for (m, o) in mine.iter_mut().zip(other.values()) {
            if o.is_finite() {
                *m = o;
            }
        }
        *self = Sample::from_values(&mine);
    }
}
