//! `effdet inspect`: JSON output, `--count`, and `--verify` on corrupted files.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use bytes::Bytes;
use effdet_pipeline::example::{Example, Feature};
use effdet_pipeline::tfrecord::write_record;
use prost::Message;
use serde_json::Value;

fn records() -> Vec<Vec<u8>> {
    (0..3)
        .map(|i| {
            let mut f = BTreeMap::new();
            f.insert(
                "image/encoded".to_string(),
                Feature::bytes([Bytes::from(vec![0xFFu8, 0xD8, i])]),
            );
            f.insert(
                "image/source_id".to_string(),
                Feature::bytes([Bytes::from(format!("{i}"))]),
            );
            f.insert(
                "blob".to_string(),
                Feature::bytes([Bytes::from_static(&[0xC3, 0x28])]),
            );
            f.insert(
                "image/object/bbox/xmin".to_string(),
                Feature::floats(vec![0.25, 0.1]),
            );
            f.insert(
                "image/object/class/label".to_string(),
                Feature::int64s(vec![1, 90]),
            );
            Example::from_features(f).encode_to_vec()
        })
        .collect()
}

fn write_file(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, Vec<u64>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut offsets = Vec::new();
    for r in records() {
        offsets.push(buf.len() as u64);
        write_record(&mut buf, &r).unwrap();
    }
    let path = dir.join(name);
    std::fs::write(&path, &buf).unwrap();
    (path, offsets, buf)
}

fn effdet(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::effdet_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn prints_records_as_json_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = write_file(dir.path(), "a.tfrecord");
    let p = path.to_str().unwrap();
    let (code, stdout, _) = effdet(&["inspect", p]);
    assert_eq!(code, 0);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let first = &lines[0];
    assert_eq!(first["image/source_id"], serde_json::json!(["0"]));
    assert_eq!(first["image/encoded"][0]["len"], 3);
    assert_eq!(
        first["image/encoded"][0]["sha256"].as_str().unwrap().len(),
        64
    );
    assert_eq!(
        first["blob"],
        serde_json::json!(["wyg="]),
        "invalid UTF-8 → base64"
    );
    assert_eq!(
        first["image/object/bbox/xmin"],
        serde_json::json!([0.25, 0.1])
    );
    assert_eq!(
        first["image/object/class/label"],
        serde_json::json!([1, 90])
    );
    let (_, full, _) = effdet(&["inspect", "--full", "--limit", "1", p]);
    let full: Value = serde_json::from_str(full.lines().next().unwrap()).unwrap();
    assert_eq!(full["image/encoded"], serde_json::json!(["/9gA"]));
    // Directories and globs expand to the files they hold.
    let glob = format!("{}/*.tfrecord", dir.path().display());
    let (code, count, _) = effdet(&["inspect", "--count", dir.path().to_str().unwrap(), &glob]);
    assert_eq!((code, count.trim()), (0, "3"));
}

#[test]
fn verify_flags_a_flipped_byte_and_a_truncated_tail_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _, _) = write_file(dir.path(), "good.tfrecord");
    let (code, stdout, _) = effdet(&["inspect", "--verify", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["records"], 3);
    assert_eq!(summary["ok"], true);

    let (flipped, offsets, mut buf) = write_file(dir.path(), "flipped.tfrecord");
    buf[offsets[1] as usize + 12 + 5] ^= 0x10;
    std::fs::write(&flipped, &buf).unwrap();
    let (code, stdout, stderr) = effdet(&["inspect", "--verify", flipped.to_str().unwrap()]);
    assert_eq!(code, 1);
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["records"], 2);
    assert_eq!(summary["corrupt"][0]["offset"], offsets[1]);
    assert!(summary["corrupt"][0]["fault"]
        .as_str()
        .unwrap()
        .contains("payload CRC"));
    assert!(
        stderr.contains(&format!("byte offset {}", offsets[1])),
        "{stderr}"
    );

    let (truncated, offsets, buf) = write_file(dir.path(), "truncated.tfrecord");
    std::fs::write(&truncated, &buf[..buf.len() - 7]).unwrap();
    let (code, stdout, _) = effdet(&["inspect", "--verify", truncated.to_str().unwrap()]);
    assert_eq!(code, 1);
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["records"], 2);
    assert_eq!(summary["corrupt"][0]["offset"], offsets[2]);
    assert!(summary["corrupt"][0]["fault"]
        .as_str()
        .unwrap()
        .contains("truncated"));

    // Without --verify a corrupt file is an error naming file and offset, not a panic.
    let (code, _, stderr) = effdet(&["inspect", flipped.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("flipped.tfrecord")
            && stderr.contains(&format!("byte offset {}", offsets[1])),
        "{stderr}"
    );
}
