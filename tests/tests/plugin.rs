//! The CNI plugin driven by a real CNI runtime (libcni) after the reference bridge/ptp
//! plugins, with real traffic from pod namespaces; plus direct execs for the commands
//! libcni 1.1.2 cannot drive (GC, STATUS at 1.1.0) and for malformed input.
use std::time::Duration;

use anyhow::{Result, ensure};
use egress_deny_datapath::{
    attach, loader,
    rules::{Action, RuleTables},
};
use egress_deny_tests::{
    cni::{
        ALLOWED, CniNode, DENIED, Primary, entry_1_1, exec_plugin, hand_made_pod, ingress_programs,
        network_name, pod_env,
    },
    probe::{ping, udp_through},
    random_suffix, require_root, wait_until,
};
use serde_json::json;

const K8S_ARGS: &str = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0";

#[test]
fn bridge_and_ptp_at_every_libcni_version_filter_from_the_first_packet() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    node.pins.deny(&[&format!("{DENIED}/32")])?;
    for primary in [Primary::Bridge, Primary::Ptp] {
        for version in ["0.3.1", "0.4.0", "1.0.0"] {
            let what = format!("{primary:?} at {version}");
            let conflist = node.conflist(version, primary, json!({}))?;
            let pod = node.pod()?;
            let result = pod
                .add(&conflist, K8S_ARGS)?
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            ensure!(
                result["cniVersion"] == version,
                "{what}: result version {result}"
            );
            ensure!(
                result["ips"].as_array().is_some_and(|ips| !ips.is_empty()),
                "{what}: {result}"
            );

            let record = pod.record()?;
            assert_eq!(record.pod_namespace.as_deref(), Some("default"), "{what}");
            assert_eq!(record.pod_name.as_deref(), Some("web-0"), "{what}");
            assert_eq!(
                udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 10)?,
                0,
                "{what}: denied UDP leaked"
            );
            assert!(!ping(pod.ns(), DENIED), "{what}: denied ping got through");
            assert!(ping(pod.ns(), ALLOWED), "{what}: allowed ping failed");
            if version != "0.3.1" {
                pod.check(&conflist, K8S_ARGS)?
                    .map_err(|e| anyhow::anyhow!("{what}: CHECK {e}"))?;
            }
            pod.del(&conflist, K8S_ARGS)?
                .map_err(|e| anyhow::anyhow!("{what}: DEL {e}"))?;
            assert!(pod.record().is_err(), "{what}: record left after DEL");
            assert!(
                !node
                    .pins
                    .layout
                    .pod_link(&pod.container_id, "eth0")
                    .exists(),
                "{what}: link pin left"
            );
        }
    }
    Ok(())
}

#[test]
fn a_rule_added_after_add_applies_to_the_running_pod() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let conflist = node.conflist("1.0.0", Primary::Bridge, json!({}))?;
    let pod = node.added_pod(&conflist, "")?;
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        5,
        "no rule yet"
    );
    node.pins.deny(&["198.51.100.0/24"])?;
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "new rule not enforced"
    );
    RuleTables::open(&node.pins.layout)?.insert(format!("{DENIED}/32").parse()?, Action::Allow)?;
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        5,
        "allow-exception not honoured"
    );
    pod.del(&conflist, "")?.map_err(anyhow::Error::msg)?;
    Ok(())
}

#[test]
fn fifty_parallel_adds_all_succeed_and_are_all_enforced() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    node.pins.deny(&[&format!("{DENIED}/32")])?;
    let conflist = node.conflist("1.0.0", Primary::Bridge, json!({}))?;
    let pods = (0..50).map(|_| node.pod()).collect::<Result<Vec<_>>>()?;
    std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| s.spawn(|| pod.add(&conflist, "")))
            .collect();
        for (i, handle) in handles.into_iter().enumerate() {
            let outcome = handle.join().expect("thread");
            assert!(matches!(outcome, Ok(Ok(_))), "pod {i}: {outcome:?}");
        }
    });
    std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| s.spawn(|| udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 3)))
            .collect();
        for (i, handle) in handles.into_iter().enumerate() {
            let leaked = handle.join().expect("thread").expect("probe");
            assert_eq!(leaked, 0, "pod {i} not filtered");
        }
    });
    for pod in &pods {
        pod.del(&conflist, "")?.map_err(anyhow::Error::msg)?;
    }
    let left = std::fs::read_dir(node.pins.layout.links_dir())?.count();
    assert_eq!(left, 0, "link pins left after DEL");
    Ok(())
}

