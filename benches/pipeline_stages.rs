//! Per-stage cost of the input pipeline on one core: parse, decode, augment, label.
//! `cargo bench --bench pipeline_stages` (uses ../shared/data/coco_tiny, or $COCO_TINY_DIR).
//! Whole-pipeline throughput is `effdet bench-pipeline` (see BENCHMARKS.md).

use std::path::PathBuf;
use std::time::Instant;

use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::augment::{
    render_image, transform_boxes, AugmentConfig, ImageWorkspace, ScaleParams,
};
use effdet_pipeline::coco::convert::{build_example, CocoIndex, ConvertOptions};
use effdet_pipeline::decode::{CpuDecoder, DecodedImage, ImageDecoder};
use effdet_pipeline::example::Example;
use effdet_pipeline::labeler::Labeler;
use effdet_pipeline::sample::Sample;
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    let coco = std::env::var_os("COCO_TINY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/coco_tiny")
        });
    let opts = ConvertOptions {
        image_dir: coco.join("train2017"),
        object_annotations_file: Some(coco.join("annotations/instances_train2017.json")),
        caption_annotations_file: None,
        image_info_file: None,
        output_file_prefix: String::new(),
        num_shards: 1,
        include_masks: false,
        num_threads: 1,
    };
    let index = CocoIndex::load(&opts)?;
    let payloads: Vec<bytes::Bytes> = index
        .images
        .iter()
        .map(|im| build_example(im, &index, &opts.image_dir, false).map(|b| b.serialized.into()))
        .collect::<anyhow::Result<_>>()?;
    let cfg = AugmentConfig::d0(512);
    let labeler = Labeler::new(Anchors::new(&AnchorConfig::efficientdet(512, 512))?);
    let mut targets = labeler.new_targets();
    let (mut decoded, mut ws) = (DecodedImage::default(), ImageWorkspace::default());
    let mut out = vec![0f32; 3 * 512 * 512];
    let (mut boxes, mut keep) = (Vec::new(), Vec::new());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut t = [0f64; 4];
    let rounds = 5;
    for _ in 0..rounds {
        for p in &payloads {
            let s0 = Instant::now();
            let sample = Sample::from_example(&Example::decode_bytes(p.clone())?)?;
            let s1 = Instant::now();
            CpuDecoder.decode_into(&sample.image, &mut decoded)?;
            let s2 = Instant::now();
            let params = ScaleParams::train(&mut rng, decoded.height, decoded.width, &cfg);
            transform_boxes(&sample.boxes, &params, &cfg, &mut boxes, &mut keep);
            render_image(&decoded, &params, &cfg, &mut ws, &mut out)?;
            let s3 = Instant::now();
            let classes: Vec<i32> = keep.iter().map(|&i| sample.classes[i]).collect();
            labeler.label_into(&boxes, &classes, &mut targets)?;
            let s4 = Instant::now();
            for (acc, d) in t.iter_mut().zip([s1 - s0, s2 - s1, s3 - s2, s4 - s3]) {
                *acc += d.as_secs_f64();
            }
        }
    }
    let n = (rounds * payloads.len()) as f64;
    println!(
        "per image, one core, {} coco_tiny images × {rounds}:",
        payloads.len()
    );
    for (name, secs) in ["parse", "decode", "augment", "label"].iter().zip(t) {
        println!("  {name:8} {:8.1} µs", secs / n * 1e6);
    }
    println!("  total    {:8.1} µs", t.iter().sum::<f64>() / n * 1e6);
    Ok(())
}
