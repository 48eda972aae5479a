//! One module per subcommand; each exposes `Args` (clap) and `run(Args) -> Result<exit code>`.

pub mod bench_convert;
pub mod bench_pipeline;
pub mod bench_train;
pub mod coco_eval;
pub mod cuda_check;
#[cfg(feature = "cuda")]
pub mod cuda_feed;
pub mod data;
pub mod dump_batch;
pub mod eval;
pub mod inspect;
pub mod predict;
pub mod quickstart;
pub mod step;
pub mod synth;
pub mod tensorboard;
pub mod train;
