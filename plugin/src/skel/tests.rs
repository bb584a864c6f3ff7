use std::io;

use super::*;

const CONF: &str = r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"egress-deny"}"#;

fn add_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "3f1c0e2a9b_pod-1.x"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
        ),
    ]
}

/// Parses with `env` as the whole environment; also returns the recorded cniVersion.
fn parse(env: &[(&str, &str)], stdin: &str) -> (Result<Invocation, PluginError>, Option<String>) {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut requested_version = None;
    let invocation = Invocation::parse(
        |name| env.get(name).cloned(),
        stdin.as_bytes(),
        &mut requested_version,
    );
    (invocation, requested_version)
}

fn with<'a>(env: &[(&'a str, &'a str)], name: &'a str, value: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut env: Vec<_> = env.iter().filter(|(k, _)| *k != name).copied().collect();
    env.push((name, value));
    env
}

fn without<'a>(env: &[(&'a str, &'a str)], name: &str) -> Vec<(&'a str, &'a str)> {
    env.iter().filter(|(k, _)| *k != name).copied().collect()
}

fn env_error(env: &[(&str, &str)], stdin: &str) -> String {
    match parse(env, stdin).0 {
        Err(err @ PluginError::InvalidEnvironment(_)) => err.to_string(),
        Err(other) => panic!("expected an environment error, got {other:?}"),
        Ok(_) => panic!("expected an environment error, got an invocation"),
    }
}

#[test]
fn add_takes_its_parameters_from_the_environment_and_config_from_stdin() {
    let (invocation, requested_version) = parse(&add_env(), CONF);
    let inv = invocation.unwrap();
    assert_eq!(inv.command, Command::Add);
    assert_eq!(inv.container_id, "3f1c0e2a9b_pod-1.x");
    assert_eq!(inv.ifname, "eth0");
    assert_eq!(inv.netns, Some(PathBuf::from("/var/run/netns/cni-1234")));
    assert_eq!(inv.pod_namespace(), Some("shop"));
    assert_eq!(inv.pod_name(), Some("web-0"));
    assert_eq!(inv.config().name, "k8s-pod-network");
    assert_eq!(inv.raw["type"], "egress-deny");
    assert_eq!(requested_version.as_deref(), Some("1.1.0"));
}

#[test]
fn every_cni_command_name_is_known_and_nothing_else() {
    for (name, command) in [
        ("ADD", Command::Add),
        ("DEL", Command::Del),
        ("CHECK", Command::Check),
        ("GC", Command::Gc),
        ("STATUS", Command::Status),
        ("VERSION", Command::Version),
    ] {
        let env = with(&add_env(), "CNI_COMMAND", name);
        assert_eq!(parse(&env, CONF).0.unwrap().command, command, "{name}");
    }
    for name in ["add", "Add", "ADD ", "UPDATE"] {
        let env = with(&add_env(), "CNI_COMMAND", name);
        assert!(
            env_error(&env, CONF).contains("unknown CNI_COMMAND"),
            "{name:?}"
        );
    }
    let missing = env_error(&without(&add_env(), "CNI_COMMAND"), CONF);
    assert!(missing.contains("CNI_COMMAND is not set"), "{missing}");
}

/// A stdin that must not be read: a runtime (or a person) may leave it open.
struct UnreadStdin;

impl io::Read for UnreadStdin {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        panic!("stdin was read before CNI_COMMAND was checked")
    }
}

#[test]
fn an_invalid_command_fails_before_stdin_is_read() {
    for env in [vec![], vec![("CNI_COMMAND", "NOPE")]] {
        let env: HashMap<&str, &str> = env.into_iter().collect();
        let mut requested_version = None;
        let result = Invocation::parse(
            |name| env.get(name).map(|v| v.to_string()),
            UnreadStdin,
            &mut requested_version,
        );
        assert!(matches!(result, Err(PluginError::InvalidEnvironment(_))));
        assert_eq!(requested_version, None);
    }
}

#[test]
fn per_attachment_commands_need_their_variables() {
    for command in ["ADD", "DEL", "CHECK"] {
        let env = with(&add_env(), "CNI_COMMAND", command);
        for name in ["CNI_CONTAINERID", "CNI_IFNAME"] {
            let err = env_error(&without(&env, name), CONF);
            assert_eq!(err, format!("invalid environment: {name} is not set"));
            // Set but empty is the same as unset.
            let err = env_error(&with(&env, name, ""), CONF);
            assert_eq!(err, format!("invalid environment: {name} is not set"));
        }
    }
    for command in ["ADD", "CHECK"] {
        let env = without(&with(&add_env(), "CNI_COMMAND", command), "CNI_NETNS");
        assert!(env_error(&env, CONF).contains("CNI_NETNS is not set"));
    }
    // DEL comes after the namespace may be gone.
    let del = without(&with(&add_env(), "CNI_COMMAND", "DEL"), "CNI_NETNS");
    assert_eq!(parse(&del, CONF).0.unwrap().netns, None);
}

#[test]
fn network_wide_commands_need_no_attachment_variables() {
    for command in ["GC", "STATUS", "VERSION"] {
        let env = [("CNI_COMMAND", command)];
        let inv = parse(&env, CONF).0.unwrap();
        assert_eq!((inv.container_id.as_str(), inv.ifname.as_str()), ("", ""));
        assert_eq!(inv.netns, None);
        assert!(inv.args.is_empty());
    }
}

/// ADD with `variable` set to each of `accepted` parses; to each of `refused`, fails
/// naming the variable.
fn assert_validated(variable: &str, accepted: &[&str], refused: &[&str]) {
    for value in accepted {
        let env = with(&add_env(), variable, value);
        assert!(parse(&env, CONF).0.is_ok(), "{variable}={value:?}");
    }
    for value in refused {
        let env = with(&add_env(), variable, value);
        let err = env_error(&env, CONF);
        assert!(
            err.contains(&format!("invalid {variable}")),
            "{value:?}: {err}"
        );
    }
}

