//! Shared data-loading options of the subcommands that read shards, and loader construction.

use std::path::PathBuf;
use std::sync::Arc;

use effdet_model::config::Config;
use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::augment::Mode;
use effdet_pipeline::decode::CpuDecoder;
use effdet_pipeline::labeler::Labeler;
use effdet_pipeline::loader::{ImageDtype, Loader, LoaderConfig};
use effdet_pipeline::tfrecord::expand_shard_paths;

/// Image size of the commands that run no model (D0's).
pub const DEFAULT_IMAGE_SIZE: u32 = 512;

#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Shard directory, file or glob (repeatable).
    #[arg(long = "data", required = true)]
    pub data: Vec<String>,
    /// Output image size (square). Default: the model's own (the config's `input.image_size`,
    /// a checkpoint's training size), or 512 where no model is involved.
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Random seed (shuffling and augmentation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batches prefetched ahead of the consumer.
    #[arg(long, default_value_t = 2)]
    pub prefetch: usize,
    /// Image element type.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub image_dtype: DtypeArg,
    /// Shuffle buffer in records (train mode).
    #[arg(long, default_value_t = 64)]
    pub shuffle_buffer: usize,
    /// Replica index for data-parallel training.
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    /// Number of replicas.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum DtypeArg {
    F32,
    F16,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeArg {
    Train,
    Eval,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Train => Mode::Train,
            ModeArg::Eval => Mode::Eval,
        }
    }
}

impl DataArgs {
    /// Defaults for the given shard paths.
    pub fn for_paths(data: Vec<String>, image_size: u32) -> DataArgs {
        DataArgs {
            data,
            image_size: Some(image_size),
            threads: None,
            seed: 0,
            prefetch: 2,
            image_dtype: DtypeArg::F32,
            shuffle_buffer: 64,
            rank: 0,
            world_size: 1,
        }
    }

    /// Train-mode loader settings for model `cfg`: the config's `[input]` section drives the
    /// augmentation (jitter range, flips).
    pub fn train_loader_config(&self, cfg: &Config, batch_size: usize) -> LoaderConfig {
        let mut lcfg = self.loader_config(Mode::Train, batch_size);
        lcfg.augment.jitter_min = cfg.input.jitter_min as f32;
        lcfg.augment.jitter_max = cfg.input.jitter_max as f32;
        lcfg.augment.hflip = cfg.input.input_rand_hflip;
        lcfg
    }

    /// The image size: `--image-size`, or the default set by [`DataArgs::sized_for`], or 512.
    pub fn image_size(&self) -> u32 {
        self.image_size.unwrap_or(DEFAULT_IMAGE_SIZE)
    }

    /// These options with `model_size` as the image size unless `--image-size` was given.
    pub fn sized_for(&self, model_size: u32) -> DataArgs {
        DataArgs {
            image_size: Some(self.image_size.unwrap_or(model_size)),
            ..self.clone()
        }
    }

    pub fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let files = expand_shard_paths(&self.data, &mut |w| eprintln!("warning: {w}"))?;
        anyhow::ensure!(!files.is_empty(), "no shard files in {:?}", self.data);
        Ok(files)
    }

    pub fn loader_config(&self, mode: Mode, batch_size: usize) -> LoaderConfig {
        let mut cfg = LoaderConfig::new(mode, self.image_size(), batch_size);
        cfg.threads = self.threads.unwrap_or(0);
        cfg.seed = self.seed;
        cfg.prefetch = self.prefetch;
        cfg.image_dtype = match self.image_dtype {
            DtypeArg::F32 => ImageDtype::F32,
            DtypeArg::F16 => ImageDtype::F16,
        };
        if mode == Mode::Train {
            cfg.shuffle_buffer = self.shuffle_buffer;
        }
        cfg.rank = self.rank;
        cfg.world_size = self.world_size;
        cfg
    }
}

/// What the loader's labels must agree with: the anchors the model predicts for (its levels,
/// octave scales, aspect ratios and anchor scale at the image size) and, in training, its
/// number of classes.
#[derive(Debug, Clone)]
pub struct LabelSpec {
    pub anchors: AnchorConfig,
    /// Class ids above this stop the loader with an error naming the record.
    pub num_classes: Option<usize>,
}

impl LabelSpec {
    /// The anchors of model `cfg` at a square `image_size`, and its classes.
    pub fn for_model(cfg: &Config, image_size: u32) -> LabelSpec {
        LabelSpec {
            anchors: model_anchors(cfg, image_size),
            num_classes: Some(cfg.head.num_classes),
        }
    }

    /// automl's default anchors (D0–D6) with any class id: for the commands that run the
    /// pipeline without a model (bench-pipeline, dump-batch).
    pub fn default_anchors(image_size: u32) -> LabelSpec {
        let size = image_size as usize;
        LabelSpec {
            anchors: AnchorConfig::efficientdet(size, size),
            num_classes: None,
        }
    }

    /// The same anchors without the class check (evaluation reads ground truth it never
    /// trains on).
    pub fn any_class(mut self) -> LabelSpec {
        self.num_classes = None;
        self
    }

