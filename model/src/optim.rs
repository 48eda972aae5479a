//! Training-step arithmetic of automl's estimator path (`det_model_fn.py`): the cosine
//! learning-rate schedule with linear warmup, gradient clipping (each gradient by its own
//! norm, then all of them by the global norm), SGD with momentum in TF1's form
//! (`accum = m·accum + g; w −= lr·accum`), and the exponential moving average of the weights
//! and batch-norm statistics with TF's `num_updates` ramp (`decay = min(d, (1+n)/(10+n))`).
//! Weight decay is not here: automl adds it to the loss as an L2 term (see [`crate::loss`]).
//! [`DynamicLossScaler`] is the loss scaling that fp16 mixed precision needs (not in automl,
//! which trains in f32 or bf16; it follows PyTorch's `GradScaler`).

use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::precision::Precision;

/// automl's cosine schedule: from `warmup_init` rising linearly to `peak` over `warmup_steps`,
/// then `0.5·peak·(1 + cos(π·step / (total_steps − warmup_steps)))`. As in automl the cosine
/// uses the absolute step (not step − warmup), so it is exactly automl's curve.
#[derive(Clone, Debug, PartialEq)]
pub struct CosineSchedule {
    pub peak: f64,
    pub warmup_init: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    /// automl's `update_learning_rate_schedule_parameters`: the peak scales linearly with the
    /// batch size (reference `lr_reference_batch_size`), warmup and total steps are
    /// `int(epochs · steps_per_epoch)`. `total_steps` overrides `num_epochs` when given.
    pub fn from_config(
        t: &TrainConfig,
        batch_size: usize,
        steps_per_epoch: u64,
        total_steps: Option<u64>,
    ) -> CosineSchedule {
        let peak = t.learning_rate * batch_size as f64 / t.lr_reference_batch_size.max(1) as f64;
        let total = total_steps.unwrap_or((t.num_epochs as f64 * steps_per_epoch as f64) as u64);
        let warmup = ((t.lr_warmup_epoch * steps_per_epoch as f64) as u64).min(total);
        CosineSchedule {
            peak,
            warmup_init: t.lr_warmup_init,
            warmup_steps: warmup,
            total_steps: total,
        }
    }

