//! Loader behaviour end to end on synthetic shards: determinism across thread counts,
//! skipping of corrupt images, eval order and short last batch, target layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::augment::Mode;
use effdet_pipeline::coco::convert::{convert, ConvertOptions};
use effdet_pipeline::coco::synth::{generate, SynthOptions};
use effdet_pipeline::decode::CpuDecoder;
use effdet_pipeline::example::{Example, Feature};
use effdet_pipeline::labeler::Labeler;
use effdet_pipeline::loader::{Batch, ImageDtype, Loader, LoaderConfig};
use effdet_pipeline::tfrecord::AtomicRecordWriter;
use prost::Message;

fn labeler(size: usize) -> Arc<Labeler> {
    Arc::new(Labeler::new(
        Anchors::new(&AnchorConfig::efficientdet(size, size)).unwrap(),
    ))
}

fn make_shards(dir: &Path, images: usize, shards: usize) -> Vec<PathBuf> {
    let synth = generate(
        &dir.join("coco"),
        &SynthOptions {
            images,
            seed: 11,
            min_side: 64,
            max_side: 160,
            ..Default::default()
        },
    )
    .unwrap();
    let summary = convert(
        &ConvertOptions {
            image_dir: synth.image_dir,
            object_annotations_file: Some(synth.annotations),
            caption_annotations_file: None,
            image_info_file: None,
            output_file_prefix: dir.join("shards/train").to_string_lossy().into_owned(),
            num_shards: shards,
            include_masks: false,
            num_threads: 2,
        },
        &|_, _| {},
    )
    .unwrap();
    summary.shards
}

fn config(mode: Mode, threads: usize) -> LoaderConfig {
    let mut cfg = LoaderConfig::new(mode, 128, 4);
    cfg.threads = threads;
    cfg.seed = 5;
    cfg
}

/// A digest of everything in a batch.
fn digest(b: &Batch) -> String {
    let bufs = b.buffers();
    let img: f64 = bufs
        .images
        .to_f32()
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f64 * (i % 97) as f64)
        .sum();
    format!(
        "{}:{}:{:?}:{:?}:{:?}:{:?}:{:.6}:{:?}",
        b.epoch,
        b.first_sequence,
        bufs.source_ids,
        bufs.num_positives,
        bufs.cls_targets,
        bufs.image_scales,
        img,
        bufs.gt_boxes
            .iter()
            .map(|v| (v * 100.0).round() as i64)
            .collect::<Vec<_>>()
    )
}

fn run(files: &[PathBuf], cfg: LoaderConfig, batches: usize) -> Vec<String> {
    let loader = Loader::start(cfg, files.to_vec(), labeler(128), Arc::new(CpuDecoder)).unwrap();
    loader.take(batches).map(|b| digest(&b.unwrap())).collect()
}

#[test]
fn train_batches_are_identical_for_1_2_and_4_threads() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_shards(dir.path(), 18, 3);
    // 18 images, batch 4: 10 batches span three epochs.
    let one = run(&files, config(Mode::Train, 1), 10);
    assert_eq!(one.len(), 10);
    assert_eq!(run(&files, config(Mode::Train, 2), 10), one);
    assert_eq!(run(&files, config(Mode::Train, 4), 10), one);
    let mut other_seed = config(Mode::Train, 2);
    other_seed.seed = 6;
    assert_ne!(run(&files, other_seed, 10), one);
    // f16 images carry the same targets.
    let mut f16 = config(Mode::Train, 2);
    f16.image_dtype = ImageDtype::F16;
    let loader = Loader::start(f16, files.clone(), labeler(128), Arc::new(CpuDecoder)).unwrap();
    let b = loader.take(1).next().unwrap().unwrap();
    assert!(one[0].contains(&format!("{:?}", b.buffers().cls_targets)));
}

