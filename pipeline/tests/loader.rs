//! Loader behaviour end to end on synthetic shards: determinism across thread counts,
//! holes left by corrupt images, eval order and short last batch, target layout.

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
use effdet_pipeline::loader::{Batch, ImageData, ImageDtype, Loader, LoaderConfig};
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

/// A CPU-decoding loader at 128².
fn start(cfg: LoaderConfig, files: Vec<PathBuf>) -> Loader {
    Loader::start(cfg, files, labeler(128), Arc::new(CpuDecoder)).unwrap()
}

fn run(files: &[PathBuf], cfg: LoaderConfig, batches: usize) -> Vec<String> {
    let loader = start(cfg, files.to_vec());
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
    // Small batches and many workers: several batches open at once, workers held back by the
    // bound on open batches, and the loader dropped while they wait.
    let small = |threads| {
        let mut c = config(Mode::Train, threads);
        c.batch_size = 1;
        c.prefetch = 1;
        run(&files, c, 25)
    };
    assert_eq!(small(8), small(1));
    let mut other_seed = config(Mode::Train, 2);
    other_seed.seed = 6;
    assert_ne!(run(&files, other_seed, 10), one);
    // f16 images carry the same targets.
    let mut f16 = config(Mode::Train, 2);
    f16.image_dtype = ImageDtype::F16;
    let loader = Loader::start(f16, files.clone(), labeler(128), Arc::new(CpuDecoder)).unwrap();
    let b = loader.take(1).next().unwrap().unwrap();
    assert!(one[0].contains(&format!("{:?}", b.buffers().cls_targets)));
    // ... and the f32 images rounded once to f16 (the workers render f16 directly).
    let f32_loader = Loader::start(
        config(Mode::Train, 2),
        files.clone(),
        labeler(128),
        Arc::new(CpuDecoder),
    )
    .unwrap();
    let a = f32_loader.take(1).next().unwrap().unwrap();
    match (&a.buffers().images, &b.buffers().images) {
        (ImageData::F32(x), ImageData::F16(h)) => {
            assert_eq!(x.len(), h.len());
            assert!(x.iter().zip(h).all(|(&x, &h)| half::f16::from_f32(x) == h));
        }
        _ => panic!("expected f32 and f16 images"),
    }
}

/// An Example whose image bytes start like a JPEG but are not one (source id 999).
fn bad_record() -> Vec<u8> {
    let mut f = BTreeMap::new();
    f.insert(
        "image/encoded".to_string(),
        Feature::bytes([Bytes::from_static(b"\xff\xd8not a jpeg")]),
    );
    f.insert(
        "image/source_id".to_string(),
        Feature::bytes([Bytes::from_static(b"999")]),
    );
    Example::from_features(f).encode_to_vec()
}

/// One shard of `images` synthetic records with a [`bad_record`] before record `bad_at`.
fn shard_with_bad_record(dir: &Path, images: usize, bad_at: usize) -> PathBuf {
    let good = make_shards(dir, images, 1);
    let mixed = dir.join("mixed.tfrecord");
    let mut w = AtomicRecordWriter::create(&mixed).unwrap();
    let bad = bad_record();
    let reader = effdet_pipeline::tfrecord::RecordReader::open(&good[0]).unwrap();
    for (i, rec) in reader.enumerate() {
        if i == bad_at {
            w.write(&bad).unwrap();
        }
        w.write(&rec.unwrap().payload).unwrap();
    }
    w.finish().unwrap();
    mixed
}

