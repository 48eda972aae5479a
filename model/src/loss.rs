//! The detection loss exactly as automl's TF2 trainer computes it (`tf2/train_lib.py`):
//!
//! - class: sigmoid focal loss (α, γ) against one-hot targets built from class ids (−1 →
//!   all-zero row; −2 → anchor ignored), summed and divided by the normalizer;
//! - box: Huber(δ) on the regression outputs where the target is non-zero, summed and
//!   divided by 4 · normalizer;
//! - normalizer = Σ over the batch of positive anchors + 1;
//! - reg: weight_decay · Σ ‖kernel‖² / 2 (TF `l2_loss`) over conv kernels;
//! - total = cls + box_loss_weight · box + reg.

use crate::config::LossConfig;
use crate::ops::{self, FocalParams};
use candle_core::{DType, Result, Tensor};

/// The loss terms (scalars). `total` is what to differentiate.
#[derive(Clone, Debug)]
pub struct LossParts {
    /// cls + box_loss_weight · box + reg.
    pub total: Tensor,
    /// Normalized focal loss.
    pub cls: Tensor,
    /// Normalized Huber box loss (before `box_loss_weight`).
    pub box_loss: Tensor,
    /// L2 regularization (already multiplied by the weight decay).
    pub reg: Tensor,
}

/// Computes [`LossParts`]. Per level `l`: `cls_out[l]` `[B, h, w, A·K]`, `box_out[l]`
/// `[B, h, w, A·4]`, `cls_targets[l]` `[B, h, w, A]` (integer class ids), `box_targets[l]`
/// `[B, h, w, A·4]`; `num_positives` `[B]` (any numeric dtype); `l2_kernels` from
/// [`crate::EfficientDet::l2_kernels`] (pass `&[]` to leave regularization out).
pub fn detection_loss(
    cls_out: &[Tensor],
    box_out: &[Tensor],
    cls_targets: &[Tensor],
    box_targets: &[Tensor],
    num_positives: &Tensor,
    l2_kernels: &[Tensor],
    cfg: &LossConfig,
) -> Result<LossParts> {
    let n = level_count(cls_out, box_out, cls_targets, box_targets)?;
    let dtype = cls_out[0].dtype();
    let normalizer = (num_positives.to_dtype(dtype)?.sum_all()? + 1.0)?;
    let params = FocalParams {
        alpha: cfg.alpha,
        gamma: cfg.gamma,
        label_smoothing: cfg.label_smoothing,
    };

    let mut cls_sum: Option<Tensor> = None;
    let mut box_sum: Option<Tensor> = None;
    for l in 0..n {
        let c = ops::focal_loss_sum(&cls_out[l], &cls_targets[l], params)
            .map_err(|e| candle_core::Error::Msg(format!("level {l}: {e}")))?;
        cls_sum = Some(match cls_sum {
            Some(s) => (s + c)?,
            None => c,
        });
        let b = huber_sum(&box_out[l], &box_targets[l].to_dtype(dtype)?, cfg.delta)
            .map_err(|e| candle_core::Error::Msg(format!("level {l}: {e}")))?;
        box_sum = Some(match box_sum {
            Some(s) => (s + b)?,
            None => b,
        });
    }
    let zero = || Tensor::zeros((), dtype, normalizer.device());
    let cls = cls_sum.map_or_else(zero, Ok)?.div(&normalizer)?;
    let box_loss = box_sum.map_or_else(zero, Ok)?.div(&(&normalizer * 4.0)?)?;
    let reg = l2_regularization(l2_kernels, cfg.weight_decay, dtype, normalizer.device())?;
    let total = ((&cls + (&box_loss * cfg.box_loss_weight)?)? + &reg)?;
    Ok(LossParts {
        total,
        cls,
        box_loss,
        reg,
    })
}

