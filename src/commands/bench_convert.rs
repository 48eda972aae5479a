//! `effdet bench-convert`: times the COCO → TFRecord converter on a dataset repeated N times
//! (to get seconds of work from a small set) next to the raw read rate of the same files.

use std::path::PathBuf;
use std::time::Instant;

use effdet_pipeline::coco::convert::{convert, ConvertOptions};
use effdet_pipeline::coco::{load_json, InstancesFile};

#[derive(clap::Args)]
pub struct Args {
    /// Directory containing the images.
    #[arg(long)]
    image_dir: PathBuf,
    /// Instances JSON.
    #[arg(long)]
    annotations: PathBuf,
    /// How many times the image list is repeated.
    #[arg(long, default_value_t = 20)]
    repeat: usize,
    #[arg(long, default_value_t = 32)]
    num_shards: usize,
    #[arg(long)]
    include_masks: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let gt: InstancesFile = load_json(&a.annotations)?;
    let mut repeated = InstancesFile {
        categories: gt.categories.clone(),
        ..Default::default()
    };
    let max_id = gt.images.iter().map(|i| i.id).max().unwrap_or(0) + 1;
    for r in 0..a.repeat as u64 {
        for im in &gt.images {
            let mut im = im.clone();
            im.id += r * max_id;
            repeated.images.push(im);
        }
        for ann in &gt.annotations {
            let mut ann = ann.clone();
            ann.image_id += r * max_id;
            repeated.annotations.push(ann);
        }
    }
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("instances.json");
    std::fs::write(&json, serde_json::to_vec(&repeated)?)?;

    // Raw read rate of the same files, same order (page cache warm after the first pass).
    for im in &gt.images {
        std::fs::read(a.image_dir.join(&im.file_name))?;
    }
    let t = Instant::now();
    let mut bytes = 0u64;
    for im in &repeated.images {
        bytes += std::fs::read(a.image_dir.join(&im.file_name))?.len() as u64;
    }
    let read_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let summary = convert(
        &ConvertOptions {
            image_dir: a.image_dir.clone(),
            object_annotations_file: Some(json),
            caption_annotations_file: None,
            image_info_file: None,
            output_file_prefix: dir.path().join("out/train").to_string_lossy().into_owned(),
            num_shards: a.num_shards,
            include_masks: a.include_masks,
            num_threads: a.threads.unwrap_or(0),
        },
        &|_, _| {},
    )?;
    let conv_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "images": summary.images,
            "image_mb": bytes as f64 / 1e6,
            "include_masks": a.include_masks,
            "convert_seconds": conv_s,
            "convert_images_per_sec": summary.images as f64 / conv_s,
            "convert_mb_per_sec": summary.image_bytes as f64 / 1e6 / conv_s,
            "raw_read_seconds": read_s,
            "raw_read_images_per_sec": repeated.images.len() as f64 / read_s,
            "raw_read_mb_per_sec": bytes as f64 / 1e6 / read_s,
        })
    );
    Ok(0)
}
