//! The README's Rust snippet is the crate's doc example (which rustdoc
//! compiles), line for line: it cannot drift into code that does not build.

#[test]
fn the_readme_snippet_is_the_compiled_crate_example() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lib = std::fs::read_to_string(root.join("crates/iot-ota-device/src/lib.rs")).unwrap();
    let start = readme.find("```rust,no_run\n").expect("a Rust snippet") + 15;
    let end = start + readme[start..].find("```").unwrap();
    let snippet: Vec<&str> = readme[start..end].lines().collect();
    let docs: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l).to_owned())
        .collect();
    let at = docs
        .windows(snippet.len())
        .position(|w| w.iter().zip(&snippet).all(|(a, b)| a == b));
    assert!(
        at.is_some(),
        "README.md's Rust snippet is not the crate example in src/lib.rs:\n{}",
        snippet.join("\n")
    );
}
