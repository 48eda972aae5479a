//! Batch normalization over the last (channel) axis fused with an optional swish, for training
//! (batch statistics, gradient through them) and evaluation (given running statistics).
//! Built from stock candle ops this is a dozen full passes per layer forward and backward;
//! fused it is three passes forward and two backward.

use super::{act_f32, contiguous, is_f32_family, store_f32, unsupported, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

mod resident;
pub use resident::{
    batch_norm_eval_resident, batch_norm_train_resident, batch_norm_update_running,
};

/// Activation applied right after the affine transform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// No activation.
    None,
    /// x · sigmoid(x).
    Swish,
}

/// Statistics of one training-mode batch, per channel.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// Mean over all rows.
    pub mean: Vec<f64>,
    /// Biased variance (divided by `count`), the one used for normalization.
    pub var: Vec<f64>,
    /// Number of rows (B·H·W) the statistics were taken over.
    pub count: usize,
}

/// Normalizes `x` (any rank, channels last) with its own batch statistics, then applies
/// `gamma`, `beta` (each `[C]`) and `act`. Returns the output and the batch statistics (for the
/// caller's running averages).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Activation,
) -> Result<(Tensor, BatchStats)> {
    let c = check(x, gamma, beta)?;
    let rows = x.elem_count() / c.max(1);
    if rows == 0 {
        candle_core::bail!("batch_norm_train: empty input {:?}", x.dims());
    }
    let saved = Arc::new(Mutex::new(None));
    let op = BnTrain {
        eps,
        act,
        saved: saved.clone(),
    };
    let y = crate::tape::op3(x, gamma, beta, op)?;
    let stats = saved
        .lock()
        .map_err(|_| candle_core::Error::Msg("batch_norm_train: poisoned lock".into()))?
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch_norm_train: no statistics".into()))?;
    let Saved { mean, inv_std } = stats;
    let var = inv_std.iter().map(|s| 1.0 / (s * s) - eps).collect();
    Ok((
        y,
        BatchStats {
            mean,
            var,
            count: rows,
        },
    ))
}

/// Normalizes `x` with given `mean` and `var` (each `[C]`, e.g. running averages), then applies
/// `gamma`, `beta` and `act`. Gradients flow to `x`, `gamma` and `beta`.
pub fn batch_norm_eval(
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
    let mean: Vec<f64> = mean.to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let var: Vec<f64> = var.to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let inv_std = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let op = BnEval {
        act,
        saved: Saved { mean, inv_std },
    };
    crate::tape::op3(x, gamma, beta, op)
}

fn check(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<usize> {
    let c = match x.dims().last() {
        Some(&c) if x.rank() >= 2 => c,
        _ => candle_core::bail!("batch_norm: input {:?} needs a channel axis", x.dims()),
    };
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!(
            "batch_norm: gamma {:?} / beta {:?} must be [{c}] for input {:?}",
            gamma.dims(),
            beta.dims(),
            x.dims()
        );
    }
    Ok(c)
}

/// Per-channel mean and 1/sqrt(var + eps) used by a forward pass.
#[derive(Clone, Debug)]
struct Saved {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
}

/// y = act(gamma · (x − mean) · inv_std + beta), elementwise over rows.
fn apply<T: Elem>(x: &[T], s: &Saved, gamma: &[T], beta: &[T], act: Activation) -> Vec<T> {
    let c = gamma.len();
    // Fold normalization and affine into one scale and shift per channel.
    let scale: Vec<T> = (0..c)
        .map(|i| T::from64(gamma[i].to64() * s.inv_std[i]))
        .collect();
    let shift: Vec<T> = (0..c)
        .map(|i| T::from64(beta[i].to64() - gamma[i].to64() * s.inv_std[i] * s.mean[i]))
        .collect();
    let chunk = super::chunk_rows(x.len() / c, 256) * c;
    // SAFETY: each part is as long as its chunk of x (a whole number of rows) and
    // `affine_rows` writes every element of it.
    unsafe {
        super::par_filled(x.len(), chunk, |k, yc| {
            let xc = &x[k * chunk..][..yc.len()];
            super::wide_simd(
                #[inline(always)]
                || match act {
                    Activation::None => affine_rows(
                        yc,
                        xc,
                        &scale,
                        &shift,
                        #[inline(always)]
                        |z| z,
                    ),
                    Activation::Swish => affine_rows(
                        yc,
                        xc,
                        &scale,
                        &shift,
                        #[inline(always)]
                        |z| z / (T::one() + (-z).exp_fast()),
                    ),
                },
            )
        })
    }
}

/// y = f(x·scale + shift) row by row, with one monomorphized loop per `f` over zipped slices so
/// that it vectorizes.
#[inline(always)]
fn affine_rows<T: Elem>(
    y: &mut [MaybeUninit<T>],
    x: &[T],
    scale: &[T],
    shift: &[T],
    f: impl Fn(T) -> T,
) {
    let c = scale.len();
    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((y, &x), &s), &b) in yr.iter_mut().zip(xr).zip(scale).zip(shift) {
            y.write(f(x * s + b));
        }
    }
}

