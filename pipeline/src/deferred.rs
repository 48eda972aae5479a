//! The GPU decode stage's CPU-side logic, compiled and tested without a GPU: which slots of a
//! batch go to which decoder ([`decode_batch`], the fallback ladder over a [`JpegDecoders`]),
//! where each decoded image lies in one device arena, the per-image job words the render kernel
//! reads, and [`render_reference`], the render kernel's arithmetic on the CPU (the yardstick for
//! the device check and for comparing with the CPU path).
//!
//! The render follows automl's order on the *whole* image: flip, bilinear resize with half-pixel
//! centres (`tf.image.resize`), crop at the offset, pad with the mean colour; normalization is
//! linear, so applying it after the interpolation gives the same values. Unlike the CPU path
//! ([`crate::augment::render_image`]), which rounds the resized pixels to `u8`, it interpolates
//! in f32, which is closer to TensorFlow (it resizes float images).

use crate::augment::{AugmentConfig, ScaleParams, MEAN_RGB, STDDEV_RGB};
use crate::decode::DecodedImage;
use crate::loader::{Batch, EncodedImage};

/// The render kernel's normalization arguments, in its order: mean R, G, B, then stddev R, G, B.
pub fn render_norm_args() -> [f32; 6] {
    [
        MEAN_RGB[0],
        MEAN_RGB[1],
        MEAN_RGB[2],
        STDDEV_RGB[0],
        STDDEV_RGB[1],
        STDDEV_RGB[2],
    ]
}

/// Words per job in the array the render kernel reads (see [`RenderJob::words`]).
pub const JOB_WORDS: usize = 10;

/// One image for the render kernel: where its interleaved RGB lies in the arena and the
/// geometry it is rendered with. A job with `src_width == 0` writes only the mean colour
/// (0 after normalization): an image that could not be decoded by anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderJob {
    pub slot: u32,
    /// Byte offset of the image in the arena; rows are `3 · src_width` bytes apart.
    pub src_offset: u64,
    pub src_height: u32,
    pub src_width: u32,
    pub scaled_height: u32,
    pub scaled_width: u32,
    pub offset_y: u32,
    pub offset_x: u32,
    pub flip: bool,
}

impl RenderJob {
    /// The job for a deferred image at `src_offset` in the arena.
    pub fn new(slot: usize, src_offset: u64, e: &EncodedImage) -> RenderJob {
        let p = &e.params;
        RenderJob {
            slot: slot as u32,
            src_offset,
            src_height: e.height,
            src_width: e.width,
            scaled_height: p.scaled_height,
            scaled_width: p.scaled_width,
            offset_y: p.offset_y,
            offset_x: p.offset_x,
            flip: p.flip,
        }
    }

    /// A job that writes the mean colour into `slot`.
    pub fn blank(slot: usize) -> RenderJob {
        RenderJob {
            slot: slot as u32,
            src_offset: 0,
            src_height: 0,
            src_width: 0,
            scaled_height: 1,
            scaled_width: 1,
            offset_y: 0,
            offset_x: 0,
            flip: false,
        }
    }

    /// The kernel's view: `[slot, offset_lo, offset_hi, src_h, src_w, scaled_h, scaled_w,
    /// offset_y, offset_x, flip]` (order fixed by `render.cu`).
    pub fn words(&self) -> [u32; JOB_WORDS] {
        [
            self.slot,
            self.src_offset as u32,
            (self.src_offset >> 32) as u32,
            self.src_height,
            self.src_width,
            self.scaled_height,
            self.scaled_width,
            self.offset_y,
            self.offset_x,
            self.flip as u32,
        ]
    }

    /// Bytes of interleaved RGB this job reads.
    pub fn src_bytes(&self) -> u64 {
        self.src_height as u64 * self.src_width as u64 * 3
    }
}

/// Which decoder takes each deferred slot of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodePlan {
    /// Jobs in arena order; `jobs[i]` decodes `encoded[slot]` to `arena[src_offset..]`.
    pub jobs: Vec<RenderJob>,
    /// Bytes the arena needs.
    pub arena_bytes: u64,
}

