//! COCO segmentation → binary mask, pixel-exact with what automl's `create_coco_tfrecord.py`
//! stores: pycocotools' `frPyObjects` + `decode`, then (for a polygon list) the union over the
//! object's polygons. Also owns COCO's compressed RLE string format (decode and encode) and the
//! mask's PNG encoding.
//!
//! Polygon rasterization re-implements the algorithm pycocotools uses (its `rleFrPoly`):
//! vertices are scaled by 5 and rounded to an integer grid, every edge is walked one grid step
//! at a time along its major axis, each step that crosses a pixel column's centre line yields a
//! "boundary" pixel (column, first row inside), and the pixels of each column between
//! successive boundary pixels, taken in column-major order, alternate outside/inside. The
//! floating-point steps are evaluated in the same order and precision as the reference so that
//! every rounding decision agrees, including the reference's x86-64 behaviour for the NaN that a
//! repeated vertex produces.

use anyhow::{bail, ensure, Context};

use super::{Rle, RleCounts, Segmentation};

/// Grid points per pixel used by the reference when walking polygon edges.
const UPSAMPLE: f64 = 5.0;

/// Largest |coordinate| accepted in a polygon. Far beyond any image; keeps every grid value
/// and every difference of two grid values inside `i32`, as the reference's `int` math needs.
const MAX_ABS_COORD: f64 = 1.0e8;

/// Rasterizes `seg` to a row-major `height × width` mask of 0/1 bytes.
///
/// * Polygons (non-crowd objects): each polygon is rasterized as pycocotools does and the
///   results are OR-ed (automl's `np.amax(axis=2)`). As in pycocotools, the first polygon must
///   have more than 4 coordinates (pycocotools rejects a shorter first polygon), later polygons
///   may be shorter (fewer than 3 points give an empty or degenerate outline, exactly as in
///   pycocotools), and a trailing odd coordinate is ignored.
/// * RLE (crowd objects): `size` must equal `[height, width]`; counts (a list or COCO's
///   compressed string) are column-major runs starting with background and must cover the
///   image exactly.
pub fn rasterize(seg: &Segmentation, height: u32, width: u32) -> anyhow::Result<Vec<u8>> {
    ensure!(
        height > 0 && width > 0,
        "mask size {height}x{width} (height x width) is empty"
    );
    let area = height as u64 * width as u64;
    // The reference indexes pixels with C `int`; larger masks are not meaningful there.
    ensure!(
        area <= i32::MAX as u64,
        "mask size {height}x{width} (height x width) is too large"
    );
    match seg {
        Segmentation::Polygons(polys) => rasterize_polygons(polys, height, width),
        Segmentation::Rle(rle) => rasterize_rle(rle, height, width),
    }
}

fn rasterize_polygons(polys: &[Vec<f64>], height: u32, width: u32) -> anyhow::Result<Vec<u8>> {
    let first = polys
        .first()
        .context("polygon segmentation has no polygons")?;
    // pycocotools decides the input kind from the first polygon's length: exactly 4 numbers is
    // taken as a box (and then rejected for a list), fewer is rejected outright.
    ensure!(
        first.len() > 4,
        "first polygon has {} coordinates; at least 3 points (more than 4 numbers) are needed",
        first.len()
    );
    let mut mask = vec![0u8; height as usize * width as usize];
    let mut boundary = Vec::new();
    for (i, poly) in polys.iter().enumerate() {
        boundary.clear();
        polygon_boundary(poly, height, width, &mut boundary)
            .with_context(|| format!("polygon {i}"))?;
        boundary.sort_unstable();
        // Boundary pixels toggle inside/outside along the column-major pixel order.
        for pair in boundary.chunks(2) {
            let end = pair.get(1).copied().unwrap_or(height * width);
            fill_column_major(&mut mask, height, width, pair[0], end);
        }
    }
    Ok(mask)
}

/// Truncating `f64 → i32` conversion with x86-64 `cvttsd2si` semantics (what the reference's C
/// casts compile to): NaN and out-of-range values become `i32::MIN`.
fn trunc_to_i32(v: f64) -> i32 {
    if v.is_nan() || v >= 2_147_483_648.0 || v <= -2_147_483_649.0 {
        i32::MIN
    } else {
        v as i32
    }
}