fn fwd_storage(
    name: &str,
    s: &Saved,
    act: Activation,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    match s1 {
        // f16/bf16 activations are normalized in f32 with the f32 γ/β, rounded once.
        s1 if is_f32_family(s1) => store_f32(
            apply::<f32>(
                &act_f32(s1, l1)?,
                s,
                contiguous(s2, l2)?,
                contiguous(s3, l3)?,
                act,
            ),
            s1.dtype(),
        ),
        CpuStorage::F64(_) => Ok(CpuStorage::F64(apply::<f64>(
            contiguous(s1, l1)?,
            s,
            contiguous(s2, l2)?,
            contiguous(s3, l3)?,
            act,
        ))),
        s => Err(unsupported(name, s)),
    }
}

/// Per-channel mean and 1/√(var + ε) with one pass over memory. Rows are taken in blocks small
/// enough to stay in cache; each block gets its mean and its centered sum of squares from two
/// passes over the cached block (E[(x − mean)²], which does not cancel like E[x²] − mean²), and
/// blocks are merged with Chan et al.'s pairwise update, all in f64. (Two passes over the whole
/// tensor, then the normalization's third, made the forward read every activation three times.)
fn batch_moments<T: Elem>(x: &[T], c: usize, eps: f64) -> Saved {
    let rows = x.len() / c;
    let chunk = super::chunk_rows(rows, 256) * c;
    let parts: Vec<Moments2> = x
        .par_chunks(chunk)
        .map(|part| {
            let mut acc = Moments2::empty(c);
            let mut block = Moments2::empty(c);
            // ~32 KB of f32 per block: cached for its second pass.
            let block_rows = (8192 / c).max(1);
            for b in part.chunks(block_rows * c) {
                block.set_from_block(b, c);
                acc.merge(&block);
            }
            acc
        })
        .collect();
    let mut total = Moments2::empty(c);
    for p in &parts {
        total.merge(p);
    }
    let n = rows as f64;
    let inv_std = total
        .m2
        .iter()
        .map(|m2| 1.0 / (m2 / n + eps).sqrt())
        .collect();
    Saved {
        mean: total.mean,
        inv_std,
    }
}

