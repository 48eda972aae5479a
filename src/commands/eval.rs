//! `effdet eval`: COCO box AP of a training checkpoint. Eval-mode pipeline → forward with the
//! checkpoint's EMA weights (BN in inference mode) → automl post-processing per image with the
//! pipeline's anchors and image scales → COCO results JSON → pycocotools-equivalent stats,
//! printed as one JSON object.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor};
use effdet_model::postprocess::{postprocess_image, BoxYxyx, PostprocessConfig};
use effdet_model::{EfficientDet, ModelVars};
use effdet_pipeline::anchors::Anchors;
use effdet_pipeline::augment::Mode;
use effdet_pipeline::coco::eval::{evaluate, CocoStats, Detection};
use effdet_pipeline::coco::{load_json, InstancesFile};

use super::data::{start_loader, DataArgs, LabelSpec};
use super::step::BatchTensors;
use super::tensorboard::EventWriter;
use super::train::{load_ema_weights, CheckpointMeta};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// `ckpt-STEP.safetensors` written by `effdet train` (its `.json` side file is read too).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Ground truth `instances_*.json` of the evaluated shards.
    #[arg(long)]
    pub annotations: PathBuf,
    /// Write the COCO results JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not append the stats as TensorBoard scalars (`eval/AP`, …) at the checkpoint's step
    /// to the event files of the checkpoint's run directory.
    #[arg(long)]
    pub no_events: bool,
    /// Run the model on the CPU or the first CUDA GPU (CUDA builds).
    #[arg(long, value_enum, default_value_t = super::bench_train::DeviceArg::Cpu)]
    pub device: super::bench_train::DeviceArg,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

/// Stats plus throughput.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalSummary {
    pub stats: CocoStats,
    pub images: usize,
    pub detections: usize,
    pub images_per_sec: f64,
    /// The size the images were evaluated at (by default the checkpoint's training size).
    pub image_size: u32,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let s = eval(&a)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(0)
}

