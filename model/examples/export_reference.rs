//! Development tool: writes everything needed to cross-check this implementation against
//! automl's Keras EfficientDet with identical weights — initial weights, a fixed input, eval-
//! and train-mode outputs, the loss terms on synthetic targets, every gradient and the
//! running statistics after one training-mode forward.
//! Usage: `cargo run --release -p effdet-model --example export_reference -- OUT_DIR [size]`

use candle_core::{DType, Device, Tensor};
use effdet_model::{config::Config, feature_sizes, loss::detection_loss, EfficientDet, ModelVars};
use std::collections::HashMap;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = std::path::PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: export_reference OUT_DIR [size]"))?,
    );
    let size: usize = args.get(1).map_or(Ok(128), |s| s.parse())?;
    std::fs::create_dir_all(&out)?;
    let cfg = Config::builtin("efficientdet-d0")?;
    let dev = Device::Cpu;
    let vars = ModelVars::new(&dev, 123);
    let model = EfficientDet::new(&cfg, &vars)?;
    // Make BN statistics and affine parameters non-trivial so eval mode is a real test.
    for (i, (_, v)) in vars.bn_stats().into_iter().enumerate() {
        let base = Tensor::rand(0f32, 1f32, v.dims(), &dev)?;
        let val = if i % 2 == 0 {
            (base - 0.5)? * 0.2
        } else {
            (base * 0.5)? + 0.75
        };
        v.set(&val?)?;
    }
    for (name, v) in vars.trainable() {
        if name.ends_with(".gamma") {
            v.set(&(Tensor::rand(0f32, 1f32, v.dims(), &dev)?.affine(0.5, 0.75)?))?;
        } else if name.ends_with(".beta") || name.ends_with(".fusion") {
            let r = Tensor::rand(0f32, 1f32, v.dims(), &dev)?;
            let r = if name.ends_with(".beta") {
                ((r - 0.5)? * 0.2)?
            } else {
                (r + 0.5)?
            };
            v.set(&r)?;
        }
    }
    vars.save(out.join("weights.safetensors"))?;

    let b = 2;
    let images = (Tensor::randn(0f32, 1f32, (b, 3, size, size), &dev)?).contiguous()?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("images".into(), images.clone());
    let (cls_e, box_e) = model.forward(&images, false)?;
    for (l, (c, bx)) in cls_e.iter().zip(&box_e).enumerate() {
        t.insert(format!("eval.cls.{l}"), c.clone());
        t.insert(format!("eval.box.{l}"), bx.clone());
    }
    // Synthetic targets: ~5% positives with random classes and box targets, some ignored.
    let mut cls_t = Vec::new();
    let mut box_t = Vec::new();
    for (l, (h, w)) in feature_sizes(&cfg, size, size).into_iter().enumerate() {
        let u = Tensor::rand(0f32, 1f32, (b, h, w, 9), &dev)?;
        let cls_id =
            (Tensor::rand(0f32, 90f32, (b, h, w, 9), &dev)?.floor()?).to_dtype(DType::I64)?;
        let pos = u.ge(0.95)?;
        let ign = u.lt(0.02)?;
        let ids = pos.where_cond(
            &cls_id,
            &ign.where_cond(
                &Tensor::full(-2i64, (b, h, w, 9), &dev)?,
                &Tensor::full(-1i64, (b, h, w, 9), &dev)?,
            )?,
        )?;
        let posf = pos
            .to_dtype(DType::F32)?
            .reshape((b, h, w, 9, 1))?
            .broadcast_as((b, h, w, 9, 4))?
            .reshape((b, h, w, 36))?;
        let bt = (Tensor::randn(0f32, 0.3f32, (b, h, w, 36), &dev)? * posf)?;
        t.insert(format!("target.cls.{l}"), ids.clone());
        t.insert(format!("target.box.{l}"), bt.clone());
        cls_t.push(ids);
        box_t.push(bt);
    }
    let num_pos = cls_t
        .iter()
        .map(|c| c.ge(0i64)?.to_dtype(DType::F32)?.sum((1, 2, 3)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let num_pos = Tensor::stack(&num_pos, 0)?.sum(0)?;
    t.insert("num_positives".into(), num_pos.clone());
    let (cls, boxes) = model.forward(&images, true)?;
    for (l, (c, bx)) in cls.iter().zip(&boxes).enumerate() {
        t.insert(format!("train.cls.{l}"), c.clone());
        t.insert(format!("train.box.{l}"), bx.clone());
    }
    let parts = detection_loss(
        &cls,
        &boxes,
        &cls_t,
        &box_t,
        &num_pos,
        &model.l2_kernels(),
        &cfg.loss,
    )?;
    t.insert("loss.total".into(), parts.total.clone());
    t.insert("loss.cls".into(), parts.cls.clone());
    t.insert("loss.box".into(), parts.box_loss.clone());
    t.insert("loss.reg".into(), parts.reg.clone());
    let grads = parts.total.backward()?;
    for (name, v) in vars.trainable() {
        if let Some(g) = grads.get(&v) {
            t.insert(format!("grad.{name}"), g.clone());
        }
    }
    for (name, v) in vars.bn_stats() {
        t.insert(format!("after.{name}"), v.as_tensor().clone());
    }
    candle_core::safetensors::save(&t, out.join("reference.safetensors"))?;
    println!("wrote {} tensors to {}", t.len(), out.display());
    Ok(())
}
