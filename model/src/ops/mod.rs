//! Hand-written kernels that stock candle lacks or runs too slowly for EfficientDet.
//!
//! Every op works on channels-last (NHWC) tensors, the layout the whole network uses, and is
//! implemented as a candle custom op with a CPU forward and a backward pass. The backward
//! passes are themselves custom ops (without backward). Under the `cuda` feature every op also
//! has a `cuda_fwd` running the kernels of `kernels.cu` (long sums in f64 as on the CPU, so
//! both devices agree to float rounding).
//!
//! Activations may be stored as f32, f16 or bf16 (mixed precision keeps them 16-bit, as
//! PyTorch AMP does); every op computes in f32 whatever the storage and rounds once when it
//! stores, so a 16-bit op equals the f32 op on the widened inputs, rounded. Parameters
//! (depthwise kernels, biases, γ/β) and their gradients are always f32. f64 (everything f64)
//! serves the finite-difference tests.
//!
//! Ops (each has a finite-difference gradient test in its file):
//! - [`depthwise_conv2d`]: depthwise k×k convolution with TensorFlow "same" padding (asymmetric
//!   at stride 2);
//! - [`max_pool2d_same`]: max-pool with TensorFlow "same" padding (padding never wins the max);
//! - [`batch_norm_train`] / [`batch_norm_eval`]: batch normalization fused with an optional swish;
//! - [`swish`]: x·sigmoid(x) with a one-pass backward;
//! - [`add_channel_bias`], [`channel_gate`], [`spatial_mean`]: per-channel broadcasts whose
//!   backward passes are direct reductions;
//! - [`focal_loss_sum`]: automl's sigmoid focal loss summed over all entries, with one-hot
//!   targets built on the fly from class ids;
//! - [`axpby_inplace`]: `x ← a·x + b·y` in place, the optimizer's and the EMA's update;
//! - [`multi_tensor`]: the optimizer's per-variable passes (norms + finite check, SGD with
//!   momentum, the moving average) over whole lists of tensors, a launch per 32 on CUDA;
//! - [`fast_fusion`]: BiFPN's fast normalized fusion, forward in one pass, backward in one per
//!   input plus one for the weights;
//! - [`linear`]: the 1×1 convolution (cast, product, bias) as one node, so candle's backward
//!   does not materialize zero-filled gradients for each of its five stock ops;
//! - [`stem_patches`]: the stem convolution's 3×3 stride-2 windows (im2col) in one pass;
//! - [`upsample_nearest`]: nearest-neighbour resize (TensorFlow `resize_nearest_neighbor`
//!   semantics) built from broadcast/index ops, so its gradient accumulates.

mod axpby;
mod batch_norm;
mod channel;
#[cfg(feature = "cuda")]
mod cuda;
mod depthwise;
mod focal;
mod fusion;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod launch;
mod linear;
pub mod marker;
pub mod multi_tensor;
mod patches;
mod pool;
mod swish;
mod upsample;

#[cfg(test)]
pub(crate) mod fd;
#[cfg(test)]
mod half_tests;

pub use axpby::axpby_inplace;
pub use batch_norm::{
    batch_norm_eval, batch_norm_eval_resident, batch_norm_train, batch_norm_train_resident,
    batch_norm_update_running, Activation, BatchStats,
};
pub(crate) use channel::add_gradients;
pub use channel::{add_channel_bias, channel_gate, reduced_dtype, scale_samples, spatial_mean};
pub use depthwise::depthwise_conv2d;
pub use focal::{focal_loss_grad, focal_loss_sum, FocalParams};
pub use fusion::{fast_fusion, MAX_FUSION_INPUTS};
pub use linear::{linear, linear_unfused};
pub use patches::stem_patches;
pub use pool::max_pool2d_same;
pub use swish::swish;
pub use upsample::upsample_nearest;

use candle_core::{CpuStorage, DType, Layout, Result, WithDType};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

