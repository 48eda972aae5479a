//! Batch norm whose statistics never leave the tensors' device. The host-statistics ops of the
//! parent module read the batch moments, γ, β and the gradient sums back to the host (three
//! synchronizations per layer on a GPU, each draining the queue); here they travel as small
//! f64 tensors: `moments` `[2, C]` = (mean, 1/√(var + ε)) and `params` `[4, C]` = (mean,
//! inv_std, γ, β), so forward and backward are queued without waiting. The arithmetic is the
//! parent's (same f64 moments, same f32 per-channel constants, same coefficient formulas), so
//! on the CPU both paths give identical results (tested).

use super::*;
use candle_core::{CustomOp1, DType, Tensor};

/// Training-mode BN: `x` normalized with its own batch moments, then γ, β and `act`. Returns
/// the output and the moments `[2, C]` f64 (mean, inv_std) on x's device.
pub fn batch_norm_train_resident(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Activation,
) -> Result<(Tensor, Tensor)> {
    let c = check(x, gamma, beta)?;
    if x.elem_count() == 0 {
        candle_core::bail!("batch_norm_train: empty input {:?}", x.dims());
    }
    let x = x.contiguous()?;
    let moments = x.apply_op1_no_bwd(&Moments { c, eps })?;
    let y = apply_resident(&x, gamma, beta, &moments, act, true)?;
    Ok((y, moments))
}

/// Moves a training-mode layer's running averages (`mean`, `var`: f32 `[C]`, updated in place)
/// towards its batch `moments` (`[2, C]` f64 from [`batch_norm_train_resident`]):
/// `mean ← m·mean + (1 − m)·batch_mean`, `var ← m·var + (1 − m)·bessel·(1/inv_std² − eps)`,
/// in f64 and rounded once. One launch on CUDA (the stock-op composition took ~16 per layer,
/// ~1,800 per D0 step); the same arithmetic as that composition, bit for bit (tested).
pub fn batch_norm_update_running(
    mean: &Tensor,
    var: &Tensor,
    moments: &Tensor,
    momentum: f64,
    eps: f64,
    bessel: f64,
) -> Result<()> {
    let c = mean.elem_count();
    if var.elem_count() != c
        || moments.dims() != [2, c]
        || moments.dtype() != DType::F64
        || mean.dtype() != DType::F32
        || var.dtype() != DType::F32
        || !mean.is_contiguous()
        || !var.is_contiguous()
    {
        candle_core::bail!(
            "batch_norm_update_running: mean {:?} {:?}, var {:?} {:?}, moments {:?} {:?}",
            mean.dims(),
            mean.dtype(),
            var.dims(),
            var.dtype(),
            moments.dims(),
            moments.dtype()
        );
    }
    let moments = moments.contiguous()?;
    let coef = RunningCoef {
        m: momentum,
        one_minus_m: 1.0 - momentum,
        eps,
        bessel,
    };
    match mean.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => {
            use super::super::cuda::{self, PushKernelArg};
            let k = cuda::Kernel::new(dev, "bn_running_update")?;
            let (pm, pv) = (
                cuda::address::<f32>(dev, mean)?,
                cuda::address::<f32>(dev, var)?,
            );
            let pmom = cuda::address::<f64>(dev, &moments)?;
            let c32 = cuda::int("batch_norm_update_running", c)?;
            let mut b = k.builder();
            b.arg(&pm).arg(&pv).arg(&pmom).arg(&c32);
            b.arg(&coef.m)
                .arg(&coef.one_minus_m)
                .arg(&coef.eps)
                .arg(&coef.bessel);
            cuda::launch(b, cuda::elementwise(c))
        }
        _ => {
            mean.inplace_op2(&moments, &RunningUpdate { coef, var: false })?;
            var.inplace_op2(&moments, &RunningUpdate { coef, var: true })
        }
    }
}

#[derive(Clone, Copy)]
struct RunningCoef {
    m: f64,
    one_minus_m: f64,
    eps: f64,
    bessel: f64,
}

/// The CPU side of [`batch_norm_update_running`], for the mean or the variance.
struct RunningUpdate {
    coef: RunningCoef,
    var: bool,
}