/// Row count, per-channel means and centered sums of squares of a set of rows.
struct Moments2 {
    n: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Moments2 {
    fn empty(c: usize) -> Self {
        Moments2 {
            n: 0.0,
            mean: vec![0.0; c],
            m2: vec![0.0; c],
        }
    }

    /// The moments of one block of rows (two passes over it, summed in row order).
    fn set_from_block<T: Elem>(&mut self, block: &[T], c: usize) {
        let n = (block.len() / c) as f64;
        self.n = n;
        let (mean, m2) = (&mut self.mean, &mut self.m2);
        super::wide_simd(
            #[inline(always)]
            || {
                mean.iter_mut().for_each(|m| *m = 0.0);
                for row in block.chunks_exact(c) {
                    for (m, v) in mean.iter_mut().zip(row) {
                        *m += v.to64();
                    }
                }
                mean.iter_mut().for_each(|m| *m /= n);
                m2.iter_mut().for_each(|s| *s = 0.0);
                for row in block.chunks_exact(c) {
                    for ((s, v), m) in m2.iter_mut().zip(row).zip(mean.iter()) {
                        let d = v.to64() - m;
                        *s += d * d;
                    }
                }
            },
        );
    }

    /// Adds `other`'s rows: the pairwise update of Chan, Golub and LeVeque.
    fn merge(&mut self, other: &Moments2) {
        if other.n == 0.0 {
            return;
        }
        let n = self.n + other.n;
        let (wa, wb) = (self.n / n, other.n / n);
        for (((m, s), &mo), &so) in self
            .mean
            .iter_mut()
            .zip(self.m2.iter_mut())
            .zip(&other.mean)
            .zip(&other.m2)
        {
            let delta = mo - *m;
            *s += so + delta * delta * self.n * wb;
            *m = *m * wa + mo * wb;
        }
        self.n = n;
    }
}

/// Batch moments on the GPU, in two passes as on the CPU (the mean, then the centered sum of
/// squares): per-channel mean and 1/√(var + ε), f64, each `[C]`.
#[cfg(feature = "cuda")]
fn cuda_moments(
    op: &str,
    dev: &candle_core::CudaDevice,
    x: &super::cuda::ActView<'_>,
    rows: usize,
    c: usize,
    eps: f64,
) -> Result<(
    candle_core::cuda_backend::cudarc::driver::CudaSlice<f64>,
    candle_core::cuda_backend::cudarc::driver::CudaSlice<f64>,
)> {
    let mean = super::cuda::zeros::<f64>(dev, c)?;
    let inv = super::cuda::zeros::<f64>(dev, c)?;
    let halves = (&mean.slice(0..c), &inv.slice(0..c));
    cuda_moments_into(op, dev, x, (rows, c), eps, halves)?;
    Ok((mean, inv))
}

/// [`cuda_moments`] into zeroed buffers `mean` and `inv` (`[C]` each; they may be the two
/// halves of one `[2, C]` buffer): four launches.
#[cfg(feature = "cuda")]
fn cuda_moments_into(
    op: &str,
    dev: &candle_core::CudaDevice,
    x: &super::cuda::ActView<'_>,
    (rows, c): (usize, usize),
    eps: f64,
    (mean, inv): (
        &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f64>,
        &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f64>,
    ),
) -> Result<()> {
    use super::cuda::{self, PushKernelArg};
    let (c32, c64, rows64) = (cuda::int(op, c)?, c as i64, rows as i64);
    let k = cuda::kernel_for(dev, "col_sum", x.dtype())?;
    let mut b = k.builder();
    x.push(&mut b);
    b.arg(mean).arg(&rows64).arg(&c32);
    cuda::launch(b, cuda::column_reduction(rows, c, 1))?;
    let k = cuda::Kernel::new(dev, "scale_f64")?;
    let inv_n = 1.0 / rows as f64;
    let mut b = k.builder();
    b.arg(mean).arg(&inv_n).arg(&c64);
    cuda::launch(b, cuda::elementwise(c))?;
    let k = cuda::kernel_for(dev, "col_sq_dev", x.dtype())?;
    let mut b = k.builder();
    x.push(&mut b);
    b.arg(mean).arg(inv).arg(&rows64).arg(&c32);
    cuda::launch(b, cuda::column_reduction(rows, c, 1))?;
    let k = cuda::Kernel::new(dev, "bn_inv_std")?;
    let n_f = rows as f64;
    let mut b = k.builder();
    b.arg(inv).arg(&n_f).arg(&eps).arg(&c32);
    cuda::launch(b, cuda::elementwise(c))
}

/// y = act(γ·(x − mean)·inv_std + β) on the GPU, from device-side f64 statistics.
#[cfg(feature = "cuda")]
fn cuda_apply(
    op: &str,
    act: Activation,
    (s1, l1): (&candle_core::CudaStorage, &Layout),
    (s2, l2): (&candle_core::CudaStorage, &Layout),
    (s3, l3): (&candle_core::CudaStorage, &Layout),
    mean: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f64>,
    inv: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f64>,
) -> Result<candle_core::CudaStorage> {
    use super::cuda::{self, PushKernelArg};
    let dev = s1.device();
    let c = l2.shape().elem_count();
    let n = l1.shape().elem_count();
    let x = cuda::act_view(op, s1, l1)?;
    let gamma = cuda::f32_view(op, s2, l2)?;
    let beta = cuda::f32_view(op, s3, l3)?;
    let scale = cuda::alloc::<f32>(dev, c)?;
    let shift = cuda::alloc::<f32>(dev, c)?;
    let c32 = cuda::int(op, c)?;
    let k = cuda::Kernel::new(dev, "bn_scale_shift")?;
    let mut b = k.builder();
    b.arg(&gamma)
        .arg(&beta)
        .arg(mean)
        .arg(inv)
        .arg(&scale)
        .arg(&shift)
        .arg(&c32);
    cuda::launch(b, cuda::elementwise(c))?;
    let y = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
    let k = cuda::kernel_for(dev, "bn_apply", x.dtype())?;
    let (n64, act32) = (n as i64, (act == Activation::Swish) as i32);
    let mut b = k.builder();
    x.push(&mut b);
    b.arg(&scale).arg(&shift);
    y.push(&mut b);
    b.arg(&n64).arg(&c32).arg(&act32);
    cuda::launch(b, cuda::elementwise_ilp(n))?;
    Ok(y.wrap(dev))
}

struct BnTrain {
    eps: f64,
    act: Activation,
    /// Filled by the forward pass; read by the caller (running stats) and by the backward pass.
    saved: Arc<Mutex<Option<Saved>>>,
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-train"
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
        let c = l2.shape().elem_count();
        let saved = match s1 {
            s1 if is_f32_family(s1) => batch_moments::<f32>(&act_f32(s1, l1)?, c, self.eps),
            CpuStorage::F64(_) => batch_moments::<f64>(contiguous(s1, l1)?, c, self.eps),
            s => return Err(unsupported(self.name(), s)),
        };
        let out = fwd_storage(self.name(), &saved, self.act, (s1, l1), (s2, l2), (s3, l3))?;
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: poisoned lock".into()))? =
            Some(saved);
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
        use super::cuda;
        let dev = s1.device();
        let c = l2.shape().elem_count();
        let n = l1.shape().elem_count();
        let rows = n / c.max(1);
        let x = cuda::act_view(self.name(), s1, l1)?;
        let (mean, inv) = cuda_moments(self.name(), dev, &x, rows, c, self.eps)?;
        let y = cuda_apply(
            self.name(),
            self.act,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            &mean,
            &inv,
        )?;
        // The caller's running averages and the backward pass read the statistics on the host.
        let saved = Saved {
            mean: cuda::to_host(dev, &mean)?,
            inv_std: cuda::to_host(dev, &inv)?,
        };
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: poisoned lock".into()))? =
            Some(saved);
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: poisoned lock".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch_norm: backward before forward".into()))?;
        backward(x, gamma, beta, grad, saved, self.act, true)
    }
}

struct BnEval {
    act: Activation,
    saved: Saved,
}

impl CustomOp3 for BnEval {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-eval"
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
        let out = fwd_storage(
            self.name(),
            &self.saved,
            self.act,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )?;
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
        use super::cuda;
        let dev = s1.device();
        let mean = cuda::to_device(dev, &self.saved.mean)?;
        let inv = cuda::to_device(dev, &self.saved.inv_std)?;
        let y = cuda_apply(
            self.name(),
            self.act,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            &mean,
            &inv,
        )?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward(x, gamma, beta, grad, self.saved.clone(), self.act, false)
    }
}

