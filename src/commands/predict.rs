//! `effdet predict`: detections on ordinary image files with a training checkpoint.
//!
//! Each image is decoded with the pipeline's CPU decoder, preprocessed by the very functions
//! the eval pipeline uses (`ScaleParams::eval` + `render_image` at the checkpoint's image size:
//! fit, normalize, pad bottom/right), run through the network with the EMA weights (BN in
//! inference mode) and post-processed like `effdet eval` (automl's eval settings, boxes scaled
//! back by the inverse image scale). Only then are boxes clipped to the original image and cut
//! at the score threshold. Output: `DIR/detections.json` (COCO `xywh` boxes in original
//! pixels, written atomically) and one PNG per image with the boxes and labels drawn in, using
//! the 8×8 bitmap font of the `font8x8` crate.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use effdet_model::postprocess::{postprocess_image, BoxYxyx, Detection, PostprocessConfig};
use effdet_model::{EfficientDet, ModelVars};
use effdet_pipeline::anchors::Anchors;
use effdet_pipeline::augment::{render_image, AugmentConfig, ImageWorkspace, ScaleParams};
use effdet_pipeline::decode::{CpuDecoder, DecodedImage, ImageDecoder};
use image::{Rgb, RgbImage};

use super::train::{load_ema_weights, CheckpointMeta};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// `ckpt-STEP.safetensors` written by `effdet train` (its `.json` side file is read too).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Image files (JPEG or PNG), directories (their *.jpg, *.jpeg, *.png) or globs.
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// Output directory: detections.json and one annotated PNG per image.
    #[arg(long)]
    pub out: PathBuf,
    /// Keep detections scoring at least this much.
    #[arg(long, default_value_t = 0.3)]
    pub score_threshold: f32,
    /// Detections per image after NMS (before the score threshold).
    #[arg(long, default_value_t = 100)]
    pub max_detections: usize,
    /// Category names: `coco` (built-in COCO 2017 table) or a JSON file, either a COCO
    /// instances file (its "categories") or an {"id": "name"} object.
    #[arg(long, default_value = "coco")]
    pub class_names: String,
}

/// One kept detection in original-image pixels.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PredDetection {
    /// COCO `[x, y, width, height]`.
    pub bbox: [f32; 4],
    pub score: f32,
    pub category_id: i64,
    pub category_name: String,
}

/// The detections of one input image (one entry of `detections.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageResult {
    pub file: String,
    pub width: u32,
    pub height: u32,
    /// File name of the annotated image inside the output directory.
    pub output: String,
    pub detections: Vec<PredDetection>,
}

/// An input that could not be read or decoded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub file: String,
    pub error: String,
}

/// What a run did (printed as JSON by the command).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictSummary {
    pub images: usize,
    pub detections: usize,
    pub skipped: Vec<Skipped>,
    pub detections_json: PathBuf,
    pub images_per_sec: f64,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let s = predict(&a)?;
    println!("{}", serde_json::to_string(&s)?);
    if s.images == 0 {
        eprintln!(
            "error: none of the {} inputs could be read",
            s.skipped.len()
        );
        return Ok(1);
    }
    Ok(0)
}

/// The network with its EMA weights plus everything needed to turn an image into detections.
pub struct Predictor {
    _vars: ModelVars,
    model: EfficientDet,
    dev: Device,
    augment: AugmentConfig,
    anchors: Vec<BoxYxyx>,
    post: PostprocessConfig,
    ws: ImageWorkspace,
    input: Vec<f32>,
}

