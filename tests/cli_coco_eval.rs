//! `effdet coco-eval` end to end: files in, one JSON object with the twelve stats out.

use std::process::Command;

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn prints_the_twelve_stats_and_rejects_unknown_images() {
    let dir = tempfile::tempdir().unwrap();
    let gt = write(
        dir.path(),
        "gt.json",
        r#"{"images":[{"id":1,"file_name":"a.jpg","height":100,"width":100},
                      {"id":2,"file_name":"b.jpg","height":100,"width":100}],
            "categories":[{"id":3,"name":"x"}],
            "annotations":[{"id":1,"image_id":1,"category_id":3,"bbox":[0,0,10,10],"area":100,"iscrowd":0},
                           {"id":2,"image_id":2,"category_id":3,"bbox":[0,0,10,10],"area":100,"iscrowd":0}]}"#,
    );
    let dets = write(
        dir.path(),
        "dets.json",
        r#"[{"image_id":1,"category_id":3,"bbox":[0,0,10,10],"score":0.9},
            {"image_id":1,"category_id":3,"bbox":[50,50,10,10],"score":0.95}]"#,
    );
    let run = |extra: &[&str], dets: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_effdet"))
            .arg("coco-eval")
            .arg("--annotations")
            .arg(&gt)
            .arg("--detections")
            .arg(dets)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[], &dets);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 12);
    // FP then TP on image 1, image 2 missed: recall 0.5 at every threshold.
    assert_eq!(obj["ARmax100"], 0.5);
    assert_eq!(obj["ARmax1"], 0.0);
    assert_eq!(obj["APm"], -1.0);
    let out = run(&["--only-detected-images"], &dets);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ARmax100"], 1.0);

    let bad = write(
        dir.path(),
        "bad.json",
        r#"[{"image_id":7,"category_id":3,"bbox":[0,0,10,10],"score":0.9}]"#,
    );
    let out = run(&[], &bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("image_id 7"));
}
