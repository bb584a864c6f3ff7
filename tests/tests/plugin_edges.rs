//! The plugin's edges: attachments that drifted from the pinned program, veths it must
//! refuse, failures half-way through ADD, where logs go, version negotiation and the
//! forced cls_bpf fallback. Real namespaces and the real binary, as in plugin.rs.
use anyhow::{Context, Result, ensure};
use aya::programs::SchedClassifier;
use egress_deny_datapath::{
    attach::{self, Hook, NETLINK_HANDLE, NETLINK_PRIORITY},
    iface, netlink,
    netns::NetnsGuard,
    paths::{ProgramKind, StateLayout},
    records::AttachmentRecord,
};
use egress_deny_tests::{
    Netns, PinDir,
    cni::{
        CniNode, Primary, entry_1_1, exec_plugin, hand_made_pod, ingress_programs, network_name,
        pod_env, run_plugin, run_plugin_under,
    },
    require_root, wait_until,
};
use serde_json::{Value, json};
use std::time::Duration;

fn record(node: &CniNode, container_id: &str) -> Result<AttachmentRecord> {
    Ok(AttachmentRecord::read(
        &StateLayout::new(node.state_dir()).attachment_record(container_id, "eth0"),
    )?)
}

fn link_pins(node: &CniNode) -> usize {
    std::fs::read_dir(node.pins.layout.links_dir()).map_or(0, |d| d.count())
}

fn pinned_program_id(node: &CniNode) -> Result<u32> {
    let program = SchedClassifier::from_pin(node.pins.layout.program(ProgramKind::Ethernet))?;
    Ok(program.info()?.id())
}

#[test]
fn check_fails_when_the_pod_runs_another_program_and_a_repeated_add_moves_it() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    for mode in ["tcx", "netlink"] {
        let conflist = node.conflist("1.0.0", Primary::Bridge, json!({ "attachMode": mode }))?;
        let pod = node.pod()?;
        let result = pod.add(&conflist, "")?.map_err(anyhow::Error::msg)?;
        pod.check(&conflist, "")?.map_err(anyhow::Error::msg)?;
        let host = pod.record()?.host_ifname;
        let first = pinned_program_id(&node)?;

        // The pinned program is replaced (as an upgrade does) but this pod's attachment
        // was not moved: it still runs the old program.
        let newer = PinDir::new()?;
        let mut program = SchedClassifier::from_pin(newer.layout.program(ProgramKind::Ethernet))?;
        let pin = node.pins.layout.program(ProgramKind::Ethernet);
        std::fs::remove_file(&pin)?;
        program.pin(&pin)?;
        let second = pinned_program_id(&node)?;
        ensure!(first != second, "{mode}: the program was not replaced");

        let failure = pod
            .check(&conflist, "")?
            .expect_err("CHECK must fail on another program");
        assert!(
            failure.msg.contains("instead of the pinned program"),
            "{mode}: {failure}"
        );

        // A repeated ADD (runtime retry, repair) moves the attachment in place.
        let mut conf = node.egress_deny_entry(json!({ "attachMode": mode }));
        conf["cniVersion"] = json!("1.0.0");
        // The same network: a retry of this pod's ADD, not another network's.
        conf["name"] = json!(network_name(&conflist)?);
        conf["prevResult"] = result.clone();
        let netns = pod.ns().path().display().to_string();
        let (ok, out) = exec_plugin(
            &node,
            &pod_env("ADD", &pod.container_id, &netns),
            &conf.to_string(),
        )?;
        assert!(ok, "{mode}: repeated ADD: {out}");
        assert_eq!(out, result, "{mode}: repeated ADD result");
        pod.check(&conflist, "")?
            .map_err(|e| anyhow::anyhow!("{mode}: CHECK after repeated ADD: {e}"))?;
        let (tcx, cls) = ingress_programs(&node, &host)?;
        let on_device = if mode == "tcx" { tcx } else { cls };
        assert_eq!(on_device, vec![second], "{mode}: programs on {host}");
        pod.del(&conflist, "")?.map_err(anyhow::Error::msg)?;
        assert_eq!(link_pins(&node), 0, "{mode}: link pin left after DEL");
    }
    Ok(())
}