/// Floating-point element types the kernels are written for (f32 for the model, f64 for the
/// finite-difference tests).
pub(crate) trait Elem:
    WithDType + num_traits::Float + std::ops::AddAssign + Send + Sync + 'static
{
    /// Widening conversion (unambiguous between candle's and num-traits' `to_f64`).
    fn to64(self) -> f64 {
        <Self as WithDType>::to_f64(self)
    }
    /// Narrowing conversion.
    fn from64(v: f64) -> Self {
        <Self as WithDType>::from_f64(v)
    }
    /// e^self for the hot elementwise loops: libm's for f64 (the finite-difference tests want
    /// it exact), [`exp_f32`] for f32 (loops that call it vectorize).
    fn exp_fast(self) -> Self {
        self.exp()
    }
    /// ln(1 + self), as [`Elem::exp_fast`]: libm's for f64, [`ln_1p_f32`] for f32.
    fn ln_1p_fast(self) -> Self {
        self.ln_1p()
    }
    /// 1 / (1 + e^−self).
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::one() / (Self::one() + (-self).exp_fast())
    }
}
impl Elem for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln_1p_fast(self) -> f32 {
        ln_1p_f32(self)
    }
}
impl Elem for f64 {}

/// e^x in f32 from arithmetic alone — no libm call and no branch, so loops calling it
/// vectorize (libm's `expf` call kept every swish and batch-norm loop scalar: a tenth of a CPU
/// training step was spent inside it). Cephes' `expf` scheme: x = n·ln 2 + r with ln 2 split
/// in two so r is exact, e^r by its degree-7 minimax polynomial, 2^n put into the exponent
/// bits. Within 1 ulp of e^x (tested against f64: 0.95 at worst). The argument is clamped to [−87.3, 88.3]
/// so 2^n stays a normal number: below, the result is e^−87.3 ≈ 1.2e−38 instead of a
/// subnormal or 0; above, e^88.3 ≈ 2.2e38 instead of up to f32::MAX or ∞. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in 9 bits, so n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer (ties to even) and leaves it in the low mantissa
    // bits, so the integer is also a bit difference: no float→int conversion.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let n_int = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    e_r * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

/// How many tensors candle has created in this process so far (its tensor-id counter), views
/// included. Differences between two calls count the tensors a piece of code made: on a GPU
/// nearly every one is a launch or an allocation paid in host time, so the count is the
/// device-independent measure of a step's launch overhead (`bench-train` reports it per phase).
pub fn tensors_created() -> u64 {
    // `TensorId` keeps its counter private; its Debug form is `TensorId(N)`.
    candle_core::Tensor::zeros((), DType::U8, &candle_core::Device::Cpu)
        .ok()
        .and_then(|probe| {
            format!("{:?}", probe.id())
                .trim_start_matches("TensorId(")
                .trim_end_matches(')')
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Output size and (before, after) padding of TensorFlow "same" padding along one axis.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
    let out = input.div_ceil(stride);
    let needed = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(input);
    (out, needed / 2, needed - needed / 2)
}

/// The contiguous data of a storage, or an error when the layout has gaps or strides.
/// The element range of a contiguous layout (in-place ops write through it), or an error naming
/// `op`.
pub(crate) fn contiguous_range(op: &str, l: &Layout) -> Result<std::ops::Range<usize>> {
    l.contiguous_offsets()
        .map(|(a, b)| a..b)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: not contiguous")))
}

pub(crate) fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("effdet ops expect contiguous tensors"),
    }
}

/// An activation's data as f32: borrowed when stored as f32, widened from f16/bf16.
pub(crate) fn act_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [f32]>> {
    let range = |len: usize| match l.contiguous_offsets() {
        Some((a, b)) if b <= len => Ok(a..b),
        _ => candle_core::bail!("effdet ops expect contiguous tensors"),
    };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[range(v.len())?]),
        CpuStorage::F16(v) => Cow::Owned(v[range(v.len())?].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::BF16(v) => Cow::Owned(v[range(v.len())?].iter().map(|x| x.to_f32()).collect()),
        s => return Err(unsupported("effdet op", s)),
    })
}

/// f32 results stored as `dtype` (f32, f16 or bf16; rounded to nearest even).
pub(crate) fn store_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        d => candle_core::bail!("effdet ops store f32, f16 or bf16, not {d:?}"),
    })
}

/// Whether a storage holds an activation dtype the ops compute in f32 (f32, f16, bf16).
pub(crate) fn is_f32_family(s: &CpuStorage) -> bool {
    matches!(
        s,
        CpuStorage::F32(_) | CpuStorage::F16(_) | CpuStorage::BF16(_)
    )
}

