//! CPU time from the kernel's own accounting: per task (`schedstat`, scheduler clock) for
//! the forwarding path's threads, per machine (`/proc/stat`) for context; and pinning a
//! thread to the CPU the path runs on.
use std::time::{Duration, Instant};

/// iperf3 sender on CPU 0 (the forwarding softirq, and so the filter, runs on the
/// sender's CPU: veth hands packets to the local backlog), receiver on CPU 1.
pub const CLIENT_CPU: &str = "0";
pub const SERVER_CPU: &str = "1";

fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total, idle)
}

/// Time a task has run on a CPU, in ns (`schedstat`'s first field: the scheduler's own
/// clock, not tick samples). This kernel has no IRQ time accounting, so softirq work
/// served in a task's context (the whole veth → forward → veth → socket path runs in the
/// sender's `sendto`) is in that task's time; ksoftirqd holds the rest.
fn schedstat_ns(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Run time of every thread of `pid`, ns.
fn process_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| schedstat_ns(&format!("{}/schedstat", t.path().display())))
        .sum()
}

/// Run time of the calling thread, ns.
pub fn thread_ns() -> u64 {
    schedstat_ns("/proc/thread-self/schedstat").unwrap_or(0)
}

/// Children of this process named `comm` (`ip netns exec` execs the program in place),
/// and kernel threads whose name starts with `ksoftirqd/` when `comm` is that.
pub fn pids_named(comm: &str, children_only: bool) -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let (Some(open), Some((head, tail))) = (stat.find('('), stat.rsplit_once(')')) else {
                return false;
            };
            let name = &head[open + 1..];
            let ppid = tail.split_whitespace().nth(1).unwrap_or("");
            name.starts_with(comm) && (!children_only || ppid == me)
        })
        .collect()
}

pub fn ksoftirqd_ns(pids: &[u32]) -> u64 {
    pids.iter().map(|p| process_ns(*p)).sum()
}

/// While the client runs: (CPU ns of the iperf3 client + server + ksoftirqd threads,
/// wall seconds, busy % of all cores), over `window`.
pub fn traffic_cpu(server_pid: u32, window: Duration) -> (f64, f64, f64) {
    let client = pids_named("iperf3", true);
    let mut pids = pids_named("ksoftirqd/", false);
    pids.push(server_pid);
    pids.extend(client.iter().filter(|p| **p != server_pid));
    let sum = |pids: &[u32]| pids.iter().map(|p| process_ns(*p)).sum::<u64>();
    let (t0, i0) = cpu_ticks();
    let p0 = sum(&pids);
    let started = Instant::now();
    std::thread::sleep(window);
    let p1 = sum(&pids);
    let (t1, i1) = cpu_ticks();
    let wall = started.elapsed().as_secs_f64();
    let process = if client.is_empty() {
        f64::NAN
    } else {
        p1.saturating_sub(p0) as f64
    };
    let machine = 100.0 * (1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64);
    (process, wall, machine)
}

/// Share of all cores spent in the kernel (system, irq, softirq) over `window`.
pub fn kernel_share(window: Duration) -> f64 {
    let read = || -> Vec<u64> {
        std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|f| f.parse().ok())
            .collect()
    };
    let a = read();
    std::thread::sleep(window);
    let b = read();
    if a.len() < 8 || b.len() < 8 {
        return 0.0;
    }
    let d: Vec<u64> = (0..8).map(|i| b[i].saturating_sub(a[i])).collect();
    (d[2] + d[5] + d[6]) as f64 / d.iter().sum::<u64>().max(1) as f64
}

/// Busy fraction of the whole machine over `window`.
pub fn busy_over(window: Duration) -> f64 {
    let (t0, i0) = cpu_ticks();
    std::thread::sleep(window);
    let (t1, i1) = cpu_ticks();
    1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64
}

/// Pins the calling thread to one CPU until dropped (then restores its mask).
pub struct PinThread(libc::cpu_set_t);

impl PinThread {
    pub fn to(cpu: usize) -> Self {
        // SAFETY: affinity calls on the calling thread with plain cpu_set_t values.
        unsafe {
            let mut previous: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, std::mem::size_of_val(&previous), &mut previous);
            let mut only: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut only);
            libc::sched_setaffinity(0, std::mem::size_of_val(&only), &only);
            Self(previous)
        }
    }
}

impl Drop for PinThread {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved above.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&self.0), &self.0) };
    }
}
