//! BiFPN's fast normalized fusion `y = Σ nᵢ·xᵢ`, `n = relu(w) / (Σ relu(w) + 1e-4)`, as one
//! recorded op. Composed of stock ops (relu, sum, division, cast, one product and one sum per
//! input) a 2-input node took ~20 tensors forward and ~40 backward, each a launch and an
//! allocation on a GPU; here the forward is one kernel and the backward one per input (its
//! gradient `nᵢ·g` and the dot product `Σ g·xᵢ` in one pass) plus one for the weights.
//!
//! Arithmetic: every element in f32 whatever the storage (products and sums in input order,
//! rounded once when stored), the weights' gradient in f64 from f64 dot products — it is a
//! difference of nearly equal sums over whole feature maps, which f32 would round away. In f32
//! the forward equals the stock-op composition bit for bit.

use super::{act_f32, contiguous, store_f32, unsupported, Elem};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// Inputs one fusion takes at most (BiFPN nodes fuse two or three).
pub const MAX_FUSION_INPUTS: usize = 4;

const CHUNK: usize = 1 << 14;

/// Fast normalized fusion of `inputs` (same shape and dtype) with weights `w` `[k]` (f32, or
/// f64 with f64 inputs). Recorded on the active tape (gradients for every input and for `w`);
/// without a tape the result carries no gradient.
pub fn fast_fusion(inputs: &[Tensor], w: &Tensor) -> Result<Tensor> {
    let k = inputs.len();
    if k == 0 || k > MAX_FUSION_INPUTS || w.dims() != [k] {
        candle_core::bail!(
            "fast_fusion: {k} inputs (1..={MAX_FUSION_INPUTS}) with weights {:?}",
            w.dims()
        );
    }
    let first = &inputs[0];
    for x in &inputs[1..] {
        if x.dims() != first.dims() || x.dtype() != first.dtype() {
            candle_core::bail!(
                "fast_fusion: inputs {:?} {:?} and {:?} {:?} differ",
                first.dims(),
                first.dtype(),
                x.dims(),
                x.dtype()
            );
        }
    }
    let xs: Vec<Tensor> = inputs
        .iter()
        .map(|x| x.detach().contiguous())
        .collect::<Result<_>>()?;
    let wd = w.detach().contiguous()?;
    let y = crate::tape::timed("bifpn fusion", || forward(&xs, &wd))?;
    if let Some(tape) = crate::tape::active() {
        let mut recorded: Vec<&Tensor> = inputs.iter().collect();
        recorded.push(w);
        tape.push("bifpn fusion", &recorded, &y, move |g| {
            let (gxs, gw) = backward(&g.contiguous()?, &xs, &wd)?;
            Ok(gxs.into_iter().map(Some).chain([Some(gw)]).collect())
        });
    }
    Ok(y)
}

/// n = relu(w) / (Σ relu(w) + 1e-4) in T's arithmetic, summed in input order.
fn normalized<T: Elem>(w: &[T]) -> Vec<T> {
    let r: Vec<T> = w.iter().map(|&v| relu(v)).collect();
    let s = r.iter().fold(T::zero(), |a, &b| a + b) + T::from64(1e-4);
    r.iter().map(|&v| v / s).collect()
}

fn relu<T: Elem>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

/// y = Σ nᵢ·xᵢ, in input order.
fn fuse_cpu<T: Elem>(xs: &[&[T]], n: &[T]) -> Vec<T> {
    // SAFETY: the loop writes every element of each part.
    unsafe {
        super::par_filled(xs[0].len(), CHUNK, |ci, yc| {
            let off = ci * CHUNK;
            for (j, y) in yc.iter_mut().enumerate() {
                let mut acc = n[0] * xs[0][off + j];
                for (x, &ni) in xs.iter().zip(n).skip(1) {
                    acc += ni * x[off + j];
                }
                y.write(acc);
            }
        })
    }
}