/// Error for dtypes the kernels do not handle.
pub(crate) fn unsupported(op: &str, s: &CpuStorage) -> candle_core::Error {
    use candle_core::backend::BackendStorage;
    let dtype = s.dtype();
    candle_core::Error::Msg(format!(
        "{op}: unsupported dtype {dtype:?} (f32, f16, bf16 or f64)"
    ))
}

/// A vector of `n` elements written chunk by chunk in parallel, without filling it first:
/// `fill(k, part)` gets elements `k·chunk ..` of the vector (the last part may be shorter).
/// `vec![0; n]` takes a `calloc`, which memsets any block the allocator reuses, an extra
/// write pass over every op output (7 % of the CPU training step, measured with perf).
///
/// # Safety
/// `fill` must initialize every element of each part it is given.
pub(crate) unsafe fn par_filled<T: Send + Sync>(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(k, part)| fill(k, part));
    // SAFETY: the caller's `fill` initialized every part, and the parts cover 0..n.
    unsafe { v.set_len(n) };
    v
}

/// Rows per parallel chunk so that every thread gets a few chunks of at least `min_rows`.
pub(crate) fn chunk_rows(rows: usize, min_rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads * 4).max(min_rows).max(1)
}

/// Checks that a tensor is rank 4 and returns its dims.
pub(crate) fn dims4(op: &str, l: &Layout) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        &[b, h, w, c] => Ok((b, h, w, c)),
        d => candle_core::bail!("{op}: expected a [B, H, W, C] tensor, got shape {d:?}"),
    }
}

/// Turns [`wide_simd`]'s AVX2 path off (tests compare the two paths).
static WIDE_SIMD_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs `f` — an elementwise loop and what it inlines — compiled for AVX2 when the CPU has it,
/// else as built (x86-64's baseline SSE2): 8 f32 lanes instead of 4. Only `avx2` is enabled,
/// not `fma`, and Rust never contracts a·b + c, so every lane does the same IEEE operations
/// and the results are bit for bit those of the baseline code (tested).
#[inline(always)]
pub(crate) fn wide_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if !WIDE_SIMD_OFF.load(std::sync::atomic::Ordering::Relaxed)
        && std::arch::is_x86_feature_detected!("avx2")
    {
        #[target_feature(enable = "avx2")]
        fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { with_avx2(f) };
    }
    f()
}

/// ln(x) in f32 for normal x > 0 from arithmetic alone (vectorizes, as [`exp_f32`]): Cephes'
/// `logf` scheme, x = 2^k·(1 + f) with 1 + f in [√½, √2), ln(1 + f) by its minimax polynomial,
/// k·ln 2 added in two parts. Within 1 ulp for normal inputs (tested against f64); zero,
/// negative, subnormal, infinite and NaN inputs give meaningless values — callers keep their
/// arguments normal and positive. (The loss needs only [`ln_1p_f32`]; this is what its tests
/// check the shared core with.)
#[cfg(test)]
pub(crate) fn ln_f32(x: f32) -> f32 {
    let (k, f) = split_ln(x);
    ln_of_split(k, f)
}

/// ln(1 + x) in f32 for x > −1, accurate also where x is tiny: u = 1 + x is split as for
/// [`ln_f32`], and the part of x that rounding u dropped, x − (u − 1), is added back to first
/// order, divided by u (fdlibm's `log1pf` correction). Within 1.5 ulp (tested against f64).
#[inline(always)]
pub(crate) fn ln_1p_f32(x: f32) -> f32 {
    let u = 1.0 + x;
    let (k, f) = split_ln(u);
    ln_of_split(k, f) + (x - (u - 1.0)) / u
}

/// (k, f) with x = 2^k·(1 + f), 1 + f in [√½, √2); f is exact.
#[inline(always)]
fn split_ln(x: f32) -> (f32, f32) {
    let bits = x.to_bits();
    // x = m·2^k, m in [0.5, 1).
    let k = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000);
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    let f = if small { m + m - 1.0 } else { m - 1.0 };
    ((k - small as i32) as f32, f)
}

/// k·ln 2 + ln(1 + f) for |f| < 0.42.
#[inline(always)]
fn ln_of_split(k: f32, f: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let z = f * f;
    let poly = (((((((7.037_683_6e-2 * f - 1.151_461e-1) * f + 1.167_699_9e-1) * f
        - 1.242_014_1e-1)
        * f
        + 1.424_932_3e-1)
        * f
        - 1.666_805_8e-1)
        * f
        + 2.000_071_4e-1)
        * f
        - 2.499_999_4e-1)
        * f
        + 3.333_333e-1;
    let y = poly * f * z + k * LN2_LO - 0.5 * z;
    f + y + k * LN2_HI
}

