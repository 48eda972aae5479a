//! Depthwise convolution (one k×k filter per channel, depth multiplier 1) on NHWC tensors with
//! TensorFlow "same" padding. Stock candle runs grouped convolutions as one convolution per
//! group, which is two orders of magnitude slower for the 100–1000 channel layers of
//! EfficientNet.

use super::{
    act_f32, contiguous, dims4, is_f32_family, same_padding, store_f32, unsupported, Elem,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Depthwise convolution of `x` `[B, H, W, C]` with `weight` `[k, k, C]`, stride `stride` in both
/// directions, TF "same" padding. Output `[B, ceil(H/stride), ceil(W/stride), C]` in `x`'s dtype
/// (f32, f16 or bf16 with an f32 kernel; or both f64).
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
    let (_, _, _, c) = x.dims4()?;
    let (kh, kw, wc) = weight.dims3()?;
    if kh != kw || wc != c || stride == 0 {
        candle_core::bail!(
            "depthwise_conv2d: kernel {:?} does not fit input {:?} (stride {stride})",
            weight.dims(),
            x.dims()
        );
    }
    crate::tape::op2(x, weight, DepthwiseConv { k: kh, stride })
}

/// How a row-walking kernel covers its output: the rows it spans (output rows for the forward,
/// input rows for the input gradient) and the elements each thread takes along a row.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RowWalk {
    rows: fn(&Geom) -> usize,
    per_thread: usize,
}

/// Elements along a row per thread of the blocked row kernels (`DW_R` in kernels.cu).
const DW_ROW_BLOCK: usize = 4;

/// The CUDA kernel for `base` at kernel size `k` and stride `s`: the unrolled specialization for
/// D0's shapes (row-walking for the forward and the input gradient, blocked along the row except
/// the input gradient at stride 2), or the generic kernel.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn specialized(base: &str, k: usize, s: usize) -> (String, Option<RowWalk>) {
    let d0 = matches!(k, 3 | 5);
    match base {
        "dw_fwd" if d0 && matches!(s, 1 | 2) => (
            format!("{base}_k{k}s{s}"),
            Some(RowWalk {
                rows: |g| g.b * g.oh,
                per_thread: DW_ROW_BLOCK,
            }),
        ),
        "dw_grad_input" if d0 && matches!(s, 1 | 2) => (
            format!("{base}_k{k}s{s}"),
            Some(RowWalk {
                rows: |g| g.b * g.h,
                per_thread: if s == 1 { DW_ROW_BLOCK } else { 1 },
            }),
        ),
        "dw_grad_weight" if d0 => (format!("{base}_k{k}"), None),
        _ => (base.to_string(), None),
    }
}

/// Geometry shared by the forward and the two backward kernels.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    s: usize,
    oh: usize,
    ow: usize,
    pad_top: usize,
    pad_left: usize,
}

impl Geom {
    fn new(b: usize, h: usize, w: usize, c: usize, k: usize, s: usize) -> Self {
        let (oh, pad_top, _) = same_padding(h, k, s);
        let (ow, pad_left, _) = same_padding(w, k, s);
        Geom {
            b,
            h,
            w,
            c,
            k,
            s,
            oh,
            ow,
            pad_top,
            pad_left,
        }
    }

    /// The kernels' integer arguments: B, H, W, C, K, S, OH, OW, PT, PL.
    #[cfg(feature = "cuda")]
    fn int_args(&self, op: &str) -> Result<[i32; 10]> {
        let i = |v| super::cuda::int(op, v);
        Ok([
            i(self.b)?,
            i(self.h)?,
            i(self.w)?,
            i(self.c)?,
            i(self.k)?,
            i(self.s)?,
            i(self.oh)?,
            i(self.ow)?,
            i(self.pad_top)?,
            i(self.pad_left)?,
        ])
    }