/// Σ g·x with f64 products and sums (chunk sums added in chunk order).
fn dot_cpu<T: Elem>(g: &[T], x: &[T]) -> f64 {
    let parts: Vec<f64> = g
        .par_chunks(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .map(|(gc, xc)| gc.iter().zip(xc).map(|(&g, &x)| g.to64() * x.to64()).sum())
        .collect();
    parts.iter().sum()
}

/// The weights' gradient from the dot products dᵢ = Σ g·xᵢ: through n = r/s (s = Σ r + 1e-4),
/// ∂/∂rᵢ = dᵢ/s − (Σⱼ dⱼ·rⱼ)/s², passed by relu where w ≥ 0. In f64, the kernel's order.
fn weight_grad(w: &[f64], dots: &[f64]) -> Vec<f64> {
    let r: Vec<f64> = w.iter().map(|&v| relu(v)).collect();
    let s = r.iter().fold(0.0, |a, &b| a + b) + 1e-4;
    let through = r.iter().zip(dots).fold(0.0, |a, (&r, &d)| a + d * r) / (s * s);
    w.iter()
        .zip(dots)
        .map(|(&w, &d)| if w >= 0.0 { d / s - through } else { 0.0 })
        .collect()
}

fn tensor_from(storage: Storage, like: &Tensor) -> Tensor {
    Tensor::from_storage(storage, like.shape().clone(), BackpropOp::none(), false)
}

fn forward(xs: &[Tensor], w: &Tensor) -> Result<Tensor> {
    match xs[0].device() {
        candle_core::Device::Cpu => {
            let guards: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
            let (ws, wl) = w.storage_and_layout();
            let Storage::Cpu(wc) = &*ws else {
                candle_core::bail!("fast_fusion: inputs and weights on different devices");
            };
            let dtype = xs[0].dtype();
            let storage = if dtype == DType::F64 {
                let n = normalized(contiguous::<f64>(wc, wl)?);
                let data = cpu_inputs(&guards, |s, l| contiguous::<f64>(s, l))?;
                CpuStorage::F64(fuse_cpu(&data, &n))
            } else {
                let n = normalized(&weights_f32(wc, wl)?);
                let data = cpu_inputs(&guards, act_f32)?;
                let refs: Vec<&[f32]> = data.iter().map(|c| c.as_ref()).collect();
                store_f32(fuse_cpu(&refs, &n), dtype)?
            };
            Ok(tensor_from(Storage::Cpu(storage), &xs[0]))
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::forward(dev, xs, w),
        d => candle_core::bail!("fast_fusion: unsupported device {d:?}"),
    }
}

/// (input gradients, weight gradient) for the output gradient `g`.
fn backward(g: &Tensor, xs: &[Tensor], w: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
    match g.device() {
        candle_core::Device::Cpu => {
            let (gs, gl) = g.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (Storage::Cpu(gc), Storage::Cpu(wc)) = (&*gs, &*ws) else {
                candle_core::bail!("fast_fusion: gradient and weights on different devices");
            };
            let guards: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
            let (gx, dots, w64): (Vec<CpuStorage>, Vec<f64>, Vec<f64>) = if g.dtype() == DType::F64
            {
                let gv = contiguous::<f64>(gc, gl)?;
                let w64 = contiguous::<f64>(wc, wl)?.to_vec();
                let n = normalized(&w64);
                let data = cpu_inputs(&guards, |s, l| contiguous::<f64>(s, l))?;
                (
                    n.iter()
                        .map(|&ni| CpuStorage::F64(gv.iter().map(|&g| g * ni).collect()))
                        .collect(),
                    data.iter().map(|x| dot_cpu(gv, x)).collect(),
                    w64,
                )
            } else {
                let gv = act_f32(gc, gl)?;
                let w32 = weights_f32(wc, wl)?;
                let n = normalized(&w32);
                let data = cpu_inputs(&guards, act_f32)?;
                let scaled = |ni: f32| -> Result<CpuStorage> {
                    let mut out = vec![0f32; gv.len()];
                    out.par_chunks_mut(CHUNK)
                        .zip(gv.par_chunks(CHUNK))
                        .for_each(|(oc, gc)| {
                            for (o, &g) in oc.iter_mut().zip(gc) {
                                *o = g * ni;
                            }
                        });
                    store_f32(out, g.dtype())
                };
                (
                    n.iter().map(|&ni| scaled(ni)).collect::<Result<_>>()?,
                    data.iter().map(|x| dot_cpu(&gv, x)).collect(),
                    w32.iter().map(|&v| v as f64).collect(),
                )
            };
            let gw = weight_grad(&w64, &dots);
            let gw =
                Tensor::from_vec(gw, w.dims(), &candle_core::Device::Cpu)?.to_dtype(w.dtype())?;
            let gx = gx
                .into_iter()
                .map(|s| tensor_from(Storage::Cpu(s), g))
                .collect();
            Ok((gx, gw))
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::backward(dev, g, xs, w),
        d => candle_core::bail!("fast_fusion: unsupported device {d:?}"),
    }
}

/// Each input's CPU data through `view` (`guards`: the inputs' `storage_and_layout`).
fn cpu_inputs<'a, G: std::ops::Deref<Target = Storage>, V>(
    guards: &'a [(G, &'a candle_core::Layout)],
    view: impl Fn(&'a CpuStorage, &'a candle_core::Layout) -> Result<V>,
) -> Result<Vec<V>> {
    guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(c) => view(c, l),
            _ => candle_core::bail!("fast_fusion: inputs on different devices"),
        })
        .collect()
}