/// A record that cannot be decoded leaves a hole in its slot, at the same place whatever the
/// thread count, and the records after it keep their slots.
#[test]
fn a_bad_record_leaves_the_same_hole_for_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mixed = shard_with_bad_record(dir.path(), 7, 2);
    let files = vec![mixed];
    // Eight records, batch 4: six batches span three epochs.
    let one = run(&files, config(Mode::Train, 1), 6);
    assert_eq!(run(&files, config(Mode::Train, 3), 6), one);
    let mut cfg = config(Mode::Eval, 3);
    cfg.epochs = Some(1);
    let loader = Loader::start(cfg, files, labeler(128), Arc::new(CpuDecoder)).unwrap();
    let ids: Vec<i64> = loader
        .map(|b| b.unwrap())
        .flat_map(|b| b.buffers().source_ids.clone())
        .collect();
    let id = |i: i64| 11_000_000 + i;
    assert_eq!(ids, [id(1), id(2), -1, id(3), id(4), id(5), id(6), id(7)]);
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
fn corrupt_jpeg_in_a_shard_leaves_a_counted_hole() {
    let dir = tempfile::tempdir().unwrap();
    // A record whose image bytes are not a JPEG, then six good ones.
    let bad = shard_with_bad_record(dir.path(), 6, 0);
    let loader = start(config(Mode::Eval, 2), vec![bad]);
    let stats = loader.stats.clone();
    let skipped = loader.skipped.clone();
    let batches: Vec<Batch> = loader.map(|b| b.unwrap()).collect();
    // The bad record keeps its slot (the first) as a hole; the six good ones follow it.
    assert_eq!(batches.iter().map(|b| b.len).sum::<usize>(), 7);
    let first = batches[0].buffers();
    assert_eq!(first.source_ids[0], -1);
    assert_ne!(first.source_ids[1], -1);
    assert_eq!(first.num_positives[0], 0.0);
    let per_level = |b: &Batch, l: usize| b.cls_targets(l).len() / b.batch_size;
    for l in 0..batches[0].levels.len() {
        let n = per_level(&batches[0], l);
        let cls = batches[0].cls_targets(l);
        assert!(
            cls[..n].iter().all(|&c| c == -2),
            "hole anchors are ignored"
        );
        assert!(
            cls[n..2 * n].iter().all(|&c| c >= -1),
            "the next slot is a sample"
        );
        assert!(batches[0].box_targets(l)[..4 * n].iter().all(|&v| v == 0.0));
    }
    match &first.images {
        ImageData::F32(v) => {
            let len = v.len() / batches[0].batch_size;
            assert!(v[..len].iter().all(|&x| x == 0.0), "hole pixels are zero");
            assert!(v[len..2 * len].iter().any(|&x| x != 0.0));
        }
        _ => panic!("f32 images expected"),
    }
    assert!(first.gt_classes[..100].iter().all(|&c| c == -1.0));
    // The short last batch is padded behind its samples: background, not ignored.
    let last = batches.last().unwrap();
    assert!(last.len < last.batch_size);
    for l in 0..last.levels.len() {
        let n = per_level(last, l);
        assert!(last.cls_targets(l)[last.len * n..].iter().all(|&c| c == -1));
    }
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

/// Deferred decode: JPEGs stay encoded with the geometry the CPU path would use (rendering
/// them with it gives the CPU loader's exact images), other formats are rendered by the
/// workers, and every target is identical to the CPU loader's.
#[test]
fn deferred_decode_defers_jpegs_and_keeps_every_target() {
    use effdet_pipeline::augment::{render_image, AugmentConfig, ImageWorkspace};
    use effdet_pipeline::decode::{DecodedImage, ImageDecoder};
    use std::sync::atomic::Ordering::Relaxed;

    let dir = tempfile::tempdir().unwrap();
    let files = make_shards(dir.path(), 7, 1);
    // One PNG record among the JPEGs: the GPU decoder does not take it.
    let mixed = dir.path().join("mixed.tfrecord");
    let mut w = AtomicRecordWriter::create(&mixed).unwrap();
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_fn(90, 50, |x, y| image::Rgb([x as u8 * 2, y as u8 * 4, 77]))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let mut f = BTreeMap::new();
    f.insert(
        "image/encoded".to_string(),
        Feature::bytes([Bytes::from(png.into_inner())]),
    );
    f.insert(
        "image/source_id".to_string(),
        Feature::bytes([Bytes::from_static(b"4242")]),
    );
    w.write(&Example::from_features(f).encode_to_vec()).unwrap();
    for rec in effdet_pipeline::tfrecord::RecordReader::open(&files[0]).unwrap() {
        w.write(&rec.unwrap().payload).unwrap();
    }
    w.finish().unwrap();

    let cpu_cfg = config(Mode::Train, 2);
    let mut def_cfg = cpu_cfg.clone();
    def_cfg.defer_jpeg_decode = true;
    let start = |cfg: LoaderConfig| {
        Loader::start(cfg, vec![mixed.clone()], labeler(128), Arc::new(CpuDecoder)).unwrap()
    };
    let (cpu, def) = (start(cpu_cfg), start(def_cfg));
    let stats = def.stats.clone();
    let aug = AugmentConfig::d0(128);
    let mut ws = ImageWorkspace::default();
    let mut decoded = DecodedImage::default();
    let mut plane = vec![0.0f32; 3 * 128 * 128];
    let (mut deferred, mut rendered) = (0, 0);
    for (a, b) in cpu.zip(def).take(4) {
        let (a, b) = (a.unwrap(), b.unwrap());
        let (x, y) = (a.buffers(), b.buffers());
        assert_eq!(x.cls_targets, y.cls_targets);
        assert_eq!(x.box_targets, y.box_targets);
        assert_eq!(x.num_positives, y.num_positives);
        assert_eq!(x.source_ids, y.source_ids);
        assert_eq!(x.image_scales, y.image_scales);
        assert_eq!(x.gt_boxes, y.gt_boxes);
        let (xi, yi) = (x.images.to_f32(), y.images.to_f32());
        let n = 3 * 128 * 128;
        assert_eq!(b.encoded.len(), b.batch_size);
        for slot in 0..b.len {
            let want = &xi[slot * n..(slot + 1) * n];
            match &b.encoded[slot] {
                Some(e) => {
                    deferred += 1;
                    CpuDecoder.decode_into(&e.jpeg, &mut decoded).unwrap();
                    assert_eq!((decoded.height, decoded.width), (e.height, e.width));
                    render_image(&decoded, &e.params, &aug, &mut ws, &mut plane).unwrap();
                    assert_eq!(
                        plane, want,
                        "slot {slot}: geometry differs from the CPU path"
                    );
                }
                None => {
                    rendered += 1;
                    assert_eq!(y.source_ids[slot], 4242, "only the PNG is rendered");
                    assert_eq!(&yi[slot * n..(slot + 1) * n], want);
                }
            }
        }
        assert_eq!(
            b.deferred_slots().count(),
            b.encoded.iter().flatten().count()
        );
    }
    // 8 records per epoch, 16 samples: the PNG comes twice.
    assert_eq!((deferred, rendered), (14, 2));
    assert!(stats.cpu_fallback_images.load(Relaxed) >= 2);
    assert!(stats.deferred_images.load(Relaxed) >= 14);
}

/// A train loader whose workers leave the JPEGs encoded (deferred decode) over fresh shards.
fn header_only_loader(dir: &Path, images: usize, shards: usize, threads: usize) -> Loader {
    let files = make_shards(dir, images, shards);
    let mut cfg = config(Mode::Train, threads);
    cfg.defer_jpeg_decode = true;
    Loader::start(cfg, files, labeler(128), Arc::new(CpuDecoder)).unwrap()
}

/// A slot blanked after labelling contributes nothing: all anchors ignored, no positives.
#[test]
fn ignore_slot_neutralizes_one_sample() {
    let dir = tempfile::tempdir().unwrap();
    let mut loader = header_only_loader(dir.path(), 8, 1, 1);
    let mut b = loader.next_batch().unwrap().unwrap();
    let before = b.buffers().cls_targets.clone();
    assert!(b.buffers().num_positives[1] > 0.0);
    b.ignore_slot(1);
    assert!(b.encoded[1].is_none() && b.encoded[0].is_some());
    let per_image = b.num_anchors();
    for l in 0..b.levels.len() {
        let (lv, a) = (&b.levels[l], b.anchors_per_cell);
        let n = lv.height * lv.width * a;
        let cls = b.cls_targets(l);
        assert!(cls[n..2 * n].iter().all(|&c| c == -2));
        assert!(b.box_targets(l)[4 * n..8 * n].iter().all(|&v| v == 0.0));
        // Other slots untouched.
        let start = lv.anchor_offset * b.batch_size;
        assert_eq!(cls[..n], before[start..start + n]);
    }
    let bufs = b.buffers();
    assert_eq!(bufs.num_positives[1], 0.0);
    assert!(bufs.gt_classes[100..200].iter().all(|&c| c == -1.0));
    assert_eq!(bufs.cls_targets.len(), per_image * b.batch_size);
}

/// The batch buffer pool stops growing once it covers what is in use at once, however fast
/// batches are handed back (a consumer that drops each batch at once, workers that only label).
#[test]
fn the_buffer_pool_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let loader = header_only_loader(dir.path(), 12, 2, 2);
    let stats = loader.stats.clone();
    assert_eq!(loader.take(600).filter(|b| b.is_ok()).count(), 600);
    // At most: open batches (3 here: 6 records in flight over batches of 4, plus one), the
    // prefetch queue (2), the batch the assembler is handing out and the consumer's.
    let sets = stats.buffer_sets.load(std::sync::atomic::Ordering::Relaxed);
    assert!((2..=7).contains(&sets), "{sets} buffer sets allocated");
}

