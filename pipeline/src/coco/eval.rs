//! COCO box evaluation: the twelve summary numbers (AP, AP50, AP75, APs/m/l, AR@1/10/100,
//! ARs/m/l) as pycocotools' `COCOeval(iouType='bbox')` computes them, to the last bit.
//!
//! This module owns the whole chain: loading a detection results file, indexing ground truth
//! and detections per (image, category), box IoU (crowd regions measured against the
//! detection's own area), greedy matching per IoU threshold with crowd/area ignore flags,
//! per-category precision/recall accumulation over the 101 recall points, and the
//! summary means. Every choice that can move a result by one ulp follows pycocotools:
//! thresholds built like `np.linspace`, stable (merge) sorts on descending score,
//! `searchsorted(side='left')`, `np.spacing(1)` in the precision denominator and numpy's
//! pairwise summation in the final means.
//!
//! Ground truth considered: annotations whose image is listed in `images` and whose category
//! is listed in `categories`. Detections whose category is not listed are dropped; a
//! detection on an image absent from `images` is an error (pycocotools' `loadRes` refuses
//! such a file too). An empty detection list evaluates to zero AP/AR wherever ground truth
//! exists (pycocotools' `loadRes` crashes on an empty list; `COCOeval` itself gives zeros).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::{load_json, InstancesFile};

/// One entry of a COCO results file: `{image_id, category_id, bbox: [x, y, w, h], score}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Detection {
    pub image_id: u64,
    pub category_id: i64,
    /// `[x, y, width, height]` in pixels, top-left origin.
    pub bbox: [f64; 4],
    pub score: f64,
}

/// The twelve numbers pycocotools' `summarize()` prints, in its order. `-1` means undefined
/// (no ground truth in that area range for any category).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct CocoStats {
    #[serde(rename = "AP")]
    pub ap: f64,
    #[serde(rename = "AP50")]
    pub ap50: f64,
    #[serde(rename = "AP75")]
    pub ap75: f64,
    #[serde(rename = "APs")]
    pub ap_small: f64,
    #[serde(rename = "APm")]
    pub ap_medium: f64,
    #[serde(rename = "APl")]
    pub ap_large: f64,
    #[serde(rename = "ARmax1")]
    pub ar_max1: f64,
    #[serde(rename = "ARmax10")]
    pub ar_max10: f64,
    #[serde(rename = "ARmax100")]
    pub ar_max100: f64,
    #[serde(rename = "ARs")]
    pub ar_small: f64,
    #[serde(rename = "ARm")]
    pub ar_medium: f64,
    #[serde(rename = "ARl")]
    pub ar_large: f64,
}

impl CocoStats {
    /// The stats in pycocotools' `COCOeval.stats` order.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar_max1,
            self.ar_max10,
            self.ar_max100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }

    /// Inverse of [`CocoStats::to_array`].
    pub fn from_array(s: [f64; 12]) -> CocoStats {
        CocoStats {
            ap: s[0],
            ap50: s[1],
            ap75: s[2],
            ap_small: s[3],
            ap_medium: s[4],
            ap_large: s[5],
            ar_max1: s[6],
            ar_max10: s[7],
            ar_max100: s[8],
            ar_small: s[9],
            ar_medium: s[10],
            ar_large: s[11],
        }
    }
}

/// Number of IoU thresholds (0.50, 0.55, …, 0.95).
pub const NUM_IOU_THRESHOLDS: usize = 10;
/// Number of recall points (0.00, 0.01, …, 1.00).
pub const NUM_RECALL_THRESHOLDS: usize = 101;
/// Per-image detection caps, ascending.
pub const MAX_DETS: [usize; 3] = [1, 10, 100];
/// Area ranges `[lo, hi]` (inclusive, in squared pixels): all, small, medium, large.
pub const AREA_RANGES: [[f64; 2]; 4] =
    [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];

const T: usize = NUM_IOU_THRESHOLDS;
const R: usize = NUM_RECALL_THRESHOLDS;
const A: usize = AREA_RANGES.len();
const M: usize = MAX_DETS.len();
/// The largest cap: detections past it in an image are never looked at.
const MAX_DET: usize = MAX_DETS[M - 1];

/// `np.linspace(start, stop, num)`: `i * step + start`, with the last value set to `stop`.
/// Done the same way so that e.g. 0.75 is exactly representable where numpy has it.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut out = [0.0; N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = i as f64 * step + start;
    }
    out[N - 1] = stop;
    out
}

/// IoU thresholds exactly as pycocotools builds them (`np.linspace(.5, .95, 10)`).
pub fn iou_thresholds() -> [f64; T] {
    linspace::<T>(0.5, 0.95)
}

/// Recall thresholds exactly as pycocotools builds them (`np.linspace(0, 1, 101)`).
pub fn recall_thresholds() -> [f64; R] {
    linspace::<R>(0.0, 1.0)
}

/// Full accumulated results, for per-category numbers beyond the twelve summary stats.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Sorted, deduplicated image ids that were evaluated.
    pub img_ids: Vec<u64>,
    /// Sorted, deduplicated category ids (the K axis).
    pub cat_ids: Vec<i64>,
    /// Interpolated precision, shape `[T][R][K][A][M]` flattened in that order; `-1` where
    /// undefined (no non-ignored ground truth for that category/area).
    pub precision: Vec<f64>,
    /// Final recall, shape `[T][K][A][M]`; `-1` where undefined.
    pub recall: Vec<f64>,
}