impl Predictor {
    /// Loads a checkpoint of `effdet train`: config and image size from the side file, EMA
    /// weights from the safetensors file.
    pub fn load(checkpoint: &Path, max_detections: usize) -> anyhow::Result<Predictor> {
        anyhow::ensure!(
            checkpoint.is_file(),
            "checkpoint {} does not exist",
            checkpoint.display()
        );
        anyhow::ensure!(max_detections > 0, "--max-detections must be at least 1");
        let side = checkpoint.with_extension("json");
        let text = std::fs::read_to_string(&side).with_context(|| {
            format!(
                "reading the checkpoint's side file {} (written next to it by effdet train)",
                side.display()
            )
        })?;
        let meta: CheckpointMeta =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", side.display()))?;
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 0);
        let model = EfficientDet::new(&meta.config, &vars)?;
        load_ema_weights(checkpoint, &vars, &dev)?;
        let size = meta.image_size;
        let s = size as usize;
        let anchors = Anchors::new(&super::data::model_anchors(&meta.config, size))?
            .boxes()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect();
        let mut post = PostprocessConfig::automl_eval(meta.config.head.num_classes);
        post.max_detections = max_detections;
        Ok(Predictor {
            _vars: vars,
            model,
            dev,
            augment: AugmentConfig::d0(size),
            anchors,
            post,
            ws: ImageWorkspace::default(),
            input: vec![0.0; 3 * s * s],
        })
    }

    /// Detections of one image in its original pixels, best first, exactly as `effdet eval`
    /// computes them (no score threshold, no clipping).
    pub fn detect(&mut self, img: &DecodedImage) -> anyhow::Result<Vec<Detection>> {
        let params = ScaleParams::eval(img.height, img.width, &self.augment);
        render_image(img, &params, &self.augment, &mut self.ws, &mut self.input)?;
        let (h, w) = self.augment.image_size;
        let x = Tensor::from_slice(&self.input, (1, 3, h as usize, w as usize), &self.dev)?;
        let (cls, boxes) = self.model.forward(&x, false)?;
        // Per level [1, h, w, A·K] → [h·w·A, K]; levels concatenated = the anchors' order.
        let flat = |ts: &[Tensor], per: usize| -> anyhow::Result<Vec<f32>> {
            let parts = ts
                .iter()
                .map(|t| t.reshape(((), per)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        let k = self.post.num_classes;
        let cls = flat(&cls, k)?;
        let boxes = flat(&boxes, 4)?;
        anyhow::ensure!(
            cls.len() == self.anchors.len() * k,
            "model gives {} anchors, the anchor set {}",
            cls.len() / k,
            self.anchors.len()
        );
        // The loader's scale (original / network pixels), as eval passes it.
        let scale = 1.0 / params.image_scale;
        Ok(postprocess_image(
            &cls,
            &boxes,
            &self.anchors,
            scale,
            &self.post,
        )?)
    }
}

/// Keeps detections scoring at least `threshold`, clipped to the `width × height` image
/// (boxes left with no area are dropped), with their category names.
pub fn finalize(
    dets: &[Detection],
    width: u32,
    height: u32,
    threshold: f32,
    names: &ClassNames,
) -> Vec<PredDetection> {
    let (w, h) = (width as f32, height as f32);
    dets.iter()
        .filter(|d| d.score >= threshold)
        .filter_map(|d| {
            let [x, y, bw, bh] = d.bbox;
            let (x0, y0) = (x.clamp(0.0, w), y.clamp(0.0, h));
            let (x1, y1) = ((x + bw).clamp(0.0, w), (y + bh).clamp(0.0, h));
            (x1 > x0 && y1 > y0).then(|| PredDetection {
                bbox: [x0, y0, x1 - x0, y1 - y0],
                score: d.score,
                category_id: d.category_id,
                category_name: names.name(d.category_id),
            })
        })
        .collect()
}

pub fn predict(a: &Args) -> anyhow::Result<PredictSummary> {
    anyhow::ensure!(
        a.score_threshold.is_finite(),
        "--score-threshold must be a number"
    );
    let names = ClassNames::load(&a.class_names)?;
    let mut predictor = Predictor::load(&a.checkpoint, a.max_detections)?;
    let files = expand_inputs(&a.inputs)?;
    anyhow::ensure!(!files.is_empty(), "no images found in {:?}", a.inputs);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;

    let bar = effdet_tools::progress_bar(files.len() as u64, "images");
    if files.len() < 2 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    let mut used_names = HashSet::new();
    let mut decoded = DecodedImage::default();
    let t = Instant::now();
    for f in &files {
        let file = f.display().to_string();
        match predict_one(f, &mut predictor, &mut decoded, a, &names, &mut used_names) {
            Ok(r) => results.push(r),
            Err(e) => {
                let error = format!("{e:#}");
                bar.suspend(|| eprintln!("warning: skipping {file}: {error}"));
                skipped.push(Skipped { file, error });
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();

    let path = a.out.join("detections.json");
    let tmp = a.out.join(".detections.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(PredictSummary {
        images: results.len(),
        detections: results.iter().map(|r| r.detections.len()).sum(),
        skipped,
        detections_json: path,
        images_per_sec: results.len() as f64 / secs.max(1e-9),
    })
}

fn predict_one(
    f: &Path,
    predictor: &mut Predictor,
    decoded: &mut DecodedImage,
    a: &Args,
    names: &ClassNames,
    used_names: &mut HashSet<String>,
) -> anyhow::Result<ImageResult> {
    let bytes = std::fs::read(f).context("cannot read the file")?;
    CpuDecoder
        .decode_into(&bytes, decoded)
        .context("cannot decode the image")?;
    let dets = predictor.detect(decoded)?;
    let kept = finalize(
        &dets,
        decoded.width,
        decoded.height,
        a.score_threshold,
        names,
    );
    let mut canvas = RgbImage::from_raw(decoded.width, decoded.height, decoded.rgb.clone())
        .context("decoded buffer does not match its size")?;
    for d in &kept {
        draw_detection(&mut canvas, d);
    }
    let output = output_name(f, used_names);
    let out_path = a.out.join(&output);
    canvas
        .save_with_format(&out_path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", out_path.display()))?;
    Ok(ImageResult {
        file: f.display().to_string(),
        width: decoded.width,
        height: decoded.height,
        output,
        detections: kept,
    })
}

/// `<stem>.png`, with `-2`, `-3`, … appended when two inputs share a stem.
fn output_name(f: &Path, used: &mut HashSet<String>) -> String {
    let stem = f
        .file_stem()
        .map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned());
    let mut name = format!("{stem}.png");
    let mut n = 2;
    while !used.insert(name.clone()) {
        name = format!("{stem}-{n}.png");
        n += 1;
    }
    name
}

fn is_image_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

/// Files to process, in argument order: a directory gives its JPEG/PNG files (sorted, not
/// recursive), a glob its matches (sorted), anything else is taken as a file (a missing one
/// is reported as a skipped image later).
pub fn expand_inputs(inputs: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for s in inputs {
        let p = Path::new(s);
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("listing {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_image_file(p))
                .collect();
            v.sort();
            if v.is_empty() {
                eprintln!("warning: no .jpg/.jpeg/.png files in {}", p.display());
            }
            files.extend(v);
        } else if !p.exists() && s.contains(['*', '?', '[']) {
            let mut v = glob::glob(s)
                .with_context(|| format!("bad glob pattern {s}"))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("expanding {s}"))?;
            v.retain(|p| p.is_file());
            v.sort();
            if v.is_empty() {
                eprintln!("warning: no files match {s}");
            }
            files.extend(v);
        } else {
            files.push(p.to_path_buf());
        }
    }
    Ok(files)
}

/// COCO 2017's 80 detection categories by id (ids 1..=90 with gaps).
const COCO_NAMES: [(i64, &str); 80] = [
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
];

/// Category id → name; ids without a name print as `class N`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassNames(BTreeMap<i64, String>);

impl ClassNames {
    /// The built-in COCO 2017 table.
    pub fn coco() -> ClassNames {
        ClassNames(
            COCO_NAMES
                .iter()
                .map(|&(id, n)| (id, n.to_string()))
                .collect(),
        )
    }

    /// `coco` → the built-in table; otherwise a JSON file: a COCO instances file (its
    /// `categories`) or an `{"id": "name"}` object. The file replaces the table.
    pub fn load(spec: &str) -> anyhow::Result<ClassNames> {
        if spec == "coco" {
            return Ok(ClassNames::coco());
        }
        let text =
            std::fs::read_to_string(spec).with_context(|| format!("reading class names {spec}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing class names {spec}"))?;
        ClassNames::from_json(&v).with_context(|| format!("class names {spec}"))
    }

    pub fn from_json(v: &serde_json::Value) -> anyhow::Result<ClassNames> {
        let obj = v
            .as_object()
            .context("expected a JSON object (COCO instances or {\"id\": \"name\"})")?;
        let mut m = BTreeMap::new();
        if let Some(cats) = obj.get("categories") {
            #[derive(serde::Deserialize)]
            struct Cat {
                id: i64,
                name: String,
            }
            let cats: Vec<Cat> = serde_json::from_value(cats.clone())
                .context("\"categories\" entries need id and name")?;
            for c in cats {
                m.insert(c.id, c.name);
            }
        } else {
            for (k, name) in obj {
                let id: i64 = k
                    .trim()
                    .parse()
                    .with_context(|| format!("key {k:?} is not an integer category id"))?;
                let name = name
                    .as_str()
                    .with_context(|| format!("name of id {k} is not a string"))?;
                m.insert(id, name.to_string());
            }
        }
        Ok(ClassNames(m))
    }

    pub fn name(&self, id: i64) -> String {
        self.0
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("class {id}"))
    }
}

/// A bright colour per category: hues spaced by the golden ratio so neighbouring ids differ.
pub fn class_colour(id: i64) -> Rgb<u8> {
    let h = (id as f64 * 0.618_033_988_749_895).rem_euclid(1.0) * 6.0;
    let (s, v) = (0.85, 0.95);
    let i = h.floor();
    let f = h - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i as u32 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    Rgb([r, g, b].map(|c| (c * 255.0).round() as u8))
}

/// Fills the inclusive pixel rectangle `(x0, y0)..=(x1, y1)`, clipped to the image.
fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for y in y0.max(0)..=y1.min(h - 1) {
        for x in x0.max(0)..=x1.min(w - 1) {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// Outline of the inclusive rectangle, `thickness` pixels wide, drawn inwards.
fn draw_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, thickness: i64, c: Rgb<u8>) {
    let t = thickness - 1;
    fill_rect(img, x0, y0, x1, y0 + t, c);
    fill_rect(img, x0, y1 - t, x1, y1, c);
    fill_rect(img, x0, y0, x0 + t, y1, c);
    fill_rect(img, x1 - t, y0, x1, y1, c);
}

/// Writes ASCII text with the 8×8 font, top-left at `(x, y)`; other characters print as `?`.
fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, c: Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for (i, ch) in text.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                // Bit 0 is the leftmost pixel of the row.
                if bits >> col & 1 == 1 {
                    let (px, py) = (x + i as i64 * 8 + col, y + row as i64);
                    if (0..w).contains(&px) && (0..h).contains(&py) {
                        img.put_pixel(px as u32, py as u32, c);
                    }
                }
            }
        }
    }
}

