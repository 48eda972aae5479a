//! Training-step arithmetic of automl's estimator path (`det_model_fn.py`): the cosine
//! learning-rate schedule with linear warmup, gradient clipping (each gradient by its own
//! norm, then all of them by the global norm), SGD with momentum in TF1's form
//! (`accum = m·accum + g; w −= lr·accum`), and the exponential moving average of the weights
//! and batch-norm statistics with TF's `num_updates` ramp (`decay = min(d, (1+n)/(10+n))`).
//! Weight decay is not here: automl adds it to the loss as an L2 term (see [`crate::loss`]).

use candle_core::{Result, Tensor, Var};

use crate::config::TrainConfig;

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
    if clip <= 0.0 {
        return Ok(squares.iter().sum::<f64>().sqrt());
    }
    let mut sq_total = 0.0;
    for (g, sq) in grads.iter_mut().zip(&squares) {
        let n = sq.sqrt();
        if n > clip {
            *g = (&*g * (clip / n))?;
            sq_total += clip * clip;
        } else {
            sq_total += n * n;
        }
    }
    let global = sq_total.sqrt();
    if global > clip {
        let scale = clip / global;
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
        return Ok(clip);
    }
    Ok(global)
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
        self.accum[i] = t.to_dtype(self.accum[i].dtype())?;
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
            // Detached: a gradient may carry its autograd history, which the buffer would
            // otherwise keep alive from step to step.
            let acc = ((&self.accum[i] * self.momentum)? + g.detach())?.detach();
            let var = &self.vars[i].1;
            var.set(&(var.as_tensor() - (&acc * lr)?)?)?;
            self.accum[i] = acc;
        }
        Ok(())
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
        for (s, (_, v)) in self.shadow.iter_mut().zip(&self.vars) {
            *s = ((&*s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?.detach();
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
        self.shadow[i] = t.to_dtype(self.shadow[i].dtype())?;
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
