//! Property tests: what the core encodes, it parses back, for any input
//! the types allow; and its parsers never panic on any bytes.

use iot_ota_core::digest::{digest_hex, SignMethod};
use iot_ota_core::journal::{Journal, Phase};
use iot_ota_core::manifest::{base64_decode, base64_encode, Manifest, Signed};
use iot_ota_core::protocol::{
    encode_progress, encode_upgrade, parse_progress, parse_upgrade, Firmware, Limits, Policy,
    Progress, Status,
};
use proptest::prelude::*;

fn version() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,100}".prop_filter("not . or ..", |v| v != "." && v != "..")
}

fn sign_method() -> impl Strategy<Value = SignMethod> {
    prop_oneof![Just(SignMethod::Md5), Just(SignMethod::Sha256)]
}

fn firmware() -> impl Strategy<Value = Firmware> {
    (
        version(),
        "[a-z0-9.-]{1,30}",
        "(/[A-Za-z0-9._~-]{0,20}){0,4}",
        prop::option::of(1u64..=u32::MAX as u64),
        sign_method(),
        any::<[u8; 8]>(),
        prop::option::of(prop_oneof![Just(Policy::Standard), Just(Policy::Silent)]),
        any::<bool>(),
    )
        .prop_map(
            |(version, host, path, size, method, seed, policy, https)| Firmware {
                url: format!(
                    "{}://{host}{}",
                    if https { "https" } else { "http" },
                    if path.is_empty() { "/" } else { &path }
                ),
                version,
                size,
                sign: digest_hex(method, &seed),
                sign_method: method,
                policy,
                signed: None,
                delta: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn base64_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        prop_assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
    }

    #[test]
    fn base64_decode_never_panics(text in ".{0,64}") {
        let _ = base64_decode(&text);
    }

    #[test]
    fn an_upgrade_command_round_trips(fw in firmware(), id in "[0-9]{1,12}") {
        // A command always has a size (a get reply may not).
        let fw = Firmware { size: Some(fw.size.unwrap_or(1)), ..fw };
        let bytes = encode_upgrade(&id, &fw);
        // The size limit is the type's: every size the strategy makes fits.
        let limits = Limits { max_size: u64::MAX, ..Limits::default() };
        let cmd = parse_upgrade(&bytes, &limits).unwrap();
        prop_assert_eq!(cmd.msg_id, id);
        prop_assert_eq!(cmd.firmware, fw);
    }

    #[test]
    fn parse_upgrade_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_upgrade(&bytes, &Limits::default());
    }

    #[test]
    fn a_progress_report_round_trips(
        status in prop::sample::select(Status::ALL.to_vec()),
        progress in 0u32..=100,
        desc in ".{0,80}",
        v in version(),
    ) {
        let p = Progress { status, progress, desc, firmware_version: v };
        let back = parse_progress(&encode_progress("7", &p)).unwrap();
        prop_assert_eq!(back.1, p);
    }

    #[test]
    fn a_manifest_round_trips(
        product in "[A-Za-z0-9_.-]{1,40}",
        v in version(),
        size in any::<u64>(),
        sha in any::<[u8; 32]>(),
        counter in any::<u64>(),
    ) {
        let m = Manifest {
            product,
            firmware_version: v,
            size,
            sha256: iot_ota_core::digest::to_hex(&sha),
            counter,
            index_sha256: None,
        };
        prop_assert_eq!(Manifest::parse(&m.encode()).unwrap(), m);
    }

    #[test]
    fn manifest_fields_never_panic(m in ".{0,80}", sig in ".{0,80}") {
        let data = serde_json::json!({
            "manifest": m,
            "signatures": [{"keyId": "a".repeat(64), "alg": "ed25519", "sig": sig}],
        });
        let _ = Signed::from_data(data.as_object().unwrap());
    }

    #[test]
    fn a_journal_round_trips(
        fw in firmware(),
        from in version(),
        id in "[0-9a-z]{0,12}",
        phase in prop::sample::select(vec![
            Phase::Downloading, Phase::Downloaded, Phase::Installing, Phase::Installed,
            Phase::Booted, Phase::Committed, Phase::RolledBack, Phase::Failed,
        ]),
        boots in 0u32..10,
        counter in any::<u64>(),
        pending in prop::option::of(any::<u64>()),
        reason in prop::option::of(".{0,60}"),
    ) {
        let mut j = Journal::for_firmware(&from, &fw, &id);
        j.phase = phase;
        j.boot_attempts = boots;
        j.security_counter = counter;
        j.pending_counter = pending;
        j.reason = reason;
        prop_assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
    }

    #[test]
    fn journal_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Journal::decode(&bytes);
    }
}
