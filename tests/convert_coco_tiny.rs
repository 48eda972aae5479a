//! `create_coco_tfrecord` on the real COCO subset: our shards must hold, example for example
//! and feature for feature, what google/automl's converter wrote for the same input
//! (digests in tests/fixtures/automl_coco_tiny_*.json), and agree with the COCO JSON.

mod common;

use std::collections::HashMap;
use std::path::Path;

use effdet_pipeline::coco::convert::{convert, ConvertOptions};
use effdet_pipeline::coco::{load_json, InstancesFile};
use effdet_pipeline::example::{Example, Kind};
use effdet_pipeline::tfrecord::RecordReader;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn run_converter(coco: &Path, split: &str, out: &Path, masks: bool) -> Vec<Vec<Example>> {
    let summary = convert(
        &ConvertOptions {
            image_dir: coco.join(format!("{split}2017")),
            object_annotations_file: Some(
                coco.join(format!("annotations/instances_{split}2017.json")),
            ),
            caption_annotations_file: None,
            image_info_file: None,
            output_file_prefix: out.join(split).to_string_lossy().into_owned(),
            num_shards: 4,
            include_masks: masks,
            num_threads: 2,
        },
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(summary.annotations_skipped, 0);
    summary
        .shards
        .iter()
        .map(|p| {
            assert!(p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .ends_with("-of-00004.tfrecord"));
            RecordReader::open(p)
                .unwrap()
                .map(|r| Example::decode_bytes(r.unwrap().payload).unwrap())
                .collect()
        })
        .collect()
}

fn decode_mask(png_bytes: &[u8]) -> Value {
    let img = image::load_from_memory(png_bytes).unwrap();
    assert_eq!(
        img.color(),
        image::ColorType::L8,
        "mask PNG must be 8-bit grayscale"
    );
    let raw = img.into_luma8();
    let (w, h) = raw.dimensions();
    let pixels = raw.into_raw();
    serde_json::json!({
        "height": h, "width": w,
        "ones": pixels.iter().filter(|&&v| v != 0).count(),
        "sha256": hex::encode(Sha256::digest(&pixels)),
    })
}

/// Compares our examples with automl's digest; `masks` says whether masks are compared.
fn compare(split: &str, masks: bool) {
    let Some(coco) = common::coco_tiny() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ours = run_converter(&coco, split, dir.path(), masks);
    let digest: Value = serde_json::from_slice(
        &std::fs::read(common::fixture(&format!("automl_coco_tiny_{split}.json"))).unwrap(),
    )
    .unwrap();
    let shards = digest["shards"].as_array().unwrap();
    assert_eq!(ours.len(), shards.len());
    for (s, (our_shard, their_shard)) in ours.iter().zip(shards).enumerate() {
        let their_shard = their_shard.as_array().unwrap();
        assert_eq!(our_shard.len(), their_shard.len(), "shard {s}");
        for (i, (ex, theirs)) in our_shard.iter().zip(their_shard).enumerate() {
            let theirs = theirs.as_object().unwrap();
            let mut their_keys: Vec<&String> =
                theirs.keys().filter(|k| !k.ends_with("#bits")).collect();
            if !masks {
                their_keys.retain(|k| *k != "image/object/mask");
            }
            let our_keys: Vec<&String> = ex.features().keys().collect();
            their_keys.sort();
            assert_eq!(our_keys, their_keys, "shard {s} example {i}: feature keys");
            for key in their_keys {
                let want = &theirs[key];
                let at = format!("shard {s} example {i} {key}");
                match &ex.get(key).unwrap().kind {
                    Some(Kind::FloatList(l)) => {
                        let bits: Vec<u64> = l.value.iter().map(|f| f.to_bits() as u64).collect();
                        let want_bits: Vec<u64> = theirs[&format!("{key}#bits")]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_u64().unwrap())
                            .collect();
                        assert_eq!(bits, want_bits, "{at}");
                    }
                    Some(Kind::Int64List(l)) => {
                        let want: Vec<i64> = want
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_i64().unwrap())
                            .collect();
                        assert_eq!(l.value, want, "{at}");
                    }
                    Some(Kind::BytesList(l)) if key == "image/encoded" => {
                        assert_eq!(l.value.len(), 1, "{at}");
                        let got = serde_json::json!({"len": l.value[0].len(), "sha256": hex::encode(Sha256::digest(&l.value[0]))});
                        assert_eq!(&got, want, "{at}");
                    }
                    Some(Kind::BytesList(l)) if key == "image/object/mask" => {
                        let got: Vec<Value> = l.value.iter().map(|b| decode_mask(b)).collect();
                        assert_eq!(&Value::Array(got), want, "{at}");
                    }
                    Some(Kind::BytesList(l)) => {
                        let got: Vec<Value> = l
                            .value
                            .iter()
                            .map(|b| Value::String(String::from_utf8(b.to_vec()).unwrap()))
                            .collect();
                        assert_eq!(&Value::Array(got), want, "{at}");
                    }
                    None => panic!("{at}: empty feature"),
                }
            }
        }
    }
}

