//! Multi-level anchor boxes, laid out exactly as automl's `tf2/anchors.py` `Anchors` does.
//!
//! This module owns anchor geometry: feature-map sizes per level, the flat anchor table in
//! absolute pixels `(ymin, xmin, ymax, xmax)`, and the per-level offsets that let callers slice
//! per-level views of flat target buffers without copying.
//!
//! Enumeration order (which fixes every index): level → feature row `y` → feature column `x`
//! → octave scale → aspect ratio. Coordinates are computed in `f64` the way numpy does and then
//! rounded to `f32`, so the table is bit-identical to the reference's `float32` tensor.

use std::fmt;

/// Parameters of the anchor set (automl hparams `min_level`, `max_level`, `num_scales`,
/// `aspect_ratios`, `anchor_scale`, `image_size`).
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorConfig {
    pub min_level: u32,
    pub max_level: u32,
    /// Octave scales per level: scale `k` multiplies the base size by `2^(k / num_scales)`.
    pub num_scales: u32,
    /// Width/height ratios; ratio `a` stretches x by `sqrt(a)` and y by `1 / sqrt(a)`.
    pub aspect_ratios: Vec<f64>,
    /// Base anchor size in units of the level stride.
    pub anchor_scale: f64,
    pub image_height: usize,
    pub image_width: usize,
}

impl AnchorConfig {
    /// EfficientDet defaults: levels 3–7, 3 scales, aspect ratios 1, 2, 0.5, anchor scale 4.
    pub fn efficientdet(image_height: usize, image_width: usize) -> Self {
        AnchorConfig {
            min_level: 3,
            max_level: 7,
            num_scales: 3,
            aspect_ratios: vec![1.0, 2.0, 0.5],
            anchor_scale: 4.0,
            image_height,
            image_width,
        }
    }
}

/// Why an [`AnchorConfig`] cannot produce anchors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnchorError {
    #[error("invalid anchor config: {0}")]
    Config(String),
}

/// One pyramid level: its feature map shape and where its anchors live in the flat table.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelInfo {
    pub level: u32,
    /// Feature map height and width at this level.
    pub height: usize,
    pub width: usize,
    /// Index of this level's first anchor in the flat anchor table.
    pub offset: usize,
    /// `height * width * anchors_per_location`.
    pub num_anchors: usize,
    /// Stride in pixels (`image size / feature size`, may be fractional for odd sizes).
    pub stride_y: f64,
    pub stride_x: f64,
}

impl LevelInfo {
    /// Range of this level in a per-anchor buffer (e.g. class targets, `[H, W, A]`).
    pub fn anchor_range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.num_anchors
    }
    /// Range of this level in a buffer with 4 values per anchor (box targets, `[H, W, A * 4]`).
    pub fn box_range(&self) -> std::ops::Range<usize> {
        4 * self.offset..4 * (self.offset + self.num_anchors)
    }
}

/// Extents of one anchor shape (octave scale × aspect ratio) on one level, per row and per
/// column of the feature grid. Anchor `(i, j)` of this shape is `(y0[i], x0[j], y1[i], x1[j])`.
#[derive(Debug, Clone)]
pub(crate) struct ShapeGrid {
    pub y0: Vec<f32>,
    pub y1: Vec<f32>,
    pub x0: Vec<f32>,
    pub x1: Vec<f32>,
    /// Nominal half height / half width (f64, before rounding).
    pub half_h: f64,
    pub half_w: f64,
    /// Extremes of the f32 heights `y1 - y0` and widths `x1 - x0` over rows / columns.
    pub h_min: f32,
    pub h_max: f32,
    pub w_min: f32,
    pub w_max: f32,
}

/// Per level: grid centers and the shapes.
#[derive(Debug, Clone)]
pub(crate) struct LevelGrid {
    /// Row / column centers exactly as numpy's `arange(stride / 2, size, stride)` yields them.
    pub cy: Vec<f64>,
    pub cx: Vec<f64>,
    pub shapes: Vec<ShapeGrid>,
}

/// The full anchor set for one image size.
#[derive(Clone)]
pub struct Anchors {
    config: AnchorConfig,
    levels: Vec<LevelInfo>,
    per_location: usize,
    boxes: Vec<f32>,
    pub(crate) grids: Vec<LevelGrid>,
}

impl fmt::Debug for Anchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Anchors")
            .field("config", &self.config)
            .field("levels", &self.levels)
            .field("num_anchors", &self.num_anchors())
            .finish()
    }
}

/// numpy's `arange(start, stop, step)` for float64: `ceil((stop - start) / step)` elements,
/// element 1 is `start + step` and element `i >= 2` is `start + i * ((start + step) - start)`.
fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut v = Vec::with_capacity(len);
    v.push(start);
    if len > 1 {
        let second = start + step;
        v.push(second);
        let delta = second - start;
        for i in 2..len {
            v.push(start + i as f64 * delta);
        }
    }
    v
}

