//! automl's sigmoid focal loss, fused: one pass forward (a scalar sum), one pass backward, and
//! the one-hot class targets are built on the fly from class ids instead of being materialized
//! (at 512² with 90 classes they would be 4.4M floats per image).

use super::{contiguous, unsupported, Elem};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Focal-loss constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FocalParams {
    /// Weight of positive entries (negatives get 1 − alpha).
    pub alpha: f64,
    /// Focusing exponent on (1 − p_t).
    pub gamma: f64,
    /// Label smoothing applied to the cross-entropy targets only, as automl does.
    pub label_smoothing: f64,
}

/// Sum over all entries of automl's focal loss for `logits` `[..., A·K]` against class ids
/// `targets` `[..., A]` (integer dtype). Id k in 0..K is a one-hot row with a 1 at k; −1 is an
/// all-zero (background) row; −2 marks an anchor whose loss is ignored (automl masks it out).
/// The result is a scalar, not yet divided by the normalizer.
pub fn focal_loss_sum(logits: &Tensor, targets: &Tensor, params: FocalParams) -> Result<Tensor> {
    let (op, targets) = Focal::for_inputs(logits, targets, params)?;
    crate::tape::op2(logits, &targets, op)
}

/// d(Σ focal loss)/d(logits) · `upstream` (a scalar tensor), the gradient the loss op's backward
/// pass gives; for callers that differentiate the loss by hand (the tape path).
pub fn focal_loss_grad(
    logits: &Tensor,
    targets: &Tensor,
    params: FocalParams,
    upstream: &Tensor,
) -> Result<Tensor> {
    let (op, targets) = Focal::for_inputs(logits, targets, params)?;
    let (l, t) = (logits.detach().contiguous()?, targets.contiguous()?);
    let loss = Tensor::zeros((), logits.dtype(), logits.device())?;
    let (d, _) = op.bwd(&l, &t, &loss, upstream)?;
    d.ok_or_else(|| candle_core::Error::Msg("focal_loss: no gradient".into()))
}

impl Focal {
    /// The op for `logits` `[..., A·K]` and class ids `targets` `[..., A]`, with the ids in
    /// the integer type the kernels read.
    fn for_inputs(
        logits: &Tensor,
        targets: &Tensor,
        params: FocalParams,
    ) -> Result<(Focal, Tensor)> {
        let ld = logits.dims();
        let td = targets.dims();
        if ld.len() != td.len() || ld.is_empty() || ld[..ld.len() - 1] != td[..td.len() - 1] {
            candle_core::bail!("focal_loss: logits {ld:?} and targets {td:?} do not line up");
        }
        let (la, ta) = (ld[ld.len() - 1], td[td.len() - 1]);
        if ta == 0 || la % ta != 0 {
            candle_core::bail!("focal_loss: logits depth {la} is not a multiple of {ta} anchors");
        }
        let targets = match targets.dtype() {
            DType::I64 => targets.clone(),
            // The CUDA kernels read i32 ids directly (candle's CUDA backend has no i32 casts).
            DType::I32 if !targets.device().is_cpu() => targets.clone(),
            DType::I32 | DType::I16 | DType::U32 | DType::U8 => targets.to_dtype(DType::I64)?,
            d => candle_core::bail!("focal_loss: targets must be integer class ids, got {d:?}"),
        };
        let op = Focal {
            num_classes: la / ta,
            p: params,
        };
        Ok((op, targets))
    }
}

struct Focal {
    num_classes: usize,
    p: FocalParams,
}

/// Anchor rows (of `num_classes` logits each) per parallel chunk.
const ROWS: usize = 512;

/// The class an anchor row's id makes positive: `None` for −2 (ignored row), `usize::MAX` for
/// −1 (background: no positive), an error for ids outside −2..K.
#[inline]
fn row_class(id: i64, num_classes: usize) -> Result<Option<usize>> {
    match id {
        -2 => Ok(None),
        -1 => Ok(Some(usize::MAX)),
        id if id >= 0 && (id as usize) < num_classes => Ok(Some(id as usize)),
        id => candle_core::bail!("focal_loss: class id {id} outside -2..{num_classes}"),
    }
}

