//! Per-channel broadcasts on channels-last tensors with reduction-based backward passes:
//! bias addition, the squeeze-and-excitation gate and the spatial mean. Candle's generic
//! broadcast backward (sum over broadcast axes) is an order of magnitude slower here.

use super::{act_f32, contiguous, is_f32_family, store_f32, unsupported, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x` `[..., C]` + `bias` `[C]` (f32 bias for f32/f16/bf16 `x`; the output has `x`'s dtype).
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c = x.dims().last().copied().unwrap_or(0);
    if bias.dims() != [c] {
        candle_core::bail!(
            "add_channel_bias: bias {:?} does not match input {:?}",
            bias.dims(),
            x.dims()
        );
    }
    crate::tape::op2(x, bias, BiasAdd)
}

/// `x` `[B, H, W, C]` · `gate` `[B, C]` broadcast over H and W. The gate is f32 for an f32,
/// f16 or bf16 `x` (f64 for f64) and so is its gradient, a sum over H·W that overflows f16
/// long before any loss scale is too large for the activations (the output has `x`'s dtype).
pub fn channel_gate(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (b, _, _, c) = x.dims4()?;
    if gate.dims() != [b, c] {
        candle_core::bail!(
            "channel_gate: gate {:?} does not match input {:?}",
            gate.dims(),
            x.dims()
        );
    }
    if gate.dtype() != reduced_dtype(x.dtype()) {
        candle_core::bail!(
            "channel_gate: a {:?} input takes a {:?} gate, got {:?}",
            x.dtype(),
            reduced_dtype(x.dtype()),
            gate.dtype()
        );
    }
    crate::tape::op2(x, gate, Gate)
}

/// The dtype of per-channel values derived from an activation of dtype `act` (gates, spatial
/// means): f32 for f32, f16 and bf16, f64 for f64.
pub fn reduced_dtype(act: DType) -> DType {
    if act == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x` `[B, H, W, C]` · `scale[b]` for a constant per-sample `scale` `[B]` (drop-connect's
/// keep mask): the gate kernel, with no gradient for the scale. candle's `broadcast_mul`
/// would also compute the scale's gradient (a full product, a zero-filled full-size buffer and
/// a reduction over the broadcast axes) and throw it away.
pub fn scale_samples(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (b, _, _, c) = x.dims4()?;
    if scale.dims() != [b] {
        candle_core::bail!(
            "scale_samples: scale {:?} does not match input {:?}",
            scale.dims(),
            x.dims()
        );
    }
    let gate = scale
        .detach()
        .to_dtype(reduced_dtype(x.dtype()))?
        .reshape((b, 1))?
        .broadcast_as((b, c))?
        .contiguous()?;
    crate::tape::op2(x, &gate, SampleScale)
}

/// [`Gate`] without a gradient for the gate.
struct SampleScale;

impl CustomOp2 for SampleScale {
    fn name(&self) -> &'static str {
        "effdet-scale-samples"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Gate.cpu_fwd(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Gate.cuda_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.contiguous()?.apply_op2_no_bwd(gate, &Gate)?), None))
    }
}

/// Mean of `x` `[B, H, W, C]` over H and W → `[B, C]`, in f32 for an f32, f16 or bf16 `x`
/// (f64 for f64; see [`reduced_dtype`]): the squeeze-and-excitation branch that it feeds runs
/// in f32 (tiny tensors), so its gradients cannot overflow a 16-bit type.
pub fn spatial_mean(x: &Tensor) -> Result<Tensor> {
    x.dims4()?;
    crate::tape::op1(x, SpatialMean)
}

fn sum_rows<T: Elem>(g: &[T], c: usize) -> Vec<T> {
    sum_rows_f64(g, c).into_iter().map(T::from64).collect()
}