/// Appends the column-major indices of `poly`'s boundary pixels (possibly repeated) to `out`.
fn polygon_boundary(
    poly: &[f64],
    height: u32,
    width: u32,
    out: &mut Vec<u32>,
) -> anyhow::Result<()> {
    let n = poly.len() / 2;
    if n == 0 {
        return Ok(());
    }
    for &c in &poly[..2 * n] {
        ensure!(
            c.is_finite() && c.abs() <= MAX_ABS_COORD,
            "polygon coordinate {c} is not a finite number within ±{MAX_ABS_COORD}"
        );
    }
    let grid = |c: f64| trunc_to_i32(UPSAMPLE * c + 0.5);
    let vertex = |j: usize| (grid(poly[2 * j]), grid(poly[2 * j + 1]));

    let h = height as f64;
    let last_col = (width - 1) as f64;
    let mut prev: Option<(i32, i32)> = None;
    // Called for every grid point of the walk, in order; a change of grid column between two
    // consecutive points means the walk crossed a column boundary.
    let mut visit = |u: i32, v: i32| {
        if let Some((pu, pv)) = prev {
            if u != pu {
                let col = if u < pu { u } else { u - 1 };
                let x = (col as f64 + 0.5) / UPSAMPLE - 0.5;
                // Only crossings of a pixel centre line that lies inside the image count.
                if x.floor() == x && (0.0..=last_col).contains(&x) {
                    let mut y = (v.min(pv) as f64 + 0.5) / UPSAMPLE - 0.5;
                    y = y.clamp(0.0, h).ceil();
                    out.push(x as u32 * height + y as u32);
                }
            }
        }
        prev = Some((u, v));
    };

    for j in 0..n {
        let (xs, ys) = vertex(j);
        let (xe, ye) = vertex((j + 1) % n);
        let dx = (xe - xs).abs();
        let dy = (ye - ys).abs();
        if dx >= dy {
            // Step along x from the left end; when the edge runs right-to-left the points are
            // still produced from its start to its end.
            let reversed = xs > xe;
            let (bx, by, ty) = if reversed { (xe, ye, ys) } else { (xs, ys, ye) };
            // A repeated vertex gives 0/0 = NaN here, as in the reference.
            let slope = (ty - by) as f64 / dx as f64;
            for d in 0..=dx {
                let t = if reversed { dx - d } else { d };
                visit(t + bx, trunc_to_i32(by as f64 + slope * t as f64 + 0.5));
            }
        } else {
            let reversed = ys > ye;
            let (bx, by, tx) = if reversed { (xe, ye, xs) } else { (xs, ys, xe) };
            let slope = (tx - bx) as f64 / dy as f64;
            for d in 0..=dy {
                let t = if reversed { dy - d } else { d };
                visit(trunc_to_i32(bx as f64 + slope * t as f64 + 0.5), t + by);
            }
        }
    }
    Ok(())
}

/// Sets the pixels with column-major indices `start..end` in a row-major mask.
fn fill_column_major(mask: &mut [u8], height: u32, width: u32, start: u32, end: u32) {
    let (h, w) = (height as usize, width as usize);
    let (mut s, e) = (start as usize, end as usize);
    while s < e {
        let (col, row0) = (s / h, s % h);
        let row1 = h.min(row0 + (e - s));
        for row in row0..row1 {
            mask[row * w + col] = 1;
        }
        s += row1 - row0;
    }
}

fn rasterize_rle(rle: &Rle, height: u32, width: u32) -> anyhow::Result<Vec<u8>> {
    ensure!(
        rle.size == [height, width],
        "RLE size [{}, {}] differs from the image size [{height}, {width}] (height, width)",
        rle.size[0],
        rle.size[1]
    );
    let decoded;
    let counts: &[u64] = match &rle.counts {
        RleCounts::Uncompressed(c) => c,
        RleCounts::Compressed(s) => {
            decoded = decode_rle_string(s)?;
            &decoded
        }
    };
    let area = height as u64 * width as u64;
    let total = counts
        .iter()
        .try_fold(0u64, |acc, &c| acc.checked_add(c))
        .context("RLE counts overflow")?;
    ensure!(
        total == area,
        "RLE counts cover {total} pixels but the mask has {height}x{width} = {area}"
    );
    let mut mask = vec![0u8; area as usize];
    let mut pos = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        // Runs alternate background/foreground, starting with background.
        if i % 2 == 1 {
            fill_column_major(&mut mask, height, width, pos as u32, (pos + c) as u32);
        }
        pos += c;
    }
    Ok(mask)
}

