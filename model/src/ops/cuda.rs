//! CUDA plumbing for the own ops (feature `cuda`): the PTX of `kernels.cu` (built by
//! `build.rs` with nvcc), kernel lookup, launch shapes and device↔host copies. The ops' own
//! `cuda_fwd` methods (in their files) use these to mirror their CPU kernels.

use candle_core::backend::BackendStorage;
pub(crate) use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/effdet_kernels.ptx"));
const MODULE: &str = "effdet_kernels";

/// A launcher for kernel `name` of `kernels.cu`.
pub(crate) struct Kernel {
    func: candle_core::cuda_backend::cudarc::driver::CudaFunction,
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

type FunctionCache = std::collections::HashMap<
    candle_core::cuda_backend::DeviceId,
    std::collections::HashMap<String, candle_core::cuda_backend::cudarc::driver::CudaFunction>,
>;

thread_local! {
    /// Kernels this thread has looked up, per device: candle's lookup takes a lock and asks the
    /// driver (`cuModuleGetFunction`, with a fresh C string) on every call, i.e. every launch.
    static FUNCTIONS: std::cell::RefCell<FunctionCache> = std::cell::RefCell::default();
}

impl Kernel {
    pub(crate) fn new(dev: &CudaDevice, name: &str) -> Result<Kernel> {
        let cached =
            FUNCTIONS.with(|f| f.borrow().get(&dev.id()).and_then(|m| m.get(name)).cloned());
        let func = match cached {
            Some(func) => func,
            None => {
                let func = dev
                    .get_or_load_custom_func(name, MODULE, PTX)?
                    .into_cuda_function();
                FUNCTIONS.with(|f| {
                    f.borrow_mut()
                        .entry(dev.id())
                        .or_default()
                        .insert(name.to_string(), func.clone())
                });
                func
            }
        };
        Ok(Kernel {
            func,
            stream: dev.cuda_stream(),
        })
    }

    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Launches a built argument list.
pub(crate) fn launch(mut b: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: every kernel of kernels.cu bounds-checks its indices against the sizes passed with
    // the buffers, and the buffers were sized from the same numbers by the caller.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

fn config(((gx, gy, gz), (bx, by, bz)): super::launch::Shape3) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (gx, gy, gz),
        block_dim: (bx, by, bz),
        shared_mem_bytes: 0,
    }
}

/// Grid-stride launch over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    config(super::launch::elementwise(n))
}

/// Grid-stride launch for the kernels taking `ILP` elements per thread per round.
pub(crate) fn elementwise_ilp(n: usize) -> LaunchConfig {
    config(super::launch::elementwise_ilp(n))
}

/// Grid-stride launch whose blocks reduce to one value each (see `launch::block_reduction`).
pub(crate) fn block_reduction(n: usize) -> LaunchConfig {
    config(super::launch::block_reduction(n))
}

/// Row-walking launch: `rows` rows (grid y, grid-stride past the limit) of `row_len` elements.
pub(crate) fn rows(rows: usize, row_len: usize) -> LaunchConfig {
    config(super::launch::rows(rows, row_len))
}

/// Column reductions over `rows` rows of `c` channels, `groups` times.
pub(crate) fn column_reduction(rows: usize, c: usize, groups: usize) -> LaunchConfig {
    config(super::launch::column_reduction(rows, c, groups))
}

/// The depthwise kernel gradient's launch over `rows` = B·OH output rows.
pub(crate) fn tap_reduction(rows: usize, c: usize, taps: usize) -> LaunchConfig {
    config(super::launch::tap_reduction(rows, c, taps))
}

/// The contiguous `T` data of a storage.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    let slice = s
        .as_cuda_slice::<T>()
        .map_err(|_| dtype_error(op, s.dtype()))?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{op}: effdet ops expect contiguous tensors"),
    }
}

/// The f32 data of a storage, or an error naming the op for other dtypes.
/// Every kernel's input passes here, so this is where tensors too large for the kernels' 32-bit
/// index arithmetic are refused.
pub(crate) fn f32_view<'a>(op: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    if s.dtype() != DType::F32 {
        return Err(dtype_error(op, s.dtype()));
    }
    let n = l.shape().elem_count();
    if n > u32::MAX as usize {
        candle_core::bail!("{op}: {n} elements exceed the CUDA kernels' 32-bit indexing");
    }
    view::<f32>(op, s, l)
}

fn dtype_error(op: &str, dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: unsupported dtype {dtype:?} on CUDA (f32, or f16/bf16 activations)"
    ))
}

