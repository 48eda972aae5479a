//! Anchor geometry and labeling: hand-made exact cases, the fast grid labeler against a naive
//! full-matrix labeler, and a fixture produced by automl's own AnchorLabeler.

mod common;

use common::naive::naive_label;
use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::labeler::{area, encode, iou, LabelError, Labeler, Targets};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

fn anchors(h: usize, w: usize) -> Anchors {
    Anchors::new(&AnchorConfig::efficientdet(h, w)).unwrap()
}

/// Anchor index on the default 9-anchor layout.
fn index(a: &Anchors, level: u32, y: usize, x: usize, octave: usize, aspect: usize) -> usize {
    let l = &a.levels()[(level - 3) as usize];
    l.offset + (y * l.width + x) * 9 + octave * 3 + aspect
}

/// Expected anchor from the formula: center `stride * (k + 1/2)`, size
/// `4 * stride * 2^(octave/3)` stretched by `sqrt(aspect)` in x and `1/sqrt(aspect)` in y.
fn expected_anchor(level: u32, y: usize, x: usize, octave: usize, aspect: f64) -> [f32; 4] {
    let stride = (1u32 << level) as f64;
    let (cy, cx) = (stride * (y as f64 + 0.5), stride * (x as f64 + 0.5));
    let base = 4.0 * stride * 2f64.powf(octave as f64 / 3.0);
    let hw = base * aspect.sqrt() / 2.0;
    let hh = base / aspect.sqrt() / 2.0;
    [
        (cy - hh) as f32,
        (cx - hw) as f32,
        (cy + hh) as f32,
        (cx + hw) as f32,
    ]
}

#[test]
fn anchor_count_and_levels_at_512() {
    let a = anchors(512, 512);
    assert_eq!(a.num_anchors(), 49104);
    assert_eq!(a.per_location(), 9);
    let shapes: Vec<_> = a
        .levels()
        .iter()
        .map(|l| (l.level, l.height, l.width, l.offset))
        .collect();
    assert_eq!(
        shapes,
        vec![
            (3, 64, 64, 0),
            (4, 32, 32, 36864),
            (5, 16, 16, 46080),
            (6, 8, 8, 48384),
            (7, 4, 4, 48960)
        ]
    );
    let last = a.levels().last().unwrap();
    assert_eq!(last.anchor_range().end, 49104);
    assert_eq!(last.box_range().end, 4 * 49104);
}

#[test]
fn anchor_coordinates_follow_the_formula() {
    let a = anchors(512, 512);
    let aspects = [1.0, 2.0, 0.5];
    for level in 3..=7u32 {
        let n = 512 >> level;
        for &(y, x) in &[
            (0, 0),
            (0, n - 1),
            (n - 1, 0),
            (n / 2, n / 3),
            (n - 1, n - 1),
        ] {
            for octave in 0..3 {
                for (k, &asp) in aspects.iter().enumerate() {
                    let got = a.get(index(&a, level, y, x, octave, k)).unwrap();
                    assert_eq!(
                        got,
                        expected_anchor(level, y, x, octave, asp),
                        "level {level} ({y},{x}) {octave} {asp}"
                    );
                }
            }
        }
    }
    // Hand values: first anchor of level 3 is a 32 px square centred at (4, 4).
    assert_eq!(a.get(0).unwrap(), [-12.0, -12.0, 20.0, 20.0]);
    assert_eq!(a.get(36864).unwrap(), [-24.0, -24.0, 40.0, 40.0]);
    assert_eq!(a.get(48960).unwrap(), [-192.0, -192.0, 320.0, 320.0]);
    assert!(a.get(49104).is_none());
}