#[cfg(test)]
mod exp_tests {
    use super::exp_f32;

    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn exp_f32_is_within_one_ulp_over_its_range() {
        let mut worst = (0.0f64, 0.0f32);
        let mut x = -87.3f32;
        while x <= 88.3 {
            let e = ulps(exp_f32(x), (x as f64).exp());
            if e > worst.0 {
                worst = (e, x);
            }
            x += 1.3e-3;
        }
        // Near zero and at the exact powers of two, where the reduction's boundaries are.
        for k in -125i32..=127 {
            for x in [k as f32 * std::f32::consts::LN_2, 1e-7 * k as f32] {
                let e = ulps(exp_f32(x), (x as f64).exp());
                if e > worst.0 {
                    worst = (e, x);
                }
            }
        }
        assert!(
            worst.0 <= 1.0,
            "exp_f32({}) is {} ulp off",
            worst.1,
            worst.0
        );
        eprintln!("exp_f32: worst {:.3} ulp at {}", worst.0, worst.1);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn exp_f32_saturates_instead_of_overflowing_and_keeps_nan() {
        assert!(exp_f32(1e4).is_finite() && exp_f32(1e4) > 1e38);
        assert!(exp_f32(-1e4) > 0.0 && exp_f32(-1e4) < 2e-38);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::INFINITY).is_finite());
        // Sigmoid and swish at the extremes stay exact to f32.
        let sig = |z: f32| 1.0 / (1.0 + exp_f32(-z));
        assert_eq!(sig(200.0), 1.0);
        assert!(sig(-200.0) < 2e-38);
    }
}

#[cfg(test)]
mod ln_tests {
    use super::{ln_1p_f32, ln_f32};

    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn ln_f32_is_within_one_ulp_for_normal_inputs() {
        let mut worst = (0.0f64, 0.0f32);
        // Every exponent, many mantissas, and the powers of two themselves.
        let mut bits = f32::MIN_POSITIVE.to_bits();
        while bits < f32::MAX.to_bits() {
            let x = f32::from_bits(bits);
            let want = (x as f64).ln();
            // Near x = 1 the result is tiny; judge it by its own ulp there too.
            let e = ulps(ln_f32(x), want);
            if e > worst.0 {
                worst = (e, x);
            }
            bits += 4099;
        }
        assert!(worst.0 <= 1.0, "ln_f32({}) is {} ulp off", worst.1, worst.0);
        eprintln!("ln_f32: worst {:.3} ulp at {}", worst.0, worst.1);
        assert_eq!(ln_f32(1.0), 0.0);
    }

    #[test]
    fn ln_1p_f32_is_accurate_from_tiny_to_large_arguments() {
        let worst_over = |xs: &mut dyn Iterator<Item = f32>| {
            xs.map(|x| (ulps(ln_1p_f32(x), (x as f64).ln_1p()), x))
                .fold((0.0f64, 0.0f32), |a, b| if b.0 > a.0 { b } else { a })
        };
        // The focal loss's range, e^−|x| in (0, 1], densely.
        let unit = worst_over(&mut (0..200_000).map(|i| 0.9997f32.powi(i)));
        assert!(unit.0 <= 1.5, "ln_1p_f32({}) is {} ulp off", unit.1, unit.0);
        // Negative and large arguments.
        let rest = worst_over(
            &mut (1..20_000).flat_map(|i| [-0.9999 * i as f32 / 20_000.0, i as f32 * 0.37]),
        );
        assert!(rest.0 <= 1.5, "ln_1p_f32({}) is {} ulp off", rest.1, rest.0);
        eprintln!(
            "ln_1p_f32: worst {:.3} ulp on (0, 1], {:.3} elsewhere",
            unit.0, rest.0
        );
        assert_eq!(ln_1p_f32(0.0), 0.0);
        assert_eq!(ln_1p_f32(1e-30), 1e-30);
    }
}

