use super::*;

fn conf(json: &str) -> Result<NetConf, String> {
    serde_json::from_str(json).map_err(|e| e.to_string())
}

#[test]
fn a_minimal_configuration_gets_the_defaults() {
    let conf = conf(r#"{"cniVersion":"1.1.0"}"#).unwrap();
    assert_eq!(conf.name, "");
    assert_eq!(conf.failure_policy, FailurePolicy::Fail);
    assert!(conf.exclude_namespaces.is_empty());
    assert_eq!(conf.pin_dir, PathBuf::from("/sys/fs/bpf/egress-deny"));
    assert_eq!(conf.state_dir, PathBuf::from("/run/egress-deny"));
    assert_eq!(conf.attach_mode, AttachModeSetting::Auto);
    assert_eq!(
        (conf.log.level.as_str(), conf.log.target.as_str()),
        ("info", "syslog")
    );
    assert!(conf.valid_attachments.is_none());
}

#[test]
fn a_full_configuration_is_read_and_unknown_keys_ignored() {
    let conf = conf(
        r#"{
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "egress-deny",
            "failurePolicy": "ignore",
            "excludeNamespaces": ["kube-system", "monitoring"],
            "pinDir": "/tmp/pins",
            "stateDir": "/tmp/state",
            "attachMode": "netlink",
            "log": { "level": "debug" },
            "cni.dev/valid-attachments": [{ "containerID": "c1", "ifname": "eth0" }],
            "prevResult": { "interfaces": [] },
            "somethingNew": { "nested": true }
        }"#,
    )
    .unwrap();
    assert_eq!(conf.cni_version, "1.0.0");
    assert_eq!(conf.failure_policy, FailurePolicy::Ignore);
    assert_eq!(conf.attach_mode, AttachModeSetting::Netlink);
    assert_eq!(conf.pin_layout(), paths::PinLayout::new("/tmp/pins"));
    assert_eq!(conf.state_layout(), paths::StateLayout::new("/tmp/state"));
    // A partial log section keeps the default for what it leaves out.
    assert_eq!(
        (conf.log.level.as_str(), conf.log.target.as_str()),
        ("debug", "syslog")
    );
    let valid = conf.valid_attachments.as_deref().unwrap();
    assert_eq!(
        (valid[0].container_id.as_str(), valid[0].ifname.as_str()),
        ("c1", "eth0")
    );
    assert_eq!(
        conf.attachment_id("c1", "eth0"),
        paths::AttachmentId::new("k8s-pod-network", "c1", "eth0")
    );
}

#[test]
fn missing_or_mistyped_fields_are_named_in_the_error() {
    for (json, expected) in [
        (r#"{"name":"net"}"#, "missing field `cniVersion`"),
        (r#"{"cniVersion":1.1}"#, "invalid type"),
        (
            r#"{"cniVersion":"1.1.0","failurePolicy":"Fail"}"#,
            "unknown variant `Fail`, expected `fail` or `ignore`",
        ),
        (
            r#"{"cniVersion":"1.1.0","attachMode":"tc"}"#,
            "unknown variant `tc`",
        ),
        (
            r#"{"cniVersion":"1.1.0","excludeNamespaces":"kube-system"}"#,
            "expected a sequence",
        ),
        (
            r#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#,
            "missing field `containerID`",
        ),
    ] {
        let err = conf(json).unwrap_err();
        assert!(err.contains(expected), "{json}: {err}");
    }
}

#[test]
fn only_listed_namespaces_are_excluded() {
    let conf = conf(r#"{"cniVersion":"1.1.0","excludeNamespaces":["kube-system"]}"#).unwrap();
    assert!(conf.is_excluded(Some("kube-system")));
    assert!(!conf.is_excluded(Some("kube")));
    assert!(!conf.is_excluded(Some("")));
    // Without K8S_POD_NAMESPACE the pod is filtered.
    assert!(!conf.is_excluded(None));
}

#[test]
fn the_forced_attach_mode_wins_over_the_conflist() {
    let tcx = conf(r#"{"cniVersion":"1.1.0","attachMode":"tcx"}"#).unwrap();
    let netlink = conf(r#"{"cniVersion":"1.1.0","attachMode":"netlink"}"#).unwrap();
    assert_eq!(tcx.attach_mode_given(None), AttachMode::Tcx);
    assert_eq!(netlink.attach_mode_given(None), AttachMode::Netlink);
    assert_eq!(
        tcx.attach_mode_given(Some(AttachMode::Netlink)),
        AttachMode::Netlink
    );
    assert_eq!(
        netlink.attach_mode_given(Some(AttachMode::Tcx)),
        AttachMode::Tcx
    );
    // Auto: whatever this kernel has (TCX from 6.6).
    let auto = conf(r#"{"cniVersion":"1.1.0"}"#).unwrap();
    assert_eq!(auto.attach_mode_given(None), AttachMode::best_available());
}
