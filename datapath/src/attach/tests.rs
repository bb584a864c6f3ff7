use super::*;

#[test]
fn tcx_is_there_from_kernel_6_6() {
    for release in [
        "6.6.0",
        "6.6.0\n",
        "6.18.0-rc1",
        "6.8.0-45-generic",
        "6.12.9+bpo-amd64",
        "7.0.0",
        "10.1",
    ] {
        assert!(release_has_tcx(release), "{release:?}");
    }
    for release in [
        "5.15.0-91-generic",
        "6.5.13",
        "6.1.0-18-cloud-amd64",
        "4.18.0-513.el8.x86_64",
        "5.99",
    ] {
        assert!(!release_has_tcx(release), "{release:?}");
    }
}

#[test]
fn an_unreadable_release_counts_as_older() {
    // The netlink fallback works everywhere; TCX where it is missing would not.
    for release in [
        "", "\n", "garbage", "6", "6.", ".6.6", "v6.6.0", "6.x.0", "６.６",
    ] {
        assert!(!release_has_tcx(release), "{release:?}");
    }
}

#[test]
fn attach_modes_read_back_as_written() {
    for mode in [AttachMode::Tcx, AttachMode::Netlink] {
        assert_eq!(AttachMode::parse(mode.as_str()), Some(mode));
        let json = serde_json::to_string(&mode).unwrap();
        assert_eq!(serde_json::from_str::<AttachMode>(&json).unwrap(), mode);
    }
    assert_eq!(AttachMode::parse("cls_bpf"), Some(AttachMode::Netlink));
    assert_eq!(AttachMode::parse("TCX"), None);
    assert_eq!(AttachMode::parse(""), None);
    // A record of a newer version stays readable (handled as a pinned link).
    let unknown: AttachMode = serde_json::from_str(r#""tcx2""#).unwrap();
    assert_eq!(unknown, AttachMode::Tcx);
}
