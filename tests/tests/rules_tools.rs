//! What operators run around the rules (issue 12), end to end with the real binary:
//! `rules check` on good and bad input, `rules configmaps` output through a kubelet-style
//! rules directory into the running daemon, `--log-format json` with deny events, the
//! PrometheusRule under promtool, and the Grafana dashboard against a live `/metrics`.
use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use egress_deny_tests::{
    base64_decode, binary,
    cni::{CniNode, DENIED},
    installer::{Installer, InstallerDirs},
    manifests,
    probe::ping,
    require_root, wait_until,
};
use serde_json::Value;

fn conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf")
}

fn installer(args: &[&str]) -> Result<Output> {
    Ok(Command::new(binary("egress-deny-installer"))
        .args(args)
        .output()?)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn gzip(text: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(text).unwrap();
    enc.finish().unwrap()
}

/// `rules check --json`'s per-family counts.
fn check_counts(paths: &[&Path]) -> Result<Value> {
    let mut args = vec!["rules", "check", "--json"];
    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    let out = installer(&args)?;
    let report: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(out.status.success(), "rules check failed: {report:#}");
    Ok(report["rules"].clone())
}

#[test]
fn check_lists_every_error_of_bad_input_and_fails() -> Result<()> {
    // The feed samples: valid, with counts.
    let feeds = conf().join("examples/feeds");
    let samples = [
        feeds.join("spamhaus-drop.txt"),
        feeds.join("firehol-level1.netset"),
        feeds.join("ranges.txt"),
    ];
    let mut args = vec!["rules".to_owned(), "check".to_owned()];
    args.extend(samples.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = installer(&args)?;
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.ends_with("ok: 3 files, 32 lines: IPv4 12 deny / 1 allow, IPv6 2 deny / 0 allow (duplicates dropped)\n"),
        "{text}"
    );

    // Bad input, in a kubelet-style directory: a truncated gzip, a range with A > B, a
    // 50 MB single line, a host-bits error; the good lines around them still count.
    let dirs = InstallerDirs::new()?;
    let mut cut = gzip(b"10.0.0.0/8\n192.0.2.0/24\n");
    cut.truncate(cut.len() - 10);
    let huge = vec![b'7'; 50 << 20];
    dirs.publish_rules(&[
        ("a-cut.txt.gz", &cut),
        (
            "b-ranges",
            b"# ranges\n10.0.0.1-10.0.0.6\n10.0.0.9-10.0.0.1\n",
        ),
        ("c-one-line", &huge),
        ("d-bits", b"198.51.100.0/24 ; ok\n10.1.2.3/8\n"),
    ])?;
    let rules = dirs.rules_dir();
    let out = installer(&["rules", "check", &rules.display().to_string()])?;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let dir = rules.display();
    for wanted in [
        format!("{dir}/a-cut.txt.gz: read error: "),
        format!("{dir}/b-ranges:3: range 10.0.0.9-10.0.0.1 runs backwards"),
        format!("{dir}/c-one-line:1: a line longer than 65536 bytes"),
        format!("{dir}/d-bits:2: 10.1.2.3/8 has host bits set (did you mean 10.0.0.0/8?)"),
        "INVALID: 4 errors".to_owned(),
    ] {
        assert!(text.contains(&wanted), "{wanted:?} missing:\n{text}");
    }
    // The daemon's names (the ConfigMap key), not kubelet's snapshot directory.
    assert!(!text.contains("/.."), "{text}");

    let out = installer(&["rules", "check", "--json", &rules.display().to_string()])?;
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["valid"], false);
    assert_eq!(report["errors"].as_array().context("errors")?.len(), 4);
    assert_eq!(report["errors"][1]["line"], 3);
    // The ranges' four prefixes and the /24 (a partly read gzip may add its lines).
    assert!(
        report["rules"]["ipv4"]["deny"].as_u64() >= Some(4 + 1),
        "{report:#}"
    );
    Ok(())
}