fn backward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    grad: &Tensor,
    saved: Saved,
    act: Activation,
    train: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let to64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>();
    let params = Params {
        saved,
        gamma: to64(gamma)?,
        beta: to64(beta)?,
        act,
    };
    let grad = grad.contiguous()?;
    if x.device().is_cpu() && act == Activation::Swish {
        return cpu_swish_backward(x, gamma, beta, &grad, params, train);
    }
    // sums[0] = Σ g_z = dβ, sums[1] = Σ g_z·x̂ = dγ, with g_z the gradient before the activation.
    let sums = x.apply_op2_no_bwd(&grad, &BnGradReduce { p: params.clone() })?;
    let sums_v: Vec<Vec<f64>> = sums.to_dtype(candle_core::DType::F64)?.to_vec2()?;
    let dx = x.apply_op2_no_bwd(
        &grad,
        &BnGradInput {
            p: params,
            sum_g: sums_v[0].clone(),
            sum_gx: sums_v[1].clone(),
            train,
        },
    )?;
    let dbeta = sums.get(0)?.to_dtype(beta.dtype())?;
    let dgamma = sums.get(1)?.to_dtype(gamma.dtype())?;
    Ok((Some(dx), Some(dgamma), Some(dbeta)))
}

/// [`backward`] on the CPU for BN + swish: [`BnSwishGradCpu`] stores g_z while it sums, so the
/// input-gradient pass needs no second sigmoid; dγ and dβ come back through the op.
fn cpu_swish_backward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    grad: &Tensor,
    p: Params,
    train: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let op = BnSwishGradCpu {
        p,
        train,
        sums: Mutex::new(None),
    };
    let dx = x.contiguous()?.apply_op2_no_bwd(grad, &op)?;
    let (sum_g, sum_gx) = op
        .sums
        .lock()
        .map_err(|_| candle_core::Error::Msg("batch_norm: poisoned lock".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("batch_norm: no gradient sums".into()))?;
    // As [`BnGradReduce`] returns them: rounded to f32 for f32/f16/bf16 activations.
    let sums_dtype = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let to_param = |v: Vec<f64>, like: &Tensor| -> Result<Tensor> {
        let n = v.len();
        Tensor::from_vec(v, n, x.device())?
            .to_dtype(sums_dtype)?
            .to_dtype(like.dtype())
    };
    let dbeta = to_param(sum_g, beta)?;
    let dgamma = to_param(sum_gx, gamma)?;
    Ok((Some(dx), Some(dgamma), Some(dbeta)))
}

/// (x, grad) → dx for BN + swish on the CPU, in two passes like [`BnGradReduce`] then
/// [`BnGradInput`], except that the first also writes g_z (the gradient before the swish) and
/// the second turns it into dx in place: per element one sigmoid instead of two, for one more
/// activation-sized write. The sums Σg_z and Σg_z·x̂ (dβ, dγ) are left in `sums`.
struct BnSwishGradCpu {
    p: Params,
    train: bool,
    sums: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
}

impl BnSwishGradCpu {
    fn run<T: Elem>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let ch = Chan::<T>::new(&self.p);
        let c = self.p.gamma.len();
        let rows = x.len() / c;
        let chunk = super::chunk_rows(rows, 256) * c;
        let mut gz: Vec<T> = Vec::with_capacity(x.len());
        let parts: Vec<(Vec<f64>, Vec<f64>)> = gz.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .map(|(zc, (xc, gc))| {
                super::wide_simd(
                    #[inline(always)]
                    || grad_sums_storing(&ch, xc, gc, zc),
                )
            })
            .collect();
        // SAFETY: the chunks of gz's spare capacity cover 0..x.len() (they pair with x's
        // chunks, which do), and `grad_sums_storing` writes every element of its chunk.
        unsafe { gz.set_len(x.len()) };
        let (mut sum_g, mut sum_gx) = (vec![0f64; c], vec![0f64; c]);
        for (sg, sgx) in &parts {
            sum_g.iter_mut().zip(sg).for_each(|(a, v)| *a += v);
            sum_gx.iter_mut().zip(sgx).for_each(|(a, v)| *a += v);
        }
        let input = BnGradInput {
            p: self.p.clone(),
            sum_g,
            sum_gx,
            train: self.train,
        };
        let (k, off, slope) = input.coefficients::<T>(rows);
        gz.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(dc, xc)| {
                super::wide_simd(
                    #[inline(always)]
                    || {
                        for (dr, xr) in dc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                            for (((d, &x), ((&k, &off), &slope)), (&mean, &inv)) in dr
                                .iter_mut()
                                .zip(xr)
                                .zip(k.iter().zip(&off).zip(&slope))
                                .zip(ch.mean.iter().zip(&ch.inv))
                            {
                                let xhat = (x - mean) * inv;
                                *d = k * *d - off - xhat * slope;
                            }
                        }
                    },
                )
            });
        *self.sums.lock().unwrap_or_else(|e| e.into_inner()) = Some((input.sum_g, input.sum_gx));
        gz
    }
}

