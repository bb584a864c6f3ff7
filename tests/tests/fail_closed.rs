//! Faults that must never open a path to a denied destination: an upgrade that replaces
//! a rule map, a rules volume that is not there. The real installer and plugin, a real
//! CNI runtime, real packets.
use std::time::Duration;

use anyhow::{Context, Result};
use egress_deny_datapath::{
    attach::{LinkState, pinned_link_state, pinned_program},
    paths::{ProgramKind, V4_TABLE_MAP},
};
use egress_deny_tests::{
    cni::{ALLOWED, CniNode, DENIED, Pod, Primary},
    installer::{Installer, InstallerDirs},
    probe::{ping, udp_through},
    require_root, run, wait_until,
};

/// Removes the v4 table map's pin and pins a new map there: what another version
/// (`Compatible::No`: a plain array) or a daemon killed right after creating the
/// replacement (`Compatible::Yes`: an empty outer map of this version's shape) leaves
/// behind. Programs using the old map keep it (the kernel holds it).
fn replace_pinned_v4_map(dirs: &InstallerDirs, compatible: Compatible) -> Result<()> {
    let pin = dirs.layout().map(V4_TABLE_MAP);
    std::fs::remove_file(&pin)?;
    let path = pin.display().to_string();
    let map = |args: &[&str]| -> Result<()> {
        let mut all = vec!["map", "create"];
        all.extend_from_slice(args);
        run("bpftool", &all).map(drop)
    };
    match compatible {
        Compatible::No => map(&[
            &path, "type", "array", "key", "4", "value", "4", "entries", "1", "name", "v4_table",
        ]),
        Compatible::Yes => {
            // The inner-map template: a table block array of this version's flags.
            let template = format!("{path}_template");
            let block = egress_deny_common::TABLE_BLOCK_BYTES.to_string();
            let flags = egress_deny_common::TABLE_MAP_FLAGS.to_string();
            map(&[
                &template, "type", "array", "key", "4", "value", &block, "entries", "1", "name",
                "tmpl", "flags", &flags,
            ])?;
            map(&[
                &path,
                "type",
                "array_of_maps",
                "key",
                "4",
                "value",
                "4",
                "entries",
                "1",
                "name",
                "v4_table",
                "inner_map",
                "pinned",
                &template,
            ])?;
            std::fs::remove_file(&template)?;
            Ok(())
        }
    }
}

enum Compatible {
    Yes,
    No,
}

fn program_in_use(dirs: &InstallerDirs) -> Result<u32> {
    Ok(pinned_program(&dirs.layout(), ProgramKind::Ethernet)?.1)
}

/// The link that attaches `pod`'s eth0.
fn pod_link(dirs: &InstallerDirs, pod: &Pod) -> Result<LinkState> {
    pinned_link_state(&dirs.layout().pod_link(&pod.container_id, "eth0"))?.context("pod link")
}

/// Waits for `installer` to be ready on a program other than `previous` and for `pod`'s
/// link to move to it; returns that program.
fn wait_for_the_pod_on_a_new_program(
    installer: &Installer,
    dirs: &InstallerDirs,
    pod: &Pod,
    previous: u32,
) -> Result<u32> {
    installer.wait_ready()?;
    let now = program_in_use(dirs)?;
    assert_ne!(now, previous);
    wait_until(
        "the pod on the new program",
        Duration::from_secs(10),
        || pod_link(dirs, pod).is_ok_and(|l| l.prog_id == now),
    )?;
    Ok(now)
}

