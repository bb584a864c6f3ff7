//! `egress-deny-installer` run for real against temp conf/bin/state/rules dirs and a
//! private pin dir; traffic tests put it in a test "node" namespace with the real
//! plugin, a real CNI runtime (libcni) and real packets.
use std::{
    io::Write,
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use egress_deny_tests::{
    Netns,
    cni::{ALLOWED, CniNode, DENIED, Primary},
    installer::{Installer, InstallerDirs},
    probe::{CpuPin, bind_in, ping, udp_through},
    require_root, wait_until,
};
use serde_json::{Value, json};

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn plugin_types(doc: &Value) -> Vec<String> {
    doc["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn conflist_insertion_reinsertion_malformed_files_and_uninstall() -> Result<()> {
    require_root();
    let dirs = InstallerDirs::new()?;
    let conf = dirs.conf_dir();
    std::fs::write(
        conf.join("10-bridge.conf"),
        r#"{"cniVersion":"0.4.0","name":"k8s","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.1.0.0/16"}}"#,
    )?;
    let other = r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp"}]}"#;
    std::fs::write(conf.join("20-other.conflist"), other)?;
    let installer = Installer::start(
        &dirs,
        None,
        &["--host-interfaces=none", "--exclude-namespaces=kube-system"],
    )?;
    installer.wait_ready()?;

    // .conf became a .conflist ending with our entry; the second CNI's file is untouched.
    let primary = conf.join("10-bridge.conflist");
    let doc = read_json(&primary);
    assert_eq!(plugin_types(&doc), ["bridge", "egress-deny"]);
    assert_eq!(doc["cniVersion"], "0.4.0");
    assert_eq!(doc["plugins"][1]["pinDir"], json!(dirs.pin_dir));
    assert_eq!(doc["plugins"][1]["stateDir"], json!(dirs.state_dir()));
    assert_eq!(
        doc["plugins"][1]["excludeNamespaces"],
        json!(["kube-system"])
    );
    assert!(!conf.join("10-bridge.conf").exists());
    assert_eq!(
        std::fs::read_to_string(conf.join("20-other.conflist"))?,
        other
    );

    // The plugin binary was installed, executable, identical.
    let installed = dirs.bin_dir().join("egress-deny");
    assert_eq!(
        std::fs::read(&installed)?,
        std::fs::read(egress_deny_tests::binary("egress-deny"))?
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&installed)?.permissions().mode() & 0o777,
        0o755
    );

    // The primary CNI rewrites its file without our entry: re-inserted within a second.
    let rewrite = |path: &std::path::Path, doc: &Value| -> Result<()> {
        let tmp = path.with_extension("tmp-primary");
        std::fs::write(&tmp, serde_json::to_vec(doc)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    let mut stripped = doc.clone();
    stripped["plugins"].as_array_mut().unwrap().pop();
    let started = Instant::now();
    rewrite(&primary, &stripped)?;
    wait_until(
        "re-insertion after a rewrite",
        Duration::from_secs(1),
        || plugin_types(&read_json(&primary)) == ["bridge", "egress-deny"],
    )?;
    eprintln!(
        "re-inserted {} ms after the rewrite",
        started.elapsed().as_millis()
    );

    // Another CNI's file now sorts first: that one becomes the primary.
    let calico = conf.join("05-calico.conflist");
    rewrite(
        &calico,
        &json!({"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap"}]}),
    )?;
    wait_until(
        "insertion into the new primary",
        Duration::from_secs(1),
        || {
            std::fs::read(&calico)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|d| plugin_types(&d) == ["calico", "portmap", "egress-deny"])
        },
    )?;

    // A malformed file that sorts first is left alone, reported, and makes us unready.
    let broken = conf.join("01-broken.conflist");
    std::fs::write(&broken, "{ \"cniVersion\": ")?;
    wait_until(
        "the malformed primary reported",
        Duration::from_secs(5),
        || {
            installer
                .log_text()
                .contains("01-broken.conflist: not valid JSON, left alone")
        },
    )?;
    assert_eq!(
        installer.http("/readyz")?.0,
        503,
        "ready without a usable primary conflist"
    );
    assert_eq!(std::fs::read_to_string(&broken)?, "{ \"cniVersion\": ");
    std::fs::remove_file(&broken)?;
    installer.wait_ready()?;

    let shutdown = installer.stop()?;
    eprintln!("SIGTERM to exit: {} ms", shutdown.as_millis());
    assert!(
        dirs.layout()
            .program(egress_deny_datapath::paths::ProgramKind::Ethernet)
            .exists(),
        "SIGTERM must leave the pins"
    );

    // Uninstall: entries gone from every file, pins and binary removed; twice is fine.
    let mut args = vec!["uninstall".to_owned()];
    args.extend(dirs.state_args());
    args.extend(dirs.cni_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    dirs.cli(None, &args)?;
    dirs.cli(None, &args)?;
    assert_eq!(plugin_types(&read_json(&calico)), ["calico", "portmap"]);
    assert_eq!(plugin_types(&read_json(&primary)), ["bridge"]);
    assert!(!installed.exists());
    assert!(!dirs.pin_dir.exists());
    Ok(())
}

fn lookup(dirs: &InstallerDirs, addrs: &[&str]) -> Result<Vec<String>> {
    let mut args = vec!["lookup".to_owned()];
    args.extend(dirs.state_args());
    args.extend(addrs.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = dirs.cli(None, &args)?;
    Ok(out
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(str::to_owned)
        .collect())
}

fn gzip(text: &str) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(text.as_bytes()).unwrap();
    enc.finish().unwrap()
}

#[test]
fn rules_sync_lookup_status_metrics_and_rejected_updates() -> Result<()> {
    require_root();
    let dirs = InstallerDirs::with_placeholder_primary()?;
    // In a namespace of its own: no default routes, so no gateway protections to count.
    let ns = Netns::new("edi")?;
    let installer = Installer::start(
        &dirs,
        Some(&ns),
        &["--host-interfaces=none", "--protect=203.0.113.77/32"],
    )?;
    dirs.publish_rules(&[
        ("threats", b"# feed A\n203.0.113.0/24\n198.51.100.7   # one host\n!203.0.113.128/25\n2001:db8::/32\n"),
        ("more.gz", &gzip("10.0.0.0/8\n!10.1.2.0/24\n203.0.113.0/24\n")),
    ])?;
    installer.wait_ready()?;
    let expect = [
        "203.0.113.9 deny 203.0.113.0/24",
        "203.0.113.200 allow 203.0.113.128/25",
        "198.51.100.7 deny 198.51.100.7/32",
        "10.1.2.3 allow 10.1.2.0/24",
        "10.9.9.9 deny 10.0.0.0/8",
        "2001:db8::1 deny 2001:db8::/32",
        "192.0.2.55 allow -",
        "203.0.113.77 allow 203.0.113.77/32",
    ];
    let addrs: Vec<&str> = expect
        .iter()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    wait_until("rules applied", Duration::from_secs(10), || {
        lookup(&dirs, &addrs).is_ok_and(|l| l == expect)
    })
    .inspect_err(|_| eprintln!("{:?}\n{}", lookup(&dirs, &addrs), installer.log_text()))?;
    assert!(
        installer
            .log_text()
            .contains("cover 203.0.113.77/32 (--protect)"),
        "protected-address warning missing"
    );

    // The status file is written right after the maps: poll it too.
    wait_until(
        "status to show the new rules",
        Duration::from_secs(10),
        || {
            dirs.status(None)
                .is_ok_and(|s| s.contains("rules: IPv4 3 deny, 3 allow; IPv6 1 deny, 0 allow"))
        },
    )
    .inspect_err(|_| eprintln!("{:?}", dirs.status(None)))?;
    // The tables in force: their size and how long the last build and swap took, in
    // `status` and /metrics.
    let status = dirs.status(None)?;
    assert!(
        status.contains("IPv4 table: 6 rules as ") && status.contains("MiB of kernel memory"),
        "{status}"
    );
    let (_, metrics) = installer.http("/metrics")?;
    for gauge in [
        "egress_deny_table_bytes{family=\"ipv4\"} ",
        "egress_deny_table_ranges{family=\"ipv6\"} ",
        "egress_deny_table_build_seconds{family=\"ipv4\"} ",
        "egress_deny_table_swap_seconds{family=\"ipv6\"} ",
    ] {
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(gauge))
            .with_context(|| format!("{gauge} missing:\n{metrics}"))?
            .parse()?;
        assert!(value > 0.0, "{gauge}{value}");
    }

    // A bad update is rejected whole, naming file and line; the previous set stays.
    dirs.publish_rules(&[
        ("threats", b"203.0.113.0/24\n192.0.2.0/24\n10.1.2.3/8\n"),
        ("more.gz", &gzip("")),
    ])?;
    installer.wait_for_metrics("egress_deny_sync_errors_total 1", Duration::from_secs(10))?;
    assert_eq!(
        lookup(&dirs, &addrs)?,
        expect,
        "rejected update changed the enforced set"
    );
    let status = dirs.status(None)?;
    assert!(
        status.contains("FAILED") && status.contains("threats:3: 10.1.2.3/8 has host bits set"),
        "{status}"
    );
    let (_, metrics) = installer.http("/metrics")?;
    assert!(metrics.contains("egress_deny_last_sync_success 0"));
    assert!(metrics.contains("# TYPE egress_deny_rules gauge"));
    assert!(
        metrics.contains("egress_deny_rules{family=\"ipv4\",action=\"deny\"} 3"),
        "{metrics}"
    );

    // Deny and allow of the same prefix: rejected too.
    dirs.publish_rules(&[
        ("threats", b"192.0.2.0/24\n!192.0.2.0/24\n"),
        ("more.gz", &gzip("")),
    ])?;
    installer.wait_for_metrics("egress_deny_sync_errors_total 2", Duration::from_secs(10))?;
    assert_eq!(lookup(&dirs, &addrs)?, expect);

    // A good update applies as a diff.
    dirs.publish_rules(&[("threats", b"192.0.2.0/24\n"), ("more.gz", &gzip(""))])?;
    wait_until("good update", Duration::from_secs(10), || {
        lookup(&dirs, &["192.0.2.55", "203.0.113.9"])
            .is_ok_and(|l| l == ["192.0.2.55 deny 192.0.2.0/24", "203.0.113.9 allow -"])
    })?;
    Ok(())
}

