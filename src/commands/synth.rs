//! `effdet synth-coco`: writes a synthetic COCO-format split.

use std::path::PathBuf;

use effdet_pipeline::coco::synth::{generate, SynthOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Output directory (gets `<split>/` images and `annotations/instances_<split>.json`).
    #[arg(long)]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    images: usize,
    /// Random seed; the same seed gives the same files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Split name.
    #[arg(long, default_value = "train")]
    split: String,
    /// Smallest image side in pixels.
    #[arg(long, default_value_t = 160)]
    min_side: u32,
    /// Largest image side in pixels.
    #[arg(long, default_value_t = 320)]
    max_side: u32,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let out = generate(
        &a.out,
        &SynthOptions {
            images: a.images,
            seed: a.seed,
            min_side: a.min_side,
            max_side: a.max_side,
            split: a.split,
            ..Default::default()
        },
    )?;
    println!(
        "{}",
        serde_json::json!({
            "image_dir": out.image_dir,
            "annotations": out.annotations,
            "images": a.images,
            "objects": out.objects,
        })
    );
    Ok(0)
}
