//! The upgrade journal: decoded, and the start-up decision made from it.
use iot_ota_core::journal::{decide_at_start, Health, Journal};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(j) = Journal::decode(data) {
            for running in ["1.0", "2.0", &j.target_version, &j.from_version] {
                for health in [Health::Unknown, Health::Good, Health::Bad("x".into())] {
                    let _ = decide_at_start(Some(&j), running, &health);
                }
            }
        }
    });
}
