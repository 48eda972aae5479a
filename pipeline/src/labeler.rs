//! Anchor labeling (training target assignment), bit-compatible with automl's `AnchorLabeler`
//! (IoU similarity → `ArgMaxMatcher` with `force_match_for_each_row` → `TargetAssigner` with
//! the Faster R-CNN box coder, no scale factors).
//!
//! This module owns the matching rules and the fast grid search that applies them. Semantics
//! reproduced from the reference, all in `f32`:
//! - IoU = `inter / ((area_gt + area_anchor) - inter)`, and exactly 0 when `inter == 0`.
//! - Each anchor takes the ground-truth box (GT) of highest IoU, the lowest GT index on ties,
//!   when that IoU is `>= threshold`; otherwise it is background. Matched and unmatched
//!   thresholds are equal, so no anchor is ever "ignored" (the reference's -2 never occurs).
//! - Force match: every GT claims its best anchor (highest IoU, lowest anchor index on ties;
//!   a GT overlapping no anchor — zero area, inverted, or outside every anchor — claims anchor
//!   0). A claimed anchor goes to its claimer even if another GT has a higher IoU with it;
//!   when several GTs claim one anchor the lowest GT index wins.
//! - Class target = class id − 1 for matched anchors, −1 for background; box targets are
//!   `(ty, tx, th, tw)` of the matched GT relative to the anchor (sizes floored at 1e-8),
//!   zeros for background; `num_positives` = number of matched anchors. The log terms use
//!   [`tf_logf`], an emulation of TensorFlow's CPU float log, so all four are bit-identical.
//! - Stricter than the reference on bad input: non-finite or huge coordinates and class ids
//!   below 1 (which would alias background) are errors instead of silent garbage.
//!
//! Speed: instead of the full `boxes × anchors` IoU matrix, each GT only visits anchors that
//! can reach a given IoU. Anchors lie on per-level grids, so for an anchor shape the condition
//! `IoU >= t` bounds the row overlap `ih` from below (see `row_bound`), which confines
//! candidate rows and columns to a window around the box. The window is computed with rounding
//! margins and then every candidate is evaluated with the reference's exact `f32` formula, so
//! the result equals the full scan bit for bit. One search per GT serves both rules: it runs
//! with `t = min(threshold, s)`, where `s` is the best IoU among 45 seed anchors (the grid cell
//! nearest the box center, for every level and shape). `s` is a lower bound of the box's best
//! IoU, so the window holds every anchor that can tie or beat it (force match) as well as every
//! anchor at or above the threshold. If no candidate overlaps the box, no anchor does, and the
//! force match is anchor 0 as in the reference.

use crate::anchors::{Anchors, LevelInfo};

/// Reference `EPSILON` of the Faster R-CNN coder, applied to heights and widths.
const CODER_EPSILON: f32 = 1e-8;
/// Largest accepted |coordinate| in pixels; keeps areas far from `f32` overflow.
pub const MAX_COORD: f32 = 1e7;

/// Bad labeler input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LabelError {
    #[error("{boxes} boxes but {classes} classes")]
    LengthMismatch { boxes: usize, classes: usize },
    #[error("box {index} has a non-finite or out-of-range coordinate: {coords:?}")]
    BadBox { index: usize, coords: [f32; 4] },
    #[error("box {index} has class id {class}; class ids start at 1")]
    BadClass { index: usize, class: i32 },
    #[error(
        "box {index} has class id {class}, but the model predicts {num_classes} classes \
         (ids 1..={num_classes}); set head.num_classes to at least the largest category id"
    )]
    ClassOutOfRange {
        index: usize,
        class: i32,
        num_classes: usize,
    },
    #[error("match threshold must be in (0, 1], got {0}")]
    BadThreshold(f32),
    #[error("more than {0} boxes")]
    TooManyBoxes(usize),
}

/// Per-image training targets, caller-owned and reused across calls.
///
/// Read-only from outside: keeping the buffers private lets [`Labeler::label_into`] reset
/// only the anchors it wrote last time instead of rewriting all of them per image.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    cls: Vec<i32>,
    boxes: Vec<f32>,
    num_positives: f32,
    /// Matched anchors of the last labeling, in increasing order.
    positives: Vec<u32>,
    scratch: Scratch,
}