    /// Learning rate of 0-based `step`.
    pub fn lr(&self, step: u64) -> f64 {
        let s = step as f64;
        if step < self.warmup_steps {
            return self.warmup_init
                + s / self.warmup_steps as f64 * (self.peak - self.warmup_init);
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        0.5 * self.peak * (1.0 + (std::f64::consts::PI * s / decay_steps).cos())
    }
}

/// Clips each gradient to L2 norm ≤ `clip`, then scales all of them so their global norm is
/// ≤ `clip` (TF `clip_by_norm` then `clip_by_global_norm`). Returns the global norm after
/// clipping (automl's `gradient_norm` summary). `clip <= 0` leaves the gradients alone.
pub fn clip_gradients(grads: &mut [Tensor], clip: f64) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    // All squared norms in one host read (on a GPU each read is a synchronization).
    let squares = grads
        .iter()
        .map(|g| g.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    let squares: Vec<f64> = Tensor::stack(&squares, 0)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1()?;
    let (factors, norm) = clip_factors(&squares, clip);
    for (g, f) in grads.iter_mut().zip(factors) {
        if f != 1.0 {
            *g = (&*g * f)?;
        }
    }
    Ok(norm)
}

/// The multipliers [`clip_gradients`] applies, from the gradients' squared norms: each tensor
/// is first clipped to norm `clip` on its own, then all of them together to global norm
/// `clip`. Returns them with the global norm reported (`clip` when the global clip applied;
/// with `clip` ≤ 0 nothing is clipped and the plain global norm is reported).
pub fn clip_factors(squares: &[f64], clip: f64) -> (Vec<f64>, f64) {
    if clip <= 0.0 {
        return (vec![1.0; squares.len()], squares.iter().sum::<f64>().sqrt());
    }
    let mut factors = Vec::with_capacity(squares.len());
    let mut sq_total = 0.0;
    for sq in squares {
        let n = sq.sqrt();
        if n > clip {
            factors.push(clip / n);
            sq_total += clip * clip;
        } else {
            factors.push(1.0);
            sq_total += n * n;
        }
    }
    let global = sq_total.sqrt();
    if global > clip {
        let scale = clip / global;
        for f in factors.iter_mut() {
            *f *= scale;
        }
        return (factors, clip);
    }
    (factors, global)
}

/// Dynamic loss scaling for fp16 training (PyTorch `GradScaler` semantics).
///
/// fp16 flushes values below ~6e-8 to zero, which loses most of a detector's small
/// gradients; multiplying the loss by a large `scale` before `backward` shifts the gradients
/// into fp16's range, and dividing the f32 gradients by the same factor afterwards restores
/// them. Too large a scale overflows instead, so the scale adapts:
///
/// - it starts at 2^15 ([`Self::INIT_SCALE`]);
/// - a step with any non-finite gradient (inf or NaN) is skipped (no optimizer update) and the
///   scale is halved, but never below 1 ([`Self::MIN_SCALE`]);
/// - after `growth_interval` consecutive finite steps (2000 by default) the scale doubles.
///
/// The scale stays a power of two, so scaling and unscaling are exact in floating point.
/// A disabled scaler ([`Self::disabled`], what [`Self::for_precision`] gives for fp32 and
/// bf16) has scale 1, never touches the gradients and never skips.
///
/// Per step:
///
/// ```no_run
/// # use candle_core::{Result, Tensor};
/// # use effdet_model::{DynamicLossScaler, Precision};
/// # fn step(loss: &Tensor, params: &[candle_core::Var]) -> Result<()> {
/// let mut scaler = DynamicLossScaler::for_precision(Precision::F16);
/// let grads = scaler.scale_loss(loss)?.backward()?;
/// let mut gs: Vec<Tensor> = params.iter().filter_map(|v| grads.get(v).map(|g| g.detach())).collect();
/// let finite = scaler.unscale_and_check(&mut gs)?; // gs are now true gradients
/// scaler.update(finite);
/// if finite { /* clip, optimizer step with gs */ } // else: skip this step
/// # Ok(()) }
/// ```
///
/// The state (scale, count of good steps, interval, enabled) is serde-serializable so a
/// checkpoint can carry it across a resume; deserializing rejects a scale that is not a
/// finite number ≥ 1 (or ≠ 1 when disabled) and a zero growth interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ScalerState")]
pub struct DynamicLossScaler {
    scale: f64,
    good_steps: u64,
    growth_interval: u64,
    enabled: bool,
}

/// Unchecked serialized form of [`DynamicLossScaler`].
#[derive(Deserialize)]
struct ScalerState {
    scale: f64,
    good_steps: u64,
    growth_interval: u64,
    enabled: bool,
}

impl TryFrom<ScalerState> for DynamicLossScaler {
    type Error = String;

    fn try_from(s: ScalerState) -> std::result::Result<Self, String> {
        if !s.scale.is_finite() || s.scale < Self::MIN_SCALE {
            return Err(format!(
                "loss scale must be a finite number >= 1, got {}",
                s.scale
            ));
        }
        if !s.enabled && s.scale != 1.0 {
            return Err(format!(
                "a disabled loss scaler has scale 1, got {}",
                s.scale
            ));
        }
        if s.growth_interval == 0 {
            return Err("loss-scale growth interval must be at least 1".into());
        }
        Ok(DynamicLossScaler {
            scale: s.scale,
            good_steps: s.good_steps,
            growth_interval: s.growth_interval,
            enabled: s.enabled,
        })
    }
}

impl Default for DynamicLossScaler {
    /// Enabled, scale 2^15, growth interval 2000.
    fn default() -> Self {
        DynamicLossScaler::new(Self::DEFAULT_GROWTH_INTERVAL)
    }
}

impl DynamicLossScaler {
    /// Initial scale of an enabled scaler, 2^15.
    pub const INIT_SCALE: f64 = 32768.0;
    /// The scale never drops below this.
    pub const MIN_SCALE: f64 = 1.0;
    /// Consecutive finite steps before the scale doubles.
    pub const DEFAULT_GROWTH_INTERVAL: u64 = 2000;

