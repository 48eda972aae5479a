//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// `../shared/data/coco_tiny` (or `$COCO_TINY_DIR`); see `effdet_pipeline::test_support`.
pub fn coco_tiny() -> Option<PathBuf> {
    effdet_pipeline::test_support::coco_tiny()
}

/// Path of the `effdet` binary built for the tests.
pub fn effdet_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_effdet"))
}