fn meta_of(ckpt: &Path) -> anyhow::Result<CheckpointMeta> {
    let p = ckpt.with_extension("json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

pub fn eval(a: &Args) -> anyhow::Result<EvalSummary> {
    let dev = super::bench_train::device(a.device)?;
    let meta = meta_of(&a.checkpoint)?;
    let meta_step = meta.step;
    let cfg = meta.config;
    let gt: InstancesFile = load_json(&a.annotations)?;
    let vars = ModelVars::new(&dev, 0);
    let model = EfficientDet::new(&cfg, &vars)?;
    load_ema_weights(&a.checkpoint, &vars, &dev)?;

    // The model's own anchors (D7's anchor scale differs); the ground truth is never trained
    // on, so any class id passes.
    // The checkpoint's training size unless --image-size asks for another.
    let data = a.data.sized_for(meta.image_size);
    let spec = LabelSpec::for_model(&cfg, data.image_size()).any_class();
    let anchors = Anchors::new(&spec.anchors)?;
    let anchor_boxes: Vec<BoxYxyx> = anchors
        .boxes()
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    let k = cfg.head.num_classes;
    let pp = PostprocessConfig::automl_eval(k);

    let lcfg = data.loader_config(Mode::Eval, a.batch_size);
    let mut loader = start_loader(lcfg, data.files()?, &spec)?;
    let mut dets = Vec::new();
    let mut images = 0;
    let t = Instant::now();
    while let Some(b) = loader.next_batch() {
        let b = b?;
        let x = BatchTensors::from_batch(&b, &dev)?.images;
        let (cls, boxes) = model.forward(&x, false)?;
        // Per level [B, h, w, A·K] → [B, h·w·A, K]; levels concatenated = the anchors' order.
        let bs = b.batch_size;
        let flat = |ts: &[Tensor], per: usize| -> anyhow::Result<Tensor> {
            let parts = ts
                .iter()
                .map(|t| t.reshape((bs, (), per)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 1)?.to_dtype(DType::F32)?)
        };
        let cls = flat(&cls, k)?;
        let boxes = flat(&boxes, 4)?;
        anyhow::ensure!(
            cls.dim(1)? == anchor_boxes.len(),
            "model gives {} anchors, the anchor set {}",
            cls.dim(1)?,
            anchor_boxes.len()
        );
        for i in 0..b.len {
            let image_id = b.buffers().source_ids[i];
            // A hole: the record could not be read or decoded (logged by the loader).
            if image_id < 0 {
                continue;
            }
            images += 1;
            let c: Vec<f32> = cls.get(i)?.flatten_all()?.to_vec1()?;
            let r: Vec<f32> = boxes.get(i)?.flatten_all()?.to_vec1()?;
            let scale = b.buffers().image_scales[i];
            for d in postprocess_image(&c, &r, &anchor_boxes, scale, &pp)? {
                dets.push(Detection {
                    image_id: image_id as u64,
                    category_id: d.category_id,
                    bbox: d.bbox.map(|v| v as f64),
                    score: d.score as f64,
                });
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string(&dets)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    let stats = evaluate(&gt, &dets)?;
    if !a.no_events {
        if let Some(run_dir) = a.checkpoint.parent() {
            let run_dir = if run_dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                run_dir
            };
            let mut w = EventWriter::create(run_dir)?;
            let named: Vec<(String, f64)> = serde_json::to_value(stats)?
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((format!("eval/{k}"), v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            let scalars: Vec<(&str, f64)> = named.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            w.scalars(meta_step, &scalars)?;
            w.flush()?;
        }
    }
    Ok(EvalSummary {
        stats,
        images,
        detections: dets.len(),
        images_per_sec: images as f64 / secs,
        image_size: data.image_size(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::train::{tests as t, train};

    /// Train two steps, evaluate every image of the split: one results entry per kept
    /// detection, ids from the annotations, stats in range.
    #[test]
    fn evaluates_a_checkpoint() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = t::shards(dir.path(), 8)?;
        let s = train(&t::args(&data, &dir.path().join("run"), 2))?;
        let ckpt = s.checkpoint.expect("checkpoint");
        let ann = dir.path().join("coco/annotations/instances_train.json");
        let ann = if ann.exists() {
            ann
        } else {
            glob::glob(&format!("{}/coco/**/*.json", dir.path().display()))?
                .next()
                .expect("annotations")?
        };
        let out = dir.path().join("dets.json");
        let mut d = DataArgs::for_paths(vec![data.to_string_lossy().into_owned()], 64);
        d.threads = Some(1);
        // Without --image-size the checkpoint's training size (64) is used, not 512.
        d.image_size = None;
        let e = eval(&Args {
            checkpoint: ckpt.clone(),
            data: d,
            annotations: ann.clone(),
            out: Some(out.clone()),
            batch_size: 3,
            no_events: false,
            device: crate::commands::bench_train::DeviceArg::Cpu,
        })?;
        assert_eq!(e.images, 8);
        assert_eq!(e.image_size, 64);
        // The stats were appended as TensorBoard scalars at the checkpoint's step (a second
        // event file beside the training run's, whose events are untouched).
        let events: Vec<_> = std::fs::read_dir(dir.path().join("run"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("tfevents"))
            .map(|e| std::fs::read(e.path()))
            .collect::<std::io::Result<_>>()?;
        assert_eq!(events.len(), 2, "train and eval event files");
        let has = |needle: &[u8]| {
            events
                .iter()
                .any(|b| b.windows(needle.len()).any(|w| w == needle))
        };
        assert!(has(b"eval/AP50") && has(b"images_per_sec"));
        let dets: Vec<Detection> = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        assert_eq!(dets.len(), e.detections);
        let gt: InstancesFile = load_json(&ann)?;
        for d in &dets {
            assert!(gt.images.iter().any(|i| i.id == d.image_id), "{d:?}");
            assert!((1..=3).contains(&d.category_id), "{d:?}");
        }
        assert!((0.0..=1.0).contains(&e.stats.ap) || e.stats.ap == -1.0);
        // A checkpoint without its side file is a clear error.
        std::fs::remove_file(ckpt.with_extension("json"))?;
        let mut d = DataArgs::for_paths(vec![data.to_string_lossy().into_owned()], 64);
        d.threads = Some(1);
        let err = eval(&Args {
            checkpoint: ckpt,
            data: d,
            annotations: ann,
            out: None,
            batch_size: 3,
            no_events: true,
            device: crate::commands::bench_train::DeviceArg::Cpu,
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains(".json"), "{err:#}");
        Ok(())
    }
}
