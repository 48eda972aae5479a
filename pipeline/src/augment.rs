//! D0 augmentation exactly as automl's `DetectionInputProcessor` does it, in its order:
//! normalize (ImageNet mean/std) → horizontal flip (p = 0.5, train) → random scale jitter
//! (train) or fit-to-size (eval) → bilinear resize → crop at a random offset → pad
//! bottom/right with the mean colour (0 after normalization). Boxes follow: flipped, scaled,
//! shifted, clipped to `[0, size − 1]`, zero-area boxes dropped.
//!
//! The scale arithmetic is done in f32 with truncating casts, as TensorFlow does it, so the
//! sampled sizes and offsets (and hence the anchor targets) are the reference's.
//!
//! The image work is fused: only the source region that lands inside the crop is resized
//! (mirrored when flipping), and normalization writes straight into the CHW output planes.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rand::Rng;

use crate::decode::DecodedImage;

/// ImageNet statistics on the 0–255 scale (automl's `mean_rgb` / `stddev_rgb`).
pub const MEAN_RGB: [f32; 3] = [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0];
pub const STDDEV_RGB: [f32; 3] = [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0];

/// Train (random flip + scale jitter + crop) or eval (fit, pad).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Train,
    Eval,
}

/// Augmentation settings (automl hparams: image_size, jitter_min/max, input_rand_hflip,
/// skip_crowd_during_training).
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Output `(height, width)`.
    pub image_size: (u32, u32),
    pub jitter_min: f32,
    pub jitter_max: f32,
    pub hflip: bool,
    pub skip_crowd_during_training: bool,
}

impl AugmentConfig {
    /// D0's settings at the given square size.
    pub fn d0(size: u32) -> AugmentConfig {
        AugmentConfig {
            image_size: (size, size),
            jitter_min: 0.1,
            jitter_max: 2.0,
            hflip: true,
            skip_crowd_during_training: true,
        }
    }
}

/// The geometry of one sample's transform.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleParams {
    pub flip: bool,
    /// Original → scaled image.
    pub image_scale: f32,
    pub scaled_height: u32,
    pub scaled_width: u32,
    pub offset_y: u32,
    pub offset_x: u32,
}

impl ScaleParams {
    /// Samples train-mode parameters: flip, then the jitter factor, then the y and x offsets
    /// (the order automl draws them in).
    pub fn train(rng: &mut impl Rng, height: u32, width: u32, cfg: &AugmentConfig) -> Self {
        let flip = cfg.hflip && rng.gen::<f32>() > 0.5;
        let factor = cfg.jitter_min + (cfg.jitter_max - cfg.jitter_min) * rng.gen::<f32>();
        let (uy, ux) = (rng.gen::<f32>(), rng.gen::<f32>());
        Self::from_draws(flip, factor, uy, ux, height, width, cfg)
    }

    /// Train-mode geometry from explicit draws (`factor` in [jitter_min, jitter_max),
    /// `uy`, `ux` in [0, 1)).
    pub fn from_draws(
        flip: bool,
        factor: f32,
        uy: f32,
        ux: f32,
        height: u32,
        width: u32,
        cfg: &AugmentConfig,
    ) -> Self {
        let (out_h, out_w) = cfg.image_size;
        let scaled_y = (factor * out_h as f32) as i32;
        let scaled_x = (factor * out_w as f32) as i32;
        let (h, w) = (height as f32, width as f32);
        let image_scale = (scaled_x as f32 / w).min(scaled_y as f32 / h);
        let scaled_height = ((h * image_scale) as i32).max(1);
        let scaled_width = ((w * image_scale) as i32).max(1);
        let offset_y = (((scaled_height - out_h as i32).max(0)) as f32 * uy) as u32;
        let offset_x = (((scaled_width - out_w as i32).max(0)) as f32 * ux) as u32;
        ScaleParams {
            flip,
            image_scale,
            scaled_height: scaled_height as u32,
            scaled_width: scaled_width as u32,
            offset_y,
            offset_x,
        }
    }

