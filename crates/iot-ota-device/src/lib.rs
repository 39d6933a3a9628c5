//! placeholder crate root, being written