#[test]
fn del_is_idempotent_and_succeeds_after_the_netns_is_gone() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let conflist = node.conflist("1.0.0", Primary::Ptp, json!({}))?;
    let pod = node.added_pod(&conflist, "")?;
    pod.del(&conflist, "")?.map_err(anyhow::Error::msg)?;
    pod.del(&conflist, "")?.map_err(anyhow::Error::msg)?;

    let mut gone = node.added_pod(&conflist, "")?;
    let link = node.pins.layout.pod_link(&gone.container_id, "eth0");
    assert!(link.exists());
    gone.ns = None; // deletes the namespace, and with it the veth pair
    gone.del(&conflist, "")?.map_err(anyhow::Error::msg)?;
    assert!(!link.exists(), "link pin left after DEL of a vanished pod");
    assert!(
        gone.record().is_err(),
        "record left after DEL of a vanished pod"
    );
    Ok(())
}

#[test]
fn check_fails_once_the_program_was_detached_by_hand() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    node.pins.deny(&[&format!("{DENIED}/32")])?;

    // TCX: someone removes the pinned link (bpftool link detach / rm).
    let conflist = node.conflist("1.0.0", Primary::Bridge, json!({}))?;
    let pod = node.added_pod(&conflist, "")?;
    pod.check(&conflist, "")?.map_err(anyhow::Error::msg)?;
    std::fs::remove_file(node.pins.layout.pod_link(&pod.container_id, "eth0"))?;
    // The kernel releases the link asynchronously once its last reference is gone.
    wait_until(
        "the hand-made detach to take effect",
        Duration::from_secs(5),
        || udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 1).is_ok_and(|n| n == 1),
    )?;
    let failure = pod
        .check(&conflist, "")?
        .expect_err("CHECK must fail when detached");
    assert!(failure.msg.contains("not attached"), "{failure}");

    // cls_bpf fallback: someone deletes the tc filter.
    let conflist = node.conflist("1.0.0", Primary::Bridge, json!({ "attachMode": "netlink" }))?;
    let pod = node.added_pod(&conflist, "")?;
    let record = pod.record()?;
    assert_eq!(
        record.mode,
        egress_deny_datapath::attach::AttachMode::Netlink
    );
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "netlink mode not enforcing"
    );
    pod.check(&conflist, "")?.map_err(anyhow::Error::msg)?;
    node.node.exec(
        "tc",
        &["filter", "del", "dev", &record.host_ifname, "ingress"],
    )?;
    let failure = pod
        .check(&conflist, "")?
        .expect_err("CHECK must fail without the filter");
    assert!(failure.msg.contains("no egress-deny filter"), "{failure}");
    pod.del(&conflist, "")?.map_err(anyhow::Error::msg)?;
    Ok(())
}

#[test]
fn failure_policy_fail_retries_the_pod_and_ignore_lets_it_start() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    loader::unpin_all(&node.pins.layout)?; // the installer is not (yet) there
    let conflist = node.conflist("1.0.0", Primary::Bridge, json!({}))?;
    let pod = node.pod()?;
    let failure = pod
        .add(&conflist, "")?
        .expect_err("ADD must fail without the installer");
    assert_eq!(failure.code, 11, "{failure}");
    assert!(pod.record().is_err(), "nothing may be recorded");

    let conflist = node.conflist(
        "1.0.0",
        Primary::Bridge,
        json!({ "failurePolicy": "ignore" }),
    )?;
    let pod = node.added_pod(&conflist, "")?;
    assert!(
        pod.record().is_err(),
        "ignore: started unfiltered, nothing attached"
    );
    Ok(())
}

