//! The installer's repair of pods that started without the plugin: it applies each
//! cached attachment's own network configuration (issue 10, item 4).
use std::time::Duration;

use anyhow::{Result, ensure};
use egress_deny_tests::{
    cni::{ALLOWED, CniNode, DENIED, Primary},
    installer::InstallerDirs,
    probe::udp_through,
    require_root,
};
use serde_json::json;

/// Pods started before the installer, on the network it then chains into (one in an
/// excluded namespace) and on a secondary network that does not chain egress-deny:
/// the first is filtered, the excluded one gets the exempt program, the other is
/// neither attached nor warned about on every pass.
#[test]
fn repair_applies_the_networks_own_chain_and_excluded_namespaces() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let dirs = InstallerDirs::new()?;
    let primary = json!({ "cniVersion": "1.0.0", "name": "k8s",
        "plugins": [node.primary_conf(Primary::Bridge)] });
    let secondary = json!({ "cniVersion": "1.0.0", "name": "side",
        "plugins": [node.primary_conf(Primary::Ptp)] });
    let k8s = dirs.conf_dir().join("10-k8s.conflist");
    let side = dirs.conf_dir().join("20-side.conflist");
    std::fs::write(&k8s, serde_json::to_vec(&primary)?)?;
    std::fs::write(&side, serde_json::to_vec(&secondary)?)?;
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;

    let app = node.added_pod(&k8s, "K8S_POD_NAMESPACE=default;K8S_POD_NAME=app-1")?;
    let system = node.added_pod(&k8s, "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns-1")?;
    let other = node.added_pod(&side, "K8S_POD_NAMESPACE=default;K8S_POD_NAME=side-1")?;

    let installer = node.repairing_installer(&dirs, &["--exclude-namespaces=kube-system"])?;
    app.wait_for_repair(&installer, "default/app-1")?;
    ensure!(
        egress_deny_datapath::paths::StateLayout::new(dirs.state_dir())
            .attachment_record(&app.container_id, "eth0")
            .exists(),
        "the repaired pod has no record"
    );

    // Later passes, each made visible by repairing one more pod (started through a copy
    // of the network's configuration from before our entry, as the first ones were).
    let unchained_copy = node.dir.path().join("k8s-before-install.conflist");
    std::fs::write(&unchained_copy, serde_json::to_vec(&primary)?)?;
    let mut late = Vec::new();
    let mut another_pass = |i: usize| -> Result<()> {
        let pod = node.added_pod(
            &unchained_copy,
            &format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=late-{i}"),
        )?;
        installer.wait_for_log(
            &format!("repaired: pod default/late-{i}"),
            Duration::from_secs(10),
        )?;
        late.push(pod);
        Ok(())
    };
    another_pass(1)?;
    // The excluded namespace's pod gets the exempt program (marked, never judged: the
    // node's filtered uplinks then leave it alone too), recorded as exempt.
    let system_record = egress_deny_datapath::records::AttachmentRecord::read(
        &egress_deny_datapath::paths::StateLayout::new(dirs.state_dir())
            .attachment_record(&system.container_id, "eth0"),
    )?;
    ensure!(
        system_record.exempt,
        "the excluded pod was attached as filtered"
    );
    assert_eq!(
        udp_through(system.ns(), &node.server, DENIED, ALLOWED, 3)?,
        3,
        "excluded namespace: repair attached the filter"
    );
    // The secondary network does not chain us: nothing attached.
    let record = egress_deny_datapath::paths::StateLayout::new(dirs.state_dir())
        .attachment_record(&other.container_id, "eth0");
    ensure!(
        !record.exists(),
        "secondary network: repair recorded an attachment"
    );
    assert_eq!(
        udp_through(other.ns(), &node.server, DENIED, ALLOWED, 3)?,
        3,
        "secondary network: repair attached the filter"
    );
    let log = installer.log_text();
    ensure!(
        log.contains("repaired: pod kube-system/dns-1")
            && log.contains("now exempt (excluded namespace)")
            && log.contains("network \"side\" does not chain egress-deny"),
        "the repair and the skip are not logged:\n{log}"
    );
    let noted = log.matches("not repairing").count();
    another_pass(2)?;
    assert_eq!(
        installer.log_text().matches("not repairing").count(),
        noted,
        "skips are logged again on every pass:\n{}",
        installer.log_text()
    );
    Ok(())
}