/// Values printed by automl `Anchors(3, 7, 3, [1.0, 2.0, 0.5], 4.0, size).boxes` (float32),
/// and SHA-256 of its whole little-endian float32 table.
#[test]
fn anchors_match_automl_tables() {
    let a = anchors(512, 512);
    assert_eq!(
        a.get(1).unwrap(),
        [-7.3137083, -18.627417, 15.313708, 26.627417]
    );
    assert_eq!(
        a.get(8).unwrap(),
        [-31.918785, -13.959393, 39.918785, 21.959393]
    );
    assert_eq!(
        a.get(12345).unwrap(),
        [146.60158, 194.60158, 197.39842, 245.39842]
    );
    assert_eq!(
        a.get(49103).unwrap(),
        [-126.70057, 160.64972, 1022.70056, 735.3503]
    );
    let b = anchors(600, 1000);
    assert_eq!(b.num_anchors(), 113193);
    assert_eq!(
        b.get(113192).unwrap(),
        [1.2182168, 656.88446, 1078.7817, 1218.1155]
    );
    assert_eq!(
        b.get(50000).unwrap(),
        [327.49124, 429.7456, 384.50876, 458.2544]
    );
    for (h, w, want) in [
        (
            512,
            512,
            "ad683d8f2b2c27a253d11f80758e082ddefa00316e6e7cd8ef25ff01963c9d7c",
        ),
        (
            640,
            640,
            "35009b7ccd4840053af83e64d0c0ffebb85bdaf11e8219df55dc0d322f176206",
        ),
        (
            384,
            640,
            "ae1e9d27e6ec8cb87255e33fb8cfe65660b6e7b9cc4dff8d510a78950153dea8",
        ),
        (
            600,
            1000,
            "34ea7b79438b00f91d8560f2e7012f9568875852a43e9c3c1309c15c68237ebd",
        ),
    ] {
        let mut hasher = Sha256::new();
        for v in anchors(h, w).boxes() {
            hasher.update(v.to_le_bytes());
        }
        assert_eq!(hex::encode(hasher.finalize()), want, "{h}x{w}");
    }
}

#[test]
fn bad_anchor_configs_are_errors() {
    let mut c = AnchorConfig::efficientdet(512, 512);
    c.image_height = 0;
    assert!(Anchors::new(&c).is_err());
    let mut c = AnchorConfig::efficientdet(512, 512);
    c.min_level = 8;
    assert!(Anchors::new(&c).is_err());
    let mut c = AnchorConfig::efficientdet(512, 512);
    c.aspect_ratios = vec![1.0, -2.0];
    assert!(Anchors::new(&c).is_err());
}

/// Non-background anchors, found by scanning (checks `Targets::positives` on the way).
fn positives(t: &Targets) -> Vec<usize> {
    let p: Vec<usize> = (0..t.cls().len()).filter(|&i| t.cls()[i] != -1).collect();
    assert_eq!(
        t.positives()
            .iter()
            .map(|&i| i as usize)
            .collect::<Vec<_>>(),
        p
    );
    p
}

fn assert_same_as_naive(
    lab: &Labeler,
    boxes: &[[f32; 4]],
    classes: &[i32],
    t: &Targets,
    what: &str,
) {
    let n = naive_label(lab.anchors().boxes(), boxes, classes, lab.threshold());
    assert_eq!(t.num_positives(), n.num_positives, "{what}: num_positives");
    if t.cls() != n.cls {
        let diff: Vec<_> = (0..t.cls().len())
            .filter(|&i| t.cls()[i] != n.cls[i])
            .take(5)
            .map(|i| (i, t.cls()[i], n.cls[i]))
            .collect();
        panic!("{what}: class targets differ at (anchor, fast, naive) {diff:?}; boxes {boxes:?}");
    }
    for i in 0..t.boxes().len() {
        assert_eq!(
            t.boxes()[i].to_bits(),
            n.boxes[i].to_bits(),
            "{what}: box target {i}"
        );
    }
}

/// Anchor (10, 10) of level 3, square, smallest octave: (68, 68, 100, 100).
const X: [f32; 4] = [68.0, 68.0, 100.0, 100.0];

