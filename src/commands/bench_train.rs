//! `effdet bench-train`: training-step throughput on the CPU or a CUDA GPU, fed by the real
//! input pipeline (or one reused batch with `--reuse-batch`, to time the model alone). Prints
//! one JSON line: images/s, step and data-wait milliseconds, the data-wait share of the wall
//! time, and memory. Timed steps are synchronized at their end so step time is compute time;
//! data wait is the time spent waiting for the next device-resident batch.

use std::time::Instant;

use candle_core::Device;
use clap::ValueEnum;
use serde::Serialize;

use effdet_model::Precision;

use super::data::{peak_rss_mb, start_loader, DataArgs, LabelSpec};
use super::step::{BatchTensors, DeviceFeeder, Trainer};
use super::train::load_config;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Model config (TOML path or built-in name).
    #[arg(long, default_value = "efficientdet-d0")]
    pub config: String,
    /// Config overrides `section.key=value`, repeatable.
    #[arg(long = "set")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Untimed steps first (allocator warm-up, kernel loading).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// fp32 (TF32 matrix math on a GPU unless --no-tf32), fp16 or bf16 mixed precision.
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Full-precision f32 matrix products on the GPU.
    #[arg(long)]
    pub no_tf32: bool,
    /// Time the model alone on one batch reused every step (no data wait).
    #[arg(long)]
    pub reuse_batch: bool,
    #[command(flatten)]
    pub feed: super::data::FeedArgs,
    /// Constant learning rate of the timed steps.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub device: DeviceArg,
    pub device_name: String,
    pub precision: Precision,
    pub tf32: bool,
    pub batch_size: usize,
    pub image_size: u32,
    pub steps: u64,
    pub warmup: u64,
    pub feed: &'static str,
    /// Where the gradients came from: "tape" (default) or "candle" (`EFFDET_CANDLE_BACKWARD=1`).
    pub backward: &'static str,
    pub images_per_sec: f64,
    pub step_ms: f64,
    pub step_ms_min: f64,
    pub data_wait_ms: f64,
    pub data_wait_share: f64,
    /// Device memory in use after a synchronized step (driver view, all allocations).
    pub gpu_mem_mb: Option<f64>,
    /// Peak of the stream-ordered pool during the timed steps (the in-step high-water mark).
    pub gpu_peak_mb: Option<f64>,
    /// How batches reached the device (`--feed`), and the nvJPEG stage's decoder counts.
    pub feed_mode: super::step::FeedMode,
    /// Mean host wall time per timed step of each phase (see `PhaseTimes`), milliseconds.
    pub phases_ms: super::step::PhaseTimes,
    /// Tensors (≈ launches on a GPU) each phase of the last timed step created.
    pub tensors_per_step: super::step::PhaseTensors,
    /// With `EFFDET_OP_PROFILE=1` (or `=shapes`, per output shape too): host ms per timed step
    /// of each recorded op, by pass, longest first (the ops' own time on a CPU; only their
    /// enqueueing on a GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_profile: Option<Vec<OpTime>>,
    pub gpu_decode: Option<serde_json::Value>,
    pub peak_rss_mb: f64,
    pub skipped_steps: u64,
    pub loss_first: f64,
    pub loss_last: f64,
    pub seconds: f64,
}

/// One row of [`Report::op_profile`].
#[derive(Serialize, Debug)]
pub struct OpTime {
    pub op: String,
    pub pass: &'static str,
    pub calls_per_step: f64,
    pub ms_per_step: f64,
}

fn op_profile(steps: u64) -> Option<Vec<OpTime>> {
    if !effdet_model::tape::profile_ops() {
        return None;
    }
    let per = 1.0 / steps as f64;
    let rows = effdet_model::tape::take_op_profile()
        .into_iter()
        .map(|(op, phase, calls, took)| OpTime {
            op,
            pass: match phase {
                effdet_model::tape::Phase::Forward => "forward",
                effdet_model::tape::Phase::Backward => "backward",
            },
            calls_per_step: calls as f64 * per,
            ms_per_step: took.as_secs_f64() * 1e3 * per,
        })
        .collect();
    Some(rows)
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let r = bench(&a)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(0)
}

