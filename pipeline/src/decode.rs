//! The decode stage, behind the [`ImageDecoder`] trait so a batched GPU decoder (nvJPEG) can
//! replace it. The CPU decoder uses zune-jpeg (the JPEG decoder inside the `image` crate)
//! directly, decoding into a reused buffer; other formats go through `image`. Grayscale and
//! CMYK come out as RGB, as `tf.io.decode_image(channels=3)` gives them. Decoder panics on
//! hostile input are caught and reported as errors.

use std::panic::{catch_unwind, AssertUnwindSafe};

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// A decoded image: interleaved RGB, row-major.
#[derive(Debug, Clone, Default)]
pub struct DecodedImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Turns encoded bytes into RGB pixels.
pub trait ImageDecoder: Send + Sync {
    /// Decodes `bytes` into `out`, reusing its buffer.
    fn decode_into(&self, bytes: &[u8], out: &mut DecodedImage) -> Result<(), DecodeError>;
}

/// The default CPU decoder.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuDecoder;

/// Largest side accepted; protects memory against corrupt headers.
const MAX_SIDE: usize = 1 << 15;

impl ImageDecoder for CpuDecoder {
    fn decode_into(&self, bytes: &[u8], out: &mut DecodedImage) -> Result<(), DecodeError> {
        let result = catch_unwind(AssertUnwindSafe(|| {
            if bytes.starts_with(&[0xFF, 0xD8]) {
                decode_jpeg(bytes, out)
            } else {
                decode_other(bytes, out)
            }
        }));
        result.unwrap_or_else(|_| Err(DecodeError("decoder panicked on corrupt data".into())))
    }
}

fn decode_jpeg(bytes: &[u8], out: &mut DecodedImage) -> Result<(), DecodeError> {
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE);
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode_headers()
        .map_err(|e| DecodeError(format!("JPEG header: {e:?}")))?;
    let (w, h) = dec
        .dimensions()
        .ok_or_else(|| DecodeError("JPEG without dimensions".into()))?;
    let size = dec
        .output_buffer_size()
        .ok_or_else(|| DecodeError("JPEG dimensions overflow".into()))?;
    if size != w * h * 3 {
        return Err(DecodeError(format!(
            "JPEG decoder gives {size} bytes for {w}x{h} RGB"
        )));
    }
    out.rgb.resize(size, 0);
    dec.decode_into(&mut out.rgb)
        .map_err(|e| DecodeError(format!("JPEG data: {e:?}")))?;
    out.width = w as u32;
    out.height = h as u32;
    Ok(())
}

fn decode_other(bytes: &[u8], out: &mut DecodedImage) -> Result<(), DecodeError> {
    let img = image::load_from_memory(bytes).map_err(|e| DecodeError(format!("image: {e}")))?;
    let rgb = img.into_rgb8();
    out.width = rgb.width();
    out.height = rgb.height();
    out.rgb.clear();
    out.rgb.extend_from_slice(rgb.as_raw());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};
    use std::io::Cursor;

    fn encode(img: image::DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt).unwrap();
        buf.into_inner()
    }

    #[test]
    fn decodes_rgb_and_gray_jpeg_and_png() {
        let mut rgb = RgbImage::new(37, 21);
        for (x, y, p) in rgb.enumerate_pixels_mut() {
            *p = Rgb([(x * 6) as u8, (y * 12) as u8, 128]);
        }
        let jpeg = encode(rgb.clone().into(), ImageFormat::Jpeg);
        let mut out = DecodedImage::default();
        CpuDecoder.decode_into(&jpeg, &mut out).unwrap();
        assert_eq!(
            (out.width, out.height, out.rgb.len()),
            (37, 21, 37 * 21 * 3)
        );
        let err: f64 = out
            .rgb
            .iter()
            .zip(rgb.as_raw())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / out.rgb.len() as f64;
        assert!(err < 4.0, "mean abs error {err}");

        let gray = GrayImage::from_pixel(8, 5, Luma([200]));
        let jpeg = encode(gray.into(), ImageFormat::Jpeg);
        CpuDecoder.decode_into(&jpeg, &mut out).unwrap();
        assert_eq!((out.width, out.height, out.rgb.len()), (8, 5, 120));
        assert!(out.rgb.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(out.rgb.iter().all(|&v| (v as i32 - 200).abs() <= 2));

        let png = encode(rgb.clone().into(), ImageFormat::Png);
        CpuDecoder.decode_into(&png, &mut out).unwrap();
        assert_eq!(out.rgb, rgb.into_raw());
    }

    #[test]
    fn corrupt_and_truncated_jpeg_are_errors_not_panics() {
        let rgb = RgbImage::from_pixel(64, 64, Rgb([10, 200, 30]));
        let jpeg = encode(rgb.into(), ImageFormat::Jpeg);
        let mut out = DecodedImage::default();
        assert!(CpuDecoder.decode_into(&jpeg[..40], &mut out).is_err());
        assert!(CpuDecoder.decode_into(b"not an image", &mut out).is_err());
        let mut garbage = jpeg.clone();
        for (i, b) in garbage.iter_mut().enumerate().skip(2) {
            *b = (i * 31) as u8;
        }
        assert!(CpuDecoder.decode_into(&garbage, &mut out).is_err());
    }
}
