//! Swish (SiLU) with a one-pass backward; candle's own `silu` backward takes nine tensor ops.

use super::{act_f32, contiguous, is_f32_family, store_f32, unsupported, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// x · sigmoid(x), elementwise, in `x`'s dtype (computed in f32 for f16/bf16).
pub fn swish(x: &Tensor) -> Result<Tensor> {
    crate::tape::op1(x, Swish)
}

const CHUNK: usize = 1 << 14;

fn fwd<T: Elem>(x: &[T]) -> Vec<T> {
    // SAFETY: each part is as long as its chunk of x, and the loop writes all of it.
    unsafe {
        super::par_filled(x.len(), CHUNK, |k, yc| {
            let xc = &x[k * CHUNK..][..yc.len()];
            super::wide_simd(
                #[inline(always)]
                || {
                    for (y, &x) in yc.iter_mut().zip(xc) {
                        y.write(x / (T::one() + (-x).exp_fast()));
                    }
                },
            )
        })
    }
}

fn grad<T: Elem>(x: &[T], g: &[T]) -> Vec<T> {
    // SAFETY: each part is as long as its chunks of x and g, and the loop writes all of it.
    unsafe {
        super::par_filled(x.len(), CHUNK, |k, dc| {
            let (xc, gc) = (&x[k * CHUNK..][..dc.len()], &g[k * CHUNK..][..dc.len()]);
            super::wide_simd(
                #[inline(always)]
                || {
                    for ((d, &x), &g) in dc.iter_mut().zip(xc).zip(gc) {
                        let s = x.sigmoid();
                        d.write(g * s * (T::one() + x * (T::one() - s)));
                    }
                },
            )
        })
    }
}

struct Swish;

impl CustomOp1 for Swish {
    fn name(&self) -> &'static str {
        "effdet-swish"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = l.shape().clone();
        match s {
            CpuStorage::F64(_) => Ok((CpuStorage::F64(fwd::<f64>(contiguous(s, l)?)), shape)),
            s if is_f32_family(s) => {
                Ok((store_f32(fwd::<f32>(&act_f32(s, l)?), s.dtype())?, shape))
            }
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
        let dev = s.device();
        let x = cuda::act_view(self.name(), s, l)?;
        let n = l.shape().elem_count();
        let out = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
        let k = cuda::kernel_for(dev, "swish_fwd", x.dtype())?;
        let n64 = n as i64;
        let mut b = k.builder();
        x.push(&mut b);
        out.push(&mut b);
        b.arg(&n64);
        cuda::launch(b, cuda::elementwise_ilp(n))?;
        Ok((out.wrap(dev), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &SwishGrad)?))
    }
}

/// (x, grad) → grad · sigmoid(x) · (1 + x · (1 − sigmoid(x))).
struct SwishGrad;

impl CustomOp2 for SwishGrad {
    fn name(&self) -> &'static str {
        "effdet-swish-grad"
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
        let x = cuda::act_view(self.name(), s1, l1)?;
        let g = cuda::act_view(self.name(), s2, l2)?;
        let n = l1.shape().elem_count();
        let out = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
        let k = cuda::kernel_for(dev, "swish_grad", x.dtype())?;
        let n64 = n as i64;
        let mut b = k.builder();
        x.push(&mut b);
        g.push(&mut b);
        out.push(&mut b);
        b.arg(&n64);
        cuda::launch(b, cuda::elementwise_ilp(n))?;
        Ok((out.wrap(dev), l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        match s1 {
            s if is_f32_family(s) => Ok((
                store_f32(grad::<f32>(&act_f32(s1, l1)?, &act_f32(s2, l2)?), s.dtype())?,
                shape,
            )),
            CpuStorage::F64(_) => Ok((
                CpuStorage::F64(grad::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?)),
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

    #[test]
    fn values() -> Result<()> {
        let x = Tensor::from_vec(vec![0f64, 1.0, -2.0], 3, &Device::Cpu)?;
        let y = swish(&x)?.to_vec1::<f64>()?;
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 1.0 / (1.0 + (-1f64).exp())).abs() < 1e-15);
        assert!((y[2] + 2.0 / (1.0 + 2f64.exp())).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let x = (rand_tensor(&[3, 4, 5], 41)? * 4.0)?;
        check_gradients(&[x], |v| swish(&v[0]), 1e-7)
    }
}
