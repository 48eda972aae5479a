//! A synthetic COCO-format dataset: real JPEG files with filled squares, discs and triangles
//! on a textured background, and an `instances_<split>.json` with boxes, polygon
//! segmentations and areas. It is what the quickstart trains on and what tests convert,
//! so nothing has to be downloaded.

use std::path::{Path, PathBuf};

use anyhow::Context;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Category, ImageInfo, InstancesFile, ObjectAnnotation, Segmentation};

/// The classes drawn, with their COCO-style category ids.
pub const CATEGORIES: [(i64, &str); 3] = [(1, "square"), (2, "disc"), (3, "triangle")];

/// Shape of the generated set.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub images: usize,
    pub seed: u64,
    /// Image sides are drawn uniformly from this range (pixels).
    pub min_side: u32,
    pub max_side: u32,
    pub max_objects: usize,
    /// Split name: files go to `DIR/<split>/` and `DIR/annotations/instances_<split>.json`.
    pub split: String,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            images: 64,
            seed: 0,
            min_side: 160,
            max_side: 320,
            max_objects: 4,
            split: "train".into(),
        }
    }
}

/// Paths of a generated split.
#[derive(Debug, Clone)]
pub struct SynthOutput {
    pub image_dir: PathBuf,
    pub annotations: PathBuf,
    pub objects: usize,
}

/// Writes the dataset under `out`; the same options always give the same files.
pub fn generate(out: &Path, opts: &SynthOptions) -> anyhow::Result<SynthOutput> {
    anyhow::ensure!(
        opts.min_side >= 32 && opts.min_side <= opts.max_side,
        "bad side range"
    );
    let image_dir = out.join(&opts.split);
    let ann_dir = out.join("annotations");
    std::fs::create_dir_all(&image_dir)
        .with_context(|| format!("{}: cannot create", image_dir.display()))?;
    std::fs::create_dir_all(&ann_dir)
        .with_context(|| format!("{}: cannot create", ann_dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut file = InstancesFile {
        categories: CATEGORIES
            .iter()
            .map(|&(id, name)| Category {
                id,
                name: name.into(),
                supercategory: Some("shape".into()),
            })
            .collect(),
        ..Default::default()
    };
    let mut next_ann_id = 1u64;
    for i in 0..opts.images {
        let width = rng.gen_range(opts.min_side..=opts.max_side);
        let height = rng.gen_range(opts.min_side..=opts.max_side);
        let image_id = opts.seed * 1_000_000 + i as u64 + 1;
        let file_name = format!("{image_id:012}.jpg");
        let mut img = background(&mut rng, width, height);
        // About one image in eight has no object, as COCO has a few of those.
        let count = if rng.gen_bool(0.125) {
            0
        } else {
            rng.gen_range(1..=opts.max_objects.max(1))
        };
        for _ in 0..count {
            let (cat, _) = CATEGORIES[rng.gen_range(0..CATEGORIES.len())];
            let min_dim = width.min(height) as f64;
            let size = rng.gen_range(0.15..0.5) * min_dim;
            let cx = rng.gen_range(size / 2.0..width as f64 - size / 2.0);
            let cy = rng.gen_range(size / 2.0..height as f64 - size / 2.0);
            let colour = Rgb([rng.gen(), rng.gen(), rng.gen()]);
            let polygon = shape_polygon(cat, cx, cy, size);
            fill_polygon(&mut img, &polygon, colour);
            let (x0, y0, x1, y1) = bounds(&polygon);
            let (x0, y0) = (x0.max(0.0), y0.max(0.0));
            let (x1, y1) = (x1.min(width as f64), y1.min(height as f64));
            file.annotations.push(ObjectAnnotation {
                id: next_ann_id,
                image_id,
                category_id: cat,
                bbox: [round2(x0), round2(y0), round2(x1 - x0), round2(y1 - y0)],
                area: round2(polygon_area(&polygon)),
                iscrowd: 0,
                segmentation: Some(Segmentation::Polygons(vec![polygon
                    .iter()
                    .flat_map(|&(x, y)| [round2(x), round2(y)])
                    .collect()])),
            });
            next_ann_id += 1;
        }
        let path = image_dir.join(&file_name);
        img.save_with_format(&path, image::ImageFormat::Jpeg)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        file.images.push(ImageInfo {
            id: image_id,
            file_name,
            height,
            width,
        });
    }
    let annotations = ann_dir.join(format!("instances_{}.json", opts.split));
    let tmp = annotations.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&file)?)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &annotations)?;
    Ok(SynthOutput {
        image_dir,
        annotations,
        objects: file.annotations.len(),
    })
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn background(rng: &mut ChaCha8Rng, width: u32, height: u32) -> RgbImage {
    let base: [f32; 3] = [
        rng.gen_range(40.0..200.0),
        rng.gen_range(40.0..200.0),
        rng.gen_range(40.0..200.0),
    ];
    let gx: f32 = rng.gen_range(-60.0..60.0);
    let gy: f32 = rng.gen_range(-60.0..60.0);
    let mut img = RgbImage::new(width, height);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let fx = x as f32 / width as f32;
        let fy = y as f32 / height as f32;
        let noise = ((x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 17) as f32 - 8.0;
        let v = |c: usize| (base[c] + gx * fx + gy * fy + noise).clamp(0.0, 255.0) as u8;
        *p = Rgb([v(0), v(1), v(2)]);
    }
    img
}