#[test]
fn add_refuses_a_veth_whose_peer_is_in_another_namespace() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let pod = Netns::new("edx")?;
    let elsewhere = Netns::new("edo")?;
    elsewhere.ip(&format!(
        "link add vo0 type veth peer name eth0 netns {}",
        pod.name
    ))?;
    // The pod's eth0 reports its peer's ifindex, which is only meaningful in `elsewhere`.
    // Make sure the node has an unrelated interface at that index: resolving the index
    // here would attach to it.
    let shown: Value = serde_json::from_str(&pod.exec("ip", &["-j", "link", "show", "eth0"])?)?;
    let peer_index = shown[0]["link_index"]
        .as_u64()
        .context("link_index of eth0")?;
    let node_links: Value = serde_json::from_str(&node.node.exec("ip", &["-j", "link", "show"])?)?;
    let collision = node_links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["ifindex"].as_u64() == Some(peer_index))
        .and_then(|l| l["ifname"].as_str().map(str::to_owned));
    let victim = match collision {
        Some(name) => name,
        None => {
            node.node
                .ip(&format!("link add edvictim index {peer_index} type dummy"))?;
            "edvictim".to_owned()
        }
    };

    let mut conf = entry_1_1(&node, json!({}));
    conf["prevResult"] = json!({ "cniVersion": "1.1.0", "interfaces": [], "ips": [] });
    let netns = pod.path().display().to_string();
    let (ok, out) = exec_plugin(
        &node,
        &pod_env("ADD", "foreign-1", &netns),
        &conf.to_string(),
    )?;
    assert!(!ok, "ADD must fail: {out}");
    assert_eq!(out["code"], json!(7), "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("not in this network namespace"),
        "{out}"
    );
    assert_eq!(
        ingress_programs(&node, &victim)?,
        (vec![], vec![]),
        "attached to the unrelated {victim}"
    );
    assert_eq!(link_pins(&node), 0);
    assert!(record(&node, "foreign-1").is_err());
    Ok(())
}

#[test]
fn add_on_a_pod_interface_that_is_not_a_veth_or_is_missing_is_a_clean_error() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let pod = Netns::new("edx")?;
    // This kernel has no dummy driver; a bridge is as much "not a veth".
    pod.ip("link add eth0 type bridge")?;
    let mut conf = entry_1_1(&node, json!({}));
    conf["prevResult"] = json!({ "cniVersion": "1.1.0", "interfaces": [], "ips": [] });
    let netns = pod.path().display().to_string();
    let (ok, out) = exec_plugin(&node, &pod_env("ADD", "dummy-1", &netns), &conf.to_string())?;
    assert!(!ok, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("not a veth"),
        "{out}"
    );
    // And a pod without the interface at all.
    let empty = Netns::new("edx")?;
    let netns = empty.path().display().to_string();
    let (ok, out) = exec_plugin(&node, &pod_env("ADD", "dummy-2", &netns), &conf.to_string())?;
    assert!(!ok, "{out}");
    assert!(
        out["msg"].as_str().unwrap_or_default().contains("eth0"),
        "{out}"
    );
    assert_eq!(link_pins(&node), 0);
    Ok(())
}

#[test]
fn a_failure_after_attaching_leaves_nothing_attached() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let (pod, host) = hand_made_pod(&node)?;
    // The record cannot be written: its directory would have to be under a file.
    let file = node.dir.path().join("not-a-dir");
    std::fs::write(&file, b"")?;
    for mode in ["tcx", "netlink"] {
        let mut conf = entry_1_1(
            &node,
            json!({ "stateDir": file.join("state"), "attachMode": mode }),
        );
        conf["prevResult"] = json!({ "cniVersion": "1.1.0", "interfaces": [{ "name": host }] });
        let netns = pod.path().display().to_string();
        let (ok, out) = exec_plugin(&node, &pod_env("ADD", "half-1", &netns), &conf.to_string())?;
        assert!(!ok, "{mode}: ADD must fail: {out}");
        // msg says what was being done (attaching), details what failed.
        assert!(
            format!("{} {}", out["msg"], out["details"]).contains("recording the attachment"),
            "{mode}: {out}"
        );
        assert_eq!(link_pins(&node), 0, "{mode}: link pin left");
        assert_eq!(
            ingress_programs(&node, &host)?,
            (vec![], vec![]),
            "{mode}: program left on {host}"
        );
    }
    Ok(())
}