impl candle_core::InplaceOp2 for RunningUpdate {
    fn name(&self) -> &'static str {
        "effdet-bn-running-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let range = super::super::contiguous_range("running update", l1)?;
        let mom = contiguous::<f64>(s2, l2)?;
        let c = range.len();
        let RunningCoef {
            m,
            one_minus_m,
            eps,
            bessel,
        } = self.coef;
        match s1 {
            CpuStorage::F32(stat) => {
                for (i, v) in stat[range].iter_mut().enumerate() {
                    let batch = if self.var {
                        let s = mom[c + i];
                        (1.0 / (s * s) - eps) * bessel
                    } else {
                        mom[i]
                    };
                    *v = (*v as f64 * m + batch * one_minus_m) as f32;
                }
                Ok(())
            }
            s => Err(unsupported(self.name(), s)),
        }
    }
}

/// Evaluation-mode BN with given `mean` and `var` (`[C]`), statistics kept on the device.
pub fn batch_norm_eval_resident(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    act: Activation,
) -> Result<Tensor> {
    let c = check(x, gamma, beta)?;
    if mean.dims() != [c] || var.dims() != [c] {
        candle_core::bail!(
            "batch_norm_eval: mean {:?} / var {:?} must be [{c}]",
            mean.dims(),
            var.dims()
        );
    }
    let mean = mean.detach().to_dtype(DType::F64)?;
    let inv = ((var.detach().to_dtype(DType::F64)? + eps)?.sqrt()?).recip()?;
    let moments = Tensor::stack(&[mean, inv], 0)?;
    apply_resident(&x.contiguous()?, gamma, beta, &moments, act, false)
}

fn apply_resident(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    moments: &Tensor,
    act: Activation,
    train: bool,
) -> Result<Tensor> {
    if let Some(tape) = crate::tape::active() {
        // Recorded as one op of (x, γ, β): the rows of the f64 parameter gradient are γ's and
        // β's gradients, as the casts and the concatenation below pass them back.
        let c = gamma.dim(0)?;
        let params = stacked_params(&moments.detach(), &gamma.detach(), &beta.detach())?;
        let xd = x.detach().contiguous()?;
        let op = Apply { act, train };
        let y = xd.apply_op2_no_bwd(&params, &op)?;
        let (gdt, bdt) = (gamma.dtype(), beta.dtype());
        tape.push("batch_norm_resident", &[x, gamma, beta], &y, move |g| {
            let (dx, sums) = op.grads(&xd, &params, g)?;
            debug_assert_eq!(sums.dims(), [2, c]);
            // dγ = Σ g_z·x̂, dβ = Σ g_z: rows of the reduction, as the f64 parameter gradient
            // of `bwd` passes them back (the same rounding: its rows hold these values).
            Ok(vec![
                Some(dx),
                Some(sums.get(1)?.to_dtype(gdt)?),
                Some(sums.get(0)?.to_dtype(bdt)?),
            ])
        });
        return Ok(y);
    }
    // Untaped, γ's and β's gradients flow back through the casts and the concatenation.
    let params = stacked_params(moments, gamma, beta)?;
    x.apply_op2(&params, Apply { act, train })
}

/// The f64 `[4, C]` parameter rows (mean, inv_std, γ, β) the apply op reads: one op (one
/// launch) where two casts, two reshapes and a concatenation took five tensors and four.
fn stacked_params(moments: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let c = gamma.elem_count();
    if moments.dims() != [2, c] || moments.dtype() != DType::F64 || beta.elem_count() != c {
        candle_core::bail!(
            "batch norm: moments {:?} {:?} do not fit γ {:?} / β {:?}",
            moments.dims(),
            moments.dtype(),
            gamma.dims(),
            beta.dims()
        );
    }
    // Untaped, candle's graph takes γ's and β's gradients through `StackParams::bwd`; the
    // taped caller passes detached tensors.
    moments
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, StackParams { c })
}

/// (moments f64 `[2, C]`, γ `[C]`, β `[C]`) → f64 `[4, C]` = (mean, inv_std, γ, β), γ and β
/// widened exactly. Its backward passes rows 2 and 3 of the gradient to γ and β (the moments
/// carry none), as the casts and concatenation it replaces did.
struct StackParams {
    c: usize,
}