    /// Runs an elementwise depthwise kernel `(a, w, out, ints…)`: activation `a` (f32/f16/bf16),
    /// f32 kernel `w`, `n` outputs in `a`'s dtype.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        op: &str,
        kernel: &str,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        n: usize,
    ) -> Result<candle_core::CudaStorage> {
        use super::cuda::{self, PushKernelArg};
        let dev = s1.device();
        let a = cuda::act_view(op, s1, l1)?;
        let w = cuda::f32_view(op, s2, l2)?;
        let out = cuda::ActSlice::alloc(dev, a.dtype(), n)?;
        let (name, rows) = specialized(kernel, self.k, self.s);
        let k = cuda::kernel_for(dev, &name, a.dtype())?;
        let ints = self.int_args(op)?;
        let mut b = k.builder();
        a.push(&mut b);
        b.arg(&w);
        out.push(&mut b);
        for v in &ints {
            b.arg(v);
        }
        let shape = match rows {
            // Output rows (forward) or input rows (input gradient) of W·C elements each, a
            // thread per `per_thread` positions and channel.
            Some(walk) => {
                let rows = (walk.rows)(self);
                let width = n / rows / self.c;
                cuda::rows(rows, width.div_ceil(walk.per_thread) * self.c)
            }
            None => cuda::elementwise(n),
        };
        cuda::launch(b, shape)?;
        Ok(out.wrap(dev))
    }

    /// Input coordinate read by output coordinate `o` through kernel tap `t`, if inside.
    fn input_of(o: usize, t: usize, s: usize, pad: usize, size: usize) -> Option<usize> {
        let i = (o * s + t) as isize - pad as isize;
        (i >= 0 && (i as usize) < size).then_some(i as usize)
    }

    /// Output coordinate that reads input coordinate `i` through kernel tap `t`, if any.
    fn output_of(i: usize, t: usize, s: usize, pad: usize, size: usize) -> Option<usize> {
        let o = (i + pad) as isize - t as isize;
        if o < 0 || !(o as usize).is_multiple_of(s) {
            return None;
        }
        let o = o as usize / s;
        (o < size).then_some(o)
    }
}

struct DepthwiseConv {
    k: usize,
    stride: usize,
}