impl DecodePlan {
    /// Lays out every deferred slot's decoded image back to back, each start aligned to 256
    /// bytes (nvJPEG and coalesced reads like aligned rows).
    pub fn new<'a>(deferred: impl IntoIterator<Item = (usize, &'a EncodedImage)>) -> DecodePlan {
        let mut plan = DecodePlan::default();
        for (slot, e) in deferred {
            let job = RenderJob::new(slot, plan.arena_bytes, e);
            plan.arena_bytes += job.src_bytes().div_ceil(256) * 256;
            plan.jobs.push(job);
        }
        plan
    }

    /// The jobs as the flat word array the kernel reads.
    pub fn words(&self) -> Vec<u32> {
        self.jobs.iter().flat_map(|j| j.words()).collect()
    }
}

/// Images per decoder over a stage's lifetime.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StageCounts {
    /// Decoded by the hardware JPEG engine.
    pub hardware: u64,
    /// Decoded by nvJPEG's CUDA backend in batched calls.
    pub cuda_batched: u64,
    /// Decoded by nvJPEG one at a time after a batched call failed.
    pub cuda_single: u64,
    /// Decoded by the CPU decoder because nvJPEG could not.
    pub cpu: u64,
    /// Undecodable by anyone: rendered as the mean colour and excluded from the loss.
    pub blank: u64,
    /// Images the loader's workers had already rendered (uploaded as they are).
    pub host_rendered: u64,
}

/// The rungs of the GPU stage's decode ladder; each writes a job's RGB to its arena place.
pub trait JpegDecoders {
    /// Whether the hardware engine takes this JPEG.
    fn hardware_supports(&mut self, jpeg: &[u8]) -> bool;
    /// One batched decode, on the hardware engine or nvJPEG's CUDA backend.
    fn batched(
        &mut self,
        hardware: bool,
        jpegs: &[&[u8]],
        jobs: &[RenderJob],
    ) -> anyhow::Result<()>;
    /// One image with the CUDA backend.
    fn single(&mut self, jpeg: &[u8], job: &RenderJob) -> anyhow::Result<()>;
    /// One image decoded on the CPU and uploaded.
    fn cpu(&mut self, jpeg: &[u8], job: &RenderJob) -> anyhow::Result<()>;
}

/// Decodes every job of `plan` down the ladder: batched on the hardware engine (the JPEGs it
/// takes) and batched on the CUDA backend (the rest); a failed batched call is retried image by
/// image; an image nvJPEG cannot decode goes to the CPU; one nobody decodes is blanked (its job
/// renders the mean colour) and its slot ignored by the loss ([`Batch::ignore_slot`]). With
/// `force_cpu` every image takes the CPU rung. Returns the jobs to render.
pub fn decode_batch(
    dec: &mut impl JpegDecoders,
    batch: &mut Batch,
    plan: &DecodePlan,
    counts: &mut StageCounts,
    force_cpu: bool,
) -> Vec<RenderJob> {
    let jpeg_of = |batch: &Batch, j: &RenderJob| {
        batch.encoded[j.slot as usize]
            .as_ref()
            .expect("every planned slot is deferred")
            .jpeg
            .clone()
    };
    let mut jobs = plan.jobs.clone();
    let mut for_cpu = Vec::new();
    if force_cpu {
        for_cpu.extend(0..jobs.len());
    } else {
        let (mut hw, mut sw) = (Vec::new(), Vec::new());
        for (i, j) in jobs.iter().enumerate() {
            if dec.hardware_supports(&jpeg_of(batch, j)) {
                hw.push(i);
            } else {
                sw.push(i);
            }
        }
        for (list, hardware) in [(hw, true), (sw, false)] {
            if list.is_empty() {
                continue;
            }
            let data: Vec<_> = list.iter().map(|&i| jpeg_of(batch, &jobs[i])).collect();
            let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
            let listed: Vec<RenderJob> = list.iter().map(|&i| jobs[i]).collect();
            match dec.batched(hardware, &refs, &listed) {
                Ok(()) if hardware => counts.hardware += list.len() as u64,
                Ok(()) => counts.cuda_batched += list.len() as u64,
                Err(e) => {
                    eprintln!("warning: batched nvJPEG decode failed ({e}); decoding one by one");
                    for (k, &i) in list.iter().enumerate() {
                        match dec.single(refs[k], &jobs[i]) {
                            Ok(()) => counts.cuda_single += 1,
                            Err(_) => for_cpu.push(i),
                        }
                    }
                }
            }
        }
    }
    for i in for_cpu {
        let slot = jobs[i].slot as usize;
        match dec.cpu(&jpeg_of(batch, &jobs[i]), &jobs[i]) {
            Ok(()) => counts.cpu += 1,
            Err(e) => {
                eprintln!(
                    "warning: batch slot {slot} (epoch {}, sequence {}): no decoder could decode \
                     the JPEG ({e}); the sample is blanked and ignored by the loss",
                    batch.epoch,
                    batch.first_sequence + slot as u64
                );
                counts.blank += 1;
                jobs[i] = RenderJob::blank(slot);
                batch.ignore_slot(slot);
            }
        }
    }
    jobs
}