impl CustomOp3 for StackParams {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-stack-params"
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
        let widen = |s: &CpuStorage, l: &Layout| -> Result<Vec<f64>> {
            Ok(match s {
                CpuStorage::F32(_) => contiguous::<f32>(s, l)?.iter().map(|&v| v as f64).collect(),
                CpuStorage::F64(_) => contiguous::<f64>(s, l)?.to_vec(),
                s => return Err(unsupported(self.name(), s)),
            })
        };
        let mut out = contiguous::<f64>(s1, l1)?.to_vec();
        out.extend(widen(s2, l2)?);
        out.extend(widen(s3, l3)?);
        Ok((CpuStorage::F64(out), Shape::from((4, self.c))))
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
        use crate::ops::cuda::{self, PushKernelArg};
        let dev = s1.device();
        let moments = cuda::view::<f64>(self.name(), s1, l1)?;
        let gamma = cuda::f32_view(self.name(), s2, l2)?;
        let beta = cuda::f32_view(self.name(), s3, l3)?;
        let out = cuda::alloc::<f64>(dev, 4 * self.c)?;
        let c32 = cuda::int(self.name(), self.c)?;
        let k = cuda::Kernel::new(dev, "bn_stack_params")?;
        let mut b = k.builder();
        b.arg(&moments).arg(&gamma).arg(&beta).arg(&out).arg(&c32);
        cuda::launch(b, cuda::elementwise(self.c))?;
        Ok((cuda::wrap(dev, out), Shape::from((4, self.c))))
    }

    fn bwd(
        &self,
        _moments: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            None,
            Some(grad.get(2)?.to_dtype(gamma.dtype())?),
            Some(grad.get(3)?.to_dtype(beta.dtype())?),
        ))
    }
}

/// x `[rows, C]` → f64 `[2, C]`: mean and 1/√(var + ε) (biased variance, two passes).
struct Moments {
    c: usize,
    eps: f64,
}

