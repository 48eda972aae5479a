//! EfficientDet configuration: the D0–D7 compound-scaling values and the training recipe,
//! read from the TOML files in the workspace `configs/` directory (`efficientdet-dN.toml`).
//! The files are also compiled in, so [`Config::builtin`] works without the directory.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Errors from loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema.
    #[error("invalid config TOML: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid config value: {0}")]
    Invalid(String),
    /// No built-in config has that name.
    #[error("unknown model {0:?} (expected efficientdet-d0 … efficientdet-d7)")]
    UnknownModel(String),
}

/// A complete model + training description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Model name, e.g. "efficientdet-d0".
    pub name: String,
    /// EfficientNet backbone.
    pub backbone: BackboneConfig,
    /// BiFPN.
    pub fpn: FpnConfig,
    /// Class and box heads (and the anchor layout they predict for).
    pub head: HeadConfig,
    /// Input size and augmentation ranges (informational for the pipeline).
    pub input: InputConfig,
    /// Loss constants.
    pub loss: LossConfig,
    /// Optimizer and schedule.
    pub train: TrainConfig,
}

/// EfficientNet backbone scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// "efficientnet-b0" … "efficientnet-b7".
    pub name: String,
    /// Channel multiplier (channels rounded to multiples of 8).
    pub width_coefficient: f64,
    /// Repeat multiplier (repeats rounded up).
    pub depth_coefficient: f64,
    /// Drop-connect survival probability of the first block; 0 disables drop-connect.
    pub survival_prob: f64,
    /// Running-average momentum of every batch norm in the network.
    pub batch_norm_momentum: f64,
    /// Epsilon of every batch norm in the network.
    pub batch_norm_epsilon: f64,
}

/// How BiFPN nodes combine their inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightMethod {
    /// Fast normalized fusion: ReLU(w_i) / (Σ ReLU(w) + 1e-4).
    Fastattn,
    /// Plain sum (D6, D7).
    Sum,
}

/// BiFPN layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FpnConfig {
    /// Lowest pyramid level (3 = stride 8).
    pub min_level: usize,
    /// Highest pyramid level (7 = stride 128).
    pub max_level: usize,
    /// Channels of every BiFPN feature.
    pub num_filters: usize,
    /// Number of stacked BiFPN cells.
    pub cell_repeats: usize,
    /// Node fusion.
    pub weight_method: WeightMethod,
}

/// Head layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Separable conv + BN + swish repeats before each prediction layer.
    pub box_class_repeats: usize,
    /// Number of object classes (COCO: 90 ids).
    pub num_classes: usize,
    /// Anchor octave scales per level.
    pub num_scales: usize,
    /// Anchor aspect ratios per scale.
    pub aspect_ratios: Vec<f64>,
    /// Anchor size relative to the level stride.
    pub anchor_scale: f64,
}

impl HeadConfig {
    /// Anchors per feature-map position (9 by default).
    pub fn num_anchors(&self) -> usize {
        self.num_scales * self.aspect_ratios.len()
    }
}

/// automl's `mean_rgb` (ImageNet, 0–255 scale), the only one the input pipeline applies.
pub const IMAGENET_MEAN_RGB: [f64; 3] = [123.675, 116.28, 103.53];
/// automl's `stddev_rgb`.
pub const IMAGENET_STDDEV_RGB: [f64; 3] = [58.395, 57.12, 57.375];

/// Input and augmentation values of the recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Square training/eval image size.
    pub image_size: usize,
    /// Smallest scale-jitter factor.
    pub jitter_min: f64,
    /// Largest scale-jitter factor.
    pub jitter_max: f64,
    /// Random horizontal flip in training.
    pub input_rand_hflip: bool,
    /// Per-channel mean subtracted from RGB pixels (0–255 scale).
    pub mean_rgb: [f64; 3],
    /// Per-channel standard deviation dividing RGB pixels (0–255 scale).
    pub stddev_rgb: [f64; 3],
}

/// Loss constants (automl defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Focal-loss weight of positives.
    pub alpha: f64,
    /// Focal-loss exponent.
    pub gamma: f64,
    /// Label smoothing of the cross-entropy targets.
    pub label_smoothing: f64,
    /// Huber delta of the box loss.
    pub delta: f64,
    /// Weight of the box loss in the total.
    pub box_loss_weight: f64,
    /// L2 weight decay on conv kernels (automl: `weight_decay · Σ‖w‖²/2`).
    pub weight_decay: f64,
}

