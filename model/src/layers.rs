//! Building blocks shared by backbone, BiFPN and heads, all on NHWC tensors: 1×1 convolution as
//! a matrix product, depthwise-separable convolution, batch norm with running statistics, and
//! the backbone stem convolution. The 1×1 and stem products follow the layer's
//! [`Precision`] (see [`crate::precision`]), whose compute type is also the activations'
//! storage type; parameters are f32.

use crate::ops::{self, Activation};
use crate::precision::Precision;
use crate::vars::{Init, ModelVars};
use candle_core::{Result, Tensor, Var};

/// 1×1 convolution, kernel `[C_in, C_out]` (name `<prefix>.weight`), optional bias. The
/// product runs under autocast at [`Conv1x1::precision`]; the bias is added in f32.
pub struct Conv1x1 {
    pub(crate) weight: Tensor,
    bias: Option<Tensor>,
    precision: Precision,
    /// Whether the product is widened to f32 before the bias is added (the prediction layers:
    /// class logits sit near the prior bias −4.6, where an f16 store would round their
    /// small initial spread away).
    f32_output: bool,
}

impl Conv1x1 {
    /// Creates `<prefix>.weight` (and `<prefix>.bias`, zeros, when `bias`).
    pub fn new(
        vars: &ModelVars,
        prefix: &str,
        cin: usize,
        cout: usize,
        bias: bool,
        init: Init,
    ) -> Result<Self> {
        let weight = vars.param(&format!("{prefix}.weight"), &[cin, cout], init)?;
        let bias = if bias {
            Some(vars.param(&format!("{prefix}.bias"), &[cout], Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Conv1x1 {
            weight,
            bias,
            precision: Precision::F32,
            f32_output: false,
        })
    }

    /// Compute precision of the matrix product (F32 after [`Conv1x1::new`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the compute precision of the matrix product; the weight stays f32.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Makes [`Self::forward`] return f32 whatever the precision (the bias is then added in
    /// f32).
    pub(crate) fn set_f32_output(&mut self, on: bool) {
        self.f32_output = on;
    }

    /// `x` `[..., C_in]` → `[..., C_out]`, in `x`'s dtype (or f32, see [`Self::set_f32_output`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One graph node (see `ops::linear`); F32 multiplies in x's own dtype.
        let compute = match self.precision {
            Precision::F32 => x.dtype(),
            p => p.compute_dtype(),
        };
        ops::linear(
            x,
            &self.weight,
            self.bias.as_ref(),
            compute,
            self.f32_output,
        )
    }
}

/// Depthwise k×k (kernel `<prefix>.dw.weight` `[k, k, C]`) then pointwise 1×1 with bias
/// (`<prefix>.pw.weight` `[C, C_out]`, `<prefix>.pw.bias`), as Keras `SeparableConv2D`.
pub struct SeparableConv {
    pub(crate) dw: Tensor,
    pub(crate) pw: Conv1x1,
}

impl SeparableConv {
    /// `dw_init` / `pw_init` initialize the two kernels; `bias_init` the bias.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vars: &ModelVars,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        dw_init: Init,
        pw_init: Init,
        bias_init: Init,
    ) -> Result<Self> {
        let dw = vars.param(&format!("{prefix}.dw.weight"), &[k, k, cin], dw_init)?;
        let pw_weight = vars.param(&format!("{prefix}.pw.weight"), &[cin, cout], pw_init)?;
        let bias = vars.param(&format!("{prefix}.pw.bias"), &[cout], bias_init)?;
        Ok(SeparableConv {
            dw,
            pw: Conv1x1 {
                weight: pw_weight,
                bias: Some(bias),
                precision: Precision::F32,
                f32_output: false,
            },
        })
    }

    /// Sets the compute precision of the pointwise product (the depthwise part is an f32
    /// custom op and stays f32).
    pub fn set_precision(&mut self, precision: Precision) {
        self.pw.set_precision(precision);
    }

    /// `x` `[B, H, W, C]` → `[B, H, W, C_out]` (stride 1, "same").
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.pw.forward(&ops::depthwise_conv2d(x, &self.dw, 1)?)
    }
}

/// Batch norm over the channel axis: `<prefix>.gamma`, `<prefix>.beta` (trainable) and
/// `<prefix>.running_mean`, `<prefix>.running_var` (statistics).
pub struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    mean: Var,
    var: Var,
    momentum: f64,
    eps: f64,
}