impl CustomOp1 for Moments {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-moments"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let saved = match s {
            s if is_f32_family(s) => batch_moments::<f32>(&act_f32(s, l)?, self.c, self.eps),
            CpuStorage::F64(_) => batch_moments::<f64>(contiguous(s, l)?, self.c, self.eps),
            s => return Err(unsupported(self.name(), s)),
        };
        let v: Vec<f64> = saved.mean.into_iter().chain(saved.inv_std).collect();
        Ok((CpuStorage::F64(v), Shape::from((2, self.c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::ops::cuda;
        let dev = s.device();
        let c = self.c;
        let rows = l.shape().elem_count() / c.max(1);
        let x = cuda::act_view(self.name(), s, l)?;
        // Written in place: the mean into row 0, the centered squares (then inv_std) into row 1.
        let out = cuda::zeros::<f64>(dev, 2 * c)?;
        let halves = (&out.slice(0..c), &out.slice(c..2 * c));
        cuda_moments_into(self.name(), dev, &x, (rows, c), self.eps, halves)?;
        Ok((cuda::wrap(dev, out), Shape::from((2, c))))
    }
}

/// (x, params f64 `[4, C]`) → act(γ·(x − mean)·inv_std + β).
struct Apply {
    act: Activation,
    train: bool,
}

/// Rows of a `[rows, C]` f64 slice.
fn rows_f64(v: &[f64], c: usize) -> Vec<Vec<f64>> {
    v.chunks_exact(c).map(|r| r.to_vec()).collect()
}

impl CustomOp2 for Apply {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = l2.dims()[1];
        let p = rows_f64(contiguous::<f64>(s2, l2)?, c);
        let saved = Saved {
            mean: p[0].clone(),
            inv_std: p[1].clone(),
        };
        let out = match s1 {
            s1 if is_f32_family(s1) => {
                let g: Vec<f32> = p[2].iter().map(|&v| v as f32).collect();
                let b: Vec<f32> = p[3].iter().map(|&v| v as f32).collect();
                let y = apply(&act_f32(s1, l1)?, &saved, &g, &b, self.act);
                store_f32(y, s1.dtype())?
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(apply(contiguous(s1, l1)?, &saved, &p[2], &p[3], self.act))
            }
            s => return Err(unsupported(self.name(), s)),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::ops::cuda::{self, PushKernelArg};
        let dev = s1.device();
        let c = l2.dims()[1];
        let n = l1.shape().elem_count();
        let x = cuda::act_view(self.name(), s1, l1)?;
        let params = cuda::view::<f64>(self.name(), s2, l2)?;
        let scale = cuda::alloc::<f32>(dev, c)?;
        let shift = cuda::alloc::<f32>(dev, c)?;
        let c32 = cuda::int(self.name(), c)?;
        let k = cuda::Kernel::new(dev, "bn_scale_shift_params")?;
        let mut b = k.builder();
        b.arg(&params).arg(&scale).arg(&shift).arg(&c32);
        cuda::launch(b, cuda::elementwise(c))?;
        let y = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
        let k = cuda::kernel_for(dev, "bn_apply", x.dtype())?;
        let (n64, act32) = (n as i64, (self.act == Activation::Swish) as i32);
        let mut b = k.builder();
        x.push(&mut b);
        b.arg(&scale).arg(&shift);
        y.push(&mut b);
        b.arg(&n64).arg(&c32).arg(&act32);
        cuda::launch(b, cuda::elementwise_ilp(n))?;
        Ok((y.wrap(dev), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, sums) = self.grads(x, params, grad)?;
        let sums64 = sums.to_dtype(DType::F64)?;
        let zeros = sums64.get(0)?.zeros_like()?.unsqueeze(0)?;
        let dparams = Tensor::cat(
            &[
                zeros.clone(),
                zeros,
                sums64.get(1)?.unsqueeze(0)?,
                sums64.get(0)?.unsqueeze(0)?,
            ],
            0,
        )?;
        Ok((Some(dx), Some(dparams)))
    }
}

impl Apply {
    /// The input gradient and the reduction sums `[2, C]` (Σ g_z = dβ, Σ g_z·x̂ = dγ, in the
    /// compute type) in four ops, all on x's device: the constants cast, the reduction, the
    /// per-channel coefficients ([`GradConsts`]), the input gradient.
    fn grads(&self, x: &Tensor, params: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = params.dim(1)?;
        let rows = x.elem_count() / c.max(1);
        let grad = grad.contiguous()?;
        // [mean, inv_std, γ, β] in the compute type (f32, or f64 for f64): the parent's `Chan`
        // constants.
        let compute = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let chan = params.to_dtype(compute)?;
        let sums = x.apply_op3_no_bwd(&grad, &chan, &GradReduce { act: self.act, c })?;
        let consts = params.apply_op2_no_bwd(
            &sums,
            &GradConsts {
                c,
                rows,
                train: self.train,
            },
        )?;
        let dx = x.apply_op3_no_bwd(&grad, &consts, &GradInput { act: self.act, c })?;
        Ok((dx, sums))
    }
}

/// (params f64 `[4, C]`, sums `[2, C]` in the compute type) → `[7, C]` in the compute type:
/// mean, inv_std, γ, β, then the input gradient's coefficients k = γ·inv_std, and in training
/// mode off = k/rows·Σg_z and slope = k/rows·Σg_z·x̂ (0 in evaluation mode), computed in f64
/// from the sums as stored (the parent's formulas) and rounded once. One launch per layer for
/// what took ~15 small stock ops.
struct GradConsts {
    c: usize,
    rows: usize,
    train: bool,
}

impl GradConsts {
    /// The seven rows in f64 (each then rounded to the compute type).
    fn rows_f64(&self, p: &[f64], sums: impl Fn(usize) -> f64) -> Vec<f64> {
        let c = self.c;
        let mut out = p[..4 * c].to_vec();
        out.resize(7 * c, 0.0);
        let n = self.rows as f64;
        for i in 0..c {
            let k = p[2 * c + i] * p[c + i];
            out[4 * c + i] = k;
            if self.train {
                // A true division (a multiplication by 1/n would be 1 ulp off the CPU path).
                let kk = k / n;
                out[5 * c + i] = kk * sums(i);
                out[6 * c + i] = kk * sums(c + i);
            }
        }
        out
    }
}

impl CustomOp2 for GradConsts {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-grad-consts"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = contiguous::<f64>(s1, l1)?;
        let shape = Shape::from((7, self.c));
        Ok(match s2 {
            CpuStorage::F32(_) => {
                let sums = contiguous::<f32>(s2, l2)?;
                let v = self.rows_f64(p, |i| sums[i] as f64);
                (
                    CpuStorage::F32(v.iter().map(|&x| x as f32).collect()),
                    shape,
                )
            }
            CpuStorage::F64(_) => {
                let sums = contiguous::<f64>(s2, l2)?;
                (CpuStorage::F64(self.rows_f64(p, |i| sums[i])), shape)
            }
            s => return Err(unsupported(self.name(), s)),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::ops::cuda::{self, PushKernelArg};
        let dev = s1.device();
        let params = cuda::view::<f64>(self.name(), s1, l1)?;
        let sums = cuda::f32_view(self.name(), s2, l2)?;
        let out = cuda::alloc::<f32>(dev, 7 * self.c)?;
        let c32 = cuda::int(self.name(), self.c)?;
        let (n, train) = (self.rows as f64, self.train as i32);
        let k = cuda::Kernel::new(dev, "bn_grad_consts")?;
        let mut b = k.builder();
        b.arg(&params)
            .arg(&sums)
            .arg(&out)
            .arg(&c32)
            .arg(&n)
            .arg(&train);
        cuda::launch(b, cuda::elementwise(self.c))?;
        Ok((cuda::wrap(dev, out), Shape::from((7, self.c))))
    }
}

/// Params `[mean, inv, γ, β]` rows of a chan tensor, as the parent's f64 `Params`.
fn params_of(chan: &[f64], c: usize, act: Activation) -> Params {
    let r = rows_f64(chan, c);
    Params {
        saved: Saved {
            mean: r[0].clone(),
            inv_std: r[1].clone(),
        },
        gamma: r[2].clone(),
        beta: r[3].clone(),
        act,
    }
}

fn to_f64<T: Elem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to64()).collect()
}

/// (x, grad, chan `[4, C]`) → `[2, C]`: Σ g_z and Σ g_z·x̂ (the parent's `BnGradReduce`).
struct GradReduce {
    act: Activation,
    c: usize,
}

impl CustomOp3 for GradReduce {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-grad-reduce-resident"
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
        let shape = Shape::from((2, self.c));
        let out = match s1 {
            // γ/β gradients: f32 whatever the activations.
            s1 if is_f32_family(s1) => {
                let chan = to_f64(contiguous::<f32>(s3, l3)?);
                let op = BnGradReduce {
                    p: params_of(&chan, self.c, self.act),
                };
                CpuStorage::F32(op.run::<f32>(&act_f32(s1, l1)?, &act_f32(s2, l2)?))
            }
            CpuStorage::F64(_) => {
                let chan = contiguous::<f64>(s3, l3)?.to_vec();
                let op = BnGradReduce {
                    p: params_of(&chan, self.c, self.act),
                };
                CpuStorage::F64(op.run::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?))
            }
            s => return Err(unsupported(self.name(), s)),
        };
        Ok((out, shape))
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
        use crate::ops::cuda::{self, PushKernelArg};
        let dev = s1.device();
        let c = self.c;
        let rows = l1.shape().elem_count() / c.max(1);
        let x = cuda::act_view(self.name(), s1, l1)?;
        let g = cuda::act_view(self.name(), s2, l2)?;
        let chan = cuda::f32_view(self.name(), s3, l3)?;
        let sums = cuda::zeros::<f64>(dev, 2 * c)?;
        let k = cuda::kernel_for(dev, "bn_grad_reduce", x.dtype())?;
        let (rows64, c32) = (rows as i64, cuda::int(self.name(), c)?);
        let act32 = (self.act == Activation::Swish) as i32;
        let mut b = k.builder();
        x.push(&mut b);
        g.push(&mut b);
        b.arg(&chan).arg(&sums).arg(&rows64).arg(&c32).arg(&act32);
        cuda::launch(b, cuda::column_reduction(rows, c, 1))?;
        let out = cuda::f64_to_f32(dev, &sums, 2 * c, 1.0)?;
        Ok((cuda::wrap(dev, out), Shape::from((2, c))))
    }
}