impl Anchors {
    /// Builds the anchor table; errors on configs the reference cannot handle either.
    pub fn new(config: &AnchorConfig) -> Result<Self, AnchorError> {
        let bad = |m: String| Err(AnchorError::Config(m));
        if config.min_level == 0 || config.min_level > config.max_level || config.max_level > 16 {
            return bad(format!(
                "levels must satisfy 1 <= min_level <= max_level <= 16, got {}..={}",
                config.min_level, config.max_level
            ));
        }
        if config.num_scales == 0 {
            return bad("num_scales must be at least 1".into());
        }
        if config.aspect_ratios.is_empty()
            || config
                .aspect_ratios
                .iter()
                .any(|a| !(a.is_finite() && *a > 0.0))
        {
            return bad(format!(
                "aspect_ratios must be non-empty and positive, got {:?}",
                config.aspect_ratios
            ));
        }
        if !(config.anchor_scale.is_finite() && config.anchor_scale > 0.0) {
            return bad(format!(
                "anchor_scale must be positive, got {}",
                config.anchor_scale
            ));
        }
        if config.image_height == 0 || config.image_width == 0 {
            return bad("image size must be positive".into());
        }
        // Coordinates must stay representable: keep images to a sane pixel range.
        if config.image_height > 1 << 16 || config.image_width > 1 << 16 {
            return bad(format!(
                "image size {}x{} is too large (max 65536)",
                config.image_height, config.image_width
            ));
        }

        // Feature sizes: each level halves with ceil, as utils.get_feat_sizes does.
        let mut feat = vec![(config.image_height, config.image_width)];
        for _ in 1..=config.max_level {
            let (h, w) = *feat.last().unwrap();
            feat.push(((h - 1) / 2 + 1, (w - 1) / 2 + 1));
        }

        let per_location = config.num_scales as usize * config.aspect_ratios.len();
        let mut levels = Vec::new();
        let mut grids = Vec::new();
        let mut boxes = Vec::new();
        let mut offset = 0usize;
        for level in config.min_level..=config.max_level {
            let (fh, fw) = feat[level as usize];
            let stride_y = config.image_height as f64 / fh as f64;
            let stride_x = config.image_width as f64 / fw as f64;
            let cy = numpy_arange(stride_y / 2.0, config.image_height as f64, stride_y);
            let cx = numpy_arange(stride_x / 2.0, config.image_width as f64, stride_x);
            if cy.len() != fh || cx.len() != fw {
                return bad(format!(
                    "level {level}: {}x{} anchor centers for a {fh}x{fw} feature map",
                    cy.len(),
                    cx.len()
                ));
            }
            let mut shapes = Vec::with_capacity(per_location);
            for octave in 0..config.num_scales {
                let octave_scale = octave as f64 / config.num_scales as f64;
                let mult = 2f64.powf(octave_scale);
                let base_x = config.anchor_scale * stride_x * mult;
                let base_y = config.anchor_scale * stride_y * mult;
                for &aspect in &config.aspect_ratios {
                    let aspect_x = aspect.sqrt();
                    let aspect_y = 1.0 / aspect_x;
                    let half_w = base_x * aspect_x / 2.0;
                    let half_h = base_y * aspect_y / 2.0;
                    let y0: Vec<f32> = cy.iter().map(|c| (c - half_h) as f32).collect();
                    let y1: Vec<f32> = cy.iter().map(|c| (c + half_h) as f32).collect();
                    let x0: Vec<f32> = cx.iter().map(|c| (c - half_w) as f32).collect();
                    let x1: Vec<f32> = cx.iter().map(|c| (c + half_w) as f32).collect();
                    let hs = y0.iter().zip(&y1).map(|(a, b)| b - a);
                    let ws = x0.iter().zip(&x1).map(|(a, b)| b - a);
                    let (h_min, h_max) =
                        hs.fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
                    let (w_min, w_max) =
                        ws.fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
                    shapes.push(ShapeGrid {
                        y0,
                        y1,
                        x0,
                        x1,
                        half_h,
                        half_w,
                        h_min,
                        h_max,
                        w_min,
                        w_max,
                    });
                }
            }
            boxes.reserve(fh * fw * per_location * 4);
            for i in 0..fh {
                for j in 0..fw {
                    for s in &shapes {
                        boxes.extend_from_slice(&[s.y0[i], s.x0[j], s.y1[i], s.x1[j]]);
                    }
                }
            }
            let num = fh * fw * per_location;
            levels.push(LevelInfo {
                level,
                height: fh,
                width: fw,
                offset,
                num_anchors: num,
                stride_y,
                stride_x,
            });
            grids.push(LevelGrid { cy, cx, shapes });
            offset += num;
        }
        if offset > u32::MAX as usize {
            return bad(format!("{offset} anchors do not fit 32-bit indices"));
        }
        Ok(Anchors {
            config: config.clone(),
            levels,
            per_location,
            boxes,
            grids,
        })
    }

    pub fn config(&self) -> &AnchorConfig {
        &self.config
    }
    /// Per-level shapes and offsets, from `min_level` up.
    pub fn levels(&self) -> &[LevelInfo] {
        &self.levels
    }
    /// Anchors per feature-map cell (`num_scales * aspect_ratios.len()`, 9 by default).
    pub fn per_location(&self) -> usize {
        self.per_location
    }
    pub fn num_anchors(&self) -> usize {
        self.boxes.len() / 4
    }
    /// Flat `[num_anchors, 4]` table of `(ymin, xmin, ymax, xmax)` in pixels.
    pub fn boxes(&self) -> &[f32] {
        &self.boxes
    }
    /// Anchor `index` as `[ymin, xmin, ymax, xmax]`; `None` past the end.
    pub fn get(&self, index: usize) -> Option<[f32; 4]> {
        let b = self.boxes.get(4 * index..4 * index + 4)?;
        Some([b[0], b[1], b[2], b[3]])
    }
}