impl BatchNorm {
    /// gamma 1, beta 0, running mean 0, running variance 1 (Keras defaults).
    pub fn new(vars: &ModelVars, prefix: &str, c: usize, momentum: f64, eps: f64) -> Result<Self> {
        Ok(BatchNorm {
            gamma: vars.param(&format!("{prefix}.gamma"), &[c], Init::Const(1.0))?,
            beta: vars.param(&format!("{prefix}.beta"), &[c], Init::Const(0.0))?,
            mean: vars.stat(&format!("{prefix}.running_mean"), &[c], Init::Const(0.0))?,
            var: vars.stat(&format!("{prefix}.running_var"), &[c], Init::Const(1.0))?,
            momentum,
            eps,
        })
    }

    /// Training mode normalizes with batch statistics and moves the running averages towards
    /// them (variance with Bessel's correction, as TensorFlow's fused batch norm does);
    /// evaluation mode uses the running averages.
    pub fn forward(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        let dev = x.device();
        if !dev.is_cpu() || resident_on_cpu() {
            // Statistics stay on the device (no per-layer synchronization).
            return self.forward_resident(x, train, act);
        }
        if !train {
            return ops::batch_norm_eval(
                x,
                &self.gamma,
                &self.beta,
                &self.mean,
                &self.var,
                self.eps,
                act,
            );
        }
        let (y, stats) = ops::batch_norm_train(x, &self.gamma, &self.beta, self.eps, act)?;
        let n = stats.count as f64;
        let bessel = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let m = self.momentum;
        let old_mean: Vec<f64> = self.mean.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let old_var: Vec<f64> = self.var.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let new_mean: Vec<f32> = old_mean
            .iter()
            .zip(&stats.mean)
            .map(|(o, b)| (m * o + (1.0 - m) * b) as f32)
            .collect();
        let new_var: Vec<f32> = old_var
            .iter()
            .zip(&stats.var)
            .map(|(o, b)| (m * o + (1.0 - m) * b * bessel) as f32)
            .collect();
        self.mean
            .set(&Tensor::from_vec(new_mean, old_mean.len(), dev)?.to_dtype(self.mean.dtype())?)?;
        self.var
            .set(&Tensor::from_vec(new_var, old_var.len(), dev)?.to_dtype(self.var.dtype())?)?;
        Ok(y)
    }
}

/// `EFFDET_RESIDENT_BN=1`: the CPU takes the GPU's batch-norm path (device-resident statistics;
/// the same results, bit for bit), so a CPU run counts the tensors a GPU step creates
/// (`bench-train`'s `tensors_per_step`).
fn resident_on_cpu() -> bool {
    static RESIDENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RESIDENT.get_or_init(|| std::env::var("EFFDET_RESIDENT_BN").is_ok_and(|v| v != "0"))
}

impl BatchNorm {
    /// [`BatchNorm::forward`] with device-resident statistics (GPUs): the moments and the
    /// running-average update stay tensors, in the same f64 arithmetic as the CPU path.
    fn forward_resident(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        use candle_core::DType;
        if !train {
            return ops::batch_norm_eval_resident(
                x,
                &self.gamma,
                &self.beta,
                self.mean.as_tensor(),
                self.var.as_tensor(),
                self.eps,
                act,
            );
        }
        let (y, moments) =
            ops::batch_norm_train_resident(x, &self.gamma, &self.beta, self.eps, act)?;
        let n = (x.elem_count() / self.gamma.elem_count().max(1)) as f64;
        let bessel = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let m = self.momentum;
        if self.mean.dtype() == DType::F32 && self.var.dtype() == DType::F32 {
            // One launch for both averages (the composition below takes ~16).
            ops::batch_norm_update_running(
                self.mean.as_tensor(),
                self.var.as_tensor(),
                &moments,
                m,
                self.eps,
                bessel,
            )?;
            return Ok(y);
        }
        let batch_mean = moments.get(0)?;
        let batch_var = ((moments.get(1)?.sqr()?.recip()? - self.eps)? * bessel)?;
        for (stat, batch) in [(&self.mean, batch_mean), (&self.var, batch_var)] {
            let old = stat.as_tensor().detach().to_dtype(DType::F64)?;
            let new = ((old * m)? + (batch * (1.0 - m))?)?;
            stat.set(&new.to_dtype(stat.dtype())?)?;
        }
        Ok(y)
    }
}

