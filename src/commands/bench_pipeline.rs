//! `effdet bench-pipeline`: runs the input pipeline alone and reports throughput, per-stage
//! time and peak memory as one JSON line.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::data::{cpu_seconds, peak_rss_mb, start_loader, DataArgs, ModeArg};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    /// Train (augmentation + labels) or eval preprocessing.
    #[arg(long, value_enum, default_value_t = ModeArg::Train)]
    mode: ModeArg,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Batches to time (after the warm-up).
    #[arg(long, default_value_t = 100)]
    batches: usize,
    /// Batches before timing starts (thread start-up, first file reads).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Only read, decode and resize: the pipeline's own ceiling.
    #[arg(long)]
    decode_only: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let files = a.data.files()?;
    let mut cfg = a.data.loader_config(a.mode.into(), a.batch_size);
    cfg.decode_only = a.decode_only;
    if a.mode == ModeArg::Eval {
        cfg.epochs = None; // repeat so any batch count can be timed
    }
    let mut loader = start_loader(cfg, files)?;
    let threads = loader.worker_threads;
    let bar = effdet_tools::progress_bar(a.batches as u64, "batches");
    for _ in 0..a.warmup {
        loader
            .next_batch()
            .ok_or_else(|| anyhow::anyhow!("the pipeline ended during warm-up"))??;
    }
    let stats = loader.stats.clone();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut images = 0usize;
    for _ in 0..a.batches {
        let batch = loader
            .next_batch()
            .ok_or_else(|| anyhow::anyhow!("the pipeline ended early"))??;
        images += batch.len;
        bar.inc(1);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    bar.finish_and_clear();
    let skipped = stats.skipped_images.load(Ordering::Relaxed);
    let skipped_records = stats.skipped_records.load(Ordering::Relaxed);
    drop(loader);
    println!(
        "{}",
        serde_json::json!({
            "mode": format!("{:?}", a.mode).to_lowercase(),
            "decode_only": a.decode_only,
            "image_size": a.data.image_size,
            "batch_size": a.batch_size,
            "batches": a.batches,
            "images": images,
            "seconds": seconds,
            "images_per_sec": images as f64 / seconds,
            "threads": threads,
            "cpu_seconds": cpu,
            "cpu_ms_per_image": cpu * 1000.0 / images.max(1) as f64,
            "peak_rss_mb": peak_rss_mb(),
            "stage_seconds": stats.to_json(),
            "skipped_images": skipped,
            "skipped_records": skipped_records,
        })
    );
    Ok(0)
}
