//! `effdet quickstart`: the whole flow on a dataset the project makes itself, no downloads:
//! synthetic COCO-format images → TFRecord shards (automl layout) → shard verification →
//! a train-mode input-pipeline benchmark → an eval-mode batch dumped as safetensors.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use effdet_pipeline::augment::Mode;
use effdet_pipeline::coco::convert::{convert, ConvertOptions};
use effdet_pipeline::coco::synth::{generate, SynthOptions};
use effdet_pipeline::tfrecord::RecordReader;

use super::data::{cpu_seconds, peak_rss_mb, start_loader};

#[derive(clap::Args)]
pub struct Args {
    /// Working directory (created; reused files are overwritten).
    #[arg(long, default_value = "quickstart_out")]
    out: PathBuf,
    /// Synthetic training images.
    #[arg(long, default_value_t = 96)]
    train_images: usize,
    /// Synthetic validation images.
    #[arg(long, default_value_t = 32)]
    val_images: usize,
    /// Pipeline image size for the benchmark.
    #[arg(long, default_value_t = 512)]
    image_size: u32,
    /// Batches timed in the pipeline benchmark.
    #[arg(long, default_value_t = 40)]
    bench_batches: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn step(n: usize, what: &str) {
    eprintln!("\n[{n}/4] {what}");
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&a.out)?;
    let coco = a.out.join("coco");
    let shards = a.out.join("shards");
    step(1, "generating a synthetic COCO-format dataset");
    let mut splits = Vec::new();
    for (split, images, seed) in [
        ("train", a.train_images, a.seed),
        ("val", a.val_images, a.seed + 1),
    ] {
        let out = generate(
            &coco,
            &SynthOptions {
                images,
                seed,
                split: split.into(),
                ..Default::default()
            },
        )?;
        eprintln!(
            "  {split}: {images} images, {} objects → {}",
            out.objects,
            out.annotations.display()
        );
        splits.push((split, out));
    }

    step(
        2,
        "converting to TFRecord shards (create_coco_tfrecord layout, with masks)",
    );
    for (split, out) in &splits {
        let bar = effdet_tools::progress_bar(0, "images");
        let t = Instant::now();
        let summary = convert(
            &ConvertOptions {
                image_dir: out.image_dir.clone(),
                object_annotations_file: Some(out.annotations.clone()),
                caption_annotations_file: None,
                image_info_file: None,
                output_file_prefix: shards
                    .join(split)
                    .join(split)
                    .to_string_lossy()
                    .into_owned(),
                num_shards: 4,
                include_masks: true,
                num_threads: 0,
            },
            &|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        )?;
        bar.finish_and_clear();
        let mut records = 0;
        for shard in &summary.shards {
            for rec in RecordReader::open(shard)? {
                rec?;
                records += 1;
            }
        }
        anyhow::ensure!(
            records == summary.images,
            "{split}: wrote {} images but read back {records}",
            summary.images
        );
        eprintln!(
            "  {split}: {} images, {} annotations in {} shards, {:.1} images/s; every CRC verified",
            summary.images,
            summary.annotations_written,
            summary.shards.len(),
            summary.images as f64 / t.elapsed().as_secs_f64()
        );
    }

    step(
        3,
        "benchmarking the train-mode input pipeline (decode → augment → labels → batches)",
    );
    let mut cfg = effdet_pipeline::loader::LoaderConfig::new(Mode::Train, a.image_size, 8);
    cfg.seed = a.seed;
    let files = effdet_pipeline::tfrecord::expand_paths(&[shards.join("train").to_string_lossy()])?;
    let mut loader = start_loader(cfg, files)?;
    loader
        .next_batch()
        .ok_or_else(|| anyhow::anyhow!("pipeline produced no batch"))??;
    let bar = effdet_tools::progress_bar(a.bench_batches as u64, "batches");
    let (t, cpu0) = (Instant::now(), cpu_seconds());
    let mut images = 0;
    let mut positives = 0.0;
    for _ in 0..a.bench_batches {
        let b = loader
            .next_batch()
            .ok_or_else(|| anyhow::anyhow!("pipeline ended"))??;
        images += b.len;
        positives += b.buffers().num_positives.iter().sum::<f32>();
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let skipped = loader.stats.skipped_images.load(Ordering::Relaxed);
    let threads = loader.worker_threads;
    drop(loader);

    step(4, "dumping the first eval batch");
    let dump = a.out.join("val_batch.safetensors");
    super::dump_batch::dump(
        &super::data::DataArgs::for_paths(
            vec![shards.join("val").to_string_lossy().into_owned()],
            a.image_size,
        ),
        Mode::Eval,
        4,
        &dump,
    )?;
    let summary = serde_json::json!({
        "pipeline": {
            "images_per_sec": images as f64 / secs,
            "cpu_ms_per_image": cpu * 1000.0 / images as f64,
            "threads": threads,
            "image_size": a.image_size,
            "mean_positive_anchors": positives as f64 / images as f64,
            "skipped_images": skipped,
            "peak_rss_mb": peak_rss_mb(),
        },
        "shards": shards,
        "eval_batch": dump,
    });
    eprintln!(
        "\nDone: the input pipeline fed {:.0} images/s at {}² on {} threads.",
        images as f64 / secs,
        a.image_size,
        threads
    );
    println!("{summary}");
    Ok(0)
}
