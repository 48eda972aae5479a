//! Times anchor labeling of COCO-like images at 512x512: the grid labeler against the naive
//! full-IoU labeler used by the tests. Run with
//! `cargo run -p effdet-pipeline --release --example label_timing`.

#[path = "../tests/common/naive.rs"]
mod naive;

use effdet_pipeline::anchors::{AnchorConfig, Anchors};
use effdet_pipeline::labeler::Labeler;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// COCO-like boxes: log-uniform sizes 4..450 px, aspect 1/4..4, clipped to the image.
fn image_boxes(rng: &mut ChaCha8Rng, n: usize, size: f32) -> (Vec<[f32; 4]>, Vec<i32>) {
    let mut boxes = Vec::with_capacity(n);
    while boxes.len() < n {
        let s = rng.gen_range(4f32.ln()..450f32.ln()).exp();
        let r = rng.gen_range(0.25f32.ln()..4f32.ln()).exp().sqrt();
        let (h, w) = (s / r, s * r);
        let (cy, cx) = (rng.gen_range(0.0..size), rng.gen_range(0.0..size));
        let b = [
            (cy - h / 2.0).clamp(0.0, size - 1.0),
            (cx - w / 2.0).clamp(0.0, size - 1.0),
            (cy + h / 2.0).clamp(0.0, size - 1.0),
            (cx + w / 2.0).clamp(0.0, size - 1.0),
        ];
        if (b[2] - b[0]) * (b[3] - b[1]) != 0.0 {
            boxes.push(b);
        }
    }
    let classes = (0..n).map(|_| rng.gen_range(1..91)).collect();
    (boxes, classes)
}

fn main() {
    let size = 512;
    let lab = Labeler::new(Anchors::new(&AnchorConfig::efficientdet(size, size)).expect("anchors"));
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut out = lab.new_targets();
    println!("{} anchors at {size}x{size}", lab.anchors().num_anchors());
    for n in [0usize, 7, 30] {
        let images: Vec<_> = (0..200)
            .map(|_| image_boxes(&mut rng, n, size as f32))
            .collect();
        // Warm up, then time the grid labeler over all images several times.
        for (b, c) in &images {
            lab.label_into(b, c, &mut out).expect("label");
        }
        // Best of several passes: the machine may be shared, the minimum is the least disturbed.
        let mut fast_us = f64::INFINITY;
        let mut positives = 0.0;
        for _ in 0..7 {
            let t0 = Instant::now();
            positives = 0.0;
            for (b, c) in &images {
                lab.label_into(b, c, &mut out).expect("label");
                positives += out.num_positives();
            }
            fast_us = fast_us.min(t0.elapsed().as_secs_f64() * 1e6 / images.len() as f64);
        }
        let naive_images = &images[..10];
        let t0 = Instant::now();
        let mut naive_pos = 0.0;
        for (b, c) in naive_images {
            let n = naive::naive_label(lab.anchors().boxes(), b, c, 0.5);
            naive_pos += n.num_positives;
            lab.label_into(b, c, &mut out).expect("label");
            assert!(
                n.cls == out.cls() && n.boxes == out.boxes(),
                "grid and naive labels differ"
            );
        }
        let naive_us = t0.elapsed().as_secs_f64() * 1e6 / naive_images.len() as f64;
        println!(
            "{n:>2} boxes: grid {fast_us:8.1} us/image (mean positives {:.1}), naive {naive_us:9.1} us/image (mean positives {:.1})",
            positives / images.len() as f32,
            naive_pos / naive_images.len() as f32
        );
    }
}