/// Column sums of a `[rows, c]` buffer, accumulated in f64.
fn sum_rows_f64<T: Elem>(g: &[T], c: usize) -> Vec<f64> {
    let rows = g.len() / c;
    let chunk = super::chunk_rows(rows, 256) * c;
    let acc = g
        .par_chunks(chunk)
        .map(|part| {
            let mut local = vec![T::zero(); c];
            let mut acc = vec![0f64; c];
            for (i, row) in part.chunks_exact(c).enumerate() {
                for (l, &v) in local.iter_mut().zip(row) {
                    *l += v;
                }
                // Flush to f64 every 64 rows so long sums keep their precision.
                if i % 64 == 63 {
                    for (a, l) in acc.iter_mut().zip(local.iter_mut()) {
                        *a += l.to64();
                        *l = T::zero();
                    }
                }
            }
            for (a, l) in acc.iter_mut().zip(&local) {
                *a += l.to64();
            }
            acc
        })
        .reduce(
            || vec![0f64; c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    acc
}

/// The data of an f32 per-channel input: a bias or a gate (the second reader of [`dispatch2`]).
fn f32_param<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    contiguous::<f32>(s, l)
}

/// CPU forward of a two-input op `$f`: both f64, or an f32/f16/bf16 activation computed in f32
/// with its second input read by `$second`; the result has the activation's dtype.
macro_rules! dispatch2 {
    ($name:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $shape:expr, $f:ident, $second:ident) => {
        match $s1 {
            s if is_f32_family(s) => Ok((
                store_f32(
                    $f::<f32>(&act_f32($s1, $l1)?, &*$second($s2, $l2)?, $l1)?,
                    s.dtype(),
                )?,
                $shape,
            )),
            CpuStorage::F64(_) => Ok((
                CpuStorage::F64($f::<f64>(
                    contiguous($s1, $l1)?,
                    contiguous($s2, $l2)?,
                    $l1,
                )?),
                $shape,
            )),
            s => Err(unsupported($name, s)),
        }
    };
}

fn bias_fwd<T: Elem>(x: &[T], b: &[T], _l: &Layout) -> Result<Vec<T>> {
    let c = b.len();
    let mut y = x.to_vec();
    y.par_chunks_mut(super::chunk_rows(x.len() / c, 256) * c)
        .for_each(|part| {
            for row in part.chunks_exact_mut(c) {
                for (v, &bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        });
    Ok(y)
}

/// Runs `bias_add` (`hw` None), `channel_gate` or `channel_add` (`hw` = H·W) over `n` elements
/// of `c` channels.
#[cfg(feature = "cuda")]
fn cuda_broadcast(
    op: &str,
    kernel: &str,
    (s1, l1): (&candle_core::CudaStorage, &Layout),
    (s2, l2): (&candle_core::CudaStorage, &Layout),
    n: usize,
    hw: Option<usize>,
    c: usize,
) -> Result<candle_core::CudaStorage> {
    use super::cuda::{self, PushKernelArg};
    let dev = s1.device();
    let x = cuda::act_view(op, s1, l1)?;
    // The bias and the gate are f32 whatever the activations' dtype.
    let v = cuda::ActView::F32(cuda::f32_view(op, s2, l2)?);
    let out = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
    let k = cuda::kernel_for(dev, kernel, x.dtype())?;
    let (n64, c32) = (n as i64, cuda::int(op, c)?);
    let hw64 = hw.unwrap_or(0) as i64;
    let mut b = k.builder();
    x.push(&mut b);
    v.push(&mut b);
    out.push(&mut b);
    b.arg(&n64);
    if hw.is_some() {
        b.arg(&hw64);
    }
    b.arg(&c32);
    cuda::launch(b, cuda::elementwise_ilp(n))?;
    Ok(out.wrap(dev))
}

/// `kernel` (`channel_gate` or `channel_add`) over x `[B, H, W, C]` with its `[B, C]` values.
#[cfg(feature = "cuda")]
fn cuda_per_sample(
    op: &str,
    kernel: &str,
    x: (&candle_core::CudaStorage, &Layout),
    values: (&candle_core::CudaStorage, &Layout),
) -> Result<(candle_core::CudaStorage, Shape)> {
    let shape = x.1.shape().clone();
    let d = shape.dims();
    let (hw, c) = (d[1] * d[2], d[3]);
    let out = cuda_broadcast(op, kernel, x, values, shape.elem_count(), Some(hw), c)?;
    Ok((out, shape))
}

pub(crate) struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "effdet-add-channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch2!(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            l1.shape().clone(),
            bias_fwd,
            f32_param
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let c = l2.shape().elem_count();
        let n = l1.shape().elem_count();
        let out = cuda_broadcast(self.name(), "bias_add", (s1, l1), (s2, l2), n, None, c)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = bias.dim(0)?;
        let out = bias.dtype();
        let db = g.contiguous()?.apply_op1_no_bwd(&ColumnSum { c, out })?;
        Ok((Some(g.clone()), Some(db)))
    }
}

/// `[..., C]` → `[C]` column sums accumulated in f64, stored as `out` (the bias's dtype: f32
/// for f32/f16/bf16 gradients, f64 for f64; or f64 for any input, where a caller needs the
/// digits).
pub(crate) struct ColumnSum {
    pub(crate) c: usize,
    pub(crate) out: DType,
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "effdet-column-sum"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let dev = s.device();
        let x = cuda::act_view(self.name(), s, l)?;
        let rows = l.shape().elem_count() / self.c.max(1);
        let sums = cuda::column_sums(dev, &x, rows, self.c, 1)?;
        if self.out == DType::F64 {
            return Ok((cuda::wrap(dev, sums), Shape::from(self.c)));
        }
        let out = cuda::f64_to_act(dev, &sums, self.c, 1.0, self.out)?;
        Ok((out.wrap(dev), Shape::from(self.c)))
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from(self.c);
        match s {
            s if is_f32_family(s) && self.out == DType::F64 => {
                let sums = sum_rows_f64(&act_f32(s, l)?, self.c);
                Ok((CpuStorage::F64(sums), shape))
            }
            s if is_f32_family(s) => Ok((
                store_f32(sum_rows::<f32>(&act_f32(s, l)?, self.c), self.out)?,
                shape,
            )),
            CpuStorage::F64(_) => Ok((
                CpuStorage::F64(sum_rows::<f64>(contiguous(s, l)?, self.c)),
                shape,
            )),
            s => Err(unsupported(self.name(), s)),
        }
    }
}