#[test]
fn excluded_namespaces_are_not_filtered() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    node.pins.deny(&[&format!("{DENIED}/32")])?;
    let conflist = node.conflist(
        "1.0.0",
        Primary::Bridge,
        json!({ "excludeNamespaces": ["kube-system"] }),
    )?;
    let system = node.added_pod(
        &conflist,
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns",
    )?;
    assert!(system.record().is_err());
    assert_eq!(
        udp_through(system.ns(), &node.server, DENIED, ALLOWED, 3)?,
        3
    );
    let app = node.added_pod(&conflist, "K8S_POD_NAMESPACE=default;K8S_POD_NAME=app")?;
    assert_eq!(udp_through(app.ns(), &node.server, DENIED, ALLOWED, 3)?, 0);
    Ok(())
}

#[test]
fn direct_exec_1_1_0_add_passes_prev_result_through_unchanged() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let (pod, host) = hand_made_pod(&node)?;
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [
            { "name": host, "mac": "02:00:00:00:00:01" },
            { "name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": pod.path(), "mtu": 1500, "socketPath": "/x" }
        ],
        "ips": [{ "address": "10.244.9.2/24", "gateway": "10.244.9.1", "interface": 1 }],
        "routes": [{ "dst": "0.0.0.0/0", "gw": "10.244.9.1", "mtu": 1400, "advmss": 1360, "priority": 7, "table": 100, "scope": 0 }],
        "dns": { "nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"] },
        "zFutureField": { "nested": [1, 2, { "kept": true }] },
        "aFieldAfter": "order kept"
    });
    let mut conf = entry_1_1(&node, json!({}));
    conf["prevResult"] = prev.clone();
    let netns = pod.path().display().to_string();
    let env = pod_env("ADD", "direct-1", &netns);
    let (ok, out) = exec_plugin(&node, &env, &conf.to_string())?;
    assert!(ok, "ADD failed: {out}");
    assert_eq!(out, prev, "prevResult not passed through unchanged");
    // Key order too: the result is printed as received.
    assert_eq!(out.to_string(), prev.to_string());
    let record = egress_deny_datapath::records::AttachmentRecord::read(
        &egress_deny_datapath::paths::StateLayout::new(node.state_dir())
            .attachment_record("direct-1", "eth0"),
    )?;
    assert_eq!(record.host_ifname, host);
    Ok(())
}

#[test]
fn direct_exec_gc_removes_only_attachments_the_runtime_no_longer_lists() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let conflist = node.conflist("1.0.0", Primary::Bridge, json!({}))?;
    let keep = node.added_pod(&conflist, "")?;
    let stale = node.added_pod(&conflist, "")?;
    let stale_link = node.pins.layout.pod_link(&stale.container_id, "eth0");
    let keep_link = node.pins.layout.pod_link(&keep.container_id, "eth0");
    let mut conf = entry_1_1(&node, json!({}));
    conf["name"] = json!(network_name(&conflist)?);
    conf["cni.dev/valid-attachments"] =
        json!([{ "containerID": keep.container_id, "ifname": "eth0" }]);
    let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "GC")], &conf.to_string())?;
    assert!(ok, "GC failed: {out}");
    assert!(
        !stale_link.exists() && stale.record().is_err(),
        "stale attachment kept"
    );
    assert!(
        keep_link.exists() && keep.record().is_ok(),
        "valid attachment removed"
    );
    let state = attach::pinned_link_state(&keep_link)?.expect("kept link");
    assert_ne!(state.ifindex, 0, "kept link still attached");
    Ok(())
}