/// Kernel-name suffix of an activation dtype: the f32 kernels keep their plain names, the
/// 16-bit instantiations end in `_f16` / `_bf16` (see kernels.cu).
pub(crate) fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "_f16",
        DType::BF16 => "_bf16",
        _ => "",
    }
}

/// `base` instantiated for activations of `dtype`.
pub(crate) fn kernel_for(dev: &CudaDevice, base: &str, dtype: DType) -> Result<Kernel> {
    Kernel::new(dev, &format!("{base}{}", suffix(dtype)))
}

/// An activation's device data: f32, f16 or bf16 (the kernels compute in f32 either way).
pub(crate) enum ActView<'a> {
    F32(CudaView<'a, f32>),
    F16(CudaView<'a, f16>),
    Bf16(CudaView<'a, bf16>),
}

impl ActView<'_> {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            ActView::F32(_) => DType::F32,
            ActView::F16(_) => DType::F16,
            ActView::Bf16(_) => DType::BF16,
        }
    }

    /// Pushes the buffer as the next kernel argument.
    pub(crate) fn push<'a, 'b: 'a>(&'b self, b: &mut LaunchArgs<'a>) {
        match self {
            ActView::F32(v) => b.arg(v),
            ActView::F16(v) => b.arg(v),
            ActView::Bf16(v) => b.arg(v),
        };
    }
}

/// The activation data of a storage (f32, f16 or bf16), refusing tensors too large for the
/// kernels' 32-bit indexing.
pub(crate) fn act_view<'a>(op: &str, s: &'a CudaStorage, l: &Layout) -> Result<ActView<'a>> {
    let n = l.shape().elem_count();
    if n > u32::MAX as usize {
        candle_core::bail!("{op}: {n} elements exceed the CUDA kernels' 32-bit indexing");
    }
    Ok(match s.dtype() {
        DType::F32 => ActView::F32(view::<f32>(op, s, l)?),
        DType::F16 => ActView::F16(view::<f16>(op, s, l)?),
        DType::BF16 => ActView::Bf16(view::<bf16>(op, s, l)?),
        d => return Err(dtype_error(op, d)),
    })
}

/// A new activation buffer of `dtype` (f32, f16 or bf16).
pub(crate) enum ActSlice {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    Bf16(CudaSlice<bf16>),
}

impl ActSlice {
    /// Uninitialized: every element must be written by the kernel that fills it.
    pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<ActSlice> {
        Ok(match dtype {
            DType::F32 => ActSlice::F32(alloc::<f32>(dev, n)?),
            DType::F16 => ActSlice::F16(alloc::<f16>(dev, n)?),
            DType::BF16 => ActSlice::Bf16(alloc::<bf16>(dev, n)?),
            d => return Err(dtype_error("effdet op output", d)),
        })
    }

    /// Pushes the buffer as the next kernel argument.
    pub(crate) fn push<'a, 'b: 'a>(&'b self, b: &mut LaunchArgs<'a>) {
        match self {
            ActSlice::F32(v) => b.arg(v),
            ActSlice::F16(v) => b.arg(v),
            ActSlice::Bf16(v) => b.arg(v),
        };
    }

    pub(crate) fn wrap(self, dev: &CudaDevice) -> CudaStorage {
        match self {
            ActSlice::F32(v) => wrap(dev, v),
            ActSlice::F16(v) => wrap(dev, v),
            ActSlice::Bf16(v) => wrap(dev, v),
        }
    }
}

/// f32 buffer → activation buffer of `dtype` (moves it when `dtype` is f32).
pub(crate) fn f32_to_act(
    dev: &CudaDevice,
    src: CudaSlice<f32>,
    n: usize,
    dtype: DType,
) -> Result<ActSlice> {
    if dtype == DType::F32 {
        return Ok(ActSlice::F32(src));
    }
    let k = Kernel::new(dev, &format!("cvt_f32_to{}", suffix(dtype)))?;
    let out = ActSlice::alloc(dev, dtype, n)?;
    let n64 = n as i64;
    let mut b = k.builder();
    b.arg(&src);
    out.push(&mut b);
    b.arg(&n64);
    launch(b, elementwise(n))?;
    Ok(out)
}

/// Uninitialized device buffer (every element is written by the kernel that fills it).
pub(crate) fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: callers pass the buffer to a kernel that writes all n elements before any read.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(n.max(1))
}