fn shape_polygon(category: i64, cx: f64, cy: f64, size: f64) -> Vec<(f64, f64)> {
    let r = size / 2.0;
    match category {
        1 => vec![
            (cx - r, cy - r),
            (cx + r, cy - r),
            (cx + r, cy + r),
            (cx - r, cy + r),
        ],
        2 => (0..24)
            .map(|k| {
                let a = k as f64 / 24.0 * std::f64::consts::TAU;
                (cx + r * a.cos(), cy + r * a.sin())
            })
            .collect(),
        _ => vec![(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)],
    }
}

fn bounds(poly: &[(f64, f64)]) -> (f64, f64, f64, f64) {
    poly.iter().fold(
        (f64::MAX, f64::MAX, f64::MIN, f64::MIN),
        |(a, b, c, d), &(x, y)| (a.min(x), b.min(y), c.max(x), d.max(y)),
    )
}

fn polygon_area(poly: &[(f64, f64)]) -> f64 {
    let n = poly.len();
    let twice: f64 = (0..n)
        .map(|i| {
            let (x0, y0) = poly[i];
            let (x1, y1) = poly[(i + 1) % n];
            x0 * y1 - x1 * y0
        })
        .sum();
    twice.abs() / 2.0
}

/// Scanline fill of pixel centres inside the polygon (even-odd rule).
fn fill_polygon(img: &mut RgbImage, poly: &[(f64, f64)], colour: Rgb<u8>) {
    let (w, h) = img.dimensions();
    let (_, y0, _, y1) = bounds(poly);
    let row_lo = y0.floor().max(0.0) as u32;
    let row_hi = (y1.ceil().max(0.0) as u32).min(h);
    let mut xs = Vec::new();
    for row in row_lo..row_hi {
        let yc = row as f64 + 0.5;
        xs.clear();
        for i in 0..poly.len() {
            let (ax, ay) = poly[i];
            let (bx, by) = poly[(i + 1) % poly.len()];
            if (ay <= yc) != (by <= yc) {
                xs.push(ax + (yc - ay) / (by - ay) * (bx - ax));
            }
        }
        xs.sort_by(|a, b| a.total_cmp(b));
        for pair in xs.chunks_exact(2) {
            let start = (pair[0] - 0.5).ceil().max(0.0) as u32;
            let end = ((pair[1] - 0.5).floor() + 1.0).max(0.0) as u32;
            for col in start..end.min(w) {
                img.put_pixel(col, row, colour);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_valid_deterministic_coco() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            images: 6,
            seed: 3,
            ..Default::default()
        };
        let out = generate(a.path(), &opts).unwrap();
        generate(b.path(), &opts).unwrap();
        let ja = std::fs::read(&out.annotations).unwrap();
        let jb = std::fs::read(b.path().join("annotations/instances_train.json")).unwrap();
        assert_eq!(ja, jb);
        let parsed: InstancesFile = crate::coco::load_json(&out.annotations).unwrap();
        assert_eq!(parsed.images.len(), 6);
        for im in &parsed.images {
            let decoded = image::open(out.image_dir.join(&im.file_name)).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (im.width, im.height));
        }
        for ann in &parsed.annotations {
            let im = parsed.images.iter().find(|i| i.id == ann.image_id).unwrap();
            let [x, y, w, h] = ann.bbox;
            assert!(w > 0.0 && h > 0.0);
            assert!(x + w <= im.width as f64 && y + h <= im.height as f64);
            assert!(ann.area > 0.0 && ann.area <= w * h + 1.0);
        }
    }
}