    /// An enabled scaler at 2^15 that doubles after `growth_interval` finite steps
    /// (0 is taken as 1: grow after every finite step).
    pub fn new(growth_interval: u64) -> Self {
        DynamicLossScaler {
            scale: Self::INIT_SCALE,
            good_steps: 0,
            growth_interval: growth_interval.max(1),
            enabled: true,
        }
    }

    /// Scale 1, gradients untouched, no step ever skipped.
    pub fn disabled() -> Self {
        DynamicLossScaler {
            scale: 1.0,
            good_steps: 0,
            growth_interval: Self::DEFAULT_GROWTH_INTERVAL,
            enabled: false,
        }
    }

    /// Enabled with the defaults for fp16, disabled for fp32 and bf16.
    pub fn for_precision(precision: Precision) -> Self {
        if precision.needs_loss_scaling() {
            Self::default()
        } else {
            Self::disabled()
        }
    }

    /// Whether scaling is active.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The current loss multiplier (1 when disabled).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Consecutive finite steps since the last change of scale.
    pub fn good_steps(&self) -> u64 {
        self.good_steps
    }

    /// Finite steps needed for the scale to double.
    pub fn growth_interval(&self) -> u64 {
        self.growth_interval
    }

    /// `loss · scale`, the tensor to call `backward` on (the loss itself when disabled).
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        if !self.enabled {
            return Ok(loss.clone());
        }
        loss.affine(self.scale, 0.0)
    }

    /// Divides every gradient by the scale and reports whether all of them are finite. The
    /// check costs one device→host read in all: each gradient contributes `sum(g − g)`, which
    /// is exactly 0 when `g` is finite and NaN when it holds an inf or a NaN (a plain sum
    /// could overflow on finite values), and the per-gradient results are stacked and read
    /// once. Disabled: no work, always `true`.
    pub fn unscale_and_check(&self, grads: &mut [Tensor]) -> Result<bool> {
        if !self.enabled || grads.is_empty() {
            return Ok(true);
        }
        let inv = 1.0 / self.scale;
        let mut probes = Vec::with_capacity(grads.len());
        for g in grads.iter_mut() {
            *g = g.affine(inv, 0.0)?;
            // g − g: 0 for finite entries, NaN for inf and NaN.
            probes.push(g.sub(g)?.sum_all()?.to_dtype(DType::F32)?);
        }
        let total = Tensor::stack(&probes, 0)?.sum_all()?.to_scalar::<f32>()?;
        Ok(total.is_finite())
    }

    /// Advances the schedule after a step whose gradients were `finite` (the result of
    /// [`Self::unscale_and_check`]): non-finite halves the scale (not below 1) and restarts
    /// the count; the `growth_interval`-th finite step in a row doubles it. No-op when
    /// disabled.
    pub fn update(&mut self, finite: bool) {
        if !self.enabled {
            return;
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(Self::MIN_SCALE);
            self.good_steps = 0;
        }
    }
}

/// SGD with momentum over a fixed list of variables (TF1 `MomentumOptimizer`).
pub struct Sgd {
    pub momentum: f64,
    vars: Vec<(String, Var)>,
    accum: Vec<Tensor>,
}

impl Sgd {
    /// Zero momentum buffers for `vars`.
    pub fn new(vars: Vec<(String, Var)>, momentum: f64) -> Result<Sgd> {
        let accum = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<Result<_>>()?;
        Ok(Sgd {
            momentum,
            vars,
            accum,
        })
    }

    /// The variables, in update order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Momentum buffers, named like their variables.
    pub fn buffers(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.vars
            .iter()
            .map(|(n, _)| n.as_str())
            .zip(self.accum.iter())
    }

    /// Replaces the momentum buffer of `name` (resuming); fails on an unknown name or shape.
    pub fn set_buffer(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let i = self
            .vars
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no momentum slot for {name}")))?;
        if t.dims() != self.accum[i].dims() {
            candle_core::bail!(
                "momentum {name}: shape {:?}, variable {:?}",
                t.dims(),
                self.accum[i].dims()
            );
        }
        self.accum[i] = t.to_dtype(self.accum[i].dtype())?.contiguous()?.copy()?;
        Ok(())
    }