/// The device for `--device`.
pub fn device(d: DeviceArg) -> anyhow::Result<Device> {
    Ok(match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => cuda_device()?,
    })
}

/// The first CUDA GPU, with cudarc's automatic cross-stream event tracking off (see
/// `cuda_feed`): candle uses one stream, so the events it would create per allocation are
/// pure overhead, and the feed's copy stream synchronizes by hand.
pub fn cuda_device() -> anyhow::Result<Device> {
    let dev = Device::new_cuda(0).map_err(|e| {
        anyhow::anyhow!("--device cuda: {e} (build with --features cuda: tools/device/build.sh)")
    })?;
    // EFFDET_CUDA_EVENT_TRACKING=1 keeps cudarc's automatic tracking (slower; for diagnosis).
    #[cfg(feature = "cuda")]
    if std::env::var("EFFDET_CUDA_EVENT_TRACKING").as_deref() != Ok("1") {
        super::cuda_feed::disable_event_tracking(dev.as_cuda_device()?);
    }
    // EFFDET_POOL_TRIM=1 keeps the driver's default (for comparison).
    #[cfg(feature = "cuda")]
    if std::env::var("EFFDET_POOL_TRIM").as_deref() != Ok("1") {
        keep_pool_memory(dev.as_cuda_device()?);
    }
    Ok(dev)
}

/// The device's default memory pool, which candle's stream-ordered allocations come from.
#[cfg(feature = "cuda")]
fn default_pool(
    c: &candle_core::CudaDevice,
) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = c.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver query on the context's own device, into a local.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
}

/// Sets a pool attribute that takes a u64; false when the driver refuses.
#[cfg(feature = "cuda")]
fn set_pool_u64(
    pool: candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    mut value: u64,
) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ptr = &mut value as *mut u64 as *mut std::ffi::c_void;
    // SAFETY: `attr` takes a u64 (the callers pass such attributes); `value` outlives the call.
    unsafe { sys::cuMemPoolSetAttribute(pool, attr, ptr) == sys::CUresult::CUDA_SUCCESS }
}

/// Lets the default pool keep freed memory across synchronizations. Its release threshold is 0
/// by default: every stream synchronization (a training step has three) hands the freed
/// activations back to the OS and the next step's allocations map them again, where PyTorch's
/// caching allocator keeps them. The pool then holds the step's peak (`gpu_peak_mb`).
#[cfg(feature = "cuda")]
fn keep_pool_memory(c: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    if let Some(pool) = default_pool(c) {
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        if !set_pool_u64(pool, attr, u64::MAX) {
            eprintln!("warning: could not raise the CUDA memory pool's release threshold");
        }
    }
}

/// Peak bytes (MiB) in use in the device's default memory pool (the one candle's stream-ordered
/// allocations come from) since the last reset; `reset` starts a new window.
pub fn gpu_pool_peak_mb(dev: &Device, reset: bool) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Ok(c) = dev.as_cuda_device() {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let pool = default_pool(c)?;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let mut value: u64 = 0;
        let ptr = &mut value as *mut u64 as *mut std::ffi::c_void;
        // SAFETY: a plain driver query; `value` outlives the call.
        if unsafe { sys::cuMemPoolGetAttribute(pool, attr, ptr) } != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
        if reset {
            set_pool_u64(pool, attr, 0);
        }
        return Some(value as f64 / (1024.0 * 1024.0));
    }
    let _ = (dev, reset);
    None
}

/// Device name and memory in use (MiB), where the device reports them.
pub fn device_info(dev: &Device) -> (String, Option<f64>) {
    #[cfg(feature = "cuda")]
    if let Ok(c) = dev.as_cuda_device() {
        let stream = c.cuda_stream();
        let ctx = stream.context();
        let name = ctx.name().unwrap_or_else(|_| "cuda".into());
        let used = ctx
            .mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as f64 / (1024.0 * 1024.0));
        return (name, used);
    }
    let _ = dev;
    ("cpu".into(), None)
}