/// Optimizer and schedule of the recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// "sgd".
    pub optimizer: String,
    /// SGD momentum.
    pub momentum: f64,
    /// Peak learning rate for `lr_reference_batch_size` images per step.
    pub learning_rate: f64,
    /// Batch size `learning_rate` refers to (scaled linearly for other batch sizes).
    pub lr_reference_batch_size: usize,
    /// Learning rate at the start of warmup.
    pub lr_warmup_init: f64,
    /// Warmup length in epochs.
    pub lr_warmup_epoch: f64,
    /// "cosine".
    pub lr_decay_method: String,
    /// Total epochs.
    pub num_epochs: usize,
    /// Global batch size.
    pub batch_size: usize,
    /// Per-tensor gradient clip norm (automl clips each gradient by norm).
    pub clip_gradients_norm: f64,
    /// EMA decay of the weights.
    pub moving_average_decay: f64,
}

const BUILTIN: [(&str, &str); 8] = [
    (
        "efficientdet-d0",
        include_str!("../../configs/efficientdet-d0.toml"),
    ),
    (
        "efficientdet-d1",
        include_str!("../../configs/efficientdet-d1.toml"),
    ),
    (
        "efficientdet-d2",
        include_str!("../../configs/efficientdet-d2.toml"),
    ),
    (
        "efficientdet-d3",
        include_str!("../../configs/efficientdet-d3.toml"),
    ),
    (
        "efficientdet-d4",
        include_str!("../../configs/efficientdet-d4.toml"),
    ),
    (
        "efficientdet-d5",
        include_str!("../../configs/efficientdet-d5.toml"),
    ),
    (
        "efficientdet-d6",
        include_str!("../../configs/efficientdet-d6.toml"),
    ),
    (
        "efficientdet-d7",
        include_str!("../../configs/efficientdet-d7.toml"),
    ),
];

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let p = path.as_ref();
        let s = std::fs::read_to_string(p).map_err(|source| ConfigError::Io {
            path: p.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&s)
    }

    /// The compiled-in copy of `configs/<name>.toml` ("efficientdet-d0" … "efficientdet-d7").
    pub fn builtin(name: &str) -> Result<Self, ConfigError> {
        let (_, s) = BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ConfigError::UnknownModel(name.to_string()))?;
        Self::from_toml_str(s)
    }

    /// Names of the built-in configs.
    pub fn builtin_names() -> impl Iterator<Item = &'static str> {
        BUILTIN.iter().map(|(n, _)| *n)
    }

    /// Checks ranges the network code relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let b = &self.backbone;
        if !(b.width_coefficient > 0.0 && b.depth_coefficient > 0.0) {
            return bad("backbone coefficients must be > 0".into());
        }
        if !(0.0..=1.0).contains(&b.survival_prob) {
            return bad(format!("survival_prob {} not in [0, 1]", b.survival_prob));
        }
        if !(0.0..1.0).contains(&b.batch_norm_momentum) || b.batch_norm_epsilon <= 0.0 {
            return bad("batch norm momentum must be in [0, 1) and epsilon > 0".into());
        }
        let f = &self.fpn;
        // The backbone provides strides 8, 16 and 32; extra levels come from max-pooling.
        if f.min_level != 3 || f.max_level < 5 {
            return bad(format!(
                "fpn levels {}..{} unsupported (min_level must be 3, max_level >= 5)",
                f.min_level, f.max_level
            ));
        }
        if f.num_filters == 0 || f.cell_repeats == 0 {
            return bad("fpn num_filters and cell_repeats must be > 0".into());
        }
        let h = &self.head;
        if h.num_classes == 0 || h.num_anchors() == 0 || h.box_class_repeats == 0 {
            return bad("head needs classes, anchors and repeats > 0".into());
        }
        let l = &self.loss;
        if !(0.0..=1.0).contains(&l.alpha) || l.gamma < 0.0 || l.delta <= 0.0 {
            return bad("loss alpha in [0, 1], gamma >= 0, delta > 0 required".into());
        }
        if !(0.0..=1.0).contains(&l.label_smoothing) || l.weight_decay < 0.0 {
            return bad("label_smoothing in [0, 1] and weight_decay >= 0 required".into());
        }
        if self.input.image_size == 0 || self.input.jitter_min > self.input.jitter_max {
            return bad("image_size > 0 and jitter_min <= jitter_max required".into());
        }
        // The input pipeline (CPU normalize and the GPU render kernel) bakes these in.
        let near = |a: [f64; 3], b: [f64; 3]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-3);
        if !near(self.input.mean_rgb, IMAGENET_MEAN_RGB)
            || !near(self.input.stddev_rgb, IMAGENET_STDDEV_RGB)
        {
            return bad(format!(
                "input.mean_rgb {:?} / stddev_rgb {:?}: only automl's ImageNet statistics \
                 {IMAGENET_MEAN_RGB:?} / {IMAGENET_STDDEV_RGB:?} are supported",
                self.input.mean_rgb, self.input.stddev_rgb
            ));
        }
        Ok(())
    }

    /// Number of pyramid levels (5 for P3–P7).
    pub fn num_levels(&self) -> usize {
        self.fpn.max_level - self.fpn.min_level + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_builtins_parse_with_compound_scaling() {
        // (width, depth, image, fpn filters, cells, head repeats, fusion, anchor scale)
        let want = [
            (1.0, 1.0, 512, 64, 3, 3, WeightMethod::Fastattn, 4.0),
            (1.0, 1.1, 640, 88, 4, 3, WeightMethod::Fastattn, 4.0),
            (1.1, 1.2, 768, 112, 5, 3, WeightMethod::Fastattn, 4.0),
            (1.2, 1.4, 896, 160, 6, 4, WeightMethod::Fastattn, 4.0),
            (1.4, 1.8, 1024, 224, 7, 4, WeightMethod::Fastattn, 4.0),
            (1.6, 2.2, 1280, 288, 7, 4, WeightMethod::Fastattn, 4.0),
            (1.8, 2.6, 1280, 384, 8, 5, WeightMethod::Sum, 4.0),
            (1.8, 2.6, 1536, 384, 8, 5, WeightMethod::Sum, 5.0),
        ];
        for (i, name) in Config::builtin_names().enumerate() {
            let c = Config::builtin(name).unwrap();
            assert_eq!(c.name, name);
            let (w, d, img, f, cells, rep, wm, asc) = want[i];
            assert_eq!(c.backbone.width_coefficient, w, "{name}");
            assert_eq!(c.backbone.depth_coefficient, d, "{name}");
            assert_eq!(c.input.image_size, img, "{name}");
            assert_eq!(c.fpn.num_filters, f, "{name}");
            assert_eq!(c.fpn.cell_repeats, cells, "{name}");
            assert_eq!(c.head.box_class_repeats, rep, "{name}");
            assert_eq!(c.fpn.weight_method, wm, "{name}");
            assert_eq!(c.head.anchor_scale, asc, "{name}");
            assert_eq!(c.head.num_anchors(), 9);
            assert_eq!(c.head.num_classes, 90);
            // Drop-connect: automl turns it off for the b0 backbone only.
            let want_sp = if i == 0 { 0.0 } else { 0.8 };
            assert_eq!(c.backbone.survival_prob, want_sp, "{name}");
            let bb = if i == 7 { 6 } else { i };
            assert_eq!(c.backbone.name, format!("efficientnet-b{bb}"));
        }
    }

    #[test]
    fn d0_recipe_values() {
        let c = Config::builtin("efficientdet-d0").unwrap();
        let l = &c.loss;
        assert_eq!(
            (l.alpha, l.gamma, l.delta, l.box_loss_weight),
            (0.25, 1.5, 0.1, 50.0)
        );
        assert_eq!((l.weight_decay, l.label_smoothing), (4e-5, 0.0));
        let t = &c.train;
        assert_eq!(
            (t.learning_rate, t.lr_warmup_init, t.lr_warmup_epoch),
            (0.08, 0.008, 1.0)
        );
        assert_eq!((t.momentum, t.num_epochs, t.batch_size), (0.9, 300, 64));
        assert_eq!(
            (t.clip_gradients_norm, t.moving_average_decay),
            (10.0, 0.9998)
        );
        assert_eq!((c.input.jitter_min, c.input.jitter_max), (0.1, 2.0));
        assert_eq!(
            (
                c.backbone.batch_norm_momentum,
                c.backbone.batch_norm_epsilon
            ),
            (0.99, 1e-3)
        );
    }

    #[test]
    fn files_on_disk_match_builtins_and_errors_are_clear() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for name in Config::builtin_names() {
            let c = Config::from_file(dir.join(format!("{name}.toml"))).unwrap();
            assert_eq!(c, Config::builtin(name).unwrap());
        }
        assert!(matches!(
            Config::builtin("efficientdet-d9"),
            Err(ConfigError::UnknownModel(_))
        ));
        assert!(matches!(
            Config::from_file(dir.join("nope.toml")),
            Err(ConfigError::Io { .. })
        ));
        let src = include_str!("../../configs/efficientdet-d0.toml");
        let typo = src.replace("num_filters", "num_filterz");
        assert!(matches!(
            Config::from_toml_str(&typo),
            Err(ConfigError::Parse(_))
        ));
        let bad = src.replace("min_level = 3", "min_level = 2");
        assert!(matches!(
            Config::from_toml_str(&bad),
            Err(ConfigError::Invalid(_))
        ));
        // Normalization statistics the pipeline does not apply are refused, not ignored.
        let other_mean = src.replace("123.675", "127.5");
        assert!(src.contains("123.675"));
        match Config::from_toml_str(&other_mean) {
            Err(ConfigError::Invalid(m)) => assert!(m.contains("mean_rgb"), "{m}"),
            r => panic!("expected an invalid config, got {r:?}"),
        }
    }
}
