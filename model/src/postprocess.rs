//! Detection post-processing as automl's EfficientDet evaluation does it, in plain Rust over
//! slices: box decoding against anchors, sigmoid class scores, the pre-NMS top-k over all
//! (anchor, class) pairs, per-class non-maximum suppression (hard or Gaussian soft-NMS), the
//! final per-image cap, and conversion to COCO `[x, y, w, h]` boxes with COCO class ids.
//!
//! Reference path (automl `tf2/eval.py` → `postprocess.generate_detections` with the default
//! hparams): top 5000 logits over the flattened (anchor, class) scores, per class
//! TensorFlow's `NonMaxSuppressionV5` with Gaussian soft-NMS (σ = 0.5 in the paper's
//! `exp(-iou²/σ)` form), score threshold 0.001, at most 100 boxes per class, then the best
//! 100 over all classes, boxes multiplied by the image scale, class + 1. [`nms`] follows
//! that operator's algorithm and float32 arithmetic step by step. [`soft_nms_numpy`]
//! is the alternative numpy routine automl uses when `nms_configs.pyfunc` is on (boxes
//! measured with the +1 pixel convention, no per-class cap).
//!
//! Boxes are `[ymin, xmin, ymax, xmax]` in input-image pixels unless said otherwise.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;

/// `[ymin, xmin, ymax, xmax]`.
pub type BoxYxyx = [f32; 4];

/// automl's default number of (anchor, class) pairs kept before NMS in evaluation.
pub const MAX_NMS_INPUTS: usize = 5000;
/// automl's default number of detections per image (and per class inside NMS).
pub const MAX_DETECTIONS: usize = 100;
/// automl adds this to 0-based class indices to get COCO category ids.
pub const CLASS_OFFSET: i64 = 1;

/// Bad shapes or parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum PostprocessError {
    /// A slice length does not fit the others.
    Shape(String),
    /// A configuration value is out of range.
    Config(String),
}

impl fmt::Display for PostprocessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostprocessError::Shape(m) => write!(f, "postprocess shape error: {m}"),
            PostprocessError::Config(m) => write!(f, "postprocess config error: {m}"),
        }
    }
}

impl std::error::Error for PostprocessError {}

/// Inverse of the Faster R-CNN box coder without scale factors: `rel` = `[ty, tx, th, tw]`
/// relative to `anchor`; float32 operations in automl's order.
pub fn decode_box(rel: [f32; 4], anchor: BoxYxyx) -> BoxYxyx {
    let [ty, tx, th, tw] = rel;
    let ycenter_a = (anchor[0] + anchor[2]) / 2.0;
    let xcenter_a = (anchor[1] + anchor[3]) / 2.0;
    let ha = anchor[2] - anchor[0];
    let wa = anchor[3] - anchor[1];
    let w = tw.exp() * wa;
    let h = th.exp() * ha;
    let ycenter = ty * ha + ycenter_a;
    let xcenter = tx * wa + xcenter_a;
    [
        ycenter - h / 2.0,
        xcenter - w / 2.0,
        ycenter + h / 2.0,
        xcenter + w / 2.0,
    ]
}

/// [`decode_box`] over all anchors; `rel` holds 4 values per anchor.
pub fn decode_boxes(rel: &[f32], anchors: &[BoxYxyx]) -> Result<Vec<BoxYxyx>, PostprocessError> {
    if rel.len() != anchors.len() * 4 {
        return Err(PostprocessError::Shape(format!(
            "{} box regression values for {} anchors (need 4 per anchor)",
            rel.len(),
            anchors.len()
        )));
    }
    Ok(rel
        .chunks_exact(4)
        .zip(anchors)
        .map(|(r, a)| decode_box([r[0], r[1], r[2], r[3]], *a))
        .collect())
}

