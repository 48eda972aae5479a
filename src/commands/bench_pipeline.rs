//! `effdet bench-pipeline`: runs the input pipeline alone and reports throughput, per-stage
//! time and peak memory as one JSON line.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::data::{cpu_seconds, peak_rss_mb, start_loader, DataArgs, LabelSpec, ModeArg};

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
    /// Decode JPEGs on the GPU with nvJPEG and render them there (CUDA binary with the nvjpeg
    /// feature): workers only read headers (and make labels); each batch is synchronized.
    #[arg(long)]
    gpu_decode: bool,
    /// Workers read only JPEG headers and make the labels, leaving pixels to a GPU stage that
    /// is not run: the CPU side's ceiling when nvJPEG decodes.
    #[arg(long, conflicts_with = "gpu_decode")]
    header_only: bool,
}

/// The GPU decode stage as bench-pipeline drives it: one batch at a time on the device's stream.
#[cfg(feature = "nvjpeg")]
struct GpuStage {
    stage: effdet_pipeline::nvjpeg::stage::NvjpegStage,
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    out: Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>,
    seconds: f64,
}

#[cfg(feature = "nvjpeg")]
impl GpuStage {
    fn new(image_size: u32) -> anyhow::Result<GpuStage> {
        use effdet_pipeline::augment::AugmentConfig;
        let dev = super::bench_train::cuda_device()?;
        let stream = dev.as_cuda_device()?.cuda_stream();
        let cfg = AugmentConfig {
            image_size: (image_size, image_size),
            ..AugmentConfig::d0(image_size)
        };
        let stage = effdet_pipeline::nvjpeg::stage::NvjpegStage::new(stream.clone(), cfg)?;
        Ok(GpuStage {
            stage,
            stream,
            out: None,
            seconds: 0.0,
        })
    }

    fn run(&mut self, b: &mut effdet_pipeline::loader::Batch) -> anyhow::Result<()> {
        let t = Instant::now();
        let n = b.buffers().images.len();
        if self.out.as_ref().map(|o| o.len()) != Some(n) {
            self.out = Some(self.stream.alloc_zeros::<f32>(n)?);
        }
        self.stage.produce(b, self.out.as_mut().expect("out"))?;
        self.stream.synchronize()?;
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    fn reset_timer(&mut self) {
        self.seconds = 0.0;
    }

    fn report(&self, images: usize) -> serde_json::Value {
        serde_json::json!({
            "nvjpeg_version": self.stage.version(),
            "hardware_unavailable": self.stage.hardware_unavailable,
            "counts": self.stage.counts,
            "gpu_stage_seconds": self.seconds,
            "gpu_stage_images_per_sec": images as f64 / self.seconds.max(1e-9),
        })
    }
}

#[cfg(not(feature = "nvjpeg"))]
struct GpuStage;

#[cfg(not(feature = "nvjpeg"))]
impl GpuStage {
    fn new(_: u32) -> anyhow::Result<GpuStage> {
        anyhow::bail!("--gpu-decode needs a CUDA binary built with --features nvjpeg")
    }
    fn run(&mut self, _: &mut effdet_pipeline::loader::Batch) -> anyhow::Result<()> {
        Ok(())
    }
    fn reset_timer(&mut self) {}
    fn report(&self, _: usize) -> serde_json::Value {
        serde_json::Value::Null
    }
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let files = a.data.files()?;
    let mut cfg = a.data.loader_config(a.mode.into(), a.batch_size);
    cfg.decode_only = a.decode_only;
    cfg.defer_jpeg_decode = a.header_only;
    let mut gpu = if a.gpu_decode {
        cfg.defer_for_gpu();
        Some(GpuStage::new(a.data.image_size())?)
    } else {
        None
    };
    if a.mode == ModeArg::Eval {
        cfg.epochs = None; // repeat so any batch count can be timed
    }
    let mut loader = start_loader(cfg, files, &LabelSpec::default_anchors(a.data.image_size()))?;
    let threads = loader.worker_threads;
    let bar = effdet_tools::progress_bar(a.batches as u64, "batches");
    for _ in 0..a.warmup {
        let mut b = loader
            .next_batch()
            .ok_or_else(|| anyhow::anyhow!("the pipeline ended during warm-up"))??;
        if let Some(g) = gpu.as_mut() {
            g.run(&mut b)?;
        }
    }
    if let Some(g) = gpu.as_mut() {
        g.reset_timer();
    }
    let stats = loader.stats.clone();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut images = 0usize;
    for _ in 0..a.batches {
        let mut batch = loader
            .next_batch()
            .ok_or_else(|| anyhow::anyhow!("the pipeline ended early"))??;
        if let Some(g) = gpu.as_mut() {
            g.run(&mut batch)?;
        }
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
            "gpu_decode": gpu.as_ref().map(|g| g.report(images)),
            "header_only": a.header_only,
            "image_size": a.data.image_size(),
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
