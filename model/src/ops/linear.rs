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
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

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
        let (y, inputs) = match bias {
            Some(b) => {
                let bd = b.detach().contiguous()?;
                (xd.apply_op3_no_bwd(&wc, &bd, &op)?, vec![x, weight, b])
            }
            None => (xd.apply_op2_no_bwd(&wc, &op)?, vec![x, weight]),
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
