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

/// `../shared/data/coco_tiny` (or `$COCO_TINY_DIR`). When it is missing the test is skipped,
/// except under `CI=true`, where a missing dataset is a failure.
pub fn coco_tiny() -> Option<PathBuf> {
    let dir = std::env::var_os("COCO_TINY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data/coco_tiny"));
    if dir.join("annotations/instances_val2017.json").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "coco_tiny dataset not found at {} (set COCO_TINY_DIR); CI must have ../shared/data/coco_tiny",
            dir.display()
        );
    }
    eprintln!("skipped: coco_tiny not found at {}", dir.display());
    None
}

/// Path of the `effdet` binary built for the tests.
pub fn effdet_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_effdet"))
}
