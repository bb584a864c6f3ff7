//! Operating it: repair of pods that started before the installer, host interfaces
//! that appear later, and bounded deny-event logging under a flood.
use std::time::{Duration, Instant};

use anyhow::Result;
use egress_deny_tests::{
    Netns,
    cni::{ALLOWED, CniNode, DENIED, Primary},
    installer::{Installer, InstallerDirs},
    probe::{bind_in, udp_through},
    require_root, wait_until,
};
use serde_json::json;

#[test]
fn a_pod_started_before_the_installer_is_repaired_without_a_restart() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let dirs = InstallerDirs::new()?;
    // The node runs its primary CNI only: the pod starts unfiltered.
    let primary = json!({ "cniVersion": "1.0.0", "name": "k8s", "plugins": [node.primary_conf(Primary::Bridge)] });
    let conflist = dirs.conf_dir().join("10-bridge.conflist");
    std::fs::write(&conflist, serde_json::to_vec(&primary)?)?;
    let pod = node.added_pod(&conflist, "K8S_POD_NAMESPACE=legacy;K8S_POD_NAME=old-1")?;
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 3)?,
        3,
        "unfiltered before the installer"
    );

    // The runtime's CNI cache (libcni) is where the installer finds it.
    let installer = node.repairing_installer(&dirs, &[])?;
    pod.wait_for_repair(&installer, "legacy/old-1")?;
    let (_, metrics) = installer.http("/metrics")?;
    assert!(
        metrics.contains("pod=\"old-1\""),
        "repaired pod has no series"
    );

    // Its pod goes away without a DEL reaching us: the attachment is cleaned up.
    let mut pod = pod;
    pod.ns = None;
    wait_until(
        "the vanished pod's series to go",
        Duration::from_secs(10),
        || {
            installer
                .http("/metrics")
                .is_ok_and(|(_, m)| !m.contains("old-1"))
        },
    )?;
    Ok(())
}

#[test]
fn host_interfaces_follow_the_default_route() -> Result<()> {
    require_root();
    let ns = Netns::new("edh")?;
    let dirs = InstallerDirs::with_placeholder_primary()?;
    let installer = Installer::start(&dirs, Some(&ns), &["--host-interfaces=auto"])?;
    installer.wait_ready()?;
    let layout = dirs.layout();
    assert!(
        std::fs::read_dir(layout.links_dir())?.next().is_none(),
        "no default route yet: nothing attached"
    );

    // An uplink appears and gets the default route: attached within seconds.
    ns.ip("link add up1 type veth peer name up1p")?;
    ns.ip("addr add 100.64.1.1/24 dev up1")?;
    ns.ip("link set up1 up")?;
    ns.ip("link set up1p up")?;
    ns.ip("route add default via 100.64.1.2")?;
    let started = Instant::now();
    wait_until("up1 to be attached", Duration::from_secs(10), || {
        layout.host_link("up1").exists()
    })?;
    eprintln!(
        "host interface attached {} ms after the default route",
        started.elapsed().as_millis()
    );

    // The default route moves to another interface.
    ns.ip("link add up2 type veth peer name up2p")?;
    ns.ip("addr add 100.64.2.1/24 dev up2")?;
    ns.ip("link set up2 up")?;
    ns.ip("link set up2p up")?;
    ns.ip("route replace default via 100.64.2.2")?;
    wait_until("up2 attached, up1 dropped", Duration::from_secs(10), || {
        layout.host_link("up2").exists() && !layout.host_link("up1").exists()
    })?;

    // The interface goes away: dropped, without error spam.
    ns.ip("link del up2")?;
    wait_until("up2 dropped", Duration::from_secs(10), || {
        !layout.host_link("up2").exists()
    })?;
    let (_, metrics) = installer.http("/metrics")?;
    assert!(
        metrics.contains("egress_deny_attachments{kind=\"host\"} 0"),
        "{metrics}"
    );
    let log = installer.log_text();
    assert!(
        log.matches("WARN").count() + log.matches("ERROR").count() <= 2,
        "{log}"
    );
    Ok(())
}

#[test]
fn a_flood_of_denied_packets_gives_bounded_log_output_and_exact_counts() -> Result<()> {
    require_root();
    let (node, _dirs, conflist, installer) = CniNode::with_ready_installer(
        Primary::Bridge,
        &["--host-interfaces=none", "--deny-events-per-second=5"],
    )?;
    let pod = node.added_pod(&conflist, "K8S_POD_NAMESPACE=x;K8S_POD_NAME=flood")?;

    let sender = bind_in(pod.ns(), "0.0.0.0:0")?;
    let flood = 20_000;
    let started = Instant::now();
    for _ in 0..flood {
        sender.send_to(b"flood", (DENIED, 9))?;
    }
    let elapsed = started.elapsed();
    let denied = |m: &str| -> u64 {
        m.lines()
            .find(|l| {
                l.contains("pod=\"flood\"")
                    && l.starts_with("egress_deny_packets_total")
                    && l.contains("denied")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    wait_until(
        "every flood packet counted",
        Duration::from_secs(10),
        || {
            installer
                .http("/metrics")
                .is_ok_and(|(_, m)| denied(&m) >= flood)
        },
    )?;
    let (_, metrics) = installer.http("/metrics")?;
    assert_eq!(denied(&metrics), flood, "denied counter");
    // Budget: 5 events/s per attachment and CPU.
    let cpus = std::thread::available_parallelism()?.get() as u64;
    let budget = 5 * cpus * (elapsed.as_secs() + 2);
    installer.wait_for_log("denied: pod x/flood", Duration::from_secs(5))?;
    let lines = installer.log_text().matches("denied: pod x/flood").count() as u64;
    eprintln!(
        "{flood} denied packets in {} ms: {lines} log lines (budget {budget})",
        elapsed.as_millis()
    );
    assert!(
        lines <= budget,
        "{lines} deny log lines for {flood} packets (budget {budget})"
    );
    let suppressed: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("egress_deny_deny_events_suppressed_total") && l.contains("flood")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        suppressed + lines >= flood - 5,
        "suppressed {suppressed} + logged {lines} should cover the flood"
    );
    Ok(())
}
