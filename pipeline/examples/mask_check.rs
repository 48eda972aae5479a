//! Development tool for `coco::mask`: checks rasterization against externally produced
//! reference digests and times it on a COCO annotation set.
//!
//! ```text
//! mask_check verify <cases.json>       # [{"h","w","segmentation","ones","sha256"}, ...]
//! mask_check bench <coco_dir> [reps]    # all annotations of instances_{train,val}2017.json
//! ```

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use effdet_pipeline::coco::{load_json, mask, InstancesFile, Segmentation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Case {
    h: u32,
    w: u32,
    segmentation: Segmentation,
    ones: u64,
    sha256: String,
}

fn verify(path: &Path) -> anyhow::Result<()> {
    let cases: Vec<Case> = load_json(path)?;
    let mut bad = 0;
    for (i, c) in cases.iter().enumerate() {
        let m = mask::rasterize(&c.segmentation, c.h, c.w).with_context(|| format!("case {i}"))?;
        let ones = m.iter().map(|&v| v as u64).sum::<u64>();
        let sha = hex::encode(Sha256::digest(&m));
        if ones != c.ones || sha != c.sha256 {
            bad += 1;
            if bad <= 10 {
                eprintln!(
                    "case {i}: {}x{} ones {ones} expected {}: {}",
                    c.h,
                    c.w,
                    c.ones,
                    serde_json::to_string(&c.segmentation)?
                );
            }
        }
    }
    println!("{} of {} cases match", cases.len() - bad, cases.len());
    if bad > 0 {
        bail!("{bad} mismatches");
    }
    Ok(())
}

fn bench(dir: &Path, reps: usize) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for split in ["train2017", "val2017"] {
        let f: InstancesFile = load_json(&dir.join(format!("annotations/instances_{split}.json")))?;
        let sizes: std::collections::HashMap<u64, (u32, u32)> = f
            .images
            .iter()
            .map(|im| (im.id, (im.height, im.width)))
            .collect();
        for a in f.annotations {
            let (h, w) = sizes[&a.image_id];
            items.push((a.segmentation.context("no segmentation")?, h, w));
        }
    }
    // Rasterization alone (masks only kept alive), then with counting ones as the Python
    // reference benchmark does.
    let mut best_raster = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        for (seg, h, w) in &items {
            std::hint::black_box(mask::rasterize(seg, *h, *w)?);
        }
        best_raster = best_raster.min(t.elapsed().as_secs_f64());
    }
    println!(
        "rust rasterize only: best of {reps}: {:.1} ms ({:.1} us/annotation)",
        best_raster * 1e3,
        best_raster / items.len() as f64 * 1e6
    );
    let mut best = f64::INFINITY;
    let mut total = 0u64;
    for _ in 0..reps {
        let t = Instant::now();
        total = 0;
        for (seg, h, w) in &items {
            let m = mask::rasterize(seg, *h, *w)?;
            total += m.iter().map(|&v| v as u64).sum::<u64>();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "rust rasterize + count ones: {} annotations, best of {reps}: {:.1} ms ({:.1} us/annotation), total ones {total}",
        items.len(),
        best * 1e3,
        best / items.len() as f64 * 1e6
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["verify", path] => verify(Path::new(path)),
        ["bench", dir] => bench(Path::new(dir), 5),
        ["bench", dir, reps] => bench(Path::new(dir), reps.parse()?),
        _ => bail!("usage: mask_check verify <cases.json> | bench <coco_dir> [reps]"),
    }
}
