//! The own ops with 16-bit activations (test-only): each equals the f32 op on the widened
//! inputs, rounded once, and its gradients keep the contract of mixed precision (activation
//! gradients in the activation dtype, parameter gradients in f32).

use super::*;
use crate::ops::fd::rand_tensor;
use candle_core::{DType, Result, Tensor, Var};

type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// One op under test: `acts[i]` says whether input i is an activation (else an f32 parameter
/// or per-channel value); `f32_out` whether the output is f32 (a reduction) rather than the
/// activation dtype.
struct Case {
    name: &'static str,
    inputs: Vec<Tensor>,
    acts: Vec<bool>,
    f32_out: bool,
    f: Box<OpFn>,
}

/// Output and input gradients of Σ f(inputs)·r.
fn run(case: &Case, inputs: &[Tensor], r: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = (case.f)(&ts)?;
    let grads = (&y * &r.to_dtype(y.dtype())?)?.sum_all()?.backward()?;
    let gs = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("{}: no gradient", case.name)))
        })
        .collect::<Result<_>>()?;
    Ok((y, gs))
}

fn flat64(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
}

/// ‖a − b‖ / ‖b‖.
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (flat64(a)?, flat64(b)?);
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    Ok((num / den.max(1e-300)).sqrt())
}

fn cases() -> Result<Vec<Case>> {
    let t = |dims: &[usize], seed: u64, scale: f64| -> Result<Tensor> {
        (rand_tensor(dims, seed)? * scale)?.to_dtype(DType::F32)
    };
    let mut cases = Vec::new();
    for (k, s) in [(3, 2), (5, 1)] {
        cases.push(Case {
            name: if k == 3 {
                "depthwise k3 s2"
            } else {
                "depthwise k5 s1"
            },
            inputs: vec![t(&[2, 9, 8, 12], 1, 1.0)?, t(&[k, k, 12], 2, 1.0)?],
            acts: vec![true, false],
            f32_out: false,
            f: Box::new(move |v| depthwise_conv2d(&v[0], &v[1], s)),
        });
    }
    cases.push(Case {
        name: "max_pool",
        inputs: vec![t(&[2, 7, 6, 5], 3, 1.0)?],
        acts: vec![true],
        f32_out: false,
        f: Box::new(|v| max_pool2d_same(&v[0], (3, 3), (2, 2))),
    });
    let bn_inputs = || -> Result<Vec<Tensor>> {
        Ok(vec![
            t(&[2, 4, 3, 16], 4, 3.0)?,
            t(&[16], 5, 1.0)?,
            t(&[16], 6, 1.0)?,
        ])
    };
    let (mean, var) = (t(&[16], 7, 1.0)?, (t(&[16], 8, 1.0)?.abs()? + 0.5)?);
    for act in [Activation::None, Activation::Swish] {
        cases.push(Case {
            name: "batch_norm_train",
            inputs: bn_inputs()?,
            acts: vec![true, false, false],
            f32_out: false,
            f: Box::new(move |v| Ok(batch_norm_train(&v[0], &v[1], &v[2], 1e-3, act)?.0)),
        });
        cases.push(Case {
            name: "batch_norm_train_resident",
            inputs: bn_inputs()?,
            acts: vec![true, false, false],
            f32_out: false,
            f: Box::new(move |v| Ok(batch_norm_train_resident(&v[0], &v[1], &v[2], 1e-3, act)?.0)),
        });
        let (m, s) = (mean.clone(), var.clone());
        cases.push(Case {
            name: "batch_norm_eval",
            inputs: bn_inputs()?,
            acts: vec![true, false, false],
            f32_out: false,
            f: Box::new(move |v| batch_norm_eval(&v[0], &v[1], &v[2], &m, &s, 1e-3, act)),
        });
        let (m, s) = (mean.clone(), var.clone());
        cases.push(Case {
            name: "batch_norm_eval_resident",
            inputs: bn_inputs()?,
            acts: vec![true, false, false],
            f32_out: false,
            f: Box::new(move |v| batch_norm_eval_resident(&v[0], &v[1], &v[2], &m, &s, 1e-3, act)),
        });
    }
    cases.push(Case {
        name: "swish",
        inputs: vec![t(&[3, 50], 9, 6.0)?],
        acts: vec![true],
        f32_out: false,
        f: Box::new(|v| swish(&v[0])),
    });
    cases.push(Case {
        name: "add_channel_bias",
        inputs: vec![t(&[2, 3, 4, 7], 10, 1.0)?, t(&[7], 11, 1.0)?],
        acts: vec![true, false],
        f32_out: false,
        f: Box::new(|v| add_channel_bias(&v[0], &v[1])),
    });
    cases.push(Case {
        name: "channel_gate",
        inputs: vec![t(&[2, 3, 4, 7], 12, 1.0)?, t(&[2, 7], 13, 1.0)?],
        acts: vec![true, false],
        f32_out: false,
        f: Box::new(|v| channel_gate(&v[0], &v[1])),
    });
    cases.push(Case {
        name: "spatial_mean",
        inputs: vec![t(&[2, 5, 3, 7], 14, 1.0)?],
        acts: vec![true],
        f32_out: true,
        f: Box::new(|v| spatial_mean(&v[0])),
    });
    Ok(cases)
}

#[test]
fn half_activations_equal_f32_ops_on_widened_inputs() -> Result<()> {
    for dtype in [DType::F16, DType::BF16] {
        // A gradient may pass through a few 16-bit roundings (candle's own products in the
        // gate's backward, the rounded upstream gradient): a few units in the last place.
        let grad_tol = if dtype == DType::F16 { 4e-3 } else { 3e-2 };
        for case in cases()? {
            let what = format!("{} {dtype:?}", case.name);
            let half: Vec<Tensor> = case
                .inputs
                .iter()
                .zip(&case.acts)
                .map(|(x, &a)| if a { x.to_dtype(dtype) } else { Ok(x.clone()) })
                .collect::<Result<_>>()?;
            let widened: Vec<Tensor> = half
                .iter()
                .map(|x| x.to_dtype(DType::F32))
                .collect::<Result<_>>()?;
            let probe = (case.f)(&widened)?;
            let r = rand_tensor(probe.dims(), 77)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            let (y16, g16) = run(&case, &half, &r)?;
            let (y32, g32) = run(&case, &widened, &r)?;
            let out = if case.f32_out { DType::F32 } else { dtype };
            assert_eq!(y16.dtype(), out, "{what}: output dtype");
            // Computed in f32 from the same values and rounded once: exactly the rounded f32 op.
            assert_eq!(
                flat64(&y16)?,
                flat64(&y32.to_dtype(out)?)?,
                "{what}: output"
            );
            for (i, ((a, b), &is_act)) in g16.iter().zip(&g32).zip(&case.acts).enumerate() {
                let want = if is_act { dtype } else { DType::F32 };
                assert_eq!(a.dtype(), want, "{what}: gradient {i} dtype");
                let e = rel(a, b)?;
                assert!(e < grad_tol, "{what}: gradient {i} rel err {e:.2e}");
            }
        }
    }
    Ok(())
}

#[test]
fn f64_parameters_with_half_activations_are_refused() -> Result<()> {
    // The 16-bit path reads parameters as f32; anything else is an error, not a panic.
    let x = rand_tensor(&[1, 4, 4, 3], 1)?.to_dtype(DType::F16)?;
    let w = rand_tensor(&[3, 3, 3], 2)?;
    assert!(depthwise_conv2d(&x, &w, 1).is_err());
    let b = rand_tensor(&[3], 3)?;
    assert!(add_channel_bias(&x, &b).is_err());
    Ok(())
}