/// The backbone stem: 3×3 stride-2 convolution, TF "same" padding, no bias, on NCHW images;
/// returns NHWC. Kernel `<prefix>.weight` is stored `[C_out, 3, 3, 3]` (candle's OIHW). The
/// convolution runs under autocast at [`StemConv::precision`].
pub struct StemConv {
    pub(crate) weight: Tensor,
    precision: Precision,
}

impl StemConv {
    /// automl's EfficientNet initializer, fan_out = 3·3·C_out.
    pub fn new(vars: &ModelVars, prefix: &str, cout: usize) -> Result<Self> {
        let weight = vars.param(
            &format!("{prefix}.weight"),
            &[cout, 3, 3, 3],
            Init::efficientnet_conv(9 * cout),
        )?;
        Ok(StemConv {
            weight,
            precision: Precision::F32,
        })
    }

    /// Compute precision of the convolution (F32 after [`StemConv::new`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the compute precision of the convolution; the weight stays f32.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// `images` `[B, 3, H, W]` (f32) → `[B, ceil(H/2), ceil(W/2), C_out]` in the compute type
    /// of [`StemConv::precision`] (the network's activation type from here on). On the CPU
    /// candle's convolution; on other devices [`StemConv::forward_im2col`].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        // A tape records the im2col product (candle's convolution is not a recorded op).
        if !images.device().is_cpu() || crate::tape::active().is_some() {
            return self.forward_im2col(images);
        }
        let (_, _, h, w) = images.dims4()?;
        let (_, pt, pb) = ops::same_padding(h, 3, 2);
        let (_, pl, pr) = ops::same_padding(w, 3, 2);
        let x = images
            .pad_with_zeros(2, pt, pb)?
            .pad_with_zeros(3, pl, pr)?;
        let y = self
            .precision
            .autocast_conv(&x, &self.weight, |x, w| x.conv2d(w, 0, 2, 1, 1))?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        self.precision.store_activations(&y)
    }

    /// The same convolution as one matrix product over gathered 3×3 patches. candle's CUDA
    /// backend computes the kernel gradient of a convolution with a kernel that parallelizes
    /// over the 3·3·3·C_out outputs only (one thread block: 55% of a D0 step on an H100);
    /// as a product the gradient is a cuBLAS GEMM.
    pub fn forward_im2col(&self, images: &Tensor) -> Result<Tensor> {
        let (_, ci, h, w) = images.dims4()?;
        // Gathered in the compute type: the 16-bit patches are half the traffic.
        let images = self.precision.store_activations(images)?;
        let (oh, pt, _) = ops::same_padding(h, 3, 2);
        let (ow, pl, _) = ops::same_padding(w, 3, 2);
        // Rows (b, oy, ox), columns (c_in, ky, kx) = the OIHW kernel's.
        let patches = ops::stem_patches(&images, (oh, ow), pt, pl)?;
        let cout = self.weight.dim(0)?;
        let kernel = match crate::tape::active() {
            // The OIHW → (I·9, O) view, recorded so the gradient reaches the weight.
            Some(tape) => {
                let k = self.weight.detach().reshape((cout, ci * 9))?.t()?;
                let dims = self.weight.dims().to_vec();
                tape.push("stem weight view", &[&self.weight], &k, move |g| {
                    Ok(vec![Some(g.t()?.contiguous()?.reshape(dims)?)])
                });
                k
            }
            None => self.weight.reshape((cout, ci * 9))?.t()?,
        };
        // One node whose backward skips the (untracked) patches' gradient.
        let compute = match self.precision {
            Precision::F32 => patches.dtype(),
            p => p.compute_dtype(),
        };
        ops::linear(&patches, &kernel, None, compute, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::{DType, Device};

    #[test]
    fn stem_im2col_matches_the_convolution() -> Result<()> {
        // Odd and even sizes (asymmetric "same" padding), forward and kernel gradient.
        for (h, w) in [(9, 8), (16, 16), (7, 11)] {
            let vars = ModelVars::new(&Device::Cpu, 3);
            let stem = StemConv::new(&vars, "stem", 5)?;
            let x = candle_core::Var::from_tensor(
                &rand_tensor(&[2, 3, h, w], 4)?.to_dtype(DType::F32)?,
            )?;
            let r = rand_tensor(&[2, h.div_ceil(2), w.div_ceil(2), 5], 5)?.to_dtype(DType::F32)?;
            let a = stem.forward(x.as_tensor())?;
            let b = stem.forward_im2col(x.as_tensor())?;
            assert_eq!(a.dims(), b.dims());
            let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{h}x{w}: forward differs by {diff}");
            let ga = (&a * &r)?.sum_all()?.backward()?;
            let gb = (&b * &r)?.sum_all()?.backward()?;
            let (u, v) = (ga.get(&stem.weight).unwrap(), gb.get(&stem.weight).unwrap());
            let d = (u - v)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "{h}x{w}: kernel gradient differs by {d}");
            // The images are data: the patches carry no gradient back to them.
            assert!(gb.get(x.as_tensor()).is_none());
        }
        Ok(())
    }

    #[test]
    fn conv1x1_is_a_per_pixel_matrix_product() -> Result<()> {
        let vars = ModelVars::new(&Device::Cpu, 0);
        let conv = Conv1x1::new(&vars, "c", 2, 3, true, Init::Const(0.0))?;
        let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu)?;
        let conv = Conv1x1 {
            weight: w,
            bias: conv.bias.map(|b| (b + 1.0).unwrap()),
            precision: Precision::F32,
            f32_output: false,
        };
        let x = Tensor::new(&[1f32, -1.], &Device::Cpu)?.reshape((1, 1, 1, 2))?;
        let y = conv.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![1. - 4. + 1., 2. - 5. + 1., 3. - 6. + 1.]);
        Ok(())
    }

    #[test]
    fn stem_matches_direct_convolution_and_gradients() -> Result<()> {
        // TF "same" at stride 2 on an even size pads only after: output (0,0) covers rows and
        // columns 0..3, output (last) covers the last two rows/columns plus one zero row.
        let img = rand_tensor(&[1, 3, 6, 4], 81)?;
        let w = rand_tensor(&[2, 3, 3, 3], 82)?;
        let stem = StemConv {
            weight: w.clone(),
            precision: Precision::F32,
        };
        let y = stem.forward(&img)?; // [1, 3, 2, 2]
        assert_eq!(y.dims(), &[1, 3, 2, 2]);
        let iv = img.flatten_all()?.to_vec1::<f64>()?;
        let wv = w.flatten_all()?.to_vec1::<f64>()?;
        let yv = y.flatten_all()?.to_vec1::<f64>()?;
        for oy in 0..3 {
            for ox in 0..2 {
                for o in 0..2 {
                    let mut s = 0.0;
                    for c in 0..3 {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (oy * 2 + ky, ox * 2 + kx); // pad before = 0
                                if iy < 6 && ix < 4 {
                                    s += iv[(c * 6 + iy) * 4 + ix]
                                        * wv[((o * 3 + c) * 3 + ky) * 3 + kx];
                                }
                            }
                        }
                    }
                    assert!((yv[(oy * 2 + ox) * 2 + o] - s).abs() < 1e-12);
                }
            }
        }
        check_gradients(
            &[img, w],
            |v| {
                StemConv {
                    weight: v[1].clone(),
                    precision: Precision::F32,
                }
                .forward(&v[0])
            },
            1e-7,
        )
    }

    #[test]
    fn batch_norm_updates_running_stats_like_tensorflow() -> Result<()> {
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 0);
        let bn = BatchNorm::new(&vars, "bn", 1, 0.99, 1e-3)?;
        let x = Tensor::new(&[1f32, 2., 3., 6.], &dev)?.reshape((1, 2, 2, 1))?;
        bn.forward(&x, true, Activation::None)?;
        // mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3.
        let m = bn.mean.to_vec1::<f32>()?[0];
        let v = bn.var.to_vec1::<f32>()?[0];
        assert!((m - 0.01 * 3.0).abs() < 1e-6, "{m}");
        assert!((v - (0.99 + 0.01 * 14.0 / 3.0)).abs() < 1e-6, "{v}");
        // Eval mode uses those statistics.
        let y = bn
            .forward(&x, false, Activation::None)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = (1.0 - m) / (v + 1e-3).sqrt();
        assert!((y[0] - want).abs() < 1e-5);
        assert_eq!(x.dtype(), DType::F32);
        Ok(())
    }
}