    /// The labeler for these anchors and classes.
    pub fn labeler(&self) -> anyhow::Result<Arc<Labeler>> {
        let labeler = Labeler::new(Anchors::new(&self.anchors)?);
        Ok(Arc::new(match self.num_classes {
            Some(k) => labeler.with_num_classes(k),
            None => labeler,
        }))
    }
}

/// The anchor set model `cfg` predicts for at a square `image_size` (D7's anchor scale is 5).
pub fn model_anchors(cfg: &Config, image_size: u32) -> AnchorConfig {
    let size = image_size as usize;
    AnchorConfig {
        min_level: cfg.fpn.min_level as u32,
        max_level: cfg.fpn.max_level as u32,
        num_scales: cfg.head.num_scales as u32,
        aspect_ratios: cfg.head.aspect_ratios.clone(),
        anchor_scale: cfg.head.anchor_scale,
        image_height: size,
        image_width: size,
    }
}

/// Starts a CPU-decoding loader whose labels follow `spec`.
pub fn start_loader(
    cfg: LoaderConfig,
    files: Vec<PathBuf>,
    spec: &LabelSpec,
) -> anyhow::Result<Loader> {
    let (h, w) = cfg.augment.image_size;
    anyhow::ensure!(
        (spec.anchors.image_height, spec.anchors.image_width) == (h as usize, w as usize),
        "anchors for {}x{} but images of {h}x{w}",
        spec.anchors.image_height,
        spec.anchors.image_width
    );
    Loader::start(cfg, files, spec.labeler()?, Arc::new(CpuDecoder))
}

/// Peak resident set size of this process in MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time (user + system) of this process so far, in seconds (Linux; 0 elsewhere).
pub fn cpu_seconds() -> f64 {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14th and 15th.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks_per_sec)
        })
        .unwrap_or(0.0)
}

/// How training batches reach the device (`train`, `bench-train`).
#[derive(clap::Args, Debug, Clone)]
pub struct FeedArgs {
    /// Batch feed: `auto` is the copy stream on CUDA and the simple feed on the CPU.
    #[arg(long, value_enum, default_value_t = super::step::FeedMode::Auto)]
    pub feed: super::step::FeedMode,
    /// Decode JPEGs on the GPU with nvJPEG (CUDA binary built with the nvjpeg feature): the
    /// loader's workers only read JPEG headers, sample the augmentation and make the labels.
    #[arg(long)]
    pub gpu_decode: bool,
}

impl Default for FeedArgs {
    fn default() -> FeedArgs {
        FeedArgs {
            feed: super::step::FeedMode::Auto,
            gpu_decode: false,
        }
    }
}

impl FeedArgs {
    /// Feed options with `depth` batches ahead; adjusts the loader for GPU decoding.
    pub fn apply(&self, lcfg: &mut LoaderConfig, depth: usize) -> super::step::FeedOptions {
        if self.gpu_decode {
            lcfg.defer_for_gpu();
        }
        super::step::FeedOptions {
            depth,
            mode: self.feed,
            gpu_decode: self.gpu_decode,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::train::load_config;

    #[test]
    fn labels_follow_the_models_anchors_and_classes() -> anyhow::Result<()> {
        // D0–D6 use automl's default anchors; D7's anchor scale is 5.
        let d0 = load_config("efficientdet-d0", &[])?;
        let spec = LabelSpec::for_model(&d0, 512);
        assert_eq!(spec.anchors, AnchorConfig::efficientdet(512, 512));
        assert_eq!(spec.num_classes, Some(90));
        assert_eq!(spec.clone().any_class().num_classes, None);
        let d7 = LabelSpec::for_model(&load_config("efficientdet-d7", &[])?, 1536);
        assert_eq!(d7.anchors.anchor_scale, 5.0);
        assert_eq!(
            (d7.anchors.image_height, d7.anchors.image_width),
            (1536, 1536)
        );
        // Overrides reach the labels: two aspect ratios and 3 classes.
        let sets = [
            "head.aspect_ratios=[1.0, 2.0]".to_string(),
            "head.num_classes=3".to_string(),
        ];
        let custom = LabelSpec::for_model(&load_config("efficientdet-d0", &sets)?, 256);
        let labeler = custom.labeler()?;
        assert_eq!(labeler.anchors().per_location(), 6);
        assert_eq!(custom.num_classes, Some(3));
        // A loader whose images and anchors disagree in size is refused.
        let cfg = LoaderConfig::new(Mode::Train, 256, 2);
        let err = start_loader(cfg, vec![], &spec).err().expect("refused");
        assert!(err.to_string().contains("512x512"), "{err}");
        Ok(())
    }

    #[test]
    fn the_image_size_defaults_to_the_models() {
        let mut d = DataArgs::for_paths(vec!["x".into()], 256);
        // --image-size given: it wins.
        assert_eq!(d.sized_for(896).image_size(), 256);
        // Not given: the model's size (D3: 896), or 512 without a model.
        d.image_size = None;
        assert_eq!(d.sized_for(896).image_size(), 896);
        assert_eq!(d.image_size(), DEFAULT_IMAGE_SIZE);
        let lcfg = d.sized_for(896).loader_config(Mode::Train, 2);
        assert_eq!(lcfg.augment.image_size, (896, 896));
    }
}
