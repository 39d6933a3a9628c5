//! `Content-Range` values.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        iot_ota_device::http::fuzz_entry::content_range(data);
    });
}
