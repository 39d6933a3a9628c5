//! The HTTP response head, and the body plan made from it.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        iot_ota_device::http::fuzz_entry::response_head(data);
    });
}