pub fn bench(a: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(
        a.steps > 0 && a.batch_size > 0,
        "--steps and --batch-size must be > 0"
    );
    let cfg = load_config(&a.config, &a.set)?;
    let data = a.data.sized_for(cfg.input.image_size as u32);
    let dev = device(a.device)?;
    let tf32 = dev.is_cuda() && !a.no_tf32;
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    let mut trainer = Trainer::new(&cfg, &dev, data.seed, a.precision)?;

    let mut lcfg = data.train_loader_config(&cfg, a.batch_size);
    // Batches reach the device through the background feed, two ahead (as in `train`).
    let feed = a.feed.apply(&mut lcfg, 2);
    let feeder = DeviceFeeder::start(
        start_loader(
            lcfg,
            data.files()?,
            &LabelSpec::for_model(&cfg, data.image_size()),
        )?,
        dev.clone(),
        feed,
    )?;
    let next = || -> anyhow::Result<BatchTensors> {
        Ok(feeder
            .next_batch()
            .ok_or_else(|| anyhow::anyhow!("the input pipeline ended"))??
            .tensors)
    };
    let reused = if a.reuse_batch { Some(next()?) } else { None };

    let (mut wait, mut compute) = (0.0f64, Vec::new());
    let (mut loss_first, mut loss_last) = (f64::NAN, f64::NAN);
    let mut peak_mem: Option<f64> = None;
    let mut skipped_steps = 0;
    let mut phases = super::step::PhaseTimes::default();
    let mut tensors = super::step::PhaseTensors::default();
    let mut t_timed = Instant::now();
    for i in 0..a.warmup + a.steps {
        if i == a.warmup {
            wait = 0.0;
            gpu_pool_peak_mb(&dev, true);
            let _warmup_ops = effdet_model::tape::take_op_profile();
            t_timed = Instant::now();
        }
        let t0 = Instant::now();
        let fresh;
        let batch = match &reused {
            Some(b) => b,
            None => {
                fresh = next()?;
                &fresh
            }
        };
        let t1 = Instant::now();
        let s = trainer.step(batch, a.lr, i)?;
        dev.synchronize()?;
        let t2 = Instant::now();
        if i >= a.warmup {
            wait += (t1 - t0).as_secs_f64();
            compute.push((t2 - t1).as_secs_f64());
            if loss_first.is_nan() {
                loss_first = s.loss;
            }
            loss_last = s.loss;
            skipped_steps += s.skipped as u64;
            phases.add(&s.phases);
            tensors = s.tensors;
        }
        let (_, mem) = device_info(&dev);
        peak_mem = match (peak_mem, mem) {
            (Some(p), Some(m)) => Some(p.max(m)),
            (p, m) => p.or(m),
        };
    }
    let secs = t_timed.elapsed().as_secs_f64();
    let gpu_peak_mb = gpu_pool_peak_mb(&dev, false);
    let steps = a.steps as f64;
    let (name, _) = device_info(&dev);
    Ok(Report {
        device: a.device,
        device_name: name,
        precision: a.precision,
        backward: if trainer.uses_tape() {
            "tape"
        } else {
            "candle"
        },
        skipped_steps,
        tf32,
        batch_size: a.batch_size,
        image_size: data.image_size(),
        steps: a.steps,
        warmup: a.warmup,
        feed: if a.reuse_batch {
            "reused-batch"
        } else {
            "pipeline"
        },
        images_per_sec: steps * a.batch_size as f64 / secs,
        step_ms: 1e3 * compute.iter().sum::<f64>() / steps,
        step_ms_min: 1e3 * compute.iter().cloned().fold(f64::INFINITY, f64::min),
        data_wait_ms: 1e3 * wait / steps,
        data_wait_share: wait / secs,
        gpu_mem_mb: peak_mem,
        gpu_peak_mb,
        feed_mode: a.feed.feed,
        phases_ms: phases.scaled(1e3 / a.steps as f64),
        tensors_per_step: tensors,
        op_profile: op_profile(a.steps),
        gpu_decode: feeder.gpu_decode_counts(),
        peak_rss_mb: peak_rss_mb(),
        loss_first,
        loss_last,
        seconds: secs,
    })
}
