//! What a new operator hits in the first hour: `status` exit codes a probe can use, a
//! rejected update logged once (not every tick), a byte-order mark, every flag
//! explained. The real installer binary.
use std::time::Duration;

use anyhow::Result;
use egress_deny_tests::{
    binary,
    installer::{Installer, InstallerDirs},
    require_root, wait_until,
};

/// 0 enforcing, 2 degraded (last update rejected), 3 not enforcing (nothing installed,
/// or no valid rule set yet); documented in conf/README.md.
#[test]
fn status_exit_codes_tell_a_script_what_state_the_node_is_in() -> Result<()> {
    require_root();
    let dirs = InstallerDirs::with_placeholder_primary()?;
    let (code, out) = dirs.status_code(None)?;
    assert_eq!(code, 3, "nothing installed:\n{out}");

    // Installed, but the only rules file is broken: no valid rule set yet.
    dirs.publish_rules(&[("rules", b"not a rule\n")])?;
    let installer = Installer::start(&dirs, None, &["--host-interfaces=none"])?;
    installer.wait_for_log("update rejected", Duration::from_secs(10))?;
    let (code, out) = dirs.status_code(None)?;
    assert_eq!(code, 3, "no valid rule set:\n{out}");

    dirs.publish_rules(&[("rules", "\u{feff}198.51.100.0/24\r\n".as_bytes())])?;
    installer.wait_ready()?;
    wait_until("status 0", Duration::from_secs(10), || {
        dirs.status_code(None).is_ok_and(|(c, _)| c == 0)
    })?;

    // A rejected update: still enforcing the previous set, but degraded. The same
    // rejection published again (a new kubelet version with the same content) is not
    // logged again; status and /metrics keep counting it.
    for _ in 0..2 {
        dirs.publish_rules(&[("rules", b"198.51.100.0/24\n10.1.2.3/8\n")])?;
        let errors = installer
            .http("/metrics")?
            .1
            .lines()
            .find(|l| l.starts_with("egress_deny_sync_errors_total "))
            .unwrap_or_default()
            .to_owned();
        wait_until("the rejection counted", Duration::from_secs(10), || {
            installer.http("/metrics").is_ok_and(|(_, m)| {
                m.lines()
                    .any(|l| l.starts_with("egress_deny_sync_errors_total ") && l != errors)
            })
        })?;
    }
    let (code, out) = dirs.status_code(None)?;
    assert_eq!(code, 2, "degraded:\n{out}");
    assert!(out.contains("10.1.2.3/8 has host bits set"), "{out}");
    let log = installer.log_text();
    assert_eq!(
        log.matches("10.1.2.3/8 has host bits set").count(),
        1,
        "the same rejection logged twice:\n{log}"
    );
    Ok(())
}

/// Every flag of `run` says what it is for.
#[test]
fn every_run_flag_has_help() -> Result<()> {
    let out = std::process::Command::new(binary("egress-deny-installer"))
        .args(["run", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    let mut lines = help.lines().peekable();
    let mut flags = 0;
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("--") && !trimmed.starts_with("--help") {
            flags += 1;
            let description = lines.peek().map(|l| l.trim()).unwrap_or_default();
            assert!(
                !description.is_empty()
                    && !description.starts_with('[')
                    && !description.starts_with('-'),
                "{trimmed} has no description:\n{help}"
            );
        }
    }
    assert!(flags >= 15, "{help}");
    Ok(())
}

/// A second daemon on the node (a hand-run next to the DaemonSet's, or a surge rollout)
/// waits for the first, saying why, and takes over the moment it exits: under a flood
/// to a denied destination nothing leaks, and the programs are pinned once by each
/// daemon (not by the waiting one while the first still runs).
#[test]
fn a_second_daemon_waits_for_the_first_and_takes_over_without_a_gap() -> Result<()> {
    use egress_deny_datapath::{attach::pinned_program, paths::ProgramKind};
    use egress_deny_tests::{
        cni::{ALLOWED, CniNode, DENIED, Primary},
        probe::Flood,
    };
    require_root();
    let (node, dirs, conflist, first) =
        CniNode::with_ready_installer(Primary::Bridge, &["--host-interfaces=up0"])?;
    let pod = node.added_pod(&conflist, "")?;
    let program = || pinned_program(&dirs.layout(), ProgramKind::Ethernet).map(|(_, id)| id);
    let first_program = program()?;
    let flood = Flood::start(pod.ns(), &node.server, DENIED)?;

    let second = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=up0"])?;
    second.wait_for_log("waiting for it to exit", Duration::from_secs(10))?;
    let (code, body) = second.http("/readyz")?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&format!("pid {}", first.pid())), "{body}");
    assert_eq!(program()?, first_program, "the waiting daemon re-pinned");

    first.stop()?;
    second.wait_ready()?;
    assert!(second.log_text().contains("took over the node lock"));
    let second_program = program()?;
    assert_ne!(second_program, first_program);
    let (sent, arrived) = flood.finish();
    eprintln!("handover: {sent} packets sent to a denied destination, {arrived} arrived");
    assert!(sent > 100, "the flood did not run");
    assert_eq!(arrived, 0, "packets leaked during the handover");
    assert_eq!(
        egress_deny_tests::probe::udp_through(pod.ns(), &node.server, ALLOWED, ALLOWED, 1)?,
        1
    );
    Ok(())
}
