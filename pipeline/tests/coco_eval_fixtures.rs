//! COCO evaluation against pycocotools reference numbers: detection files on the real
//! coco_tiny val split, with the twelve stats pycocotools 2.0.11 produced for them
//! (tests/fixtures/coco_eval/README.md says how they were made).

use std::path::{Path, PathBuf};

use effdet_pipeline::coco::eval::{evaluate, evaluate_on_images, load_detections, CocoStats};
use effdet_pipeline::coco::{load_json, InstancesFile};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/coco_eval")
}

fn check(name: &str, got: CocoStats, want: &[f64]) {
    let got = got.to_array();
    assert_eq!(want.len(), 12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // Same operations in the same order as pycocotools: expect identical bits.
        assert!(
            g.to_bits() == w.to_bits(),
            "{name}: stat {i}: ours {g:?}, pycocotools {w:?}"
        );
    }
}

#[test]
fn matches_pycocotools_on_coco_tiny() {
    let Some(dir) = effdet_pipeline::test_support::coco_tiny() else {
        return;
    };
    let gt: InstancesFile = load_json(&dir.join("annotations/instances_val2017.json")).unwrap();
    let expected: serde_json::Value =
        load_json(&fixture_dir().join("expected_stats.json")).unwrap();
    let cases = expected.as_object().unwrap();
    assert!(cases.len() >= 2);
    for (name, want) in cases {
        let dets = load_detections(&fixture_dir().join(format!("detections_{name}.json"))).unwrap();
        let nums = |key: &str| -> Vec<f64> {
            want[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        check(name, evaluate(&gt, &dets).unwrap(), &nums("all_images"));
        let ids: Vec<u64> = dets.iter().map(|d| d.image_id).collect();
        check(
            &format!("{name} (detected images)"),
            evaluate_on_images(&gt, &dets, &ids).unwrap(),
            &nums("detected_images"),
        );
    }
}