fn gate_fwd<T: Elem>(x: &[T], s: &[T], l: &Layout) -> Result<Vec<T>> {
    Ok(per_sample_channel(x, s, l, |xv, g| xv * g))
}

fn sample_add_fwd<T: Elem>(x: &[T], s: &[T], l: &Layout) -> Result<Vec<T>> {
    Ok(per_sample_channel(x, s, l, |xv, v| xv + v))
}

/// `f(x, s[b, c])` over `x` `[B, H, W, C]`.
fn per_sample_channel<T: Elem>(
    x: &[T],
    s: &[T],
    l: &Layout,
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    let d = l.dims();
    let (hw, c) = (d[1] * d[2], d[3]);
    // One pass, x read and y written (a copy of x scaled in place took two).
    // SAFETY: each part is one image, as long as its image of x (whole rows of c), and the
    // loop writes every element of it.
    unsafe {
        super::par_filled(x.len(), hw * c, |bi, img| {
            let xi = &x[bi * hw * c..][..img.len()];
            let per_channel = &s[bi * c..][..c];
            super::wide_simd(
                #[inline(always)]
                || {
                    for (row, xr) in img.chunks_exact_mut(c).zip(xi.chunks_exact(c)) {
                        for ((v, &xv), &g) in row.iter_mut().zip(xr).zip(per_channel) {
                            v.write(f(xv, g));
                        }
                    }
                },
            );
        })
    }
}