/// Stops `installer`, replaces the pinned v4 map (see [`replace_pinned_v4_map`]),
/// publishes the broken `rules` and starts another daemon with `flags`: returned once it
/// has rejected them.
fn restart_over_a_replaced_map_with_broken_rules(
    node: &CniNode,
    dirs: &InstallerDirs,
    installer: Installer,
    compatible: Compatible,
    rules: &[u8],
    flags: &[&str],
) -> Result<Installer> {
    installer.stop()?;
    replace_pinned_v4_map(dirs, compatible)?;
    dirs.publish_rules(&[("rules", rules)])?;
    let installer = Installer::start(dirs, Some(&node.node), flags)?;
    installer.wait_for_log("update rejected", Duration::from_secs(20))?;
    Ok(installer)
}

/// Another egress-deny version left a v4 rule map of another definition pinned, and
/// the rules the new daemon finds are broken: before the fix the pods were moved to a
/// program reading the new, empty map and stayed unfiltered for as long as the rules
/// stayed broken (and new pods attached to it too, the node reporting ready).
#[test]
fn an_upgrade_that_replaces_a_rule_map_keeps_every_pod_filtered() -> Result<()> {
    require_root();
    let (node, dirs, conflist, installer) =
        CniNode::with_ready_installer(Primary::Bridge, &["--host-interfaces=up0"])?;
    let pod = node.added_pod(&conflist, "")?;
    assert_eq!(udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 3)?, 0);
    let old_program = program_in_use(&dirs)?;
    let installer = restart_over_a_replaced_map_with_broken_rules(
        &node,
        &dirs,
        installer,
        Compatible::No,
        b"198.51.100.0/33\n",
        &["--host-interfaces=up0"],
    )?;
    assert!(
        installer
            .log_text()
            .contains("replaced an incompatible pinned map"),
        "{}",
        installer.log_text()
    );
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "the running pod lost its filter to the empty replacement map"
    );
    assert!(
        !ping(&node.node, DENIED),
        "the node's own traffic got through"
    );
    assert_eq!(program_in_use(&dirs)?, old_program, "moved before filled");
    let (code, body) = installer.http("/readyz")?;
    assert_ne!(code, 200, "ready on maps without a valid rule set: {body}");

    // A pod started now is retried or filtered, never started unfiltered.
    let late = node.pod()?;
    match late.add(&conflist, "")? {
        Ok(_) => assert_eq!(
            udp_through(late.ns(), &node.server, DENIED, ALLOWED, 5)?,
            0,
            "a pod started during the upgrade is unfiltered"
        ),
        Err(failure) => assert_eq!(failure.code, 11, "{failure}"),
    }

    // Valid rules: the new maps are filled, then every attachment moves, still filtered.
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
    wait_for_the_pod_on_a_new_program(&installer, &dirs, &pod, old_program)?;
    assert!(!dirs.layout().staged_program(ProgramKind::Ethernet).exists());
    assert_eq!(udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?, 0);
    assert_eq!(udp_through(pod.ns(), &node.server, ALLOWED, ALLOWED, 3)?, 3);
    assert!(!ping(&node.node, DENIED));
    Ok(())
}

/// A kill between replacing the map and filling it: the next start must still treat
/// the (compatible, partly filled) new maps as staged, not as the maps in use.
#[test]
fn a_restart_in_the_middle_of_an_upgrade_stays_staged() -> Result<()> {
    require_root();
    let (node, dirs, conflist, installer) =
        CniNode::with_ready_installer(Primary::Bridge, &["--host-interfaces=none"])?;
    let pod = node.added_pod(&conflist, "")?;
    let old_program = program_in_use(&dirs)?;
    // Compatible with this version, but empty: what a daemon killed right after
    // creating the replacement leaves behind.
    let installer = restart_over_a_replaced_map_with_broken_rules(
        &node,
        &dirs,
        installer,
        Compatible::Yes,
        b"not a rule\n",
        &["--host-interfaces=none"],
    )?;
    assert!(installer.log_text().contains("reusing the pinned map"));
    assert_eq!(program_in_use(&dirs)?, old_program, "moved before filled");
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "the pod lost its filter after a restart mid-upgrade"
    );
    assert_ne!(installer.http("/readyz")?.0, 200);
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
    installer.wait_ready()?;
    assert_ne!(program_in_use(&dirs)?, old_program);
    assert_eq!(udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?, 0);
    Ok(())
}