/// [`grad_sums`] for swish that also stores each g_z into `gz`.
#[inline(always)]
fn grad_sums_storing<T: Elem>(
    ch: &Chan<T>,
    x: &[T],
    g: &[T],
    gz: &mut [MaybeUninit<T>],
) -> (Vec<f64>, Vec<f64>) {
    let c = ch.mean.len();
    let mut sg = vec![0f64; c];
    let mut sgx = vec![0f64; c];
    let mut lg = vec![T::zero(); c];
    let mut lgx = vec![T::zero(); c];
    let flush = |sg: &mut [f64], sgx: &mut [f64], lg: &mut [T], lgx: &mut [T]| {
        for i in 0..c {
            sg[i] += lg[i].to64();
            sgx[i] += lgx[i].to64();
            lg[i] = T::zero();
            lgx[i] = T::zero();
        }
    };
    let rows = x
        .chunks_exact(c)
        .zip(g.chunks_exact(c))
        .zip(gz.chunks_exact_mut(c));
    for (r, ((xr, gr), zr)) in rows.enumerate() {
        let sums = lg.iter_mut().zip(lgx.iter_mut());
        let cols = xr.iter().zip(gr).zip(zr.iter_mut());
        for ((((&x, &g), z), consts), (lg, lgx)) in cols.zip(ch.iter()).zip(sums) {
            let (xhat, gz) = xhat_gz::<T, true>(x, g, consts);
            z.write(gz);
            *lg += gz;
            *lgx += gz * xhat;
        }
        if r % 64 == 63 {
            flush(&mut sg, &mut sgx, &mut lg, &mut lgx);
        }
    }
    flush(&mut sg, &mut sgx, &mut lg, &mut lgx);
    (sg, sgx)
}

impl CustomOp2 for BnSwishGradCpu {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-swish-grad-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        // `run` pairs x's chunks with g's: they must have the same length to cover the output.
        let c = self.p.gamma.len();
        if l2.shape() != &shape || c == 0 || !shape.elem_count().is_multiple_of(c) {
            candle_core::bail!(
                "{}: gradient {:?} does not match input {:?} with {c} channels",
                self.name(),
                l2.dims(),
                l1.dims()
            );
        }
        let out = elementwise2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, g| self.run::<f32>(x, g),
            |x, g| self.run::<f64>(x, g),
        )?;
        Ok((out, shape))
    }
}