impl Targets {
    /// Empty targets sized for `anchors`.
    pub fn new(anchors: &Anchors) -> Self {
        let n = anchors.num_anchors();
        Targets {
            cls: vec![-1; n],
            boxes: vec![0.0; 4 * n],
            ..Default::default()
        }
    }
    /// Class target per anchor, level-major (`[H, W, A]` per level): class id − 1, or −1.
    pub fn cls(&self) -> &[i32] {
        &self.cls
    }
    /// Box target per anchor (`[H, W, A * 4]` per level): `ty, tx, th, tw`, zeros if unmatched.
    pub fn boxes(&self) -> &[f32] {
        &self.boxes
    }
    /// Number of matched anchors, as the reference reports it (float).
    pub fn num_positives(&self) -> f32 {
        self.num_positives
    }
    /// Indices of the matched anchors, increasing.
    pub fn positives(&self) -> &[u32] {
        &self.positives
    }
    /// Box target of one anchor; panics past the end like slice indexing.
    pub fn box_target(&self, anchor: usize) -> [f32; 4] {
        let b = &self.boxes[4 * anchor..4 * anchor + 4];
        [b[0], b[1], b[2], b[3]]
    }
    /// Class targets of one level, `[H, W, A]` row-major.
    pub fn level_cls(&self, level: &LevelInfo) -> &[i32] {
        &self.cls[level.anchor_range()]
    }
    /// Box targets of one level, `[H, W, A * 4]` row-major.
    pub fn level_boxes(&self, level: &LevelInfo) -> &[f32] {
        &self.boxes[level.box_range()]
    }

    /// Brings the buffers to `n` anchors, all background.
    fn reset(&mut self, n: usize) {
        if self.cls.len() != n || self.boxes.len() != 4 * n {
            self.cls.clear();
            self.cls.resize(n, -1);
            self.boxes.clear();
            self.boxes.resize(4 * n, 0.0);
        } else {
            for &a in &self.positives {
                let a = a as usize;
                self.cls[a] = -1;
                self.boxes[4 * a..4 * a + 4].fill(0.0);
            }
        }
        self.positives.clear();
        self.num_positives = 0.0;
    }
}

/// A matched anchor while labeling one image.
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    anchor: u32,
    gt: u32,
    iou: f32,
    forced: bool,
}

/// Reusable working memory. Invariant between calls: every `slot` is `u32::MAX`.
#[derive(Debug, Clone, Default)]
struct Scratch {
    slot: Vec<u32>,
    entries: Vec<Entry>,
    forced: Vec<u32>,
    /// Candidate rows of the shape being searched: (row, overlap, anchor height).
    rows: Vec<(usize, f32, f32)>,
}

impl Scratch {
    fn ensure(&mut self, n: usize) {
        if self.slot.len() != n {
            self.slot.clear();
            self.slot.resize(n, u32::MAX);
        }
    }
}

/// Assigns classification and box-regression targets to anchors.
#[derive(Debug, Clone)]
pub struct Labeler {
    anchors: Anchors,
    threshold: f32,
    /// Largest class id accepted, when set ([`Labeler::with_num_classes`]).
    num_classes: Option<usize>,
}

/// The reference IoU of a GT box (with its precomputed area) and an anchor, op for op in f32.
#[inline(always)]
pub fn iou(gt: &[f32; 4], gt_area: f32, a: &[f32; 4]) -> f32 {
    let ih = (gt[2].min(a[2]) - gt[0].max(a[0])).max(0.0);
    let iw = (gt[3].min(a[3]) - gt[1].max(a[1])).max(0.0);
    iou_from_parts(ih, iw, gt_area, (a[2] - a[0]) * (a[3] - a[1]))
}

#[inline(always)]
fn iou_from_parts(ih: f32, iw: f32, gt_area: f32, anchor_area: f32) -> f32 {
    let inter = ih * iw;
    if inter == 0.0 {
        0.0
    } else {
        inter / ((gt_area + anchor_area) - inter)
    }
}

/// Reference area of a box: `(ymax - ymin) * (xmax - xmin)` in f32.
#[inline(always)]
pub fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Width of TensorFlow's CPU float packets (AVX build). Element-wise kernels run over the
/// whole per-anchor tensor in packets of this many values and finish the last
/// `num_anchors % TF_PACKET` values with the scalar libm function instead.
pub const TF_PACKET: usize = 8;