#[test]
fn logs_go_to_the_configured_target_never_to_stdout() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let (pod, host) = hand_made_pod(&node)?;
    let prev = json!({ "cniVersion": "1.1.0", "interfaces": [{ "name": host }], "ips": [] });
    let mut conf = entry_1_1(
        &node,
        json!({ "log": { "level": "debug", "target": "stderr" } }),
    );
    conf["prevResult"] = prev.clone();
    let netns = pod.path().display().to_string();
    // Twice: a repeated ADD is idempotent.
    for _ in 0..2 {
        let run = run_plugin(&node, &pod_env("ADD", "logs-1", &netns), &conf.to_string())?;
        assert!(run.ok, "{run:?}");
        assert_eq!(run.stdout.lines().count(), 1, "stdout: {:?}", run.stdout);
        assert_eq!(serde_json::from_str::<Value>(&run.stdout)?, prev);
        assert!(
            run.stderr.contains("attached") && run.stderr.contains("DEBUG"),
            "stderr: {:?}",
            run.stderr
        );
    }
    assert_eq!(link_pins(&node), 1);
    assert_eq!(
        ingress_programs(&node, &host)?.0.len(),
        1,
        "one TCX program"
    );

    let del = pod_env("DEL", "logs-1", &netns);
    let run = run_plugin(
        &node,
        &del,
        &entry_1_1(
            &node,
            json!({ "log": { "level": "debug", "target": "stderr" } }),
        )
        .to_string(),
    )?;
    assert!(run.ok, "{run:?}");
    assert_eq!(run.stdout, "", "DEL prints nothing");
    assert!(run.stderr.contains("detached"), "{:?}", run.stderr);
    Ok(())
}

#[test]
fn version_negotiation_and_commands_a_version_does_not_define() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let supported = json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    for (stdin, answered) in [
        ("", "1.1.0"),
        (r#"{"cniVersion":"0.4.0"}"#, "0.4.0"),
        (r#"{"cniVersion":"9.9.9"}"#, "1.1.0"),
    ] {
        let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "VERSION")], stdin)?;
        assert!(ok, "VERSION {stdin:?}: {out}");
        assert_eq!(out["cniVersion"], json!(answered), "VERSION {stdin:?}");
        assert_eq!(out["supportedVersions"], supported);
    }

    let (pod, _) = hand_made_pod(&node)?;
    let netns = pod.path().display().to_string();
    let at = |version: &str| {
        let mut conf = node.egress_deny_entry(json!({}));
        conf["cniVersion"] = json!(version);
        conf["name"] = json!("versions");
        conf["prevResult"] = json!({ "cniVersion": version, "interfaces": [], "ips": [] });
        conf.to_string()
    };
    let check = pod_env("CHECK", "v-1", &netns);
    for (env, stdin, what) in [
        (&check[..], at("0.3.1"), "CHECK at 0.3.1"),
        (&[("CNI_COMMAND", "GC")][..], at("1.0.0"), "GC at 1.0.0"),
        (
            &pod_env("ADD", "v-1", &netns)[..],
            at("0.2.0"),
            "ADD at 0.2.0",
        ),
    ] {
        let (ok, out) = exec_plugin(&node, env, &stdin)?;
        assert!(!ok, "{what}: {out}");
        assert_eq!(out["code"], json!(1), "{what}: {out}");
    }
    // An ADD in a supported version answers in it; prevResult must be an object.
    let mut conf: Value = serde_json::from_str(&at("0.3.0"))?;
    conf["prevResult"] = json!("not a result");
    let (ok, out) = exec_plugin(&node, &pod_env("ADD", "v-2", &netns), &conf.to_string())?;
    assert!(!ok);
    assert_eq!(out["code"], json!(7), "{out}");
    assert_eq!(out["cniVersion"], json!("0.3.0"), "{out}");
    assert_eq!(link_pins(&node), 0);
    Ok(())
}