/// Everything together: installer in a node namespace with the real plugin and a real
/// runtime; rules edits, a rejected update, SIGTERM and restart, all checked by traffic.
#[test]
fn pods_and_host_follow_the_rules_across_bad_updates_and_restarts() -> Result<()> {
    require_root();
    let (node, dirs, _) = CniNode::with_installer_dirs(Primary::Bridge)?;
    let installer = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=up0"])?;
    installer.wait_ready()?;

    let conflist = dirs.conf_dir().join("10-bridge.conflist");
    let pod = node.added_pod(&conflist, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1")?;
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 3)?,
        3,
        "no rules yet"
    );

    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
    wait_until(
        "pod filtered after the rules edit",
        Duration::from_secs(10),
        || udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 1).is_ok_and(|n| n == 0),
    )?;
    assert!(
        !ping(&node.node, DENIED),
        "the node's own traffic (tc egress on up0) got through"
    );
    assert!(ping(&node.node, ALLOWED));

    // Metrics count exactly what was sent and denied.
    let denied_line = |m: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("egress_deny_packets_total{kind=\"pod\"")
                    && l.contains("pod=\"cart-1\"")
                    && l.contains("denied")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let before = denied_line(&installer.http("/metrics")?.1).context("pod series")?;
    assert_eq!(udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 25)?, 0);
    let after = denied_line(&installer.http("/metrics")?.1).context("pod series")?;
    assert_eq!(after - before, 25, "denied packets counted");
    wait_until("deny event logged", Duration::from_secs(5), || {
        installer.log_text().contains("denied: pod shop/cart-1")
            && installer
                .log_text()
                .contains(&format!("-> {DENIED} (rule {DENIED}/32"))
    })?;

    // A bad update keeps the old set: still dropped.
    dirs.publish_rules(&[("rules", b"198.51.100.0/33\n")])?;
    installer.wait_for_log("update rejected", Duration::from_secs(10))?;
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "bad update opened a gap"
    );

    // SIGTERM: prompt exit, enforcement stays; restart reuses the pinned maps.
    let took = installer.stop()?;
    eprintln!("SIGTERM to exit: {} ms", took.as_millis());
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "enforcement lost with the daemon"
    );
    // The rules file is still the rejected one: the previous set stays enforced, and
    // counts as loaded (the pinned config remembers it), so the daemon is ready.
    let installer = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=up0"])?;
    installer.wait_ready()?;
    assert!(installer.log_text().contains("reusing the pinned map"));
    // Ready at once (the pinned maps hold a valid set); the rules sync runs meanwhile.
    wait_until(
        "the rejected files found again",
        Duration::from_secs(10),
        || installer.log_text().contains("update rejected"),
    )?;
    // Only one program version attached node-wide: the pod's link now runs the program
    // this daemon pinned (moved by an atomic link update, not re-created).
    let record = egress_deny_datapath::records::AttachmentRecord::read(
        &egress_deny_datapath::paths::StateLayout::new(dirs.state_dir())
            .attachment_record(&pod.container_id, "eth0"),
    )?;
    let link = egress_deny_datapath::attach::pinned_link_state(
        &dirs.layout().pod_link(&pod.container_id, "eth0"),
    )?
    .context("pod link")?;
    let (_, current) = egress_deny_datapath::attach::pinned_program(
        &dirs.layout(),
        egress_deny_datapath::paths::ProgramKind::Ethernet,
    )?;
    assert_eq!(
        link.prog_id, current,
        "the pod still runs the previous daemon's program"
    );
    assert_eq!(record.program_id, current);
    assert!(installer.log_text().contains(&format!(
        "moved {} to program {current}",
        record.host_ifname
    )));
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "enforcement lost across restart"
    );

    // Removing the rule opens the path again; DEL removes the pod's series.
    dirs.publish_rules(&[("rules", b"# nothing\n")])?;
    wait_until("rule removal", Duration::from_secs(10), || {
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 1).is_ok_and(|n| n == 1)
    })?;
    pod.del(&conflist, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1")?
        .map_err(anyhow::Error::msg)?;
    let (_, metrics) = installer.http("/metrics")?;
    assert!(
        !metrics.contains("cart-1"),
        "series of a deleted pod remain:\n{metrics}"
    );
    Ok(())
}