/// Faster R-CNN encoding `(ty, tx, th, tw)` of `gt` relative to anchor number `index` of
/// `num_anchors`, bit-identical to the reference: the log comes from [`tf_logf`], except for
/// the last `num_anchors % TF_PACKET` anchors, whose log TF computes with scalar `logf`.
pub fn encode_at(gt: &[f32; 4], anchor: &[f32; 4], index: usize, num_anchors: usize) -> [f32; 4] {
    if index >= num_anchors - num_anchors % TF_PACKET {
        encode_with(gt, anchor, f32::ln)
    } else {
        encode_with(gt, anchor, tf_logf)
    }
}

/// Faster R-CNN encoding `(ty, tx, th, tw)` of `gt` relative to `anchor`, as the reference's
/// coder computes it in f32 (centers from unclamped sizes, sizes floored at 1e-8), with TF's
/// packet log; see [`encode_at`] for the anchors at the very end of the table.
pub fn encode(gt: &[f32; 4], anchor: &[f32; 4]) -> [f32; 4] {
    encode_with(gt, anchor, tf_logf)
}

#[inline(always)]
fn encode_with(gt: &[f32; 4], anchor: &[f32; 4], log: impl Fn(f32) -> f32) -> [f32; 4] {
    let ha = anchor[2] - anchor[0];
    let wa = anchor[3] - anchor[1];
    let yca = anchor[0] + ha / 2.0;
    let xca = anchor[1] + wa / 2.0;
    let h = gt[2] - gt[0];
    let w = gt[3] - gt[1];
    let yc = gt[0] + h / 2.0;
    let xc = gt[1] + w / 2.0;
    let ha = ha.max(CODER_EPSILON);
    let wa = wa.max(CODER_EPSILON);
    let h = h.max(CODER_EPSILON);
    let w = w.max(CODER_EPSILON);
    let ty = (yc - yca) / ha;
    let tx = (xc - xca) / wa;
    let th = log(h / ha);
    let tw = log(w / wa);
    [ty, tx, th, tw]
}

/// Natural log of an `f32` exactly as TensorFlow's CPU `Log` kernel rounds it (Eigen's
/// vectorized float log without FMA): split `x = m * 2^e` with `m` in `[sqrt(1/2), sqrt(2))`,
/// approximate `ln(m)` by a rational function of `m - 1`, add `e * ln 2`, every step rounded to
/// f32. It differs from the correctly rounded log by up to 3 ulp on ~10% of inputs, so using
/// it keeps `th`/`tw` bit-identical to the reference. Valid for positive normal `x` (box
/// ratios always are: sizes are floored at 1e-8 and bounded by [`MAX_COORD`]); anything else
/// falls back to the correctly rounded log.
pub fn tf_logf(x: f32) -> f32 {
    if !(x.is_normal() && x > 0.0) {
        return (x as f64).ln() as f32;
    }
    let bits = x.to_bits();
    // frexp: mantissa in [0.5, 1), exponent so that x = m * 2^e.
    let mut m = f32::from_bits((bits & 0x807f_ffff) | (126 << 23));
    let mut e = ((bits >> 23) & 0xff) as f32 - 126.0;
    // Recentre to [sqrt(1/2), sqrt(2)) and shift by one.
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    let extra = if small { m } else { 0.0 };
    m -= 1.0;
    if small {
        e -= 1.0;
    }
    m += extra;
    // Eigen's coefficients as they round to f32 (two of them round to exactly 1 and 1.5).
    const A: [f32; 3] = [0.182_562_96, 1.0, 1.0];
    const B: [f32; 4] = [0.049_616_247, 0.599_232_5, 1.5, 1.0];
    let mut p = A[0];
    for c in &A[1..] {
        p = p * m + c;
    }
    let p = m * p;
    let mut q = B[0];
    for c in &B[1..] {
        q = q * m + c;
    }
    e * std::f32::consts::LN_2 + p / q
}

/// Lower bound on the row overlap `ih` of any anchor of one shape whose f32 IoU with the GT is
/// `>= t` (`t > 0`). From `IoU >= t` ⇔ `inter * (1 + t) >= t * (area_gt + area_a)` (up to a few
/// f32 roundings, covered by the 1e-5 relative margin), `inter <= ih * min(w_a, w_gt)` and
/// `area_a >= h_min * w_min`. The column bound is the same with the axes swapped.
#[inline]
fn row_bound(
    t: f32,
    gt_area: f32,
    other_min_a: f32,
    own_min_a: f32,
    other_max_a: f32,
    other_gt: f32,
) -> f64 {
    let t = t as f64;
    let c = t / (1.0 + t) * (1.0 - 1e-5);
    c * (gt_area as f64 + own_min_a as f64 * other_min_a as f64)
        / (other_max_a.min(other_gt) as f64)
}

