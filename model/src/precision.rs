//! Mixed-precision policy of the network, in the style of PyTorch AMP: the matrix products and
//! the regular convolutions (1×1 convolutions, SE projections, the pointwise half of separable
//! convolutions, the stem convolution) run in a 16-bit compute type, and the activations
//! between layers are *stored* in that type too (half the memory traffic of every elementwise
//! pass). The own ops (batch norm, depthwise convolution, swish, pooling, bias, gate) read
//! 16-bit activations, compute in f32 and round once when they store; batch-norm statistics
//! are f64. The weights are always f32 variables ("master weights"): each product casts its
//! weight to the compute type, the own ops take f32 parameters directly and return f32
//! parameter gradients, and since candle differentiates through `to_dtype`, every gradient
//! reaches its variable in f32. The network's outputs are cast back to f32, so the losses are
//! f32 as in automl.
//!
//! fp16 gradients can overflow or underflow; pair [`Precision::F16`] with
//! [`crate::optim::DynamicLossScaler`]. bf16 has f32's exponent range and needs no scaling.
//!
//! The policy is set per network with [`crate::EfficientDet::new_with_precision`] or
//! [`crate::EfficientDet::set_precision`] and stored in the layers that own a product
//! ([`crate::layers::Conv1x1`], [`crate::layers::StemConv`]). candle's CPU backend has fp16
//! and bf16 matmul and fp16 convolution but no bf16 convolution; on the CPU that one case is
//! emulated ([`Precision::autocast_conv`]).
//!
//! The weights are cast on every forward (PyTorch caches the casts within an autocast
//! region); the cost is one elementwise pass over each weight, small next to the products.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Compute precision of the matrix products and convolutions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in f32 (no casts at all).
    #[default]
    #[serde(rename = "fp32")]
    F32,
    /// IEEE half precision products (use with loss scaling).
    #[serde(rename = "fp16")]
    F16,
    /// bfloat16 products.
    #[serde(rename = "bf16")]
    Bf16,
}

impl Precision {
    /// Every precision, in the order of its names.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Bf16];

