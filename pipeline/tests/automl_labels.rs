//! Labels produced by automl's own `AnchorLabeler` (TensorFlow, float32) on random box sets,
//! compared with ours. The committed fixture holds a few compact cases (only non-background
//! anchors); set `AUTOML_LABELS_JSON` to check a larger dump in the same format.

use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::labeler::Labeler;
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Deserialize)]
struct Case {
    kind: String,
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

/// Checks every case bit for bit: positive set, classes, num_positives and all four box
/// targets (the log terms included, thanks to the TF log emulation).
fn check(fixture: &Fixture) {
    let mut labelers: HashMap<(usize, usize), Labeler> = HashMap::new();
    for (n, case) in fixture.cases.iter().enumerate() {
        let lab = labelers
            .entry((case.height, case.width))
            .or_insert_with(|| {
                Labeler::new(
                    Anchors::new(&AnchorConfig::efficientdet(case.height, case.width)).unwrap(),
                )
            });
        let t = lab.label(&case.boxes, &case.classes).unwrap();
        let what = format!("case {n} ({}x{} {})", case.height, case.width, case.kind);
        assert_eq!(
            t.num_positives(),
            case.num_positives,
            "{what}: num_positives"
        );
        let theirs: Vec<u32> = case.positives.iter().map(|p| p[0] as u32).collect();
        assert_eq!(t.positives(), &theirs[..], "{what}: positive anchors");
        for p in &case.positives {
            let a = p[0] as usize;
            assert_eq!(t.cls()[a], p[1] as i32, "{what}: class of anchor {a}");
            let want = [p[2] as f32, p[3] as f32, p[4] as f32, p[5] as f32];
            assert_eq!(
                t.box_target(a).map(f32::to_bits),
                want.map(f32::to_bits),
                "{what}: box target of anchor {a}: {:?} vs {want:?}",
                t.box_target(a)
            );
        }
    }
}

#[test]
fn matches_automl_fixture() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/automl_labels_random.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    assert!(fixture.cases.len() >= 20);
    check(&fixture);
}

#[test]
fn matches_external_automl_dump() {
    let Ok(path) = std::env::var("AUTOML_LABELS_JSON") else {
        println!("skipped: AUTOML_LABELS_JSON not set");
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    check(&fixture);
    println!("{path}: {} cases identical", fixture.cases.len());
}
