//! The GPU-only flags on a CPU build: `--gpu-decode`, `--header-only` and `--feed` either work
//! (header-only: the CPU share of GPU decoding) or fail with a message that says what to build.

mod common;

use std::process::Command;

use serde_json::Value;

fn shards(dir: &std::path::Path) -> String {
    use effdet_pipeline::coco::convert::{convert, ConvertOptions};
    use effdet_pipeline::coco::synth::{generate, SynthOptions};
    let synth = generate(
        &dir.join("coco"),
        &SynthOptions {
            images: 6,
            seed: 3,
            min_side: 64,
            max_side: 128,
            ..Default::default()
        },
    )
    .unwrap();
    convert(
        &ConvertOptions {
            image_dir: synth.image_dir,
            object_annotations_file: Some(synth.annotations),
            caption_annotations_file: None,
            image_info_file: None,
            output_file_prefix: dir.join("shards/train").to_string_lossy().into_owned(),
            num_shards: 1,
            include_masks: false,
            num_threads: 1,
        },
        &|_, _| {},
    )
    .unwrap();
    dir.join("shards").to_string_lossy().into_owned()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::effdet_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gpu_flags_explain_themselves_on_a_cpu_build() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let base = ["--data", &data, "--image-size", "64", "--batch-size", "2"];

    // The CPU share of GPU decoding runs anywhere and reports its deferred images.
    let mut args = vec![
        "bench-pipeline",
        "--batches",
        "3",
        "--warmup",
        "1",
        "--header-only",
    ];
    args.extend(base);
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["header_only"], true);
    assert!(v["stage_seconds"]["deferred_images"].as_u64().unwrap() >= 6);

    let mut args = vec!["bench-pipeline", "--batches", "1", "--gpu-decode"];
    args.extend(base);
    let (ok, _, err) = run(&args);
    assert!(!ok);
    assert!(err.contains("nvjpeg") || err.contains("CUDA"), "{err}");

    let mut args = vec![
        "bench-train",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--gpu-decode",
    ];
    args.extend(base);
    let (ok, _, err) = run(&args);
    assert!(!ok);
    assert!(err.contains("copy-stream"), "{err}");

    let mut args = vec![
        "bench-train",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--feed",
        "copy-stream",
    ];
    args.extend(base);
    let (ok, _, err) = run(&args);
    assert!(!ok);
    assert!(err.contains("--features cuda"), "{err}");
}

/// `bench-train` arguments for two steps at 64², batch 2, after `warmup` warm-up steps.
fn short_bench_train<'a>(data: &'a str, warmup: &'a str) -> Vec<&'a str> {
    vec![
        "bench-train",
        "--data",
        data,
        "--image-size",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        warmup,
    ]
}

/// Mixed precision runs on a CPU build too (16-bit activations, f32 master weights): a few
/// `bench-train` steps per precision give a finite loss close to the fp32 one from the same
/// initialization and data.
#[test]
fn mixed_precision_training_steps_run_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let report = |precision: &str| -> Value {
        let mut args = short_bench_train(&data, "0");
        args.extend(["--precision", precision]);
        let (ok, out, err) = run(&args);
        assert!(ok, "{precision}: {err}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let base = report("fp32")["loss_first"].as_f64().unwrap();
    assert!(base.is_finite() && base > 0.0, "fp32 loss {base}");
    for (precision, tol) in [("fp16", 0.05), ("bf16", 0.2)] {
        let v = report(precision);
        assert_eq!(v["precision"], precision, "{v}");
        let (first, last) = (
            v["loss_first"].as_f64().unwrap(),
            v["loss_last"].as_f64().unwrap(),
        );
        assert!(first.is_finite() && last.is_finite(), "{precision}: {v}");
        // Same seed and batches: the first loss differs from fp32's only by 16-bit rounding.
        assert!(
            ((first - base) / base).abs() < tol,
            "{precision}: first loss {first} vs fp32 {base}"
        );
    }
}

/// `EFFDET_OP_PROFILE` adds the per-op table to `bench-train`'s line: every op kind the step
/// records, in both passes, with its calls per step (D0 has 134 1×1 convolutions; at
/// batch norm one call per layer), and with `=shapes` each row also names its output shape.
/// Without the variable there is no table.
#[test]
fn op_profile_reports_every_recorded_op() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let report = |profile: Option<&str>| -> Value {
        let mut cmd = Command::new(common::effdet_bin());
        cmd.args(short_bench_train(&data, "1"));
        match profile {
            Some(p) => cmd.env("EFFDET_OP_PROFILE", p),
            None => cmd.env_remove("EFFDET_OP_PROFILE"),
        };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert!(report(None).get("op_profile").is_none());
    let v = report(Some("1"));
    let rows = v["op_profile"].as_array().expect("op_profile rows");
    let row = |op: &str, pass: &str| {
        rows.iter()
            .find(|r| r["op"] == op && r["pass"] == pass)
            .unwrap_or_else(|| panic!("no {op} {pass} row in {rows:?}"))
    };
    for op in ["linear", "BnTrain", "DepthwiseConv", "Gate", "bifpn fusion"] {
        for pass in ["forward", "backward"] {
            let r = row(op, pass);
            assert!(r["ms_per_step"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    // Calls are per timed step (the warm-up step's are dropped).
    assert_eq!(row("linear", "forward")["calls_per_step"], 134.0);
    assert_eq!(row("linear", "backward")["calls_per_step"], 134.0);
    let shapes = report(Some("shapes"));
    let rows = shapes["op_profile"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["op"]
            .as_str()
            .unwrap()
            .starts_with("BnTrain [2, 32, 32, ")),
        "{rows:?}"
    );
}