    /// Eval mode: fit the image inside the output size, no flip, no crop.
    pub fn eval(height: u32, width: u32, cfg: &AugmentConfig) -> Self {
        let (out_h, out_w) = cfg.image_size;
        let (h, w) = (height as f32, width as f32);
        let image_scale = (out_w as f32 / w).min(out_h as f32 / h);
        ScaleParams {
            flip: false,
            image_scale,
            scaled_height: ((h * image_scale) as i32).max(1) as u32,
            scaled_width: ((w * image_scale) as i32).max(1) as u32,
            offset_y: 0,
            offset_x: 0,
        }
    }

    /// Height and width of the part of the scaled image that lands in the output.
    pub fn crop_size(&self, cfg: &AugmentConfig) -> (u32, u32) {
        let (out_h, out_w) = cfg.image_size;
        (
            out_h.min(self.scaled_height - self.offset_y),
            out_w.min(self.scaled_width - self.offset_x),
        )
    }
}

/// Transforms normalized `(ymin, xmin, ymax, xmax)` boxes into output pixels and keeps the
/// non-degenerate ones; `keep` receives the indices of the kept input boxes.
pub fn transform_boxes(
    boxes: &[[f32; 4]],
    p: &ScaleParams,
    cfg: &AugmentConfig,
    out: &mut Vec<[f32; 4]>,
    keep: &mut Vec<usize>,
) {
    out.clear();
    keep.clear();
    let (out_h, out_w) = cfg.image_size;
    let (max_y, max_x) = ((out_h - 1) as f32, (out_w - 1) as f32);
    let (sh, sw) = (p.scaled_height as f32, p.scaled_width as f32);
    let (oy, ox) = (p.offset_y as f32, p.offset_x as f32);
    for (i, b) in boxes.iter().enumerate() {
        let [ymin, mut xmin, ymax, mut xmax] = *b;
        if p.flip {
            (xmin, xmax) = (1.0 - xmax, 1.0 - xmin);
        }
        let t = [
            (ymin * sh - oy).clamp(0.0, max_y),
            (xmin * sw - ox).clamp(0.0, max_x),
            (ymax * sh - oy).clamp(0.0, max_y),
            (xmax * sw - ox).clamp(0.0, max_x),
        ];
        if (t[2] - t[0]) * (t[3] - t[1]) != 0.0 {
            out.push(t);
            keep.push(i);
        }
    }
}

/// Reusable buffers for [`render_image`].
pub struct ImageWorkspace {
    resizer: Resizer,
    resized: Vec<u8>,
}

impl Default for ImageWorkspace {
    fn default() -> Self {
        ImageWorkspace {
            resizer: Resizer::new(),
            resized: Vec::new(),
        }
    }
}

/// An image tensor element: the loader writes f32 or f16 batches straight from the render.
pub trait PixelValue: Copy + Send {
    fn from_f32(v: f32) -> Self;
}

impl PixelValue for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl PixelValue for half::f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> half::f16 {
        half::f16::from_f32(v)
    }
}

