//! Max-pooling with TensorFlow "same" padding on NHWC tensors. Padded positions never win the
//! max (TF pads with −∞), and the gradient goes to the first maximum in row-major window order.
//! Stock candle's `max_pool2d` has no padding and no backward when kernel ≠ stride.

use super::{
    act_f32, contiguous, dims4, is_f32_family, same_padding, store_f32, unsupported, Elem,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Max-pool `x` `[B, H, W, C]` with window `kernel` (h, w) and `stride` (h, w), TF "same"
/// padding. Output `[B, ceil(H/sh), ceil(W/sw), C]` in `x`'s dtype.
pub fn max_pool2d_same(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
) -> Result<Tensor> {
    x.dims4()?;
    if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 {
        candle_core::bail!("max_pool2d_same: kernel {kernel:?} and stride {stride:?} must be > 0");
    }
    crate::tape::op1(x, MaxPoolSame { kernel, stride })
}

#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    oh: usize,
    ow: usize,
    pt: usize,
    pl: usize,
}

impl Geom {
    fn new(l: &Layout, kernel: (usize, usize), stride: (usize, usize)) -> Result<Self> {
        let (b, h, w, c) = dims4("max_pool2d_same", l)?;
        let (oh, pt, _) = same_padding(h, kernel.0, stride.0);
        let (ow, pl, _) = same_padding(w, kernel.1, stride.1);
        Ok(Geom {
            b,
            h,
            w,
            c,
            kh: kernel.0,
            kw: kernel.1,
            sh: stride.0,
            sw: stride.1,
            oh,
            ow,
            pt,
            pl,
        })
    }

    /// Input rows (or columns) covered by output index `o`: [start, end).
    /// The kernels' integer arguments: B, H, W, C, KH, KW, SH, SW, OH, OW, PT, PL.
    #[cfg(feature = "cuda")]
    fn int_args(&self, op: &str) -> Result<[i32; 12]> {
        let i = |v| super::cuda::int(op, v);
        Ok([
            i(self.b)?,
            i(self.h)?,
            i(self.w)?,
            i(self.c)?,
            i(self.kh)?,
            i(self.kw)?,
            i(self.sh)?,
            i(self.sw)?,
            i(self.oh)?,
            i(self.ow)?,
            i(self.pt)?,
            i(self.pl)?,
        ])
    }

    fn span(o: usize, s: usize, k: usize, pad: usize, size: usize) -> (usize, usize) {
        let start = (o * s) as isize - pad as isize;
        let end = (start + k as isize).min(size as isize);
        (start.max(0) as usize, end.max(0) as usize)
    }
}

/// For every output element, the flat index (within its image) of the input element that won.
fn argmax<T: Elem>(x: &[T], g: Geom) -> Vec<u32> {
    let row = g.ow * g.c;
    let mut idx = vec![0u32; g.b * g.oh * row];
    idx.par_chunks_mut(row)
        .enumerate()
        .for_each(|(r, idx_row)| {
            let (bi, oy) = (r / g.oh, r % g.oh);
            let img = &x[bi * g.h * g.w * g.c..][..g.h * g.w * g.c];
            let (y0, y1) = Geom::span(oy, g.sh, g.kh, g.pt, g.h);
            let mut best = vec![T::neg_infinity(); g.c];
            for ox in 0..g.ow {
                let (x0, x1) = Geom::span(ox, g.sw, g.kw, g.pl, g.w);
                best.iter_mut().for_each(|v| *v = T::neg_infinity());
                let out = &mut idx_row[ox * g.c..][..g.c];
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let base = (iy * g.w + ix) * g.c;
                        let xi = &img[base..][..g.c];
                        for ch in 0..g.c {
                            // Strictly greater keeps the first maximum, as TF's CPU kernel does.
                            if xi[ch] > best[ch] {
                                best[ch] = xi[ch];
                                out[ch] = (base + ch) as u32;
                            }
                        }
                    }
                }
            }
        });
    idx
}