/// Input in which nothing decodes is an error, not an endless run of empty batches.
#[test]
fn input_where_nothing_decodes_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.tfrecord");
    let mut w = AtomicRecordWriter::create(&bad).unwrap();
    w.write(&bad_record()).unwrap();
    w.finish().unwrap();
    let loader = start(config(Mode::Train, 2), vec![bad]);
    let results: Vec<_> = loader.take(100).collect();
    // Batches of holes come first (25 batches of 4 = the first 100 records), then the error.
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("an error");
    assert!(
        err.to_string()
            .contains("100 records failed before any gave a sample"),
        "{err}"
    );
    assert!(results.iter().filter(|r| r.is_ok()).count() <= 25);
}

/// A class id the model has no logit for stops the loader with an error naming the record,
/// instead of failing later in the loss (or, as in automl, training the anchor as background).
#[test]
fn a_class_id_beyond_the_models_classes_stops_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_shards(dir.path(), 12, 2); // category ids 1..=3
    let with_classes = |k| {
        let anchors = Anchors::new(&AnchorConfig::efficientdet(128, 128)).unwrap();
        Arc::new(Labeler::new(anchors).with_num_classes(k))
    };
    let loader = |k| {
        let labeler = with_classes(k);
        Loader::start(
            config(Mode::Train, 2),
            files.clone(),
            labeler,
            Arc::new(CpuDecoder),
        )
        .unwrap()
    };
    // Three classes cover the data: a whole epoch's batches and more.
    assert!(loader(3).take(5).all(|b| b.is_ok()));
    // Two do not: the first sample with a class-3 box ends the run with its file and offset.
    let results: Vec<_> = loader(2).take(5).collect();
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("an error")
        .to_string();
    assert!(err.contains("class id 3"), "{err}");
    assert!(err.contains("head.num_classes"), "{err}");
    assert!(err.contains(".tfrecord at byte offset"), "{err}");
    // Nothing follows the error.
    let first_err = results.iter().position(|r| r.is_err()).unwrap();
    assert_eq!(results.len(), first_err + 1);
}
