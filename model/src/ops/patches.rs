//! The stem convolution's patches (im2col) in one pass: the stem runs as a matrix product
//! (see `StemConv::forward_im2col`), and gathering its patches from stock views took ~22
//! strided copies per step (~7 ms of a batch-64 fp16 step on an H200; the kernel takes 0.7).

use super::{contiguous, unsupported};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `images` `[B, C, H, W]` → `[B, OH, OW, C·9]` in the same dtype: the 3×3 windows of a
/// stride-2 convolution with TensorFlow "same" padding (`pad_top`, `pad_left` zero rows and
/// columns before the image; zeros wherever a window leaves it), columns ordered (c, ky, kx)
/// like an OIHW kernel's. No gradient (the stem's input is the data).
pub fn stem_patches(
    images: &Tensor,
    out_hw: (usize, usize),
    pad_top: usize,
    pad_left: usize,
) -> Result<Tensor> {
    let (oh, ow) = out_hw;
    images.contiguous()?.apply_op1_no_bwd(&StemPatches {
        oh,
        ow,
        pt: pad_top,
        pl: pad_left,
    })
}

struct StemPatches {
    oh: usize,
    ow: usize,
    pt: usize,
    pl: usize,
}

impl StemPatches {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        match l.dims() {
            &[b, c, h, w] if c > 0 && self.oh > 0 && self.ow > 0 => Ok((b, c, h, w)),
            d => candle_core::bail!(
                "stem patches: expected [B, C, H, W] images (C > 0) for a {}×{} output, got {d:?}",
                self.oh,
                self.ow
            ),
        }
    }

    fn out_shape(&self, b: usize, c: usize) -> Shape {
        Shape::from((b, self.oh, self.ow, c * 9))
    }

    fn run<T: WithDType>(&self, x: &[T], (b, c, h, w): (usize, usize, usize, usize)) -> Vec<T> {
        let row = self.ow * c * 9;
        let mut out = vec![T::zero(); b * self.oh * row];
        out.par_chunks_mut(row)
            .enumerate()
            .for_each(|(r, out_row)| {
                let (bi, oy) = (r / self.oh, r % self.oh);
                for (ox, patch) in out_row.chunks_mut(c * 9).enumerate() {
                    for (col, v) in patch.iter_mut().enumerate() {
                        let (ci, tap) = (col / 9, col % 9);
                        let iy = (oy * 2 + tap / 3).checked_sub(self.pt).filter(|&y| y < h);
                        let ix = (ox * 2 + tap % 3).checked_sub(self.pl).filter(|&x| x < w);
                        if let (Some(iy), Some(ix)) = (iy, ix) {
                            *v = x[((bi * c + ci) * h + iy) * w + ix];
                        }
                    }
                }
            });
        out
    }
}

impl CustomOp1 for StemPatches {
    fn name(&self) -> &'static str {
        "effdet-stem-patches"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l)?;
        let shape = self.out_shape(d.0, d.1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.run(contiguous::<f32>(s, l)?, d)),
            CpuStorage::F16(_) => CpuStorage::F16(self.run(contiguous::<half::f16>(s, l)?, d)),
            CpuStorage::BF16(_) => CpuStorage::BF16(self.run(contiguous::<half::bf16>(s, l)?, d)),
            CpuStorage::F64(_) => CpuStorage::F64(self.run(contiguous::<f64>(s, l)?, d)),
            s => return Err(unsupported(self.name(), s)),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, PushKernelArg};
        use candle_core::backend::BackendStorage;
        let (b, c, h, w) = self.dims(l)?;
        let shape = self.out_shape(b, c);
        let n = shape.elem_count();
        if n > u32::MAX as usize {
            candle_core::bail!(
                "{}: {n} elements exceed the kernels' 32-bit indexing",
                self.name()
            );
        }
        let dev = s.device();
        let x = cuda::act_view(self.name(), s, l)?;
        let out = cuda::ActSlice::alloc(dev, x.dtype(), n)?;
        let k = cuda::kernel_for(dev, "stem_patches", x.dtype())?;
        let ints = [b, c, h, w, self.oh, self.ow, self.pt, self.pl]
            .map(|v| cuda::int(self.name(), v))
            .into_iter()
            .collect::<Result<Vec<i32>>>()?;
        let mut args = k.builder();
        x.push(&mut args);
        out.push(&mut args);
        for v in &ints {
            args.arg(v);
        }
        cuda::launch(args, cuda::elementwise(n))?;
        Ok((out.wrap(dev), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Against the windows cut out of the zero-padded image by hand.
    #[test]
    fn patches_are_the_padded_windows() -> Result<()> {
        let dev = Device::Cpu;
        // 5×4 at stride 2: 3×2 outputs, "same" pads 1 row after (top 0) and 1 column after.
        let (b, c, h, w) = (2, 3, 5, 4);
        let x = Tensor::arange(1f32, (b * c * h * w + 1) as f32, &dev)?.reshape((b, c, h, w))?;
        let (oh, pt, _) = crate::ops::same_padding(h, 3, 2);
        let (ow, pl, _) = crate::ops::same_padding(w, 3, 2);
        assert_eq!((oh, ow, pt, pl), (3, 2, 1, 0));
        let patches = stem_patches(&x, (oh, ow), pt, pl)?;
        assert_eq!(patches.dims(), &[b, oh, ow, c * 9]);
        let got = patches.flatten_all()?.to_vec1::<f32>()?;
        let p = x.pad_with_zeros(2, pt, 2)?.pad_with_zeros(3, pl, 2)?;
        let mut i = 0;
        for bi in 0..b {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ci in 0..c {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let want = p
                                    .get(bi)?
                                    .get(ci)?
                                    .get(oy * 2 + ky)?
                                    .get(ox * 2 + kx)?
                                    .to_scalar::<f32>()?;
                                assert_eq!(got[i], want, "b{bi} y{oy} x{ox} c{ci} {ky}{kx}");
                                i += 1;
                            }
                        }
                    }
                }
            }
        }
        // 16-bit images give the same values, exactly.
        let half = stem_patches(&x.to_dtype(DType::F16)?, (oh, ow), pt, pl)?;
        assert_eq!(half.dtype(), DType::F16);
        let back = half.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(back, got);
        // Shapes it cannot gather are errors, not panics.
        assert!(stem_patches(
            &Tensor::zeros((1, 0, 4, 4), DType::F32, &dev)?,
            (2, 2),
            0,
            0
        )
        .is_err());
        assert!(stem_patches(&x.flatten_all()?, (oh, ow), pt, pl).is_err());
        Ok(())
    }
}