pub(crate) fn to_host<T: DeviceRepr + Default + Clone>(
    dev: &CudaDevice,
    s: &CudaSlice<T>,
) -> Result<Vec<T>> {
    dev.cuda_stream().clone_dtoh(s).w()
}

pub(crate) fn to_device<T: DeviceRepr>(dev: &CudaDevice, v: &[T]) -> Result<CudaSlice<T>> {
    dev.cuda_stream().clone_htod(v).w()
}

pub(crate) fn wrap<T: CudaDType>(dev: &CudaDevice, s: CudaSlice<T>) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

/// f64 buffer → f32 buffer multiplied by `scale` (reduction results to the op's dtype).
pub(crate) fn f64_to_f32(
    dev: &CudaDevice,
    src: &CudaSlice<f64>,
    n: usize,
    scale: f64,
) -> Result<CudaSlice<f32>> {
    let k = Kernel::new(dev, "scale_f64_to_f32")?;
    let out = alloc::<f32>(dev, n)?;
    let n64 = n as i64;
    let mut b = k.builder();
    b.arg(src).arg(&out).arg(&scale).arg(&n64);
    launch(b, elementwise(n))?;
    Ok(out)
}

/// f64 buffer → activation buffer of `dtype` multiplied by `scale`.
pub(crate) fn f64_to_act(
    dev: &CudaDevice,
    src: &CudaSlice<f64>,
    n: usize,
    scale: f64,
    dtype: DType,
) -> Result<ActSlice> {
    let name = match dtype {
        DType::F32 => "scale_f64_to_f32",
        DType::F16 => "scale_f64_to_f16",
        DType::BF16 => "scale_f64_to_bf16",
        d => return Err(dtype_error("effdet op output", d)),
    };
    let k = Kernel::new(dev, name)?;
    let out = ActSlice::alloc(dev, dtype, n)?;
    let n64 = n as i64;
    let mut b = k.builder();
    b.arg(src);
    out.push(&mut b);
    b.arg(&scale).arg(&n64);
    launch(b, elementwise(n))?;
    Ok(out)
}

/// Per-channel sums `[groups, C]` (f64) of an activation `[groups, rows, C]` buffer.
pub(crate) fn column_sums(
    dev: &CudaDevice,
    x: &ActView<'_>,
    rows: usize,
    c: usize,
    groups: usize,
) -> Result<CudaSlice<f64>> {
    let k = kernel_for(dev, "col_sum", x.dtype())?;
    column_reduce(dev, &k, &[x], (rows, c, groups))
}

/// Per-channel dot products `[groups, C]` (f64) of two activation `[groups, rows, C]` buffers.
pub(crate) fn column_dots(
    dev: &CudaDevice,
    x: &ActView<'_>,
    g: &ActView<'_>,
    rows: usize,
    c: usize,
    groups: usize,
) -> Result<CudaSlice<f64>> {
    let k = kernel_for(dev, "col_dot", x.dtype())?;
    column_reduce(dev, &k, &[x, g], (rows, c, groups))
}

/// Runs column-reduction kernel `k(inputs…, out, rows, C)` into a zeroed f64 `[groups, C]`.
fn column_reduce(
    dev: &CudaDevice,
    k: &Kernel,
    inputs: &[&ActView<'_>],
    (rows, c, groups): (usize, usize, usize),
) -> Result<CudaSlice<f64>> {
    let out = zeros::<f64>(dev, groups * c)?;
    let (rows64, c32) = (rows as i64, c as i32);
    let mut b = k.builder();
    for x in inputs {
        x.push(&mut b);
    }
    b.arg(&out).arg(&rows64).arg(&c32);
    launch(b, column_reduction(rows, c, groups))?;
    Ok(out)
}

/// Converts a size to the kernels' `int`, refusing tensors too large for it.
pub(crate) fn int(op: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: size {v} exceeds i32")))
}

/// The device address of a contiguous tensor's first element (multi-tensor kernels take raw
/// addresses; the tensor must stay alive until the launch that uses it is queued, after which
/// the stream orders any later free).
pub(crate) fn address<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    t: &candle_core::Tensor,
) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(c) = &*s else {
        candle_core::bail!("effdet op: a tensor is not on the GPU");
    };
    if !l.is_contiguous() {
        candle_core::bail!("effdet op: expects contiguous tensors");
    }
    let slice = c.as_cuda_slice::<T>()?;
    let stream = dev.cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    Ok(ptr + (std::mem::size_of::<T>() * l.start_offset()) as u64)
}