impl Evaluation {
    fn k(&self) -> usize {
        self.cat_ids.len()
    }

    /// The twelve summary numbers (pycocotools' `summarize()`).
    pub fn stats(&self) -> CocoStats {
        let thr = iou_thresholds();
        // pycocotools looks the single-threshold rows up by exact float equality.
        let t50 = thr.iter().position(|&t| t == 0.5);
        let t75 = thr.iter().position(|&t| t == 0.75);
        let ap = |t: Option<Option<usize>>, a: usize, m: usize| self.mean_precision(t, a, m);
        let ar = |a: usize, m: usize| self.mean_recall(a, m);
        CocoStats {
            ap: ap(None, 0, 2),
            ap50: ap(Some(t50), 0, 2),
            ap75: ap(Some(t75), 0, 2),
            ap_small: ap(None, 1, 2),
            ap_medium: ap(None, 2, 2),
            ap_large: ap(None, 3, 2),
            ar_max1: ar(0, 0),
            ar_max10: ar(0, 1),
            ar_max100: ar(0, 2),
            ar_small: ar(1, 2),
            ar_medium: ar(2, 2),
            ar_large: ar(3, 2),
        }
    }

    /// AP per category (area all, 100 detections), `-1` for categories without ground truth;
    /// the per-class numbers automl's evaluator appends.
    pub fn category_ap(&self) -> Vec<(i64, f64)> {
        let k_n = self.k();
        let mut vals = Vec::with_capacity(T * R);
        (0..k_n)
            .map(|k| {
                vals.clear();
                for t in 0..T {
                    for r in 0..R {
                        let v = self.precision[(((t * R + r) * k_n + k) * A) * M + (M - 1)];
                        if v > -1.0 {
                            vals.push(v);
                        }
                    }
                }
                (self.cat_ids[k], mean_or_minus_one(&vals))
            })
            .collect()
    }

    /// `t`: `None` = all thresholds; `Some(None)` = a threshold numpy would not find.
    fn mean_precision(&self, t: Option<Option<usize>>, a: usize, m: usize) -> f64 {
        let k_n = self.k();
        let ts: Vec<usize> = match t {
            None => (0..T).collect(),
            Some(Some(t)) => vec![t],
            Some(None) => vec![],
        };
        // Same element order as numpy's boolean-mask flattening of s[t, r, k].
        let mut vals = Vec::with_capacity(ts.len() * R * k_n);
        for &t in &ts {
            for r in 0..R {
                for k in 0..k_n {
                    let v = self.precision[(((t * R + r) * k_n + k) * A + a) * M + m];
                    if v > -1.0 {
                        vals.push(v);
                    }
                }
            }
        }
        mean_or_minus_one(&vals)
    }

    fn mean_recall(&self, a: usize, m: usize) -> f64 {
        let k_n = self.k();
        let mut vals = Vec::with_capacity(T * k_n);
        for t in 0..T {
            for k in 0..k_n {
                let v = self.recall[((t * k_n + k) * A + a) * M + m];
                if v > -1.0 {
                    vals.push(v);
                }
            }
        }
        mean_or_minus_one(&vals)
    }
}

/// numpy's float64 `add.reduce` on a contiguous array: pairwise summation with 8
/// accumulators over blocks of at most 128 elements.
fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
    }
}

/// `np.mean(v)` for a non-empty `v`, else -1 (pycocotools' marker for "undefined").
fn mean_or_minus_one(v: &[f64]) -> f64 {
    if v.is_empty() {
        -1.0
    } else {
        // The reduction starts from the identity 0.0, which changes nothing for sums >= 0.
        (0.0 + numpy_sum(v)) / v.len() as f64
    }
}

/// Reads a COCO results file (a JSON list of [`Detection`]).
pub fn load_detections(path: &Path) -> anyhow::Result<Vec<Detection>> {
    let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    // Plain parsing is markedly faster on large files; only a failure pays for the
    // field-path tracking that makes the error message useful.
    match serde_json::from_slice(&text) {
        Ok(dets) => Ok(dets),
        Err(_) => load_json(path),
    }
}

/// Evaluates `dets` against every image listed in `gt.images` (pycocotools' default).
pub fn evaluate(gt: &InstancesFile, dets: &[Detection]) -> anyhow::Result<CocoStats> {
    Ok(evaluate_full(gt, dets, None)?.stats())
}

/// Like [`evaluate`], restricted to `img_ids` (pycocotools' `params.imgIds`; automl's
/// evaluator passes the ids of the images it produced detections for). Ids not in
/// `gt.images` are evaluated as images without ground truth.
pub fn evaluate_on_images(
    gt: &InstancesFile,
    dets: &[Detection],
    img_ids: &[u64],
) -> anyhow::Result<CocoStats> {
    Ok(evaluate_full(gt, dets, Some(img_ids))?.stats())
}