/// Logistic sigmoid in float32.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Indices of the `k` largest values, largest first; equal values keep index order
/// (TensorFlow's `top_k` prefers the lower index).
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let cmp = |&a: &usize, &b: &usize| values[b].total_cmp(&values[a]).then(a.cmp(&b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// IoU of two `[ymin, xmin, ymax, xmax]` boxes as TensorFlow's NMS measures it: corners
/// reordered, 0 when either box is empty, float32 arithmetic.
pub fn iou(a: &BoxYxyx, b: &BoxYxyx) -> f32 {
    let (ymin_a, xmin_a) = (a[0].min(a[2]), a[1].min(a[3]));
    let (ymax_a, xmax_a) = (a[0].max(a[2]), a[1].max(a[3]));
    let (ymin_b, xmin_b) = (b[0].min(b[2]), b[1].min(b[3]));
    let (ymax_b, xmax_b) = (b[0].max(b[2]), b[1].max(b[3]));
    let area_a = (ymax_a - ymin_a) * (xmax_a - xmin_a);
    let area_b = (ymax_b - ymin_b) * (xmax_b - xmin_b);
    if area_a <= 0.0 || area_b <= 0.0 {
        return 0.0;
    }
    let inter_h = (ymax_a.min(ymax_b) - ymin_a.max(ymin_b)).max(0.0);
    let inter_w = (xmax_a.min(xmax_b) - xmin_a.max(xmin_b)).max(0.0);
    let inter = inter_h * inter_w;
    inter / (area_a + area_b - inter)
}

/// Suppression rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NmsMethod {
    /// Drop boxes whose IoU with a kept box exceeds the threshold.
    Hard { iou_threshold: f32 },
    /// Multiply scores by `exp(-iou² / sigma)` for every kept box (Soft-NMS paper's σ;
    /// TensorFlow's `soft_nms_sigma` is σ / 2).
    Gaussian { sigma: f32 },
}

/// Parameters of one NMS call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NmsParams {
    pub method: NmsMethod,
    /// Boxes whose (decayed) score is not above this are dropped.
    pub score_threshold: f32,
    /// Most boxes returned.
    pub max_output: usize,
}

impl NmsParams {
    /// automl's evaluation default (`method: gaussian`, σ 0.5, score threshold 0.001,
    /// 100 boxes per class).
    pub fn automl_default() -> NmsParams {
        NmsParams {
            method: NmsMethod::Gaussian { sigma: 0.5 },
            score_threshold: 0.001,
            max_output: MAX_DETECTIONS,
        }
    }

    /// automl's `method: hard` with its defaults: IoU 0.5 and no score threshold.
    pub fn automl_hard() -> NmsParams {
        NmsParams {
            method: NmsMethod::Hard { iou_threshold: 0.5 },
            score_threshold: f32::NEG_INFINITY,
            max_output: MAX_DETECTIONS,
        }
    }
}

impl Default for NmsParams {
    fn default() -> Self {
        NmsParams::automl_default()
    }
}

/// A box kept by NMS: its index in the input and its (possibly decayed) score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kept {
    pub index: usize,
    pub score: f32,
}

/// Heap entry: highest score first, then lowest index.
#[derive(Clone, Copy)]
struct Candidate {
    index: usize,
    score: f32,
    /// Kept boxes before this position were already applied to `score`.
    checked: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Candidate {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then(o.index.cmp(&self.index))
    }
}

/// Greedy NMS with TensorFlow `NonMaxSuppressionV5` semantics, hard or Gaussian: candidates
/// above the score threshold are visited best first; a candidate's score is decayed lazily
/// by the boxes kept since it was last looked at (newest first), and it is kept only when
/// no decay happened in that pass, otherwise re-queued if still above the threshold.
/// Returns kept boxes in selection order (non-increasing score).
pub fn nms(
    boxes: &[BoxYxyx],
    scores: &[f32],
    p: &NmsParams,
) -> Result<Vec<Kept>, PostprocessError> {
    if boxes.len() != scores.len() {
        return Err(PostprocessError::Shape(format!(
            "{} boxes but {} scores",
            boxes.len(),
            scores.len()
        )));
    }
    let (soft, iou_threshold, scale) = match p.method {
        NmsMethod::Hard { iou_threshold } => (false, iou_threshold, 0.0f32),
        NmsMethod::Gaussian { sigma } => {
            if sigma.is_nan() || sigma <= 0.0 {
                return Err(PostprocessError::Config(format!(
                    "soft-NMS sigma must be > 0, got {sigma}"
                )));
            }
            // TensorFlow takes σ/2 and uses exp(-0.5 / (σ/2) · iou²).
            (true, 0.5, -0.5f32 / (sigma / 2.0))
        }
    };
    let weight = |sim: f32| -> f32 {
        let w = (scale * sim * sim).exp();
        if soft || sim <= iou_threshold {
            w
        } else {
            0.0
        }
    };
    let mut heap: BinaryHeap<Candidate> = scores
        .iter()
        .enumerate()
        .filter(|(_, &s)| s > p.score_threshold)
        .map(|(index, &score)| Candidate {
            index,
            score,
            checked: 0,
        })
        .collect();
    let mut kept: Vec<Kept> = Vec::new();
    while kept.len() < p.max_output {
        let Some(mut c) = heap.pop() else { break };
        let original = c.score;
        let mut hard_suppressed = false;
        for j in (c.checked..kept.len()).rev() {
            let sim = iou(&boxes[c.index], &boxes[kept[j].index]);
            c.score *= weight(sim);
            if !soft && sim > iou_threshold {
                hard_suppressed = true;
                break;
            }
            if c.score <= p.score_threshold {
                break;
            }
        }
        c.checked = kept.len();
        if hard_suppressed {
            continue;
        }
        if c.score == original {
            kept.push(Kept {
                index: c.index,
                score: c.score,
            });
        } else if c.score > p.score_threshold {
            heap.push(c);
        }
    }
    Ok(kept)
}