fn weights_f32(s: &CpuStorage, l: &candle_core::Layout) -> Result<Vec<f32>> {
    match s {
        CpuStorage::F32(_) => Ok(contiguous::<f32>(s, l)?.to_vec()),
        s => Err(unsupported("fast_fusion weights", s)),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{self as k, ActSlice, PushKernelArg};
    use super::{tensor_from, MAX_FUSION_INPUTS};
    use candle_core::{CudaDevice, CudaStorage, Result, Storage, Tensor};

    fn cuda_of(s: &Storage) -> Result<&CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("fast_fusion: tensors on different devices"),
        }
    }

    pub(super) fn forward(dev: &CudaDevice, xs: &[Tensor], w: &Tensor) -> Result<Tensor> {
        const OP: &str = "fast_fusion";
        let guards: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
        let views = guards
            .iter()
            .map(|(s, l)| k::act_view(OP, cuda_of(s)?, l))
            .collect::<Result<Vec<_>>>()?;
        let (ws, wl) = w.storage_and_layout();
        let wv = k::f32_view(OP, cuda_of(&ws)?, wl)?;
        let n = xs[0].elem_count();
        let y = ActSlice::alloc(dev, views[0].dtype(), n)?;
        let kern = k::kernel_for(dev, "fusion_fwd", views[0].dtype())?;
        let (n64, k32) = (n as i64, xs.len() as i32);
        let mut b = kern.builder();
        // Unused input slots repeat the first input (the kernel reads only k of them).
        for i in 0..MAX_FUSION_INPUTS {
            views.get(i).unwrap_or(&views[0]).push(&mut b);
        }
        b.arg(&wv);
        y.push(&mut b);
        b.arg(&n64).arg(&k32);
        k::launch(b, k::elementwise(n))?;
        Ok(tensor_from(Storage::Cuda(y.wrap(dev)), &xs[0]))
    }

    pub(super) fn backward(
        dev: &CudaDevice,
        g: &Tensor,
        xs: &[Tensor],
        w: &Tensor,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        const OP: &str = "fast_fusion backward";
        let (gs, gl) = g.storage_and_layout();
        let gv = k::act_view(OP, cuda_of(&gs)?, gl)?;
        let (ws, wl) = w.storage_and_layout();
        let wv = k::f32_view(OP, cuda_of(&ws)?, wl)?;
        let n = g.elem_count();
        let count = xs.len();
        let dots = k::zeros::<f64>(dev, count)?;
        let kern = k::kernel_for(dev, "fusion_grad", gv.dtype())?;
        let (n64, k32) = (n as i64, count as i32);
        let mut gx = Vec::with_capacity(count);
        for (i, x) in xs.iter().enumerate() {
            let (xs_, xl) = x.storage_and_layout();
            let xv = k::act_view(OP, cuda_of(&xs_)?, xl)?;
            let out = ActSlice::alloc(dev, gv.dtype(), n)?;
            let i32_ = i as i32;
            let mut b = kern.builder();
            gv.push(&mut b);
            xv.push(&mut b);
            b.arg(&wv).arg(&k32).arg(&i32_);
            out.push(&mut b);
            b.arg(&dots).arg(&n64);
            k::launch(b, k::block_reduction(n))?;
            gx.push(tensor_from(Storage::Cuda(out.wrap(dev)), g));
        }
        let gw = k::alloc::<f32>(dev, count)?;
        let kern = k::Kernel::new(dev, "fusion_weight_grad")?;
        let mut b = kern.builder();
        b.arg(&wv).arg(&dots).arg(&gw).arg(&k32);
        k::launch(b, k::elementwise(1))?;
        Ok((gx, tensor_from(Storage::Cuda(k::wrap(dev, gw)), w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::rand_tensor;
    use candle_core::{Device, Var};
    use std::rc::Rc;

    /// The recorded op's gradients for every input and the weights.
    fn taped(xs: &[Tensor], w: &Tensor, g: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = xs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let wv = Var::from_tensor(w)?;
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let tape = Rc::new(crate::tape::Tape::default());
        let y = crate::tape::record(&tape, || fast_fusion(&inputs, wv.as_tensor()))?;
        let tape = Rc::try_unwrap(tape).map_err(|_| candle_core::Error::Msg("tape".into()))?;
        let grads = tape.backward(vec![(y.id(), g.clone())])?;
        let mut out: Vec<Tensor> = inputs.iter().map(|t| grads[&t.id()].clone()).collect();
        out.push(grads[&wv.as_tensor().id()].clone());
        Ok((y, out))
    }

    #[test]
    fn by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::full(2f32, (1, 1, 1, 2), &dev)?;
        let b = Tensor::full(10f32, (1, 1, 1, 2), &dev)?;
        // relu([3, -1]) = [3, 0] → 3·2 / (3 + 1e-4) + 0.
        let w = Tensor::new(&[3f32, -1.], &dev)?;
        let y = fast_fusion(&[a, b], &w)?.flatten_all()?.to_vec1::<f32>()?;
        assert!((y[0] - 6.0 / 3.0001).abs() < 1e-5, "{y:?}");
        let w3 = Tensor::new(&[1f32, 1., 1.], &dev)?;
        let bad = Tensor::zeros((1, 1, 1, 3), DType::F32, &dev)?;
        let one = Tensor::zeros((1, 1, 1, 2), DType::F32, &dev)?;
        assert!(fast_fusion(&[one.clone(), bad], &w3.narrow(0, 0, 2)?).is_err());
        assert!(fast_fusion(&[one.clone(), one], &w3).is_err());
        Ok(())
    }

    /// f32: the forward equals the composition bit for bit; the gradients equal candle's
    /// backward through it (inputs exactly, the weights to f64-vs-f32 summation accuracy).
    #[test]
    fn equals_the_stock_op_composition() -> Result<()> {
        for k in [2usize, 3] {
            let dims = [2, 5, 6, 7];
            let xs: Vec<Tensor> = (0..k)
                .map(|i| rand_tensor(&dims, 10 + i as u64)?.to_dtype(DType::F32))
                .collect::<Result<_>>()?;
            let w = Tensor::new(&[0.7f32, -0.2, 1.3][..k], &Device::Cpu)?;
            let g = rand_tensor(&dims, 20)?.to_dtype(DType::F32)?;
            let (y, grads) = taped(&xs, &w, &g)?;
            let vars: Vec<Var> = xs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let wv = Var::from_tensor(&w)?;
            let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            // Untaped, the BiFPN fuses with the stock-op composition this op replaces.
            let yc = crate::bifpn::fuse(&inputs, Some(wv.as_tensor()))?;
            assert_eq!(
                y.flatten_all()?.to_vec1::<f32>()?,
                yc.flatten_all()?.to_vec1::<f32>()?
            );
            let cg = (yc * &g)?.sum_all()?.backward()?;
            for (i, v) in vars.iter().enumerate() {
                let want = cg
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                assert_eq!(grads[i].flatten_all()?.to_vec1::<f32>()?, want, "input {i}");
            }
            let want = cg.get(wv.as_tensor()).unwrap().to_vec1::<f32>()?;
            let got = grads[k].to_vec1::<f32>()?;
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{got:?} vs {want:?}"
                );
            }
        }
        Ok(())
    }

    /// The tape's gradients against central differences of Σ fusion·g (f64; a negative
    /// weight checks the relu's cut-off).
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for k in [2usize, 3] {
            let dims = [2, 3, 4, 5];
            let mut vals: Vec<Tensor> = (0..k)
                .map(|i| rand_tensor(&dims, 30 + i as u64))
                .collect::<Result<_>>()?;
            vals.push(Tensor::new(&[0.9f64, 0.4, -0.3][..k], &Device::Cpu)?);
            let g = rand_tensor(&dims, 40)?;
            let (_, grads) = taped(&vals[..k], &vals[k], &g)?;
            let loss = |v: &[Tensor]| -> Result<f64> {
                (fast_fusion(&v[..k], &v[k])? * &g)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            for (which, grad) in grads.iter().enumerate() {
                let flat = vals[which].flatten_all()?.to_vec1::<f64>()?;
                let analytic = grad.flatten_all()?.to_vec1::<f64>()?;
                for j in (0..flat.len()).step_by(7) {
                    let h = 1e-6;
                    let shifted = |d: f64| -> Result<f64> {
                        let mut p = flat.clone();
                        p[j] += d;
                        let mut v = vals.clone();
                        v[which] = Tensor::from_vec(p, vals[which].dims(), &Device::Cpu)?;
                        loss(&v)
                    };
                    let fd = (shifted(h)? - shifted(-h)?) / (2.0 * h);
                    assert!(
                        (fd - analytic[j]).abs() <= 1e-6 * fd.abs().max(1.0),
                        "k={k} tensor {which} element {j}: fd {fd} vs {}",
                        analytic[j]
                    );
                }
            }
        }
        Ok(())
    }

    /// 16-bit storage: the f32 op on the widened inputs, rounded once.
    #[test]
    fn half_storage_is_the_f32_op_rounded() -> Result<()> {
        for dtype in [DType::F16, DType::BF16] {
            let dims = [2, 4, 4, 8];
            let xs: Vec<Tensor> = (0..3)
                .map(|i| rand_tensor(&dims, 50 + i)?.to_dtype(dtype))
                .collect::<Result<_>>()?;
            let wide: Vec<Tensor> = xs
                .iter()
                .map(|x| x.to_dtype(DType::F32))
                .collect::<Result<_>>()?;
            let w = Tensor::new(&[0.5f32, 1.5, 0.25], &Device::Cpu)?;
            let got = fast_fusion(&xs, &w)?;
            let want = fast_fusion(&wide, &w)?.to_dtype(dtype)?;
            assert_eq!(
                got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                "{dtype:?}"
            );
        }
        Ok(())
    }
}
