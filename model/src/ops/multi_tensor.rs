//! Multi-tensor optimizer passes: the per-variable work of a training step (gradient norms and
//! the finite check, L2 term, unscaling, clipping, SGD with momentum, the moving average) over
//! a whole list of f32 tensors at once. On CUDA each pass is one launch per [`MT_MAX`] tensors
//! (the tensors' addresses travel in the kernel parameters, as apex's `multi_tensor_apply`);
//! per variable it was about ten small launches, ~5,000 per D0 step, a fixed ~50 ms per step on
//! an H100 (session 5). The arithmetic is element for element the per-variable ops' (no fused
//! multiply-add), so the CPU path and the kernels agree exactly.

use super::{contiguous, unsupported};
use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Storage, Tensor};

/// Tensors per launch (`MT_MAX` in kernels.cu).
pub const MT_MAX: usize = 32;

/// Per tensor: the gradient's and the weight's coefficients, `u = a·g + b·w`.
pub type Coef = (f32, f32);

fn check_lists(what: &str, lists: &[&[&Tensor]], coef: Option<&[Coef]>) -> Result<()> {
    let n = lists[0].len();
    if lists.iter().any(|l| l.len() != n) || coef.is_some_and(|c| c.len() != n) {
        candle_core::bail!("{what}: lists of different lengths");
    }
    for i in 0..n {
        let first = lists[0][i];
        for l in lists {
            let t = l[i];
            if t.dims() != first.dims() || t.dtype() != candle_core::DType::F32 {
                candle_core::bail!(
                    "{what}: tensor {i}: {:?} {:?} vs {:?} (all f32, same shapes)",
                    t.dims(),
                    t.dtype(),
                    first.dims()
                );
            }
            if !t.is_contiguous() {
                candle_core::bail!("{what}: tensor {i} is not contiguous");
            }
        }
    }
    Ok(())
}

/// `u = g·a + w·b` in f32, as the kernels round it (`w` absent: `g·a`).
#[inline]
fn combine(g: f32, w: Option<f32>, a: f32, b: f32) -> f32 {
    match w {
        Some(w) => g * a + w * b,
        None => g * a,
    }
}