#[test]
fn direct_exec_status_version_and_malformed_input() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let conf = entry_1_1(&node, json!({}));

    let (ok, out) = exec_plugin(
        &node,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.1.0"}"#,
    )?;
    assert!(ok);
    assert_eq!(
        out["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "STATUS")], &conf.to_string())?;
    assert!(ok, "STATUS with the installer's pins: {out}");

    // Errors: (environment, stdin, expected code).
    let mut old = conf.clone();
    old["cniVersion"] = json!("1.0.0");
    let mut future = conf.clone();
    future["cniVersion"] = json!("9.9.9");
    let mut bad_policy = conf.clone();
    bad_policy["failurePolicy"] = json!("sometimes");
    let mut bad_mode = conf.clone();
    bad_mode["attachMode"] = json!("xdp");
    type ErrorCase<'a> = (Vec<(&'a str, &'a str)>, String, u64);
    let cases: Vec<ErrorCase> = vec![
        (vec![("CNI_COMMAND", "FROB")], conf.to_string(), 4),
        (vec![("CNI_COMMAND", "STATUS")], bad_policy.to_string(), 7),
        (vec![("CNI_COMMAND", "STATUS")], bad_mode.to_string(), 7),
        (vec![("CNI_COMMAND", "STATUS")], String::new(), 6),
        (vec![], conf.to_string(), 4),
        (vec![("CNI_COMMAND", "STATUS")], future.to_string(), 1),
        (vec![("CNI_COMMAND", "STATUS")], old.to_string(), 1),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            conf.to_string(),
            4,
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            "{ not json".into(),
            6,
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            conf.to_string(),
            7,
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "../x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            conf.to_string(),
            4,
        ),
    ];
    for (env, stdin, code) in &cases {
        let (ok, out) = exec_plugin(&node, env, stdin)?;
        assert!(!ok, "{env:?} should fail");
        assert_eq!(out["code"], json!(code), "{env:?}: {out}");
        assert!(out["msg"].as_str().is_some_and(|m| !m.is_empty()), "{out}");
    }

    // A missing netns: a clear error and nothing attached or recorded.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = json!({ "cniVersion": "1.1.0", "interfaces": [], "ips": [] });
    let env = pod_env("ADD", "c2", "/var/run/netns/nope-nope");
    let (ok, out) = exec_plugin(&node, &env, &with_prev.to_string())?;
    assert!(!ok);
    assert!(
        out["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("does not exist"),
        "{out}"
    );
    assert_eq!(std::fs::read_dir(node.pins.layout.links_dir())?.count(), 0);

    loader::unpin_all(&node.pins.layout)?;
    let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "STATUS")], &conf.to_string())?;
    assert!(!ok);
    assert_eq!(out["code"], json!(50), "{out}");
    Ok(())
}

/// Issue 10 item 3: `cni.dev/valid-attachments` lists one network's attachments; a GC
/// of network B must leave network A's pods (records, links, pins without a record)
/// attached and enforcing.
#[test]
fn gc_of_one_network_leaves_another_networks_attachments_enforcing() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    node.pins.deny(&[&format!("{DENIED}/32")])?;
    let net_a = node.conflist("1.0.0", Primary::Bridge, json!({}))?;
    let net_b = node.conflist("1.0.0", Primary::Ptp, json!({}))?;
    let (name_a, name_b) = (network_name(&net_a)?, network_name(&net_b)?);
    let a = node.added_pod(&net_a, "")?;
    let b = node.added_pod(&net_b, "")?;
    let a_host = a.record_of("eth0")?.host_ifname;
    let a_link = node.pins.layout.pod_link(&a.container_id, "eth0");
    let b_link = node.pins.layout.pod_link(&b.container_id, "eth0");
    ensure!(a_link.exists() && b_link.exists(), "link pins after ADD");

    // A pod of network A whose ADD died between attaching and recording: a pin alone.
    let (orphan_ns, orphan_host) = hand_made_pod(&node)?;
    let mut add = entry_1_1(&node, json!({}));
    add["name"] = json!(name_a);
    add["prevResult"] = json!({ "cniVersion": "1.1.0", "interfaces": [{ "name": orphan_host }] });
    let orphan_netns = orphan_ns.path().display().to_string();
    let env = pod_env("ADD", "orphan-1", &orphan_netns);
    let (ok, out) = exec_plugin(&node, &env, &add.to_string())?;
    ensure!(ok, "ADD of the orphan: {out}");
    std::fs::remove_file(
        egress_deny_datapath::paths::StateLayout::new(node.state_dir())
            .attachment_record("orphan-1", "eth0"),
    )?;
    let orphan_link = node.pins.layout.pod_link("orphan-1", "eth0");

    let gc = |network: &str, valid: serde_json::Value| -> Result<()> {
        let mut conf = entry_1_1(&node, json!({}));
        conf["name"] = json!(network);
        conf["cni.dev/valid-attachments"] = valid;
        let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "GC")], &conf.to_string())?;
        ensure!(ok, "GC of {network}: {out}");
        Ok(())
    };
    // Network B's runtime knows only b; then nothing at all.
    gc(
        &name_b,
        json!([{ "containerID": b.container_id, "ifname": "eth0" }]),
    )?;
    ensure!(
        b_link.exists(),
        "GC removed a valid attachment of its own network"
    );
    gc(&name_b, json!([]))?;
    ensure!(
        !b_link.exists() && b.record_of("eth0").is_err(),
        "GC left a stale attachment of its own network"
    );

    ensure!(
        a.record_of("eth0").is_ok(),
        "GC of network B removed network A's record"
    );
    ensure!(a_link.exists(), "GC of network B removed network A's link");
    ensure!(
        orphan_link.exists(),
        "GC of network B swept network A's pin without a record"
    );
    let (tcx, _) = ingress_programs(&node, &a_host)?;
    ensure!(!tcx.is_empty(), "network A's pod lost its filter");
    assert_eq!(
        udp_through(a.ns(), &node.server, DENIED, ALLOWED, 10)?,
        0,
        "network A's pod leaks after a GC of network B"
    );

    // Network A's own GC does remove its stale attachment and pin.
    gc(&name_a, json!([]))?;
    ensure!(
        !a_link.exists() && a.record_of("eth0").is_err() && !orphan_link.exists(),
        "GC of network A left its stale attachments"
    );
    Ok(())
}

