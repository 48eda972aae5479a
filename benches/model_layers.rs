//! CPU cost of one 1×1 convolution, forward + backward, as one graph node (`ops::linear`,
//! what the model uses) against the same layer composed of stock candle ops
//! (`ops::linear_unfused`), whose backward zero-fills and adds a gradient for each of its
//! intermediate nodes. `cargo bench --bench model_layers`; rounds alternate A/B and the
//! medians and their ratio are printed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use effdet_model::ops::{linear, linear_unfused};

fn step(fused: bool, x: &Var, w: &Var, b: &Var, r: &Tensor) -> candle_core::Result<f32> {
    let f = if fused { linear } else { linear_unfused };
    let y = f(
        x.as_tensor(),
        w.as_tensor(),
        Some(b.as_tensor()),
        DType::F32,
        false,
    )?;
    let g = (y * r)?.sum_all()?.backward()?;
    g.get(x).unwrap().sum_all()?.to_scalar::<f32>()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // D0 shapes at 512², batch 2: a BiFPN/head pointwise conv at P3, and a backbone
    // expansion (stage 3) and projection (stage 4).
    for (b, h, cin, cout) in [(2, 64, 64, 64), (2, 64, 40, 240), (2, 32, 480, 80)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, h, cin), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cin, cout), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.1, cout, &dev)?)?;
        let r = Tensor::randn(0f32, 1., (b, h, h, cout), &dev)?;
        let (mut fused, mut unfused) = (Vec::new(), Vec::new());
        for round in 0..12 {
            for f in [true, false] {
                let t = Instant::now();
                let v = step(f, &x, &w, &bias, &r)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                assert!(v.is_finite());
                if round >= 2 {
                    if f {
                        fused.push(ms)
                    } else {
                        unfused.push(ms)
                    }
                }
            }
        }
        let (a, u) = (median(fused), median(unfused));
        println!(
            "conv1x1 [{b}, {h}, {h}, {cin}] -> {cout}: one node {a:.2} ms, composed {u:.2} ms \
             (composed / one node = {:.2})",
            u / a
        );
    }
    Ok(())
}