/// Reading our shards back gives the COCO JSON's content for every image.
fn compare_with_json(split: &str) {
    let Some(coco) = common::coco_tiny() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shards = run_converter(&coco, split, dir.path(), false);
    let gt: InstancesFile =
        load_json(&coco.join(format!("annotations/instances_{split}2017.json"))).unwrap();
    let by_id: HashMap<String, Example> = shards
        .into_iter()
        .flatten()
        .map(|ex| {
            (
                String::from_utf8(ex.bytes_first("image/source_id").unwrap().to_vec()).unwrap(),
                ex,
            )
        })
        .collect();
    assert_eq!(by_id.len(), gt.images.len());
    for (n, image) in gt.images.iter().enumerate() {
        let ex = &by_id[&image.id.to_string()];
        let file = std::fs::read(coco.join(format!("{split}2017")).join(&image.file_name)).unwrap();
        assert_eq!(&ex.bytes_first("image/encoded").unwrap()[..], &file[..]);
        assert_eq!(
            std::str::from_utf8(ex.bytes_first("image/key/sha256").unwrap()).unwrap(),
            hex::encode(Sha256::digest(&file))
        );
        assert_eq!(ex.int64_first("image/height").unwrap(), image.height as i64);
        assert_eq!(ex.int64_first("image/width").unwrap(), image.width as i64);
        let anns: Vec<_> = gt
            .annotations
            .iter()
            .filter(|a| a.image_id == image.id)
            .collect();
        let xmin = ex.float_list_or_empty("image/object/bbox/xmin").unwrap();
        let ymax = ex.float_list_or_empty("image/object/bbox/ymax").unwrap();
        let labels = ex.int64_list_or_empty("image/object/class/label").unwrap();
        let crowd = ex.int64_list_or_empty("image/object/is_crowd").unwrap();
        let area = ex.float_list_or_empty("image/object/area").unwrap();
        assert_eq!(labels.len(), anns.len(), "image #{n}");
        for (k, a) in anns.iter().enumerate() {
            let [x, y, _, h] = a.bbox;
            assert!((xmin[k] as f64 - x / image.width as f64).abs() < 1e-6);
            assert!((ymax[k] as f64 - (y + h) / image.height as f64).abs() < 1e-6);
            assert_eq!(labels[k], a.category_id);
            assert_eq!(crowd[k], a.iscrowd);
            assert!((area[k] as f64 - a.area).abs() <= a.area * 1e-6);
        }
    }
}

#[test]
fn train_features_match_automl() {
    compare("train", false);
}

#[test]
fn val_features_match_automl() {
    compare("val", false);
}

#[test]
fn train_masks_match_automl() {
    compare("train", true);
}

#[test]
fn val_masks_match_automl() {
    compare("val", true);
}

#[test]
fn train_shards_read_back_as_the_json() {
    compare_with_json("train");
}

#[test]
fn val_shards_read_back_as_the_json() {
    compare_with_json("val");
}