#[cfg(test)]
mod wide_simd_tests {
    use super::{
        batch_norm_train, channel_gate, depthwise_conv2d, focal_loss_grad, focal_loss_sum, swish,
        Activation, FocalParams, WIDE_SIMD_OFF,
    };
    use candle_core::{DType, Result, Tensor, Var};
    use std::sync::atomic::Ordering;

    /// Batch norm (both activations), swish, depthwise convolutions, the channel gate and the
    /// focal loss (γ 1.5, 2 and 2.5), forward and every gradient, as f32 bit patterns.
    fn run() -> Result<Vec<Vec<u32>>> {
        // 37 channels: full 8-lane blocks and a remainder in every row.
        let x = Var::from_tensor(
            &(super::fd::rand_tensor(&[2, 5, 7, 37], 3)? * 3.0)?.to_dtype(DType::F32)?,
        )?;
        let gamma = Var::from_tensor(&super::fd::rand_tensor(&[37], 4)?.to_dtype(DType::F32)?)?;
        let beta = Var::from_tensor(&super::fd::rand_tensor(&[37], 5)?.to_dtype(DType::F32)?)?;
        let up = super::fd::rand_tensor(&[2, 5, 7, 37], 6)?.to_dtype(DType::F32)?;
        let bits = crate::ops::fd::f32_bits;
        let mut out = Vec::new();
        for act in [Activation::None, Activation::Swish] {
            let (y, _) = batch_norm_train(
                x.as_tensor(),
                gamma.as_tensor(),
                beta.as_tensor(),
                1e-3,
                act,
            )?;
            let grads = (&y * &up)?.sum_all()?.backward()?;
            out.push(bits(&y)?);
            for v in [&x, &gamma, &beta] {
                out.push(bits(grads.get(v).expect("gradient"))?);
            }
        }
        let y = swish(x.as_tensor())?;
        let grads = (&y * &up)?.sum_all()?.backward()?;
        out.push(bits(&y)?);
        out.push(bits(grads.get(&x).expect("gradient"))?);
        for (k, stride) in [(3, 1), (3, 2), (5, 2)] {
            let w = Var::from_tensor(
                &super::fd::rand_tensor(&[k, k, 37], 7 + k as u64)?.to_dtype(DType::F32)?,
            )?;
            let y = depthwise_conv2d(x.as_tensor(), w.as_tensor(), stride)?;
            let r = super::fd::rand_tensor(y.dims(), 8)?.to_dtype(DType::F32)?;
            let grads = (&y * &r)?.sum_all()?.backward()?;
            out.push(bits(&y)?);
            for v in [&x, &w] {
                out.push(bits(grads.get(v).expect("gradient"))?);
            }
        }
        // 5 anchors × 9 classes per position; ids −2 (ignored) to 8.
        let logits = (super::fd::rand_tensor(&[2, 3, 4, 45], 10)? * 4.0)?.to_dtype(DType::F32)?;
        let ids: Vec<i64> = (0..2 * 3 * 4 * 5)
            .map(|i| (i * 7 % 11) as i64 - 2)
            .collect();
        let ids = Tensor::from_vec(ids, (2, 3, 4, 5), logits.device())?;
        let scale = Tensor::new(0.37f32, logits.device())?;
        for gamma in [1.5, 2.0, 2.5] {
            let params = FocalParams {
                alpha: 0.25,
                gamma,
                label_smoothing: 0.0,
            };
            out.push(bits(&focal_loss_sum(&logits, &ids, params)?.reshape(1)?)?);
            out.push(bits(&focal_loss_grad(&logits, &ids, params, &scale)?)?);
        }
        let gate = Var::from_tensor(&super::fd::rand_tensor(&[2, 37], 9)?.to_dtype(DType::F32)?)?;
        let y = channel_gate(x.as_tensor(), gate.as_tensor())?;
        let grads = (&y * &up)?.sum_all()?.backward()?;
        out.push(bits(&y)?);
        for v in [&x, &gate] {
            out.push(bits(grads.get(v).expect("gradient"))?);
        }
        Ok(out)
    }

    #[test]
    fn avx2_loops_equal_the_baseline_bit_for_bit() -> Result<()> {
        WIDE_SIMD_OFF.store(true, Ordering::Relaxed);
        let base = run();
        WIDE_SIMD_OFF.store(false, Ordering::Relaxed);
        let wide = run()?;
        assert_eq!(base?, wide);
        Ok(())
    }
}