#[test]
fn eval_reads_in_file_order_with_a_short_last_batch() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_shards(dir.path(), 10, 1);
    let cfg = config(Mode::Eval, 2);
    let loader = Loader::start(cfg, files, labeler(128), Arc::new(CpuDecoder)).unwrap();
    let batches: Vec<Batch> = loader.map(|b| b.unwrap()).collect();
    assert_eq!(
        batches.iter().map(|b| b.len).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    let ids: Vec<i64> = batches
        .iter()
        .flat_map(|b| b.buffers().source_ids[..b.len].to_vec())
        .collect();
    let expected: Vec<i64> = (1..=10).map(|i| 11_000_000 + i).collect();
    assert_eq!(ids, expected);
    // Padding slots of the short batch are empty.
    let last = &batches[2];
    assert_eq!(last.buffers().source_ids[2..], [-1, -1]);
    assert!(last.cls_targets(0)[2 * 2304..].iter().all(|&c| c == -1));
    assert!(last.box_targets(4)[2 * 36..].iter().all(|&c| c == 0.0));
}

#[test]
fn targets_are_level_major_then_batch() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_shards(dir.path(), 8, 2);
    let loader = Loader::start(
        config(Mode::Eval, 2),
        files,
        labeler(128),
        Arc::new(CpuDecoder),
    )
    .unwrap();
    for b in loader {
        let b = b.unwrap();
        // 128²: levels 3–7 are 16², 8², 4², 2², 1² cells of 9 anchors.
        assert_eq!(b.num_anchors(), 9 * (256 + 64 + 16 + 4 + 1));
        let cells = [256, 64, 16, 4, 1];
        for (l, &c) in cells.iter().enumerate() {
            assert_eq!(b.cls_targets(l).len(), 4 * c * 9);
            assert_eq!(b.box_targets(l).len(), 4 * c * 36);
        }
        for slot in 0..b.len {
            let gt = &b.buffers().gt_classes[slot * 100..(slot + 1) * 100];
            let classes: Vec<i32> = gt
                .iter()
                .filter(|&&c| c >= 0.0)
                .map(|&c| c as i32 - 1)
                .collect();
            let mut positives = 0;
            for (l, &c) in cells.iter().enumerate() {
                let cls = &b.cls_targets(l)[slot * c * 9..(slot + 1) * c * 9];
                let boxes = &b.box_targets(l)[slot * c * 36..(slot + 1) * c * 36];
                for (k, &t) in cls.iter().enumerate() {
                    if t >= 0 {
                        positives += 1;
                        assert!(
                            classes.contains(&t),
                            "class target {t} not among {classes:?}"
                        );
                    } else {
                        assert_eq!(boxes[k * 4..k * 4 + 4], [0.0; 4]);
                    }
                }
            }
            assert_eq!(positives as f32, b.buffers().num_positives[slot]);
            // Every ground-truth box gets at least one anchor (force match).
            assert!(positives >= classes.len());
        }
    }
}

#[test]
fn corrupt_jpeg_in_a_shard_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_shards(dir.path(), 6, 1);
    // Append a record whose image bytes are not a JPEG, then a good record again.
    let bad = dir.path().join("bad.tfrecord");
    let mut w = AtomicRecordWriter::create(&bad).unwrap();
    let mut f = BTreeMap::new();
    f.insert(
        "image/encoded".to_string(),
        Feature::bytes([Bytes::from_static(b"\xff\xd8garbage")]),
    );
    f.insert(
        "image/source_id".to_string(),
        Feature::bytes([Bytes::from_static(b"999")]),
    );
    w.write(&Example::from_features(f).encode_to_vec()).unwrap();
    for rec in effdet_pipeline::tfrecord::RecordReader::open(&files[0]).unwrap() {
        w.write(&rec.unwrap().payload).unwrap();
    }
    w.finish().unwrap();
    let loader = Loader::start(
        config(Mode::Eval, 2),
        vec![bad],
        labeler(128),
        Arc::new(CpuDecoder),
    )
    .unwrap();
    let stats = loader.stats.clone();
    let skipped = loader.skipped.clone();
    let batches: Vec<Batch> = loader.map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.len).sum::<usize>(), 6);
    assert_eq!(
        stats
            .skipped_images
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let log = skipped.lock().unwrap();
    assert_eq!(log[0].source_id, Some(999));
    assert_eq!(log[0].offset, 0);
    assert!(log[0].reason.contains("decode"), "{}", log[0].reason);
}
