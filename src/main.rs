//! `effdet`: the command-line front of the EfficientDet framework. Each subcommand lives in
//! its own module under `src/commands/`; the work itself is in the `pipeline` and `model` crates.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "effdet",
    version,
    about = "EfficientDet: data pipeline, training and evaluation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print TFRecord records as JSON, count them, or verify every CRC.
    Inspect(commands::inspect::Args),
    /// Generate a synthetic COCO-format dataset (JPEGs + instances JSON).
    SynthCoco(commands::synth::Args),
    /// Run the whole flow on a generated dataset (the README's first command).
    Quickstart(commands::quickstart::Args),
    /// Measure the input pipeline alone: images/s, per-stage time, peak memory.
    BenchPipeline(commands::bench_pipeline::Args),
    /// Time the COCO converter on a repeated dataset next to the raw file read rate.
    BenchConvert(commands::bench_convert::Args),
    /// Write the first batch (file order) as safetensors for cross-checking.
    DumpBatch(commands::dump_batch::Args),
    /// COCO box AP/AR (pycocotools-equivalent) of a detections JSON.
    CocoEval(commands::coco_eval::Args),
    /// Train a model (SGD + cosine schedule + EMA), with checkpoints and TensorBoard scalars.
    Train(commands::train::Args),
    /// COCO AP of a training checkpoint (EMA weights) on evaluation shards.
    Eval(commands::eval::Args),
    /// Detect objects in JPEG/PNG files with a checkpoint: detections.json + annotated PNGs.
    Predict(commands::predict::Args),
    /// Training-step throughput on the CPU or a CUDA GPU: images/s, step and data-wait time.
    BenchTrain(commands::bench_train::Args),
    /// Check the CUDA build against the CPU: every own op, then the whole loss and gradients.
    CudaCheck(commands::cuda_check::Args),
}

fn main() {
    let cli = Cli::parse();
    // The commands that run the model (whose activations are freed and allocated again every
    // step); the pipeline-only ones keep glibc's defaults (their buffers are pooled already).
    if matches!(
        cli.command,
        Command::Quickstart(_)
            | Command::Train(_)
            | Command::Eval(_)
            | Command::Predict(_)
            | Command::BenchTrain(_)
            | Command::CudaCheck(_)
    ) {
        keep_freed_heap_memory();
    }
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::SynthCoco(a) => commands::synth::run(a),
        Command::Quickstart(a) => commands::quickstart::run(a),
        Command::BenchPipeline(a) => commands::bench_pipeline::run(a),
        Command::BenchConvert(a) => commands::bench_convert::run(a),
        Command::DumpBatch(a) => commands::dump_batch::run(a),
        Command::CocoEval(a) => commands::coco_eval::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Predict(a) => commands::predict::run(a),
        Command::BenchTrain(a) => commands::bench_train::run(a),
        Command::CudaCheck(a) => commands::cuda_check::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Keeps freed heap memory in the process instead of handing it back to the kernel, as
/// PyTorch's caching allocator (and our CUDA memory pool) do. By default glibc serves large
/// blocks with fresh `mmap`s and trims the heap's top whenever 128 KB+ lie free there, so every
/// training step's activations are faulted in again page by page, inside parallel ops whose
/// threads then contend for the page tables: the BiFPN's `[2, 64, 64, 64]` depthwise forward took
/// 2.3 ms per call in a CPU step and 0.4–0.5 ms with this, and a D0 step took ~5 % less time
/// (BENCHMARKS.md). Peak RSS is unchanged; memory is simply not given back until exit.
/// `EFFDET_MALLOC_TRIM=1` keeps glibc's defaults (for comparison).
fn keep_freed_heap_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("EFFDET_MALLOC_TRIM").as_deref() != Ok("1") {
        // SAFETY: mallopt only changes allocator parameters; it is called before the command
        // starts any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
