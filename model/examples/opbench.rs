//! Development tool: forward + backward timings of the building blocks at D0 512² sizes.
//! Usage: `cargo run --release -p effdet-model --example opbench`

use candle_core::{Device, Result, Tensor, Var};
use effdet_model::ops::{self, Activation};
use std::time::Instant;

fn time(name: &str, inputs: &[&Var], f: impl Fn() -> Result<Tensor>) -> Result<()> {
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let t0 = Instant::now();
        let y = f()?;
        // A weighted sum gives the op a contiguous upstream gradient, as in the network.
        let r = Tensor::ones(y.dims(), y.dtype(), y.device())?;
        let loss = (y * r)?.sum_all()?;
        let t1 = Instant::now();
        let g = loss.backward()?;
        let t2 = Instant::now();
        assert!(inputs.iter().all(|v| g.get(v).is_some()));
        best.0 = best.0.min((t1 - t0).as_secs_f64());
        best.1 = best.1.min((t2 - t1).as_secs_f64());
    }
    println!(
        "{name:48} fwd {:7.1} ms  bwd {:7.1} ms",
        best.0 * 1e3,
        best.1 * 1e3
    );
    Ok(())
}

fn var(dims: &[usize]) -> Result<Var> {
    Var::from_tensor(&Tensor::randn(0f32, 1f32, dims, &Device::Cpu)?)
}

fn main() -> Result<()> {
    let img = var(&[2, 3, 512, 512])?;
    let stem_w = var(&[32, 3, 3, 3])?;
    time("stem conv2d (candle) 3->32 s2", &[&img, &stem_w], || {
        let x = img
            .as_tensor()
            .pad_with_zeros(2, 0, 1)?
            .pad_with_zeros(3, 0, 1)?;
        x.conv2d(&stem_w, 0, 2, 1, 1)?
            .permute((0, 2, 3, 1))?
            .contiguous()
    })?;
    let x = var(&[2, 256, 256, 96])?;
    let dw = var(&[3, 3, 96])?;
    time("depthwise 3x3 s2 96ch @256", &[&x, &dw], || {
        ops::depthwise_conv2d(&x, &dw, 2)
    })?;
    let x16 = var(&[2, 256, 256, 16])?;
    let w = var(&[16, 96])?;
    time("1x1 matmul 16->96 @256", &[&x16, &w], || {
        x16.as_tensor()
            .reshape((2 * 256 * 256, 16))?
            .matmul(&w)?
            .reshape((2, 256, 256, 96))
    })?;
    let g = var(&[96])?;
    let b = var(&[96])?;
    time("bn train + swish 96ch @256", &[&x, &g, &b], || {
        Ok(ops::batch_norm_train(&x, &g, &b, 1e-3, Activation::Swish)?.0)
    })?;
    let x128 = var(&[2, 128, 128, 144])?;
    let gate = var(&[2, 1, 1, 144])?;
    time("SE gate broadcast_mul 144ch @128", &[&x128, &gate], || {
        x128.as_tensor().broadcast_mul(&gate)
    })?;
    let gate2 = var(&[2, 144])?;
    time("SE channel_gate op 144ch @128", &[&x128, &gate2], || {
        ops::channel_gate(&x128, &gate2)
    })?;
    time("SE mean over HW 144ch @128", &[&x128], || {
        x128.as_tensor().reshape((2, 128 * 128, 144))?.mean(1)
    })?;
    time("SE spatial_mean op 144ch @128", &[&x128], || {
        ops::spatial_mean(&x128)
    })?;
    let p4 = var(&[2, 32, 32, 64])?;
    time("upsample 2x 64ch 32->64", &[&p4], || {
        ops::upsample_nearest(&p4, 64, 64)
    })?;
    let p3 = var(&[2, 64, 64, 64])?;
    time("max-pool 3x3 s2 64ch @64", &[&p3], || {
        ops::max_pool2d_same(&p3, (3, 3), (2, 2))
    })?;
    time("swish 64ch @64", &[&p3], || ops::swish(&p3))?;
    let bias = var(&[96])?;
    time("bias broadcast_add 96ch @256", &[&x, &bias], || {
        x.as_tensor().broadcast_add(&bias)
    })?;
    time("bias add_channel_bias op 96ch @256", &[&x, &bias], || {
        ops::add_channel_bias(&x, &bias)
    })?;
    let cls = var(&[2, 64, 64, 810])?;
    let tgt = Tensor::full(-1i64, (2, 64, 64, 9), &Device::Cpu)?;
    let p = ops::FocalParams {
        alpha: 0.25,
        gamma: 1.5,
        label_smoothing: 0.0,
    };
    time("focal loss P3 810ch @64", &[&cls], || {
        ops::focal_loss_sum(&cls, &tgt, p)
    })?;
    Ok(())
}