/// Per-image, per-category state fed to the accumulation: one entry per kept detection.
#[derive(Clone, Copy)]
struct ScoredDet {
    score: f64,
    /// Rank of the detection within its (image, category), for the maxDets caps.
    rank: u8,
    /// Bit `t` set: true positive at IoU threshold `t`, per area range.
    tp: [u16; A],
    /// Bit `t` set: false positive at threshold `t`; neither bit set = ignored.
    fp: [u16; A],
}

/// Groups item indices by a key in `0..n_keys`, keeping input order within a key (CSR).
fn group(keys: &[Option<usize>], n_keys: usize) -> (Vec<usize>, Vec<u32>) {
    let mut start = vec![0usize; n_keys + 1];
    for k in keys.iter().flatten() {
        start[k + 1] += 1;
    }
    for i in 0..n_keys {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut items = vec![0u32; start[n_keys]];
    for (idx, k) in keys.iter().enumerate() {
        if let Some(k) = *k {
            items[fill[k]] = idx as u32;
            fill[k] += 1;
        }
    }
    (start, items)
}

/// Box IoU as pycocotools' C `bbIou`; `crowd` divides by the detection's area only.
#[inline]
fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let da = d[2] * d[3];
    let i = w * h;
    let u = if crowd { da } else { da + g[2] * g[3] - i };
    i / u
}

/// Runs evaluation and accumulation; `img_ids` = `None` means all images of `gt`.
pub fn evaluate_full(
    gt: &InstancesFile,
    dets: &[Detection],
    img_ids: Option<&[u64]>,
) -> anyhow::Result<Evaluation> {
    let gt_img_set: HashSet<u64> = gt.images.iter().map(|im| im.id).collect();
    let mut img_list: Vec<u64> = match img_ids {
        Some(ids) => ids.to_vec(),
        None => gt.images.iter().map(|im| im.id).collect(),
    };
    img_list.sort_unstable();
    img_list.dedup();
    let mut cat_list: Vec<i64> = gt.categories.iter().map(|c| c.id).collect();
    cat_list.sort_unstable();
    cat_list.dedup();
    let img_index: HashMap<u64, usize> = img_list
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let cat_index: HashMap<i64, usize> = cat_list
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let (n_img, n_cat) = (img_list.len(), cat_list.len());

    // Input checks: pycocotools keys annotations by id (duplicates silently collapse) and
    // refuses results on unknown images; we turn both into errors, and refuse non-finite
    // numbers that would make the score order meaningless.
    let mut seen_ids = HashSet::with_capacity(gt.annotations.len());
    for ann in &gt.annotations {
        if !seen_ids.insert(ann.id) {
            bail!(
                "ground truth: annotation id {} appears more than once",
                ann.id
            );
        }
    }
    for (i, d) in dets.iter().enumerate() {
        if !gt_img_set.contains(&d.image_id) {
            bail!(
                "detection {i}: image_id {} is not an image of the ground truth",
                d.image_id
            );
        }
        if !d.score.is_finite() || d.bbox.iter().any(|v| !v.is_finite()) {
            bail!("detection {i}: non-finite score or bbox");
        }
    }

    let cell = |img: u64, cat: i64| -> Option<usize> {
        Some(cat_index.get(&cat)? * n_img + img_index.get(&img)?)
    };
    let gt_keys: Vec<Option<usize>> = gt
        .annotations
        .iter()
        .map(|a| cell(a.image_id, a.category_id))
        .collect();
    let dt_keys: Vec<Option<usize>> = dets
        .iter()
        .map(|d| cell(d.image_id, d.category_id))
        .collect();
    let (gt_start, gt_items) = group(&gt_keys, n_cat * n_img);
    let (dt_start, dt_items) = group(&dt_keys, n_cat * n_img);

    let ctx = Ctx {
        gt,
        dets,
        n_img,
        gt_start: &gt_start,
        gt_items: &gt_items,
        dt_start: &dt_start,
        dt_items: &dt_items,
        iou_thr: iou_thresholds(),
        rec_thr: recall_thresholds(),
    };
    let per_cat: Vec<CategoryResult> = run_categories(&ctx, n_cat);

    let mut precision = vec![-1.0; T * R * n_cat * A * M];
    let mut recall = vec![-1.0; T * n_cat * A * M];
    for (k, res) in per_cat.iter().enumerate() {
        for t in 0..T {
            for a in 0..A {
                for m in 0..M {
                    recall[((t * n_cat + k) * A + a) * M + m] = res.recall[(t * A + a) * M + m];
                    for r in 0..R {
                        precision[(((t * R + r) * n_cat + k) * A + a) * M + m] =
                            res.precision[((t * R + r) * A + a) * M + m];
                    }
                }
            }
        }
    }
    Ok(Evaluation {
        img_ids: img_list,
        cat_ids: cat_list,
        precision,
        recall,
    })
}

struct Ctx<'a> {
    gt: &'a InstancesFile,
    dets: &'a [Detection],
    n_img: usize,
    gt_start: &'a [usize],
    gt_items: &'a [u32],
    dt_start: &'a [usize],
    dt_items: &'a [u32],
    iou_thr: [f64; T],
    rec_thr: [f64; R],
}

