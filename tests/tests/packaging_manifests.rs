//! Packaging, the manifests: they (and the rendered kustomizations) validate against the
//! Kubernetes OpenAPI schemas offline and pass a security scan with every skip justified.
use std::process::Command;

use anyhow::{Context, Result, ensure};
use egress_deny_tests::manifests::{
    VENV, base_dir, configmap_files, container_env, find, large_lists_dir, listen_port, render,
    run_with_stdin, uninstall_job, yaml, yaml_file,
};
use serde_json::{Value, json};

#[test]
fn manifests_validate_against_kubernetes_schemas() -> Result<()> {
    let validate = |what: &str, text: &str| -> Result<()> {
        let out = run_with_stdin(
            Command::new(format!("{VENV}/kubernetes-validate")).args(["--strict", "-"]),
            text.as_bytes(),
        )
        .with_context(|| what.to_owned())?;
        let passed = out.matches("passed").count();
        ensure!(passed > 0, "{what}: {out}");
        ensure!(
            !out.contains("WARN") && !out.contains("ERROR") && !out.contains("failed"),
            "{what}: {out}"
        );
        Ok(())
    };
    let base = render(&base_dir())?;
    let large = render(&large_lists_dir())?;
    validate("rendered conf/kubernetes", &base)?;
    validate("rendered conf/examples/large-lists", &large)?;
    validate(
        "uninstall-job.yaml",
        &std::fs::read_to_string(uninstall_job())?,
    )?;
    // Each source file of built-in kinds on its own too (the PodMonitor is a CRD of the
    // Prometheus Operator: kubernetes-validate has no schema for it, checked below).
    for name in ["daemonset.yaml", "rules-configmap.yaml"] {
        validate(name, &std::fs::read_to_string(base_dir().join(name))?)?;
    }
    let podmonitor = &yaml_file(&base_dir().join("podmonitor.yaml"))?[0];
    ensure!(podmonitor["apiVersion"] == "monitoring.coreos.com/v1");
    ensure!(podmonitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics");

    // What the rendered base holds: the DaemonSet, its rules and its settings, all in
    // kube-system, each reference resolved.
    let docs = yaml(&base)?;
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    ensure!(docs.len() == 3, "rendered base: {kinds:?}");
    for doc in &docs {
        ensure!(doc["metadata"]["namespace"] == "kube-system", "{kinds:?}");
    }
    let ds = find(&docs, "DaemonSet", "egress-deny")?;
    let spec = &ds["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    ensure!(container["image"] == "egress-deny:0.1.0", "image knob");
    // Settings: every knob is there and the listen port agrees with the declared port
    // that the probes and Prometheus use.
    let env = container_env(container, &docs)?;
    for knob in [
        "EGRESS_DENY_LISTEN",
        "EGRESS_DENY_HOST_INTERFACES",
        "EGRESS_DENY_PROTECT",
        "EGRESS_DENY_EXCLUDE_NAMESPACES",
        "EGRESS_DENY_RULES_DIR",
    ] {
        ensure!(
            env.iter().any(|(k, _)| k == knob),
            "{knob} not set: {env:?}"
        );
    }
    let port = listen_port(&env)?;
    ensure!(
        container["ports"][0]["containerPort"] == port
            && container["ports"][0]["name"] == "metrics"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        ensure!(container[probe]["httpGet"]["port"] == "metrics", "{probe}");
    }
    ensure!(container["readinessProbe"]["httpGet"]["path"] == "/readyz");
    ensure!(container["livenessProbe"]["httpGet"]["path"] == "/healthz");
    // The contract of the issue.
    ensure!(spec["priorityClassName"] == "system-node-critical");
    ensure!(spec["hostNetwork"] == true);
    ensure!(spec["automountServiceAccountToken"] == false);
    ensure!(spec["tolerations"] == json!([{ "operator": "Exists" }]));
    ensure!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1);
    let security = &container["securityContext"];
    ensure!(security["privileged"] == false && security["readOnlyRootFilesystem"] == true);
    ensure!(security["capabilities"]["drop"] == json!(["ALL"]));
    let host_paths: Vec<&str> = spec["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for path in [
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/sys/fs/bpf",
        "/var/lib/cni",
        "/run/egress-deny",
        "/run/netns",
    ] {
        ensure!(host_paths.contains(&path), "hostPath {path} missing");
    }
    let rules_env = &env
        .iter()
        .find(|(k, _)| k == "EGRESS_DENY_RULES_DIR")
        .context("rules")?
        .1;
    ensure!(
        container["volumeMounts"]
            .as_array()
            .context("mounts")?
            .iter()
            .any(|m| m["name"] == "rules" && m["mountPath"] == rules_env.as_str()),
        "the rules volume is not mounted at EGRESS_DENY_RULES_DIR"
    );

    // The large-lists overlay: every generated ConfigMap is one source of the projected
    // rules volume, stays under the 1 MiB ConfigMap limit, and its .gz keys are binaryData
    // that decompress to rule lines.
    let docs = yaml(&large)?;
    let ds = find(&docs, "DaemonSet", "egress-deny")?;
    let rules = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .find(|v| v["name"] == "rules")
        .context("rules volume")?;
    let sources: Vec<&str> = rules["projected"]["sources"]
        .as_array()
        .context("sources")?
        .iter()
        .filter_map(|s| s["configMap"]["name"].as_str())
        .collect();
    let feeds: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap" && d["binaryData"].is_object())
        .collect();
    ensure!(
        feeds.len() >= 2,
        "large-lists: {} gzip ConfigMaps",
        feeds.len()
    );
    for cm in feeds {
        let name = cm["metadata"]["name"].as_str().context("name")?;
        ensure!(
            sources.contains(&name),
            "{name} is not in the projected rules volume: {sources:?}"
        );
        let files = configmap_files(cm)?;
        let size: usize = files.iter().map(|(_, b)| b.len()).sum();
        ensure!(size < 1 << 20, "{name}: {size} bytes");
        for (key, bytes) in files {
            ensure!(key.ends_with(".gz"), "{name}/{key}");
            let mut text = String::new();
            std::io::Read::read_to_string(
                &mut flate2::read::GzDecoder::new(&bytes[..]),
                &mut text,
            )?;
            ensure!(
                text.lines().any(|l| l.contains('/')),
                "{name}/{key}: {text}"
            );
        }
    }
    Ok(())
}

#[test]
fn manifests_pass_the_security_scan_with_every_skip_justified() -> Result<()> {
    // What is applied (the rendered kustomizations) plus the Job and the PodMonitor.
    // Not a hidden directory (tempfile's default ".tmp…"): checkov skips those.
    let dir = tempfile::Builder::new()
        .prefix("egress-deny-checkov-")
        .tempdir()?;
    std::fs::write(dir.path().join("base.yaml"), render(&base_dir())?)?;
    std::fs::write(
        dir.path().join("large-lists.yaml"),
        render(&large_lists_dir())?,
    )?;
    for name in ["uninstall-job.yaml", "podmonitor.yaml"] {
        std::fs::copy(base_dir().join(name), dir.path().join(name))?;
    }
    let out = Command::new(format!("{VENV}/checkov"))
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "-o",
            "json",
            "-d",
        ])
        .arg(dir.path())
        .output()?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("checkov output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let summary = &report["summary"];
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| format!("{} {} {}", c["check_id"], c["resource"], c["file_path"]))
        .collect();
    ensure!(summary["failed"] == 0, "checkov: {summary} {failed:#?}");
    ensure!(
        summary["passed"].as_u64().unwrap_or(0) > 150,
        "checkov scanned too little: {summary}"
    );
    // Every skip carries a reason, and names a check that would otherwise fail (a skip
    // of a check that passes anyway is noise).
    let skipped = report["results"]["skipped_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(!skipped.is_empty(), "checkov reported no skips");
    for entry in std::fs::read_dir(dir.path())? {
        for doc in yaml_file(&entry?.path())? {
            let annotations = doc["metadata"]["annotations"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for (key, value) in annotations
                .iter()
                .filter(|(k, _)| k.starts_with("checkov.io/skip"))
            {
                let (check, reason) = value
                    .as_str()
                    .unwrap_or_default()
                    .split_once('=')
                    .unwrap_or_default();
                ensure!(
                    check.starts_with("CKV") && reason.len() > 30,
                    "{}: {key} has no justification",
                    doc["metadata"]["name"]
                );
                ensure!(
                    skipped.iter().any(|s| s["check_id"] == check),
                    "{}: skip of {check}, which checkov does not report as skipped",
                    doc["metadata"]["name"]
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