/// [`FocalParams`] in the element type, and γ's special cases.
struct EntryConsts<T> {
    alpha: T,
    one_minus_alpha: T,
    gamma: T,
    /// Smoothed cross-entropy targets of a positive and a negative entry.
    ys_pos: T,
    ys_neg: T,
}

/// How (1 − p_t)^γ is raised: γ = 1.5 (automl's) and 2 without `powf`.
const POW_GENERAL: u8 = 0;
const POW_1_5: u8 = 1;
const POW_2: u8 = 2;

impl Focal {
    fn consts<T: Elem>(&self) -> EntryConsts<T> {
        let FocalParams {
            alpha,
            gamma,
            label_smoothing: s,
        } = self.p;
        let ys = |t: f64| T::from64(t * (1.0 - s) + 0.5 * s);
        EntryConsts {
            alpha: T::from64(alpha),
            one_minus_alpha: T::from64(1.0 - alpha),
            gamma: T::from64(gamma),
            ys_pos: ys(1.0),
            ys_neg: ys(0.0),
        }
    }

    fn pow_kind(&self) -> u8 {
        match self.p.gamma {
            1.5 => POW_1_5,
            2.0 => POW_2,
            _ => POW_GENERAL,
        }
    }

    /// Reads the kernels' invalid-id flag (one small device→host copy).
    #[cfg(feature = "cuda")]
    fn check_ids(
        &self,
        dev: &candle_core::CudaDevice,
        bad: &candle_core::cuda_backend::cudarc::driver::CudaSlice<i32>,
    ) -> Result<()> {
        if super::cuda::to_host(dev, bad)?[0] != 0 {
            candle_core::bail!(
                "focal_loss: a class id lies outside -2..{}",
                self.num_classes
            );
        }
        Ok(())
    }

    fn loss<T: Elem>(&self, x: &[T], targets: &[i64]) -> Result<f64> {
        match self.pow_kind() {
            POW_1_5 => self.loss_with::<T, POW_1_5>(x, targets),
            POW_2 => self.loss_with::<T, POW_2>(x, targets),
            _ => self.loss_with::<T, POW_GENERAL>(x, targets),
        }
    }

    fn loss_with<T: Elem, const POW: u8>(&self, x: &[T], targets: &[i64]) -> Result<f64> {
        let (k, c) = (self.num_classes, self.consts::<T>());
        let parts: Vec<Result<f64>> = x
            .par_chunks(ROWS * k)
            .zip(targets.par_chunks(ROWS))
            .map(|(xc, tc)| {
                let mut losses = vec![T::zero(); k];
                super::wide_simd(
                    #[inline(always)]
                    || {
                        let mut acc = 0f64;
                        for (row, &id) in xc.chunks_exact(k).zip(tc) {
                            let Some(class) = row_class(id, k)? else {
                                continue;
                            };
                            // The entries first (a loop that vectorizes), then their sum.
                            for (j, (l, &v)) in losses.iter_mut().zip(row).enumerate() {
                                *l = entry::<T, POW>(&c, v, j == class).0;
                            }
                            acc += lane_sum(&losses);
                        }
                        Ok(acc)
                    },
                )
            })
            .collect();
        parts.into_iter().sum()
    }

    fn grad<T: Elem>(&self, x: &[T], targets: &[i64], scale: f64) -> Result<Vec<T>> {
        match self.pow_kind() {
            POW_1_5 => self.grad_with::<T, POW_1_5>(x, targets, scale),
            POW_2 => self.grad_with::<T, POW_2>(x, targets, scale),
            _ => self.grad_with::<T, POW_GENERAL>(x, targets, scale),
        }
    }