/// Arena capacity to allocate for `needed` bytes when `current` is too small: 25% headroom
/// so that a slowly growing maximum does not reallocate every batch.
pub fn grow_capacity(current: u64, needed: u64) -> u64 {
    if needed <= current {
        current
    } else {
        (needed + needed / 4).div_ceil(1 << 20) << 20
    }
}

/// Source coordinate and weight for output coordinate `o` of a half-pixel-centre bilinear
/// resize by `scale` = source size / scaled size: `(lower, upper, fraction)`, indices clamped
/// to `[0, size − 1]` as TensorFlow clamps them. The kernel computes the same f32 expression
/// with round-to-nearest multiplies and adds (no fused multiply-add).
pub fn bilinear_tap(o: u32, scale: f32, size: u32) -> (u32, u32, f32) {
    let src = (o as f32 + 0.5) * scale - 0.5;
    let floor = src.floor();
    let frac = src - floor;
    let last = size as i64 - 1;
    let lo = (floor as i64).clamp(0, last) as u32;
    let hi = (floor as i64 + 1).clamp(0, last) as u32;
    (lo, hi, frac)
}

/// Renders one job into `out` (`3 × H × W` CHW floats) from the decoded image exactly as the
/// render kernel does.
pub fn render_reference(img: &DecodedImage, job: &RenderJob, cfg: &AugmentConfig, out: &mut [f32]) {
    let (out_h, out_w) = (cfg.image_size.0 as usize, cfg.image_size.1 as usize);
    let plane = out_h * out_w;
    assert_eq!(out.len(), 3 * plane, "output buffer has the wrong size");
    out.fill(0.0);
    if job.src_width == 0 {
        return;
    }
    assert_eq!(
        (img.height, img.width),
        (job.src_height, job.src_width),
        "decoded size differs from the job's"
    );
    let scale_y = job.src_height as f32 / job.scaled_height as f32;
    let scale_x = job.src_width as f32 / job.scaled_width as f32;
    let rows = out_h.min((job.scaled_height - job.offset_y) as usize);
    let cols = out_w.min((job.scaled_width - job.offset_x) as usize);
    let w = job.src_width as usize;
    for y in 0..rows {
        let (y0, y1, fy) = bilinear_tap(y as u32 + job.offset_y, scale_y, job.src_height);
        for x in 0..cols {
            let mut sx = x as u32 + job.offset_x;
            if job.flip {
                sx = job.scaled_width - 1 - sx;
            }
            let (x0, x1, fx) = bilinear_tap(sx, scale_x, job.src_width);
            for c in 0..3 {
                let px = |yy: u32, xx: u32| img.rgb[(yy as usize * w + xx as usize) * 3 + c] as f32;
                let top = px(y0, x0) + (px(y0, x1) - px(y0, x0)) * fx;
                let bottom = px(y1, x0) + (px(y1, x1) - px(y1, x0)) * fx;
                let v = top + (bottom - top) * fy;
                out[c * plane + y * out_w + x] = (v - MEAN_RGB[c]) / STDDEV_RGB[c];
            }
        }
    }
}