/// Writes the augmented, normalized image as CHW planes into `out`
/// (`3 × out_h × out_w` floats); the padding is 0 (the mean colour).
pub fn render_image<T: PixelValue>(
    img: &DecodedImage,
    p: &ScaleParams,
    cfg: &AugmentConfig,
    ws: &mut ImageWorkspace,
    out: &mut [T],
) -> anyhow::Result<()> {
    let (out_h, out_w) = (cfg.image_size.0 as usize, cfg.image_size.1 as usize);
    anyhow::ensure!(
        out.len() == 3 * out_h * out_w,
        "output buffer has the wrong size"
    );
    let (ch, cw) = p.crop_size(cfg);
    let (ch, cw) = (ch as usize, cw as usize);
    // Source region (in original pixels) that maps onto the crop window; when flipping, it
    // is the mirror window, and the result is written mirrored.
    let sy = img.height as f64 / p.scaled_height as f64;
    let sx = img.width as f64 / p.scaled_width as f64;
    let x0 = if p.flip {
        p.scaled_width as usize - p.offset_x as usize - cw
    } else {
        p.offset_x as usize
    };
    // Clamp against rounding: (offset + crop) / scale can exceed the source by an ulp.
    let (left, top) = (x0 as f64 * sx, p.offset_y as f64 * sy);
    let crop_w = (cw as f64 * sx).min(img.width as f64 - left);
    let crop_h = (ch as f64 * sy).min(img.height as f64 - top);
    let src = ImageRef::new(img.width, img.height, &img.rgb, PixelType::U8x3)?;
    ws.resized.resize(ch * cw * 3, 0);
    let mut dst = Image::from_slice_u8(cw as u32, ch as u32, &mut ws.resized, PixelType::U8x3)?;
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Interpolation(FilterType::Bilinear))
        .crop(left, top, crop_w, crop_h);
    ws.resizer.resize(&src, &mut dst, &opts)?;

    let plane = out_h * out_w;
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    let scale = [
        1.0 / STDDEV_RGB[0],
        1.0 / STDDEV_RGB[1],
        1.0 / STDDEV_RGB[2],
    ];
    for y in 0..out_h {
        let row = y * out_w;
        let (r, g, b) = (
            &mut r_plane[row..row + out_w],
            &mut g_plane[row..row + out_w],
            &mut b_plane[row..row + out_w],
        );
        let zero = T::from_f32(0.0);
        if y >= ch {
            r.fill(zero);
            g.fill(zero);
            b.fill(zero);
            continue;
        }
        let src_row = &ws.resized[y * cw * 3..(y + 1) * cw * 3];
        let pixels = src_row.chunks_exact(3);
        let planes = r[..cw].iter_mut().zip(&mut g[..cw]).zip(&mut b[..cw]);
        let put = |((r, g), b): ((&mut T, &mut T), &mut T), px: &[u8]| {
            *r = T::from_f32((px[0] as f32 - MEAN_RGB[0]) * scale[0]);
            *g = T::from_f32((px[1] as f32 - MEAN_RGB[1]) * scale[1]);
            *b = T::from_f32((px[2] as f32 - MEAN_RGB[2]) * scale[2]);
        };
        // Two loops rather than a flip test per pixel, so each one vectorizes.
        if p.flip {
            planes.zip(pixels.rev()).for_each(|(o, px)| put(o, px));
        } else {
            planes.zip(pixels).for_each(|(o, px)| put(o, px));
        }
        r[cw..].fill(zero);
        g[cw..].fill(zero);
        b[cw..].fill(zero);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AugmentConfig {
        AugmentConfig::d0(512)
    }

    #[test]
    fn eval_scale_fits_longer_side() {
        let p = ScaleParams::eval(480, 640, &cfg());
        assert_eq!(p.image_scale, 0.8);
        assert_eq!((p.scaled_height, p.scaled_width), (384, 512));
        assert_eq!((p.offset_y, p.offset_x, p.flip), (0, 0, false));
        let p = ScaleParams::eval(427, 640, &cfg());
        // 427 * 0.8 = 341.6 → 341 (truncation, as tf.cast).
        assert_eq!((p.scaled_height, p.scaled_width), (341, 512));
        let p = ScaleParams::eval(1000, 200, &cfg());
        assert_eq!(p.image_scale, 0.512);
        assert_eq!((p.scaled_height, p.scaled_width), (512, 102));
    }

    #[test]
    fn train_scale_truncates_like_tensorflow() {
        // factor 1.5: scaled_y = scaled_x = int(768.0) = 768; scale = min(768/640, 768/480) = 1.2
        let p = ScaleParams::from_draws(false, 1.5, 0.5, 0.25, 480, 640, &cfg());
        assert_eq!(p.image_scale, 1.2);
        assert_eq!((p.scaled_height, p.scaled_width), (576, 768));
        // offsets: int((576 - 512) * 0.5) = 32, int((768 - 512) * 0.25) = 64
        assert_eq!((p.offset_y, p.offset_x), (32, 64));
        assert_eq!(p.crop_size(&cfg()), (512, 512));
        // factor 0.3: int(153.6) = 153; scale = 153/640; smaller than output: no offset.
        let p = ScaleParams::from_draws(true, 0.3, 0.9, 0.9, 480, 640, &cfg());
        assert_eq!(p.image_scale, 153.0f32 / 640.0);
        assert_eq!((p.scaled_height, p.scaled_width), (114, 153));
        assert_eq!((p.offset_y, p.offset_x), (0, 0));
        assert_eq!(p.crop_size(&cfg()), (114, 153));
    }

    #[test]
    fn box_math_flip_scale_shift_clip_drop() {
        let p = ScaleParams {
            flip: true,
            image_scale: 2.0,
            scaled_height: 1000,
            scaled_width: 800,
            offset_y: 100,
            offset_x: 50,
        };
        let boxes = [
            [0.2, 0.1, 0.4, 0.3],   // normal
            [0.0, 0.0, 0.05, 0.05], // lands above the crop → zero height → dropped
            [0.5, 0.9, 0.9, 1.0],   // flipped to x in [0, 0.1] → partly left of crop
        ];
        let (mut out, mut keep) = (Vec::new(), Vec::new());
        transform_boxes(&boxes, &p, &cfg(), &mut out, &mut keep);
        assert_eq!(keep, vec![0, 2]);
        // box 0: flipped x = [0.7, 0.9] → ×800 = [560, 720] − 50 = [510, 670] → clip 511
        // y: [200, 400] − 100 = [100, 300]
        assert_eq!(out[0], [100.0, 510.0, 300.0, 511.0]);
        // box 2: y [500, 900] − 100 = [400, 800→511]; x flipped [0, 0.1]·800 = [0, 80] − 50 → [0, 30]
        // (f32 arithmetic, as TensorFlow: 1 − 0.9 is 0.100000024)
        assert_eq!(out[1], [400.0, 0.0, 511.0, (1.0f32 - 0.9) * 800.0 - 50.0]);
    }

    #[test]
    fn render_pads_with_zero_and_flips() {
        // 4x2 image, left half red, right half blue; eval at 8x8 → scale 2 → 4x8 rows, padded.
        let cfg = AugmentConfig {
            image_size: (8, 8),
            ..AugmentConfig::d0(8)
        };
        let mut img = DecodedImage {
            width: 4,
            height: 2,
            rgb: vec![0; 24],
        };
        for y in 0..2 {
            for x in 0..4 {
                let px = &mut img.rgb[(y * 4 + x) * 3..(y * 4 + x) * 3 + 3];
                px.copy_from_slice(if x < 2 { &[255, 0, 0] } else { &[0, 0, 255] });
            }
        }
        let mut ws = ImageWorkspace::default();
        let mut out = vec![f32::NAN; 3 * 64];
        let p = ScaleParams::eval(2, 4, &cfg);
        assert_eq!((p.scaled_height, p.scaled_width), (4, 8));
        render_image(&img, &p, &cfg, &mut ws, &mut out).unwrap();
        let red = |y: usize, x: usize| out[y * 8 + x];
        let red_hi = (255.0 - MEAN_RGB[0]) / STDDEV_RGB[0];
        let red_lo = (0.0 - MEAN_RGB[0]) / STDDEV_RGB[0];
        assert!((red(0, 0) - red_hi).abs() < 1e-5);
        assert!((red(3, 7) - red_lo).abs() < 1e-5);
        for y in 4..8 {
            for x in 0..8 {
                assert_eq!(red(y, x), 0.0);
                assert_eq!(out[64 + y * 8 + x], 0.0);
                assert_eq!(out[128 + y * 8 + x], 0.0);
            }
        }
        let flipped = ScaleParams { flip: true, ..p };
        render_image(&img, &flipped, &cfg, &mut ws, &mut out).unwrap();
        assert!((out[0] - red_lo).abs() < 1e-5);
        assert!((out[7] - red_hi).abs() < 1e-5);
    }

    #[test]
    fn render_never_fails_for_any_sampled_geometry() {
        use rand::SeedableRng;
        let cfg = AugmentConfig::d0(64);
        let mut ws = ImageWorkspace::default();
        let mut out = vec![0.0; 3 * 64 * 64];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (h, w) in [
            (1, 1),
            (3, 500),
            (101, 67),
            (240, 320),
            (333, 77),
            (17, 1000),
        ] {
            let img = DecodedImage {
                width: w,
                height: h,
                rgb: vec![128; (w * h * 3) as usize],
            };
            for _ in 0..200 {
                let p = ScaleParams::train(&mut rng, h, w, &cfg);
                render_image(&img, &p, &cfg, &mut ws, &mut out)
                    .unwrap_or_else(|e| panic!("{h}x{w} {p:?}: {e}"));
            }
            render_image(
                &img,
                &ScaleParams::eval(h, w, &cfg),
                &cfg,
                &mut ws,
                &mut out,
            )
            .unwrap();
        }
    }
}
