//! Helpers shared by the workspace's tests (not part of the pipeline's API).

use std::path::PathBuf;

/// The real COCO subset: `COCO_TINY_DIR`, else `<workspace root>/../shared/data/coco_tiny`.
/// `None` (the caller skips) when it is missing, except under `CI=true`, where a missing
/// dataset is a failure with a clear message.
pub fn coco_tiny() -> Option<PathBuf> {
    let dir = match std::env::var_os("COCO_TINY_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/coco_tiny"),
    };
    let complete = dir.join("annotations/instances_val2017.json").is_file()
        && dir.join("annotations/instances_train2017.json").is_file()
        && dir.join("train2017").is_dir()
        && dir.join("val2017").is_dir();
    if complete {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "coco_tiny dataset not found at {} (set COCO_TINY_DIR); CI must have ../shared/data/coco_tiny",
        dir.display()
    );
    eprintln!("skipped: coco_tiny not found at {}", dir.display());
    None
}