/// A rules directory that is not there (volume not mounted, wrong flag) is an error:
/// the enforced rules stay, and a node that never had rules stays not ready with ADD
/// retried. An existing empty directory is a valid empty list.
#[test]
fn a_missing_rules_directory_is_an_error_that_keeps_the_enforced_rules() -> Result<()> {
    require_root();
    let (node, dirs, conflist) = CniNode::with_installer_dirs(Primary::Bridge)?;
    let rules = dirs.rules_dir();
    std::fs::remove_dir(&rules)?;
    let installer = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=none"])?;
    installer.wait_for_log("does not exist", Duration::from_secs(20))?;
    let (code, body) = installer.http("/readyz")?;
    assert_ne!(code, 200, "ready without rules: {body}");
    let pod = node.pod()?;
    let failure = pod
        .add(&conflist, "")?
        .err()
        .context("a pod started unfiltered on a node whose rules volume is missing")?;
    assert_eq!(failure.code, 11, "{failure}");
    installer.stop()?;

    // Rules enforced, then the directory goes away: they stay.
    std::fs::create_dir(&rules)?;
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
    let installer = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=none"])?;
    installer.wait_ready()?;
    // (The refused pod's sandbox keeps the bridge's veth, as a runtime's would until
    // its DEL: a new sandbox.)
    let pod = node.added_pod(&conflist, "")?;
    assert_eq!(udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 3)?, 0);
    std::fs::rename(&rules, dirs.root.path().join("rules-unmounted"))?;
    installer.wait_for_log("the rules enforced before stay", Duration::from_secs(20))?;
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "a missing rules directory removed the enforced rules"
    );
    let lookup = dirs.lookup(Some(&node.node), &[DENIED])?;
    assert!(lookup.contains(" deny "), "{lookup}");

    // An existing, empty directory: a valid empty list.
    std::fs::create_dir(&rules)?;
    wait_until("the empty list applied", Duration::from_secs(20), || {
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 1).is_ok_and(|n| n == 1)
    })?;
    assert_eq!(installer.http("/readyz")?.0, 200);
    Ok(())
}

fn peak_rss_mib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmHWM")?;
    Ok(kib / 1024)
}

/// What every limit guarantees: on a node enforcing DENIED/32 with a pod, its daemon
/// run with `limit`, an update of DENIED/32 plus the file `key` holding `feed` is
/// rejected whole (the log names `rejection`); `check` looks at what the daemon left,
/// and the pod stays filtered.
fn an_update_over_a_limit_is_rejected_whole(
    limit: &str,
    (key, feed): (&str, &[u8]),
    rejection: &str,
    check: impl FnOnce(&CniNode, &InstallerDirs, &Installer) -> Result<()>,
) -> Result<()> {
    let (node, dirs, conflist, installer) =
        CniNode::with_ready_installer(Primary::Bridge, &["--host-interfaces=none", limit])?;
    let pod = node.added_pod(&conflist, "")?;
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes()), (key, feed)])?;
    installer.wait_for_log(rejection, Duration::from_secs(60))?;
    check(&node, &dirs, &installer)?;
    assert_eq!(udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?, 0);
    Ok(())
}