/// Σ Huber(pred − target) over entries whose target is non-zero (Keras Huber: ½d² for |d| ≤ δ,
/// δ·|d| − ½δ² beyond).
/// Gradients of `upstream · total` (the total of [`detection_loss`] on the same inputs) with
/// respect to the class outputs, the box outputs and the L2 kernels, written out rather than
/// back-propagated (the tape path differentiates the network only):
/// - class level l: the focal gradient times `upstream / normalizer`;
/// - box level l: `clamp(pred − target, −δ, δ)` where the target is non-zero, times
///   `upstream · box_loss_weight / (4 · normalizer)` (Huber's derivative);
/// - kernel k: `2 · k · upstream · weight_decay / 2`.
///
/// Each scalar factor is rounded to the outputs' dtype in the order candle's backward pass
/// forms it, so the results match [`detection_loss`]'s gradients to float rounding.
#[allow(clippy::too_many_arguments)]
pub fn detection_loss_grads(
    cls_out: &[Tensor],
    box_out: &[Tensor],
    cls_targets: &[Tensor],
    box_targets: &[Tensor],
    num_positives: &Tensor,
    l2_kernels: &[Tensor],
    cfg: &LossConfig,
    upstream: f64,
) -> Result<LossGrads> {
    let n = level_count(cls_out, box_out, cls_targets, box_targets)?;
    let dtype = cls_out[0].dtype();
    let dev = num_positives.device();
    let normalizer = (num_positives.to_dtype(dtype)?.sum_all()? + 1.0)?;
    let up = Tensor::new(upstream, dev)?.to_dtype(dtype)?;
    let params = FocalParams {
        alpha: cfg.alpha,
        gamma: cfg.gamma,
        label_smoothing: cfg.label_smoothing,
    };
    let cls_scale = up.div(&normalizer)?;
    let box_scale = (&up * cfg.box_loss_weight)?.div(&(&normalizer * 4.0)?)?;
    let mut cls = Vec::with_capacity(n);
    let mut boxes = Vec::with_capacity(n);
    for l in 0..n {
        cls.push(ops::focal_loss_grad(
            &cls_out[l],
            &cls_targets[l],
            params,
            &cls_scale,
        )?);
        let (p, t) = (box_out[l].detach(), box_targets[l].to_dtype(dtype)?);
        if p.dims() != t.dims() {
            candle_core::bail!("box loss: outputs {:?} vs targets {:?}", p.dims(), t.dims());
        }
        let mask = t.ne(0.0)?.to_dtype(dtype)?;
        let d = (&p - &t)?.clamp(-cfg.delta, cfg.delta)?;
        boxes.push((d * mask)?.broadcast_mul(&box_scale)?);
    }
    let reg_scale = (&up * (cfg.weight_decay / 2.0))?;
    let kernels = l2_kernels
        .iter()
        .map(|k| k.detach().to_dtype(dtype)?.broadcast_mul(&reg_scale)? * 2.0)
        .collect::<Result<Vec<_>>>()?;
    Ok(LossGrads {
        cls,
        boxes,
        kernels,
    })
}

/// Gradients of `upstream · total` for every variable of a recorded forward: the tape is seeded
/// with [`detection_loss_grads`]'s output gradients and the weight-decay gradients are added to
/// the kernels'. Keys are the variables' tensor ids.
#[allow(clippy::too_many_arguments)]
pub fn tape_gradients(
    tape: crate::tape::Tape,
    cls_out: &[Tensor],
    box_out: &[Tensor],
    cls_targets: &[Tensor],
    box_targets: &[Tensor],
    num_positives: &Tensor,
    l2_kernels: &[Tensor],
    cfg: &LossConfig,
    upstream: f64,
) -> Result<std::collections::HashMap<candle_core::TensorId, Tensor>> {
    let lg = crate::tape::profile_section("loss gradient", crate::tape::Phase::Backward, || {
        detection_loss_grads(
            cls_out,
            box_out,
            cls_targets,
            box_targets,
            num_positives,
            l2_kernels,
            cfg,
            upstream,
        )
    })?;
    let seeds = cls_out
        .iter()
        .zip(lg.cls)
        .chain(box_out.iter().zip(lg.boxes))
        .map(|(t, g)| (t.id(), g))
        .collect();
    let mut grads = tape.backward(seeds)?;
    for (k, g) in l2_kernels.iter().zip(lg.kernels) {
        let sum = match grads.remove(&k.id()) {
            Some(t) => (t + g)?,
            None => g,
        };
        grads.insert(k.id(), sum);
    }
    Ok(grads)
}

