//! Every coco_tiny annotation rasterized by `coco::mask` must equal the mask pycocotools +
//! automl's union rule produce. The fixture holds, per split and annotation id, the number of
//! ones and the first 16 hex digits of the SHA-256 of the row-major 0/1 bytes; it was produced
//! with pycocotools 2.0.11 (`frPyObjects` + `decode`, `np.amax(axis=2)` for polygon lists).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use effdet_pipeline::coco::{load_json, mask, InstancesFile};
use sha2::{Digest, Sha256};

type Fixture = BTreeMap<String, BTreeMap<String, (u64, String)>>;

#[test]
fn coco_tiny_masks_match_pycocotools() {
    let Some(dir) = effdet_pipeline::test_support::coco_tiny() else {
        return;
    };
    let fixture_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coco_tiny_mask_counts.json");
    let fixture: Fixture = load_json(&fixture_path).unwrap();
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for split in ["train2017", "val2017"] {
        let expected = &fixture[split];
        let file: InstancesFile =
            load_json(&dir.join(format!("annotations/instances_{split}.json"))).unwrap();
        let sizes: HashMap<u64, (u32, u32)> = file
            .images
            .iter()
            .map(|im| (im.id, (im.height, im.width)))
            .collect();
        assert_eq!(
            file.annotations.len(),
            expected.len(),
            "{split}: annotation count"
        );
        for ann in &file.annotations {
            let (h, w) = sizes[&ann.image_id];
            let seg = ann.segmentation.as_ref().expect("segmentation");
            let m = mask::rasterize(seg, h, w)
                .unwrap_or_else(|e| panic!("{split} annotation {}: {e:#}", ann.id));
            let ones = m.iter().map(|&v| v as u64).sum::<u64>();
            let hash = hex::encode(&Sha256::digest(&m)[..8]);
            let (want_ones, want_hash) = &expected[&ann.id.to_string()];
            if ones != *want_ones || &hash != want_hash {
                mismatches.push(format!(
                    "{split} annotation {}: {ones} ones (expected {want_ones}), hash {hash} (expected {want_hash})",
                    ann.id
                ));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 1520);
    assert!(
        mismatches.is_empty(),
        "{} of {checked} masks differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