#[test]
fn configmaps_round_trip_through_a_kubelet_rules_dir_into_the_daemon() -> Result<()> {
    require_root();
    let work = tempfile::tempdir()?;
    // A feed in every format: Spamhaus comments, bare addresses, ranges, IPv6, exceptions.
    let mut feed = String::from("; Spamhaus-style header\n# and a FireHOL one\n");
    for i in 0..40_000u32 {
        let a = 0x0b00_0000 + i * 397;
        feed.push_str(&format!("{} ; SBL{i}\n", std::net::Ipv4Addr::from(a)));
    }
    feed.push_str("203.0.113.10-203.0.113.20\n2001:db8::/32\n!2001:db8:1::/48\n");
    feed.push_str("100.64.0.0/10\n!100.64.1.0-100.64.1.255\n");
    let input = work.path().join("feed.txt");
    std::fs::write(&input, &feed)?;
    let input_s = input.display().to_string();
    let patch = work.path().join("patch.json");
    let patch_s = patch.display().to_string();
    let args = [
        "rules",
        "configmaps",
        "--name",
        "threats",
        "--max-bytes",
        "32768",
        "--output",
        "json",
        "--patch",
        &patch_s,
        &input_s,
    ];
    let first = installer(&args)?;
    ensure!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // Deterministic: the same input, byte-identical output.
    let again = installer(&args)?;
    assert_eq!(first.stdout, again.stdout);
    let list: Value = serde_json::from_slice(&first.stdout)?;
    let configmaps = list["items"].as_array().context("items")?;
    assert!(configmaps.len() >= 4, "{} ConfigMaps", configmaps.len());

    // The patch mounts every one of them (after the base's own list).
    let patch: Value = serde_json::from_slice(&std::fs::read(&patch)?)?;

    // The YAML output holds the same objects (and the same patch).
    let mut yaml_args = args.to_vec();
    yaml_args[7] = "yaml";
    let yaml = installer(&yaml_args)?;
    assert!(yaml.status.success());
    assert_eq!(&manifests::yaml(&stdout(&yaml))?, configmaps);
    assert_eq!(
        manifests::yaml(&std::fs::read_to_string(&patch_s)?)?,
        std::slice::from_ref(&patch)
    );
    let sources: Vec<&str> =
        patch["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
            .as_array()
            .context("sources")?
            .iter()
            .filter_map(|s| s["configMap"]["name"].as_str())
            .collect();
    assert_eq!(sources[0], "egress-deny-rules");
    let mut files = Vec::new();
    for cm in configmaps {
        let name = cm["metadata"]["name"].as_str().context("name")?;
        assert!(sources.contains(&name), "{name} not mounted");
        for (key, value) in cm["binaryData"].as_object().context("binaryData")? {
            let text = value.as_str().context("base64")?;
            assert!(text.len() <= 32768, "{name}: {} bytes", text.len());
            files.push((key.clone(), base64_decode(text)?));
        }
    }

    // Kubelet's projection of them → the daemon's parser: the same rule set.
    let dirs = InstallerDirs::new()?;
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    dirs.publish_rules(&refs)?;
    let wanted = check_counts(&[&input])?;
    assert_eq!(check_counts(&[&dirs.rules_dir()])?, wanted);
    assert_eq!(wanted["ipv4"]["deny"], 40_000 + 4 + 1);

    // And the running daemon enforces it.
    let daemon = Installer::start(&dirs, None, &["--host-interfaces=none"])?;
    let deny_line = format!(
        "egress_deny_rules{{family=\"ipv4\",action=\"deny\"}} {}",
        wanted["ipv4"]["deny"]
    );
    wait_until(
        "the generated rules loaded",
        Duration::from_secs(30),
        || {
            daemon
                .http("/metrics")
                .is_ok_and(|(_, m)| m.contains(&deny_line))
        },
    )
    .with_context(|| daemon.log_text())?;
    let mut lookup = vec!["lookup".to_owned()];
    lookup.extend(dirs.state_args());
    lookup.extend(["203.0.113.17", "100.64.1.9", "100.64.2.9", "2001:db8:2::1"].map(String::from));
    let lookup: Vec<&str> = lookup.iter().map(String::as_str).collect();
    let answer = dirs.cli(None, &lookup)?;
    let lines: Vec<&str> = answer.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(
        lines,
        [
            "203.0.113.17 deny 203.0.113.16/30",
            "100.64.1.9 allow 100.64.1.0/24",
            "100.64.2.9 deny 100.64.0.0/10",
            "2001:db8:2::1 deny 2001:db8::/32",
        ],
        "{answer}"
    );
    drop(daemon);

    // Bad input makes no ConfigMaps: the error names file and line.
    std::fs::write(&input, "10.0.0.0/8\n10.0.0.9-10.0.0.1\n")?;
    let out = installer(&["rules", "configmaps", "--name", "threats", &input_s])?;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("feed.txt:2: range 10.0.0.9-10.0.0.1 runs backwards"),
        "{err}"
    );
    Ok(())
}