    fn grad_with<T: Elem, const POW: u8>(
        &self,
        x: &[T],
        targets: &[i64],
        scale: f64,
    ) -> Result<Vec<T>> {
        let (k, c) = (self.num_classes, self.consts::<T>());
        // In the element type, so the loop has no f64 round trip (for f32 that rounds the
        // scale once more: a relative 6e-8).
        let scale = T::from64(scale);
        let mut d = vec![T::zero(); x.len()];
        d.par_chunks_mut(ROWS * k)
            .zip(x.par_chunks(ROWS * k).zip(targets.par_chunks(ROWS)))
            .try_for_each(|(dc, (xc, tc))| -> Result<()> {
                super::wide_simd(
                    #[inline(always)]
                    || {
                        let rows = dc.chunks_exact_mut(k).zip(xc.chunks_exact(k)).zip(tc);
                        for ((drow, row), &id) in rows {
                            let Some(class) = row_class(id, k)? else {
                                continue;
                            };
                            for (j, (d, &v)) in drow.iter_mut().zip(row).enumerate() {
                                *d = scale * entry::<T, POW>(&c, v, j == class).1;
                            }
                        }
                        Ok(())
                    },
                )
            })?;
        Ok(d)
    }
}

/// (loss, dloss/dx) of one entry, with one exp, one log and (for γ = 1.5) one sqrt, in the
/// element type: f32 entries vectorize (branch-free, [`Elem::exp_fast`] and
/// [`Elem::ln_1p_fast`]); f64 entries are what the finite-difference tests check.
#[inline(always)]
fn entry<T: Elem, const POW: u8>(c: &EntryConsts<T>, x: T, positive: bool) -> (T, T) {
    let (zero, one) = (T::zero(), T::one());
    let e = (-x.abs()).exp_fast();
    let p = if x >= zero {
        one / (one + e)
    } else {
        e / (one + e)
    };
    let ys = if positive { c.ys_pos } else { c.ys_neg };
    // Stable sigmoid cross-entropy: softplus(x) − x·y.
    let ce = num_traits::Float::max(x, zero) + e.ln_1p_fast() - x * ys;
    let (a, base) = if positive {
        (c.alpha, one - p)
    } else {
        (c.one_minus_alpha, p)
    };
    let m = match POW {
        POW_1_5 => base * base.sqrt(),
        POW_2 => base * base,
        _ => base.powf(c.gamma),
    };
    // d(1 − p_t)^γ/dx: −γ·p·m for positives, γ·(1 − p)·m for negatives.
    let dm = if positive {
        -c.gamma * p * m
    } else {
        c.gamma * (one - p) * m
    };
    (a * m * ce, a * (dm * ce + m * (p - ys)))
}

/// Σ v in f64 over 8 interleaved partial sums (a loop that vectorizes; one running sum would
/// keep it scalar, since float addition may not be reordered).
#[inline(always)]
fn lane_sum<T: Elem>(v: &[T]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(chunk) {
            *l += x.to64();
        }
    }
    for (l, x) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += x.to64();
    }
    lanes.iter().sum()
}