/// The number of pyramid levels, the same for outputs and targets.
fn level_count(
    cls_out: &[Tensor],
    box_out: &[Tensor],
    cls_targets: &[Tensor],
    box_targets: &[Tensor],
) -> Result<usize> {
    let n = cls_out.len();
    if n == 0 || box_out.len() != n || cls_targets.len() != n || box_targets.len() != n {
        candle_core::bail!(
            "detection_loss: level counts differ (cls {n}, box {}, cls targets {}, box targets {})",
            box_out.len(),
            cls_targets.len(),
            box_targets.len()
        );
    }
    Ok(n)
}

/// What [`detection_loss_grads`] returns, per level and per kernel.
#[derive(Clone, Debug)]
pub struct LossGrads {
    pub cls: Vec<Tensor>,
    pub boxes: Vec<Tensor>,
    pub kernels: Vec<Tensor>,
}

pub fn huber_sum(pred: &Tensor, target: &Tensor, delta: f64) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        candle_core::bail!(
            "box loss: outputs {:?} vs targets {:?}",
            pred.dims(),
            target.dims()
        );
    }
    let mask = target.ne(0.0)?.to_dtype(pred.dtype())?;
    let d = (pred - target)?.abs()?;
    let quad = d.minimum(delta)?;
    let lin = (&d - &quad)?;
    let h = ((quad.sqr()? * 0.5)? + (lin * delta)?)?;
    (h * mask)?.sum_all()
}