/// Random global-unicast-looking IPv4 prefixes (fixed seed), avoiding 198.51.100.0/24
/// and 192.0.2.0/24 (the test destinations).
fn random_rules(count: usize, seed: u64) -> String {
    let mut state = seed;
    let mut out = String::with_capacity(count * 18);
    let mut n = 0;
    while n < count {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let addr = (state >> 32) as u32;
        let first = addr >> 24;
        if !(1..=223).contains(&first)
            || first == 10
            || first == 127
            || first == 198
            || first == 192
        {
            continue;
        }
        let len = match (state >> 8) % 100 {
            0 => 16,
            1..=10 => 24,
            _ => 32,
        };
        let masked = addr & (u32::MAX << (32 - len));
        out.push_str(&format!("{}/{len}\n", std::net::Ipv4Addr::from(masked)));
        n += 1;
    }
    out
}

/// A 1M-line update while UDP to a denied destination flows: not one packet leaks.
/// Old set: the destination's /32 + 1M other rules. New set: a covering /24 + 1M
/// different rules, the /32 gone — an update that opens a gap if applied in the wrong
/// order.
#[test]
fn million_line_update_while_traffic_flows_leaks_nothing() -> Result<()> {
    require_root();
    let (node, dirs, _) = CniNode::with_installer_dirs(Primary::Bridge)?;
    let old = format!(
        "{DENIED}/32\n!198.51.100.0/30\n{}",
        random_rules(1_000_000, 1)
    );
    dirs.publish_rules(&[("feed", old.as_bytes())])?;
    let installer = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=none"])?;
    installer.wait_ready()?;
    let conflist = dirs.conf_dir().join("10-bridge.conflist");
    let pod = node.pod()?;
    pod.add(&conflist, "")?.map_err(anyhow::Error::msg)?;
    assert_eq!(udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 3)?, 0);

    // Receiver bound to the denied address only; sender floods it from one CPU.
    let receiver = bind_in(&node.server, &format!("{DENIED}:0"))?;
    let port = receiver.local_addr()?.port();
    let leaked = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (leaked, stop) = (Arc::clone(&leaked), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if receiver.recv(&mut buf).is_ok() {
                    leaked.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let sender: UdpSocket = bind_in(pod.ns(), "0.0.0.0:0")?;
    let flood = {
        let (sent, stop) = (Arc::clone(&sent), Arc::clone(&stop));
        std::thread::spawn(move || {
            let _pin = CpuPin::current();
            while !stop.load(Ordering::Relaxed) {
                if sender.send_to(b"leak?", (DENIED, port)).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(200)); // pacing, not synchronisation
            }
        })
    };
    let new = format!(
        "198.51.100.0/24\n!198.51.100.0/29\n!198.51.100.0/30\n{}",
        random_rules(1_000_000, 2)
    );
    // .7 is inside the /29 exception: make sure the new set still denies it.
    let new = new.replace("!198.51.100.0/29\n", "!198.51.100.8/29\n");
    let syncs_before = std::fs::read_to_string(dirs.state_dir().join("status.json"))?;
    let started = Instant::now();
    dirs.publish_rules(&[("feed", new.as_bytes())])?;
    wait_until(
        "the 1M-line update to be applied",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(dirs.state_dir().join("status.json"))
                .is_ok_and(|s| s != syncs_before && s.contains("\"ok\": true"))
        },
    )?;
    let applied_in = started.elapsed();
    // Flush: one marker to the allowed address from the flooding CPU's path ordering.
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert_eq!(udp_through(pod.ns(), &node.server, ALLOWED, ALLOWED, 0)?, 0);
    counter.join().unwrap();
    let status: Value = serde_json::from_str(&std::fs::read_to_string(
        dirs.state_dir().join("status.json"),
    )?)?;
    eprintln!(
        "1M-line update: {} ms in the daemon, {} ms rename-to-status, {} packets sent during it, {} leaked; {}",
        status["lastSync"]["durationMs"],
        applied_in.as_millis(),
        sent.load(Ordering::Relaxed),
        leaked.load(Ordering::Relaxed),
        status["lastSync"]["operations"]
    );
    assert!(
        sent.load(Ordering::Relaxed) > 100,
        "the flood did not run during the update"
    );
    assert_eq!(
        leaked.load(Ordering::Relaxed),
        0,
        "packets to a destination denied before and after leaked"
    );
    Ok(())
}

/// With no bpffs where the pin dir goes, the loader mounts one (as on a node where
/// nothing mounted /sys/fs/bpf).
#[test]
fn bpffs_is_mounted_when_missing() -> Result<()> {
    require_root();
    let dir = tempfile::tempdir()?;
    let mount_point = dir.path().join("bpf");
    let layout = egress_deny_datapath::paths::PinLayout::new(mount_point.join("egress-deny"));
    assert!(!egress_deny_datapath::loader::is_bpffs(dir.path())?);
    let result = egress_deny_datapath::loader::load_and_pin(&layout);
    let mounted = egress_deny_datapath::loader::is_bpffs(&mount_point);
    let _ = egress_deny_datapath::loader::unpin_all(&layout);
    let _ = std::process::Command::new("umount")
        .arg(&mount_point)
        .status();
    result?;
    assert!(mounted?, "no bpffs mounted at {}", mount_point.display());
    Ok(())
}