/// Indices `k` of `centers` (an increasing grid) with `lo <= centers[k] <= hi`, widened by one
/// cell on each side so rounding never drops a row (anchor coordinates differ from the f64
/// window by ~1e-4 px, a cell is >= 2 px); callers re-check every row exactly.
#[inline]
fn grid_range(centers: &[f64], step: f64, lo: f64, hi: f64) -> (usize, usize) {
    let n = centers.len() as f64;
    let start = centers[0];
    let a = ((lo - start) / step).ceil() - 1.0;
    let b = ((hi - start) / step).floor() + 1.0;
    let a = a.max(0.0);
    let b = b.min(n - 1.0);
    if a > b {
        return (1, 0);
    }
    (a as usize, b as usize)
}

impl Labeler {
    /// Labeler with the automl default threshold 0.5.
    pub fn new(anchors: Anchors) -> Self {
        Labeler {
            anchors,
            threshold: 0.5,
            num_classes: None,
        }
    }

    /// Rejects class ids above `num_classes` ([`LabelError::ClassOutOfRange`]). Without it
    /// any id ≥ 1 is labeled, and an id the model has no logit for would only fail in the loss.
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = Some(num_classes);
        self
    }

    /// Labeler with another match threshold (used as both matched and unmatched threshold).
    pub fn with_threshold(anchors: Anchors, threshold: f32) -> Result<Self, LabelError> {
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(LabelError::BadThreshold(threshold));
        }
        Ok(Labeler {
            anchors,
            threshold,
            num_classes: None,
        })
    }

    pub fn anchors(&self) -> &Anchors {
        &self.anchors
    }
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Targets buffer sized for this labeler's anchors.
    pub fn new_targets(&self) -> Targets {
        Targets::new(&self.anchors)
    }

    fn validate(&self, boxes: &[[f32; 4]], classes: &[i32]) -> Result<(), LabelError> {
        if boxes.len() != classes.len() {
            return Err(LabelError::LengthMismatch {
                boxes: boxes.len(),
                classes: classes.len(),
            });
        }
        if boxes.len() >= u32::MAX as usize {
            return Err(LabelError::TooManyBoxes(u32::MAX as usize - 1));
        }
        for (index, b) in boxes.iter().enumerate() {
            if b.iter().any(|v| !v.is_finite() || v.abs() > MAX_COORD) {
                return Err(LabelError::BadBox { index, coords: *b });
            }
        }
        for (index, &class) in classes.iter().enumerate() {
            if class < 1 {
                return Err(LabelError::BadClass { index, class });
            }
            if let Some(num_classes) = self.num_classes {
                if class as usize > num_classes {
                    return Err(LabelError::ClassOutOfRange {
                        index,
                        class,
                        num_classes,
                    });
                }
            }
        }
        Ok(())
    }

    /// Labels all anchors for one image. `boxes` are `(ymin, xmin, ymax, xmax)` in pixels of
    /// the (resized) input image, `classes` their COCO category ids (>= 1). `out` is resized
    /// if needed and fully overwritten.
    pub fn label_into(
        &self,
        boxes: &[[f32; 4]],
        classes: &[i32],
        out: &mut Targets,
    ) -> Result<(), LabelError> {
        self.validate(boxes, classes)?;
        let n = self.anchors.num_anchors();
        out.reset(n);
        let scratch = &mut out.scratch;
        scratch.ensure(n);
        scratch.entries.clear();
        scratch.forced.clear();

        for (g, gt) in boxes.iter().enumerate() {
            let best = self.search(g as u32, gt, scratch);
            scratch.forced.push(best);
        }
        // Force matches override threshold matches; the lowest GT index claims first.
        for g in 0..scratch.forced.len() {
            let a = scratch.forced[g];
            let s = scratch.slot[a as usize];
            if s == u32::MAX {
                scratch.slot[a as usize] = scratch.entries.len() as u32;
                scratch.entries.push(Entry {
                    anchor: a,
                    gt: g as u32,
                    iou: 0.0,
                    forced: true,
                });
            } else {
                let e = &mut scratch.entries[s as usize];
                if !e.forced {
                    e.forced = true;
                    e.gt = g as u32;
                }
            }
        }
        let table = self.anchors.boxes();
        for e in &scratch.entries {
            let a = e.anchor as usize;
            scratch.slot[a] = u32::MAX;
            let g = e.gt as usize;
            out.cls[a] = classes[g] - 1;
            let anchor = [
                table[4 * a],
                table[4 * a + 1],
                table[4 * a + 2],
                table[4 * a + 3],
            ];
            out.boxes[4 * a..4 * a + 4].copy_from_slice(&encode_at(&boxes[g], &anchor, a, n));
        }
        out.positives
            .extend(scratch.entries.iter().map(|e| e.anchor));
        out.positives.sort_unstable();
        out.num_positives = scratch.entries.len() as f32;
        Ok(())
    }

    /// Records threshold matches of GT `g` into `scratch` and returns its force-match anchor.
    fn search(&self, g: u32, gt: &[f32; 4], scratch: &mut Scratch) -> u32 {
        let hb = gt[2] - gt[0];
        let wb = gt[3] - gt[1];
        // Zero-area or inverted boxes intersect nothing: their IoU row is all zeros, so the
        // reference's argmax picks anchor 0 and no anchor reaches the threshold.
        if !(hb > 0.0 && wb > 0.0) {
            return 0;
        }
        let gt_area = area(gt);
        let mut best_iou = 0.0f32;
        let mut best_idx = u32::MAX;
        let per_loc = self.anchors.per_location();
        let levels = self.anchors.levels();

        // Seeds: the grid cell nearest to the box center, for every level and shape.
        let cyb = (gt[0] as f64 + gt[2] as f64) / 2.0;
        let cxb = (gt[1] as f64 + gt[3] as f64) / 2.0;
        for (info, grid) in levels.iter().zip(&self.anchors.grids) {
            let i = nearest(&grid.cy, info.stride_y, cyb);
            let j = nearest(&grid.cx, info.stride_x, cxb);
            let cell = info.offset + (i * info.width + j) * per_loc;
            for (s, sh) in grid.shapes.iter().enumerate() {
                let a = [sh.y0[i], sh.x0[j], sh.y1[i], sh.x1[j]];
                let v = iou(gt, gt_area, &a);
                let idx = (cell + s) as u32;
                if v > best_iou || (v == best_iou && v > 0.0 && idx < best_idx) {
                    best_iou = v;
                    best_idx = idx;
                }
            }
        }

        let t = best_iou.min(self.threshold);
        let mut rows = std::mem::take(&mut scratch.rows);
        for (info, grid) in levels.iter().zip(&self.anchors.grids) {
            for (s, sh) in grid.shapes.iter().enumerate() {
                // Required overlaps along y and x (0 = any positive overlap).
                let (ky, kx) = if t > 0.0 {
                    (
                        row_bound(t, gt_area, sh.w_min, sh.h_min, sh.w_max, wb),
                        row_bound(t, gt_area, sh.h_min, sh.w_min, sh.h_max, hb),
                    )
                } else {
                    (0.0, 0.0)
                };
                // ih <= min(h_anchor, h_gt) exactly, so a larger requirement rules out the shape.
                if ky > sh.h_max.min(hb) as f64 || kx > sh.w_max.min(wb) as f64 {
                    continue;
                }
                let (i0, i1) = grid_range(
                    &grid.cy,
                    info.stride_y,
                    gt[0] as f64 + ky - sh.half_h,
                    gt[2] as f64 - ky + sh.half_h,
                );
                rows.clear();
                for i in i0..=i1 {
                    let ih = (gt[2].min(sh.y1[i]) - gt[0].max(sh.y0[i])).max(0.0);
                    if ih > 0.0 && ih as f64 >= ky {
                        rows.push((i, ih, sh.y1[i] - sh.y0[i]));
                    }
                }
                if rows.is_empty() {
                    continue;
                }
                let (j0, j1) = grid_range(
                    &grid.cx,
                    info.stride_x,
                    gt[1] as f64 + kx - sh.half_w,
                    gt[3] as f64 - kx + sh.half_w,
                );
                if j1 < j0 {
                    continue;
                }
                for j in j0..=j1 {
                    let iw = (gt[3].min(sh.x1[j]) - gt[1].max(sh.x0[j])).max(0.0);
                    if !(iw > 0.0 && iw as f64 >= kx) {
                        continue;
                    }
                    let wa = sh.x1[j] - sh.x0[j];
                    for &(i, ih, ha) in &rows {
                        let v = iou_from_parts(ih, iw, gt_area, ha * wa);
                        let idx = (info.offset + (i * info.width + j) * per_loc + s) as u32;
                        if v > best_iou || (v == best_iou && v > 0.0 && idx < best_idx) {
                            best_iou = v;
                            best_idx = idx;
                        }
                        if v >= self.threshold {
                            record(scratch, idx, g, v);
                        }
                    }
                }
            }
        }
        scratch.rows = rows;
        if best_iou > 0.0 {
            best_idx
        } else {
            0
        }
    }

    /// Convenience: label and return fresh targets.
    pub fn label(&self, boxes: &[[f32; 4]], classes: &[i32]) -> Result<Targets, LabelError> {
        let mut t = self.new_targets();
        self.label_into(boxes, classes, &mut t)?;
        Ok(t)
    }
}