/// The geometry of a job as [`ScaleParams`] (for comparing with the CPU path).
pub fn job_params(job: &RenderJob, image_scale: f32) -> ScaleParams {
    ScaleParams {
        flip: job.flip,
        image_scale,
        scaled_height: job.scaled_height,
        scaled_width: job.scaled_width,
        offset_y: job.offset_y,
        offset_x: job.offset_x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{render_image, ImageWorkspace};
    use prost::bytes::Bytes;
    use rand::SeedableRng;

    fn encoded(h: u32, w: u32, params: ScaleParams) -> EncodedImage {
        EncodedImage {
            jpeg: Bytes::new(),
            height: h,
            width: w,
            params,
        }
    }

    /// A scripted decoder: which JPEGs (by first byte) the hardware takes and which fail at
    /// each rung; records what each rung was asked to do.
    #[derive(Default)]
    struct Script {
        hardware: Vec<u8>,
        fail_batched_cuda: bool,
        fail_single: Vec<u8>,
        fail_cpu: Vec<u8>,
        calls: Vec<String>,
    }

    impl JpegDecoders for Script {
        fn hardware_supports(&mut self, jpeg: &[u8]) -> bool {
            self.hardware.contains(&jpeg[0])
        }
        fn batched(
            &mut self,
            hardware: bool,
            jpegs: &[&[u8]],
            jobs: &[RenderJob],
        ) -> anyhow::Result<()> {
            assert_eq!(jpegs.len(), jobs.len());
            let ids: Vec<u8> = jpegs.iter().map(|j| j[0]).collect();
            self.calls.push(format!("batched hw={hardware} {ids:?}"));
            anyhow::ensure!(hardware || !self.fail_batched_cuda, "scripted failure");
            Ok(())
        }
        fn single(&mut self, jpeg: &[u8], _: &RenderJob) -> anyhow::Result<()> {
            self.calls.push(format!("single {}", jpeg[0]));
            anyhow::ensure!(!self.fail_single.contains(&jpeg[0]), "scripted failure");
            Ok(())
        }
        fn cpu(&mut self, jpeg: &[u8], _: &RenderJob) -> anyhow::Result<()> {
            self.calls.push(format!("cpu {}", jpeg[0]));
            anyhow::ensure!(!self.fail_cpu.contains(&jpeg[0]), "scripted failure");
            Ok(())
        }
    }

    /// A deferred-decode batch of 5 slots whose JPEG bytes start with 10 + slot (slot 4 was
    /// rendered by a worker).
    fn five_slot_batch() -> crate::loader::Batch {
        use crate::loader::{Loader, LoaderConfig};
        let dir = tempfile::tempdir().unwrap();
        let synth = crate::coco::synth::generate(
            &dir.path().join("coco"),
            &crate::coco::synth::SynthOptions {
                images: 5,
                seed: 2,
                min_side: 64,
                max_side: 96,
                ..Default::default()
            },
        )
        .unwrap();
        let shards = crate::coco::convert::convert(
            &crate::coco::convert::ConvertOptions {
                image_dir: synth.image_dir,
                object_annotations_file: Some(synth.annotations),
                caption_annotations_file: None,
                image_info_file: None,
                output_file_prefix: dir.path().join("s/train").to_string_lossy().into_owned(),
                num_shards: 1,
                include_masks: false,
                num_threads: 1,
            },
            &|_, _| {},
        )
        .unwrap()
        .shards;
        let mut cfg = LoaderConfig::new(crate::augment::Mode::Train, 64, 5);
        cfg.threads = 1;
        cfg.defer_jpeg_decode = true;
        let anchors =
            crate::anchors::Anchors::new(&crate::anchors::AnchorConfig::efficientdet(64, 64))
                .unwrap();
        let labeler = std::sync::Arc::new(crate::labeler::Labeler::new(anchors));
        let decoder = std::sync::Arc::new(crate::decode::CpuDecoder);
        let mut loader = Loader::start(cfg, shards, labeler, decoder).unwrap();
        let mut batch = loader.next_batch().unwrap().unwrap();
        for slot in 0..5 {
            if let Some(e) = batch.encoded[slot].as_mut() {
                let mut bytes = e.jpeg.to_vec();
                bytes[0] = 10 + slot as u8;
                e.jpeg = Bytes::from(bytes);
            }
        }
        batch.encoded[4] = None;
        batch
    }

    #[test]
    fn decode_ladder_takes_each_image_down_only_as_far_as_needed() {
        let mut batch = five_slot_batch();
        let plan = DecodePlan::new(batch.deferred_slots());
        assert_eq!(plan.jobs.len(), 4);
        // Hardware takes 10 and 12; the CUDA batch (11, 13) fails; 11 decodes alone, 13 does
        // not, goes to the CPU, which fails too: slot 3 is blanked and ignored.
        let mut dec = Script {
            hardware: vec![10, 12],
            fail_batched_cuda: true,
            fail_single: vec![13],
            fail_cpu: vec![13],
            ..Default::default()
        };
        let mut counts = StageCounts::default();
        let jobs = decode_batch(&mut dec, &mut batch, &plan, &mut counts, false);
        assert_eq!(
            dec.calls,
            [
                "batched hw=true [10, 12]",
                "batched hw=false [11, 13]",
                "single 11",
                "single 13",
                "cpu 13"
            ]
        );
        let want = StageCounts {
            hardware: 2,
            cuda_single: 1,
            blank: 1,
            ..Default::default()
        };
        assert_eq!(counts, want);
        assert_eq!(jobs[..3], plan.jobs[..3]);
        assert_eq!(jobs[3], RenderJob::blank(3));
        assert!(batch.encoded[3].is_none());
        assert_eq!(batch.buffers().num_positives[3], 0.0);
        let l0 = batch.cls_targets(0);
        let n = l0.len() / 5;
        assert!(l0[3 * n..4 * n].iter().all(|&c| c == -2));
        assert!(l0[..n].iter().all(|&c| c != -2));
    }

    #[test]
    fn decode_ladder_uses_batches_when_they_work_and_the_cpu_when_forced() {
        let mut batch = five_slot_batch();
        let plan = DecodePlan::new(batch.deferred_slots());
        let mut dec = Script::default();
        let mut counts = StageCounts::default();
        let jobs = decode_batch(&mut dec, &mut batch, &plan, &mut counts, false);
        assert_eq!(dec.calls, ["batched hw=false [10, 11, 12, 13]"]);
        assert_eq!((counts.cuda_batched, counts.cpu, counts.blank), (4, 0, 0));
        assert_eq!(jobs, plan.jobs);

        let mut dec = Script {
            hardware: vec![10, 11, 12, 13],
            ..Default::default()
        };
        let jobs = decode_batch(&mut dec, &mut batch, &plan, &mut counts, true);
        assert_eq!(dec.calls, ["cpu 10", "cpu 11", "cpu 12", "cpu 13"]);
        assert_eq!(counts.cpu, 4);
        assert_eq!(jobs, plan.jobs);
    }

    #[test]
    fn job_words_are_in_kernel_order() {
        let cfg = AugmentConfig::d0(512);
        let p = ScaleParams::from_draws(true, 1.5, 0.5, 0.25, 480, 640, &cfg);
        let job = RenderJob::new(5, (3u64 << 32) + 7, &encoded(480, 640, p));
        assert_eq!(job.words(), [5, 7, 3, 480, 640, 576, 768, 32, 64, 1]);
        assert_eq!(job.src_bytes(), 480 * 640 * 3);
        assert_eq!(RenderJob::blank(2).words()[4], 0);
    }

    #[test]
    fn plan_packs_aligned_and_keeps_slots() {
        let cfg = AugmentConfig::d0(64);
        let a = encoded(10, 10, ScaleParams::eval(10, 10, &cfg)); // 300 bytes → 512
        let b = encoded(2, 128, ScaleParams::eval(2, 128, &cfg)); // 768 bytes → 768
        let plan = DecodePlan::new([(1, &a), (3, &b), (4, &a)]);
        let offsets: Vec<_> = plan.jobs.iter().map(|j| (j.slot, j.src_offset)).collect();
        assert_eq!(offsets, vec![(1, 0), (3, 512), (4, 1280)]);
        assert_eq!(plan.arena_bytes, 1792);
        assert_eq!(plan.words().len(), 3 * JOB_WORDS);
        assert_eq!(DecodePlan::new([]).arena_bytes, 0);
    }

    #[test]
    fn arena_grows_with_headroom_in_mib() {
        assert_eq!(grow_capacity(10 << 20, 5 << 20), 10 << 20);
        assert_eq!(grow_capacity(0, 8 << 20), 10 << 20);
        assert_eq!(grow_capacity(1 << 20, 1), 1 << 20);
        assert_eq!(grow_capacity(0, 1), 1 << 20);
    }

    #[test]
    fn bilinear_taps_match_tensorflow_half_pixel_rule() {
        // Downscale 4 → 2 (scale 2): output 0 samples source 0.5 → between 0 and 1, half way.
        assert_eq!(bilinear_tap(0, 2.0, 4), (0, 1, 0.5));
        assert_eq!(bilinear_tap(1, 2.0, 4), (2, 3, 0.5));
        // Upscale 2 → 4 (scale 0.5): output 0 samples −0.25 → clamped to 0 on both sides.
        assert_eq!(bilinear_tap(0, 0.5, 2), (0, 0, 0.75));
        assert_eq!(bilinear_tap(1, 0.5, 2), (0, 1, 0.25));
        assert_eq!(bilinear_tap(3, 0.5, 2), (1, 1, 0.25));
        // Identity.
        assert_eq!(bilinear_tap(7, 1.0, 9), (7, 8, 0.0));
    }

    #[test]
    fn reference_render_upscales_flips_crops_and_pads_exactly() {
        // 1×2 image [0, 255] (grey levels), eval to 4×4: scale 2 → 2×4, rows 2..4 padding.
        let cfg = AugmentConfig {
            image_size: (4, 4),
            ..AugmentConfig::d0(4)
        };
        let img = DecodedImage {
            width: 2,
            height: 1,
            rgb: vec![0, 0, 0, 255, 255, 255],
        };
        let p = ScaleParams::eval(1, 2, &cfg);
        assert_eq!((p.scaled_height, p.scaled_width), (2, 4));
        let job = RenderJob::new(0, 0, &encoded(1, 2, p));
        let mut out = vec![f32::NAN; 48];
        render_reference(&img, &job, &cfg, &mut out);
        // Columns sample −0.25, 0.25, 0.75, 1.25 → 0, 63.75, 191.25, 255.
        let want = [0.0f32, 63.75, 191.25, 255.0];
        for c in 0..3 {
            for y in 0..4 {
                for x in 0..4 {
                    let got = out[c * 16 + y * 4 + x];
                    let expect = if y < 2 {
                        (want[x] - MEAN_RGB[c]) / STDDEV_RGB[c]
                    } else {
                        0.0
                    };
                    assert_eq!(got, expect, "c{c} y{y} x{x}");
                }
            }
        }
        let flipped = RenderJob { flip: true, ..job };
        render_reference(&img, &flipped, &cfg, &mut out);
        assert_eq!(out[0], (255.0 - MEAN_RGB[0]) / STDDEV_RGB[0]);
        assert_eq!(out[3], (0.0 - MEAN_RGB[0]) / STDDEV_RGB[0]);
        render_reference(&img, &RenderJob::blank(0), &cfg, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }

    /// The GPU render and the CPU path differ only by the CPU path's u8 rounding of resized
    /// pixels and its fixed-point weights: at most a couple of grey levels, on every sampled
    /// geometry, with identical padding.
    #[test]
    fn reference_render_agrees_with_the_cpu_path() {
        let cfg = AugmentConfig::d0(64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut ws = ImageWorkspace::default();
        let (mut cpu, mut gpu) = (vec![0.0; 3 * 64 * 64], vec![0.0; 3 * 64 * 64]);
        let one_level = 1.0 / STDDEV_RGB[2];
        for (h, w) in [(48, 64), (101, 67), (30, 200), (64, 64), (7, 5)] {
            // Smooth content: bilinear variants agree to rounding there.
            let rgb = (0..h * w * 3)
                .map(|i| {
                    let (p, c) = (i / 3, i % 3);
                    let (y, x) = ((p / w) as f32, (p % w) as f32);
                    (128.0 + 60.0 * ((x * 0.15 + c as f32).sin() * (y * 0.1).cos())) as u8
                })
                .collect();
            let img = DecodedImage {
                width: w as u32,
                height: h as u32,
                rgb,
            };
            for i in 0..40 {
                let p = if i == 0 {
                    ScaleParams::eval(h as u32, w as u32, &cfg)
                } else {
                    ScaleParams::train(&mut rng, h as u32, w as u32, &cfg)
                };
                render_image(&img, &p, &cfg, &mut ws, &mut cpu).unwrap();
                let job = RenderJob::new(0, 0, &encoded(h as u32, w as u32, p));
                render_reference(&img, &job, &cfg, &mut gpu);
                let (rows, cols) = p.crop_size(&cfg);
                let mut worst = 0.0f32;
                for (i, (a, b)) in cpu.iter().zip(&gpu).enumerate() {
                    let (y, x) = ((i / 64) % 64, i % 64);
                    if y >= rows as usize || x >= cols as usize {
                        assert_eq!((*a, *b), (0.0, 0.0), "padding at {y},{x}");
                    }
                    worst = worst.max((a - b).abs());
                }
                assert!(
                    worst <= 2.5 * one_level,
                    "{h}x{w} {p:?}: worst difference {worst} (one level = {one_level})"
                );
            }
        }
    }
}
