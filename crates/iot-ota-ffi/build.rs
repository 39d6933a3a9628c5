//! Gives `libiot_ota.so` its SONAME, so that programs linked against it
//! record `libiot_ota.so.0` (the ABI's major version) and `make install`
//! can install it as a versioned library with its links.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libiot_ota.so.0");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