/// An activation-shaped result of (x, g) on the CPU: f32, f16 and bf16 inputs computed in f32
/// and stored in x's dtype, f64 in f64.
fn elementwise2(
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_op: impl Fn(&[f32], &[f32]) -> Vec<f32>,
    f64_op: impl Fn(&[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    match s1 {
        s1 if is_f32_family(s1) => {
            store_f32(f32_op(&act_f32(s1, l1)?, &act_f32(s2, l2)?), s1.dtype())
        }
        CpuStorage::F64(_) => Ok(CpuStorage::F64(f64_op(
            contiguous(s1, l1)?,
            contiguous(s2, l2)?,
        ))),
        s => Err(unsupported(name, s)),
    }
}

#[derive(Clone, Debug)]
struct Params {
    saved: Saved,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    act: Activation,
}

impl Params {
    /// [mean, inv_std, γ, β] per channel as f32, the layout of the CUDA kernels' `chan`
    /// argument (the same f32 roundings as [`Chan`]).
    #[cfg(feature = "cuda")]
    fn channel_constants(&self) -> Vec<f32> {
        let s = &self.saved;
        [&s.mean, &s.inv_std, &self.gamma, &self.beta]
            .into_iter()
            .flat_map(|v| v.iter().map(|&x| x as f32))
            .collect()
    }
}

/// Per-channel constants in the element type, so the elementwise work stays in f32.
struct Chan<T> {
    mean: Vec<T>,
    inv: Vec<T>,
    gamma: Vec<T>,
    beta: Vec<T>,
    act: Activation,
}

impl<T: Elem> Chan<T> {
    fn new(p: &Params) -> Self {
        let conv = |v: &[f64]| v.iter().map(|&x| T::from64(x)).collect::<Vec<T>>();
        Chan {
            mean: conv(&p.saved.mean),
            inv: conv(&p.saved.inv_std),
            gamma: conv(&p.gamma),
            beta: conv(&p.beta),
            act: p.act,
        }
    }

    /// The channels' constants in order, for zipping with a row (no bounds checks, so the
    /// loops vectorize).
    fn iter(&self) -> impl Iterator<Item = ChanConsts<'_, T>> + '_ {
        let consts = self.gamma.iter().zip(&self.beta);
        self.mean.iter().zip(&self.inv).zip(consts)
    }
}

/// One channel's (mean, inv_std) and (γ, β).
type ChanConsts<'a, T> = ((&'a T, &'a T), (&'a T, &'a T));

/// (x̂, g_z) for one element. The activation is a constant parameter so each caller's loop is
/// compiled once per activation, branch-free.
#[inline(always)]
fn xhat_gz<T: Elem, const SWISH: bool>(
    x: T,
    g: T,
    ((&mean, &inv), (&gamma, &beta)): ChanConsts<'_, T>,
) -> (T, T) {
    let xhat = (x - mean) * inv;
    let gz = if SWISH {
        let z = gamma * xhat + beta;
        let s = z.sigmoid();
        g * s * (T::one() + z * (T::one() - s))
    } else {
        g
    };
    (xhat, gz)
}

/// (x, grad) → `[2, C]`: Σ g_z and Σ g_z·x̂ per channel.
struct BnGradReduce {
    p: Params,
}

impl BnGradReduce {
    fn run<T: Elem>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let ch = Chan::<T>::new(&self.p);
        let c = self.p.gamma.len();
        let rows = x.len() / c;
        let chunk = super::chunk_rows(rows, 256) * c;
        let (sg, sgx) = x
            .par_chunks(chunk)
            .zip(g.par_chunks(chunk))
            .map(|(xc, gc)| {
                super::wide_simd(
                    #[inline(always)]
                    || match ch.act {
                        Activation::None => grad_sums::<T, false>(&ch, xc, gc),
                        Activation::Swish => grad_sums::<T, true>(&ch, xc, gc),
                    },
                )
            })
            .reduce(
                || (vec![0f64; c], vec![0f64; c]),
                |(mut a, mut b), (c2, d)| {
                    a.iter_mut().zip(&c2).for_each(|(a, v)| *a += v);
                    b.iter_mut().zip(&d).for_each(|(b, v)| *b += v);
                    (a, b)
                },
            );
        sg.into_iter().chain(sgx).map(T::from64).collect()
    }
}

/// Σ g_z and Σ g_z·x̂ per channel over the rows of one chunk, in f64: element-type partial sums
/// flushed to f64 every 64 rows.
#[inline(always)]
fn grad_sums<T: Elem, const SWISH: bool>(ch: &Chan<T>, x: &[T], g: &[T]) -> (Vec<f64>, Vec<f64>) {
    let c = ch.mean.len();
    let mut sg = vec![0f64; c];
    let mut sgx = vec![0f64; c];
    let mut lg = vec![T::zero(); c];
    let mut lgx = vec![T::zero(); c];
    let flush = |sg: &mut [f64], sgx: &mut [f64], lg: &mut [T], lgx: &mut [T]| {
        for i in 0..c {
            sg[i] += lg[i].to64();
            sgx[i] += lgx[i].to64();
            lg[i] = T::zero();
            lgx[i] = T::zero();
        }
    };
    for (r, (xr, gr)) in x.chunks_exact(c).zip(g.chunks_exact(c)).enumerate() {
        let sums = lg.iter_mut().zip(lgx.iter_mut());
        for (((&x, &g), consts), (lg, lgx)) in xr.iter().zip(gr).zip(ch.iter()).zip(sums) {
            let (xhat, gz) = xhat_gz::<T, SWISH>(x, g, consts);
            *lg += gz;
            *lgx += gz * xhat;
        }
        if r % 64 == 63 {
            flush(&mut sg, &mut sgx, &mut lg, &mut lgx);
        }
    }
    flush(&mut sg, &mut sgx, &mut lg, &mut lgx);
    (sg, sgx)
}

impl CustomOp2 for BnGradReduce {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-grad-reduce"
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
        let dev = s1.device();
        let c = self.p.gamma.len();
        let rows = l1.shape().elem_count() / c.max(1);
        let x = cuda::act_view(self.name(), s1, l1)?;
        let g = cuda::act_view(self.name(), s2, l2)?;
        let chan = cuda::to_device(dev, &self.p.channel_constants())?;
        let sums = cuda::zeros::<f64>(dev, 2 * c)?;
        let k = cuda::kernel_for(dev, "bn_grad_reduce", x.dtype())?;
        let (rows64, c32) = (rows as i64, cuda::int(self.name(), c)?);
        let act32 = (self.p.act == Activation::Swish) as i32;
        let mut b = k.builder();
        x.push(&mut b);
        g.push(&mut b);
        b.arg(&chan).arg(&sums).arg(&rows64).arg(&c32).arg(&act32);
        cuda::launch(b, cuda::column_reduction(rows, c, 1))?;
        let out = cuda::f64_to_f32(dev, &sums, 2 * c, 1.0)?;
        Ok((cuda::wrap(dev, out), Shape::from((2, c))))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((2, self.p.gamma.len()));
        match s1 {
            // The sums are γ/β gradients: f32 whatever the activations.
            s1 if is_f32_family(s1) => Ok((
                CpuStorage::F32(self.run::<f32>(&act_f32(s1, l1)?, &act_f32(s2, l2)?)),
                shape,
            )),
            CpuStorage::F64(_) => Ok((
                CpuStorage::F64(self.run::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?)),
                shape,
            )),
            s => Err(unsupported(self.name(), s)),
        }
    }
}

/// (x, grad) → dx. Training mode includes the terms through the batch mean and variance:
/// dx = γ·inv_std·(g_z − (Σg_z + x̂·Σg_z·x̂)/N); evaluation mode is dx = γ·inv_std·g_z.
struct BnGradInput {
    p: Params,
    sum_g: Vec<f64>,
    sum_gx: Vec<f64>,
    train: bool,
}

impl BnGradInput {
    /// Per-channel (k, off, slope) of dx = k·g_z − off − x̂·slope: k = γ·inv_std, and in
    /// training off = (k/N)·Σg_z, slope = (k/N)·Σg_z·x̂ (the terms through the batch moments).
    #[allow(clippy::type_complexity)]
    fn coefficients<T: Elem>(&self, rows: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
        let c = self.p.gamma.len();
        let n = rows as f64;
        let k: Vec<T> = (0..c)
            .map(|i| T::from64(self.p.gamma[i] * self.p.saved.inv_std[i]))
            .collect();
        let (off, slope): (Vec<T>, Vec<T>) = (0..c)
            .map(|i| {
                if self.train {
                    let kk = self.p.gamma[i] * self.p.saved.inv_std[i] / n;
                    (
                        T::from64(kk * self.sum_g[i]),
                        T::from64(kk * self.sum_gx[i]),
                    )
                } else {
                    (T::zero(), T::zero())
                }
            })
            .unzip();
        (k, off, slope)
    }