/// weight_decay · Σ_k ‖k‖² / 2.
pub fn l2_regularization(
    kernels: &[Tensor],
    weight_decay: f64,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let mut acc = Tensor::zeros((), dtype, dev)?;
    for k in kernels {
        acc = (acc + k.to_dtype(dtype)?.sqr()?.sum_all()?)?;
    }
    acc * (weight_decay / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg() -> LossConfig {
        LossConfig {
            alpha: 0.25,
            gamma: 1.5,
            label_smoothing: 0.0,
            delta: 0.1,
            box_loss_weight: 50.0,
            weight_decay: 4e-5,
        }
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn huber_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        // d = pred − target: 0.05 (quadratic), −0.5 (linear), target 0 (masked), 0.1 (edge).
        let pred = Tensor::new(&[0.15f64, -0.3, 7.0, 0.3], &dev)?;
        let tgt = Tensor::new(&[0.1f64, 0.2, 0.0, 0.2], &dev)?;
        let got = huber_sum(&pred, &tgt, 0.1)?.to_scalar::<f64>()?;
        let want = 0.5 * 0.05f64 * 0.05 + (0.1 * 0.5 - 0.5 * 0.01) + 0.5 * 0.01;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn regularization_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let k = [
            Tensor::new(&[1f32, 2.], &dev)?,
            Tensor::new(&[[3f32]], &dev)?,
        ];
        let r = l2_regularization(&k, 4e-5, DType::F32, &dev)?.to_scalar::<f32>()?;
        assert!((r - 4e-5 * 14.0 / 2.0).abs() < 1e-10, "{r}");
        Ok(())
    }

    #[test]
    fn all_terms_by_hand_over_two_levels() -> Result<()> {
        let dev = Device::Cpu;
        // Two levels, batch 2, 1×1 maps, 1 anchor, 2 classes.
        let cls0 = Tensor::new(&[0.0f64, 1.0, -2.0, 0.5], &dev)?.reshape((2, 1, 1, 2))?;
        let cls1 = Tensor::new(&[3.0f64, -1.0, 0.0, 0.0], &dev)?.reshape((2, 1, 1, 2))?;
        let t0 = Tensor::new(&[1i64, -1], &dev)?.reshape((2, 1, 1, 1))?;
        let t1 = Tensor::new(&[0i64, -2], &dev)?.reshape((2, 1, 1, 1))?;
        let box0 = Tensor::new(&[0.1f64, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], &dev)?
            .reshape((2, 1, 1, 4))?;
        let bt0 = Tensor::new(&[0.3f64, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0, 0.0], &dev)?
            .reshape((2, 1, 1, 4))?;
        let box1 = Tensor::new(&[1.0f64, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], &dev)?
            .reshape((2, 1, 1, 4))?;
        let bt1 = Tensor::zeros((2, 1, 1, 4), DType::F64, &dev)?;
        let num_pos = Tensor::new(&[1f32, 1.0], &dev)?; // normalizer 3
        let kernel = Tensor::new(&[2f64], &dev)?;
        let parts = detection_loss(
            &[cls0, cls1],
            &[box0, box1],
            &[t0, t1],
            &[bt0, bt1],
            &num_pos,
            &[kernel],
            &cfg(),
        )?;

        let pos = |x: f64| 0.25 * (1.0 - sigmoid(x)).powf(1.5) * -sigmoid(x).ln();
        let neg = |x: f64| 0.75 * sigmoid(x).powf(1.5) * -(1.0 - sigmoid(x)).ln();
        // Level 0: image 0 class 1 positive; image 1 background. Level 1: image 0 class 0
        // positive; image 1 ignored.
        let focal = neg(0.0) + pos(1.0) + neg(-2.0) + neg(0.5) + pos(3.0) + neg(-1.0);
        let cls = focal / 3.0;
        // Box: level 0 entries with targets 0.3 (d = −0.2, linear) and 0.05 (d = −0.05,
        // quadratic); level 1 has no non-zero targets.
        let huber = (0.1 * 0.2 - 0.5 * 0.01) + 0.5 * 0.05f64 * 0.05;
        let box_loss = huber / 12.0;
        let reg = 4e-5 * 4.0 / 2.0;
        let check = |t: &Tensor, want: f64| -> Result<()> {
            let got = t.to_scalar::<f64>()?;
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
            Ok(())
        };
        check(&parts.cls, cls)?;
        check(&parts.box_loss, box_loss)?;
        check(&parts.reg, reg)?;
        check(&parts.total, cls + 50.0 * box_loss + reg)?;
        Ok(())
    }

    #[test]
    fn mismatched_inputs_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::zeros((1, 2, 2, 18), DType::F32, &dev)?;
        let b = Tensor::zeros((1, 2, 2, 36), DType::F32, &dev)?;
        let t = Tensor::zeros((1, 2, 2, 9), DType::I64, &dev)?;
        let np = Tensor::zeros(1, DType::F32, &dev)?;
        assert!(detection_loss(
            std::slice::from_ref(&c),
            std::slice::from_ref(&b),
            std::slice::from_ref(&t),
            &[],
            &np,
            &[],
            &cfg()
        )
        .is_err());
        let wrong = Tensor::zeros((1, 2, 2, 8), DType::I64, &dev)?;
        assert!(detection_loss(
            std::slice::from_ref(&c),
            std::slice::from_ref(&b),
            &[wrong],
            std::slice::from_ref(&b),
            &np,
            &[],
            &cfg()
        )
        .is_err());
        let bad_box = Tensor::zeros((1, 2, 2, 35), DType::F32, &dev)?;
        assert!(detection_loss(&[c], &[b], &[t], &[bad_box], &np, &[], &cfg()).is_err());
        Ok(())
    }
}
