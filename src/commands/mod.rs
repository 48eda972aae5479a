//! One module per subcommand; each exposes `Args` (clap) and `run(Args) -> Result<exit code>`.

pub mod coco_eval;
pub mod inspect;
pub mod synth;