/// A ConfigMap key of a few hundred KiB that decompresses to 400 MB of one repeated
/// line: rejected whole by the byte limit, with bounded memory, the rules enforced
/// before stay. Before the limits the daemon held every line's entry (and in a
/// container got OOM-killed in a loop).
#[test]
fn a_gzip_bomb_is_rejected_whole_with_bounded_memory() -> Result<()> {
    require_root();
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = "10.1.2.3\n".repeat(1 << 16);
    for _ in 0..(400_000_000 / chunk.len()) {
        std::io::Write::write_all(&mut bomb, chunk.as_bytes())?;
    }
    let bomb = bomb.finish()?;
    assert!(bomb.len() < 2 << 20, "{} bytes compressed", bomb.len());
    an_update_over_a_limit_is_rejected_whole(
        "--max-rules-bytes=100000000",
        ("feed.gz", &bomb),
        "--max-rules-bytes",
        |node, dirs, installer| {
            let peak = peak_rss_mib(installer.pid())?;
            eprintln!("daemon peak RSS after the rejected bomb: {peak} MiB");
            assert!(peak < 200, "peak RSS {peak} MiB");
            let status = dirs.status(Some(&node.node))?;
            assert!(status.contains("--max-rules-bytes"), "{status}");
            Ok(())
        },
    )
}

/// More rules than the configured table budget (`--max-table-bytes`; the daemon's
/// memory cgroup is the other bound, unit-tested in sync.rs): rejected whole before the
/// tables are touched, the old set stays enforced.
#[test]
fn an_update_over_the_table_budget_is_rejected_before_touching_the_tables() -> Result<()> {
    require_root();
    // 500k addresses two apart: a million ranges, about 8 MiB of table.
    let mut feed = String::with_capacity(8 << 20);
    for i in 0..500_000u32 {
        let [_, b, c, d] = (i * 2).to_be_bytes();
        feed.push_str(&format!("11.{b}.{c}.{d}\n"));
    }
    an_update_over_a_limit_is_rejected_whole(
        "--max-table-bytes=4194304",
        ("feed", feed.as_bytes()),
        "over --max-table-bytes",
        |node, dirs, _| {
            let lookup = dirs.lookup(Some(&node.node), &["11.0.0.2", DENIED])?;
            assert!(
                lookup.contains("11.0.0.2 allow"),
                "tables touched: {lookup}"
            );
            Ok(())
        },
    )
}

/// 1M rules with `extra` first: a 198.51.100.x prefix covering DENIED in every version,
/// and a marker rule unique to the version (to see which one is enforced).
fn big_rules(version: u32, extra: &str) -> String {
    let mut out = String::with_capacity(16 << 20);
    out.push_str(extra);
    out.push_str(&format!("203.0.113.{version}/32\n"));
    for i in 0..1_000_000u32 {
        // Every version moves the block: most of the 1M entries change each time.
        let [_, b, c, d] = (i + version * 7919).to_be_bytes();
        out.push_str(&format!("{}.{b}.{c}.{d}\n", 11 + version % 2));
    }
    out
}

/// kill -9 at random points of 1M-rule syncs, 10 times, under a flood to a destination
/// denied by every version (by its /32 in even versions, by a covering /24 with a
/// narrower exception elsewhere in odd ones): not one packet arrives, and each restart
/// converges to the published version.
#[test]
fn kill_9_during_million_rule_syncs_leaks_nothing_and_converges() -> Result<()> {
    require_root();
    let (node, dirs, conflist) = CniNode::with_installer_dirs(Primary::Bridge)?;
    let version_rules = |v: u32| {
        if v.is_multiple_of(2) {
            big_rules(v, &format!("{DENIED}/32\n"))
        } else {
            big_rules(v, "198.51.100.0/24\n!198.51.100.128/25\n")
        }
    };
    dirs.publish_rules(&[("feed", version_rules(0).as_bytes())])?;
    let mut installer = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=none"])?;
    installer.wait_ready()?;
    let pod = node.added_pod(&conflist, "")?;
    let flood = egress_deny_tests::probe::Flood::start(pod.ns(), &node.server, DENIED)?;
    let lookup_marker = |v: u32| -> Result<bool> {
        let out = dirs.lookup(Some(&node.node), &[&format!("203.0.113.{v}")])?;
        Ok(out.contains(" deny "))
    };
    let mut rng_state = 0x9e37_79b9_u64;
    for version in 1..=10u32 {
        dirs.publish_rules(&[("feed", version_rules(version).as_bytes())])?;
        // A random point in the sync (a 1M-entry diff takes about 1.5-3 s here): the
        // fault injection itself, not synchronisation.
        rng_state = rng_state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis((rng_state >> 33) % 2500);
        std::thread::sleep(delay);
        installer.kill()?;
        installer = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=none"])?;
        wait_until(
            &format!("version {version} enforced after kill -9 at {delay:?}"),
            Duration::from_secs(120),
            // Converged: this version's marker in, the previous one's out (removals
            // are the last phase of a sync).
            || {
                lookup_marker(version).unwrap_or(false)
                    && !lookup_marker(version - 1).unwrap_or(true)
            },
        )?;
        installer.wait_ready()?;
    }
    let (sent, arrived) = flood.finish();
    eprintln!("10 kill -9 trials: {sent} packets sent to a denied destination, {arrived} arrived");
    assert!(sent > 1000, "the flood did not run");
    assert_eq!(arrived, 0, "packets leaked across kill -9 during syncs");
    Ok(())
}

