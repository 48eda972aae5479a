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
pub use channel::{add_channel_bias, channel_gate, reduced_dtype, scale_samples, spatial_mean};
pub use depthwise::depthwise_conv2d;
pub use focal::{focal_loss_grad, focal_loss_sum, FocalParams};
pub use fusion::{fast_fusion, MAX_FUSION_INPUTS};
pub use linear::{linear, linear_unfused};
pub use pool::max_pool2d_same;
pub use swish::swish;
pub use upsample::upsample_nearest;

use candle_core::{CpuStorage, DType, Layout, Result, WithDType};
use std::borrow::Cow;

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
}
impl Elem for f32 {}
impl Elem for f64 {}

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
