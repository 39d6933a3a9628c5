//! The upgrade command (message 1): parsed, and through the engine.
use std::time::Instant;

use iot_ota_core::protocol::{parse_upgrade, Limits};
use iot_ota_core::{Config, Ota};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = parse_upgrade(data, &Limits::default());
        let mut ota = Ota::new(Config::new("pk", "dev"), "1.0").expect("a valid version");
        ota.handle_connected();
        ota.handle_publish("/sys/pk/dev/ota/firmware/upgrade", data, Instant::now());
        while ota.poll_output().is_some() {}
    });
}
