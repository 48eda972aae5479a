//! Times EfficientDet forward + backward (training mode, full loss) on random data.
//! Usage: `cargo run --release -p effdet-model --example bench -- [model] [size] [batch] [iters]`
//! (defaults: efficientdet-d0 512 2 3).

use candle_core::{DType, Device, Tensor};
use effdet_model::{config::Config, feature_sizes, loss::detection_loss, EfficientDet, ModelVars};
use std::time::Instant;

/// Process CPU seconds (user + system) from /proc (Linux); NaN elsewhere. Wall time is noisy
/// on a shared machine, CPU time much less so.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("efficientdet-d0", String::as_str);
    let size: usize = args.get(1).map_or(Ok(512), |s| s.parse())?;
    let batch: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let iters: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let cfg = Config::builtin(name)?;
    let dev = Device::Cpu;
    let vars = ModelVars::new(&dev, 0);
    let model = EfficientDet::new(&cfg, &vars)?;
    model.print_param_count();
    println!("threads: {}", rayon::current_num_threads());
    let images = Tensor::randn(0f32, 1f32, (batch, 3, size, size), &dev)?;
    let mut cls_t = Vec::new();
    let mut box_t = Vec::new();
    for (h, w) in feature_sizes(&cfg, size, size) {
        let ids = Tensor::rand(0f32, 1f32, (batch, h, w, 9), &dev)?;
        // ~2% positives of class 1, the rest background.
        let ids = ids.ge(0.98)?.to_dtype(DType::F32)?.affine(2.0, -1.0)?;
        cls_t.push(ids.to_dtype(DType::I64)?);
        box_t.push(Tensor::zeros((batch, h, w, 36), DType::F32, &dev)?);
    }
    let num_pos = Tensor::full(100f32, batch, &dev)?;
    for it in 0..iters {
        let (c0, t0) = (cpu_secs(), Instant::now());
        let (cls, boxes) = model.forward(&images, true)?;
        let parts = detection_loss(
            &cls,
            &boxes,
            &cls_t,
            &box_t,
            &num_pos,
            &model.l2_kernels(),
            &cfg.loss,
        )?;
        let loss = parts.total.to_scalar::<f32>()?;
        let (c1, t1) = (cpu_secs(), Instant::now());
        let grads = parts.total.backward()?;
        let (c2, t2) = (cpu_secs(), Instant::now());
        let n = vars
            .trainable()
            .iter()
            .filter(|(_, v)| grads.get(v).is_some())
            .count();
        println!(
            "{name} {size}x{size} batch {batch} iter {it}: wall forward+loss {:.3}s backward {:.3}s total {:.3}s | cpu {:.2}s + {:.2}s = {:.2}s (loss {loss:.4}, {n} grads)",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t2 - t0).as_secs_f64(),
            c1 - c0,
            c2 - c1,
            c2 - c0
        );
    }
    let t0 = Instant::now();
    let _ = model.forward(&images, false)?;
    println!("eval forward: {:.3}s", t0.elapsed().as_secs_f64());
    Ok(())
}