#[test]
fn iou_exactly_half_is_matched() {
    let lab = Labeler::new(anchors(512, 512));
    let xi = index(lab.anchors(), 3, 10, 10, 0, 0);
    assert_eq!(lab.anchors().get(xi).unwrap(), X);
    // Left half of X: inter 512, union 1024, IoU exactly 0.5 in f32.
    let gt = [68.0, 68.0, 100.0, 84.0];
    assert_eq!(iou(&gt, area(&gt), &X), 0.5);
    let t = lab.label(&[gt], &[7]).unwrap();
    assert_eq!(t.cls()[xi], 6);
    // The box's best anchor is a tall one, so X is matched by the threshold, not forced.
    let best = (0..lab.anchors().num_anchors())
        .max_by(|&a, &b| {
            let (ia, ib) = (
                iou(&gt, area(&gt), &lab.anchors().get(a).unwrap()),
                iou(&gt, area(&gt), &lab.anchors().get(b).unwrap()),
            );
            ia.partial_cmp(&ib).unwrap().then(b.cmp(&a))
        })
        .unwrap();
    assert_ne!(best, xi);
    assert_eq!(t.box_target(xi), [0.0, -0.25, 0.0, (0.5f64).ln() as f32]);
    assert_same_as_naive(&lab, &[gt], &[7], &t, "half");

    // A hair narrower: IoU just below 0.5, X becomes background.
    let gt2 = [68.0, 68.0, 100.0, 83.99];
    assert!(iou(&gt2, area(&gt2), &X) < 0.5);
    let t2 = lab.label(&[gt2], &[7]).unwrap();
    assert_eq!(t2.cls()[xi], -1);
    assert_eq!(t2.box_target(xi), [0.0; 4]);
    assert_same_as_naive(&lab, &[gt2], &[7], &t2, "below half");
}

#[test]
fn box_targets_have_exact_values() {
    let lab = Labeler::new(anchors(512, 512));
    let xi = index(lab.anchors(), 3, 10, 10, 0, 0);
    // h = w = 34, center (87, 83) vs anchor center (84, 84), size 32.
    let gt = [70.0, 66.0, 104.0, 100.0];
    let t = lab.label(&[gt], &[1]).unwrap();
    assert_eq!(t.cls()[xi], 0);
    let ln = 0.060_624_621_816_434_84_f64 as f32; // ln(34 / 32)
    assert_eq!(t.box_target(xi), [0.09375, -0.03125, ln, ln]);
    assert_eq!(encode(&gt, &X), [0.09375, -0.03125, ln, ln]);
    // Another matched anchor: X shifted one cell left (centre x 76), IoU 780 / 1400.
    let left = index(lab.anchors(), 3, 10, 9, 0, 0);
    assert_eq!(lab.anchors().get(left).unwrap(), [68.0, 60.0, 100.0, 92.0]);
    assert!(iou(&gt, area(&gt), &[68.0, 60.0, 100.0, 92.0]) >= 0.5);
    assert_eq!(t.box_target(left), [0.09375, 0.21875, ln, ln]);
    // One cell right (centre x 92) has IoU 720 / 1460 < 0.5: background.
    assert_eq!(t.cls()[index(lab.anchors(), 3, 10, 11, 0, 0)], -1);
    assert_eq!(t.num_positives() as usize, positives(&t).len());
    assert_same_as_naive(&lab, &[gt], &[1], &t, "targets");
}

#[test]
fn force_match_when_best_iou_is_below_threshold() {
    let lab = Labeler::new(anchors(512, 512));
    // A 1x1 box: best IoU is about 1/1024.
    let gt = [100.0, 100.0, 101.0, 101.0];
    let t = lab.label(&[gt], &[3]).unwrap();
    assert_eq!(t.num_positives(), 1.0);
    let p = positives(&t);
    assert_eq!(p.len(), 1);
    let a = lab.anchors();
    let ious: Vec<f32> = (0..a.num_anchors())
        .map(|i| iou(&gt, area(&gt), &a.get(i).unwrap()))
        .collect();
    let max = ious.iter().cloned().fold(0.0, f32::max);
    assert!(max > 0.0 && max < 0.5);
    assert_eq!(p[0], ious.iter().position(|&v| v == max).unwrap());
    assert_eq!(t.cls()[p[0]], 2);
    assert_eq!(t.box_target(p[0]), encode(&gt, &a.get(p[0]).unwrap()));
    // A long thin box whose best anchor is far below 0.5.
    let thin = [10.0, 3.0, 12.0, 509.0];
    let t = lab.label(&[thin], &[3]).unwrap();
    assert_eq!(t.num_positives(), 1.0);
    assert_same_as_naive(&lab, &[thin], &[3], &t, "thin");
}