/// automl's numpy soft-NMS (`nms_np.soft_nms`, Gaussian): boxes are measured with the +1
/// pixel convention (`(x2 - x1 + 1) · (y2 - y1 + 1)`), every remaining score is decayed
/// after each pick, boxes at or above `score_threshold` stay, and there is no output cap.
/// The best box is always kept first, even below the threshold. Ties go to the first box
/// in the working order, which the swap of the picked row into first place permutes.
pub fn soft_nms_numpy(
    boxes: &[BoxYxyx],
    scores: &[f32],
    sigma: f32,
    score_threshold: f32,
) -> Result<Vec<Kept>, PostprocessError> {
    if boxes.len() != scores.len() {
        return Err(PostprocessError::Shape(format!(
            "{} boxes but {} scores",
            boxes.len(),
            scores.len()
        )));
    }
    // Working rows: (input index, x1, y1, x2, y2, score, area).
    let mut rows: Vec<(usize, [f32; 4], f32, f32)> = boxes
        .iter()
        .zip(scores)
        .enumerate()
        .map(|(i, (b, &s))| {
            let xy = [b[1], b[0], b[3], b[2]];
            let area = (xy[2] - xy[0] + 1.0) * (xy[3] - xy[1] + 1.0);
            (i, xy, s, area)
        })
        .collect();
    let mut kept = Vec::new();
    while !rows.is_empty() {
        let mut best = 0;
        for (i, r) in rows.iter().enumerate() {
            if r.2 > rows[best].2 {
                best = i;
            }
        }
        rows.swap(0, best);
        let (idx, b0, s0, a0) = rows[0];
        kept.push(Kept {
            index: idx,
            score: s0,
        });
        let mut next = Vec::with_capacity(rows.len() - 1);
        for &(i, b, s, a) in &rows[1..] {
            let w = (b0[2].min(b[2]) - b0[0].max(b[0]) + 1.0).max(0.0);
            let h = (b0[3].min(b[3]) - b0[1].max(b[1]) + 1.0).max(0.0);
            let inter = w * h;
            let ov = inter / (a0 + a - inter);
            let s = s * (-(ov * ov) / sigma).exp();
            if s >= score_threshold {
                next.push((i, b, s, a));
            }
        }
        rows = next;
    }
    Ok(kept)
}

/// Which NMS implementation the per-image post-processing runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NmsBackend {
    /// TensorFlow `NonMaxSuppressionV5` semantics ([`nms`]) — automl's default.
    TensorFlow(NmsParams),
    /// automl's numpy soft-NMS ([`soft_nms_numpy`]) with σ and score threshold.
    NumpySoft { sigma: f32, score_threshold: f32 },
}

/// Per-image post-processing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostprocessConfig {
    pub num_classes: usize,
    /// Pre-NMS top-k over all (anchor, class) logits; 0 keeps every anchor with only its
    /// best class (automl's fallback when `max_nms_inputs` is unset).
    pub max_nms_inputs: usize,
    pub nms: NmsBackend,
    /// Detections kept per image after merging the classes.
    pub max_detections: usize,
}

impl PostprocessConfig {
    /// automl's evaluation settings for `num_classes` classes.
    pub fn automl_eval(num_classes: usize) -> PostprocessConfig {
        PostprocessConfig {
            num_classes,
            max_nms_inputs: MAX_NMS_INPUTS,
            nms: NmsBackend::TensorFlow(NmsParams::automl_default()),
            max_detections: MAX_DETECTIONS,
        }
    }
}

impl Default for PostprocessConfig {
    fn default() -> Self {
        PostprocessConfig::automl_eval(90)
    }
}