    fn run<T: Elem>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let ch = Chan::<T>::new(&self.p);
        let rows = x.len() / self.p.gamma.len();
        let (k, off, slope) = self.coefficients::<T>(rows);
        grad_input(x, g, &ch, &k, &off, &slope)
    }
}

/// dx = k·g_z − off − x̂·slope elementwise, with per-channel constants.
fn grad_input<T: Elem>(x: &[T], g: &[T], ch: &Chan<T>, k: &[T], off: &[T], slope: &[T]) -> Vec<T> {
    let c = k.len();
    let rows = x.len() / c;
    let chunk = super::chunk_rows(rows, 256) * c;
    let swish = ch.act == Activation::Swish;
    // SAFETY: each part is as long as its chunks of x and g (whole rows), and
    // `grad_input_row` writes every element of every row.
    unsafe {
        super::par_filled(x.len(), chunk, |i, dc| {
            let (xc, gc) = (&x[i * chunk..][..dc.len()], &g[i * chunk..][..dc.len()]);
            super::wide_simd(
                #[inline(always)]
                || {
                    for (dr, (xr, gr)) in dc
                        .chunks_exact_mut(c)
                        .zip(xc.chunks_exact(c).zip(gc.chunks_exact(c)))
                    {
                        // Two copies of the loop, each with a constant activation.
                        if swish {
                            grad_input_row::<T, true>(dr, xr, gr, ch, (k, off, slope));
                        } else {
                            grad_input_row::<T, false>(dr, xr, gr, ch, (k, off, slope));
                        }
                    }
                },
            )
        })
    }
}

/// dx = k·g_z − off − x̂·slope over one row.
#[inline(always)]
fn grad_input_row<T: Elem, const SWISH: bool>(
    dx: &mut [MaybeUninit<T>],
    x: &[T],
    g: &[T],
    ch: &Chan<T>,
    (k, off, slope): (&[T], &[T], &[T]),
) {
    let coef = k.iter().zip(off).zip(slope);
    let inputs = x.iter().zip(g).zip(ch.iter());
    for ((d, ((&x, &g), consts)), ((&k, &off), &slope)) in dx.iter_mut().zip(inputs).zip(coef) {
        let (xhat, gz) = xhat_gz::<T, SWISH>(x, g, consts);
        d.write(k * gz - off - xhat * slope);
    }
}