    /// One update with `grads[i]` for `vars()[i]`; `None` (no gradient) still decays nothing
    /// and leaves the variable as is, as TF skips variables without a gradient.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            );
        }
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            // In place: accum = m·accum + g, then w = w − lr·accum (the same arithmetic as the
            // scalar ops, one launch each and no new buffers).
            crate::ops::axpby_inplace(&self.accum[i], g, self.momentum, 1.0)?;
            crate::ops::axpby_inplace(self.vars[i].1.as_tensor(), &self.accum[i], 1.0, -lr)?;
        }
        Ok(())
    }
}

impl Sgd {
    /// [`Sgd::step`] fused with the gradients' preparation, for the variables at `index`
    /// (those that got a gradient; the others stay as they are): the update uses
    /// `u = a·g + b·w` with `coef[k] = (a, b)` for `grads[k]`, e.g. `a` = unscaling × clipping
    /// factor and `b` = the L2 weight decay for kernels. One multi-tensor pass (see
    /// [`crate::ops::multi_tensor::sgd_momentum`]).
    pub fn fused_step(
        &mut self,
        index: &[usize],
        grads: &[Tensor],
        coef: &[crate::ops::multi_tensor::Coef],
        lr: f64,
    ) -> Result<()> {
        if index.len() != grads.len() || index.iter().any(|&i| i >= self.vars.len()) {
            candle_core::bail!(
                "fused_step: {} gradients for indices {index:?}",
                grads.len()
            );
        }
        let ws: Vec<&Tensor> = index.iter().map(|&i| self.vars[i].1.as_tensor()).collect();
        let ms: Vec<&Tensor> = index.iter().map(|&i| &self.accum[i]).collect();
        let gs: Vec<&Tensor> = grads.iter().collect();
        crate::ops::multi_tensor::sgd_momentum(&ws, &ms, &gs, coef, self.momentum, lr)
    }
}

/// Exponential moving average of a set of variables (TF `ExponentialMovingAverage` with
/// `num_updates` = the global step after the update, as automl's estimator applies it).
pub struct Ema {
    pub decay: f64,
    vars: Vec<(String, Var)>,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Shadows start as copies of the variables' current values (as TF initializes them).
    pub fn new(vars: Vec<(String, Var)>, decay: f64) -> Result<Ema> {
        let shadow = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<Result<_>>()?;
        Ok(Ema {
            decay,
            vars,
            shadow,
        })
    }

