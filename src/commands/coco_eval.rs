//! `effdet coco-eval`: COCO box AP/AR of a results file against an instances file, printed
//! as one JSON object with pycocotools' twelve summary numbers.

use std::path::PathBuf;

use anyhow::Context;
use effdet_pipeline::coco::eval::{evaluate, evaluate_on_images, load_detections};
use effdet_pipeline::coco::{load_json, InstancesFile};

#[derive(clap::Args)]
pub struct Args {
    /// Ground truth `instances_*.json`.
    #[arg(long)]
    annotations: PathBuf,
    /// Results file: JSON list of {image_id, category_id, bbox [x,y,w,h], score}.
    #[arg(long)]
    detections: PathBuf,
    /// Evaluate only the images that have at least one detection (what automl's evaluator
    /// does) instead of every image in the annotations.
    #[arg(long)]
    only_detected_images: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let gt: InstancesFile = load_json(&a.annotations)?;
    let dets = load_detections(&a.detections)?;
    let stats = if a.only_detected_images {
        let ids: Vec<u64> = dets.iter().map(|d| d.image_id).collect();
        evaluate_on_images(&gt, &dets, &ids)
    } else {
        evaluate(&gt, &dets)
    }
    .with_context(|| format!("evaluating {}", a.detections.display()))?;
    println!("{}", serde_json::to_string(&stats)?);
    Ok(0)
}
