//! The protocol's messages, parsed and encoded.

use super::*;

const MD5: &str = "9e107d9d372bb6826bd81d3542a419d6";

fn cmd(data: &str) -> Vec<u8> {
    format!(r#"{{"msgId":"1","version":"1.0","data":{data}}}"#).into_bytes()
}

fn good() -> String {
    format!(
        r#"{{"policy":"standard","size":10,"firmwareVersion":"2.0","url":"http://h/f","sign":"{MD5}","signMethod":"Md5"}}"#
    )
}

fn reject(payload: &[u8]) -> Rejection {
    parse_upgrade(payload, &Limits::default()).unwrap_err().1
}

#[test]
fn identities() {
    for good in ["pk1", "a1B2c3", "dev-01_x.y", "d@v:1", "é"] {
        assert_eq!(validate_identity("device name", good), Ok(()), "{good:?}");
    }
    let long = "a".repeat(MAX_IDENTITY_LEN + 1);
    for bad in [
        "", "a/b", "a+b", "a#", "a b", "a\tb", "a\u{0}b", ".", "..", &long,
    ] {
        let e = validate_identity("product key", bad).unwrap_err();
        assert!(e.starts_with("product key"), "{bad:?}: {e}");
    }
}

#[test]
fn topics_from_prefix() {
    let t = Topics::new("pk", "dev");
    assert_eq!(t.upgrade, "/sys/pk/dev/ota/firmware/upgrade");
    assert_eq!(t.get_reply, "/sys/pk/dev/ota/firmware/get_reply");
    let t = Topics::with_prefix("/x/", "pk", "dev");
    assert_eq!(t.inform, "/x/pk/dev/ota/firmware/inform");
    assert_eq!(
        Topics::parse("/sys", "/sys/pk/dev/ota/firmware/progress"),
        Some(("pk", "dev", TopicKind::Progress))
    );
    assert_eq!(
        Topics::parse("/sys", "/sys/pk/dev/ota/other/progress"),
        None
    );
    assert_eq!(
        Topics::parse("/sys", "/sys/pk/dev/ota/firmware/progress/x"),
        None
    );
}

#[test]
fn parses_a_good_command() {
    let c = parse_upgrade(&cmd(&good()), &Limits::default()).unwrap();
    assert_eq!(c.msg_id, "1");
    assert_eq!(c.firmware.size, Some(10));
    assert_eq!(c.firmware.sign_method, SignMethod::Md5);
    assert_eq!(c.firmware.policy, Some(Policy::Standard));
}

#[test]
fn lenient_spellings() {
    let p = format!(
        r#"{{"msgId ":123,"data ":{{"size":10,"firmwareVersion":"2","url":"HTTPS://h:8443/f?x=1","sign":"{}","signMethod":"sha-256"}}}}"#,
        "A".repeat(64)
    );
    let c = parse_upgrade(p.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(c.msg_id, "123");
    assert_eq!(c.firmware.sign_method, SignMethod::Sha256);
    assert_eq!(c.firmware.sign, "a".repeat(64));
    assert_eq!(c.firmware.policy, None);
}

#[test]
fn rejects_each_bad_field() {
    let cases: Vec<(String, u16, &str)> = vec![
        (
            good().replace(r#""size":10,"#, ""),
            400,
            "missing field size",
        ),
        (good().replace("10", "-5"), 400, "negative"),
        (good().replace(":10", ":0"), 400, "zero"),
        (good().replace(":10", ":1.5"), 400, "integer"),
        (good().replace(":10", ":\"10\""), 400, "integer"),
        (good().replace("\"2.0\"", "\"\""), 400, "empty"),
        (
            good().replace("\"2.0\"", "\"a/../../x\""),
            400,
            "may only contain",
        ),
        (
            good().replace("\"2.0\"", "\"1;reboot\""),
            400,
            "may only contain",
        ),
        (good().replace("\"2.0\"", "\"..\""), 400, "may only contain"),
        (
            good().replace("\"2.0\"", "\"2.0 beta\""),
            400,
            "may only contain",
        ),
        (good().replace("http://h/f", "ftp://h/f"), 400, "ftp"),
        (good().replace("http://h/f", "http:///f"), 400, "no host"),
        (good().replace(MD5, "abc"), 400, "32-character"),
        (good().replace(MD5, &"z".repeat(32)), 400, "hex"),
        (good().replace("Md5", "crc32"), 412, "not supported"),
        (good().replace("standard", "later"), 400, "policy"),
        (
            good().replace(r#""url":"http://h/f","#, ""),
            400,
            "missing field url",
        ),
    ];
    for (data, code, needle) in cases {
        let r = reject(&cmd(&data));
        assert_eq!(r.code.code(), code, "{data}: {r}");
        assert!(r.message.contains(needle), "{data}: {r}");
    }
    assert!(reject(b"{nope").message.contains("JSON"));
    assert!(reject(b"[1]").message.contains("object"));
    assert!(reject(br#"{"msgId":"1"}"#).message.contains("data"));
    let no_id = parse_upgrade(
        format!(r#"{{"data":{}}}"#, good()).as_bytes(),
        &Limits::default(),
    );
    assert_eq!(no_id.unwrap_err().1.message, "missing field msgId");
}

#[test]
fn policy_limits_refuse() {
    let limits = Limits {
        max_size: 5,
        ..Limits::default()
    };
    let r = parse_upgrade(&cmd(&good()), &limits).unwrap_err().1;
    assert_eq!(r.code, ReplyCode::Refused);
    let limits = Limits {
        max_size: 100,
        allowed_hosts: vec!["other".into()],
        ..Limits::default()
    };
    let r = parse_upgrade(&cmd(&good()), &limits).unwrap_err().1;
    assert_eq!(r.code, ReplyCode::Refused);
    assert!(r.message.contains("host h"));
    let limits = Limits {
        max_size: 100,
        require_https: true,
        ..Limits::default()
    };
    let r = parse_upgrade(&cmd(&good()), &limits).unwrap_err().1;
    assert_eq!(r.code, ReplyCode::Refused);
    assert!(r.message.contains("requires https"), "{}", r.message);
    let https = good().replace("http://", "https://");
    assert!(parse_upgrade(&cmd(&https), &limits).is_ok());
}

#[test]
fn get_reply_success_and_404() {
    let ok = format!(
        r#"{{"msgId":"9","version":"1.0","data":{{"firmwareVersion":"2","url":"http://h/f","sign":"{MD5}","signMethod":"MD5"}}}}"#
    );
    let r = parse_get_reply(ok.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(r.msg_id, "9");
    let fw = r.result.unwrap();
    assert_eq!(fw.size, None);
    let nf = encode_get_not_found("9", "2.0.1");
    let r = parse_get_reply(&nf, &Limits::default()).unwrap();
    let e = r.result.unwrap_err();
    assert_eq!(e.code, 404);
    assert_eq!(e.message, "FirmwareVersion 2.0.1 not existed");
}

#[test]
fn round_trips() {
    let fw = parse_upgrade(&cmd(&good()), &Limits::default())
        .unwrap()
        .firmware;
    let again = parse_upgrade(&encode_upgrade("5", &fw), &Limits::default()).unwrap();
    assert_eq!(again.firmware, fw);
    let p = Progress {
        status: Status::VerifyFailed,
        progress: 100,
        desc: "md5 mismatch".into(),
        firmware_version: "2.0".into(),
    };
    assert_eq!(
        parse_progress(&encode_progress("8", &p)).unwrap(),
        ("8".into(), p)
    );
    assert_eq!(
        parse_version_message(&encode_inform("7", "2.0")).unwrap(),
        ("7".into(), "2.0".into())
    );
    let r = parse_upgrade_reply(&encode_upgrade_reply("1", ReplyCode::Busy, "busy")).unwrap();
    assert_eq!((r.code, r.message.as_str()), (409, "busy"));
}

#[test]
fn urls() {
    let u = parse_url("http://[::1]:8080/a/b?c").unwrap();
    assert_eq!(
        (u.host, u.port, u.path, u.https),
        ("::1", 8080, "/a/b?c", false)
    );
    let u = parse_url("https://example.com").unwrap();
    assert_eq!((u.host, u.port, u.path), ("example.com", 443, "/"));
    assert!(parse_url("http://h:0/").is_err());
    assert!(parse_url("http://h:99999/").is_err());
    assert!(parse_url("http://u:p@h/").is_err());
    assert!(parse_url("file:///etc/passwd").is_err());
}

#[test]
fn status_codes() {
    for s in Status::ALL {
        assert_eq!(Status::from_code(s.code().into()), Some(s));
    }
    assert!(Status::VerifyFailed.is_failure());
    assert!(Status::Success.is_terminal());
    assert!(!Status::Downloaded.is_terminal());
}

/// A command's `delta`: parsed, kept in the journal's encoding; a malformed
/// one is a 400 naming the field; one this device may not use (http where
/// https is required, an index over the limit) is dropped, and the image
/// downloads whole.
#[test]
fn a_delta_is_parsed_refused_when_malformed_and_dropped_when_not_allowed() {
    let sha = "ab".repeat(32);
    let with = |delta: &str| {
        good().replace(
            r#""signMethod":"Md5""#,
            &format!(r#""signMethod":"Md5","delta":{delta}"#),
        )
    };
    let ok = with(&format!(
        r#"{{"index":"https://h/f.idx","indexSha256":"{sha}","indexSize":360}}"#
    ));
    let c = parse_upgrade(
        &cmd(&ok.replace("http://h/f\"", "https://h/f\"")),
        &Limits::default(),
    )
    .unwrap();
    let d = c.firmware.delta.clone().expect("a delta");
    assert_eq!(
        (d.index_url.as_str(), d.index_size),
        ("https://h/f.idx", 360)
    );
    assert_eq!(encode_upgrade("1", &c.firmware), {
        let back = parse_upgrade(&encode_upgrade("1", &c.firmware), &Limits::default()).unwrap();
        encode_upgrade("1", &back.firmware)
    });
    for (bad, says) in [
        (r#""x""#.to_string(), "delta must be an object"),
        (
            format!(r#"{{"indexSha256":"{sha}","indexSize":1}}"#),
            "delta.index",
        ),
        (
            r#"{"index":"https://h/i","indexSha256":"zz","indexSize":1}"#.to_string(),
            "delta.indexSha256",
        ),
        (
            format!(r#"{{"index":"https://h/i","indexSha256":"{sha}","indexSize":0}}"#),
            "delta.indexSize",
        ),
    ] {
        let r = reject(&cmd(&with(&bad)));
        assert_eq!(r.code, ReplyCode::BadRequest, "{bad}");
        assert!(r.message.contains(says), "{} / {says}", r.message);
    }
    let https_only = Limits {
        require_https: true,
        ..Limits::default()
    };
    let http_index = with(&format!(
        r#"{{"index":"http://h/f.idx","indexSha256":"{sha}","indexSize":360}}"#
    ))
    .replace("http://h/f\"", "https://h/f\"");
    let c = parse_upgrade(&cmd(&http_index), &https_only).unwrap();
    assert!(
        c.firmware.delta.is_none(),
        "dropped: the image downloads whole"
    );
    let huge = with(&format!(
        r#"{{"index":"https://h/f.idx","indexSha256":"{sha}","indexSize":{}}}"#,
        MAX_INDEX_SIZE + 1
    ));
    assert!(parse_upgrade(&cmd(&huge), &Limits::default())
        .unwrap()
        .firmware
        .delta
        .is_none());
}