#[test]
fn the_env_var_forces_the_cls_bpf_fallback_and_gc_removes_it() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let (pod, host) = hand_made_pod(&node)?;
    let mut conf = entry_1_1(&node, json!({}));
    conf["prevResult"] = json!({ "cniVersion": "1.1.0", "interfaces": [{ "name": host }] });
    let netns = pod.path().display().to_string();
    let mut env = pod_env("ADD", "envmode-1", &netns);
    env.push(("EGRESS_DENY_ATTACH_MODE", "netlink"));
    let (ok, out) = exec_plugin(&node, &env, &conf.to_string())?;
    assert!(ok, "{out}");
    let rec = record(&node, "envmode-1")?;
    assert_eq!(rec.mode, egress_deny_datapath::attach::AttachMode::Netlink);
    assert_eq!(rec.host_ifname, host);
    assert_eq!(link_pins(&node), 0, "cls_bpf needs no link pin");
    let pinned = pinned_program_id(&node)?;
    assert_eq!(ingress_programs(&node, &host)?, (vec![], vec![pinned]));

    // The runtime no longer knows the pod: GC removes the filter and the record.
    let mut gc = entry_1_1(&node, json!({}));
    gc["cni.dev/valid-attachments"] = json!([]);
    let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "GC")], &gc.to_string())?;
    assert!(ok, "GC: {out}");
    assert_eq!(ingress_programs(&node, &host)?, (vec![], vec![]));
    assert!(record(&node, "envmode-1").is_err(), "record left after GC");
    Ok(())
}

#[test]
fn del_of_a_vanished_pod_spares_the_pod_that_reuses_its_veth_name() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    // Calico names a pod's host veth after the pod: a restarted pod gets the old name.
    let host = format!("vr{}", egress_deny_tests::random_suffix());
    let pod_with_veth = || -> Result<Netns> {
        let pod = Netns::new("edx")?;
        node.node.ip(&format!(
            "link add {host} type veth peer name eth0 netns {}",
            pod.name
        ))?;
        node.node.ip(&format!("link set {host} up"))?;
        Ok(pod)
    };
    let mut conf = entry_1_1(&node, json!({ "attachMode": "netlink" }));
    conf["prevResult"] = json!({ "cniVersion": "1.1.0", "interfaces": [{ "name": host }] });

    let old = pod_with_veth()?;
    let old_netns = old.path().display().to_string();
    let (ok, out) = exec_plugin(
        &node,
        &pod_env("ADD", "reuse-old", &old_netns),
        &conf.to_string(),
    )?;
    assert!(ok, "{out}");
    drop(old); // the sandbox dies; its veth with it, before the runtime's DEL
    // The kernel tears a namespace down asynchronously: wait for the name to be free.
    wait_until("the old veth to go", Duration::from_secs(10), || {
        node.node.ip(&format!("link show {host}")).is_err()
    })?;
    let new = pod_with_veth()?;
    let new_netns = new.path().display().to_string();
    let (ok, out) = exec_plugin(
        &node,
        &pod_env("ADD", "reuse-new", &new_netns),
        &conf.to_string(),
    )?;
    assert!(ok, "{out}");
    let pinned = pinned_program_id(&node)?;
    assert_eq!(ingress_programs(&node, &host)?, (vec![], vec![pinned]));

    // The late DEL of the old sandbox must not strip the new pod's filter.
    let del = pod_env("DEL", "reuse-old", &old_netns);
    let (ok, out) = exec_plugin(&node, &del, &entry_1_1(&node, json!({})).to_string())?;
    assert!(ok, "{out}");
    assert!(record(&node, "reuse-old").is_err(), "old record left");
    assert_eq!(
        ingress_programs(&node, &host)?,
        (vec![], vec![pinned]),
        "the new pod lost its filter"
    );
    // GC that only knows the new pod keeps it too.
    let mut gc = entry_1_1(&node, json!({}));
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": "reuse-new", "ifname": "eth0" }]);
    let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "GC")], &gc.to_string())?;
    assert!(ok, "{out}");
    assert_eq!(ingress_programs(&node, &host)?, (vec![], vec![pinned]));
    Ok(())
}