impl CustomOp2 for Focal {
    fn name(&self) -> &'static str {
        "effdet-focal-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = contiguous::<i64>(s2, l2)?;
        match s1 {
            CpuStorage::F32(_) => {
                let v = self.loss::<f32>(contiguous(s1, l1)?, t)?;
                Ok((CpuStorage::F32(vec![v as f32]), Shape::from(())))
            }
            CpuStorage::F64(_) => {
                let v = self.loss::<f64>(contiguous(s1, l1)?, t)?;
                Ok((CpuStorage::F64(vec![v]), Shape::from(())))
            }
            s => Err(unsupported(self.name(), s)),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, PushKernelArg};
        use candle_core::backend::BackendStorage;
        let dev = s1.device();
        let x = cuda::f32_view(self.name(), s1, l1)?;
        let n = l1.shape().elem_count();
        let sum = cuda::zeros::<f64>(dev, 1)?;
        let bad = cuda::zeros::<i32>(dev, 1)?;
        let (n64, k32) = (n as i64, cuda::int(self.name(), self.num_classes)?);
        let (alpha, gamma, smoothing) = (self.p.alpha, self.p.gamma, self.p.label_smoothing);
        let (k, ids32, ids64);
        let mut b = if s2.dtype() == DType::I32 {
            k = cuda::Kernel::new(dev, "focal_loss_i32")?;
            ids32 = cuda::view::<i32>(self.name(), s2, l2)?;
            let mut b = k.builder();
            b.arg(&x).arg(&ids32);
            b
        } else {
            k = cuda::Kernel::new(dev, "focal_loss_i64")?;
            ids64 = cuda::view::<i64>(self.name(), s2, l2)?;
            let mut b = k.builder();
            b.arg(&x).arg(&ids64);
            b
        };
        b.arg(&sum).arg(&bad).arg(&n64).arg(&k32);
        b.arg(&alpha).arg(&gamma).arg(&smoothing);
        cuda::launch(b, cuda::elementwise(n))?;
        self.check_ids(dev, &bad)?;
        let out = cuda::f64_to_f32(dev, &sum, 1, 1.0)?;
        Ok((cuda::wrap(dev, out), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = FocalGrad {
            inner: Focal {
                num_classes: self.num_classes,
                p: self.p,
            },
        };
        let d = logits.apply_op3_no_bwd(targets, &grad.to_dtype(DType::F64)?.reshape(1)?, &op)?;
        Ok((Some(d), None))
    }
}

/// (logits, targets, upstream scalar gradient `[1]` f64) → d(loss)/d(logits).
struct FocalGrad {
    inner: Focal,
}

impl CustomOp3 for FocalGrad {
    fn name(&self) -> &'static str {
        "effdet-focal-loss-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, PushKernelArg};
        use candle_core::backend::BackendStorage;
        let dev = s1.device();
        let x = cuda::f32_view(self.name(), s1, l1)?;
        let scale = cuda::view::<f64>(self.name(), s3, l3)?;
        let n = l1.shape().elem_count();
        let d = cuda::alloc::<f32>(dev, n)?;
        let bad = cuda::zeros::<i32>(dev, 1)?;
        let inner = &self.inner;
        let (n64, k32) = (n as i64, cuda::int(self.name(), inner.num_classes)?);
        let (alpha, gamma, smoothing) = (inner.p.alpha, inner.p.gamma, inner.p.label_smoothing);
        let (k, ids32, ids64);
        let mut b = if s2.dtype() == DType::I32 {
            k = cuda::Kernel::new(dev, "focal_grad_i32")?;
            ids32 = cuda::view::<i32>(self.name(), s2, l2)?;
            let mut b = k.builder();
            b.arg(&x).arg(&ids32);
            b
        } else {
            k = cuda::Kernel::new(dev, "focal_grad_i64")?;
            ids64 = cuda::view::<i64>(self.name(), s2, l2)?;
            let mut b = k.builder();
            b.arg(&x).arg(&ids64);
            b
        };
        b.arg(&scale).arg(&d).arg(&bad).arg(&n64).arg(&k32);
        b.arg(&alpha).arg(&gamma).arg(&smoothing);
        cuda::launch(b, cuda::elementwise(n))?;
        inner.check_ids(dev, &bad)?;
        Ok((cuda::wrap(dev, d), l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = contiguous::<i64>(s2, l2)?;
        let scale = contiguous::<f64>(s3, l3)?[0];
        let shape = l1.shape().clone();
        match s1 {
            CpuStorage::F32(_) => Ok((
                CpuStorage::F32(self.inner.grad::<f32>(contiguous(s1, l1)?, t, scale)?),
                shape,
            )),
            CpuStorage::F64(_) => Ok((
                CpuStorage::F64(self.inner.grad::<f64>(contiguous(s1, l1)?, t, scale)?),
                shape,
            )),
            s => Err(unsupported(self.name(), s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::Device;

    const P: FocalParams = FocalParams {
        alpha: 0.25,
        gamma: 1.5,
        label_smoothing: 0.0,
    };

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn hand_computed_entries() -> Result<()> {
        let dev = Device::Cpu;
        // One anchor, three classes, target class 1; logits [0, 2, -1].
        let logits = Tensor::from_vec(vec![0f64, 2.0, -1.0], (1, 3), &dev)?;
        let targets = Tensor::from_vec(vec![1i64], (1, 1), &dev)?;
        let got = focal_loss_sum(&logits, &targets, P)?.to_scalar::<f64>()?;
        // class 0 negative: 0.75 · 0.5^1.5 · ln 2
        let l0 = 0.75 * 0.5f64.powf(1.5) * 2f64.ln();
        // class 1 positive: 0.25 · (1 − σ(2))^1.5 · (−ln σ(2))
        let l1 = 0.25 * (1.0 - sigmoid(2.0)).powf(1.5) * -sigmoid(2.0).ln();
        // class 2 negative: 0.75 · σ(−1)^1.5 · (−ln(1 − σ(−1)))
        let l2 = 0.75 * sigmoid(-1.0).powf(1.5) * -(1.0 - sigmoid(-1.0)).ln();
        assert!((got - (l0 + l1 + l2)).abs() < 1e-12, "{got}");

        // Background (−1) is all negatives; ignored (−2) contributes nothing.
        let t_bg = Tensor::from_vec(vec![-1i64], (1, 1), &dev)?;
        let bg = focal_loss_sum(&logits, &t_bg, P)?.to_scalar::<f64>()?;
        let l1n = 0.75 * sigmoid(2.0).powf(1.5) * -(1.0 - sigmoid(2.0)).ln();
        assert!((bg - (l0 + l1n + l2)).abs() < 1e-12);
        let t_ig = Tensor::from_vec(vec![-2i32], (1, 1), &dev)?;
        assert_eq!(focal_loss_sum(&logits, &t_ig, P)?.to_scalar::<f64>()?, 0.0);

        // Out-of-range ids are an error, not a silent zero row.
        let bad = Tensor::from_vec(vec![3i64], (1, 1), &dev)?;
        assert!(focal_loss_sum(&logits, &bad, P).is_err());
        Ok(())
    }

    #[test]
    fn matches_stock_op_formula_with_smoothing() -> Result<()> {
        let dev = Device::Cpu;
        let p = FocalParams {
            alpha: 0.25,
            gamma: 1.5,
            label_smoothing: 0.1,
        };
        let logits = (rand_tensor(&[2, 3, 1, 8], 61)? * 4.0)?; // 2 anchors × 4 classes
        let ids: Vec<i64> = vec![0, -1, 3, -2, 1, -1, -1, 2, 0, 0, -2, 3];
        let targets = Tensor::from_vec(ids.clone(), (2, 3, 1, 2), &dev)?;
        let got = focal_loss_sum(&logits, &targets, p)?.to_scalar::<f64>()?;
        let x = logits.flatten_all()?.to_vec1::<f64>()?;
        let mut want = 0.0;
        for (e, &xv) in x.iter().enumerate() {
            let id = ids[e / 4];
            if id == -2 {
                continue;
            }
            let y = if id == (e % 4) as i64 { 1.0 } else { 0.0 };
            let pr = sigmoid(xv);
            let pt = y * pr + (1.0 - y) * (1.0 - pr);
            let a = y * 0.25 + (1.0 - y) * 0.75;
            let ys = y * 0.9 + 0.05;
            let ce = -(ys * pr.ln() + (1.0 - ys) * (1.0 - pr).ln());
            want += a * (1.0 - pt).powf(1.5) * ce;
        }
        assert!(
            (got - want).abs() < 1e-10 * want.abs().max(1.0),
            "{got} vs {want}"
        );
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        for smoothing in [0.0, 0.1] {
            let p = FocalParams {
                alpha: 0.25,
                gamma: 1.5,
                label_smoothing: smoothing,
            };
            let logits = (rand_tensor(&[2, 2, 2, 6], 71)? * 3.0)?; // 2 anchors × 3 classes
            let ids = vec![0i64, -1, 2, -2, 1, 1, -1, 0, 2, 2, -1, -1, 0, 1, -2, 0];
            let targets = Tensor::from_vec(ids, (2, 2, 2, 2), &dev)?;
            check_gradients(&[logits], |v| focal_loss_sum(&v[0], &targets, p), 1e-7)?;
        }
        Ok(())
    }
}