    /// The decay used when `num_updates` updates have been made (counting this one).
    pub fn decay_at(&self, num_updates: u64) -> f64 {
        let n = num_updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// `shadow = d·shadow + (1 − d)·var` with `d = decay_at(num_updates)`.
    pub fn update(&mut self, num_updates: u64) -> Result<()> {
        let d = self.decay_at(num_updates);
        // One multi-tensor pass (the per-variable axpby's arithmetic).
        let xs: Vec<&Tensor> = self.shadow.iter().collect();
        let ys: Vec<&Tensor> = self.vars.iter().map(|(_, v)| v.as_tensor()).collect();
        if xs.iter().all(|x| x.dtype() == candle_core::DType::F32) {
            return crate::ops::multi_tensor::axpby_all(&xs, &ys, d, 1.0 - d);
        }
        for (s, y) in xs.iter().zip(ys) {
            crate::ops::axpby_inplace(s, y, d, 1.0 - d)?;
        }
        Ok(())
    }

    /// Averages, named like their variables.
    pub fn shadows(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.vars
            .iter()
            .map(|(n, _)| n.as_str())
            .zip(self.shadow.iter())
    }

    /// Replaces the average of `name` (resuming).
    pub fn set_shadow(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let i = self
            .vars
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no EMA slot for {name}")))?;
        if t.dims() != self.shadow[i].dims() {
            candle_core::bail!(
                "EMA {name}: shape {:?}, variable {:?}",
                t.dims(),
                self.shadow[i].dims()
            );
        }
        self.shadow[i] = t.to_dtype(self.shadow[i].dtype())?.contiguous()?.copy()?;
        Ok(())
    }

    /// Writes the averages into the variables (for evaluation with EMA weights).
    pub fn copy_to_vars(&self) -> Result<()> {
        for (s, (_, v)) in self.shadow.iter().zip(&self.vars) {
            v.set(s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    }

    #[test]
    fn cosine_schedule_hand_values() {
        let s = CosineSchedule {
            peak: 0.08,
            warmup_init: 0.008,
            warmup_steps: 10,
            total_steps: 110,
        };
        close(s.lr(0), 0.008);
        close(s.lr(5), 0.008 + 0.5 * 0.072);
        // First post-warmup step: cos(π·10/100).
        close(
            s.lr(10),
            0.5 * 0.08 * (1.0 + (std::f64::consts::PI * 0.1).cos()),
        );
        close(
            s.lr(60),
            0.5 * 0.08 * (1.0 + (std::f64::consts::PI * 0.6).cos()),
        );
        close(s.lr(100), 0.0);
    }

    #[test]
    fn schedule_from_config_scales_with_batch() {
        let cfg = crate::config::Config::builtin("efficientdet-d0").unwrap();
        let s = CosineSchedule::from_config(&cfg.train, 16, 1000, None);
        close(s.peak, 0.02);
        assert_eq!(s.warmup_steps, 1000);
        assert_eq!(s.total_steps, 300_000);
        let s = CosineSchedule::from_config(&cfg.train, 16, 1000, Some(500));
        assert_eq!((s.warmup_steps, s.total_steps), (500, 500));
    }

    #[test]
    fn clipping_per_tensor_then_global() -> Result<()> {
        let dev = Device::Cpu;
        // Norms 5 (kept) and 20 (clipped to 10): global √125 > 10 → both scaled by 10/√125.
        let mut g = vec![
            Tensor::new(&[3f32, 4.], &dev)?,
            Tensor::new(&[12f32, 16.], &dev)?,
        ];
        let n = clip_gradients(&mut g, 10.0)?;
        close(n, 10.0);
        let s = 10.0 / 125f64.sqrt();
        let a = g[0].to_vec1::<f32>()?;
        let b = g[1].to_vec1::<f32>()?;
        close(a[0] as f64, 3.0 * s);
        close(b[1] as f64, 16.0 * 0.5 * s);
        // Small gradients are left alone.
        let mut g = vec![Tensor::new(&[0.3f32, 0.4], &dev)?];
        close(clip_gradients(&mut g, 10.0)?, 0.5);
        assert_eq!(g[0].to_vec1::<f32>()?, vec![0.3, 0.4]);
        Ok(())
    }

    #[test]
    fn momentum_update_of_one_scalar() -> Result<()> {
        let dev = Device::Cpu;
        let v = Var::new(&[1.0f32], &dev)?;
        let mut sgd = Sgd::new(vec![("w".into(), v.clone())], 0.9)?;
        let g = Some(Tensor::new(&[2.0f32], &dev)?);
        sgd.step(std::slice::from_ref(&g), 0.1)?; // acc 2, w = 1 − 0.2
        close(v.to_vec1::<f32>()?[0] as f64, 0.8);
        sgd.step(&[g], 0.5)?; // acc 0.9·2 + 2 = 3.8, w = 0.8 − 1.9
        close(v.to_vec1::<f32>()?[0] as f64, -1.1);
        sgd.step(&[None], 0.5)?;
        close(v.to_vec1::<f32>()?[0] as f64, -1.1);
        Ok(())
    }

    #[test]
    fn loss_scaler_halves_and_skips_on_overflow() -> Result<()> {
        let dev = Device::Cpu;
        let mut s = DynamicLossScaler::new(3);
        assert_eq!(s.scale(), 32768.0);
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut g = vec![
                Tensor::new(&[1f32, 2.], &dev)?,
                Tensor::new(&[[0f32, bad], [3., 4.]], &dev)?,
            ];
            let before = s.scale();
            let finite = s.unscale_and_check(&mut g)?;
            assert!(!finite, "{bad} not detected");
            s.update(finite);
            assert_eq!(s.scale(), before / 2.0);
            assert_eq!(s.good_steps(), 0);
        }
        // Huge but finite values must not read as overflow (a plain sum would overflow).
        let mut g = vec![Tensor::new(&[f32::MAX, f32::MAX, -f32::MAX], &dev)?];
        let mut big = DynamicLossScaler::new(3);
        big.scale = DynamicLossScaler::MIN_SCALE;
        assert!(big.unscale_and_check(&mut g)?);
        // The scale bottoms out at 1.
        for _ in 0..40 {
            s.update(false);
        }
        assert_eq!(s.scale(), 1.0);
        Ok(())
    }

    #[test]
    fn loss_scaler_grows_after_clean_steps_and_unscales_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let mut s = DynamicLossScaler::new(3);
        // Values that are not powers of two, so an inexact division would show.
        let raw = [0.1f32, -3.7, 1e-30, 12345.678];
        for step in 1..=7u32 {
            let scaled: Vec<f32> = raw.iter().map(|v| v * s.scale() as f32).collect();
            let mut g = vec![Tensor::new(scaled.as_slice(), &dev)?];
            let finite = s.unscale_and_check(&mut g)?;
            assert!(finite);
            assert_eq!(g[0].to_vec1::<f32>()?, raw.to_vec(), "step {step}");
            s.update(finite);
            let want = 32768.0 * 2f64.powi((step / 3) as i32);
            assert_eq!(s.scale(), want, "step {step}");
            assert_eq!(s.good_steps(), (step % 3) as u64);
        }
        // An overflow resets the count of clean steps.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale(), s.good_steps()), (65536.0, 0));
        let loss = Tensor::new(3f32, &dev)?;
        assert_eq!(s.scale_loss(&loss)?.to_scalar::<f32>()?, 3.0 * 65536.0);
        Ok(())
    }

    #[test]
    fn disabled_loss_scaler_is_transparent() -> Result<()> {
        let dev = Device::Cpu;
        let mut s = DynamicLossScaler::for_precision(Precision::Bf16);
        assert_eq!(s, DynamicLossScaler::for_precision(Precision::F32));
        assert!(!s.is_enabled());
        assert!(DynamicLossScaler::for_precision(Precision::F16).is_enabled());
        let mut g = vec![Tensor::new(&[2f32, f32::NAN], &dev)?];
        assert!(s.unscale_and_check(&mut g)?);
        assert!(g[0].to_vec1::<f32>()?[1].is_nan());
        s.update(false);
        assert_eq!((s.scale(), s.good_steps()), (1.0, 0));
        let loss = Tensor::new(3f32, &dev)?;
        assert_eq!(s.scale_loss(&loss)?.to_scalar::<f32>()?, 3.0);
        Ok(())
    }

    #[test]
    fn loss_scaler_state_round_trips_and_is_validated() {
        let mut s = DynamicLossScaler::new(5);
        s.update(false);
        s.update(true);
        s.update(true);
        let text = toml::to_string(&s).unwrap();
        let back: DynamicLossScaler = toml::from_str(&text).unwrap();
        assert_eq!(back, s);
        assert_eq!((back.scale(), back.good_steps()), (16384.0, 2));
        let bad = text.replace("16384.0", "0.5");
        let err = toml::from_str::<DynamicLossScaler>(&bad).unwrap_err();
        assert!(err.to_string().contains("finite number >= 1"), "{err}");
        let bad = text.replace("growth_interval = 5", "growth_interval = 0");
        assert!(toml::from_str::<DynamicLossScaler>(&bad).is_err());
    }

    #[test]
    fn ema_ramps_its_decay() -> Result<()> {
        let dev = Device::Cpu;
        let v = Var::new(&[0.0f32], &dev)?;
        let mut ema = Ema::new(vec![("w".into(), v.clone())], 0.9998)?;
        close(ema.decay_at(1), 2.0 / 11.0);
        close(ema.decay_at(1_000_000), 0.9998);
        v.set(&Tensor::new(&[11.0f32], &dev)?)?;
        ema.update(1)?; // 2/11·0 + 9/11·11 = 9
        let (_, s) = ema.shadows().next().unwrap();
        close(s.to_vec1::<f32>()?[0] as f64, 9.0);
        ema.copy_to_vars()?;
        close(v.to_vec1::<f32>()?[0] as f64, 9.0);
        Ok(())
    }
}
