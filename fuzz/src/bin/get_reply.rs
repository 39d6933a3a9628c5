//! The firmware get reply (message 6).
use iot_ota_core::protocol::{parse_get_reply, Limits};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = parse_get_reply(data, &Limits::default());
    });
}
