//! Finite-difference gradient checking for the hand-written ops (test-only).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// An f32 tensor's values as bit patterns, for bit-for-bit comparisons.
pub(crate) fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// An f64 tensor with entries uniform in [-1, 1), reproducible from `seed`.
pub(crate) fn rand_tensor(dims: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// Checks the analytic gradients of `f` at `inputs` (f64) against central differences of the
/// scalar `sum(f(inputs) * r)` for a fixed random `r`. Up to 60 entries per input are probed.
/// `tol` bounds |analytic − numeric| / max(1, |numeric|).
pub(crate) fn check_gradients<F>(inputs: &[Tensor], f: F, tol: f64) -> Result<()>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    for t in inputs {
        assert_eq!(t.dtype(), DType::F64, "finite differences need f64 inputs");
    }
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let as_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&as_tensors)?;
    let r = rand_tensor(out.dims(), 12345)?;
    let loss = (&out * &r)?.sum_all()?;
    let grads = loss.backward()?;

    let scalar =
        |vals: &[Tensor]| -> Result<f64> { (f(vals)? * &r)?.sum_all()?.to_scalar::<f64>() };
    let eps = 1e-5;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for (i, var) in vars.iter().enumerate() {
        let analytic = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
            None => vec![0.0; var.elem_count()],
        };
        let base = inputs[i].flatten_all()?.to_vec1::<f64>()?;
        let n = base.len();
        let probes: Vec<usize> = if n <= 60 {
            (0..n).collect()
        } else {
            (0..60).map(|_| rng.gen_range(0..n)).collect()
        };
        for &j in &probes {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += delta;
                let mut vals = inputs.to_vec();
                vals[i] = Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu)?;
                scalar(&vals)
            };
            let numeric = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
            let err = (analytic[j] - numeric).abs() / numeric.abs().max(1.0);
            assert!(
                err < tol,
                "input {i} entry {j}: analytic {} vs numeric {numeric} (err {err:e})",
                analytic[j]
            );
        }
    }
    Ok(())
}