    /// The dtype the autocast products run in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// The command-line / config name: "fp32", "fp16" or "bf16".
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::F16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether this precision needs loss scaling to keep small gradients from flushing to
    /// zero (only fp16: its exponent range is far narrower than f32's).
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::F16
    }

    /// `t` in the activations' storage type: the compute type under mixed precision; for F32
    /// `t` untouched (whatever its dtype, so f64 tests stay f64).
    pub fn store_activations(self, t: &Tensor) -> Result<Tensor> {
        match self {
            Precision::F32 => Ok(t.clone()),
            p => t.to_dtype(p.compute_dtype()),
        }
    }

    /// Runs the binary product `f` (a matmul or convolution) under autocast: for F32 it is
    /// `f(a, b)` untouched (bit-identical to not using autocast at all); otherwise `a` and `b`
    /// are cast to [`Self::compute_dtype`] and the result is cast back to `a`'s dtype.
    pub fn autocast2<F>(self, a: &Tensor, b: &Tensor, f: F) -> Result<Tensor>
    where
        F: FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
    {
        let dt = self.compute_dtype();
        if self == Precision::F32 || (a.dtype() == dt && b.dtype() == dt) {
            return f(a, b);
        }
        f(&a.to_dtype(dt)?, &b.to_dtype(dt)?)?.to_dtype(a.dtype())
    }

    /// [`Self::autocast2`] for a convolution `f`. candle's CPU convolution has no bf16
    /// kernel, so on the CPU bf16 is emulated: inputs and result are rounded to bf16 and
    /// the convolution itself runs in f32, i.e. bf16 operands with f32 accumulation, which
    /// is also what candle's bf16 CPU matmul and the GPU kernels do.
    pub fn autocast_conv<F>(self, x: &Tensor, w: &Tensor, f: F) -> Result<Tensor>
    where
        F: FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
    {
        if self != Precision::Bf16 || !x.device().is_cpu() || x.dtype() != DType::F32 {
            return self.autocast2(x, w, f);
        }
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        round(&f(&round(x)?, &round(w)?)?)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parse error for [`Precision`]: the rejected text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision {0:?} (expected one of: fp32, fp16, bf16)")]
pub struct ParsePrecisionError(pub String);

impl FromStr for Precision {
    type Err = ParsePrecisionError;

    /// Accepts exactly the names of [`Precision::name`] (ASCII case-insensitive).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParsePrecisionError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::efficientdet::{feature_sizes, EfficientDet};
    use crate::layers::{Conv1x1, StemConv};
    use crate::loss::detection_loss;
    use crate::ops::fd::rand_tensor;
    use crate::optim::DynamicLossScaler;
    use crate::vars::{Init, ModelVars};
    use candle_core::Device;

    /// `‖a − b‖ / ‖b − mean(b)‖`: error relative to the spread of the f32 reference (a
    /// constant offset such as the class prior bias would hide errors in a plain relative
    /// norm).
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a: Vec<f64> = a.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let b: Vec<f64> = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let mean = b.iter().sum::<f64>() / b.len() as f64;
        let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = b.iter().map(|y| (y - mean) * (y - mean)).sum();
        Ok((num / den.max(1e-300)).sqrt())
    }

    #[test]
    fn layers_autocast_close_to_f32() -> Result<()> {
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 21);
        let mut conv = Conv1x1::new(&vars, "c", 64, 32, true, Init::glorot_uniform(64, 32))?;
        let mut stem = StemConv::new(&vars, "stem", 32)?;
        let x = rand_tensor(&[2, 5, 7, 64], 22)?.to_dtype(DType::F32)?;
        let img = rand_tensor(&[2, 3, 17, 16], 23)?.to_dtype(DType::F32)?;
        let (y32, s32) = (conv.forward(&x)?, stem.forward(&img)?);
        for (p, tol) in [(Precision::F16, 2e-3), (Precision::Bf16, 1.5e-2)] {
            conv.set_precision(p);
            stem.set_precision(p);
            let (y, s) = (conv.forward(&x)?, stem.forward(&img)?);
            // A 1×1 product returns its input's dtype; the stem stores the activations in the
            // compute type from there on.
            assert_eq!((y.dtype(), s.dtype()), (DType::F32, p.compute_dtype()));
            let (ey, es) = (rel_err(&y, &y32)?, rel_err(&s, &s32)?);
            eprintln!("{p}: conv1x1 rel err {ey:.2e}, stem {es:.2e}");
            // Rounded inputs: different from f32, but only by the compute type's precision.
            assert!(ey > 0.0 && ey < tol, "{p} conv1x1 {ey}");
            assert!(es > 0.0 && es < tol, "{p} stem {es}");
        }
        conv.set_precision(Precision::F32);
        stem.set_precision(Precision::F32);
        assert_eq!(
            conv.forward(&x)?.flatten_all()?.to_vec1::<f32>()?,
            y32.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(
            stem.forward(&img)?.flatten_all()?.to_vec1::<f32>()?,
            s32.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    fn d0() -> Config {
        Config::builtin("efficientdet-d0").unwrap()
    }

    fn flat(ts: &[Tensor]) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        for t in ts {
            v.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(v)
    }

    #[test]
    fn d0_forward_in_fp16_and_bf16_is_close_to_f32() -> Result<()> {
        let cfg = d0();
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 31);
        let mut model = EfficientDet::new(&cfg, &vars)?;
        // Training mode: batch statistics keep every layer's activations O(1) (at
        // initialization the eval-mode heads see near-zero inputs and the class logits are
        // the prior bias alone), and the output does not depend on the running averages that
        // each training forward moves. 128×128 so the 2×2 top level still gives each batch
        // norm 8 values; at 64×64 (1×1 top level) the outputs are much more sensitive.
        //
        // The freshly initialized network amplifies any perturbation: in f32, adding noise of
        // amplitude 1e-3 to the image moves these outputs by 1.6e-2..3.1e-2 (relative to
        // their spread). With every activation stored in the 16-bit type, fp16 moves them by
        // 1.6e-2..4.1e-2, bf16 (8× coarser) by 1.0e-1..2.2e-1, hence the bounds. (Before the
        // prediction layers added their bias in f32, the class logits of the 2×2 level, all
        // near the prior bias −4.6, lost their small spread to f16 rounding: error 0.5.)
        let x = rand_tensor(&[2, 3, 128, 128], 32)?.to_dtype(DType::F32)?;
        let (c32, b32) = model.forward(&x, true)?;
        for (p, tol) in [(Precision::F16, 6e-2), (Precision::Bf16, 0.3)] {
            model.set_precision(p);
            assert_eq!(model.precision(), p);
            let (c, b) = model.forward(&x, true)?;
            let mut worst = 0.0f64;
            for (got, want, what) in [(&c, &c32, "class"), (&b, &b32, "box")] {
                for (l, (g, w)) in got.iter().zip(want).enumerate() {
                    assert_eq!(g.dtype(), DType::F32);
                    let e = rel_err(g, w)?;
                    assert!(e > 0.0 && e < tol, "{p} {what} level {}: {e}", l + 3);
                    worst = worst.max(e);
                }
            }
            eprintln!("{p}: worst output rel err {worst:.2e}");
        }
        // Back to f32: bit-identical to the first forward and to a model built with `new`.
        model.set_precision(Precision::F32);
        let (c, b) = model.forward(&x, true)?;
        assert_eq!(flat(&c)?, flat(&c32)?);
        assert_eq!(flat(&b)?, flat(&b32)?);
        let same = EfficientDet::new_with_precision(&cfg, &vars, Precision::F32)?;
        let (c, b) = same.forward(&x, true)?;
        assert_eq!(flat(&c)?, flat(&c32)?);
        assert_eq!(flat(&b)?, flat(&b32)?);
        Ok(())
    }

    #[test]
    fn layer_gradients_under_fp16_are_f32_and_close() -> Result<()> {
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 51);
        let mut stem = StemConv::new(&vars, "stem", 16)?;
        let mut conv = Conv1x1::new(&vars, "c", 16, 8, true, Init::glorot_uniform(16, 8))?;
        let img =
            candle_core::Var::from_tensor(&rand_tensor(&[2, 3, 9, 10], 52)?.to_dtype(DType::F32)?)?;
        let r = rand_tensor(&[2, 5, 5, 8], 53)?.to_dtype(DType::F32)?;
        let mut grads = Vec::new();
        for p in [Precision::F32, Precision::F16] {
            stem.set_precision(p);
            conv.set_precision(p);
            let out = conv.forward(&stem.forward(&img)?)?;
            let loss = (out.to_dtype(DType::F32)? * &r)?.sum_all()?;
            let g = loss.backward()?;
            let of = |t: &Tensor| -> Result<Tensor> {
                g.get(t)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
            };
            grads.push([of(&stem.weight)?, of(&conv.weight)?, of(img.as_tensor())?]);
        }
        for (k, what) in ["stem weight", "conv weight", "image"].iter().enumerate() {
            let (a, b) = (&grads[1][k], &grads[0][k]);
            assert_eq!(a.dtype(), DType::F32, "{what}");
            let e = rel_err(a, b)?;
            eprintln!("fp16 layer gradient of {what}: rel err {e:.2e}");
            assert!(e > 0.0 && e < 3e-3, "{what}: {e}");
        }
        Ok(())
    }

    /// Detection loss of `model` on a fixed batch with synthetic targets (~3% positives).
    fn loss_on_fixed_batch(
        model: &EfficientDet,
        cfg: &Config,
        x: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (cls_t, box_t, num_pos) = fixed_targets(cfg, x)?;
        let (cls, boxes) = model.forward(x, train)?;
        let parts = detection_loss(
            &cls,
            &boxes,
            &cls_t,
            &box_t,
            &num_pos,
            &model.l2_kernels(),
            &cfg.loss,
        )?;
        Ok(parts.total)
    }

    /// Synthetic targets for images `x` (~3% positive anchors, fixed seed).
    #[allow(clippy::type_complexity)]
    fn fixed_targets(cfg: &Config, x: &Tensor) -> Result<(Vec<Tensor>, Vec<Tensor>, Tensor)> {
        use rand::{Rng, SeedableRng};
        let dev = x.device();
        let (b, _, h, w) = x.dims4()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(40);
        let (mut cls_t, mut box_t) = (Vec::new(), Vec::new());
        let mut positives = vec![0f32; b];
        for (fh, fw) in feature_sizes(cfg, h, w) {
            let n = fh * fw * 9;
            let mut ids = vec![-1i64; b * n];
            let mut bx = vec![0f32; b * n * 4];
            for (i, id) in ids.iter_mut().enumerate() {
                if rng.gen::<f32>() < 0.03 {
                    *id = rng.gen_range(0..90);
                    positives[i / n] += 1.0;
                    for k in 0..4 {
                        bx[i * 4 + k] = rng.gen_range(-0.5..0.5);
                    }
                }
            }
            cls_t.push(Tensor::from_vec(ids, (b, fh, fw, 9), dev)?);
            box_t.push(Tensor::from_vec(bx, (b, fh, fw, 36), dev)?);
        }
        let num_pos = Tensor::from_vec(positives, b, dev)?;
        Ok((cls_t, box_t, num_pos))
    }

    /// The tape's gradients (forward recorded, loss differentiated by hand) for every
    /// trainable variable, failing on a missing one; and the loss value.
    fn tape_grads(
        vars: &ModelVars,
        model: &EfficientDet,
        cfg: &Config,
        x: &Tensor,
        train: bool,
    ) -> Result<(f32, Vec<(String, Tensor)>)> {
        let (cls_t, box_t, num_pos) = fixed_targets(cfg, x)?;
        let (cls, boxes, tape) = model.forward_recorded(x, train)?;
        let kernels = model.l2_kernels();
        let parts = detection_loss(&cls, &boxes, &cls_t, &box_t, &num_pos, &kernels, &cfg.loss)?;
        let grads = crate::loss::tape_gradients(
            tape, &cls, &boxes, &cls_t, &box_t, &num_pos, &kernels, &cfg.loss, 1.0,
        )?;
        let named = vars
            .trainable()
            .into_iter()
            .map(|(n, v)| match grads.get(&v.id()) {
                Some(t) => Ok((n, t.clone())),
                None => Err(candle_core::Error::Msg(format!(
                    "tape: no gradient for {n}"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((parts.total.to_scalar::<f32>()?, named))
    }

    #[test]
    fn tape_backward_equals_candle_backward_on_d0() -> Result<()> {
        let mut cfg = d0();
        // Drop-connect draws from the device RNG, which differs between the two runs.
        cfg.backbone.survival_prob = 0.0;
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 61);
        let model = EfficientDet::new(&cfg, &vars)?;
        let x = rand_tensor(&[2, 3, 64, 64], 62)?.to_dtype(DType::F32)?;
        for train in [false, true] {
            let loss = loss_on_fixed_batch(&model, &cfg, &x, train)?;
            let candle = grads_for(&vars, &loss)?;
            let (value, tape) = tape_grads(&vars, &model, &cfg, &x, train)?;
            // Same forward up to the stem (im2col while recording, candle's convolution here).
            let want = loss.to_scalar::<f32>()?;
            assert!(
                (value - want).abs() <= 1e-6 * want.abs(),
                "train {train}: {value} vs {want}"
            );
            let (global, worst, name) = grad_err(&tape, &candle)?;
            eprintln!(
                "tape vs candle, train {train}: global {global:.2e}, worst {worst:.2e} ({name})"
            );
            // Evaluation mode differs only in summation order (≈1e-8). Training-mode batch
            // norm at 64² (8 values per channel at the top level) amplifies that and the stem's
            // ~1e-7 forward difference a thousandfold (observed 4.7e-5 globally, 1.6e-5 at
            // 128²); a wrong rule would be off by O(1).
            let (g_max, w_max) = if train { (1e-4, 3e-4) } else { (1e-7, 1e-6) };
            assert!(
                global < g_max && worst < w_max,
                "train {train}: {global} / {name} {worst}"
            );
        }
        Ok(())
    }

    /// Gradients of every trainable variable for `loss`, failing on a missing one.
    fn grads_for(vars: &ModelVars, loss: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let g = loss.backward()?;
        vars.trainable()
            .into_iter()
            .map(|(n, v)| match g.get(&v) {
                Some(t) => Ok((n, t.detach())),
                None => Err(candle_core::Error::Msg(format!("no gradient for {n}"))),
            })
            .collect()
    }

    /// Global `‖a − b‖ / ‖b‖` over all gradients, and the worst per-tensor ratio among the
    /// tensors holding at least a 1e-6 share of `‖b‖²`.
    fn grad_err(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Result<(f64, f64, String)> {
        let mut per = Vec::new();
        for ((name, x), (_, y)) in a.iter().zip(b) {
            assert_eq!(x.dtype(), DType::F32, "{name}");
            let xv: Vec<f64> = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            let yv: Vec<f64> = y.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            assert!(
                xv.iter().all(|v| v.is_finite()),
                "non-finite gradient of {name}"
            );
            let d: f64 = xv.iter().zip(&yv).map(|(p, q)| (p - q) * (p - q)).sum();
            let n: f64 = yv.iter().map(|q| q * q).sum();
            per.push((d, n, name));
        }
        let num: f64 = per.iter().map(|p| p.0).sum();
        let den: f64 = per.iter().map(|p| p.1).sum();
        let (worst, name) = per
            .iter()
            .filter(|p| p.1 > 1e-6 * den)
            .map(|p| ((p.0 / p.1).sqrt(), p.2.clone()))
            .fold((0.0, String::new()), |w, e| if e.0 > w.0 { e } else { w });
        Ok(((num / den).sqrt(), worst, name))
    }

    #[test]
    fn d0_backward_under_fp16_gives_f32_gradients_close_to_f32() -> Result<()> {
        let cfg = d0();
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 41);
        let mut model = EfficientDet::new(&cfg, &vars)?;
        let x = rand_tensor(&[2, 3, 64, 64], 42)?.to_dtype(DType::F32)?;
        let scaler = DynamicLossScaler::for_precision(Precision::F16);
        // Evaluation-mode batch norm is a fixed affine map, so the gradient is a smooth
        // function of the rounding and f32 is a sharp reference.
        let g32 = grads_for(&vars, &loss_on_fixed_batch(&model, &cfg, &x, false)?)?;
        model.set_precision(Precision::F16);
        let loss = loss_on_fixed_batch(&model, &cfg, &x, false)?;
        let mut g16 = grads_for(&vars, &scaler.scale_loss(&loss)?)?;
        let mut ts: Vec<Tensor> = g16.iter().map(|(_, t)| t.clone()).collect();
        assert!(
            scaler.unscale_and_check(&mut ts)?,
            "fp16 gradients overflowed"
        );
        for ((_, g), t) in g16.iter_mut().zip(ts) {
            *g = t;
        }
        let (global, worst, name) = grad_err(&g16, &g32)?;
        eprintln!(
            "fp16 eval-mode gradients: global rel err {global:.2e}, worst {worst:.2e} ({name})"
        );
        assert!(global > 0.0 && global < 5e-4, "{global}");
        assert!(worst < 1e-2, "{name}: {worst}");

        // Training mode (batch statistics), what training runs. At this size the gradient is
        // badly conditioned in f32 too: an input perturbation of 1e-3 moves it by ~20%, and
        // fp16 rounding moves it by about as much, so only a loose bound is meaningful here.
        model.set_precision(Precision::F32);
        let g32 = grads_for(&vars, &loss_on_fixed_batch(&model, &cfg, &x, true)?)?;
        model.set_precision(Precision::F16);
        let loss = loss_on_fixed_batch(&model, &cfg, &x, true)?;
        let mut g16 = grads_for(&vars, &scaler.scale_loss(&loss)?)?;
        let mut ts: Vec<Tensor> = g16.iter().map(|(_, t)| t.clone()).collect();
        assert!(
            scaler.unscale_and_check(&mut ts)?,
            "fp16 gradients overflowed"
        );
        for ((_, g), t) in g16.iter_mut().zip(ts) {
            *g = t;
        }
        let (global, worst, name) = grad_err(&g16, &g32)?;
        eprintln!(
            "fp16 train-mode gradients: global rel err {global:.2e}, worst {worst:.2e} ({name})"
        );
        assert!(global < 0.35, "{global}");
        Ok(())
    }
}
