//! COCO segmentation → binary mask, exactly as pycocotools' `frPyObjects` + `decode`
//! (with automl's union over a non-crowd object's polygons), and the mask's PNG encoding.

use super::Segmentation;

/// Rasterizes `seg` to a row-major `height × width` mask of 0/1 bytes.
pub fn rasterize(seg: &Segmentation, height: u32, width: u32) -> anyhow::Result<Vec<u8>> {
    let _ = (seg, height, width);
    anyhow::bail!("mask rasterization is not available yet")
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