impl DepthwiseConv {
    fn fwd<T: Elem>(&self, x: &[T], wt: &[T], g: Geom) -> Vec<T> {
        let row = g.ow * g.c;
        let mut out = vec![T::zero(); g.b * g.oh * row];
        out.par_chunks_mut(row)
            .enumerate()
            .for_each(|(r, out_row)| {
                let (bi, oy) = (r / g.oh, r % g.oh);
                super::wide_simd(
                    #[inline(always)]
                    || {
                        for ky in 0..g.k {
                            let Some(iy) = Geom::input_of(oy, ky, g.s, g.pad_top, g.h) else {
                                continue;
                            };
                            let x_row = &x[(bi * g.h + iy) * g.w * g.c..][..g.w * g.c];
                            for kx in 0..g.k {
                                let wk = &wt[(ky * g.k + kx) * g.c..][..g.c];
                                for ox in 0..g.ow {
                                    let Some(ix) = Geom::input_of(ox, kx, g.s, g.pad_left, g.w)
                                    else {
                                        continue;
                                    };
                                    let o = &mut out_row[ox * g.c..][..g.c];
                                    let xi = &x_row[ix * g.c..][..g.c];
                                    for ((o, &xv), &wv) in o.iter_mut().zip(xi).zip(wk) {
                                        *o += xv * wv;
                                    }
                                }
                            }
                        }
                    },
                )
            });
        out
    }
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "effdet-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = dims4(self.name(), l1)?;
        let g = Geom::new(b, h, w, c, self.k, self.stride);
        let shape = Shape::from((b, g.oh, g.ow, c));
        match s1 {
            CpuStorage::F64(_) => {
                let out = self.fwd::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?, g);
                Ok((CpuStorage::F64(out), shape))
            }
            s if is_f32_family(s) => {
                let out = self.fwd::<f32>(&act_f32(s1, l1)?, contiguous(s2, l2)?, g);
                Ok((store_f32(out, s1.dtype())?, shape))
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
        let (b, h, w, c) = dims4(self.name(), l1)?;
        let g = Geom::new(b, h, w, c, self.k, self.stride);
        let out = g.launch(
            self.name(),
            "dw_fwd",
            s1,
            l1,
            s2,
            l2,
            g.b * g.oh * g.ow * g.c,
        )?;
        Ok((out, Shape::from((b, g.oh, g.ow, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (b, h, w, c) = x.dims4()?;
        let geom = Geom::new(b, h, w, c, self.k, self.stride);
        let gx = grad.apply_op2_no_bwd(weight, &DepthwiseGradInput { geom })?;
        let gw = x.apply_op2_no_bwd(&grad, &DepthwiseGradWeight { geom })?;
        Ok((Some(gx), Some(gw)))
    }
}

/// Gradient with respect to the input: (grad `[B, OH, OW, C]`, weight) → `[B, H, W, C]`.
struct DepthwiseGradInput {
    geom: Geom,
}

impl DepthwiseGradInput {
    fn run<T: Elem>(&self, grad: &[T], wt: &[T]) -> Vec<T> {
        let g = self.geom;
        let row = g.w * g.c;
        let mut gx = vec![T::zero(); g.b * g.h * row];
        gx.par_chunks_mut(row).enumerate().for_each(|(r, gx_row)| {
            let (bi, iy) = (r / g.h, r % g.h);
            super::wide_simd(
                #[inline(always)]
                || {
                    for ky in 0..g.k {
                        let Some(oy) = Geom::output_of(iy, ky, g.s, g.pad_top, g.oh) else {
                            continue;
                        };
                        let g_row = &grad[(bi * g.oh + oy) * g.ow * g.c..][..g.ow * g.c];
                        for kx in 0..g.k {
                            let wk = &wt[(ky * g.k + kx) * g.c..][..g.c];
                            for ix in 0..g.w {
                                let Some(ox) = Geom::output_of(ix, kx, g.s, g.pad_left, g.ow)
                                else {
                                    continue;
                                };
                                let o = &mut gx_row[ix * g.c..][..g.c];
                                let gv = &g_row[ox * g.c..][..g.c];
                                for ((o, &gv), &wv) in o.iter_mut().zip(gv).zip(wk) {
                                    *o += gv * wv;
                                }
                            }
                        }
                    }
                },
            )
        });
        gx
    }
}

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "effdet-depthwise-conv2d-grad-input"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.geom;
        let n = g.b * g.h * g.w * g.c;
        let out = g.launch(self.name(), "dw_grad_input", s1, l1, s2, l2, n)?;
        Ok((out, Shape::from((g.b, g.h, g.w, g.c))))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geom;
        let shape = Shape::from((g.b, g.h, g.w, g.c));
        match s1 {
            CpuStorage::F64(_) => {
                let out = self.run::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?);
                Ok((CpuStorage::F64(out), shape))
            }
            s if is_f32_family(s) => {
                let out = self.run::<f32>(&act_f32(s1, l1)?, contiguous(s2, l2)?);
                Ok((store_f32(out, s1.dtype())?, shape))
            }
            s => Err(unsupported(self.name(), s)),
        }
    }
}

/// Gradient with respect to the kernel: (x, grad) → `[k, k, C]`.
struct DepthwiseGradWeight {
    geom: Geom,
}

impl DepthwiseGradWeight {
    fn run<T: Elem>(&self, x: &[T], grad: &[T]) -> Vec<T> {
        let g = self.geom;
        let taps = g.k * g.k * g.c;
        // Each output row accumulates in T; rows are summed in f64 so long sums stay accurate.
        let total = (0..g.b * g.oh)
            .into_par_iter()
            .fold(
                || (vec![0f64; taps], vec![T::zero(); taps]),
                |(mut acc, mut local), r| {
                    let (bi, oy) = (r / g.oh, r % g.oh);
                    local.iter_mut().for_each(|v| *v = T::zero());
                    let g_row = &grad[(bi * g.oh + oy) * g.ow * g.c..][..g.ow * g.c];
                    super::wide_simd(
                        #[inline(always)]
                        || {
                            for ky in 0..g.k {
                                let Some(iy) = Geom::input_of(oy, ky, g.s, g.pad_top, g.h) else {
                                    continue;
                                };
                                let x_row = &x[(bi * g.h + iy) * g.w * g.c..][..g.w * g.c];
                                for kx in 0..g.k {
                                    let lk = &mut local[(ky * g.k + kx) * g.c..][..g.c];
                                    for ox in 0..g.ow {
                                        let Some(ix) = Geom::input_of(ox, kx, g.s, g.pad_left, g.w)
                                        else {
                                            continue;
                                        };
                                        let xi = &x_row[ix * g.c..][..g.c];
                                        let gv = &g_row[ox * g.c..][..g.c];
                                        for ((l, &xv), &gv) in lk.iter_mut().zip(xi).zip(gv) {
                                            *l += xv * gv;
                                        }
                                    }
                                }
                            }
                        },
                    );
                    for (a, l) in acc.iter_mut().zip(&local) {
                        *a += l.to64();
                    }
                    (acc, local)
                },
            )
            .map(|(acc, _)| acc)
            .reduce(
                || vec![0f64; taps],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        total.into_iter().map(T::from64).collect()
    }
}

impl CustomOp2 for DepthwiseGradWeight {
    fn name(&self) -> &'static str {
        "effdet-depthwise-conv2d-grad-weight"
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
        let g = self.geom;
        let dev = s1.device();
        let x = cuda::act_view(self.name(), s1, l1)?;
        let grad = cuda::act_view(self.name(), s2, l2)?;
        if x.dtype() != grad.dtype() {
            candle_core::bail!("{}: input and gradient dtypes differ", self.name());
        }
        let taps = g.k * g.k;
        let acc = cuda::zeros::<f64>(dev, taps * g.c)?;
        let (name, _) = specialized("dw_grad_weight", g.k, g.s);
        let k = cuda::kernel_for(dev, &name, x.dtype())?;
        let a = g.int_args(self.name())?;
        let mut b = k.builder();
        x.push(&mut b);
        grad.push(&mut b);
        b.arg(&acc);
        for v in &a {
            b.arg(v);
        }
        // The specializations keep every tap in one thread: grid y is 1.
        let grid_taps = if name == "dw_grad_weight" { taps } else { 1 };
        cuda::launch(b, cuda::tap_reduction(g.b * g.oh, g.c, grid_taps))?;
        let out = cuda::f64_to_f32(dev, &acc, taps * g.c, 1.0)?;
        Ok((cuda::wrap(dev, out), Shape::from((g.k, g.k, g.c))))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geom;
        let shape = Shape::from((g.k, g.k, g.c));
        match s1 {
            CpuStorage::F64(_) => {
                let out = self.run::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?);
                Ok((CpuStorage::F64(out), shape))
            }
            // The kernel gradient is a parameter gradient: f32 whatever the activations.
            s if is_f32_family(s) => {
                let out = self.run::<f32>(&act_f32(s1, l1)?, &act_f32(s2, l2)?);
                Ok((CpuStorage::F32(out), shape))
            }
            s => Err(unsupported(self.name(), s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::{DType, Device};

    /// D0's shapes get the unrolled kernels (with the rows they walk); others the generic ones.
    #[test]
    fn kernel_choice_specializes_d0_shapes_only() {
        let g = Geom::new(2, 9, 7, 4, 5, 2);
        let walk = |w: Option<RowWalk>| w.map(|w| ((w.rows)(&g), w.per_thread));
        let (name, rows) = specialized("dw_fwd", 5, 2);
        assert_eq!(
            (name.as_str(), walk(rows)),
            ("dw_fwd_k5s2", Some((2 * 5, DW_ROW_BLOCK)))
        );
        let (name, rows) = specialized("dw_grad_input", 3, 1);
        assert_eq!(
            (name.as_str(), walk(rows)),
            ("dw_grad_input_k3s1", Some((2 * 9, DW_ROW_BLOCK)))
        );
        let (name, rows) = specialized("dw_grad_input", 5, 2);
        assert_eq!(
            (name.as_str(), walk(rows)),
            ("dw_grad_input_k5s2", Some((2 * 9, 1)))
        );
        assert!(include_str!("kernels.cu").contains(&format!("#define DW_R {DW_ROW_BLOCK}\n")));
        assert_eq!(specialized("dw_grad_weight", 3, 2).0, "dw_grad_weight_k3");
        for (base, k, s) in [
            ("dw_fwd", 7, 1),
            ("dw_grad_input", 3, 3),
            ("dw_grad_weight", 1, 1),
        ] {
            let (name, rows) = specialized(base, k, s);
            assert_eq!(name, base);
            assert!(rows.is_none());
        }
        // Every specialized name is a kernel in kernels.cu.
        let src = include_str!("kernels.cu");
        for k in [3, 5] {
            for s in [1, 2] {
                for base in ["dw_fwd", "dw_grad_input", "dw_grad_weight"] {
                    let (name, _) = specialized(base, k, s);
                    let (stem, suffix) = match name.rsplit_once("_k") {
                        Some((stem, suffix)) => (stem, suffix),
                        None => panic!("{name} is not specialized"),
                    };
                    let macro_use = if base == "dw_grad_weight" {
                        format!("DW_GRAD_WEIGHT({k})")
                    } else {
                        format!("DW_ROWS({k}, {s})")
                    };
                    assert!(
                        src.contains(&macro_use),
                        "{name}: no {macro_use} in kernels.cu"
                    );
                    assert!(src.contains(&format!("{stem}_k##K")), "{stem}_k{suffix}");
                }
            }
        }
    }

    /// Direct reference: zero-pad like TF "same", then slide the kernel.
    fn reference(x: &[f64], wt: &[f64], g: Geom) -> Vec<f64> {
        let mut out = vec![0.0; g.b * g.oh * g.ow * g.c];
        for bi in 0..g.b {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ch in 0..g.c {
                        let mut s = 0.0;
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let iy = (oy * g.s + ky) as isize - g.pad_top as isize;
                                let ix = (ox * g.s + kx) as isize - g.pad_left as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xi = ((bi * g.h + iy as usize) * g.w + ix as usize) * g.c + ch;
                                s += x[xi] * wt[(ky * g.k + kx) * g.c + ch];
                            }
                        }
                        out[((bi * g.oh + oy) * g.ow + ox) * g.c + ch] = s;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        // TF: out = ceil(in / s); total pad = max((out - 1) * s + k - in, 0), extra on the end.
        assert_eq!(same_padding(8, 3, 2), (4, 0, 1));
        assert_eq!(same_padding(7, 3, 2), (4, 1, 1));
        assert_eq!(same_padding(8, 5, 2), (4, 1, 2));
        assert_eq!(same_padding(8, 3, 1), (8, 1, 1));
        assert_eq!(same_padding(8, 5, 1), (8, 2, 2));
        assert_eq!(same_padding(1, 3, 2), (1, 1, 1));
    }

    #[test]
    fn hand_computed_stride2_asymmetric() -> Result<()> {
        // 1 image, 4x4, 1 channel, all-ones 3x3 kernel, stride 2: padding is (0 before, 1 after),
        // so output (0,0) sums x[0..3, 0..3] and output (1,1) sums x[2..4, 2..4].
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let xt = Tensor::from_vec(x, (1, 4, 4, 1), &Device::Cpu)?;
        let wt = Tensor::ones((3, 3, 1), DType::F32, &Device::Cpu)?;
        let y = depthwise_conv2d(&xt, &wt, 2)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // rows 0..3 cols 0..3: 0+1+2+4+5+6+8+9+10 = 45; (0,1): cols 2..4 -> 2+3+6+7+10+11 = 39
        // (1,0): rows 2..4 cols 0..3 -> 8+9+10+12+13+14 = 66; (1,1): 10+11+14+15 = 50
        assert_eq!(y, vec![45.0, 39.0, 66.0, 50.0]);
        Ok(())
    }

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for &(h, w, k, s) in &[(7, 6, 3, 1), (8, 8, 3, 2), (9, 7, 5, 2), (6, 6, 5, 1)] {
            let (b, c) = (2, 5);
            let x = rand_tensor(&[b, h, w, c], 1)?;
            let wt = rand_tensor(&[k, k, c], 2)?;
            let g = Geom::new(b, h, w, c, k, s);
            let want = reference(
                &x.flatten_all()?.to_vec1::<f64>()?,
                &wt.flatten_all()?.to_vec1::<f64>()?,
                g,
            );
            let got = depthwise_conv2d(&x, &wt, s)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for &(h, w, k, s) in &[(6, 5, 3, 1), (6, 6, 3, 2), (7, 5, 5, 2), (5, 5, 5, 1)] {
            let x = rand_tensor(&[2, h, w, 3], 3)?;
            let wt = rand_tensor(&[k, k, 3], 4)?;
            check_gradients(&[x, wt], |v| depthwise_conv2d(&v[0], &v[1], s), 1e-7)?;
        }
        Ok(())
    }
}