#[test]
fn container_ids_that_would_escape_a_file_name_are_refused() {
    let (longest, too_long) = ("a".repeat(128), "a".repeat(129));
    assert_validated(
        "CNI_CONTAINERID",
        &["abc", "A-b_c.1", &longest],
        &["a/b", "../etc", "a b", "a+b", "a%2F", "é", &too_long],
    );
}

#[test]
fn interface_names_the_kernel_would_refuse_are_refused() {
    assert_validated(
        "CNI_IFNAME",
        &["eth0", "net1.100", "fifteen-chars-x"],
        &[
            ".",
            "..",
            "eth/0",
            "eth:0",
            "eth 0",
            "eth\t0",
            "sixteen-chars-xx",
        ],
    );
}

#[test]
fn cni_args_are_split_on_semicolons_and_the_first_equals_sign() {
    let args = parse_args(" K8S_POD_NAMESPACE = shop ;K8S_POD_NAME=web-0;X=a=b");
    assert_eq!(
        args.get("K8S_POD_NAMESPACE").map(String::as_str),
        Some("shop")
    );
    assert_eq!(args.get("K8S_POD_NAME").map(String::as_str), Some("web-0"));
    assert_eq!(args.get("X").map(String::as_str), Some("a=b"));
    assert_eq!(args.len(), 3);
}

#[test]
fn malformed_cni_args_pairs_are_skipped() {
    let args = parse_args("garbage;;K8S_POD_NAME=web-0;=orphan;K8S_POD_NAMESPACE=;");
    assert_eq!(args.get("K8S_POD_NAME").map(String::as_str), Some("web-0"));
    assert_eq!(args.get("K8S_POD_NAMESPACE").map(String::as_str), Some(""));
    assert!(!args.contains_key("garbage"));
    assert!(parse_args("").is_empty());
    assert!(parse_args(";;;").is_empty());
    // The last of a repeated key wins.
    assert_eq!(parse_args("K=1;K=2")["K"], "2");
}

#[test]
fn stdin_that_is_not_json_is_a_decode_error() {
    for stdin in ["", "   \n", "{", "not json", r#"{"cniVersion":"1.1.0""#] {
        let (result, requested_version) = parse(&add_env(), stdin);
        assert!(
            matches!(result, Err(PluginError::Decode(_))),
            "{stdin:?}: {:?}",
            result.err()
        );
        assert_eq!(requested_version, None, "{stdin:?}");
    }
}

#[test]
fn version_needs_no_configuration() {
    for stdin in ["", " \n\t"] {
        let inv = parse(&[("CNI_COMMAND", "VERSION")], stdin).0.unwrap();
        assert!(inv.config.is_none());
        assert_eq!(inv.raw, serde_json::json!({}));
    }
    // VERSION reads no configuration fields: any JSON will do.
    let inv = parse(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"9.9.9"}"#)
        .0
        .unwrap();
    assert!(inv.config.is_none());
    assert!(parse(&[("CNI_COMMAND", "VERSION")], "nope").0.is_err());
}

#[test]
fn configuration_errors_are_invalid_config() {
    for stdin in [
        r#"{"name":"net"}"#,
        r#"{"cniVersion":110}"#,
        r#"{"cniVersion":"1.1.0","failurePolicy":"sometimes"}"#,
        r#"[]"#,
    ] {
        let result = parse(&add_env(), stdin).0;
        assert!(
            matches!(result, Err(PluginError::InvalidConfig(_))),
            "{stdin}: {:?}",
            result.err()
        );
    }
}

#[test]
fn the_requested_version_is_kept_when_the_invocation_fails_later() {
    // Error results answer in it, so it is recorded before anything else can fail.
    let conf = r#"{"cniVersion":"0.4.0","name":"net"}"#;
    let (result, requested_version) = parse(&without(&add_env(), "CNI_IFNAME"), conf);
    assert!(result.is_err());
    assert_eq!(requested_version.as_deref(), Some("0.4.0"));

    let (result, requested_version) = parse(&add_env(), r#"{"cniVersion":"9.9.9"}"#);
    assert!(matches!(result, Err(PluginError::IncompatibleVersion(_))));
    assert_eq!(requested_version.as_deref(), Some("9.9.9"));

    let (result, requested_version) = parse(
        &with(&add_env(), "CNI_COMMAND", "GC"),
        &CONF.replace("1.1.0", "1.0.0"),
    );
    assert!(matches!(result, Err(PluginError::IncompatibleVersion(_))));
    assert_eq!(requested_version.as_deref(), Some("1.0.0"));

    // Not a string: no version to answer in.
    assert_eq!(parse(&add_env(), r#"{"cniVersion":1}"#).1, None);
}

#[test]
fn prev_result_is_passed_on_verbatim_in_the_requests_version() {
    let conf = r#"{"cniVersion":"1.0.0","name":"net",
        "prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"cali1"}],"x":[1,2]}}"#;
    let inv = parse(&add_env(), conf).0.unwrap();
    assert_eq!(
        inv.prev_result(),
        Some(serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{ "name": "cali1" }],
            "x": [1, 2],
        }))
    );
    for prev in ["null", "[]", r#""text""#] {
        let conf = format!(r#"{{"cniVersion":"1.1.0","prevResult":{prev}}}"#);
        let inv = parse(&add_env(), &conf).0.unwrap();
        assert_eq!(inv.prev_result(), None, "{prev}");
    }
    assert_eq!(parse(&add_env(), CONF).0.unwrap().prev_result(), None);
}
