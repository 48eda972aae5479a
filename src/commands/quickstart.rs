//! `effdet quickstart`: the whole flow on a dataset the project makes itself, no downloads:
//! synthetic COCO-format images → TFRecord shards (automl layout) → shard verification →
//! a train-mode input-pipeline benchmark → an eval-mode batch dumped as safetensors → a short
//! CPU training run (D0, 3 classes) → COCO evaluation of its EMA weights on the val split.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use effdet_pipeline::augment::Mode;
use effdet_pipeline::coco::convert::{convert, ConvertOptions};
use effdet_pipeline::coco::synth::{generate, SynthOptions};
use effdet_pipeline::tfrecord::RecordReader;

use super::data::{cpu_seconds, peak_rss_mb, start_loader, LabelSpec};

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
    /// Training steps on the synthetic set (CPU).
    #[arg(long, default_value_t = 120)]
    train_steps: u64,
    /// Training and evaluation image size.
    #[arg(long, default_value_t = 128)]
    train_image_size: u32,
    #[arg(long, default_value_t = 4)]
    train_batch_size: usize,
    /// Peak learning rate (higher than COCO's 0.005 for batch 4: the synthetic set is easy).
    #[arg(long, default_value_t = 0.05)]
    train_lr: f64,
}

fn step(n: usize, what: &str) {
    eprintln!("\n[{n}/6] {what}");
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
    let mut loader = start_loader(cfg, files, &LabelSpec::default_anchors(a.image_size))?;
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
    step(5, "training EfficientDet-D0 briefly on CPU (3 classes)");
    let run_dir = a.out.join("run");
    let mut data = super::data::DataArgs::for_paths(
        vec![shards.join("train").to_string_lossy().into_owned()],
        a.train_image_size,
    );
    data.seed = a.seed;
    let train_args = super::train::Args {
        config: "efficientdet-d0".into(),
        precision: effdet_model::Precision::F32,
        device: super::bench_train::DeviceArg::Cpu,
        feed: Default::default(),
        data,
        out: run_dir.clone(),
        resume: false,
        steps: Some(a.train_steps),
        max_steps_this_run: None,
        batch_size: Some(a.train_batch_size),
        lr: Some(a.train_lr),
        warmup_steps: Some((a.train_steps / 10).max(1)),
        epoch_size: None,
        checkpoint_every: 0,
        set: vec!["head.num_classes=3".into()],
        log_every: 1,
        quiet: false,
    };
    // A fresh run each time: an old `latest` must not be mixed in.
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)?;
    }
    let trained = super::train::train(&train_args)?;
    let k = (trained.losses.len() / 10).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let first_loss = mean(&trained.losses[..k.min(trained.losses.len())]);
    let last_loss = mean(&trained.losses[trained.losses.len().saturating_sub(k)..]);
    eprintln!(
        "  {} steps, {:.2} s/step, loss {first_loss:.4} → {last_loss:.4} (mean of first/last {k})",
        trained.losses.len(),
        trained.mean_step_secs
    );
    let ckpt = trained
        .checkpoint
        .clone()
        .ok_or_else(|| anyhow::anyhow!("training wrote no checkpoint"))?;

    step(
        6,
        "evaluating the EMA weights on the synthetic val split (COCO AP)",
    );
    let val_ann = splits
        .iter()
        .find(|(s, _)| *s == "val")
        .map(|(_, o)| o.annotations.clone())
        .ok_or_else(|| anyhow::anyhow!("no val split"))?;
    let evaluated = super::eval::eval(&super::eval::Args {
        checkpoint: ckpt.clone(),
        data: super::data::DataArgs::for_paths(
            vec![shards.join("val").to_string_lossy().into_owned()],
            a.train_image_size,
        ),
        annotations: val_ann,
        out: Some(a.out.join("val_detections.json")),
        no_events: false,
        device: crate::commands::bench_train::DeviceArg::Cpu,
        batch_size: 8,
    })?;
    eprintln!(
        "  mAP {:.4}, AP50 {:.4} over {} images",
        evaluated.stats.ap, evaluated.stats.ap50, evaluated.images
    );

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
        "train": {
            "steps": trained.losses.len(),
            "image_size": a.train_image_size,
            "batch_size": a.train_batch_size,
            "first_loss": first_loss,
            "last_loss": last_loss,
            "sec_per_step": trained.mean_step_secs,
            "images_per_sec": trained.images_per_sec,
            "checkpoint": ckpt,
            "events": trained.events,
        },
        "eval": evaluated,
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