/// conf/examples/large-lists holds what the tool makes of the feed samples (regenerated
/// when the tool changes: the command is in its kustomization.yaml).
#[test]
fn the_large_lists_overlay_is_the_tools_output() -> Result<()> {
    let dir = conf().join("examples/large-lists");
    let work = tempfile::tempdir()?;
    let patch = work.path().join("rules-volume-patch.yaml");
    let out = Command::new(binary("egress-deny-installer"))
        .current_dir(&dir)
        .args([
            "rules",
            "configmaps",
            "--name",
            "egress-deny-feed",
            "--patch",
        ])
        .arg(&patch)
        .args([
            "../feeds/spamhaus-drop.txt",
            "../feeds/firehol-level1.netset",
            "../feeds/ranges.txt",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout(&out),
        std::fs::read_to_string(dir.join("configmaps.yaml"))?,
        "regenerate configmaps.yaml (see large-lists/kustomization.yaml)"
    );
    assert_eq!(
        std::fs::read_to_string(&patch)?,
        std::fs::read_to_string(dir.join("rules-volume-patch.yaml"))?
    );
    Ok(())
}

/// The PrometheusRule's `spec` is a valid rules file, and its alerts fire (and only
/// fire) as conf/monitoring/prometheusrule-tests.yaml says.
#[test]
fn prometheus_rules_pass_promtool_check_and_unit_tests() -> Result<()> {
    let rule = &manifests::yaml(&std::fs::read_to_string(
        conf().join("kubernetes/prometheusrule.yaml"),
    )?)?[0];
    assert_eq!(rule["kind"], "PrometheusRule");
    let work = tempfile::tempdir()?;
    std::fs::write(
        work.path().join("rules.json"),
        serde_json::to_vec(&rule["spec"])?,
    )?;
    std::fs::copy(
        conf().join("monitoring/prometheusrule-tests.yaml"),
        work.path().join("tests.yaml"),
    )?;
    for args in [
        ["check", "rules", "rules.json"],
        ["test", "rules", "tests.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(work.path())
            .output()
            .context("promtool (Debian's prometheus package; tests/setup.sh)")?;
        ensure!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert the issue asks for is there and tested.
    let tests = std::fs::read_to_string(work.path().join("tests.yaml"))?;
    for alert in rule["spec"]["groups"][0]["rules"]
        .as_array()
        .context("rules")?
    {
        let name = alert["alert"].as_str().context("alert")?;
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "{name} untested"
        );
    }
    let exprs = serde_json::to_string(&rule["spec"])?;
    for metric in [
        "egress_deny_last_successful_sync_timestamp_seconds",
        "egress_deny_last_sync_success",
        "egress_deny_sync_errors_total",
        "egress_deny_attachment_repairs_total",
        "egress_deny_deny_events_suppressed_total",
        "egress_deny_ready",
        "egress_deny_host_interfaces_unfiltered",
    ] {
        assert!(exprs.contains(metric), "no alert on {metric}");
    }
    Ok(())
}

/// `egress_deny_…` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("egress_deny_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// A live daemon filtering a host interface, with `--log-format json`: every log line is
/// a JSON object with an RFC 3339 time, a deny is an event with its fields, `status`
/// shows RFC 3339 times, and every metric the dashboard and the alerts query is exported.
#[test]
fn json_logs_deny_events_and_dashboard_queries_on_a_live_daemon() -> Result<()> {
    require_root();
    let node = CniNode::new()?;
    let dirs = InstallerDirs::new()?;
    dirs.publish_rules(&[("rules", format!("{DENIED}/32\n").as_bytes())])?;
    let daemon = Installer::start(
        &dirs,
        Some(&node.node),
        &["--host-interfaces=up0", "--log-format=json"],
    )?;
    wait_until("the rules loaded", Duration::from_secs(30), || {
        daemon.http("/metrics").is_ok_and(|(_, m)| {
            m.contains("egress_deny_rules{family=\"ipv4\",action=\"deny\"} 1")
                && m.contains("egress_deny_attachments{kind=\"host\"} 1")
        })
    })
    .with_context(|| daemon.log_text())?;
    assert!(!ping(&node.node, DENIED), "the node's traffic got through");

    let mut deny = None;
    wait_until("a JSON deny event", Duration::from_secs(10), || {
        deny = daemon.log_text().lines().find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v["event"] == "deny")
        });
        deny.is_some()
    })
    .with_context(|| daemon.log_text())?;
    let deny = deny.context("deny")?;
    assert_eq!(deny["interface"], "up0", "{deny}");
    assert_eq!(deny["destination"], DENIED, "{deny}");
    assert_eq!(deny["rule"], format!("{DENIED}/32"), "{deny}");
    assert_eq!(deny["level"], "WARN", "{deny}");
    assert!(deny["bytes"].as_u64().is_some_and(|b| b > 0), "{deny}");
    for line in daemon.log_text().lines() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let time = v["time"].as_str().context("time")?;
        // 2026-11-22T10:00:00.123Z
        assert!(
            time.len() == 24 && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
            "{line}"
        );
        assert!(v["message"].is_string() && v["level"].is_string(), "{line}");
    }
    let (_, status) = dirs.status_code(None)?;
    let sync = status
        .lines()
        .find(|l| l.starts_with("last sync: "))
        .context("last sync")?;
    assert!(
        sync.as_bytes().get(21) == Some(&b'T')
            && sync[11..]
                .split(' ')
                .next()
                .is_some_and(|t| t.ends_with('Z')),
        "{status}"
    );

    // Every metric the dashboard and the alerts query is on /metrics.
    let metrics = daemon.http("/metrics")?.1;
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    assert!(exported.len() >= 10, "{metrics}");
    let dashboard: Value = serde_json::from_slice(&std::fs::read(
        conf().join("monitoring/grafana-dashboard.json"),
    )?)?;
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        let targets = panel["targets"].as_array().context("targets")?;
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            exprs.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                target["expr"].as_str().context("expr")?.to_owned(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .context("templating")?
    {
        if let Some(q) = variable["query"]["query"].as_str() {
            exprs.push((variable["name"].to_string(), q.to_owned()));
        }
    }
    let rule = &manifests::yaml(&std::fs::read_to_string(
        conf().join("kubernetes/prometheusrule.yaml"),
    )?)?[0];
    for alert in rule["spec"]["groups"][0]["rules"]
        .as_array()
        .context("rules")?
    {
        exprs.push((
            alert["alert"].as_str().unwrap_or_default().to_owned(),
            alert["expr"].as_str().context("expr")?.to_owned(),
        ));
    }
    for (what, expr) in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "{what}: {expr} queries no egress-deny metric"
        );
        for name in names {
            assert!(
                exported.contains(&name),
                "{what}: {name} is not exported:\n{metrics}"
            );
        }
    }
    // The panels the issue asks for.
    let titles = serde_json::to_string(&dashboard["panels"])?.to_lowercase();
    for topic in [
        "denied packets per pod",
        "allowed packets per pod",
        "per host interface",
        "rules enforced",
        "sync duration",
        "table memory",
    ] {
        assert!(titles.contains(topic), "no panel for {topic}");
    }
    // The host interface's series the host panels select exists.
    assert!(
        metrics.contains("egress_deny_packets_total{kind=\"host\",interface=\"up0\""),
        "{metrics}"
    );
    Ok(())
}