impl CustomOp2 for BnGradInput {
    fn name(&self) -> &'static str {
        "effdet-batch-norm-grad-input"
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
        let dev = s1.device();
        let c = self.p.gamma.len();
        let n = l1.shape().elem_count();
        let x = cuda::act_view(self.name(), s1, l1)?;
        let g = cuda::act_view(self.name(), s2, l2)?;
        let chan = cuda::to_device(dev, &self.p.channel_constants())?;
        let (k_, off, slope) = self.coefficients::<f32>(n / c.max(1));
        let coef: Vec<f32> = k_.into_iter().chain(off).chain(slope).collect();
        let coef = cuda::to_device(dev, &coef)?;
        let dx = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
        let k = cuda::kernel_for(dev, "bn_grad_input", x.dtype())?;
        let (n64, c32) = (n as i64, cuda::int(self.name(), c)?);
        let act32 = (self.p.act == Activation::Swish) as i32;
        let mut b = k.builder();
        x.push(&mut b);
        g.push(&mut b);
        b.arg(&chan).arg(&coef);
        dx.push(&mut b);
        b.arg(&n64).arg(&c32).arg(&act32);
        cuda::launch(b, cuda::elementwise_ilp(n))?;
        Ok((dx.wrap(dev), l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let out = elementwise2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, g| self.run::<f32>(x, g),
            |x, g| self.run::<f64>(x, g),
        )?;
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::Device;

    /// The CPU's BN + swish backward with stored g_z gives what the two general ops give
    /// (reduction, then input gradient): dx elementwise, dγ and dβ, in training and evaluation
    /// mode, over several parallel chunks (the sums may add chunk partials in another order).
    #[test]
    fn stored_gz_backward_equals_the_two_pass_ops() -> Result<()> {
        let (rows, c) = (5000, 24);
        let x = (rand_tensor(&[rows, c], 31)? * 2.0)?.to_dtype(DType::F32)?;
        let g = rand_tensor(&[rows, c], 32)?.to_dtype(DType::F32)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let saved = batch_moments(&xs, c, 1e-3);
        let p = Params {
            saved,
            gamma: (0..c).map(|i| 0.5 + 0.1 * i as f64).collect(),
            beta: (0..c).map(|i| 0.2 - 0.05 * i as f64).collect(),
            act: Activation::Swish,
        };
        for train in [true, false] {
            let sums = x.apply_op2_no_bwd(&g, &BnGradReduce { p: p.clone() })?;
            let sums_v: Vec<Vec<f64>> = sums.to_dtype(DType::F64)?.to_vec2()?;
            let want = x.apply_op2_no_bwd(
                &g,
                &BnGradInput {
                    p: p.clone(),
                    sum_g: sums_v[0].clone(),
                    sum_gx: sums_v[1].clone(),
                    train,
                },
            )?;
            let op = BnSwishGradCpu {
                p: p.clone(),
                train,
                sums: Mutex::new(None),
            };
            let got = x.apply_op2_no_bwd(&g, &op)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * scale,
                "train {train}: dx differs by {diff} (max {scale})"
            );
            let (sg, sgx) = op.sums.lock().unwrap().take().unwrap();
            for (got, want) in [(sg, &sums_v[0]), (sgx, &sums_v[1])] {
                for (a, b) in got.iter().zip(want) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
        Ok(())
    }

    /// The blocked one-pass moments equal a plain two-pass f64 computation, over uneven
    /// blocks and chunks (5 channels: 1638-row blocks; 70,001 rows: several chunks and a short
    /// last block) and with a mean 10⁴ standard deviations from zero, where E[x²] − mean²
    /// would have lost most of the variance's digits in f32 and some in f64.
    #[test]
    fn blocked_moments_equal_two_pass_moments() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let c = 5;
        let x: Vec<f64> = (0..70_001 * c)
            .map(|i| 1e4 * (i % c) as f64 + rng.gen_range(-1.0..1.0))
            .collect();
        let got = batch_moments(&x, c, 1e-3);
        let n = (x.len() / c) as f64;
        for ch in 0..c {
            let col = || x.iter().skip(ch).step_by(c);
            let mean = col().sum::<f64>() / n;
            let var = col().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let inv = 1.0 / (var + 1e-3).sqrt();
            assert!(
                (got.mean[ch] - mean).abs() <= 1e-12 * mean.abs().max(1.0),
                "mean {ch}"
            );
            assert!((got.inv_std[ch] - inv).abs() <= 1e-12 * inv, "inv_std {ch}");
        }
    }

    #[test]
    fn hand_computed_train_and_eval() -> Result<()> {
        let dev = Device::Cpu;
        // Two channels over 4 rows: channel 0 = [1, 2, 3, 4] (mean 2.5, var 1.25),
        // channel 1 = [0, 0, 0, 8] (mean 2, var 12).
        let x = Tensor::from_vec(vec![1f64, 0., 2., 0., 3., 0., 4., 8.], (4, 2), &dev)?;
        let gamma = Tensor::from_vec(vec![2f64, 1.], 2, &dev)?;
        let beta = Tensor::from_vec(vec![0.5f64, -1.], 2, &dev)?;
        let eps = 1e-3;
        let (y, stats) = batch_norm_train(&x, &gamma, &beta, eps, Activation::None)?;
        assert_eq!(stats.count, 4);
        assert!((stats.mean[0] - 2.5).abs() < 1e-12 && (stats.mean[1] - 2.0).abs() < 1e-12);
        assert!((stats.var[0] - 1.25).abs() < 1e-9 && (stats.var[1] - 12.0).abs() < 1e-9);
        let y = y.to_vec2::<f64>()?;
        let want0 = 2.0 * (1.0 - 2.5) / (1.25f64 + eps).sqrt() + 0.5;
        let want1 = (8.0 - 2.0) / (12.0f64 + eps).sqrt() - 1.0;
        assert!((y[0][0] - want0).abs() < 1e-12);
        assert!((y[3][1] - want1).abs() < 1e-12);

        // Eval with given statistics, then swish.
        let mean = Tensor::from_vec(vec![1f64, -1.], 2, &dev)?;
        let var = Tensor::from_vec(vec![4f64, 0.25], 2, &dev)?;
        let ye = batch_norm_eval(&x, &gamma, &beta, &mean, &var, eps, Activation::Swish)?;
        let ye = ye.to_vec2::<f64>()?;
        let z = 2.0 * (3.0 - 1.0) / (4.0f64 + eps).sqrt() + 0.5; // row 2, channel 0
        let want = z / (1.0 + (-z).exp());
        assert!((ye[2][0] - want).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn train_gradients_match_finite_differences() -> Result<()> {
        for act in [Activation::None, Activation::Swish] {
            let x = (rand_tensor(&[2, 3, 4, 5], 21)? * 3.0)?;
            let gamma = rand_tensor(&[5], 22)?;
            let beta = rand_tensor(&[5], 23)?;
            check_gradients(
                &[x, gamma, beta],
                |v| Ok(batch_norm_train(&v[0], &v[1], &v[2], 1e-3, act)?.0),
                1e-6,
            )?;
        }
        Ok(())
    }

    #[test]
    fn eval_gradients_match_finite_differences() -> Result<()> {
        let mean = rand_tensor(&[4], 31)?;
        let var = (rand_tensor(&[4], 32)?.abs()? + 0.5)?;
        for act in [Activation::None, Activation::Swish] {
            let x = rand_tensor(&[2, 3, 3, 4], 33)?;
            let gamma = rand_tensor(&[4], 34)?;
            let beta = rand_tensor(&[4], 35)?;
            check_gradients(
                &[x, gamma, beta],
                |v| batch_norm_eval(&v[0], &v[1], &v[2], &mean, &var, 1e-3, act),
                1e-6,
            )?;
        }
        Ok(())
    }
}
