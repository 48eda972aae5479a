//! Shared data-loading options of the subcommands that read shards, and loader construction.

use std::path::PathBuf;
use std::sync::Arc;

use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::augment::Mode;
use effdet_pipeline::decode::CpuDecoder;
use effdet_pipeline::labeler::Labeler;
use effdet_pipeline::loader::{ImageDtype, Loader, LoaderConfig};
use effdet_pipeline::tfrecord::expand_paths;

#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Shard directory, file or glob (repeatable).
    #[arg(long = "data", required = true)]
    pub data: Vec<String>,
    /// Output image size (square).
    #[arg(long, default_value_t = 512)]
    pub image_size: u32,
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
            image_size,
            threads: None,
            seed: 0,
            prefetch: 2,
            image_dtype: DtypeArg::F32,
            shuffle_buffer: 64,
            rank: 0,
            world_size: 1,
        }
    }

    pub fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let files = expand_paths(&self.data)?;
        anyhow::ensure!(!files.is_empty(), "no shard files in {:?}", self.data);
        Ok(files)
    }

    pub fn loader_config(&self, mode: Mode, batch_size: usize) -> LoaderConfig {
        let mut cfg = LoaderConfig::new(mode, self.image_size, batch_size);
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

/// The automl labeler for a square image size.
pub fn labeler(image_size: u32) -> anyhow::Result<Arc<Labeler>> {
    let size = image_size as usize;
    Ok(Arc::new(Labeler::new(Anchors::new(
        &AnchorConfig::efficientdet(size, size),
    )?)))
}

/// Starts a CPU-decoding loader.
pub fn start_loader(cfg: LoaderConfig, files: Vec<PathBuf>) -> anyhow::Result<Loader> {
    let labeler = labeler(cfg.augment.image_size.0)?;
    Loader::start(cfg, files, labeler, Arc::new(CpuDecoder))
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