struct MaxPoolSame {
    kernel: (usize, usize),
    stride: (usize, usize),
}

impl MaxPoolSame {
    fn fwd<T: Elem>(&self, x: &[T], g: Geom) -> Vec<T> {
        let row = g.ow * g.c;
        let mut out = vec![T::neg_infinity(); g.b * g.oh * row];
        out.par_chunks_mut(row)
            .enumerate()
            .for_each(|(r, out_row)| {
                let (bi, oy) = (r / g.oh, r % g.oh);
                let img = &x[bi * g.h * g.w * g.c..][..g.h * g.w * g.c];
                let (y0, y1) = Geom::span(oy, g.sh, g.kh, g.pt, g.h);
                for ox in 0..g.ow {
                    let (x0, x1) = Geom::span(ox, g.sw, g.kw, g.pl, g.w);
                    let o = &mut out_row[ox * g.c..][..g.c];
                    for iy in y0..y1 {
                        for ix in x0..x1 {
                            let xi = &img[(iy * g.w + ix) * g.c..][..g.c];
                            for (o, &v) in o.iter_mut().zip(xi) {
                                if v > *o {
                                    *o = v;
                                }
                            }
                        }
                    }
                }
            });
        out
    }
}

impl CustomOp1 for MaxPoolSame {
    fn name(&self) -> &'static str {
        "effdet-max-pool2d-same"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l, self.kernel, self.stride)?;
        let shape = Shape::from((g.b, g.oh, g.ow, g.c));
        match s {
            CpuStorage::F64(_) => Ok((
                CpuStorage::F64(self.fwd::<f64>(contiguous(s, l)?, g)),
                shape,
            )),
            s if is_f32_family(s) => Ok((
                store_f32(self.fwd::<f32>(&act_f32(s, l)?, g), s.dtype())?,
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
        use super::cuda::{self, PushKernelArg};
        let g = Geom::new(l, self.kernel, self.stride)?;
        let dev = s.device();
        let x = cuda::act_view(self.name(), s, l)?;
        let n = g.b * g.oh * g.ow * g.c;
        let out = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
        let k = cuda::kernel_for(dev, "maxpool_fwd", x.dtype())?;
        let ints = g.int_args(self.name())?;
        let mut b = k.builder();
        x.push(&mut b);
        out.push(&mut b);
        for v in &ints {
            b.arg(v);
        }
        cuda::launch(b, cuda::elementwise(n))?;
        Ok((out.wrap(dev), Shape::from((g.b, g.oh, g.ow, g.c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = MaxPoolGrad {
            kernel: self.kernel,
            stride: self.stride,
        };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// (x, grad of the pooled output) → grad of x: each output gradient goes to its window's max.
struct MaxPoolGrad {
    kernel: (usize, usize),
    stride: (usize, usize),
}

impl MaxPoolGrad {
    fn run<T: Elem>(&self, x: &[T], grad: &[T], g: Geom) -> Vec<T> {
        let idx = argmax(x, g);
        let img_in = g.h * g.w * g.c;
        let img_out = g.oh * g.ow * g.c;
        let mut gx = vec![T::zero(); g.b * img_in];
        // Windows overlap across output rows, so images (not rows) are the parallel unit.
        gx.par_chunks_mut(img_in)
            .enumerate()
            .for_each(|(bi, gx_img)| {
                let gi = &grad[bi * img_out..][..img_out];
                let ii = &idx[bi * img_out..][..img_out];
                for (&gv, &i) in gi.iter().zip(ii) {
                    gx_img[i as usize] += gv;
                }
            });
        gx
    }
}

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "effdet-max-pool2d-same-grad"
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
        let g = Geom::new(l1, self.kernel, self.stride)?;
        let dev = s1.device();
        let x = cuda::act_view(self.name(), s1, l1)?;
        let grad = cuda::act_view(self.name(), s2, l2)?;
        let n = g.b * g.h * g.w * g.c;
        // Gradients of overlapping windows add up atomically in an f32 scratch, rounded once.
        let gx = cuda::zeros::<f32>(dev, n)?;
        let k = cuda::kernel_for(dev, "maxpool_grad", x.dtype())?;
        let ints = g.int_args(self.name())?;
        let mut b = k.builder();
        x.push(&mut b);
        grad.push(&mut b);
        b.arg(&gx);
        for v in &ints {
            b.arg(v);
        }
        cuda::launch(b, cuda::elementwise(g.b * g.oh * g.ow * g.c))?;
        let gx = cuda::f32_to_act(dev, gx, n, x.dtype())?;
        Ok((gx.wrap(dev), l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1, self.kernel, self.stride)?;
        let shape = l1.shape().clone();
        match s1 {
            CpuStorage::F64(_) => {
                let out = self.run::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?, g);
                Ok((CpuStorage::F64(out), shape))
            }
            s if is_f32_family(s) => {
                let out = self.run::<f32>(&act_f32(s1, l1)?, &act_f32(s2, l2)?, g);
                Ok((store_f32(out, s1.dtype())?, shape))
            }
            s => Err(unsupported(self.name(), s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::Device;

    #[test]
    fn hand_computed_3x3_stride2_same() -> Result<()> {
        // 4x4 single channel; TF "same" with k=3, s=2 pads (0 before, 1 after), so windows are
        // rows/cols {0,1,2} and {2,3}.
        let x: Vec<f32> = vec![
            1., 9., 2., 0., //
            3., 4., 5., 6., //
            7., 8., -1., 2., //
            0., 1., 3., -5.,
        ];
        let xt = Tensor::from_vec(x, (1, 4, 4, 1), &Device::Cpu)?;
        let y = max_pool2d_same(&xt, (3, 3), (2, 2))?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![9., 6., 8., 3.]);
        // Negative inputs: padding must not contribute a 0.
        let neg = (xt.ones_like()? * -4.0)?;
        let yn = max_pool2d_same(&neg, (3, 3), (2, 2))?;
        assert_eq!(yn.flatten_all()?.to_vec1::<f32>()?, vec![-4.0; 4]);
        Ok(())
    }

    #[test]
    fn odd_sizes_and_rectangular_strides() -> Result<()> {
        let x = rand_tensor(&[2, 5, 7, 3], 7)?;
        let y = max_pool2d_same(&x, (3, 2), (2, 1))?;
        assert_eq!(y.dims(), &[2, 3, 7, 3]);
        // Compare with a direct loop.
        let xv = x.flatten_all()?.to_vec1::<f64>()?;
        let yv = y.flatten_all()?.to_vec1::<f64>()?;
        let (_, pt, _) = same_padding(5, 3, 2);
        let (_, pl, _) = same_padding(7, 2, 1);
        for b in 0..2 {
            for oy in 0..3 {
                for ox in 0..7 {
                    for c in 0..3 {
                        let mut m = f64::NEG_INFINITY;
                        for ky in 0..3 {
                            for kx in 0..2 {
                                let iy = (oy * 2 + ky) as isize - pt as isize;
                                let ix = (ox + kx) as isize - pl as isize;
                                if iy >= 0 && ix >= 0 && iy < 5 && ix < 7 {
                                    m = m
                                        .max(xv[((b * 5 + iy as usize) * 7 + ix as usize) * 3 + c]);
                                }
                            }
                        }
                        assert_eq!(yv[((b * 3 + oy) * 7 + ox) * 3 + c], m);
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for &(h, w, k, s) in &[(8, 8, 3, 2), (7, 5, 3, 2), (4, 4, 2, 2)] {
            let x = rand_tensor(&[2, h, w, 3], 11)?;
            check_gradients(&[x], |v| max_pool2d_same(&v[0], (k, k), (s, s)), 1e-7)?;
        }
        Ok(())
    }
}