/// Decodes COCO's compressed RLE string (6 bits per character, characters `'0'..='o'`, values
/// from the fourth on stored as a difference to the value two places earlier) into run lengths.
pub fn decode_rle_string(s: &str) -> anyhow::Result<Vec<u64>> {
    let bytes = s.as_bytes();
    let mut counts: Vec<u64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut value: i64 = 0;
        let mut group = 0u32;
        loop {
            let b = *bytes.get(p).with_context(|| {
                format!("compressed RLE string ends inside a value (at byte {p})")
            })?;
            ensure!(
                (48..48 + 64).contains(&b),
                "compressed RLE string has invalid character {:?} at byte {p}",
                b as char
            );
            ensure!(
                group < 12,
                "compressed RLE string has an over-long value at byte {p}"
            );
            let c = (b - 48) as i64;
            value |= (c & 0x1f) << (5 * group);
            p += 1;
            group += 1;
            if c & 0x20 == 0 {
                // The top data bit of the last group is the sign.
                if c & 0x10 != 0 {
                    value |= -1i64 << (5 * group);
                }
                break;
            }
        }
        let i = counts.len();
        if i > 2 {
            value += counts[i - 2] as i64;
        }
        ensure!(
            (0..=u32::MAX as i64).contains(&value),
            "compressed RLE string decodes to run length {value} (value {i}), outside 0..2^32"
        );
        counts.push(value as u64);
    }
    Ok(counts)
}

/// Encodes run lengths as COCO's compressed RLE string (inverse of [`decode_rle_string`]).
pub fn encode_rle_string(counts: &[u64]) -> String {
    let mut s = String::new();
    for (i, &c) in counts.iter().enumerate() {
        let mut x = c as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        loop {
            let mut c = (x & 0x1f) as u8;
            x >>= 5;
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            s.push((c + 48) as char);
            if !more {
                break;
            }
        }
    }
    s
}

