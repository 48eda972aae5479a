//! `effdet inspect`: records as JSON lines, `--count`, or `--verify` (every CRC, all faults
//! listed with file and byte offset, non-zero exit when any).

use std::io::Write;

use anyhow::Context;
use base64::Engine;
use effdet_pipeline::example::{Example, Kind};
use effdet_pipeline::tfrecord::{expand_paths, RecordReader};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

#[derive(clap::Args)]
pub struct Args {
    /// TFRecord files, directories or glob patterns.
    #[arg(required = true)]
    paths: Vec<String>,
    /// Print only the number of records.
    #[arg(long, conflicts_with = "verify")]
    count: bool,
    /// Check every CRC and Example; print a summary; exit 1 if anything is corrupt.
    #[arg(long)]
    verify: bool,
    /// Print `image/encoded` in full (base64) instead of its length and SHA-256.
    #[arg(long)]
    full: bool,
    /// Stop after this many records.
    #[arg(long)]
    limit: Option<u64>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let files = expand_paths(&a.paths)?;
    if a.verify {
        return verify(&files);
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut count = 0u64;
    'files: for file in &files {
        let reader = RecordReader::open(file)?;
        for rec in reader {
            let rec = rec?;
            if a.limit.is_some_and(|l| count >= l) {
                break 'files;
            }
            count += 1;
            if a.count {
                continue;
            }
            let ex = Example::decode_bytes(rec.payload).with_context(|| {
                format!(
                    "{}: record {} at byte offset {}: malformed Example",
                    file.display(),
                    rec.index,
                    rec.offset
                )
            })?;
            serde_json::to_writer(&mut out, &example_json(&ex, a.full))?;
            out.write_all(b"\n")?;
        }
    }
    if a.count {
        writeln!(out, "{count}")?;
    }
    out.flush()?;
    Ok(0)
}

/// Feature name → list of values; bytes as UTF-8 when valid, else base64.
pub fn example_json(ex: &Example, full: bool) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut obj = Map::new();
    for (key, feature) in ex.features() {
        let values: Value = match &feature.kind {
            Some(Kind::BytesList(l)) if key == "image/encoded" && !full => l
                .value
                .iter()
                .map(|b| json!({"len": b.len(), "sha256": hex::encode(Sha256::digest(b))}))
                .collect(),
            Some(Kind::BytesList(l)) => l
                .value
                .iter()
                .map(|b| match std::str::from_utf8(b) {
                    Ok(s) if !(full && key == "image/encoded") => Value::String(s.to_owned()),
                    _ => Value::String(b64.encode(b)),
                })
                .collect(),
            Some(Kind::FloatList(l)) => l.value.iter().map(|&v| float_json(v)).collect(),
            Some(Kind::Int64List(l)) => l.value.iter().map(|&v| json!(v)).collect(),
            None => Value::Array(vec![]),
        };
        obj.insert(key.clone(), values);
    }
    Value::Object(obj)
}

fn float_json(v: f32) -> Value {
    if v.is_finite() {
        // Shortest decimal that reads back as the same f32.
        let s = format!("{v}");
        serde_json::from_str(&s).unwrap_or(Value::Null)
    } else {
        Value::String(format!("{v}"))
    }
}

fn verify(files: &[std::path::PathBuf]) -> anyhow::Result<i32> {
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut corrupt = Vec::new();
    for file in files {
        let mut reader = RecordReader::open(file)?.skip_corrupt(true);
        for rec in reader.by_ref() {
            let rec = rec?;
            records += 1;
            if let Err(e) = Example::decode_bytes(rec.payload.clone()) {
                corrupt.push(json!({
                    "file": file, "offset": rec.offset, "record": rec.index,
                    "fault": format!("malformed Example: {e}"),
                }));
            }
        }
        for s in reader.skipped() {
            corrupt.push(json!({"file": file, "offset": s.offset, "fault": s.fault.to_string()}));
        }
        bytes += std::fs::metadata(file)?.len();
    }
    let ok = corrupt.is_empty();
    for c in &corrupt {
        eprintln!(
            "corrupt: {} at byte offset {}: {}",
            c["file"].as_str().unwrap_or_default(),
            c["offset"],
            c["fault"].as_str().unwrap_or_default()
        );
    }
    println!(
        "{}",
        json!({"files": files.len(), "records": records, "bytes": bytes, "corrupt": corrupt, "ok": ok})
    );
    Ok(if ok { 0 } else { 1 })
}