/// Box thickness and label height in pixels.
const LINE: i64 = 2;
const LABEL_H: i64 = 10;

/// Draws a detection: a 2-px rectangle in the class colour and a filled label "name 0.87"
/// above it (inside the box when there is no room above), kept within the image.
pub fn draw_detection(img: &mut RgbImage, d: &PredDetection) {
    let c = class_colour(d.category_id);
    let [x, y, bw, bh] = d.bbox;
    let x0 = x.floor() as i64;
    let y0 = y.floor() as i64;
    let x1 = ((x + bw).ceil() as i64 - 1).max(x0);
    let y1 = ((y + bh).ceil() as i64 - 1).max(y0);
    draw_rect(img, x0, y0, x1, y1, LINE, c);

    let label = format!("{} {:.2}", d.category_name, d.score);
    let lw = label.chars().count() as i64 * 8 + 2;
    let ly = if y0 >= LABEL_H { y0 - LABEL_H } else { y0 };
    let lx = x0.min(img.width() as i64 - lw).max(0);
    fill_rect(img, lx, ly, lx + lw - 1, ly + LABEL_H - 1, c);
    // Dark text on light colours, white on dark (Rec. 601 luma).
    let luma = 0.299 * c[0] as f32 + 0.587 * c[1] as f32 + 0.114 * c[2] as f32;
    let fg = if luma > 140.0 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    };
    draw_text(img, lx + 1, ly + 1, &label, fg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::data::DataArgs;
    use crate::commands::eval;
    use crate::commands::train::{tests as t, train};
    use effdet_pipeline::coco::{load_json, InstancesFile};

    fn args(ckpt: &Path, inputs: Vec<String>, out: &Path) -> Args {
        Args {
            checkpoint: ckpt.to_path_buf(),
            inputs,
            out: out.to_path_buf(),
            score_threshold: 0.0,
            max_detections: 100,
            class_names: "coco".into(),
        }
    }

    /// One tiny checkpoint (2 steps, 64 px, 3 classes): `detect` gives exactly eval's
    /// detections for the same JPEG; `predict` on a directory with 2 JPEGs, a grayscale PNG
    /// and a corrupt file writes clipped xywh boxes, skips the corrupt one and writes
    /// annotated PNGs of the original sizes; bad checkpoints and all-failed runs are errors.
    #[test]
    fn predicts_like_eval_and_writes_outputs() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = t::shards(dir.path(), 4)?;
        let s = train(&t::args(&data, &dir.path().join("run"), 2))?;
        let ckpt = s.checkpoint.expect("checkpoint");
        let ann = dir.path().join("coco/annotations/instances_train.json");
        let gt: InstancesFile = load_json(&ann)?;

        // Same numbers as effdet eval (batch 1 there, so the forward is the same shape).
        let eval_out = dir.path().join("eval.json");
        let mut d = DataArgs::for_paths(vec![data.to_string_lossy().into_owned()], 64);
        d.threads = Some(1);
        eval::eval(&eval::Args {
            checkpoint: ckpt.clone(),
            data: d,
            annotations: ann.clone(),
            out: Some(eval_out.clone()),
            no_events: true,
            device: crate::commands::bench_train::DeviceArg::Cpu,
            batch_size: 1,
        })?;
        let eval_dets: Vec<effdet_pipeline::coco::eval::Detection> =
            serde_json::from_str(&std::fs::read_to_string(&eval_out)?)?;
        let mut p = Predictor::load(&ckpt, 100)?;
        let mut img = DecodedImage::default();
        let mut compared = 0;
        for info in &gt.images {
            let path = dir.path().join("coco/train").join(&info.file_name);
            CpuDecoder
                .decode_into(&std::fs::read(&path)?, &mut img)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let ours = p.detect(&img)?;
            let theirs: Vec<_> = eval_dets.iter().filter(|d| d.image_id == info.id).collect();
            assert_eq!(ours.len(), theirs.len(), "{}", info.file_name);
            assert!(!ours.is_empty());
            for (o, e) in ours.iter().zip(&theirs) {
                assert_eq!(o.category_id, e.category_id);
                assert_eq!(o.score as f64, e.score);
                assert_eq!(o.bbox.map(|v| v as f64), e.bbox);
            }
            compared += 1;
        }
        assert_eq!(compared, 4);

        // A directory of inputs: 2 synthetic JPEGs, a grayscale PNG, a corrupt "JPEG".
        let inputs = dir.path().join("inputs");
        std::fs::create_dir_all(&inputs)?;
        for info in gt.images.iter().take(2) {
            std::fs::copy(
                dir.path().join("coco/train").join(&info.file_name),
                inputs.join(&info.file_name),
            )?;
        }
        let gray = image::GrayImage::from_fn(90, 40, |x, y| image::Luma([(x * 2 + y) as u8]));
        gray.save(inputs.join("gray.png"))?;
        std::fs::write(inputs.join("broken.jpg"), [0xFF, 0xD8, 0xFF, 0x00, 1, 2, 3])?;
        std::fs::write(inputs.join("notes.txt"), "not an image")?;
        let out = dir.path().join("pred");
        let s = predict(&args(
            &ckpt,
            vec![inputs.to_string_lossy().into_owned()],
            &out,
        ))?;
        assert_eq!(s.images, 3);
        assert_eq!(s.skipped.len(), 1);
        assert!(s.skipped[0].file.ends_with("broken.jpg"), "{:?}", s.skipped);
        let results: Vec<ImageResult> =
            serde_json::from_str(&std::fs::read_to_string(out.join("detections.json"))?)?;
        assert_eq!(results.len(), 3);
        assert!(!out.join(".detections.json.tmp").exists());
        let mut expected: Vec<(String, u32, u32)> = gt
            .images
            .iter()
            .take(2)
            .map(|i| (i.file_name.clone(), i.width, i.height))
            .collect();
        expected.push(("gray.png".into(), 90, 40));
        expected.sort();
        let mut got: Vec<(String, u32, u32)> = results
            .iter()
            .map(|r| {
                let name = Path::new(&r.file).file_name().unwrap();
                (name.to_string_lossy().into_owned(), r.width, r.height)
            })
            .collect();
        got.sort();
        assert_eq!(got, expected);
        let mut total = 0;
        for r in &results {
            let png = image::open(out.join(&r.output))?;
            assert_eq!(
                (png.width(), png.height()),
                (r.width, r.height),
                "{}",
                r.file
            );
            for d in &r.detections {
                let [x, y, w, h] = d.bbox;
                assert!(x >= 0.0 && y >= 0.0 && w > 0.0 && h > 0.0, "{d:?}");
                assert!(x + w <= r.width as f32 && y + h <= r.height as f32, "{d:?}");
                assert!((1..=3).contains(&d.category_id), "{d:?}");
                assert_eq!(d.category_name, ClassNames::coco().name(d.category_id));
                assert!((0.0..=1.0).contains(&d.score));
            }
            total += r.detections.len();
        }
        assert!(total > 0);
        assert_eq!(s.detections, total);

        // Threshold: nothing scores above 1.
        let mut a = args(
            &ckpt,
            vec![inputs.join("gray.png").to_string_lossy().into_owned()],
            &dir.path().join("pred2"),
        );
        a.score_threshold = 1.01;
        let s = predict(&a)?;
        assert_eq!((s.images, s.detections), (1, 0));

        // Every input failing is a non-zero exit; missing checkpoint / side file are errors.
        let a = args(
            &ckpt,
            vec![
                inputs.join("broken.jpg").to_string_lossy().into_owned(),
                inputs.join("missing.jpg").to_string_lossy().into_owned(),
            ],
            &dir.path().join("pred3"),
        );
        assert_eq!(run(a)?, 1);
        let e = predict(&args(
            &dir.path().join("nope.safetensors"),
            vec![inputs.to_string_lossy().into_owned()],
            &out,
        ))
        .unwrap_err();
        assert!(format!("{e:#}").contains("nope.safetensors"), "{e:#}");
        std::fs::remove_file(ckpt.with_extension("json"))?;
        let e = predict(&args(
            &ckpt,
            vec![inputs.to_string_lossy().into_owned()],
            &out,
        ))
        .unwrap_err();
        assert!(format!("{e:#}").contains(".json"), "{e:#}");
        Ok(())
    }

    #[test]
    fn coco_name_table() -> anyhow::Result<()> {
        let n = ClassNames::coco();
        assert_eq!(n.name(1), "person");
        assert_eq!(n.name(90), "toothbrush");
        assert_eq!(n.name(12), "class 12");
        assert_eq!(n.name(0), "class 0");
        assert_eq!(n.0.len(), 80);
        // The table is COCO 2017's, if the real annotations are at hand.
        let tiny = std::env::var_os("COCO_TINY_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/coco_tiny")
            });
        let ann = tiny.join("annotations/instances_val2017.json");
        if ann.is_file() {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ann)?)?;
            assert_eq!(ClassNames::from_json(&v)?, n);
        } else if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "coco_tiny not found at {} (set COCO_TINY_DIR)",
                tiny.display()
            );
        } else {
            eprintln!(
                "skipped the coco_tiny comparison: {} missing",
                ann.display()
            );
        }
        Ok(())
    }

    #[test]
    fn class_names_from_json() -> anyhow::Result<()> {
        let m = ClassNames::from_json(&serde_json::json!({"1": "cat", "7": "dog"}))?;
        assert_eq!(
            (m.name(1), m.name(7), m.name(2)),
            ("cat".into(), "dog".into(), "class 2".into())
        );
        let c = ClassNames::from_json(&serde_json::json!({
            "images": [], "categories": [{"id": 3, "name": "kiwi", "supercategory": "fruit"}]
        }))?;
        assert_eq!((c.name(3), c.name(1)), ("kiwi".into(), "class 1".into()));
        assert!(ClassNames::from_json(&serde_json::json!({"x": "cat"})).is_err());
        assert!(ClassNames::from_json(&serde_json::json!({"1": 5})).is_err());
        assert!(ClassNames::from_json(&serde_json::json!([1, 2])).is_err());
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("names.json");
        std::fs::write(&f, r#"{"2": "bee"}"#)?;
        assert_eq!(ClassNames::load(f.to_str().unwrap())?.name(2), "bee");
        assert!(ClassNames::load("/nonexistent/names.json").is_err());
        Ok(())
    }

    #[test]
    fn draws_box_and_label() {
        let mut img = RgbImage::from_pixel(60, 40, Rgb([0, 0, 0]));
        let d = PredDetection {
            bbox: [10.0, 15.0, 20.0, 10.0],
            score: 0.87,
            category_id: 1,
            category_name: "person".into(),
        };
        draw_detection(&mut img, &d);
        let c = class_colour(1);
        // Rectangle: columns 10..=29, rows 15..=24, two pixels thick.
        for (x, y) in [
            (10, 20),
            (11, 20),
            (29, 20),
            (28, 20),
            (20, 24),
            (20, 23),
            (29, 24),
        ] {
            assert_eq!(*img.get_pixel(x, y), c, "({x}, {y})");
        }
        // Inside the outline and outside the box/label: untouched.
        for (x, y) in [(12, 20), (27, 20), (9, 20), (30, 20), (20, 25)] {
            assert_eq!(*img.get_pixel(x, y), Rgb([0, 0, 0]), "({x}, {y})");
        }
        // Label "person 0.87" (11 glyphs) above the box: rows 5..=14, shifted left to fit the
        // 60-px image (90 px wide → starts at 0), background in the class colour plus text.
        let label_px: Vec<Rgb<u8>> = (5..15)
            .flat_map(|y| (0..60).map(move |x| (x, y)))
            .map(|(x, y)| *img.get_pixel(x, y))
            .collect();
        assert!(label_px
            .iter()
            .all(|p| *p != Rgb([0, 0, 0]) || c == Rgb([0, 0, 0])));
        let text = label_px.iter().filter(|p| **p != c).count();
        assert!(text > 20, "{text} text pixels");
        assert_eq!(*img.get_pixel(0, 4), Rgb([0, 0, 0]));
        // The first glyph ('p') pixel by pixel, at (1, 6) inside the label.
        let luma = 0.299 * c[0] as f32 + 0.587 * c[1] as f32 + 0.114 * c[2] as f32;
        let fg = if luma > 140.0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        };
        for (row, bits) in font8x8::legacy::BASIC_LEGACY['p' as usize]
            .iter()
            .enumerate()
        {
            for col in 0..8u32 {
                let want = if bits >> col & 1 == 1 { fg } else { c };
                assert_eq!(
                    *img.get_pixel(1 + col, 6 + row as u32),
                    want,
                    "({col}, {row})"
                );
            }
        }
        // No room above a box at the top edge: the label goes inside it.
        let mut img = RgbImage::from_pixel(60, 40, Rgb([0, 0, 0]));
        draw_detection(
            &mut img,
            &PredDetection {
                bbox: [30.0, 2.0, 20.0, 30.0],
                ..d
            },
        );
        assert_eq!(*img.get_pixel(30, 11), c);
        assert_eq!(*img.get_pixel(30, 12), c); // left edge of the box below the label
        assert_eq!(*img.get_pixel(31, 20), c);
        assert_eq!(*img.get_pixel(32, 20), Rgb([0, 0, 0]));
    }

    #[test]
    fn colours_differ_between_neighbouring_classes() {
        let cs: Vec<Rgb<u8>> = (1..=10).map(class_colour).collect();
        for w in cs.windows(2) {
            assert_ne!(w[0], w[1]);
        }
        assert_eq!(class_colour(5), class_colour(5));
    }
}
