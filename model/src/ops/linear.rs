//! The 1×1 convolution as one graph node: weight cast, matrix product, optional widening to f32
//! and bias, with a hand-written backward. Built from stock candle ops the same layer is five
//! nodes (two reshapes, a cast, the product, the bias), and candle's backward pass materializes
//! every node's input gradient as `zeros + gradient`: three extra zero-fill + add passes over
//! activation-sized tensors per layer, which in a bandwidth-bound network like EfficientDet
//! cost about as much as the layer itself. The arithmetic is unchanged: the forward and both
//! products of the backward are the same candle kernels in the same order, so results equal
//! the composed version bit for bit (tested).

use super::channel::{BiasAdd, ColumnSum};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// `x` `[..., C_in]` · `weight` `[C_in, C_out]` (+ `bias` `[C_out]`) → `[..., C_out]`.
///
/// The product runs in `compute` (the weight is cast to it; `x` too if it is stored otherwise)
/// and the result is stored as `x`'s dtype, or as f32 when `f32_output` (then the bias is
/// added in f32). Weight and bias gradients come back in their own dtype (f32).
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    compute: DType,
    f32_output: bool,
) -> Result<Tensor> {
    let cin = x.dims().last().copied().unwrap_or(0);
    let (wi, cout) = weight.dims2()?;
    if wi != cin || x.rank() < 1 {
        candle_core::bail!(
            "linear: weight {:?} does not fit input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    if let Some(b) = bias {
        if b.dims() != [cout] {
            candle_core::bail!("linear: bias {:?} must be [{cout}]", b.dims());
        }
    }
    let out = if f32_output && x.dtype() != DType::F64 {
        DType::F32
    } else {
        x.dtype()
    };
    let op = Linear {
        compute,
        out,
        cin,
        cout,
    };
    if let Some(tape) = crate::tape::active() {
        // Recorded by hand: whether x needs a gradient is the tape's knowledge (every
        // activation is detached while recording).
        let want_x = tape.tracks(x);
        // The weight is cast to the compute type once, here, and the backward's input
        // gradient reuses the cast (a launch per layer less; the product skips its own cast).
        let xd = x.detach().contiguous()?;
        let wc = weight.detach().contiguous()?.to_dtype(compute)?;
        let y = crate::tape::timed("linear", || match bias {
            Some(b) => xd.apply_op3_no_bwd(&wc, &b.detach().contiguous()?, &op),
            None => xd.apply_op2_no_bwd(&wc, &op),
        })?;
        let inputs = match bias {
            Some(b) => vec![x, weight, b],
            None => vec![x, weight],
        };
        let (w_dtype, bias_dtype) = (weight.dtype(), bias.map(|b| b.dtype()));
        tape.push("linear", &inputs, &y, move |g| {
            op.backward(&xd, &wc, w_dtype, bias_dtype, g, want_x)
        });
        return Ok(y);
    }
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// The same layer composed of stock candle ops (reshape, casts, product, bias), as `Conv1x1`
/// built it before [`linear`]: the reference for its tests and benchmark.
pub fn linear_unfused(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    compute: DType,
    f32_output: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let cin = dims[dims.len() - 1];
    let rows = x.elem_count() / cin.max(1);
    let a = x.reshape((rows, cin))?;
    let mut y = a
        .to_dtype(compute)?
        .matmul(&w.to_dtype(compute)?)?
        .to_dtype(x.dtype())?;
    if f32_output && y.dtype() != DType::F64 {
        y = y.to_dtype(DType::F32)?;
    }
    if let Some(b) = b {
        y = super::add_channel_bias(&y, b)?;
    }
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(1)?;
    y.reshape(out)
}

struct Linear {
    compute: DType,
    out: DType,
    cin: usize,
    cout: usize,
}

impl Linear {
    fn out_shape(&self, l: &Layout) -> Shape {
        let mut d = l.dims().to_vec();
        if let Some(last) = d.last_mut() {
            *last = self.cout;
        }
        Shape::from(d)
    }

    /// Cast + product (+ widening) on any backend: `[rows, C_out]` in `self.out`, with its
    /// layout.
    fn product<S: BackendStorage>(
        &self,
        (s1, l1): (&S, &Layout),
        (s2, l2): (&S, &Layout),
    ) -> Result<(S, Layout)> {
        let rows = l1.shape().elem_count() / self.cin.max(1);
        let cast = |s: &S, l: &Layout, shape: (usize, usize)| -> Result<(Option<S>, Layout)> {
            if s.dtype() == self.compute {
                Ok((
                    None,
                    Layout::contiguous_with_offset(shape, l.start_offset()),
                ))
            } else {
                Ok((
                    Some(s.to_dtype(l, self.compute)?),
                    Layout::contiguous(shape),
                ))
            }
        };
        let (xc, lx) = cast(s1, l1, (rows, self.cin))?;
        let (wc, lw) = cast(s2, l2, (self.cin, self.cout))?;
        let y = xc.as_ref().unwrap_or(s1).matmul(
            wc.as_ref().unwrap_or(s2),
            (1, rows, self.cout, self.cin),
            &lx,
            &lw,
        )?;
        let ly = Layout::contiguous((rows, self.cout));
        if y.dtype() == self.out {
            Ok((y, ly))
        } else {
            Ok((y.to_dtype(&ly, self.out)?, ly))
        }
    }

    /// The CPU product (+ bias) in f32 or f64 when nothing needs a cast: candle's own gemm call
    /// ([`cpu_product`]) without its zero-filled output, and the bias added in place. `None`
    /// for the other cases, which take [`Self::product`].
    fn cpu_direct(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<Option<CpuStorage>> {
        fn run<T: WithDType + super::Elem>(
            op: &Linear,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            bias: Option<(&CpuStorage, &Layout)>,
        ) -> Result<Vec<T>> {
            let x = super::contiguous::<T>(s1, l1)?;
            let w = super::contiguous::<T>(s2, l2)?;
            let rows = x.len() / op.cin.max(1);
            let mut y = cpu_product((rows, op.cin, op.cout), (x, (op.cin, 1)), (w, (op.cout, 1)))?;
            if let Some((s3, l3)) = bias {
                let b = super::contiguous::<T>(s3, l3)?;
                let chunk = super::chunk_rows(rows, 256) * op.cout;
                y.par_chunks_mut(chunk.max(1)).for_each(|part| {
                    for row in part.chunks_exact_mut(op.cout) {
                        for (v, &bv) in row.iter_mut().zip(b) {
                            *v += bv;
                        }
                    }
                });
            }
            Ok(y)
        }
        let dtype = s1.dtype();
        let same = s2.dtype() == dtype
            && self.compute == dtype
            && self.out == dtype
            && bias.is_none_or(|(s3, _)| s3.dtype() == dtype);
        Ok(match dtype {
            DType::F32 if same => {
                Some(CpuStorage::F32(run::<f32>(self, (s1, l1), (s2, l2), bias)?))
            }
            DType::F64 if same => {
                Some(CpuStorage::F64(run::<f64>(self, (s1, l1), (s2, l2), bias)?))
            }
            _ => None,
        })
    }

    /// Gradients of x and the weight (as candle's own backward computes them for the
    /// composed layer), plus the upstream gradient as `[rows, C_out]` for the bias. No
    /// gradient for an `x` that tracks none (the stem's image patches): candle would compute
    /// it, zero-fill a buffer for it and add it there, then drop it.
    /// `w` may already be in the compute type; the weight gradient comes back in `w_dtype`.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        w_dtype: DType,
        grad: &Tensor,
        want_x: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let rows = x.elem_count() / self.cin.max(1);
        let g = grad.contiguous()?.reshape((rows, self.cout))?;
        let on_cpu_uncast = x.device().is_cpu()
            && matches!(self.compute, DType::F32 | DType::F64)
            && [x.dtype(), w.dtype(), g.dtype(), w_dtype]
                .iter()
                .all(|&d| d == self.compute);
        if on_cpu_uncast {
            let product = |which| CpuGradProduct {
                which,
                cin: self.cin,
                cout: self.cout,
            };
            let x2 = x.contiguous()?.reshape((rows, self.cin))?;
            let gx = if want_x {
                let wc = w.contiguous()?;
                let gx = g.apply_op2_no_bwd(&wc, &product(GradOf::Input))?;
                Some(gx.reshape(x.dims())?)
            } else {
                None
            };
            let gw = x2.apply_op2_no_bwd(&g, &product(GradOf::Weight))?;
            return Ok((gx, gw, g));
        }
        let gc = g.to_dtype(self.compute)?;
        let gx = if want_x {
            let wc = w.to_dtype(self.compute)?;
            Some(
                gc.matmul(&wc.t()?)?
                    .to_dtype(x.dtype())?
                    .reshape(x.dims())?,
            )
        } else {
            None
        };
        let xc = x.reshape((rows, self.cin))?.to_dtype(self.compute)?;
        let gw = xc.t()?.matmul(&gc)?.to_dtype(w_dtype)?;
        Ok((gx, gw, g))
    }

    /// Gradients of (x, weight[, bias]) in input order; the bias's (column sums of the
    /// upstream gradient, in `bias_dtype`) only when there is one.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        w_dtype: DType,
        bias_dtype: Option<DType>,
        grad: &Tensor,
        want_x: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let (gx, gw, g) = self.grads(x, w, w_dtype, grad, want_x)?;
        let mut out = vec![gx, Some(gw)];
        if let Some(dtype) = bias_dtype {
            let c = self.cout;
            out.push(Some(g.apply_op1_no_bwd(&ColumnSum { c, out: dtype })?));
        }
        Ok(out)
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "effdet-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if let Some(y) = self.cpu_direct((s1, l1), (s2, l2), None)? {
            return Ok((y, self.out_shape(l1)));
        }
        let (y, _) = self.product((s1, l1), (s2, l2))?;
        Ok((y, self.out_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, _) = self.product((s1, l1), (s2, l2))?;
        Ok((y, self.out_shape(l1)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self
            .backward(x, w, w.dtype(), None, grad, x.track_op())?
            .into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "effdet-linear-bias"
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if let Some(y) = self.cpu_direct((s1, l1), (s2, l2), Some((s3, l3)))? {
            return Ok((y, self.out_shape(l1)));
        }
        let (y, ly) = self.product((s1, l1), (s2, l2))?;
        let (y, _) = CustomOp2::cpu_fwd(&BiasAdd, &y, &ly, s3, l3)?;
        Ok((y, self.out_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, ly) = self.product((s1, l1), (s2, l2))?;
        let (y, _) = CustomOp2::cuda_fwd(&BiasAdd, &y, &ly, s3, l3)?;
        Ok((y, self.out_shape(l1)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self
            .backward(x, w, w.dtype(), Some(b.dtype()), grad, x.track_op())?
            .into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

/// Which product of the backward [`CpuGradProduct`] computes.
#[derive(Clone, Copy)]
enum GradOf {
    /// g `[rows, C_out]` · wᵀ → `[rows, C_in]`.
    Input,
    /// xᵀ · g, from x `[rows, C_in]` and g `[rows, C_out]` → `[C_in, C_out]`.
    Weight,
}

/// The backward's products on the CPU in f32/f64 (no casts), through [`cpu_product`] with the
/// strides candle's matmul would use on the transposed views, so the same bits as
/// `g.matmul(&w.t())` and `x.t().matmul(&g)` without the zero-filled output. CPU only.
struct CpuGradProduct {
    which: GradOf,
    cin: usize,
    cout: usize,
}

impl CustomOp2 for CpuGradProduct {
    fn name(&self) -> &'static str {
        "effdet-linear-grad-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (cin, cout) = (self.cin, self.cout);
        fn run<T: WithDType>(op: &CpuGradProduct, a: &[T], b: &[T]) -> Result<(Vec<T>, Shape)> {
            let (cin, cout) = (op.cin, op.cout);
            Ok(match op.which {
                GradOf::Input => {
                    let rows = a.len() / cout.max(1);
                    let y = cpu_product((rows, cout, cin), (a, (cout, 1)), (b, (1, cout)))?;
                    (y, Shape::from((rows, cin)))
                }
                GradOf::Weight => {
                    let rows = a.len() / cin.max(1);
                    let y = weight_grad_product(a, b, rows, cin, cout)?;
                    (y, Shape::from((cin, cout)))
                }
            })
        }
        let (n1, n2) = match self.which {
            GradOf::Input => (cout, cin * cout),
            GradOf::Weight => (cin, l1.shape().elem_count() / cin.max(1) * cout),
        };
        if !l1.shape().elem_count().is_multiple_of(n1.max(1)) || l2.shape().elem_count() != n2 {
            candle_core::bail!(
                "{}: operands {:?} and {:?} do not fit C_in {cin}, C_out {cout}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (a, b) = (super::contiguous(s1, l1)?, super::contiguous(s2, l2)?);
                let (y, shape) = run::<f32>(self, a, b)?;
                Ok((CpuStorage::F32(y), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (a, b) = (super::contiguous(s1, l1)?, super::contiguous(s2, l2)?);
                let (y, shape) = run::<f64>(self, a, b)?;
                Ok((CpuStorage::F64(y), shape))
            }
            (s, _) => Err(super::unsupported(self.name(), s)),
        }
    }
}

/// Rows from which [`weight_grad_product`] splits its sum across threads.
const SPLIT_ROWS: usize = 8192;

/// xᵀ·g for x `[rows, C_in]`, g `[rows, C_out]`. The product is small (C_in × C_out) and its
/// sum long (rows, up to 131,072 at 512²), and gemm parallelizes over the output's blocks
/// only, so with few of them one thread did most of it. From [`SPLIT_ROWS`] rows each thread
/// takes a contiguous share of the rows (gemm on one thread) and the partial products are
/// added in thread order (≈ 1.2× on the 1×1 convolutions' backward, two cores; the sums are
/// then ordered differently from candle's, to rounding).
fn weight_grad_product<T: WithDType>(
    x: &[T],
    g: &[T],
    rows: usize,
    cin: usize,
    cout: usize,
) -> Result<Vec<T>> {
    let parts = candle_core::utils::get_num_threads();
    if rows < SPLIT_ROWS || parts < 2 {
        return cpu_product((cin, rows, cout), (x, (1, cin)), (g, (cout, 1)));
    }
    let per = rows.div_ceil(parts);
    let partial: Vec<Vec<T>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (r0, r1) = ((p * per).min(rows), ((p + 1) * per).min(rows));
            cpu_product_on(
                (cin, r1 - r0, cout),
                (&x[r0 * cin..r1 * cin], (1, cin)),
                (&g[r0 * cout..r1 * cout], (cout, 1)),
                1,
            )
        })
        .collect::<Result<_>>()?;
    let mut sum = partial[0].clone();
    for p in &partial[1..] {
        for (s, &v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    Ok(sum)
}

/// `lhs` (m×k) · `rhs` (k×n) → row-major m×n, each input given with its (row, column) strides:
/// the gemm crate called exactly as candle's CPU matmul calls it (same kernel, strides and
/// threads, so the same bits), but into an output that is not zero-filled first — candle's
/// `vec![0; m·n]` is a calloc that memsets every reused block, an extra write pass over the
/// activation the product then overwrites.
fn cpu_product<T: WithDType>(
    mkn: (usize, usize, usize),
    lhs: (&[T], (usize, usize)),
    rhs: (&[T], (usize, usize)),
) -> Result<Vec<T>> {
    cpu_product_on(mkn, lhs, rhs, candle_core::utils::get_num_threads())
}

/// [`cpu_product`] on `threads` threads (1: the calling thread only).
fn cpu_product_on<T: WithDType>(
    (m, k, n): (usize, usize, usize),
    (lhs, (lhs_rs, lhs_cs)): (&[T], (usize, usize)),
    (rhs, (rhs_rs, rhs_cs)): (&[T], (usize, usize)),
    threads: usize,
) -> Result<Vec<T>> {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    if m * k > 0 && last(m, k, lhs_rs, lhs_cs) >= lhs.len()
        || k * n > 0 && last(k, n, rhs_rs, rhs_cs) >= rhs.len()
    {
        candle_core::bail!("linear: product operands smaller than their shapes ({m}x{k}x{n})");
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut dst: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: the operands hold every element their strides reach (checked above) and dst has
    // room for m·n; with read_dst false gemm writes every element of dst without reading it
    // (β·lhs·rhs with β = 1, as candle calls it), so all m·n are initialized after the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
        dst.set_len(m * n);
    }
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::Var;

    fn bits(t: &Tensor) -> Result<Vec<u64>> {
        Ok(t.flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|v| (v + 0.0).to_bits())
            .collect())
    }

    /// The weight gradient split across threads (rows from `SPLIT_ROWS`, an uneven split) equals
    /// candle's product to rounding, in f32 and f64.
    #[test]
    fn split_weight_gradient_equals_the_product() -> Result<()> {
        let rows = SPLIT_ROWS + 1001;
        for dtype in [DType::F32, DType::F64] {
            let x = rand_tensor(&[rows, 5], 21)?.to_dtype(dtype)?;
            let g = rand_tensor(&[rows, 7], 22)?.to_dtype(dtype)?;
            let op = CpuGradProduct {
                which: GradOf::Weight,
                cin: 5,
                cout: 7,
            };
            let got = x.apply_op2_no_bwd(&g, &op)?.to_dtype(DType::F64)?;
            let want = x.t()?.matmul(&g)?.to_dtype(DType::F64)?;
            let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            let n = want.abs()?.max_all()?.to_scalar::<f64>()?;
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            assert!(d <= tol * n, "{dtype:?}: differs by {d:e} (max {n:e})");
        }
        Ok(())
    }

    #[test]
    fn equals_the_composed_layer_bit_for_bit() -> Result<()> {
        let x32 = rand_tensor(&[2, 3, 5, 12], 1)?.to_dtype(DType::F32)?;
        let w = rand_tensor(&[12, 7], 2)?.to_dtype(DType::F32)?;
        let b = rand_tensor(&[7], 3)?.to_dtype(DType::F32)?;
        let r = rand_tensor(&[2, 3, 5, 7], 4)?;
        for (storage, compute) in [
            (DType::F32, DType::F32),
            (DType::F32, DType::F16),
            (DType::F16, DType::F16),
            (DType::BF16, DType::BF16),
        ] {
            for f32_output in [false, true] {
                for with_bias in [false, true] {
                    let what =
                        format!("{storage:?}/{compute:?} f32_out {f32_output} bias {with_bias}");
                    let run = |fused: bool| -> Result<(Tensor, Vec<Tensor>)> {
                        let xv = Var::from_tensor(&x32.to_dtype(storage)?)?;
                        let wv = Var::from_tensor(&w)?;
                        let bv = Var::from_tensor(&b)?;
                        let bias = with_bias.then(|| bv.as_tensor());
                        let y = if fused {
                            linear(xv.as_tensor(), wv.as_tensor(), bias, compute, f32_output)?
                        } else {
                            linear_unfused(
                                xv.as_tensor(),
                                wv.as_tensor(),
                                bias,
                                compute,
                                f32_output,
                            )?
                        };
                        let loss = (y.to_dtype(DType::F64)? * &r)?.sum_all()?;
                        let g = loss.backward()?;
                        let mut gs = vec![g.get(&xv).unwrap().clone(), g.get(&wv).unwrap().clone()];
                        if with_bias {
                            gs.push(g.get(&bv).unwrap().clone());
                        }
                        Ok((y, gs))
                    };
                    let (yf, gf) = run(true)?;
                    let (yc, gc) = run(false)?;
                    assert_eq!(yf.dtype(), yc.dtype(), "{what}");
                    assert_eq!(yf.dims(), yc.dims(), "{what}");
                    assert_eq!(bits(&yf)?, bits(&yc)?, "{what}: output");
                    for (i, (a, c)) in gf.iter().zip(&gc).enumerate() {
                        assert_eq!(a.dtype(), c.dtype(), "{what}: gradient {i} dtype");
                        assert_eq!(bits(a)?, bits(c)?, "{what}: gradient {i}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 3, 4, 5], 5)?;
        let w = rand_tensor(&[5, 3], 6)?;
        let b = rand_tensor(&[3], 7)?;
        check_gradients(
            &[x.clone(), w.clone(), b],
            |v| linear(&v[0], &v[1], Some(&v[2]), DType::F64, false),
            1e-7,
        )?;
        check_gradients(
            &[x, w],
            |v| linear(&v[0], &v[1], None, DType::F64, false),
            1e-7,
        )
    }

    #[test]
    fn an_untracked_input_gets_no_gradient_and_the_weight_the_same_one() -> Result<()> {
        let x = rand_tensor(&[2, 3, 4], 8)?;
        let w = Var::from_tensor(&rand_tensor(&[4, 5], 9)?)?;
        let r = rand_tensor(&[2, 3, 5], 10)?;
        let plain = (linear(&x, w.as_tensor(), None, DType::F64, false)? * &r)?
            .sum_all()?
            .backward()?;
        assert!(plain.get(&x).is_none());
        let xv = Var::from_tensor(&x)?;
        let tracked = (linear(xv.as_tensor(), w.as_tensor(), None, DType::F64, false)? * &r)?
            .sum_all()?
            .backward()?;
        assert!(tracked.get(xv.as_tensor()).is_some());
        assert_eq!(
            bits(plain.get(w.as_tensor()).unwrap())?,
            bits(tracked.get(w.as_tensor()).unwrap())?
        );
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let x = rand_tensor(&[2, 4], 1)?;
        assert!(linear(&x, &rand_tensor(&[3, 2], 2)?, None, DType::F64, false).is_err());
        let w = rand_tensor(&[4, 2], 3)?;
        assert!(linear(&x, &w, Some(&rand_tensor(&[3], 4)?), DType::F64, false).is_err());
        assert_eq!(linear(&x, &w, None, DType::F64, false)?.dims(), &[2, 2]);
        Ok(())
    }
}