#[test]
fn competing_boxes_lowest_index_wins() {
    let lab = Labeler::new(anchors(512, 512));
    let xi = index(lab.anchors(), 3, 10, 10, 0, 0);
    // A fits X at IoU 0.766 and X is its best anchor; B is X itself (IoU 1).
    let a_box = [70.0, 70.0, 98.0, 98.0];
    let b_box = X;
    // Both claim X by force match; the lower GT index keeps it despite the lower IoU.
    let t = lab.label(&[a_box, b_box], &[10, 20]).unwrap();
    assert_eq!(t.cls()[xi], 9);
    assert_eq!(t.box_target(xi), encode(&a_box, &X));
    assert_same_as_naive(&lab, &[a_box, b_box], &[10, 20], &t, "a first");
    let t = lab.label(&[b_box, a_box], &[20, 10]).unwrap();
    assert_eq!(t.cls()[xi], 19);
    assert_same_as_naive(&lab, &[b_box, a_box], &[20, 10], &t, "b first");
    // Identical boxes: equal IoUs everywhere, so every positive goes to the first one.
    let t = lab.label(&[a_box, a_box], &[5, 6]).unwrap();
    assert!(positives(&t).iter().all(|&i| t.cls()[i] == 4));
    assert_eq!(t.cls()[xi], 4);
    assert_same_as_naive(&lab, &[a_box, a_box], &[5, 6], &t, "identical");
}

#[test]
fn boxes_overlapping_no_anchor_claim_anchor_zero() {
    let lab = Labeler::new(anchors(512, 512));
    let a0 = lab.anchors().get(0).unwrap();
    for gt in [
        [-5000.0, -5000.0, -4990.0, -4990.0], // far outside the image
        [100.0, 100.0, 100.0, 120.0],         // zero height
        [120.0, 100.0, 100.0, 120.0],         // inverted
    ] {
        let t = lab.label(&[gt], &[9]).unwrap();
        assert_eq!(t.num_positives(), 1.0, "{gt:?}");
        assert_eq!(positives(&t), vec![0], "{gt:?}");
        assert_eq!(t.cls()[0], 8);
        assert_eq!(t.box_target(0), encode(&gt, &a0));
        assert_same_as_naive(&lab, &[gt], &[9], &t, "no overlap");
    }
    // Zero-height box: floored at 1e-8 by the coder before the log.
    let t = lab.label(&[[100.0, 100.0, 100.0, 120.0]], &[9]).unwrap();
    assert_eq!(t.box_target(0)[2], (1e-8f32 / 32.0).ln());
}

#[test]
fn no_boxes_and_buffer_reuse() {
    let lab = Labeler::new(anchors(512, 512));
    let mut t = lab.new_targets();
    lab.label_into(
        &[[70.0, 66.0, 104.0, 100.0], [0.0, 0.0, 300.0, 200.0]],
        &[1, 2],
        &mut t,
    )
    .unwrap();
    assert!(t.num_positives() > 0.0);
    lab.label_into(&[], &[], &mut t).unwrap();
    assert_eq!(t.num_positives(), 0.0);
    assert!(t.cls().iter().all(|&c| c == -1));
    assert!(t.boxes().iter().all(|&v| v == 0.0));
    // Buffers of the wrong size (e.g. default) are resized.
    let mut empty = Targets::default();
    lab.label_into(&[X], &[1], &mut empty).unwrap();
    assert_eq!(empty.cls().len(), 49104);
    assert_eq!(empty.boxes().len(), 4 * 49104);
    let level = &lab.anchors().levels()[0];
    assert_eq!(empty.level_cls(level).len(), 64 * 64 * 9);
    assert_eq!(empty.level_boxes(level).len(), 64 * 64 * 36);
}

#[test]
fn bad_input_is_an_error() {
    let lab = Labeler::new(anchors(128, 128));
    let mut t = lab.new_targets();
    assert_eq!(
        lab.label_into(&[X], &[], &mut t),
        Err(LabelError::LengthMismatch {
            boxes: 1,
            classes: 0
        })
    );
    assert!(matches!(
        lab.label_into(&[[0.0, f32::NAN, 1.0, 1.0]], &[1], &mut t),
        Err(LabelError::BadBox { index: 0, .. })
    ));
    assert!(matches!(
        lab.label_into(&[[0.0, 0.0, 1e30, 1.0]], &[1], &mut t),
        Err(LabelError::BadBox { .. })
    ));
    assert!(matches!(
        lab.label_into(&[X, X], &[1, 0], &mut t),
        Err(LabelError::BadClass { index: 1, class: 0 })
    ));
    assert!(Labeler::with_threshold(anchors(128, 128), 0.0).is_err());
}