/// The sum of two gradients of one `[B, H, W, C]` tensor, either of which may be a `[B, C]`
/// value broadcast over H and W (the spatial mean's gradient): then one pass adds it to the
/// other (candle's add would index the view per element, and a copy of it would write and
/// re-read an activation-sized tensor). Otherwise `a + b`.
pub(crate) fn add_gradients(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match (hw_broadcast_source(a)?, hw_broadcast_source(b)?) {
        (None, Some(v)) if a.is_contiguous() && a.dims() == b.dims() => add_per_sample(a, &v),
        (Some(v), None) if b.is_contiguous() && a.dims() == b.dims() => add_per_sample(b, &v),
        _ => a + b,
    }
}

/// The `[B, C]` values of a `[B, H, W, C]` view that repeats them over H and W.
fn hw_broadcast_source(t: &Tensor) -> Result<Option<Tensor>> {
    let &[b, h, w, c] = t.dims() else {
        return Ok(None);
    };
    if t.stride() != [c, 0, 0, 1] || h * w < 2 {
        return Ok(None);
    }
    Ok(Some(t.narrow(1, 0, 1)?.narrow(2, 0, 1)?.reshape((b, c))?))
}

/// `x` + `v[b, c]` broadcast over H and W, in `x`'s dtype (v widened to the reduced dtype).
fn add_per_sample(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    let v = v.to_dtype(reduced_dtype(x.dtype()))?.contiguous()?;
    x.apply_op2_no_bwd(&v, &SampleAdd)
}

/// `x` `[B, H, W, C]` + `v` `[B, C]` (f32 for f32/f16/bf16 x, f64 for f64), no gradient.
struct SampleAdd;

impl CustomOp2 for SampleAdd {
    fn name(&self) -> &'static str {
        "effdet-add-per-sample-channel"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch2!(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            l1.shape().clone(),
            sample_add_fwd,
            f32_param
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_per_sample(self.name(), "channel_add", (s1, l1), (s2, l2))
    }
}

struct Gate;