/// One category's slice of the precision (`[T][R][A][M]`) and recall (`[T][A][M]`) arrays.
struct CategoryResult {
    precision: Vec<f64>,
    recall: Vec<f64>,
}

/// Categories are independent; spread them over a few scoped threads.
fn run_categories(ctx: &Ctx, n_cat: usize) -> Vec<CategoryResult> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(n_cat.max(1));
    if threads <= 1 {
        let mut scratch = Scratch::default();
        return (0..n_cat)
            .map(|k| eval_category(ctx, k, &mut scratch))
            .collect();
    }
    let mut out: Vec<Option<CategoryResult>> = (0..n_cat).map(|_| None).collect();
    std::thread::scope(|s| {
        let chunk = n_cat.div_ceil(threads);
        for (c, slot) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut scratch = Scratch::default();
                for (j, o) in slot.iter_mut().enumerate() {
                    *o = Some(eval_category(ctx, c * chunk + j, &mut scratch));
                }
            });
        }
    });
    out.into_iter()
        .map(|r| r.expect("every category evaluated"))
        .collect()
}

/// Buffers reused across images and categories.
#[derive(Default)]
struct Scratch {
    dt: Vec<u32>,
    ious: Vec<f64>,
    gt_order: Vec<usize>,
    gt_ignore: Vec<bool>,
    gt_matched: Vec<bool>,
    dets: Vec<ScoredDet>,
    /// Per IoU threshold: (recall, precision) at each true positive, in score order.
    tp_points: [Vec<(f64, f64)>; T],
}