/// (x, grad, consts `[7, C]` = mean, inv, γ, β, k, off, slope) → dx (the parent's
/// `BnGradInput` with the coefficients computed on the device).
struct GradInput {
    act: Activation,
    c: usize,
}

impl GradInput {
    fn run<T: Elem>(&self, x: &[T], g: &[T], consts: &[T]) -> Vec<T> {
        let c = self.c;
        let all = to_f64(consts);
        let ch = Chan::<T>::new(&params_of(&all[..4 * c], c, self.act));
        let row = |i: usize| consts[i * c..(i + 1) * c].to_vec();
        grad_input(x, g, &ch, &row(4), &row(5), &row(6))
    }
}

impl CustomOp3 for GradInput {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-grad-input-resident"
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
        let out = match s1 {
            s1 if is_f32_family(s1) => store_f32(
                self.run::<f32>(&act_f32(s1, l1)?, &act_f32(s2, l2)?, contiguous(s3, l3)?),
                s1.dtype(),
            )?,
            CpuStorage::F64(_) => CpuStorage::F64(self.run::<f64>(
                contiguous(s1, l1)?,
                contiguous(s2, l2)?,
                contiguous(s3, l3)?,
            )),
            s => return Err(unsupported(self.name(), s)),
        };
        Ok((out, l1.shape().clone()))
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
        use crate::ops::cuda::{self, PushKernelArg};
        let dev = s1.device();
        let c = self.c;
        let n = l1.shape().elem_count();
        let x = cuda::act_view(self.name(), s1, l1)?;
        let g = cuda::act_view(self.name(), s2, l2)?;
        let consts = cuda::f32_view(self.name(), s3, l3)?;
        let chan = consts.slice(0..4 * c);
        let coef = consts.slice(4 * c..7 * c);
        let dx = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
        let k = cuda::kernel_for(dev, "bn_grad_input", x.dtype())?;
        let (n64, c32) = (n as i64, cuda::int(self.name(), c)?);
        let act32 = (self.act == Activation::Swish) as i32;
        let mut b = k.builder();
        x.push(&mut b);
        g.push(&mut b);
        b.arg(&chan).arg(&coef);
        dx.push(&mut b);
        b.arg(&n64).arg(&c32).arg(&act32);
        cuda::launch(b, cuda::elementwise_ilp(n))?;
        Ok((dx.wrap(dev), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::Var;

    /// The one-op running-average update equals the stock-op composition it replaces (in f64,
    /// rounded to f32 once) bit for bit.
    #[test]
    fn running_update_equals_the_stock_op_composition() -> Result<()> {
        let x = (rand_tensor(&[2, 5, 3, 7], 3)? * 2.0)?.to_dtype(DType::F32)?;
        let (g, b) = (
            rand_tensor(&[7], 4)?.to_dtype(DType::F32)?,
            rand_tensor(&[7], 5)?.to_dtype(DType::F32)?,
        );
        let (_, moments) = batch_norm_train_resident(&x, &g, &b, 1e-3, Activation::None)?;
        let mean0 = rand_tensor(&[7], 6)?.to_dtype(DType::F32)?;
        let var0 = (rand_tensor(&[7], 7)?.abs()? + 0.5)?.to_dtype(DType::F32)?;
        let (m, eps, bessel) = (0.99, 1e-3, 30.0 / 29.0);
        let (mean, var) = (mean0.copy()?, var0.copy()?);
        batch_norm_update_running(&mean, &var, &moments, m, eps, bessel)?;
        let batch_var = ((moments.get(1)?.sqr()?.recip()? - eps)? * bessel)?;
        for (got, old, batch) in [(&mean, &mean0, moments.get(0)?), (&var, &var0, batch_var)] {
            let old = old.to_dtype(DType::F64)?;
            let want = ((old * m)? + (batch * (1.0 - m))?)?.to_dtype(DType::F32)?;
            assert_eq!(got.to_vec1::<f32>()?, want.to_vec1::<f32>()?);
        }
        assert_ne!(mean.to_vec1::<f32>()?, mean0.to_vec1::<f32>()?);
        assert!(batch_norm_update_running(&mean, &var, &moments.get(0)?, m, eps, bessel).is_err());
        Ok(())
    }

    /// Same outputs, moments and gradients as the host-statistics ops, bit for bit (f32 and
    /// f64), in training and evaluation mode, with and without swish.
    #[test]
    fn resident_equals_host_statistics_path() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            for act in [Activation::None, Activation::Swish] {
                let x = (rand_tensor(&[2, 3, 4, 6], 41)? * 3.0)?.to_dtype(dtype)?;
                let gamma = rand_tensor(&[6], 42)?.to_dtype(dtype)?;
                let beta = rand_tensor(&[6], 43)?.to_dtype(dtype)?;
                let r = rand_tensor(&[2, 3, 4, 6], 44)?.to_dtype(dtype)?;
                let mean = rand_tensor(&[6], 45)?.to_dtype(dtype)?;
                let var = (rand_tensor(&[6], 46)?.abs()? + 0.5)?.to_dtype(dtype)?;
                let run = |resident: bool, train: bool| -> Result<Vec<Vec<f64>>> {
                    let vs: Vec<Var> = [&x, &gamma, &beta]
                        .iter()
                        .map(|t| Var::from_tensor(t))
                        .collect::<Result<_>>()?;
                    let (xv, gv, bv) = (vs[0].as_tensor(), vs[1].as_tensor(), vs[2].as_tensor());
                    let (y, extra) = match (resident, train) {
                        (false, true) => {
                            let (y, st) = batch_norm_train(xv, gv, bv, 1e-3, act)?;
                            let inv: Vec<f64> =
                                st.var.iter().map(|v| 1.0 / (v + 1e-3).sqrt()).collect();
                            (y, [st.mean, inv].concat())
                        }
                        (true, true) => {
                            let (y, m) = batch_norm_train_resident(xv, gv, bv, 1e-3, act)?;
                            (y, m.flatten_all()?.to_vec1::<f64>()?)
                        }
                        (false, false) => (
                            batch_norm_eval(xv, gv, bv, &mean, &var, 1e-3, act)?,
                            Vec::new(),
                        ),
                        (true, false) => (
                            batch_norm_eval_resident(xv, gv, bv, &mean, &var, 1e-3, act)?,
                            Vec::new(),
                        ),
                    };
                    let grads = (&y * &r)?.sum_all()?.backward()?;
                    let mut out = vec![y.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?, extra];
                    for v in &vs {
                        out.push(
                            grads
                                .get(v)
                                .unwrap()
                                .flatten_all()?
                                .to_dtype(DType::F64)?
                                .to_vec1()?,
                        );
                    }
                    Ok(out)
                };
                for train in [true, false] {
                    let (a, b) = (run(false, train)?, run(true, train)?);
                    for (i, (u, v)) in a.iter().zip(&b).enumerate() {
                        if i == 1 {
                            // Moments: the host path reports var and recomputes inv_std.
                            for (p, q) in u.iter().zip(v) {
                                assert!((p - q).abs() <= 1e-9 * p.abs().max(1.0), "{p} vs {q}");
                            }
                        } else {
                            assert_eq!(u, v, "{dtype:?} {act:?} train={train} output {i}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn resident_gradients_match_finite_differences() -> Result<()> {
        for act in [Activation::None, Activation::Swish] {
            let x = (rand_tensor(&[2, 3, 4, 5], 51)? * 3.0)?;
            let gamma = rand_tensor(&[5], 52)?;
            let beta = rand_tensor(&[5], 53)?;
            check_gradients(
                &[x, gamma, beta],
                |v| Ok(batch_norm_train_resident(&v[0], &v[1], &v[2], 1e-3, act)?.0),
                1e-6,
            )?;
        }
        Ok(())
    }
}