#[test]
fn add_check_and_del_never_load_programs_or_create_maps() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let trace = node.dir.path().join("bpf.trace");
    let trace_arg = trace.display().to_string();
    let strace = ["strace", "-f", "-e", "trace=bpf", "-o", trace_arg.as_str()];
    let mut seen = String::new();
    for mode in ["tcx", "netlink"] {
        let (pod, host) = hand_made_pod(&node)?;
        let netns = pod.path().display().to_string();
        let cid = format!("quiet-{mode}");
        let mut conf = entry_1_1(&node, json!({ "attachMode": mode }));
        conf["prevResult"] = json!({ "cniVersion": "1.1.0", "interfaces": [{ "name": host }] });
        for command in ["ADD", "CHECK", "DEL"] {
            let env = pod_env(command, &cid, &netns);
            let run = run_plugin_under(&node, &strace, &env, &conf.to_string())?;
            assert!(run.ok, "{mode} {command}: {run:?}");
            let calls = std::fs::read_to_string(&trace)?;
            for forbidden in ["BPF_PROG_LOAD", "BPF_MAP_CREATE", "BPF_BTF_LOAD"] {
                assert!(
                    !calls.contains(forbidden),
                    "{mode} {command} called {forbidden}:\n{calls}"
                );
            }
            seen.push_str(&calls);
        }
    }
    // The trace did see the plugin's own bpf calls (TCX link, pinned objects).
    assert!(seen.contains("BPF_LINK_CREATE"), "{seen}");
    assert!(seen.contains("BPF_OBJ_GET"), "{seen}");
    Ok(())
}

#[test]
fn a_prev_result_naming_another_host_interface_is_logged_and_the_kernel_decides() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let (pod, host) = hand_made_pod(&node)?;
    let mut conf = entry_1_1(
        &node,
        json!({ "log": { "level": "info", "target": "stderr" } }),
    );
    conf["prevResult"] = json!({
        "cniVersion": "1.1.0",
        "interfaces": [
            { "name": "not-the-peer" },
            { "name": "eth0", "sandbox": pod.path() }
        ],
    });
    let netns = pod.path().display().to_string();
    let run = run_plugin(
        &node,
        &pod_env("ADD", "mismatch-1", &netns),
        &conf.to_string(),
    )?;
    assert!(run.ok, "{run:?}");
    assert!(
        run.stderr.contains("not among the host interfaces"),
        "{:?}",
        run.stderr
    );
    assert_eq!(record(&node, "mismatch-1")?.host_ifname, host);
    assert_eq!(
        ingress_programs(&node, &host)?.0,
        vec![pinned_program_id(&node)?]
    );
    Ok(())
}

/// Rewrites a pod's attachment the way versions before network-scoped names left it:
/// the record without a network under the legacy name, the link pin renamed likewise.
fn make_legacy(node: &CniNode, container_id: &str) -> Result<()> {
    let state = StateLayout::new(node.state_dir());
    let current = state.attachment_record(container_id, "eth0");
    let mut record = AttachmentRecord::read(&current)?;
    let new_pin = record.link_pin_path(&node.pins.layout);
    record.network = None;
    let legacy_pin = node.pins.layout.legacy_pod_link(container_id, "eth0");
    if new_pin.exists() {
        std::fs::rename(&new_pin, &legacy_pin)?;
        record.link_pin = legacy_pin.display().to_string();
    }
    let written = record.write(&state)?;
    ensure!(written == state.legacy_record(container_id, "eth0"));
    std::fs::remove_file(current)?;
    Ok(())
}

