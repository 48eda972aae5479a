//! Naive reference labeler for tests and timing: builds the full `boxes × anchors` IoU matrix
//! and applies automl's ArgMaxMatcher / TargetAssigner rules literally (argmax with first-index
//! ties, thresholds, force match through one-hot argmax). Independent of the fast grid search.

#![allow(dead_code)]

// The coder arithmetic (incl. TF's float log) is shared; matching is what this checks.
use effdet_pipeline::labeler::encode_at;

/// Result of the naive labeler: class targets, box targets, number of matched anchors.
pub struct NaiveTargets {
    pub cls: Vec<i32>,
    pub boxes: Vec<f32>,
    pub num_positives: f32,
}

fn pair_iou(g: &[f32; 4], a: &[f32]) -> f32 {
    let ih = 0f32.max(g[2].min(a[2]) - g[0].max(a[0]));
    let iw = 0f32.max(g[3].min(a[3]) - g[1].max(a[1]));
    let inter = ih * iw;
    let area_g = (g[2] - g[0]) * (g[3] - g[1]);
    let area_a = (a[2] - a[0]) * (a[3] - a[1]);
    let union = area_g + area_a - inter;
    if inter == 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// First index of the maximum (TF argmax tie rule).
fn argmax(v: impl Iterator<Item = f32>) -> (usize, f32) {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best
}

pub fn naive_label(
    anchors: &[f32],
    boxes: &[[f32; 4]],
    classes: &[i32],
    threshold: f32,
) -> NaiveTargets {
    let na = anchors.len() / 4;
    let ng = boxes.len();
    let sim: Vec<Vec<f32>> = boxes
        .iter()
        .map(|g| {
            (0..na)
                .map(|a| pair_iou(g, &anchors[4 * a..4 * a + 4]))
                .collect()
        })
        .collect();
    let mut matches = vec![-1i64; na];
    if ng > 0 {
        for (a, m) in matches.iter_mut().enumerate() {
            let (g, v) = argmax(sim.iter().map(|row| row[a]));
            // matched >= threshold; below unmatched (== matched) threshold -> -1
            *m = if v >= threshold { g as i64 } else { -1 };
        }
        let forced_col: Vec<usize> = sim
            .iter()
            .map(|row| argmax(row.iter().copied()).0)
            .collect();
        for (a, m) in matches.iter_mut().enumerate() {
            // argmax over rows of the one-hot indicator: first row whose column is a
            if let Some(g) = forced_col.iter().position(|&c| c == a) {
                *m = g as i64;
            }
        }
    }
    let mut cls = vec![-1i32; na];
    let mut out_boxes = vec![0f32; 4 * na];
    let mut npos = 0f32;
    for (a, &m) in matches.iter().enumerate() {
        if m >= 0 {
            let g = m as usize;
            let anchor = [
                anchors[4 * a],
                anchors[4 * a + 1],
                anchors[4 * a + 2],
                anchors[4 * a + 3],
            ];
            cls[a] = classes[g] - 1;
            out_boxes[4 * a..4 * a + 4].copy_from_slice(&encode_at(&boxes[g], &anchor, a, na));
        }
        if m != -1 {
            npos += 1.0;
        }
    }
    NaiveTargets {
        cls,
        boxes: out_boxes,
        num_positives: npos,
    }
}