/// Column-major run lengths (background first) of a row-major 0/1 mask, as COCO RLE stores them.
pub fn rle_counts_from_mask(mask: &[u8], height: u32, width: u32) -> anyhow::Result<Vec<u64>> {
    let (h, w) = (height as usize, width as usize);
    ensure!(
        mask.len() == h * w,
        "mask has {} bytes, expected {height}x{width}",
        mask.len()
    );
    let mut counts = Vec::new();
    let mut current = 0u8;
    let mut run = 0u64;
    for col in 0..w {
        for row in 0..h {
            let v = mask[row * w + col];
            if v > 1 {
                bail!("mask value {v} at row {row}, column {col} is not 0 or 1");
            }
            if v != current {
                counts.push(run);
                run = 0;
                current = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    Ok(counts)
}

/// Encodes a 0/1 mask as an 8-bit grayscale PNG (what PIL writes for automl's masks).
pub fn encode_png(mask: &[u8], height: u32, width: u32) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(mask)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(mask: &[u8], width: u32) -> Vec<String> {
        mask.chunks(width as usize)
            .map(|r| r.iter().map(|&v| char::from(b'0' + v)).collect())
            .collect()
    }

    fn seg(json: &str) -> Segmentation {
        serde_json::from_str(json).unwrap()
    }

    /// (name, segmentation JSON, height, width, expected rows) from pycocotools 2.0.11.
    const POLYGON_CASES: &[(&str, &str, u32, u32, &[&str])] = &[
        (
            "triangle",
            "[[1.0,1.0,8.0,2.0,4.0,6.0]]",
            7,
            10,
            &[
                "0000000000",
                "0111100000",
                "0011111000",
                "0001110000",
                "0001100000",
                "0000000000",
                "0000000000",
            ],
        ),
        (
            "half_pixel_square",
            "[[0.5,0.5,4.5,0.5,4.5,3.5,0.5,3.5]]",
            5,
            6,
            &["000000", "011110", "011110", "011110", "000000"],
        ),
        (
            "integer_square",
            "[[1,1,4,1,4,3,1,3]]",
            5,
            6,
            &["000000", "011100", "011100", "000000", "000000"],
        ),
        (
            "partly_outside",
            "[[-2,-1,5,1.5,3,9]]",
            6,
            5,
            &["11000", "11111", "11111", "11110", "01110", "01110"],
        ),
        (
            "bow_tie",
            "[[0,0,6,5,6,0,0,5]]",
            6,
            7,
            &[
                "1000010", "1100110", "1111110", "1100110", "1000010", "0000000",
            ],
        ),
        (
            "union_line_empty",
            "[[0,0,4,0,4,4,0,4],[2,2,6,2,6,6,2,6],[1,5,5,5.5],[]]",
            7,
            7,
            &[
                "1111000", "1111000", "1111110", "1111110", "0011110", "0011110", "0000000",
            ],
        ),
        (
            "one_point_later",
            "[[1,1,5,1,5,5],[3,3]]",
            6,
            6,
            &["000000", "001110", "000110", "000010", "000000", "000000"],
        ),
        (
            "tiny_triangle",
            "[[2.1,2.1,2.3,2.1,2.2,2.3]]",
            4,
            4,
            &["0000", "0000", "0000", "0000"],
        ),
        (
            "tiny_square_around_centre",
            "[[1.6,1.6,2.4,1.6,2.4,2.4,1.6,2.4]]",
            4,
            4,
            &["0000", "0000", "0000", "0000"],
        ),
        (
            "repeated_vertex",
            "[[3,1,3,1,7.4,3.6,1.2,4.8]]",
            6,
            8,
            &[
                "00000000", "00010000", "00111100", "00111110", "01100000", "00000000",
            ],
        ),
        (
            "negative_repeated",
            "[[-1.3,2,-1.3,2,4.6,0.2,5.1,5.5,0.3,4.4,0.3,4.4]]",
            6,
            6,
            &["000010", "111110", "111110", "111110", "011110", "000000"],
        ),
        (
            "odd_trailing",
            "[[0.2,0.4,5.6,1.2,2.6,4.9,9.0]]",
            6,
            6,
            &["100000", "011110", "011100", "001100", "001000", "000000"],
        ),
        (
            "fine_grid",
            "[[0.1,0.3,3.7,0.5,4.9,2.9,2.3,3.5,0.7,2.1]]",
            5,
            6,
            &["110000", "011100", "011110", "001000", "000000"],
        ),
        (
            "ulp_below_3_1",
            "[[1.0,0.6,4.6,1.2,3.0999999999999996,4.4]]",
            6,
            6,
            &["000000", "001100", "001100", "000000", "000000", "000000"],
        ),
        (
            "exact_3_1",
            "[[1.0,0.6,4.6,1.2,3.1,4.4]]",
            6,
            6,
            &["000000", "001100", "001100", "000100", "000000", "000000"],
        ),
        (
            "ulp_below_4_5",
            "[[1.0,0.6,4.6,1.2,4.499999999999999,4.4]]",
            6,
            6,
            &["000000", "001110", "000110", "000000", "000000", "000000"],
        ),
    ];

    #[test]
    fn polygons_match_pycocotools() {
        for &(name, json, h, w, expected) in POLYGON_CASES {
            let got = rasterize(&seg(json), h, w).unwrap();
            assert_eq!(rows(&got, w), expected, "case {name}");
        }
    }

    #[test]
    fn coordinates_parse_bit_exact() {
        // One ULP decides pixels (see the `ulp_below_*` cases); serde_json's default fast
        // parser misreads this value by one ULP, hence its `float_roundtrip` feature.
        let Segmentation::Polygons(p) = seg("[[22.099999999999998,1,2,3,4,5]]") else {
            panic!("not a polygon")
        };
        assert_eq!(p[0][0].to_bits(), 22.099999999999998f64.to_bits());
        assert_ne!(p[0][0].to_bits(), 22.1f64.to_bits());
    }

    #[test]
    fn polygon_union_is_not_parity() {
        // Two identical squares: a union keeps the square, a parity rule would erase it.
        let one = rasterize(&seg("[[1,1,4,1,4,4,1,4]]"), 6, 6).unwrap();
        let two = rasterize(&seg("[[1,1,4,1,4,4,1,4],[1,1,4,1,4,4,1,4]]"), 6, 6).unwrap();
        assert_eq!(one, two);
        assert_eq!(one.iter().filter(|&&v| v == 1).count(), 9);
    }

    #[test]
    fn rejects_what_pycocotools_rejects() {
        let cases = [
            ("[]", "no polygons"),
            ("[[1,1,5,5]]", "first polygon has 4 coordinates"),
            ("[[1,1,5],[1,1,5,1,5,5]]", "first polygon has 3 coordinates"),
        ];
        for (json, msg) in cases {
            let err = rasterize(&seg(json), 8, 8).unwrap_err();
            assert!(format!("{err:#}").contains(msg), "{json}: {err:#}");
        }
        let nan = Segmentation::Polygons(vec![vec![1.0, 1.0, f64::NAN, 1.0, 5.0, 5.0]]);
        let err = rasterize(&nan, 8, 8).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a finite number"),
            "{err:#}"
        );
        let far = Segmentation::Polygons(vec![vec![1.0, 1.0, 1e12, 1.0, 5.0, 5.0]]);
        assert!(rasterize(&far, 8, 8).is_err());
        let err = rasterize(&seg("[[1,1,5,1,5,5]]"), 0, 8).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn uncompressed_rle_is_column_major() {
        // 3x4 mask; columns top to bottom: 0 1 1 | 1 0 0 | 1 1 1 | 1 0 0.
        let rle = seg(r#"{"size":[3,4],"counts":[1,3,2,4,2]}"#);
        let got = rasterize(&rle, 3, 4).unwrap();
        assert_eq!(rows(&got, 4), ["0111", "1010", "1010"]);
        assert_eq!(rle_counts_from_mask(&got, 3, 4).unwrap(), [1, 3, 2, 4, 2]);
    }

    #[test]
    fn compressed_rle_matches_pycocotools_strings() {
        // pycocotools.mask.encode of a 9x7 mask (rows 2..7 x cols 1..5, plus (0,6) and (8,0)).
        let counts = [8, 1, 2, 5, 4, 5, 4, 5, 4, 5, 11, 1, 8];
        assert_eq!(decode_rle_string("81242000007LM").unwrap(), counts);
        assert_eq!(encode_rle_string(&counts), "81242000007LM");
        let mut want = vec![0u8; 9 * 7];
        for r in 2..7 {
            for c in 1..5 {
                want[r * 7 + c] = 1;
            }
        }
        want[6] = 1;
        want[8 * 7] = 1;
        let rle = seg(r#"{"size":[9,7],"counts":"81242000007LM"}"#);
        assert_eq!(rasterize(&rle, 9, 7).unwrap(), want);
        assert_eq!(rle_counts_from_mask(&want, 9, 7).unwrap(), counts);
        // Multi-character values and negative deltas (pycocotools' string for these counts).
        let big = [0, 123456, 5, 876539];
        assert_eq!(encode_rle_string(&big), "0Pbh35k]of0");
        assert_eq!(decode_rle_string("0Pbh35k]of0").unwrap(), big);
        let m = rasterize(
            &seg(r#"{"size":[1000,1000],"counts":"0Pbh35k]of0"}"#),
            1000,
            1000,
        );
        assert_eq!(m.unwrap().iter().map(|&v| v as u64).sum::<u64>(), 999_995);
    }

    #[test]
    fn rle_string_roundtrip() {
        let counts = [0, 1, 31, 32, 1023, 1024, 7, 0, 4_000_000_000, 3, 1, 1 << 31];
        assert_eq!(
            decode_rle_string(&encode_rle_string(&counts)).unwrap(),
            counts
        );
    }

    #[test]
    fn bad_rle_is_a_clear_error() {
        let cases = [
            (
                r#"{"size":[3,5],"counts":[1,3,2,4,2]}"#,
                "differs from the image size",
            ),
            (r#"{"size":[3,4],"counts":[1,3,2]}"#, "cover 6 pixels"),
            (r#"{"size":[3,4],"counts":[1,3,2,4,3]}"#, "cover 13 pixels"),
            (r#"{"size":[3,4],"counts":"8 1"}"#, "invalid character"),
            (r#"{"size":[3,4],"counts":"8n"}"#, "ends inside a value"),
            (r#"{"size":[3,4],"counts":"8A"}"#, "outside 0..2^32"),
        ];
        for (json, msg) in cases {
            let err = rasterize(&seg(json), 3, 4).unwrap_err();
            assert!(format!("{err:#}").contains(msg), "{json}: {err:#}");
        }
    }

    #[test]
    fn x86_truncation() {
        assert_eq!(trunc_to_i32(-2.5), -2);
        assert_eq!(trunc_to_i32(2.9), 2);
        assert_eq!(trunc_to_i32(f64::NAN), i32::MIN);
        assert_eq!(trunc_to_i32(3e9), i32::MIN);
        assert_eq!(trunc_to_i32(-2_147_483_648.9), i32::MIN);
    }
}