#[test]
fn class_ids_above_the_models_classes_are_an_error_naming_the_setting() {
    let unchecked = Labeler::new(anchors(128, 128));
    let lab = unchecked.clone().with_num_classes(3);
    let mut t = lab.new_targets();
    // 3 is the last id a 3-class model has a logit for; 4 is not.
    assert_eq!(lab.label_into(&[X, X], &[1, 3], &mut t), Ok(()));
    let err = lab.label_into(&[X, X], &[3, 4], &mut t).unwrap_err();
    assert_eq!(
        err,
        LabelError::ClassOutOfRange {
            index: 1,
            class: 4,
            num_classes: 3
        }
    );
    assert!(err.to_string().contains("head.num_classes"), "{err}");
    // Without the limit any id ≥ 1 is labeled, as before.
    assert_eq!(unchecked.label_into(&[X], &[91], &mut t), Ok(()));
    assert_eq!(
        t.cls().iter().filter(|&&c| c == 90).count() as f32,
        t.num_positives()
    );
}

/// Random boxes from several regimes: ordinary, tiny, huge, thin, off-image, grid-snapped
/// (exact ties), duplicated and degenerate.
fn random_boxes(rng: &mut ChaCha8Rng, h: f32, w: f32) -> Vec<[f32; 4]> {
    let n = rng.gen_range(0..25);
    let mut out: Vec<[f32; 4]> = Vec::with_capacity(n);
    for _ in 0..n {
        let regime = rng.gen_range(0..8);
        let cy = rng.gen_range(-0.2 * h..1.2 * h);
        let cx = rng.gen_range(-0.2 * w..1.2 * w);
        let (bh, bw) = match regime {
            0 => (rng.gen_range(0.001..2.0), rng.gen_range(0.001..2.0)),
            1 => (
                rng.gen_range(0.5 * h..2.0 * h),
                rng.gen_range(0.5 * w..2.0 * w),
            ),
            2 => (rng.gen_range(0.5..4.0), rng.gen_range(0.3 * w..1.2 * w)),
            _ => {
                let s = (rng.gen_range(1f32..(1.2 * h).ln().max(1.5))).exp();
                (s, s * rng.gen_range(0.2..5.0))
            }
        };
        let mut b = [cy - bh / 2.0, cx - bw / 2.0, cy + bh / 2.0, cx + bw / 2.0];
        if regime == 4 {
            b = b.map(|v| (v / 4.0).round() * 4.0);
        }
        if regime == 5 {
            b = [
                b[0].clamp(0.0, h - 1.0),
                b[1].clamp(0.0, w - 1.0),
                b[2].clamp(0.0, h - 1.0),
                b[3].clamp(0.0, w - 1.0),
            ];
        }
        if regime == 6 && !out.is_empty() {
            b = out[rng.gen_range(0..out.len())];
        }
        if regime == 7 && rng.gen_bool(0.3) {
            b.swap(0, 2);
        }
        out.push(b);
    }
    out
}

#[test]
fn grid_labeler_equals_naive_labeler_on_random_boxes() {
    let mut rng = ChaCha8Rng::seed_from_u64(20261126);
    let sizes = [
        (128usize, 128usize),
        (96, 160),
        (200, 120),
        (512, 512),
        (100, 77),
    ];
    for (h, w) in sizes {
        let lab = Labeler::new(anchors(h, w));
        let mut t = lab.new_targets();
        let cases = if h * w > 100_000 { 12 } else { 80 };
        for case in 0..cases {
            let boxes = random_boxes(&mut rng, h as f32, w as f32);
            let classes: Vec<i32> = boxes.iter().map(|_| rng.gen_range(1..91)).collect();
            lab.label_into(&boxes, &classes, &mut t).unwrap();
            assert_same_as_naive(&lab, &boxes, &classes, &t, &format!("{h}x{w} case {case}"));
        }
    }
}
