//! Labels produced by automl's own `AnchorLabeler` (TensorFlow, float32) on random box sets,
//! compared with ours. The committed fixture holds a few compact cases (only non-background
//! anchors); set `AUTOML_LABELS_JSON` to check a larger dump in the same format.

use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::labeler::Labeler;
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Deserialize)]
struct Case {
    height: usize,
    width: usize,
    boxes: Vec<[f32; 4]>,
    classes: Vec<i32>,
    num_positives: f32,
    /// `[anchor index, class target, ty, tx, th, tw]` for every non-background anchor.
    positives: Vec<[f64; 6]>,
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

/// Distance in units in the last place between two f32 values of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    if a == b {
        return 0;
    }
    if a.is_sign_negative() != b.is_sign_negative() {
        return u32::MAX;
    }
    a.to_bits().abs_diff(b.to_bits())
}

/// Returns the largest ulp difference of the log terms (th, tw) over all cases.
fn check(fixture: &Fixture) -> u32 {
    let mut labelers: HashMap<(usize, usize), Labeler> = HashMap::new();
    let mut worst_log_ulps = 0;
    for (n, case) in fixture.cases.iter().enumerate() {
        let lab = labelers
            .entry((case.height, case.width))
            .or_insert_with(|| {
                Labeler::new(
                    Anchors::new(&AnchorConfig::efficientdet(case.height, case.width)).unwrap(),
                )
            });
        let t = lab.label(&case.boxes, &case.classes).unwrap();
        assert_eq!(
            t.num_positives(),
            case.num_positives,
            "case {n}: num_positives"
        );
        let ours: Vec<usize> = (0..t.cls().len()).filter(|&i| t.cls()[i] != -1).collect();
        let theirs: Vec<usize> = case.positives.iter().map(|p| p[0] as usize).collect();
        assert_eq!(ours, theirs, "case {n}: positive anchors");
        for p in &case.positives {
            let a = p[0] as usize;
            assert_eq!(t.cls()[a], p[1] as i32, "case {n}: class of anchor {a}");
            let ours = &t.boxes()[4 * a..4 * a + 4];
            // ty, tx are plain f32 arithmetic: bit-exact.
            assert_eq!(ours[0], p[2] as f32, "case {n}: ty of anchor {a}");
            assert_eq!(ours[1], p[3] as f32, "case {n}: tx of anchor {a}");
            // th, tw go through the platform's float log: allow one ulp.
            for k in 2..4 {
                let d = ulps(ours[k], p[2 + k] as f32);
                assert!(
                    d <= 64,
                    "case {n}: anchor {a} target {k}: {} vs {}",
                    ours[k],
                    p[2 + k]
                );
                worst_log_ulps = worst_log_ulps.max(d);
            }
        }
    }
    worst_log_ulps
}

#[test]
fn matches_automl_fixture() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/automl_labels_random.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    assert!(fixture.cases.len() >= 5);
    let worst = check(&fixture);
    println!(
        "{} cases, worst log-term difference {worst} ulp",
        fixture.cases.len()
    );
}

#[test]
fn matches_external_automl_dump() {
    let Ok(path) = std::env::var("AUTOML_LABELS_JSON") else {
        println!("skipped: AUTOML_LABELS_JSON not set");
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    let worst = check(&fixture);
    println!(
        "{path}: {} cases, worst log-term difference {worst} ulp",
        fixture.cases.len()
    );
}