impl CustomOp2 for Gate {
    fn name(&self) -> &'static str {
        "effdet-channel-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch2!(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            l1.shape().clone(),
            gate_fwd,
            f32_param
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_per_sample(self.name(), "channel_gate", (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = g.apply_op2_no_bwd(gate, &Gate)?;
        let dgate = x.contiguous()?.apply_op2_no_bwd(&g, &GateGrad)?;
        Ok((Some(dx), Some(dgate)))
    }
}

/// The gate's gradient: (x, g) `[B, H, W, C]` → Σ over H and W of x·g, `[B, C]`, in the gate's
/// dtype (f32 for f32/f16/bf16 activations, f64 for f64). Each product is exact in f64 and the
/// sums are f64, in one pass over x and g: no activation-sized product is stored (the composed
/// form, a product in the activation dtype and then a spatial mean, wrote and re-read one and
/// rounded each product to 16 bits under mixed precision).
struct GateGrad;

/// Σ_hw x·g per (batch, channel) in f64, each product taken in f64 (exact for f32 inputs).
/// The inputs are read as they are stored: widening them to f64 copies first cost more than
/// the sums (two activation-sized f64 buffers per call).
fn dot_fwd<T: Elem>(x: &[T], g: &[T], l: &Layout) -> Vec<f64> {
    let d = l.dims();
    let (b, hw, c) = (d[0], d[1] * d[2], d[3]);
    let mut out = vec![0f64; b * c];
    out.par_chunks_mut(c).enumerate().for_each(|(bi, o)| {
        let (xs, gs) = (&x[bi * hw * c..][..hw * c], &g[bi * hw * c..][..hw * c]);
        // Lanes are independent and each sums in row order, so the wide build's results are
        // the baseline's bit for bit.
        super::wide_simd(
            #[inline(always)]
            || {
                for (xr, gr) in xs.chunks_exact(c).zip(gs.chunks_exact(c)) {
                    for ((o, &xv), &gv) in o.iter_mut().zip(xr).zip(gr) {
                        *o += xv.to64() * gv.to64();
                    }
                }
            },
        );
    });
    out
}

/// (B, H, W, C) of the gate gradient's inputs, which must agree in shape and dtype.
fn gate_grad_dims(
    (l1, d1): (&Layout, DType),
    (l2, d2): (&Layout, DType),
) -> Result<(usize, usize, usize, usize)> {
    if l2.dims() != l1.dims() || d1 != d2 {
        candle_core::bail!(
            "gate gradient: x {:?} {d1:?} vs g {:?} {d2:?}",
            l1.dims(),
            l2.dims()
        );
    }
    l1.shape().dims4()
}

impl CustomOp2 for GateGrad {
    fn name(&self) -> &'static str {
        "effdet-channel-gate-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, _, _, c) = gate_grad_dims((l1, s1.dtype()), (l2, s2.dtype()))?;
        let shape = Shape::from((b, c));
        let sums = match s1 {
            s if is_f32_family(s) => dot_fwd::<f32>(&act_f32(s1, l1)?, &act_f32(s2, l2)?, l1),
            CpuStorage::F64(_) => {
                dot_fwd::<f64>(contiguous::<f64>(s1, l1)?, contiguous::<f64>(s2, l2)?, l1)
            }
            s => return Err(unsupported(self.name(), s)),
        };
        Ok(match s1 {
            CpuStorage::F64(_) => (CpuStorage::F64(sums), shape),
            _ => (
                CpuStorage::F32(sums.into_iter().map(|v| v as f32).collect()),
                shape,
            ),
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
        use super::cuda;
        let (b, h, w, c) = gate_grad_dims((l1, s1.dtype()), (l2, s2.dtype()))?;
        let dev = s1.device();
        let x = cuda::act_view(self.name(), s1, l1)?;
        let g = cuda::act_view(self.name(), s2, l2)?;
        let sums = cuda::column_dots(dev, &x, &g, h * w, c, b)?;
        let out = cuda::f64_to_act(dev, &sums, b * c, 1.0, DType::F32)?;
        Ok((out.wrap(dev), Shape::from((b, c))))
    }
}

fn mean_fwd<T: Elem>(x: &[T], l: &Layout) -> Vec<T> {
    let d = l.dims();
    let (b, hw, c) = (d[0], d[1] * d[2], d[3]);
    let mut out = vec![T::zero(); b * c];
    out.par_chunks_mut(c).enumerate().for_each(|(bi, o)| {
        let sums = sum_rows(&x[bi * hw * c..][..hw * c], c);
        for (o, s) in o.iter_mut().zip(sums) {
            *o = T::from64(s.to64() / hw as f64);
        }
    });
    out
}

struct SpatialMean;

impl CustomOp1 for SpatialMean {
    fn name(&self) -> &'static str {
        "effdet-spatial-mean"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims();
        let shape = Shape::from((d[0], d[3]));
        match s {
            s if is_f32_family(s) => Ok((
                store_f32(mean_fwd::<f32>(&act_f32(s, l)?, l), DType::F32)?,
                shape,
            )),
            CpuStorage::F64(_) => Ok((
                CpuStorage::F64(mean_fwd::<f64>(contiguous(s, l)?, l)),
                shape,
            )),
            s => Err(unsupported(self.name(), s)),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let d = l.dims();
        let (b, hw, c) = (d[0], d[1] * d[2], d[3]);
        let dev = s.device();
        let x = cuda::act_view(self.name(), s, l)?;
        let sums = cuda::column_sums(dev, &x, hw, c, b)?;
        let out = cuda::f64_to_act(dev, &sums, b * c, 1.0 / hw as f64, DType::F32)?;
        Ok((out.wrap(dev), Shape::from((b, c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, w, c) = x.dims4()?;
        // g/(H·W) repeated over H and W in x's dtype, as a broadcast view: in the network x
        // also feeds the gate, so the tape adds this to that gradient in one pass
        // (`add_gradients`) and the activation-sized copy is never written (16 launches,
        // ~6.5 ms of a batch-64 fp16 step on an H200).
        let scaled = (g / (h * w) as f64)?.to_dtype(x.dtype())?;
        Ok(Some(
            scaled.reshape((b, 1, 1, c))?.broadcast_as((b, h, w, c))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::{DType, Device};

    #[test]
    fn values_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1f64, 2., 3., 4., 5., 6., 7., 8.], &dev)?.reshape((2, 1, 2, 2))?;
        let b = Tensor::new(&[10f64, 20.], &dev)?;
        let y = add_channel_bias(&x, &b)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(y, vec![11., 22., 13., 24., 15., 26., 17., 28.]);
        let s = Tensor::new(&[[1f64, 0.5], [2., -1.]], &dev)?;
        let y = channel_gate(&x, &s)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(y, vec![1., 1., 3., 2., 10., -6., 14., -8.]);
        let m = spatial_mean(&x)?.to_vec2::<f64>()?;
        assert_eq!(m, vec![vec![2., 3.], vec![6., 7.]]);
        assert!(add_channel_bias(&x, &Tensor::new(&[1f64], &dev)?).is_err());
        assert!(channel_gate(&x, &b).is_err());
        Ok(())
    }

    /// A gradient broadcast over H and W (the spatial mean's) added to a dense one, in either
    /// order: the one-pass op equals candle's add and gives a contiguous tensor; other pairs
    /// fall back to that add.
    #[test]
    fn broadcast_gradient_sums_equal_candle_add() -> Result<()> {
        let (b, h, w, c) = (2, 3, 4, 5);
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let dense = rand_tensor(&[b, h, w, c], 3)?.to_dtype(dtype)?;
            let v = rand_tensor(&[b, c], 4)?.to_dtype(dtype)?;
            let view = v.reshape((b, 1, 1, c))?.broadcast_as((b, h, w, c))?;
            assert!(hw_broadcast_source(&view)?.is_some());
            let want = (&dense + &view.contiguous()?)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            for sum in [add_gradients(&dense, &view)?, add_gradients(&view, &dense)?] {
                assert!(sum.is_contiguous());
                assert_eq!(sum.dtype(), dtype);
                let got = sum.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                assert_eq!(got, want, "{dtype:?}");
            }
        }
        // Not a broadcast over H and W: plain adds.
        let a = rand_tensor(&[2, 3, 4, 5], 5)?;
        let row = rand_tensor(&[1, 1, 4, 5], 6)?.broadcast_as((2, 3, 4, 5))?;
        assert!(hw_broadcast_source(&row)?.is_none());
        let want = (&a + &row)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(
            add_gradients(&a, &row)?.flatten_all()?.to_vec1::<f64>()?,
            want
        );
        assert!(hw_broadcast_source(&a)?.is_none());
        Ok(())
    }

    /// With f16 activations the gate's gradient, a sum over H·W, exceeds f16's range long
    /// before anything else does (it made every fp16 step at 512² overflow): it is f32.
    #[test]
    fn gate_gradient_of_f16_activations_is_an_f32_sum() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &Tensor::full(1f32, (1, 256, 256, 2), &dev)?.to_dtype(DType::F16)?,
        )?;
        let gate = candle_core::Var::from_tensor(&Tensor::new(&[[0.5f32, 0.25]], &dev)?)?;
        let y = channel_gate(x.as_tensor(), gate.as_tensor())?;
        assert_eq!(y.dtype(), DType::F16);
        let g = (y.to_dtype(DType::F32)? * 2.0)?.sum_all()?.backward()?;
        let dgate = g.get(gate.as_tensor()).unwrap();
        assert_eq!(dgate.dtype(), DType::F32);
        assert_eq!(dgate.to_vec2::<f32>()?, vec![vec![131072.0, 131072.0]]);
        // An f16 gate is refused rather than silently overflowing.
        let gate16 = gate.as_tensor().to_dtype(DType::F16)?;
        assert!(channel_gate(x.as_tensor(), &gate16).is_err());
        // The spatial mean feeding the gate's branch is f32 too.
        assert_eq!(spatial_mean(x.as_tensor())?.dtype(), DType::F32);
        Ok(())
    }

