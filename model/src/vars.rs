//! Storage of the network's weights: trainable parameters and batch-norm running statistics
//! live in two separate candle `VarMap`s, so an optimizer built from [`ModelVars::trainable`]
//! can never touch the statistics. Both are saved to / loaded from one safetensors file; the
//! statistics are the entries whose names end in `running_mean` / `running_var`.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// How a new variable is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All entries equal to the value.
    Const(f64),
    /// N(0, std²).
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// N(0, std²) redrawn outside ±2·std (Keras `TruncatedNormal`).
    TruncatedNormal {
        /// Standard deviation before truncation.
        std: f64,
    },
    /// U(−limit, limit).
    Uniform {
        /// Half-width.
        limit: f64,
    },
}

impl Init {
    /// Keras `glorot_uniform` for the given fans.
    pub fn glorot_uniform(fan_in: usize, fan_out: usize) -> Self {
        Init::Uniform {
            limit: (6.0 / (fan_in + fan_out) as f64).sqrt(),
        }
    }

    /// Keras `variance_scaling` default (scale 1, fan-in, truncated normal).
    pub fn variance_scaling(fan_in: usize) -> Self {
        // Keras divides by the std of a unit normal truncated at ±2.
        Init::TruncatedNormal {
            std: (1.0 / fan_in as f64).sqrt() / 0.879_625_661_034_239_8,
        }
    }

    /// automl's EfficientNet conv initializer: N(0, 2 / fan_out), fan_out = kh·kw·filters.
    pub fn efficientnet_conv(fan_out: usize) -> Self {
        Init::Normal {
            std: (2.0 / fan_out as f64).sqrt(),
        }
    }
}

/// Suffixes that mark batch-norm running statistics.
pub const STAT_SUFFIXES: [&str; 2] = ["running_mean", "running_var"];

/// Trainable parameters + batch-norm statistics, created on first request.
pub struct ModelVars {
    params: VarMap,
    stats: VarMap,
    device: Device,
    dtype: DType,
    rng: Mutex<ChaCha8Rng>,
}

impl ModelVars {
    /// An empty f32 store; new variables are initialized from a generator seeded with `seed`.
    pub fn new(device: &Device, seed: u64) -> Self {
        ModelVars {
            params: VarMap::new(),
            stats: VarMap::new(),
            device: device.clone(),
            dtype: DType::F32,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// The device variables live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn sample(&self, n: usize, init: Init) -> Result<Vec<f32>> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("ModelVars: poisoned rng lock".into()))?;
        let normal = |rng: &mut ChaCha8Rng| {
            // Box–Muller; 1 − u keeps the logarithm finite.
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        Ok((0..n)
            .map(|_| match init {
                Init::Const(v) => v as f32,
                Init::Normal { std } => (std * normal(&mut rng)) as f32,
                Init::TruncatedNormal { std } => loop {
                    let z = normal(&mut rng);
                    if z.abs() <= 2.0 {
                        break (std * z) as f32;
                    }
                },
                Init::Uniform { limit } => rng.gen_range(-limit..limit) as f32,
            })
            .collect())
    }

    fn get_or_create(&self, map: &VarMap, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        let mut data = map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("ModelVars: poisoned map lock".into()))?;
        if let Some(v) = data.get(name) {
            if v.dims() != shape {
                candle_core::bail!(
                    "variable {name}: shape {:?} requested, {:?} stored",
                    shape,
                    v.dims()
                );
            }
            return Ok(v.clone());
        }
        let n = shape.iter().product();
        let t =
            Tensor::from_vec(self.sample(n, init)?, shape, &self.device)?.to_dtype(self.dtype)?;
        let v = Var::from_tensor(&t)?;
        data.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// A trainable parameter (created with `init` on first use).
    pub fn param(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if STAT_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            candle_core::bail!("parameter name {name} is reserved for batch-norm statistics");
        }
        Ok(self
            .get_or_create(&self.params, name, shape, init)?
            .as_tensor()
            .clone())
    }

    /// A batch-norm running statistic; `name` must end in `running_mean` or `running_var`.
    pub fn stat(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        if !STAT_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            candle_core::bail!("statistic name {name} must end in running_mean or running_var");
        }
        self.get_or_create(&self.stats, name, shape, init)
    }