fn eval_category(ctx: &Ctx, k: usize, s: &mut Scratch) -> CategoryResult {
    let anns = &ctx.gt.annotations;
    s.dets.clear();
    let mut any_image = false;
    let mut npig = [0usize; A];

    for i in 0..ctx.n_img {
        let c = k * ctx.n_img + i;
        let gts = &ctx.gt_items[ctx.gt_start[c]..ctx.gt_start[c + 1]];
        let dts = &ctx.dt_items[ctx.dt_start[c]..ctx.dt_start[c + 1]];
        if gts.is_empty() && dts.is_empty() {
            continue;
        }
        any_image = true;

        // Highest score first; ties keep file order (numpy's stable mergesort).
        s.dt.clear();
        s.dt.extend_from_slice(dts);
        s.dt.sort_by(|&a, &b| {
            ctx.dets[b as usize]
                .score
                .partial_cmp(&ctx.dets[a as usize].score)
                .expect("finite scores")
        });
        s.dt.truncate(MAX_DET);
        let (nd, ng) = (s.dt.len(), gts.len());

        s.ious.clear();
        for &d in &s.dt {
            let db = &ctx.dets[d as usize].bbox;
            for &g in gts {
                let ga = &anns[g as usize];
                s.ious.push(box_iou(db, &ga.bbox, ga.iscrowd != 0));
            }
        }

        let base = s.dets.len();
        for (rank, &d) in s.dt.iter().enumerate() {
            s.dets.push(ScoredDet {
                score: ctx.dets[d as usize].score,
                rank: rank as u8,
                tp: [0; A],
                fp: [0; A],
            });
        }

        for (a, rng) in AREA_RANGES.iter().enumerate() {
            s.gt_ignore.clear();
            s.gt_ignore.extend(gts.iter().map(|&g| {
                let ga = &anns[g as usize];
                ga.iscrowd != 0 || ga.area < rng[0] || ga.area > rng[1]
            }));
            // Regular ground truth first, ignored last, each in file order.
            s.gt_order.clear();
            s.gt_order.extend((0..ng).filter(|&g| !s.gt_ignore[g]));
            let n_regular = s.gt_order.len();
            npig[a] += n_regular;
            s.gt_order.extend((0..ng).filter(|&g| s.gt_ignore[g]));

            for (t, &thr) in ctx.iou_thr.iter().enumerate() {
                s.gt_matched.clear();
                s.gt_matched.resize(ng, false);
                for di in 0..nd {
                    let row = &s.ious[di * ng..(di + 1) * ng];
                    let mut best = thr.min(1.0 - 1e-10);
                    let mut m: Option<usize> = None;
                    for &g in &s.gt_order {
                        let crowd = anns[gts[g] as usize].iscrowd != 0;
                        if s.gt_matched[g] && !crowd {
                            continue;
                        }
                        // Once matched to regular ground truth, ignored ones cannot win.
                        if let Some(mg) = m {
                            if !s.gt_ignore[mg] && s.gt_ignore[g] {
                                break;
                            }
                        }
                        if row[g] < best {
                            continue;
                        }
                        best = row[g];
                        m = Some(g);
                    }
                    let det_area = {
                        let b = &ctx.dets[s.dt[di] as usize].bbox;
                        b[2] * b[3]
                    };
                    let out_of_range = det_area < rng[0] || det_area > rng[1];
                    // pycocotools records the matched annotation's id and later tests it
                    // for truthiness, so a match to an annotation with id 0 reads as none.
                    let (matched, ignored) = match m {
                        Some(mg) => {
                            s.gt_matched[mg] = true;
                            let id_nonzero = anns[gts[mg] as usize].id != 0;
                            let ig = s.gt_ignore[mg] || (!id_nonzero && out_of_range);
                            (id_nonzero, ig)
                        }
                        None => (false, out_of_range),
                    };
                    let sd = &mut s.dets[base + di];
                    if !ignored {
                        if matched {
                            sd.tp[a] |= 1 << t;
                        } else {
                            sd.fp[a] |= 1 << t;
                        }
                    }
                }
            }
        }
    }

    let mut precision = vec![-1.0; T * R * A * M];
    let mut recall = vec![-1.0; T * A * M];
    if !any_image {
        return CategoryResult { precision, recall };
    }
    // Stable sort of the image-ordered concatenation, as numpy's mergesort on -score.
    s.dets
        .sort_by(|a, b| b.score.partial_cmp(&a.score).expect("finite scores"));

    // pycocotools builds cumulative recall/precision over every detection, takes the
    // running-max envelope from the right and reads it at searchsorted(rc, thr, 'left').
    // Only true-positive positions matter: between two of them recall is flat and precision
    // only falls, so the envelope at any position equals the best later TP value, and the
    // first position reaching a recall point is always a TP (or the start, where the
    // envelope is the global maximum). Keeping (rc, pr) at TP positions, computed with the
    // same formulas, gives bit-identical results without a division per detection.
    for a in 0..A {
        if npig[a] == 0 {
            continue;
        }
        let npig_f = npig[a] as f64;
        for (m, &max_det) in MAX_DETS.iter().enumerate() {
            for list in s.tp_points.iter_mut() {
                list.clear();
            }
            let mut tp = [0u64; T];
            let mut fp = [0u64; T];
            for d in s.dets.iter().filter(|d| (d.rank as usize) < max_det) {
                let (tb, fb) = (d.tp[a], d.fp[a]);
                if tb | fb == 0 {
                    continue;
                }
                for t in 0..T {
                    fp[t] += u64::from((fb >> t) & 1);
                    if (tb >> t) & 1 == 1 {
                        tp[t] += 1;
                        let (tpf, fpf) = (tp[t] as f64, fp[t] as f64);
                        s.tp_points[t].push((tpf / npig_f, tpf / (fpf + tpf + f64::EPSILON)));
                    }
                }
            }
            for t in 0..T {
                // rc[-1] when there is any detection; 0/npig is 0 as well.
                recall[(t * A + a) * M + m] = tp[t] as f64 / npig_f;
                let pts = &mut s.tp_points[t];
                for i in (1..pts.len()).rev() {
                    if pts[i].1 > pts[i - 1].1 {
                        pts[i - 1].1 = pts[i].1;
                    }
                }
                let mut idx = 0usize;
                for (r, &thr) in ctx.rec_thr.iter().enumerate() {
                    while idx < pts.len() && pts[idx].0 < thr {
                        idx += 1;
                    }
                    // Recall points beyond the final recall keep precision 0.
                    precision[((t * R + r) * A + a) * M + m] =
                        if idx < pts.len() { pts[idx].1 } else { 0.0 };
                }
            }
        }
    }
    CategoryResult { precision, recall }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coco::{Category, ImageInfo, ObjectAnnotation};

    /// (id, image_id, category_id, bbox, area, iscrowd)
    type Ann = (u64, u64, i64, [f64; 4], f64, i64);

    fn gt(images: &[u64], cats: &[i64], anns: &[Ann]) -> InstancesFile {
        InstancesFile {
            images: images
                .iter()
                .map(|&id| ImageInfo {
                    id,
                    file_name: format!("{id}.jpg"),
                    height: 480,
                    width: 640,
                })
                .collect(),
            categories: cats
                .iter()
                .map(|&id| Category {
                    id,
                    name: format!("c{id}"),
                    supercategory: None,
                })
                .collect(),
            annotations: anns
                .iter()
                .map(
                    |&(id, image_id, category_id, bbox, area, iscrowd)| ObjectAnnotation {
                        id,
                        image_id,
                        category_id,
                        bbox,
                        area,
                        iscrowd,
                        segmentation: None,
                    },
                )
                .collect(),
        }
    }

    fn det(image_id: u64, category_id: i64, bbox: [f64; 4], score: f64) -> Detection {
        Detection {
            image_id,
            category_id,
            bbox,
            score,
        }
    }

    /// Precision of a lone true positive: pycocotools divides by `tp + fp + eps`, so a
    /// single hit scores 1/(1 + eps) = 0.9999999999999998 (two or more round to 1).
    const ONE: f64 = 1.0 / (1.0 + f64::EPSILON);

    /// precision[t][r][k=0][a][m=100 dets]
    fn prec(e: &Evaluation, t: usize, r: usize, a: usize) -> f64 {
        let k_n = e.cat_ids.len();
        e.precision[((t * R + r) * k_n * A + a) * M + (M - 1)]
    }

    #[test]
    fn thresholds_match_numpy_linspace_bits() {
        let expect: [u64; 10] = [
            0x3fe0000000000000,
            0x3fe199999999999a,
            0x3fe3333333333333,
            0x3fe4cccccccccccd,
            0x3fe6666666666666,
            0x3fe8000000000000,
            0x3fe999999999999a,
            0x3feb333333333333,
            0x3feccccccccccccc,
            0x3fee666666666666,
        ];
        let got: Vec<u64> = iou_thresholds().iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, expect);
        let rec = recall_thresholds();
        // numpy's 0.29 equals the literal, its 0.57 is one ulp above it.
        assert_eq!(rec[29].to_bits(), 0x3fd28f5c28f5c28f);
        assert_eq!(rec[57].to_bits(), 0x3fe23d70a3d70a3e);
        assert_eq!(rec[100], 1.0);
    }

    #[test]
    fn mean_uses_numpy_pairwise_summation() {
        // numpy: np.mean([0.1] * 1000) == 0.10000000000000002; a left-to-right sum gives
        // 0.09999999999999859.
        assert_eq!(mean_or_minus_one(&[0.1; 1000]), 0.10000000000000002);
        assert_eq!(mean_or_minus_one(&[]), -1.0);
        assert_eq!(mean_or_minus_one(&[0.25, 0.75]), 0.5);
    }

    #[test]
    fn box_iou_plain_and_crowd() {
        let g = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(box_iou(&[0.0, 0.0, 10.0, 6.5], &g, false), 0.65);
        assert_eq!(box_iou(&[5.0, 0.0, 10.0, 10.0], &g, false), 50.0 / 150.0);
        // Crowd: intersection over the detection's area only.
        assert_eq!(box_iou(&[5.0, 0.0, 10.0, 10.0], &g, true), 0.5);
        assert_eq!(box_iou(&[10.0, 0.0, 10.0, 10.0], &g, false), 0.0);
        assert_eq!(box_iou(&[0.0, 0.0, -3.0, 10.0], &g, false), 0.0);
    }

    #[test]
    fn perfect_detections_score_one() {
        let g = gt(
            &[1, 2, 3],
            &[1, 2],
            &[
                (1, 1, 1, [10.0, 10.0, 20.0, 20.0], 400.0, 0),
                (2, 2, 2, [50.0, 60.0, 50.0, 40.0], 2000.0, 0),
                (3, 3, 1, [0.0, 0.0, 200.0, 100.0], 20000.0, 0),
            ],
        );
        let d: Vec<Detection> = g
            .annotations
            .iter()
            .map(|a| det(a.image_id, a.category_id, a.bbox, 0.9))
            .collect();
        let s = evaluate(&g, &d).unwrap();
        // Category 1 has two hits (precision 1), category 2 one (precision ONE).
        // Each size range holds one object: precision ONE at every recall point.
        assert_eq!((s.ap_small, s.ap_medium, s.ap_large), (ONE, ONE, ONE));
        for v in &s.to_array()[..3] {
            assert!((1.0 - v) < 3e-16, "{v}");
        }
        let ar = &s.to_array()[6..];
        assert_eq!(ar, [1.0; 6]);
    }

    #[test]
    fn shifted_box_counts_at_thresholds_up_to_its_iou() {
        // IoU 0.65 exactly: true positive at 0.50..0.65 (4 of 10 thresholds).
        let g = gt(&[1], &[1], &[(1, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0)]);
        let e = evaluate_full(&g, &[det(1, 1, [0.0, 0.0, 10.0, 6.5], 0.8)], None).unwrap();
        let s = e.stats();
        // Summary values as pycocotools 2.0.11 prints them for this case.
        assert_eq!(s.ap50, 0.9999999999999999);
        assert_eq!(prec(&e, 3, 100, 0), ONE);
        assert_eq!(prec(&e, 4, 0, 0), 0.0);
        assert_eq!(s.ap75, 0.0);
        assert_eq!(s.ap, 0.39999999999999997);
        assert_eq!(e.category_ap(), vec![(1, s.ap)]);
        assert_eq!(s.ap_small, s.ap);
        assert_eq!((s.ap_medium, s.ap_large), (-1.0, -1.0));
        assert_eq!(s.ar_max1, 0.4);
        assert_eq!((s.ar_medium, s.ar_large), (-1.0, -1.0));
    }

    #[test]
    fn duplicate_detection_is_a_false_positive() {
        let g = gt(
            &[1],
            &[1],
            &[
                (1, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0),
                (2, 1, 1, [50.0, 50.0, 10.0, 10.0], 100.0, 0),
            ],
        );
        let d = [
            det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.9),
            det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.8),
            det(1, 1, [50.0, 50.0, 10.0, 10.0], 0.7),
        ];
        let e = evaluate_full(&g, &d, None).unwrap();
        // TP, FP, TP: recall 0.5, 0.5, 1; precision 1, 0.5, 2/3.
        for t in 0..T {
            assert_eq!(prec(&e, t, 50, 0), ONE);
            assert_eq!(prec(&e, t, 51, 0), 2.0 / (1.0 + 2.0 + f64::EPSILON));
            assert_eq!(prec(&e, t, 100, 0), 2.0 / (1.0 + 2.0 + f64::EPSILON));
        }
        let s = e.stats();
        assert!((s.ap - (51.0 + 50.0 * 2.0 / 3.0) / 101.0).abs() < 1e-15);
        assert_eq!(s.ar_max100, 1.0);
        assert_eq!(s.ar_max1, 0.5);
    }

    #[test]
    fn crowd_regions_absorb_detections_repeatedly() {
        let anns = |crowd| {
            [
                (1, 1, 1, [0.0, 0.0, 100.0, 100.0], 10000.0, crowd),
                (2, 1, 1, [200.0, 200.0, 10.0, 10.0], 100.0, 0),
            ]
        };
        let d = [
            det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.9),
            det(1, 1, [50.0, 50.0, 20.0, 20.0], 0.85),
            // Half inside the crowd box: crowd IoU = 100 / 200 = 0.5 → ignored at 0.50 only.
            det(1, 1, [90.0, 0.0, 20.0, 10.0], 0.8),
            det(1, 1, [200.0, 200.0, 10.0, 10.0], 0.7),
        ];
        let e = evaluate_full(&gt(&[1], &[1], &anns(1)), &d, None).unwrap();
        assert_eq!(prec(&e, 0, 100, 0), ONE);
        // At 0.55 the half-covered detection is a false positive ahead of the TP.
        assert_eq!(prec(&e, 1, 100, 0), 1.0 / (1.0 + 1.0 + f64::EPSILON));
        let s = e.stats();
        assert_eq!(s.ar_max100, 1.0);
        // Same boxes without the crowd flag: three false positives, and the big box counts.
        let s2 = evaluate(&gt(&[1], &[1], &anns(0)), &d).unwrap();
        assert!(s2.ap < s.ap);
        assert_eq!(s2.ar_large, 0.0);
        assert_eq!(s.ar_large, -1.0);
    }

    #[test]
    fn area_range_ignores_ground_truth_and_unmatched_detections() {
        // One small and one medium object; in the "small" range the medium one is ignored,
        // its detection too, and an unmatched medium-sized detection does not count.
        let g = gt(
            &[1],
            &[1],
            &[
                (1, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0),
                (2, 1, 1, [100.0, 100.0, 50.0, 50.0], 2500.0, 0),
            ],
        );
        let d = [
            det(1, 1, [100.0, 100.0, 50.0, 50.0], 0.9),
            det(1, 1, [300.0, 300.0, 60.0, 60.0], 0.8),
            det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.7),
        ];
        let s = evaluate(&g, &d).unwrap();
        assert_eq!(s.ap_small, ONE);
        assert_eq!(s.ap_medium, ONE);
        assert_eq!(s.ap_large, -1.0);
        // All areas: TP, FP, TP.
        assert!((s.ap - (51.0 + 50.0 * 2.0 / 3.0) / 101.0).abs() < 1e-15);
    }

    #[test]
    fn boundary_area_belongs_to_both_ranges() {
        let g = gt(&[1], &[1], &[(1, 1, 1, [0.0, 0.0, 32.0, 32.0], 1024.0, 0)]);
        let s = evaluate(&g, &[det(1, 1, [0.0, 0.0, 32.0, 32.0], 0.5)]).unwrap();
        assert_eq!((s.ap_small, s.ap_medium, s.ap_large), (ONE, ONE, -1.0));
    }

    #[test]
    fn empty_images_change_nothing_and_no_detections_give_zero() {
        let anns = [
            (1, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0),
            (2, 2, 1, [0.0, 0.0, 100.0, 100.0], 10000.0, 0),
        ];
        let d = [
            det(1, 1, [0.0, 0.0, 10.0, 8.0], 0.6),
            det(2, 1, [5.0, 0.0, 100.0, 100.0], 0.9),
        ];
        let a = evaluate(&gt(&[1, 2], &[1], &anns), &d).unwrap();
        let b = evaluate(&gt(&[1, 2, 3, 4, 5], &[1], &anns), &d).unwrap();
        assert_eq!(a, b);
        let none = evaluate(&gt(&[1, 2, 3], &[1], &anns), &[]).unwrap();
        assert_eq!(
            none.to_array(),
            [0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        );
        let nothing = evaluate(&gt(&[1], &[1], &[]), &[]).unwrap();
        assert_eq!(nothing.to_array(), [-1.0; 12]);
    }

    #[test]
    fn max_dets_caps_each_image() {
        let g = gt(
            &[1],
            &[1],
            &[
                (1, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0),
                (2, 1, 1, [50.0, 50.0, 10.0, 10.0], 100.0, 0),
            ],
        );
        let d = [
            det(1, 1, [300.0, 300.0, 10.0, 10.0], 0.9),
            det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.8),
            det(1, 1, [50.0, 50.0, 10.0, 10.0], 0.7),
        ];
        let s = evaluate(&g, &d).unwrap();
        assert_eq!((s.ar_max1, s.ar_max10, s.ar_max100), (0.0, 1.0, 1.0));
    }

    #[test]
    fn equal_scores_keep_sorted_image_order() {
        // Same score on a false positive (image 1) and a true positive (image 2): numpy's
        // stable sort over images in id order puts the false positive first → precision 0.5
        // everywhere, whatever the file order.
        let g = gt(
            &[2, 1],
            &[1],
            &[(1, 2, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0)],
        );
        let d = [
            det(2, 1, [0.0, 0.0, 10.0, 10.0], 0.5),
            det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.5),
        ];
        let s = evaluate(&g, &d).unwrap();
        assert_eq!(s.ap, 1.0 / (1.0 + 1.0 + f64::EPSILON));
        // Within one image ties keep file order.
        let g1 = gt(&[1], &[1], &[(1, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0)]);
        let tp_first = [
            det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.5),
            det(1, 1, [90.0, 0.0, 10.0, 10.0], 0.5),
        ];
        assert_eq!(evaluate(&g1, &tp_first).unwrap().ap, ONE);
        let fp_first = [tp_first[1].clone(), tp_first[0].clone()];
        assert_eq!(
            evaluate(&g1, &fp_first).unwrap().ap,
            1.0 / (1.0 + 1.0 + f64::EPSILON)
        );
    }

    #[test]
    fn recall_points_use_numpy_values() {
        // 100 objects, 57 found, a false positive, then a 58th: recall 0.57 exactly is one ulp
        // short of numpy's 0.57 recall point, so that point reads the 58th hit's precision.
        let anns: Vec<_> = (0..100u64)
            .map(|j| (j + 1, 1, 1, [20.0 * j as f64, 0.0, 10.0, 10.0], 100.0, 0))
            .collect();
        let g = gt(&[1], &[1], &anns);
        let mut d: Vec<Detection> = (0..57)
            .map(|j| {
                det(
                    1,
                    1,
                    [20.0 * j as f64, 0.0, 10.0, 10.0],
                    0.9 - 0.001 * j as f64,
                )
            })
            .collect();
        d.push(det(1, 1, [0.0, 300.0, 10.0, 10.0], 0.3));
        d.push(det(1, 1, [20.0 * 57.0, 0.0, 10.0, 10.0], 0.2));
        let e = evaluate_full(&g, &d, None).unwrap();
        assert_eq!(prec(&e, 0, 56, 0), 1.0);
        assert_eq!(prec(&e, 0, 57, 0), 58.0 / (1.0 + 58.0 + f64::EPSILON));
        assert_eq!(prec(&e, 0, 58, 0), 58.0 / (1.0 + 58.0 + f64::EPSILON));
        assert_eq!(prec(&e, 0, 59, 0), 0.0);
    }

    #[test]
    fn unknown_categories_are_dropped_and_subsets_restrict_images() {
        let g = gt(
            &[1, 2],
            &[1],
            &[
                (1, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0),
                (2, 2, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0),
                // Category 5 is not listed: not ground truth.
                (3, 1, 5, [50.0, 0.0, 10.0, 10.0], 100.0, 0),
            ],
        );
        let d = [
            det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.9),
            det(1, 7, [50.0, 0.0, 10.0, 10.0], 0.95),
        ];
        let all = evaluate(&g, &d).unwrap();
        assert_eq!(all.ar_max100, 0.5);
        let sub = evaluate_on_images(&g, &d, &[1]).unwrap();
        for v in &sub.to_array()[..3] {
            assert!((1.0 - v) < 3e-16, "{v}");
        }
        assert_eq!(sub.ar_max100, 1.0);
    }

    #[test]
    fn annotation_id_zero_reads_as_unmatched_like_pycocotools() {
        let g = gt(&[1], &[1], &[(0, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0)]);
        let s = evaluate(&g, &[det(1, 1, [0.0, 0.0, 10.0, 10.0], 0.9)]).unwrap();
        assert_eq!((s.ap, s.ar_max100), (0.0, 0.0));
    }

    #[test]
    fn bad_input_is_an_error() {
        let g = gt(&[1], &[1], &[(1, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0)]);
        let err = evaluate(&g, &[det(9, 1, [0.0, 0.0, 1.0, 1.0], 0.5)]).unwrap_err();
        assert!(err.to_string().contains("image_id 9"), "{err}");
        let err = evaluate(&g, &[det(1, 1, [0.0, 0.0, 1.0, 1.0], f64::NAN)]).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        let dup = gt(
            &[1],
            &[1],
            &[
                (4, 1, 1, [0.0, 0.0, 10.0, 10.0], 100.0, 0),
                (4, 1, 1, [20.0, 0.0, 10.0, 10.0], 100.0, 0),
            ],
        );
        let err = evaluate(&dup, &[]).unwrap_err();
        assert!(err.to_string().contains("annotation id 4"), "{err}");
    }

    #[test]
    fn load_detections_parses_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.json");
        std::fs::write(
            &ok,
            r#"[{"image_id":1,"category_id":2,"bbox":[1,2.5,3,4],"score":0.25,"extra":1}]"#,
        )
        .unwrap();
        assert_eq!(
            load_detections(&ok).unwrap(),
            vec![det(1, 2, [1.0, 2.5, 3.0, 4.0], 0.25)]
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(
            &bad,
            r#"[{"image_id":1,"category_id":2,"bbox":[1,2,3,4],"score":0.5},
                {"image_id":1,"category_id":2,"bbox":[1,2,3],"score":0.5}]"#,
        )
        .unwrap();
        let err = load_detections(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains("[1].bbox"),
            "{err}"
        );
    }

    #[test]
    fn stats_serialize_with_pycocotools_names() {
        let s = CocoStats::from_array([0.5; 12]);
        let v = serde_json::to_value(s).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want = vec![
            "AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100", "ARs",
            "ARm", "ARl",
        ];
        want.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, want);
    }
}
