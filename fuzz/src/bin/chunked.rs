//! Chunked transfer framing.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        iot_ota_device::http::fuzz_entry::chunked(data);
    });
}
