//! What the report asks the system: the machine it ran on (CPU, memory, kernel, OS, tool
//! versions) and the date.
use std::process::Command;

/// A command's trimmed standard output; empty if it could not run.
fn sh(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// RESULTS.md's machine list, from lscpu, /proc/meminfo, uname, os-release and the tools.
pub fn description() -> String {
    let lscpu = sh("lscpu", &[]);
    let field = |name: &str| {
        lscpu
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "?".into())
    };
    let mem = crate::bench::meminfo_kib("MemTotal").unwrap_or(0) / 1024 / 1024;
    let hypervisor = field("Hypervisor vendor");
    format!(
        "- CPU: {} (lscpu), {} CPU(s), {} thread(s) per core{}\n\
         - Memory: {mem} GiB; kernel {}; {}\n\
         - Tools: {}; {}; {}",
        field("Model name"),
        field("CPU(s)"),
        field("Thread(s) per core"),
        if hypervisor == "?" {
            String::new()
        } else {
            format!(", virtualised ({hypervisor})")
        },
        sh("uname", &["-r"]),
        std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("PRETTY_NAME=")
                        .map(|v| v.trim_matches('"').to_owned())
                })
            })
            .unwrap_or_default(),
        sh("iptables", &["-V"]),
        sh("ipset", &["-v"]),
        sh("iperf3", &["-v"]).lines().next().unwrap_or("iperf3"),
    )
}

/// Now, to the minute, in UTC.
pub fn date() -> String {
    sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}
