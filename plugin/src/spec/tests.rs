use super::*;

#[test]
fn replies_in_the_callers_version_when_supported_else_the_latest() {
    for version in SUPPORTED {
        assert_eq!(reply_version(Some(version)), version);
    }
    assert_eq!(reply_version(Some("9.9.9")), LATEST);
    assert_eq!(reply_version(Some("1.1")), LATEST);
    assert_eq!(reply_version(Some("")), LATEST);
    assert_eq!(reply_version(None), LATEST);
    assert_eq!(
        SUPPORTED.last(),
        Some(&LATEST),
        "LATEST is the highest supported"
    );
}

#[test]
fn versions_compare_by_number_not_by_text() {
    assert_eq!(parse("1.1.0"), (1, 1, 0));
    assert!(parse("0.10.0") > parse("0.4.0"));
    assert!(parse("1.0.0") > parse("0.4.0"));
    assert!(parse("0.3.1") < parse("0.4.0"));
    // Missing or garbage parts count as 0 rather than failing.
    assert_eq!(parse("1"), (1, 0, 0));
    assert_eq!(parse("x.y.z"), (0, 0, 0));
    assert_eq!(parse(""), (0, 0, 0));
}

#[test]
fn unsupported_versions_are_refused_for_every_command() {
    for command in [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Gc,
        Command::Status,
        Command::Version,
    ] {
        for version in ["9.9.9", "0.2.0", "1.1", "v1.1.0", ""] {
            let err = require_supported(version, command).unwrap_err();
            assert!(
                matches!(err, PluginError::IncompatibleVersion(_)),
                "{command:?} {version:?}: {err}"
            );
            assert!(err.to_string().contains("supported: 0.3.0,"), "{err}");
        }
    }
}

#[test]
fn commands_need_the_version_that_defines_them() {
    let defined = |version, command| require_supported(version, command).is_ok();
    for version in SUPPORTED {
        assert!(defined(version, Command::Add), "ADD {version}");
        assert!(defined(version, Command::Del), "DEL {version}");
    }
    assert!(!defined("0.3.1", Command::Check));
    assert!(defined("0.4.0", Command::Check));
    assert!(defined("1.1.0", Command::Check));
    for command in [Command::Gc, Command::Status] {
        assert!(!defined("1.0.0", command), "{command:?}");
        assert!(defined("1.1.0", command), "{command:?}");
    }
    let err = require_supported("1.0.0", Command::Gc).unwrap_err();
    assert_eq!(
        err.to_string(),
        "incompatible CNI version: Gc needs cniVersion 1.1.0 or later, got 1.0.0"
    );
}
