//! Mixed-precision ("autocast") policy of the network, in the style of PyTorch AMP: the
//! matrix products and the regular convolutions (1×1 convolutions, SE projections, the
//! pointwise half of separable convolutions, the stem convolution) run in a 16-bit compute
//! type, everything else (batch norm, depthwise convolution, swish, pooling, losses) stays
//! f32. The weights are always f32 variables ("master weights"): each autocast product casts
//! its input and its weight to the compute type, multiplies, and casts the result back, and
//! since candle differentiates through `to_dtype`, gradients arrive in f32.
//!
//! fp16 gradients can overflow or underflow; pair [`Precision::F16`] with
//! [`crate::optim::DynamicLossScaler`]. bf16 has f32's exponent range and needs no scaling.

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
            assert_eq!((y.dtype(), s.dtype()), (DType::F32, DType::F32));
            let (ey, es) = (rel_err(&y, &y32)?, rel_err(&s, &s32)?);
            eprintln!("{p}: conv1x1 rel err {ey:.2e}, stem {es:.2e}");
            // Rounded inputs: different from f32, but only by the compute type's precision.
            assert!(ey > 0.0 && ey < tol, "{p} conv1x1 {ey}");
            assert!(es > 0.0 && es < tol, "{p} stem {es}");
        }
        conv.set_precision(Precision::F32);
        stem.set_precision(Precision::F32);
        assert_eq!(conv.forward(&x)?.to_vec3::<f32>()?, y32.to_vec3::<f32>()?);
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
        let x = rand_tensor(&[1, 3, 64, 64], 32)?.to_dtype(DType::F32)?;
        // Eval mode: the running statistics stay put, so the four forwards see the same model.
        let (c32, b32) = model.forward(&x, false)?;
        for (p, tol) in [(Precision::F16, 5e-3), (Precision::Bf16, 4e-2)] {
            model.set_precision(p);
            assert_eq!(model.precision(), p);
            let (c, b) = model.forward(&x, false)?;
            for (got, want, what) in [(&c, &c32, "class"), (&b, &b32, "box")] {
                for (l, (g, w)) in got.iter().zip(want).enumerate() {
                    assert_eq!(g.dtype(), DType::F32);
                    let e = rel_err(g, w)?;
                    eprintln!("{p}: {what} level {} rel err {e:.2e}", l + 3);
                    assert!(e > 0.0 && e < tol, "{p} {what} level {}: {e}", l + 3);
                }
            }
        }
        // Back to f32: bit-identical to the first forward and to a model built with `new`.
        model.set_precision(Precision::F32);
        let (c, b) = model.forward(&x, false)?;
        assert_eq!(flat(&c)?, flat(&c32)?);
        assert_eq!(flat(&b)?, flat(&b32)?);
        let same = EfficientDet::new_with_precision(&cfg, &vars, Precision::F32)?;
        let (c, b) = same.forward(&x, false)?;
        assert_eq!(flat(&c)?, flat(&c32)?);
        assert_eq!(flat(&b)?, flat(&b32)?);
        Ok(())
    }

    pub(super) fn rel_pub(a: &Tensor, b: &Tensor) -> Result<f64> {
        rel_err(a, b)
    }

    pub(super) fn loss_pub(m: &EfficientDet, c: &Config, x: &Tensor, t: bool) -> Result<Tensor> {
        loss_on_fixed_batch(m, c, x, t)
    }

    /// Detection loss of `model` on a fixed batch with synthetic targets (~3% positives).
    fn loss_on_fixed_batch(
        model: &EfficientDet,
        cfg: &Config,
        x: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
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

    #[test]
    fn d0_backward_under_fp16_gives_f32_gradients_close_to_f32() -> Result<()> {
        let cfg = d0();
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 41);
        let mut model = EfficientDet::new(&cfg, &vars)?;
        // Batch 2 so the 1×1 top level still has two samples for its batch statistics.
        let x = rand_tensor(&[2, 3, 64, 64], 42)?.to_dtype(DType::F32)?;
        let params = vars.trainable();
        let grads_of = |loss: &Tensor| -> Result<Vec<Tensor>> {
            let g = loss.backward()?;
            params
                .iter()
                .map(|(n, v)| {
                    g.get(v)
                        .map(|t| t.detach())
                        .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for {n}")))
                })
                .collect()
        };
        // Training mode uses batch statistics only, so updating the running averages between
        // the two passes changes nothing.
        let g32 = grads_of(&loss_on_fixed_batch(&model, &cfg, &x, true)?)?;
        model.set_precision(Precision::F16);
        let scaler = DynamicLossScaler::for_precision(Precision::F16);
        let loss16 = loss_on_fixed_batch(&model, &cfg, &x, true)?;
        let mut g16 = grads_of(&scaler.scale_loss(&loss16)?)?;
        assert!(scaler.unscale_and_check(&mut g16)?, "fp16 gradients overflowed");
        // (squared error, squared norm of the f32 gradient) per tensor.
        let mut per = Vec::new();
        for ((name, _), (a, b)) in params.iter().zip(g16.iter().zip(&g32)) {
            assert_eq!(a.dtype(), DType::F32, "{name}");
            let av: Vec<f64> = a.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            let bv: Vec<f64> = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            assert!(av.iter().all(|v| v.is_finite()), "{name}");
            let d: f64 = av.iter().zip(&bv).map(|(x, y)| (x - y) * (x - y)).sum();
            let n: f64 = bv.iter().map(|y| y * y).sum();
            per.push((d, n, name));
        }
        let num: f64 = per.iter().map(|p| p.0).sum();
        let den: f64 = per.iter().map(|p| p.1).sum();
        let global = (num / den).sqrt();
        // Per tensor, among those carrying a visible share of the gradient.
        let worst = per
            .iter()
            .filter(|p| p.1 > 1e-6 * den)
            .map(|p| ((p.0 / p.1).sqrt(), p.2.clone()))
            .fold((0.0f64, String::new()), |w, e| if e.0 > w.0 { e } else { w });
        eprintln!(
            "fp16 gradients: global rel err {global:.2e}, worst tensor {:.2e} ({})",
            worst.0, worst.1
        );
        assert!(global > 0.0 && global < 2e-2, "{global}");
        assert!(worst.0 < 0.1, "{worst:?}");
        Ok(())
    }

    #[test]
    fn names_round_trip_and_bad_names_are_rejected() {
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        assert_eq!("fp16".parse::<Precision>(), Ok(Precision::F16));
        assert_eq!("BF16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        let err = "half".parse::<Precision>().unwrap_err();
        assert!(err.to_string().contains("\"half\""), "{err}");
        assert!("f32".parse::<Precision>().is_err());
        assert_eq!(Precision::default(), Precision::F32);
        assert_eq!(Precision::F16.compute_dtype(), DType::F16);
        assert_eq!(Precision::Bf16.compute_dtype(), DType::BF16);
        assert_eq!(Precision::F32.compute_dtype(), DType::F32);
    }

    #[test]
    fn serde_uses_the_same_names() {
        #[derive(Serialize, Deserialize)]
        struct Wrap {
            p: Precision,
        }
        let s = toml::to_string(&Wrap {
            p: Precision::Bf16,
        })
        .unwrap();
        assert_eq!(s.trim(), "p = \"bf16\"");
        let w: Wrap = toml::from_str("p = \"fp16\"").unwrap();
        assert_eq!(w.p, Precision::F16);
    }

    #[test]
    fn autocast_rounds_inputs_and_returns_the_input_dtype() -> Result<()> {
        let dev = Device::Cpu;
        // 1 + 2^-12 is exact in f32 but rounds to 1 in f16 (10 mantissa bits) and in bf16.
        let a = Tensor::new(&[[1.0f32 + 1.0 / 4096.0]], &dev)?;
        let b = Tensor::new(&[[3.0f32]], &dev)?;
        let exact = Precision::F32.autocast2(&a, &b, |x, y| x.matmul(y))?;
        assert_eq!(exact.to_vec2::<f32>()?[0][0], 3.0 * (1.0 + 1.0 / 4096.0));
        for p in [Precision::F16, Precision::Bf16] {
            let y = p.autocast2(&a, &b, |x, y| {
                assert_eq!(x.dtype(), p.compute_dtype());
                x.matmul(y)
            })?;
            assert_eq!(y.dtype(), DType::F32);
            assert_eq!(y.to_vec2::<f32>()?[0][0], 3.0, "{p}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod diag {
    use super::*;
    use crate::config::Config;
    use crate::efficientdet::EfficientDet;
    use crate::ops::fd::rand_tensor;
    use crate::vars::ModelVars;
    use candle_core::Device;

    #[test]
    fn tmp_grad_diag() -> Result<()> {
        let mut cfg = Config::builtin("efficientdet-d0").unwrap();
        cfg.backbone.batch_norm_momentum = 0.0;
        let dev = Device::Cpu;
        for (b, hw) in [(1, 64), (2, 64)] {
            let vars = ModelVars::new(&dev, 41);
            let mut model = EfficientDet::new(&cfg, &vars)?;
            let x = rand_tensor(&[b, 3, hw, hw], 42)?.to_dtype(DType::F32)?;
            model.forward(&x, true)?;
            let (c32, b32) = model.forward(&x, false)?;
            let params = vars.trainable();
            let grads_of = |loss: &Tensor| -> Result<Vec<Tensor>> {
                let g = loss.backward()?;
                Ok(params.iter().map(|(_, v)| g.get(v).unwrap().detach()).collect())
            };
            let mut res = vec![];
            let noise = (rand_tensor(&[b, 3, hw, hw], 99)?.to_dtype(DType::F32)? * 1e-3)?;
            for (vi, p) in [Precision::F32, Precision::F32, Precision::F16, Precision::Bf16].into_iter().enumerate() {
                model.set_precision(p);
                let xx = if vi == 1 { (&x + &noise)? } else { x.clone() };
                if vi >= 2 {
                    let (c, bb) = model.forward(&x, false)?;
                    let mut w = 0.0f64;
                    for (g, r) in c.iter().chain(bb.iter()).zip(c32.iter().chain(b32.iter())) { w = w.max(super::tests::rel_pub(g, r)?); }
                    eprintln!("{p} b{b} eval forward worst rel err {w:.2e}");
                }
                let l = super::tests::loss_pub(&model, &cfg, &xx, false)?;
                let g: Vec<Tensor> = grads_of(&(l.clone() * 1024.0)?)?.into_iter().map(|g| (g / 1024.0).unwrap()).collect();
                res.push((l.to_scalar::<f32>()?, g));
            }
            for k in 1..4 {
                let (mut num, mut den) = (0.0, 0.0);
                let mut worst = (0.0f64, String::new());
                let mut per = vec![];
                for (i, (n, _)) in params.iter().enumerate() {
                    let a: Vec<f64> = res[k].1[i].flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                    let bb: Vec<f64> = res[0].1[i].flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                    let d: f64 = a.iter().zip(&bb).map(|(x, y)| (x - y) * (x - y)).sum();
                    let nn: f64 = bb.iter().map(|y| y * y).sum();
                    num += d; den += nn; per.push((d, nn, n.clone()));
                }
                for p in &per { if p.1 > 1e-6 * den { let e = (p.0 / p.1).sqrt(); if e > worst.0 { worst = (e, p.2.clone()); } } }
                eprintln!("b {b} hw {hw} variant {k}: loss {} vs {}, global {:.2e}, worst {:.2e} {}", res[k].0, res[0].0, (num / den).sqrt(), worst.0, worst.1);
            }
        }
        Ok(())
    }
}