/// Per tensor `i`: `Σ (a_i·g_i + b_i·w_i)²`, the combination rounded to f32 and squared and
/// summed in f64, as a `[n]` f64 tensor on the tensors' device (no host read). `ws` empty: the
/// weights are left out (`b` unused). An inf or NaN anywhere makes its tensor's sum non-finite.
pub fn sums_of_squares(gs: &[&Tensor], ws: &[&Tensor], coef: &[Coef]) -> Result<Tensor> {
    if ws.is_empty() {
        check_lists("sums_of_squares", &[gs], Some(coef))?;
    } else {
        check_lists("sums_of_squares", &[gs, ws], Some(coef))?;
    }
    let Some(first) = gs.first() else {
        candle_core::bail!("sums_of_squares: no tensors");
    };
    match first.device() {
        candle_core::Device::Cpu => {
            let mut out = Vec::with_capacity(gs.len());
            for (i, g) in gs.iter().enumerate() {
                let (gs_, gl) = g.storage_and_layout();
                let gv = cpu_f32(&gs_, gl)?;
                let (a, b) = coef[i];
                let sum = if let Some(w) = ws.get(i) {
                    let (ws_, wl) = w.storage_and_layout();
                    let wv = cpu_f32(&ws_, wl)?;
                    gv.iter()
                        .zip(wv)
                        .map(|(&g, &w)| (combine(g, Some(w), a, b) as f64).powi(2))
                        .sum::<f64>()
                } else {
                    gv.iter()
                        .map(|&g| (combine(g, None, a, b) as f64).powi(2))
                        .sum::<f64>()
                };
                out.push(sum);
            }
            Tensor::from_vec(out, gs.len(), &candle_core::Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::sums_of_squares(dev, gs, ws, coef),
        d => candle_core::bail!("sums_of_squares: unsupported device {d:?}"),
    }
}

/// SGD with momentum in place, per tensor `i`: `u = a_i·g_i + b_i·w_i`, `m_i ← μ·m_i + u`,
/// `w_i ← w_i − lr·m_i`.
pub fn sgd_momentum(
    ws: &[&Tensor],
    ms: &[&Tensor],
    gs: &[&Tensor],
    coef: &[Coef],
    momentum: f64,
    lr: f64,
) -> Result<()> {
    check_lists("sgd_momentum", &[ws, ms, gs], Some(coef))?;
    let Some(first) = ws.first() else {
        return Ok(());
    };
    match first.device() {
        candle_core::Device::Cpu => {
            for i in 0..ws.len() {
                let (a, b) = coef[i];
                let op = MomentumStep {
                    a,
                    b,
                    momentum: momentum as f32,
                };
                ms[i].inplace_op3(gs[i], ws[i], &op)?;
                super::axpby_inplace(ws[i], ms[i], 1.0, -lr)?;
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::sgd_momentum(dev, ws, ms, gs, coef, momentum, lr),
        d => candle_core::bail!("sgd_momentum: unsupported device {d:?}"),
    }
}

/// `x_i ← α·x_i + β·y_i` in place for every `i` (the moving average's update).
pub fn axpby_all(xs: &[&Tensor], ys: &[&Tensor], alpha: f64, beta: f64) -> Result<()> {
    check_lists("axpby_all", &[xs, ys], None)?;
    let Some(first) = xs.first() else {
        return Ok(());
    };
    match first.device() {
        candle_core::Device::Cpu => {
            for (x, y) in xs.iter().zip(ys) {
                super::axpby_inplace(x, y, alpha, beta)?;
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::axpby_all(dev, xs, ys, alpha, beta),
        d => candle_core::bail!("axpby_all: unsupported device {d:?}"),
    }
}

fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => contiguous::<f32>(c, l),
        _ => candle_core::bail!("multi-tensor op: tensors on different devices"),
    }
}

/// `m ← μ·m + (a·g + b·w)` on the CPU (inputs g, w).
struct MomentumStep {
    a: f32,
    b: f32,
    momentum: f32,
}

impl InplaceOp3 for MomentumStep {
    fn name(&self) -> &'static str {
        "effdet-momentum-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let range = super::contiguous_range("momentum step", l1)?;
        let g = contiguous::<f32>(s2, l2)?;
        let w = contiguous::<f32>(s3, l3)?;
        match s1 {
            CpuStorage::F32(m) => {
                for ((m, &g), &w) in m[range].iter_mut().zip(g).zip(w) {
                    *m = *m * self.momentum + combine(g, Some(w), self.a, self.b) * 1.0;
                }
                Ok(())
            }
            s => Err(unsupported(self.name(), s)),
        }
    }
}

/// Launch tables: which tensors go into which launch and where each block starts.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod table {
    use super::MT_MAX;

    /// Elements per block (`MT_CHUNK`) and threads per block (`MT_THREADS`) in kernels.cu.
    pub const CHUNK: usize = 4096;
    pub const THREADS: u32 = 256;

    /// Groups of at most [`MT_MAX`] consecutive tensor indices, one launch each.
    pub fn groups(n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        (0..n.div_ceil(MT_MAX)).map(move |k| k * MT_MAX..((k + 1) * MT_MAX).min(n))
    }

    /// First block of each tensor of a group (and the total as the last entry).
    pub fn block_starts(sizes: &[usize]) -> Vec<i32> {
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        let mut acc = 0i32;
        starts.push(0);
        for &n in sizes {
            acc += n.div_ceil(CHUNK).max(1) as i32;
            starts.push(acc);
        }
        starts
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{launch, Kernel, PushKernelArg};
    use super::table::{block_starts, groups, THREADS};
    use super::{Coef, MT_MAX};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{Result, Storage, Tensor};

    /// kernels.cu's `MtTable`, passed by value.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MtTable {
        g: [u64; MT_MAX],
        w: [u64; MT_MAX],
        m: [u64; MT_MAX],
        n: [i64; MT_MAX],
        a: [f32; MT_MAX],
        b: [f32; MT_MAX],
        block_start: [i32; MT_MAX + 1],
        count: i32,
    }

    // SAFETY: plain old data with the C layout of kernels.cu's struct.
    unsafe impl DeviceRepr for MtTable {}

    fn address(dev: &CudaDevice, t: &Tensor) -> Result<u64> {
        super::super::cuda::address::<f32>(dev, t)
    }

    /// One table per group of `sets[0]`'s tensors (`sets`: g, w, m lists, empty ones left 0).
    fn tables(dev: &CudaDevice, sets: [&[&Tensor]; 3], coef: &[Coef]) -> Result<Vec<MtTable>> {
        let n = sets[0].len();
        let mut out = Vec::new();
        for r in groups(n) {
            let mut tab = MtTable {
                g: [0; MT_MAX],
                w: [0; MT_MAX],
                m: [0; MT_MAX],
                n: [0; MT_MAX],
                a: [0.0; MT_MAX],
                b: [0.0; MT_MAX],
                block_start: [0; MT_MAX + 1],
                count: r.len() as i32,
            };
            let sizes: Vec<usize> = r.clone().map(|i| sets[0][i].elem_count()).collect();
            for (k, i) in r.clone().enumerate() {
                for (set, slot) in sets.iter().zip([&mut tab.g, &mut tab.w, &mut tab.m]) {
                    if let Some(t) = set.get(i) {
                        slot[k] = address(dev, t)?;
                    }
                }
                tab.n[k] = sizes[k] as i64;
                if let Some(&(a, b)) = coef.get(i) {
                    tab.a[k] = a;
                    tab.b[k] = b;
                }
            }
            tab.block_start[..=r.len()].copy_from_slice(&block_starts(&sizes));
            out.push(tab);
        }
        Ok(out)
    }

    fn config(tab: &MtTable) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (tab.block_start[tab.count as usize] as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn sums_of_squares(
        dev: &CudaDevice,
        gs: &[&Tensor],
        ws: &[&Tensor],
        coef: &[Coef],
    ) -> Result<Tensor> {
        let out = super::super::cuda::zeros::<f64>(dev, gs.len())?;
        let k = Kernel::new(dev, "mt_sum_squares")?;
        for (tab, r) in tables(dev, [gs, ws, &[]], coef)?
            .iter()
            .zip(groups(gs.len()))
        {
            let part = out.slice(r.start..r.end);
            let mut b = k.builder();
            b.arg(tab).arg(&part);
            launch(b, config(tab))?;
        }
        let storage = candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            gs.len(),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    pub(super) fn sgd_momentum(
        dev: &CudaDevice,
        ws: &[&Tensor],
        ms: &[&Tensor],
        gs: &[&Tensor],
        coef: &[Coef],
        momentum: f64,
        lr: f64,
    ) -> Result<()> {
        let k = Kernel::new(dev, "mt_sgd")?;
        let (mu, neg_lr) = (momentum as f32, -lr as f32);
        for tab in tables(dev, [gs, ws, ms], coef)? {
            let mut b = k.builder();
            b.arg(&tab).arg(&mu).arg(&neg_lr);
            launch(b, config(&tab))?;
        }
        Ok(())
    }

    pub(super) fn axpby_all(
        dev: &CudaDevice,
        xs: &[&Tensor],
        ys: &[&Tensor],
        alpha: f64,
        beta: f64,
    ) -> Result<()> {
        let k = Kernel::new(dev, "mt_axpby")?;
        let (a, b_) = (alpha as f32, beta as f32);
        for tab in tables(dev, [ys, xs, &[]], &[])? {
            let mut b = k.builder();
            b.arg(&tab).arg(&a).arg(&b_);
            launch(b, config(&tab))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::rand_tensor;
    use candle_core::DType;

    fn f32s(dims: &[usize], seed: u64) -> Tensor {
        rand_tensor(dims, seed)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn r(v: &[Tensor]) -> Vec<&Tensor> {
        v.iter().collect()
    }

    #[test]
    fn sums_of_squares_by_hand_and_with_non_finite_values() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let g = Tensor::new(&[1f32, 2., 3.], &dev)?;
        let w = Tensor::new(&[1f32, 0., -1.], &dev)?;
        let h = Tensor::new(&[f32::INFINITY, 0.], &dev)?;
        // (0.5·g + 2·w) = [2.5, 1, -0.5] → 7.5; g alone ·2 → 4·14 = 56.
        let s = sums_of_squares(&[&g, &g], &[&w, &w], &[(0.5, 2.0), (2.0, 0.0)])?;
        assert_eq!(s.to_vec1::<f64>()?, vec![7.5, 56.0]);
        let s = sums_of_squares(&[&g, &h], &[], &[(1.0, 0.0), (1.0, 0.0)])?;
        let v = s.to_vec1::<f64>()?;
        assert_eq!(v[0], 14.0);
        assert!(!v[1].is_finite());
        assert!(sums_of_squares(&[&g], &[&h], &[(1.0, 0.0)]).is_err());
        Ok(())
    }

    /// The fused update equals the per-variable passes it replaces (axpby momentum and weight
    /// steps on `a·g + b·w` computed the same way), bit for bit.
    #[test]
    fn sgd_momentum_equals_the_per_variable_axpby_passes() -> Result<()> {
        let shapes: [&[usize]; 3] = [&[3, 3, 5], &[7], &[2, 4, 6]];
        let ws: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| f32s(s, i as u64))
            .collect();
        let ms: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| f32s(s, 10 + i as u64))
            .collect();
        let gs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| f32s(s, 20 + i as u64))
            .collect();
        let coef = [(0.25f32, 4e-5f32), (1.5, 0.0), (0.75, 1e-3)];
        let copy = |v: &[Tensor]| -> Vec<Tensor> { v.iter().map(|t| t.copy().unwrap()).collect() };
        let (w2, m2) = (copy(&ws), copy(&ms));
        sgd_momentum(&r(&ws), &r(&ms), &r(&gs), &coef, 0.9, 0.08)?;
        for i in 0..3 {
            let (a, b) = coef[i];
            let u = ((&gs[i] * a as f64)? + (&w2[i] * b as f64)?)?;
            crate::ops::axpby_inplace(&m2[i], &u, 0.9, 1.0)?;
            crate::ops::axpby_inplace(&w2[i], &m2[i], 1.0, -0.08)?;
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&ms[i]), flat(&m2[i]), "momentum {i}");
            assert_eq!(flat(&ws[i]), flat(&w2[i]), "weight {i}");
        }
        Ok(())
    }

    #[test]
    fn launch_tables_split_into_groups_and_chunks() {
        let g: Vec<_> = table::groups(70).collect();
        assert_eq!(g, vec![0..32, 32..64, 64..70]);
        assert_eq!(
            table::block_starts(&[1, 4096, 4097, 0]),
            vec![0, 1, 2, 4, 5]
        );
    }
}
