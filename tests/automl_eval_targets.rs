//! Eval-mode targets of our pipeline against automl's `InputReader` on the same shards
//! (coco_tiny val, one shard, file order, batch 4 at 512²): classes exact, boxes ≤ 1e-5.

mod common;

use std::sync::Arc;

use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::augment::Mode;
use effdet_pipeline::coco::convert::{convert, ConvertOptions};
use effdet_pipeline::decode::CpuDecoder;
use effdet_pipeline::labeler::Labeler;
use effdet_pipeline::loader::{Loader, LoaderConfig};
use serde_json::Value;

#[test]
fn eval_targets_equal_automl_input_reader() {
    let Some(coco) = common::coco_tiny() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let summary = convert(
        &ConvertOptions {
            image_dir: coco.join("val2017"),
            object_annotations_file: Some(coco.join("annotations/instances_val2017.json")),
            caption_annotations_file: None,
            image_info_file: None,
            output_file_prefix: dir.path().join("val").to_string_lossy().into_owned(),
            num_shards: 1,
            include_masks: false,
            num_threads: 2,
        },
        &|_, _| {},
    )
    .unwrap();
    let labeler = Arc::new(Labeler::new(
        Anchors::new(&AnchorConfig::efficientdet(512, 512)).unwrap(),
    ));
    let mut cfg = LoaderConfig::new(Mode::Eval, 512, 4);
    cfg.threads = 2;
    let mut loader = Loader::start(cfg, summary.shards, labeler, Arc::new(CpuDecoder)).unwrap();
    let batch = loader.next_batch().unwrap().unwrap();
    let expected: Vec<Value> = serde_json::from_slice(
        &std::fs::read(common::fixture("automl_eval_targets_val_first4.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(expected.len(), 4);
    let bufs = batch.buffers();
    for (slot, exp) in expected.iter().enumerate() {
        assert_eq!(bufs.source_ids[slot], exp["source_id"].as_i64().unwrap());
        assert_eq!(
            bufs.image_scales[slot].to_bits() as u64,
            exp["image_scale_bits"].as_u64().unwrap()
        );
        assert_eq!(
            bufs.num_positives[slot] as i64,
            exp["num_positives"].as_i64().unwrap(),
            "slot {slot}"
        );
        let gt = bufs.gt_classes[slot * 100..(slot + 1) * 100]
            .iter()
            .filter(|&&c| c >= 0.0)
            .count();
        assert_eq!(gt as i64, exp["num_groundtruth"].as_i64().unwrap());
        // Every positive anchor of automl, exactly; every other anchor is background.
        let mut positives = 0;
        for a in exp["anchors"].as_array().unwrap() {
            let a: Vec<f64> = a
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let (l, y, x, k) = (
                a[0] as usize - 3,
                a[1] as usize,
                a[2] as usize,
                a[3] as usize,
            );
            let lv = &batch.levels[l];
            let cell = (slot * lv.height + y) * lv.width + x;
            assert_eq!(
                batch.cls_targets(l)[cell * 9 + k] as f64,
                a[4],
                "slot {slot} anchor {a:?}"
            );
            for c in 0..4 {
                let got = batch.box_targets(l)[cell * 36 + k * 4 + c] as f64;
                assert!(
                    (got - a[5 + c]).abs() <= 1e-5,
                    "slot {slot} anchor {a:?}: box {c} = {got}"
                );
            }
            positives += 1;
        }
        let ours: usize = (0..5)
            .map(|l| {
                let lv = &batch.levels[l];
                let n = lv.height * lv.width * 9;
                batch.cls_targets(l)[slot * n..(slot + 1) * n]
                    .iter()
                    .filter(|&&c| c != -1)
                    .count()
            })
            .sum();
        assert_eq!(ours, positives, "slot {slot}: positive anchor count");
    }
}