/// An upgrade leaves attachments named the old way (no network): CHECK and DEL still
/// find them, GC removes them once their pod is gone (whose network they were on cannot
/// be told, so not before), uninstall-style clean-up of vanished pods too.
#[test]
fn legacy_named_attachments_are_still_checked_and_removed() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    for mode in ["tcx", "netlink"] {
        let conflist = node.conflist("1.0.0", Primary::Bridge, json!({ "attachMode": mode }))?;
        let pod = node.added_pod(&conflist, "")?;
        let host = pod.record()?.host_ifname;
        make_legacy(&node, &pod.container_id)?;
        pod.check(&conflist, "")?
            .map_err(|e| anyhow::anyhow!("{mode}: CHECK of a legacy attachment: {e}"))?;
        pod.del(&conflist, "")?.map_err(anyhow::Error::msg)?;
        ensure!(
            record(&node, &pod.container_id).is_err(),
            "{mode}: legacy record left"
        );
        assert_eq!(link_pins(&node), 0, "{mode}: legacy pin left");
        // The bridge plugin's DEL removes the veth; if it is still there, bare.
        ensure!(
            ingress_programs(&node, &host).map_or(true, |p| p == (vec![], vec![])),
            "{mode}: legacy attachment left on {host}"
        );

        // GC: a live legacy attachment may be another network's: kept; once its pod is
        // gone, removed.
        let mut gone = node.added_pod(&conflist, "")?;
        make_legacy(&node, &gone.container_id)?;
        let mut gc = entry_1_1(&node, json!({}));
        gc["name"] = json!(network_name(&conflist)?);
        gc["cni.dev/valid-attachments"] = json!([]);
        let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "GC")], &gc.to_string())?;
        ensure!(ok, "{out}");
        ensure!(
            record(&node, &gone.container_id).is_ok(),
            "{mode}: live legacy record removed"
        );
        gone.ns = None;
        let host_gone = |n: &CniNode| -> bool {
            record(n, &gone.container_id).is_ok_and(|r| {
                node.node
                    .ip(&format!("link show {}", r.host_ifname))
                    .is_err()
            })
        };
        wait_until(
            "the legacy pod's veth to go",
            Duration::from_secs(10),
            || host_gone(&node),
        )?;
        let (ok, out) = exec_plugin(&node, &[("CNI_COMMAND", "GC")], &gc.to_string())?;
        ensure!(ok, "{out}");
        ensure!(
            record(&node, &gone.container_id).is_err(),
            "{mode}: legacy record of a vanished pod kept"
        );
        assert_eq!(
            link_pins(&node),
            0,
            "{mode}: legacy pin of a vanished pod kept"
        );
    }
    Ok(())
}

/// Issue 10 item 13: filters of one priority share a classifier whose newest filter is
/// listed (and runs) first. CHECK in cls_bpf mode must find ours by its handle, not take
/// the first prio-1 bpf filter for ours.
#[test]
fn cls_bpf_check_finds_its_filter_by_handle_behind_a_foreign_prio_1_filter() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let conflist = node.conflist("1.0.0", Primary::Bridge, json!({ "attachMode": "netlink" }))?;
    let pod = node.added_pod(&conflist, "")?;
    pod.check(&conflist, "")?.map_err(anyhow::Error::msg)?;
    let host = pod.record()?.host_ifname;
    let ours = pinned_program_id(&node)?;

    // Another component's prio-1 filter (another program, another handle), added later.
    let foreign = PinDir::new()?;
    const FOREIGN_HANDLE: u32 = 0x77;
    let filters = {
        let _in_node = NetnsGuard::enter(&node.node.path())?;
        let ifindex = iface::ifindex(&host)?;
        let (program, _) = attach::pinned_program_fd(&foreign.layout, ProgramKind::Ethernet)?;
        netlink::replace_bpf_filter(
            ifindex,
            Hook::Ingress,
            NETLINK_PRIORITY,
            FOREIGN_HANDLE,
            std::os::fd::AsFd::as_fd(&program),
            "foreign",
        )?;
        netlink::bpf_filters(ifindex, Hook::Ingress)?
    };
    ensure!(
        filters.len() == 2
            && filters[0].handle == FOREIGN_HANDLE
            && filters[0].program_id != ours
            && filters[1].handle == NETLINK_HANDLE
            && filters[1].program_id == ours,
        "the foreign filter is not listed first: {filters:?}"
    );
    pod.check(&conflist, "")?
        .map_err(|e| anyhow::anyhow!("CHECK with a foreign prio-1 filter listed first: {e}"))?;

    // Ours gone, the foreign one still there: CHECK fails.
    node.node.exec(
        "tc",
        &[
            "filter", "del", "dev", &host, "ingress", "pref", "1", "handle", "0xed01", "bpf",
        ],
    )?;
    let failure = pod
        .check(&conflist, "")?
        .expect_err("CHECK must fail without our filter");
    ensure!(failure.msg.contains("no egress-deny filter"), "{failure}");
    pod.del(&conflist, "")?.map_err(anyhow::Error::msg)?;
    Ok(())
}