/// One output detection in original-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// COCO `[x, y, width, height]`.
    pub bbox: [f32; 4],
    pub score: f32,
    /// COCO category id (0-based class + 1).
    pub category_id: i64,
}

/// Full evaluation post-processing of one image.
///
/// `cls_logits`: `anchors.len() × num_classes` logits, anchor-major (levels concatenated in
/// the order the anchors are given); `box_regs`: `anchors.len() × 4` regressions
/// `[ty, tx, th, tw]`; `image_scale`: original size / network input size. Returns at most
/// `max_detections` detections, best first.
pub fn postprocess_image(
    cls_logits: &[f32],
    box_regs: &[f32],
    anchors: &[BoxYxyx],
    image_scale: f32,
    cfg: &PostprocessConfig,
) -> Result<Vec<Detection>, PostprocessError> {
    let n = anchors.len();
    let c = cfg.num_classes;
    if c == 0 {
        return Err(PostprocessError::Config("num_classes must be > 0".into()));
    }
    if cls_logits.len() != n * c {
        return Err(PostprocessError::Shape(format!(
            "{} class logits for {n} anchors × {c} classes",
            cls_logits.len()
        )));
    }
    if box_regs.len() != n * 4 {
        return Err(PostprocessError::Shape(format!(
            "{} box regression values for {n} anchors (need 4 per anchor)",
            box_regs.len()
        )));
    }

    // (anchor, class, logit) of the NMS candidates, best logit first.
    let picks: Vec<(usize, usize, f32)> = if cfg.max_nms_inputs > 0 {
        top_k(cls_logits, cfg.max_nms_inputs)
            .into_iter()
            .map(|flat| (flat / c, flat % c, cls_logits[flat]))
            .collect()
    } else {
        (0..n)
            .map(|a| {
                let row = &cls_logits[a * c..(a + 1) * c];
                // argmax, first index on ties.
                let mut best = 0;
                for (j, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = j;
                    }
                }
                (a, best, row[best])
            })
            .collect()
    };

    // Per class, in candidate order: decoded boxes and sigmoid scores.
    let mut per_class: Vec<(Vec<BoxYxyx>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); c];
    for &(a, cls, logit) in &picks {
        let r = &box_regs[a * 4..a * 4 + 4];
        per_class[cls]
            .0
            .push(decode_box([r[0], r[1], r[2], r[3]], anchors[a]));
        per_class[cls].1.push(sigmoid(logit));
    }

    // Kept boxes of all classes, concatenated in class order.
    let mut merged: Vec<(BoxYxyx, f32, usize)> = Vec::new();
    for (cls, (boxes, scores)) in per_class.iter().enumerate() {
        if boxes.is_empty() {
            continue;
        }
        let kept = match cfg.nms {
            NmsBackend::TensorFlow(p) => nms(boxes, scores, &p)?,
            NmsBackend::NumpySoft {
                sigma,
                score_threshold,
            } => soft_nms_numpy(boxes, scores, sigma, score_threshold)?,
        };
        merged.extend(kept.iter().map(|k| (boxes[k.index], k.score, cls)));
    }
    // Best scores first, earlier entries first on ties (TensorFlow's sorted top_k).
    merged.sort_by(|a, b| b.1.total_cmp(&a.1));
    merged.truncate(cfg.max_detections);

    Ok(merged
        .into_iter()
        .map(|(b, score, cls)| {
            let [ymin, xmin, ymax, xmax] = b.map(|v| v * image_scale);
            Detection {
                bbox: [xmin, ymin, xmax - xmin, ymax - ymin],
                score,
                category_id: cls as i64 + CLASS_OFFSET,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_identity_and_hand_values() {
        let anchor = [10.0, 20.0, 50.0, 100.0]; // center (30, 60), h 40, w 80
        assert_eq!(decode_box([0.0; 4], anchor), anchor);
        // ty 0.5 → center y 30 + 0.5·40 = 50; tx -0.25 → 60 - 20 = 40;
        // th ln 2 → h 80 (exp rounds: check within an ulp); tw 0 → w 80.
        let b = decode_box([0.5, -0.25, 2f32.ln(), 0.0], anchor);
        assert!(
            (b[0] - 10.0).abs() < 1e-5 && (b[2] - 90.0).abs() < 1e-5,
            "{b:?}"
        );
        assert_eq!((b[1], b[3]), (0.0, 80.0));
        let all = decode_boxes(&[0.0, 0.0, 0.0, 0.0, 0.5, -0.25, 0.0, 0.0], &[anchor; 2]).unwrap();
        assert_eq!(all[1], [30.0, 0.0, 70.0, 80.0]);
        assert!(decode_boxes(&[0.0; 7], &[anchor; 2]).is_err());
    }

    #[test]
    fn top_k_prefers_lower_index_on_ties() {
        let v = [0.1, 0.9, 0.5, 0.9, -1.0, 0.5];
        assert_eq!(top_k(&v, 3), vec![1, 3, 2]);
        assert_eq!(top_k(&v, 4), vec![1, 3, 2, 5]);
        assert_eq!(top_k(&v, 10), vec![1, 3, 2, 5, 0, 4]);
        assert!(top_k(&v, 0).is_empty());
    }

    #[test]
    fn iou_hand_values() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(iou(&a, &[0.0, 5.0, 10.0, 15.0]), 50.0 / 150.0);
        assert_eq!(iou(&a, &a), 1.0);
        // Corners given in the wrong order are swapped back.
        assert_eq!(iou(&a, &[10.0, 15.0, 0.0, 5.0]), 50.0 / 150.0);
        assert_eq!(iou(&a, &[5.0, 5.0, 5.0, 9.0]), 0.0);
        assert_eq!(iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
    }

    fn hard(t: f32) -> NmsParams {
        NmsParams {
            method: NmsMethod::Hard { iou_threshold: t },
            score_threshold: f32::NEG_INFINITY,
            max_output: 100,
        }
    }

    #[test]
    fn hard_nms_suppresses_only_above_the_threshold() {
        // IoU with box 0: exactly 0.5 (kept: suppression needs > threshold) and 0.6 (dropped).
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 5.0],
            [0.0, 0.0, 10.0, 6.0],
            [50.0, 50.0, 60.0, 60.0],
        ];
        let scores = [0.9, 0.8, 0.85, 0.1];
        let kept = nms(&boxes, &scores, &hard(0.5)).unwrap();
        let idx: Vec<usize> = kept.iter().map(|k| k.index).collect();
        assert_eq!(idx, vec![0, 1, 3]);
        assert_eq!(kept[1].score, 0.8);
        let kept = nms(&boxes, &scores, &hard(0.4)).unwrap();
        assert_eq!(kept.iter().map(|k| k.index).collect::<Vec<_>>(), vec![0, 3]);
        let capped = nms(
            &boxes,
            &scores,
            &NmsParams {
                max_output: 2,
                ..hard(0.5)
            },
        )
        .unwrap();
        assert_eq!(capped.len(), 2);
        // Equal scores: lower index first.
        let kept = nms(&boxes[..2], &[0.5, 0.5], &hard(0.9)).unwrap();
        assert_eq!((kept[0].index, kept[1].index), (0, 1));
    }

    #[test]
    fn gaussian_soft_nms_decays_by_hand_computed_weights() {
        // Box 1 overlaps box 0 with IoU 0.5: score 0.8 · exp(-0.25 / 0.5) = 0.8 · e^-0.5.
        // Box 2 overlaps box 0 with IoU 0.6 and box 1 with IoU 5/7 (heights 6 and 5 over 10).
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 5.0],
            [0.0, 0.0, 10.0, 6.0],
        ];
        let scores = [0.9f32, 0.8, 0.7];
        let kept = nms(&boxes, &scores, &NmsParams::automl_default()).unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!((kept[0].index, kept[0].score), (0, 0.9));
        let s1 = 0.8f32 * (-2.0f32 * 0.5 * 0.5).exp();
        let iou02 = iou(&boxes[0], &boxes[2]);
        let s2_after0 = 0.7f32 * (-2.0f32 * iou02 * iou02).exp();
        // 0.8·e^-0.5 = 0.485 > 0.7·e^-0.72 = 0.340: box 1 next, then box 2 decayed by it.
        assert_eq!((kept[1].index, kept[1].score), (1, s1));
        let iou12 = iou(&boxes[1], &boxes[2]);
        assert_eq!(iou12, 5.0 / 6.0);
        let s2 = s2_after0 * (-2.0f32 * iou12 * iou12).exp();
        assert_eq!((kept[2].index, kept[2].score), (2, s2));
        assert!((s1 - 0.8 * (-0.5f32).exp()).abs() < 1e-7);
        // A decayed score not above the threshold drops the box.
        let p = NmsParams {
            score_threshold: 0.2,
            ..NmsParams::automl_default()
        };
        let kept = nms(&boxes, &scores, &p).unwrap();
        assert_eq!(kept.iter().map(|k| k.index).collect::<Vec<_>>(), vec![0, 1]);
        // Scores at or below the threshold never enter.
        let kept = nms(&boxes, &[0.9, 0.001, 0.0005], &NmsParams::automl_default()).unwrap();
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn numpy_soft_nms_uses_plus_one_areas_and_keeps_at_threshold() {
        // yxyx boxes; in x1,y1,x2,y2 with +1: areas 11·11 = 121 and 11·6 = 66, overlap 66.
        let boxes = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 10.0]];
        let kept = soft_nms_numpy(&boxes, &[0.9, 0.8], 0.5, 0.001).unwrap();
        let ov = 66.0f32 / (121.0 + 66.0 - 66.0);
        assert_eq!(kept[1].score, 0.8 * (-(ov * ov) / 0.5).exp());
        // The top box is kept even below the threshold; others need >= threshold.
        let kept = soft_nms_numpy(&boxes, &[0.0005, 0.0001], 0.5, 0.001).unwrap();
        assert_eq!(kept.len(), 1);
        let far = [[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]];
        assert_eq!(
            soft_nms_numpy(&far, &[0.5, 0.001], 0.5, 0.001)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn postprocess_image_end_to_end() {
        // Two anchors, three classes. Anchor 0: class 1 strong; anchor 1: class 2 weaker,
        // class 0 below the score threshold after sigmoid.
        let anchors = [[0.0, 0.0, 10.0, 20.0], [100.0, 100.0, 140.0, 120.0]];
        let logits = [-5.0, 3.0, -8.0, -7.0, -9.0, 1.0];
        let regs = [0.0; 8];
        let cfg = PostprocessConfig::automl_eval(3);
        let d = postprocess_image(&logits, &regs, &anchors, 2.0, &cfg).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].category_id, 2);
        assert_eq!(d[0].score, sigmoid(3.0));
        // yxyx [0,0,10,20] · 2 → x 0, y 0, w 40, h 20.
        assert_eq!(d[0].bbox, [0.0, 0.0, 40.0, 20.0]);
        assert_eq!(d[1].category_id, 3);
        assert_eq!(d[1].bbox, [200.0, 200.0, 40.0, 80.0]);
        // Class 0 of anchor 0: sigmoid(-5) = 0.0067 > 0.001 stays; class 0 of anchor 1
        // (sigmoid(-7) = 0.0009) does not.
        assert_eq!(d[2].category_id, 1);
        assert!(d.iter().all(|x| x.score > 0.001));
        // Top-k 2 keeps only the two best logits.
        let cfg2 = PostprocessConfig {
            max_nms_inputs: 2,
            ..cfg
        };
        let d2 = postprocess_image(&logits, &regs, &anchors, 2.0, &cfg2).unwrap();
        assert_eq!(
            d2.iter().map(|x| x.category_id).collect::<Vec<_>>(),
            vec![2, 3]
        );
        // max_nms_inputs 0: only each anchor's best class.
        let cfg0 = PostprocessConfig {
            max_nms_inputs: 0,
            ..cfg
        };
        let d0 = postprocess_image(&logits, &regs, &anchors, 1.0, &cfg0).unwrap();
        assert_eq!(
            d0.iter().map(|x| x.category_id).collect::<Vec<_>>(),
            vec![2, 3]
        );
        // Per-image cap.
        let cfg1 = PostprocessConfig {
            max_detections: 1,
            ..cfg
        };
        assert_eq!(
            postprocess_image(&logits, &regs, &anchors, 1.0, &cfg1)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn postprocess_rejects_bad_shapes() {
        let anchors = [[0.0, 0.0, 1.0, 1.0]];
        let cfg = PostprocessConfig::automl_eval(2);
        assert!(postprocess_image(&[0.0; 3], &[0.0; 4], &anchors, 1.0, &cfg).is_err());
        assert!(postprocess_image(&[0.0; 2], &[0.0; 3], &anchors, 1.0, &cfg).is_err());
        let bad = PostprocessConfig {
            num_classes: 0,
            ..cfg
        };
        assert!(postprocess_image(&[], &[0.0; 4], &anchors, 1.0, &bad).is_err());
        let p = NmsParams {
            method: NmsMethod::Gaussian { sigma: 0.0 },
            ..NmsParams::automl_default()
        };
        assert!(nms(&[[0.0; 4]], &[1.0], &p).is_err());
    }
}