/// Issue 10 item 12: container `<c>_x` + interface `y` and container `<c>` + interface
/// `x_y` had the same pin and record name; attaching or deleting one detached the other.
#[test]
fn pods_whose_old_names_collide_stay_attached_independently() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    node.pins.deny(&[&format!("{DENIED}/32")])?;
    let conflist = node.conflist("1.0.0", Primary::Bridge, json!({}))?;
    let base = format!("ctr-{}", random_suffix());
    let first = node.pod_with_id(&format!("{base}_x"))?;
    let second = node.pod_with_id(&base)?;
    first
        .add_on(&conflist, "y", "")?
        .map_err(anyhow::Error::msg)?;
    second
        .add_on(&conflist, "x_y", "")?
        .map_err(anyhow::Error::msg)?;
    for (pod, ifname) in [(&first, "y"), (&second, "x_y")] {
        assert_eq!(
            udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
            0,
            "{} {ifname} not enforcing after both ADDs",
            pod.container_id
        );
        pod.check_on(&conflist, ifname, "")?
            .map_err(anyhow::Error::msg)?;
    }
    first
        .del_on(&conflist, "y", "")?
        .map_err(anyhow::Error::msg)?;
    ensure!(first.record_of("y").is_err(), "record left");
    ensure!(
        second.record_of("x_y").is_ok(),
        "DEL of one pod removed the other's record"
    );
    second
        .check_on(&conflist, "x_y", "")?
        .map_err(|e| anyhow::anyhow!("the other pod after DEL: {e}"))?;
    assert_eq!(
        udp_through(second.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "DEL of one pod detached the other"
    );
    second
        .del_on(&conflist, "x_y", "")?
        .map_err(anyhow::Error::msg)?;
    ensure!(
        std::fs::read_dir(node.pins.layout.links_dir())?.count() == 0,
        "link pins left after both DELs"
    );
    Ok(())
}

/// Issue 10 item 11: with `failurePolicy: ignore` ADD lets pods start without the
/// installer, so STATUS must not report the plugin unavailable.
#[test]
fn status_follows_the_failure_policy_when_the_installer_is_missing() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    loader::unpin_all(&node.pins.layout)?;
    let ignore = entry_1_1(&node, json!({ "failurePolicy": "ignore" }));
    let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "STATUS")], &ignore.to_string())?;
    ensure!(ok, "STATUS with failurePolicy ignore: {out}");
    ensure!(out.is_null(), "STATUS prints nothing on success: {out}");
    let fail = entry_1_1(&node, json!({ "failurePolicy": "fail" }));
    let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "STATUS")], &fail.to_string())?;
    ensure!(!ok, "STATUS with failurePolicy fail must fail: {out}");
    assert_eq!(out["code"], json!(50), "{out}");
    Ok(())
}