/// Loads `r0 = TC_ACT_OK; exit`: a program that ends the tc chain with "pass", as a
/// primary CNI's program does when it has decided.
fn pass_all_program() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]), // mov64 r0, 0 (TC_ACT_OK)
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]), // exit
    ];
    let license = c"GPL";
    let mut attr = [0u64; 16];
    attr[0] = 3 | (2u64 << 32); // prog_type SCHED_CLS, insn_cnt 2
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // SAFETY: a valid bpf_attr for BPF_PROG_LOAD; the pointers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            5, // BPF_PROG_LOAD
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    anyhow::ensure!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Another component attaches a program ahead of ours (TCX, BPF_F_BEFORE) that passes
/// every packet: ours would never run. The daemon notices within its tick, puts ours
/// first again (leaving the other one attached), and counts the repair.
#[test]
fn a_program_attached_ahead_of_ours_is_put_behind_it_again() -> Result<()> {
    use std::os::fd::AsFd;
    require_root();
    let (node, dirs, conflist, installer) =
        CniNode::with_ready_installer(Primary::Bridge, &["--host-interfaces=none"])?;
    let pod = node.added_pod(&conflist, "")?;
    assert_eq!(udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 3)?, 0);
    let record = egress_deny_datapath::records::AttachmentRecord::read(
        &egress_deny_datapath::paths::StateLayout::new(dirs.state_dir())
            .attachment_record(&pod.container_id, "eth0"),
    )?;
    let ingress =
        egress_deny_datapath::attach::tcx_attach_type(egress_deny_datapath::attach::Hook::Ingress);

    let pass = pass_all_program()?;
    let foreign = {
        let _in_node = egress_deny_datapath::netns::NetnsGuard::enter(&node.node.path())?;
        egress_deny_datapath::sys::tcx_link_create(pass.as_fd(), record.host_ifindex, ingress)?
    };
    let ours = || -> Result<u32> { Ok(pod_link(&dirs, &pod)?.id) };
    let first_on_hook = || -> Result<u32> {
        let _in_node = egress_deny_datapath::netns::NetnsGuard::enter(&node.node.path())?;
        let chain = egress_deny_datapath::sys::tcx_query(record.host_ifindex, ingress)?;
        Ok(chain.link_ids.first().copied().unwrap_or(0))
    };
    assert_ne!(first_on_hook()?, ours()?, "the foreign program is first");
    wait_until(
        "egress-deny first again",
        Duration::from_secs(10),
        || matches!((first_on_hook(), ours()), (Ok(first), Ok(ours)) if first == ours),
    )
    .inspect_err(|_| {
        eprintln!(
            "first {:?}, ours {:?}\n{}",
            first_on_hook(),
            ours(),
            installer.log_text()
        )
    })?;
    assert_eq!(
        udp_through(pod.ns(), &node.server, DENIED, ALLOWED, 5)?,
        0,
        "denied packets pass while another program runs ahead of ours"
    );
    // Counted just after the re-order takes effect.
    installer.wait_for_metrics(
        "egress_deny_attachment_repairs_total 1",
        Duration::from_secs(5),
    )?;
    // The log line is written by the daemon's logger, possibly after the metric moved.
    installer
        .wait_for_log("attached ahead of egress-deny", Duration::from_secs(5))
        .inspect_err(|_| eprintln!("{}", installer.log_text()))?;
    // The other component's program stays attached, behind ours.
    let _in_node = egress_deny_datapath::netns::NetnsGuard::enter(&node.node.path())?;
    let chain = egress_deny_datapath::sys::tcx_query(record.host_ifindex, ingress)?;
    assert_eq!(chain.link_ids.len(), 2, "{chain:?}");
    drop(foreign);
    Ok(())
}