/// Threshold match of anchor `idx` to GT `g`: keeps the highest IoU, the earliest GT on ties
/// (GTs are visited in increasing order, so only a strictly higher IoU replaces).
#[inline]
fn record(scratch: &mut Scratch, idx: u32, g: u32, v: f32) {
    let s = scratch.slot[idx as usize];
    if s == u32::MAX {
        scratch.slot[idx as usize] = scratch.entries.len() as u32;
        scratch.entries.push(Entry {
            anchor: idx,
            gt: g,
            iou: v,
            forced: false,
        });
    } else {
        let e = &mut scratch.entries[s as usize];
        if v > e.iou {
            e.iou = v;
            e.gt = g;
        }
    }
}

/// Grid index whose center is nearest to `c` (clamped to the grid).
#[inline]
fn nearest(centers: &[f64], step: f64, c: f64) -> usize {
    let k = ((c - centers[0]) / step).round();
    k.clamp(0.0, (centers.len() - 1) as f64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (input bits, TensorFlow 2.21 CPU `tf.math.log` output bits). The first twelve are
    /// inputs where TF is 2–3 ulp away from the correctly rounded log.
    const TF_LOG: [(u32, u32); 16] = [
        (0x3fcc3ab0, 0x3eef3688),
        (0x3f379aa2, 0xbeaa2fcd),
        (0x3fa264ef, 0x3e73b573),
        (0x3f2d52d1, 0xbec7b063),
        (0x3f4e7af4, 0xbe5c21bf),
        (0x3f9d32b2, 0x3e526850),
        (0x3f352cc5, 0xbeb10182),
        (0x3f8c3c7f, 0x3dbafacc),
        (0x3fa19baf, 0x3e6ebd5c),
        (0x3f8dc385, 0x3dd12a66),
        (0x3fa1016c, 0x3e6aea18),
        (0x3fa09f37, 0x3e6878bc),
        (0x2fabcc77, 0xc1af1762),
        (0x3f880000, 0x3d785186),
        (0x3f000000, 0xbf317218),
        (0x40000000, 0x3f317218),
    ];

    #[test]
    fn log_matches_tensorflow_bits() {
        for (x, y) in TF_LOG {
            let got = tf_logf(f32::from_bits(x));
            assert_eq!(
                got.to_bits(),
                y,
                "log({}) = {got}, TF {}",
                f32::from_bits(x),
                f32::from_bits(y)
            );
        }
        assert_eq!(tf_logf(1.0), 0.0);
    }

    /// Full check against a dump of TF outputs: `TF_LOG_DUMP=in.f32,out.f32` (raw little-endian).
    #[test]
    fn log_matches_tensorflow_dump() {
        let Ok(spec) = std::env::var("TF_LOG_DUMP") else {
            println!("skipped: TF_LOG_DUMP not set");
            return;
        };
        let (a, b) = spec.split_once(',').expect("TF_LOG_DUMP=in,out");
        let read = |p: &str| -> Vec<f32> {
            std::fs::read(p)
                .unwrap()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (xs, ys) = (read(a), read(b));
        assert_eq!(xs.len(), ys.len());
        let bad = xs
            .iter()
            .zip(&ys)
            .filter(|(x, y)| tf_logf(**x).to_bits() != y.to_bits())
            .count();
        assert_eq!(bad, 0, "{bad} of {} differ", xs.len());
        println!("{} values bit-identical", xs.len());
    }

    #[test]
    fn encode_hand_values() {
        // Box centred 3 px below and 1 px left of a 32 px anchor, 34 px on each side.
        let t = encode(&[70.0, 66.0, 104.0, 100.0], &[68.0, 68.0, 100.0, 100.0]);
        assert_eq!(t[..2], [0.09375, -0.03125]);
        assert!((t[2] as f64 - (34.0f64 / 32.0).ln()).abs() < 1e-7);
        assert_eq!(t[2], t[3]);
    }
}
