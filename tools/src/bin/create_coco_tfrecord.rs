//! Converts COCO images and annotations to TFRecord shards that google/automl's EfficientDet
//! reads unchanged. Flags have the names of automl's `dataset/create_coco_tfrecord.py`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use effdet_pipeline::coco::convert::{convert, ConvertOptions};

#[derive(Parser, Debug)]
#[command(
    name = "create_coco_tfrecord",
    about = "Convert COCO to TFRecord shards (automl-compatible features and shard names)"
)]
struct Args {
    /// Directory containing the images.
    #[arg(long = "image_dir")]
    image_dir: PathBuf,
    /// Instances JSON (boxes and masks).
    #[arg(long = "object_annotations_file")]
    object_annotations_file: Option<PathBuf>,
    /// Captions JSON.
    #[arg(long = "caption_annotations_file")]
    caption_annotations_file: Option<PathBuf>,
    /// JSON whose `images` list sets the examples and their order (default: the object
    /// annotations file, else the captions file).
    #[arg(long = "image_info_file")]
    image_info_file: Option<PathBuf>,
    /// Output prefix: shards are PREFIX-00000-of-000NN.tfrecord.
    #[arg(long = "output_file_prefix", default_value = "/tmp/train")]
    output_file_prefix: String,
    /// Number of output shards.
    #[arg(long = "num_shards", default_value_t = 32)]
    num_shards: usize,
    /// Include PNG instance masks (`image/object/mask`).
    #[arg(long = "include_masks", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    include_masks: bool,
    /// Worker threads (default: all cores).
    #[arg(long = "num_threads")]
    num_threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let opts = ConvertOptions {
        image_dir: args.image_dir,
        object_annotations_file: args.object_annotations_file,
        caption_annotations_file: args.caption_annotations_file,
        image_info_file: args.image_info_file,
        output_file_prefix: args.output_file_prefix,
        num_shards: args.num_shards,
        include_masks: args.include_masks,
        num_threads: args.num_threads.unwrap_or(0),
    };
    let bar = effdet_tools::progress_bar(0, "images");
    let started = std::time::Instant::now();
    let summary = convert(&opts, &|done, total| {
        if bar.length() != Some(total) {
            bar.set_length(total);
        }
        bar.set_position(done);
    })
    .context("conversion failed")?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} images ({} annotations, {} skipped) to {} shards in {:.2}s: {:.1} images/s, {:.1} MB/s of image data",
        summary.images,
        summary.annotations_written,
        summary.annotations_skipped,
        summary.shards.len(),
        secs,
        summary.images as f64 / secs,
        summary.image_bytes as f64 / 1e6 / secs
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