/// A host interface whose link-layer header neither program parses (InfiniBand here,
/// a TUN device claiming ARPHRD_INFINIBAND): it used to get the L3 program, which read
/// the IPoIB header as IP and let everything through while `status` said "filtered".
/// Now it is refused and reported, in `status` and `/metrics`.
#[test]
fn a_host_interface_with_an_unparsable_header_is_refused_and_reported() -> Result<()> {
    require_root();
    const ARPHRD_INFINIBAND: u16 = 32;
    let ns = egress_deny_tests::Netns::new("edib")?;
    let dirs = InstallerDirs::with_placeholder_primary()?;
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
    let _tun = ns.open_tun("ib0", Some(ARPHRD_INFINIBAND))?;
    ns.ip("link set ib0 up")?;
    let installer = Installer::start(&dirs, Some(&ns), &["--host-interfaces=ib0"])?;
    installer.wait_ready()?;
    installer.wait_for_metrics(
        "egress_deny_host_interfaces_unfiltered 1",
        Duration::from_secs(10),
    )?;
    assert!(!dirs.layout().host_link("ib0").exists(), "attached anyway");
    let status = dirs.status(Some(&ns))?;
    assert!(
        status.contains("host interface ib0: NOT filtered") && status.contains("link type 32"),
        "{status}"
    );
    assert!(installer.log_text().contains("ib0 is NOT filtered"));
    Ok(())
}

/// Under a flood to a denied destination: three restarts (each pins a freshly loaded
/// program and moves every link to it), then an upgrade that replaces the v4 rule map
/// (staged, filled, promoted). Not one packet arrives, and each step ends on a new
/// program.
#[test]
fn program_upgrades_and_a_map_replacement_under_a_flood_leak_nothing() -> Result<()> {
    require_root();
    let (node, dirs, conflist, mut installer) =
        CniNode::with_ready_installer(Primary::Bridge, &["--host-interfaces=up0"])?;
    let pod = node.added_pod(&conflist, "")?;
    let flood = egress_deny_tests::probe::Flood::start(pod.ns(), &node.server, DENIED)?;
    let mut previous = pod_link(&dirs, &pod)?.prog_id;
    // Three plain restarts, then one over a replaced map (staged, filled, promoted).
    for replace_map in [false, false, false, true] {
        installer.stop()?;
        if replace_map {
            replace_pinned_v4_map(&dirs, Compatible::No)?;
        }
        installer = Installer::start(&dirs, Some(&node.node), &["--host-interfaces=up0"])?;
        previous = wait_for_the_pod_on_a_new_program(&installer, &dirs, &pod, previous)?;
    }
    let (sent, arrived) = flood.finish();
    eprintln!(
        "upgrades under a flood: {sent} packets sent to a denied destination, {arrived} arrived"
    );
    assert!(sent > 500, "the flood did not run");
    assert_eq!(arrived, 0, "packets leaked during upgrades");
    Ok(())
}

