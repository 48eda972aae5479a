//! CPU cost, forward + backward, of layers the model builds as single graph nodes against the
//! same layers composed of stock candle ops, whose backward zero-fills and adds a gradient for
//! every intermediate node (and, for `broadcast_mul`, computes the broadcast operand's
//! gradient at full size even when it is a constant):
//! - a 1×1 convolution: `ops::linear` vs `ops::linear_unfused` (reshape, casts, product, bias);
//! - drop-connect: `ops::scale_samples` vs `broadcast_mul` by the `[B, 1, 1, 1]` keep mask.
//!
//! `cargo bench --bench model_layers`; rounds alternate A/B and the medians and their ratio
//! are printed.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use effdet_model::ops;

type Layer<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ms of forward + backward of `one` and `composed` on `x`, alternating.
fn compare(what: &str, x: &Var, one: Layer, composed: Layer) -> Result<()> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..12 {
        for (f, out) in [(&one, &mut a), (&composed, &mut b)] {
            let t = Instant::now();
            let y = f(x.as_tensor())?;
            let g = y.sqr()?.sum_all()?.backward()?;
            let v = g
                .get(x.as_tensor())
                .unwrap()
                .sum_all()?
                .to_scalar::<f32>()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            assert!(v.is_finite());
            if round >= 2 {
                out.push(ms);
            }
        }
    }
    let (a, b) = (median(a), median(b));
    println!(
        "{what}: one node {a:.2} ms, composed {b:.2} ms (composed / one node = {:.2})",
        b / a
    );
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    // D0 shapes at 512², batch 2: a BiFPN/head pointwise conv at P3, and a backbone
    // expansion (stage 3) and projection (stage 4).
    for (b, h, cin, cout) in [(2, 64, 64, 64), (2, 64, 40, 240), (2, 32, 480, 80)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, h, cin), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cin, cout), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.1, cout, &dev)?)?;
        let (w1, b1, w2, b2) = (w.clone(), bias.clone(), w, bias);
        compare(
            &format!("conv1x1 [{b}, {h}, {h}, {cin}] -> {cout}"),
            &x,
            Box::new(move |x| ops::linear(x, &w1, Some(&b1), DType::F32, false)),
            Box::new(move |x| ops::linear_unfused(x, &w2, Some(&b2), DType::F32, false)),
        )?;
    }
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 64, 64, 40), &dev)?)?;
    let keep = Tensor::new(&[1.25f32, 0., 1.25, 1.25], &dev)?;
    let keep4 = keep.reshape((4, 1, 1, 1))?;
    compare(
        "drop-connect [4, 64, 64, 40]",
        &x,
        Box::new(|x| ops::scale_samples(x, &keep)),
        Box::new(|x| x.broadcast_mul(&keep4)),
    )?;
    Ok(())
}