    /// The gate's gradient in one op equals the composition it replaced (product, spatial mean,
    /// times H·W) in f64, and under f16 activations is the f64 sum of the exact products.
    #[test]
    fn gate_gradient_equals_the_composed_sum() -> Result<()> {
        let x = rand_tensor(&[2, 3, 4, 5], 95)?;
        let g = rand_tensor(&[2, 3, 4, 5], 96)?;
        let got = x.apply_op2_no_bwd(&g, &GateGrad)?;
        let want = ((&x * &g)?.apply_op1_no_bwd(&SpatialMean)? * 12.0)?;
        let d = (&got - &want)?
            .abs()?
            .max_keepdim(1)?
            .max(0)?
            .to_vec1::<f64>()?[0];
        assert!(d < 1e-12, "{d}");
        let (x16, g16) = (x.to_dtype(DType::F16)?, g.to_dtype(DType::F16)?);
        let got16 = x16.apply_op2_no_bwd(&g16, &GateGrad)?;
        assert_eq!(got16.dtype(), DType::F32);
        let exact = x16
            .to_dtype(DType::F64)?
            .apply_op2_no_bwd(&g16.to_dtype(DType::F64)?, &GateGrad)?
            .to_dtype(DType::F32)?;
        assert_eq!(got16.to_vec2::<f32>()?, exact.to_vec2::<f32>()?);
        assert!(x.apply_op2_no_bwd(&g.narrow(3, 0, 4)?, &GateGrad).is_err());
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 3, 4, 5], 91)?;
        let b = rand_tensor(&[5], 92)?;
        let s = rand_tensor(&[2, 5], 93)?;
        check_gradients(&[x.clone(), b], |v| add_channel_bias(&v[0], &v[1]), 1e-7)?;
        check_gradients(&[x.clone(), s], |v| channel_gate(&v[0], &v[1]), 1e-7)?;
        check_gradients(&[x], |v| spatial_mean(&v[0]), 1e-7)
    }