/// Our own tools must not harm the machine they run on: nothing in the repository stops
/// processes by name (that stops other people's too); benchmarks and tests stop what
/// they started, by pid. Before, bench-suite stopped every iperf3 on the machine by name.
#[test]
fn nothing_in_the_repository_kills_processes_by_name() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let words = [["p", "kill"].concat(), ["kill", "all"].concat()];
    let mut offenders = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    dirs.push(path);
                }
                continue;
            }
            if !["rs", "sh", "py", "yaml", "Containerfile"]
                .iter()
                .any(|ext| name.ends_with(ext))
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if words.iter().any(|w| {
                    code.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .any(|token| token == w)
                }) {
                    offenders.push(format!("{}:{}: {line}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "kills by name:\n{}",
        offenders.join("\n")
    );
    Ok(())
}

/// On kernels without TCX host interfaces get cls_bpf filters, which have no pin: they
/// used to be missing from `status`, left behind when the default route moved, and
/// left behind by `uninstall`; a deleted clsact qdisc went unnoticed. (The cls_bpf
/// fallback forced here by its variable.)
#[test]
fn cls_bpf_host_attachments_are_reported_followed_and_uninstalled() -> Result<()> {
    require_root();
    let ns = egress_deny_tests::Netns::new("edcb")?;
    let dirs = InstallerDirs::with_placeholder_primary()?;
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
    for (up, net) in [("up1", "100.64.1"), ("up2", "100.64.2")] {
        ns.ip(&format!("link add {up} type veth peer name {up}p"))?;
        ns.ip(&format!("addr add {net}.1/24 dev {up}"))?;
        ns.ip(&format!("link set {up} up"))?;
        ns.ip(&format!("link set {up}p up"))?;
    }
    ns.ip("route add default via 100.64.1.2")?;
    let filtered = |dev: &str| {
        ns.exec("tc", &["filter", "show", "dev", dev, "egress"])
            .is_ok_and(|out| out.contains("egress_deny"))
    };
    let installer = Installer::start_with_env(
        &dirs,
        Some(&ns),
        &["--host-interfaces=auto"],
        &[("EGRESS_DENY_ATTACH_MODE", "netlink")],
    )?;
    installer.wait_ready()?;
    wait_until("up1 filtered by cls_bpf", Duration::from_secs(10), || {
        filtered("up1")
    })?;
    assert!(
        !dirs.layout().host_link("up1").exists(),
        "TCX used, not cls_bpf"
    );
    let status = dirs.status(Some(&ns))?;
    assert!(status.contains("host up1"), "{status}");

    // Someone deletes the clsact qdisc (and with it our filter): restored on the tick.
    ns.exec("tc", &["qdisc", "del", "dev", "up1", "clsact"])?;
    assert!(!filtered("up1"));
    wait_until("the filter restored", Duration::from_secs(10), || {
        filtered("up1")
    })?;
    installer.wait_for_metrics(
        "egress_deny_attachment_repairs_total 1",
        Duration::from_secs(5),
    )?;
    assert!(installer.log_text().contains(
        "was gone (filter or clsact deleted); attached again (on a link/tc notification)"
    ));

    ns.ip("route replace default via 100.64.2.2")?;
    wait_until(
        "the filter follows the default route",
        Duration::from_secs(10),
        || filtered("up2") && !filtered("up1"),
    )?;
    drop(installer);
    dirs.cli(
        Some(&ns),
        &[
            "uninstall",
            &format!("--pin-dir={}", dirs.pin_dir.display()),
            &format!("--state-dir={}", dirs.state_dir().display()),
            &format!("--cni-conf-dir={}", dirs.conf_dir().display()),
            &format!("--cni-bin-dir={}", dirs.bin_dir().display()),
        ],
    )?;
    assert!(!filtered("up2"), "uninstall left the cls_bpf filter on up2");
    Ok(())
}