    fn sorted(map: &VarMap) -> Vec<(String, Var)> {
        let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Trainable parameters, sorted by name (what the optimizer updates).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        Self::sorted(&self.params)
    }

    /// Batch-norm running statistics, sorted by name (updated by training-mode forwards).
    pub fn bn_stats(&self) -> Vec<(String, Var)> {
        Self::sorted(&self.stats)
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Number of statistic scalars.
    pub fn num_stats(&self) -> usize {
        self.bn_stats().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes parameters and statistics to one safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let all: HashMap<String, Tensor> = self
            .trainable()
            .into_iter()
            .chain(self.bn_stats())
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&all, path)
    }

    /// Overwrites every existing variable with the file's tensor of the same name. Fails (and
    /// names the variable) if one is missing or has another shape; extra file entries are
    /// ignored. Build the model first so the variables exist.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<()> {
        let file = candle_core::safetensors::load(path.as_ref(), &self.device)?;
        for (name, var) in self.trainable().into_iter().chain(self.bn_stats()) {
            let t = file.get(&name).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: no tensor named {name}",
                    path.as_ref().display()
                ))
            })?;
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "{name}: file has shape {:?}, model {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_stats_are_separate_and_round_trip() -> Result<()> {
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 1);
        let w = vars.param("a.weight", &[3, 2], Init::Normal { std: 1.0 })?;
        let m = vars.stat("a.bn.running_mean", &[2], Init::Const(0.0))?;
        assert!(vars.param("x.running_var", &[1], Init::Const(0.0)).is_err());
        assert!(vars.stat("x.gamma", &[1], Init::Const(0.0)).is_err());
        assert_eq!(vars.num_trainable(), 6);
        assert_eq!(vars.num_stats(), 2);
        // Same name returns the same variable; another shape is an error.
        let w2 = vars.param("a.weight", &[3, 2], Init::Const(5.0))?;
        assert_eq!(w.to_vec2::<f32>()?, w2.to_vec2::<f32>()?);
        assert!(vars.param("a.weight", &[2, 3], Init::Const(0.0)).is_err());

        let dir = std::env::temp_dir().join(format!("effdet-vars-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("v.safetensors");
        m.set(&Tensor::new(&[1f32, 2.], &dev)?)?;
        vars.save(&file)?;
        let other = ModelVars::new(&dev, 2);
        let w3 = other.param("a.weight", &[3, 2], Init::Const(0.0))?;
        let m3 = other.stat("a.bn.running_mean", &[2], Init::Const(0.0))?;
        other.load(&file)?;
        assert_eq!(w3.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        assert_eq!(m3.to_vec1::<f32>()?, vec![1., 2.]);
        let missing = ModelVars::new(&dev, 3);
        missing.param("b.weight", &[1], Init::Const(0.0))?;
        let err = missing.load(&file).unwrap_err().to_string();
        assert!(err.contains("b.weight"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn initializers_have_the_right_spread() -> Result<()> {
        let vars = ModelVars::new(&Device::Cpu, 7);
        let n = 20000;
        let stats = |t: Tensor| -> Result<(f64, f64, f64)> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
            let max = v.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
            Ok((mean, var.sqrt(), max))
        };
        let (m, s, _) = stats(vars.param("n", &[n], Init::Normal { std: 0.5 })?)?;
        assert!(m.abs() < 0.02 && (s - 0.5).abs() < 0.02, "{m} {s}");
        let (_, s, mx) = stats(vars.param("t", &[n], Init::TruncatedNormal { std: 1.0 })?)?;
        // A unit normal truncated at ±2 has std 0.8796.
        assert!(mx <= 2.0 && (s - 0.8796).abs() < 0.02, "{s} {mx}");
        let (_, s, mx) = stats(vars.param("u", &[n], Init::Uniform { limit: 0.3 })?)?;
        assert!(mx <= 0.3 && (s - 0.3 / 3f64.sqrt()).abs() < 0.01, "{s}");
        Ok(())
    }
}