    #[test]
    fn sample_scaling_equals_broadcast_mul_without_a_scale_gradient() -> Result<()> {
        let x = candle_core::Var::from_tensor(&rand_tensor(&[3, 2, 4, 5], 93)?)?;
        let scale = candle_core::Var::from_tensor(&Tensor::new(&[0f64, 1.25, 2.5], &Device::Cpu)?)?;
        let r = rand_tensor(&[3, 2, 4, 5], 94)?;
        let y = scale_samples(x.as_tensor(), scale.as_tensor())?;
        let want = x
            .as_tensor()
            .broadcast_mul(&scale.as_tensor().reshape((3, 1, 1, 1))?)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f64>()?,
            want.flatten_all()?.to_vec1::<f64>()?
        );
        let g = (&y * &r)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).unwrap();
        let want_gx = r.broadcast_mul(&scale.as_tensor().reshape((3, 1, 1, 1))?)?;
        assert_eq!(
            gx.flatten_all()?.to_vec1::<f64>()?,
            want_gx.flatten_all()?.to_vec1::<f64>()?
        );
        // The scale is a constant (a drop-connect mask): no gradient reaches it.
        assert!(g.get(scale.as_tensor()).is_none());
        assert!(scale_samples(x.as_tensor(), &Tensor::new(&[1f64, 2.], &Device::Cpu)?).is_err());
        Ok(())
    }
}
