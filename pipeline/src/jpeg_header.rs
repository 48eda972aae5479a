//! Header-only JPEG probe: walks the marker segments from SOI up to and including the first
//! frame header (SOFn) without touching entropy-coded data, and decides whether a GPU nvJPEG
//! decoder can take the image.
//!
//! It exists so the input pipeline can split decoding from the rest of the per-image work:
//! knowing the size up front lets CPU threads compute augmentation geometry and anchor labels
//! while a later GPU stage decodes the pixels, and [`gpu_unsupported_reason`] routes the images
//! nvJPEG's batched/hardware path cannot handle (progressive, 12-bit, CMYK, ...) to the CPU
//! decoder instead. The probe is strict about framing (any malformed or truncated header is an
//! error) and never panics; callers treat an error as "decode on the CPU and let it judge".

/// Largest width or height accepted; the same limit as the CPU decoder in [`crate::decode`].
pub const MAX_SIDE: u32 = 1 << 15;

/// Coding process from the SOFn marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegProcess {
    /// SOF0: baseline sequential DCT, Huffman.
    Baseline,
    /// SOF1: extended sequential DCT, Huffman.
    ExtendedSequential,
    /// SOF2: progressive DCT, Huffman.
    Progressive,
    /// SOF3: lossless, Huffman.
    Lossless,
    /// Hierarchical and/or arithmetic-coded (SOF5-7, SOF9-11, SOF13-15); holds the marker byte.
    Other(u8),
}

/// What the frame header (and any Adobe segment before it) says about the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JpegInfo {
    pub width: u32,
    pub height: u32,
    /// Number of components in the frame (Nf).
    pub components: u8,
    /// Sample precision in bits (P).
    pub precision: u8,
    pub process: JpegProcess,
    /// (H, V) sampling factors per component, in frame order.
    pub sampling: Vec<(u8, u8)>,
    /// Adobe APP14 transform flag if an Adobe segment was seen before the frame (0 = no
    /// transform i.e. RGB/CMYK, 1 = YCbCr, 2 = YCCK).
    pub adobe_transform: Option<u8>,
}

/// Why a byte stream has no readable JPEG frame header. Offsets are byte positions in the input.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum JpegHeaderError {
    #[error("not a JPEG: expected SOI (FF D8) at offset 0, found {found}")]
    NotJpeg { found: String },
    #[error("truncated at offset {offset}: expected {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error(
        "truncated: segment of marker FF{marker:02X} at offset {offset} ends at byte {end} \
         but the input has {len} bytes"
    )]
    TruncatedSegment {
        offset: usize,
        marker: u8,
        end: usize,
        len: usize,
    },
    #[error("expected a marker (FF) at offset {offset}, found {found:#04X}")]
    ExpectedMarker { offset: usize, found: u8 },
    #[error("invalid marker FF{marker:02X} at offset {offset} before the frame header")]
    InvalidMarker { offset: usize, marker: u8 },
    #[error("marker FF{marker:02X} at offset {offset}: segment length {length} is below 2")]
    BadSegmentLength {
        offset: usize,
        marker: u8,
        length: u16,
    },
    #[error("no frame header: marker FF{marker:02X} at offset {offset} comes before any SOFn")]
    NoFrameHeader { offset: usize, marker: u8 },
    #[error("frame header FF{marker:02X} at offset {offset}: segment length {length} is below 8")]
    SofTooShort {
        offset: usize,
        marker: u8,
        length: u16,
    },
    #[error("frame header at offset {offset}: zero components")]
    ZeroComponents { offset: usize },
    #[error(
        "frame header at offset {offset}: segment length {length} but {components} components \
         need {expected}"
    )]
    SofLength {
        offset: usize,
        length: u16,
        components: u8,
        expected: usize,
    },
    #[error("frame header at offset {offset}: width is 0")]
    ZeroWidth { offset: usize },
    #[error(
        "frame header at offset {offset}: height is 0, i.e. defined later by a DNL marker \
         (not supported)"
    )]
    DnlHeight { offset: usize },
}

// Marker bytes (the byte after FF).
const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const TEM: u8 = 0x01;
const APP14: u8 = 0xEE;
const DHT: u8 = 0xC4;
const JPG: u8 = 0xC8;
const DAC: u8 = 0xCC;

fn is_sof(marker: u8) -> bool {
    (0xC0..=0xCF).contains(&marker) && !matches!(marker, DHT | JPG | DAC)
}

fn process_of(marker: u8) -> JpegProcess {
    match marker {
        0xC0 => JpegProcess::Baseline,
        0xC1 => JpegProcess::ExtendedSequential,
        0xC2 => JpegProcess::Progressive,
        0xC3 => JpegProcess::Lossless,
        m => JpegProcess::Other(m),
    }
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Reads markers from SOI up to and including the first SOFn; never panics on any input.
pub fn probe(bytes: &[u8]) -> Result<JpegInfo, JpegHeaderError> {
    match bytes {
        [0xFF, SOI, ..] => {}
        [] | [0xFF] => {
            return Err(JpegHeaderError::Truncated {
                offset: bytes.len(),
                what: "SOI marker (FF D8)",
            })
        }
        [a] => return Err(not_jpeg(&[*a])),
        [a, b, ..] => return Err(not_jpeg(&[*a, *b])),
    }
    let mut adobe_transform = None;
    let mut pos = 2;
    loop {
        // Marker: FF, any number of FF fill bytes, then the marker byte.
        let offset = pos;
        match bytes.get(pos) {
            None => {
                return Err(JpegHeaderError::Truncated {
                    offset: pos,
                    what: "a marker before the frame header",
                })
            }
            Some(0xFF) => {}
            Some(&found) => return Err(JpegHeaderError::ExpectedMarker { offset, found }),
        }
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        // The marker's own offset is its last FF, so fill bytes do not shift what is reported.
        let offset = pos - 1;
        let Some(&marker) = bytes.get(pos) else {
            return Err(JpegHeaderError::Truncated {
                offset: pos,
                what: "a marker byte after FF",
            });
        };
        pos += 1;
        match marker {
            0xD0..=0xD7 | TEM => continue, // standalone, no length
            SOS | EOI => return Err(JpegHeaderError::NoFrameHeader { offset, marker }),
            // FF00 is a stuffed data byte, never a marker; a second SOI means broken framing.
            0x00 | SOI => return Err(JpegHeaderError::InvalidMarker { offset, marker }),
            _ => {}
        }
        if bytes.len() < pos + 2 {
            return Err(JpegHeaderError::Truncated {
                offset: pos,
                what: "a 2-byte segment length",
            });
        }
        let length = be16(bytes, pos);
        if length < 2 {
            return Err(JpegHeaderError::BadSegmentLength {
                offset,
                marker,
                length,
            });
        }
        let end = pos + length as usize;
        if end > bytes.len() {
            return Err(JpegHeaderError::TruncatedSegment {
                offset,
                marker,
                end,
                len: bytes.len(),
            });
        }
        let payload = &bytes[pos + 2..end];
        if is_sof(marker) {
            return parse_sof(offset, marker, length, payload, adobe_transform);
        }
        if marker == APP14 {
            // "Adobe", version(2), flags0(2), flags1(2), transform(1).
            if payload.len() >= 12 && payload.starts_with(b"Adobe") {
                adobe_transform = Some(payload[11]);
            }
        }
        pos = end;
    }
}

fn not_jpeg(prefix: &[u8]) -> JpegHeaderError {
    let found = prefix
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ");
    JpegHeaderError::NotJpeg { found }
}

/// Parses the SOFn payload (after the length): P(1) Y(2) X(2) Nf(1), then Nf × (Ci, HiVi, Tqi).
fn parse_sof(
    offset: usize,
    marker: u8,
    length: u16,
    payload: &[u8],
    adobe_transform: Option<u8>,
) -> Result<JpegInfo, JpegHeaderError> {
    if payload.len() < 6 {
        return Err(JpegHeaderError::SofTooShort {
            offset,
            marker,
            length,
        });
    }
    let precision = payload[0];
    let height = be16(payload, 1);
    let width = be16(payload, 3);
    let components = payload[5];
    if components == 0 {
        return Err(JpegHeaderError::ZeroComponents { offset });
    }
    let expected = 8 + 3 * components as usize;
    if length as usize != expected {
        return Err(JpegHeaderError::SofLength {
            offset,
            length,
            components,
            expected,
        });
    }
    if width == 0 {
        return Err(JpegHeaderError::ZeroWidth { offset });
    }
    if height == 0 {
        return Err(JpegHeaderError::DnlHeight { offset });
    }
    let sampling = payload[6..]
        .chunks_exact(3)
        .map(|c| (c[1] >> 4, c[1] & 0x0F))
        .collect();
    Ok(JpegInfo {
        width: width as u32,
        height: height as u32,
        components,
        precision,
        process: process_of(marker),
        sampling,
        adobe_transform,
    })
}

/// Why an image must be decoded on the CPU instead of by nvJPEG, or None when nvJPEG can take it.
///
/// nvJPEG's batched/hardware path is used only for Huffman sequential DCT (SOF0/SOF1) with
/// 8-bit samples, 1 or 3 components (3 meaning YCbCr, so not Adobe transform 0), valid sampling
/// factors (1..=4), and sides up to [`MAX_SIDE`].
pub fn gpu_unsupported_reason(info: &JpegInfo) -> Option<&'static str> {
    match info.process {
        JpegProcess::Baseline | JpegProcess::ExtendedSequential => {}
        JpegProcess::Progressive => return Some("progressive JPEG"),
        JpegProcess::Lossless => return Some("lossless JPEG"),
        JpegProcess::Other(_) => return Some("arithmetic or hierarchical JPEG"),
    }
    match info.precision {
        8 => {}
        12 => return Some("12-bit precision"),
        _ => return Some("sample precision other than 8 or 12 bits"),
    }
    match info.components {
        1 => {}
        3 if info.adobe_transform == Some(0) => {
            return Some("Adobe RGB-coded JPEG (no YCbCr transform)")
        }
        3 => {}
        4 => return Some("4-component (CMYK/YCCK) JPEG"),
        _ => return Some("component count other than 1, 3 or 4"),
    }
    if info.sampling.len() != info.components as usize {
        return Some("sampling factors do not match the component count");
    }
    if info
        .sampling
        .iter()
        .any(|&(h, v)| !(1..=4).contains(&h) || !(1..=4).contains(&v))
    {
        return Some("invalid sampling factor (not 1..=4)");
    }
    if info.width > MAX_SIDE || info.height > MAX_SIDE {
        return Some("side larger than 32768 pixels");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{CpuDecoder, DecodedImage, ImageDecoder};
    use image::codecs::jpeg::JpegEncoder;
    use image::{GrayImage, Luma, Rgb, RgbImage};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::path::PathBuf;

    /// A marker segment: FF, marker, big-endian length (payload + 2), payload.
    fn segment(marker: u8, payload: &[u8]) -> Vec<u8> {
        let mut s = vec![0xFF, marker];
        s.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        s.extend_from_slice(payload);
        s
    }

    /// SOFn payload with component ids 1.. and quant table 0.
    fn sof_payload(precision: u8, height: u16, width: u16, sampling: &[(u8, u8)]) -> Vec<u8> {
        let mut p = vec![precision];
        p.extend_from_slice(&height.to_be_bytes());
        p.extend_from_slice(&width.to_be_bytes());
        p.push(sampling.len() as u8);
        for (i, &(h, v)) in sampling.iter().enumerate() {
            p.extend_from_slice(&[i as u8 + 1, (h << 4) | v, 0]);
        }
        p
    }

    fn jfif() -> Vec<u8> {
        segment(0xE0, b"JFIF\0\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    }

    fn adobe(transform: u8) -> Vec<u8> {
        segment(
            APP14,
            &[b'A', b'd', b'o', b'b', b'e', 0, 100, 0, 0, 0, 0, transform],
        )
    }

    /// SOI, the given segments, then SOS-ish trailing bytes that the probe must never read.
    fn stream(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut s = vec![0xFF, SOI];
        for p in parts {
            s.extend_from_slice(p);
        }
        s
    }

    fn dqt() -> Vec<u8> {
        let mut p = vec![0u8];
        p.extend((1..=64).map(|i| i as u8));
        segment(0xDB, &p)
    }

    fn dht() -> Vec<u8> {
        let mut p = vec![0x00];
        p.extend_from_slice(&[0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]);
        p.extend(0..12u8);
        segment(DHT, &p)
    }

    fn info(
        process: JpegProcess,
        precision: u8,
        sampling: &[(u8, u8)],
        adobe_transform: Option<u8>,
    ) -> JpegInfo {
        JpegInfo {
            width: 640,
            height: 480,
            components: sampling.len() as u8,
            precision,
            process,
            sampling: sampling.to_vec(),
            adobe_transform,
        }
    }

    fn encode_rgb(w: u32, h: u32) -> Vec<u8> {
        let mut img = RgbImage::new(w, h);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]);
        }
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn hand_made_baseline_with_app_dqt_dht() {
        let bytes = stream(&[
            jfif(),
            segment(0xE1, b"Exif\0\0 not really"),
            dqt(),
            dht(),
            segment(0xC0, &sof_payload(8, 480, 640, &[(2, 2), (1, 1), (1, 1)])),
            vec![0xFF, SOS, 0x00], // never reached
        ]);
        let got = probe(&bytes).unwrap();
        assert_eq!(
            got,
            JpegInfo {
                width: 640,
                height: 480,
                components: 3,
                precision: 8,
                process: JpegProcess::Baseline,
                sampling: vec![(2, 2), (1, 1), (1, 1)],
                adobe_transform: None,
            }
        );
        assert_eq!(gpu_unsupported_reason(&got), None);
    }

    #[test]
    fn every_sof_marker_maps_to_its_process_and_c4_c8_cc_are_not_frames() {
        for marker in 0xC0..=0xCFu8 {
            let sof = segment(marker, &sof_payload(8, 3, 5, &[(1, 1)]));
            let result = probe(&stream(&[sof]));
            if matches!(marker, DHT | JPG | DAC) {
                // Skipped as an ordinary segment, then the input ends.
                assert_eq!(
                    result,
                    Err(JpegHeaderError::Truncated {
                        offset: 2 + 2 + 2 + 9,
                        what: "a marker before the frame header"
                    }),
                    "marker {marker:02X}"
                );
                continue;
            }
            let want = match marker {
                0xC0 => JpegProcess::Baseline,
                0xC1 => JpegProcess::ExtendedSequential,
                0xC2 => JpegProcess::Progressive,
                0xC3 => JpegProcess::Lossless,
                m => JpegProcess::Other(m),
            };
            let got = result.unwrap();
            assert_eq!(got.process, want, "marker {marker:02X}");
            assert_eq!((got.width, got.height, got.components), (5, 3, 1));
        }
        // A DAC and a JPG segment before the frame are skipped.
        let bytes = stream(&[
            segment(DAC, &[0x00, 0x10]),
            segment(JPG, &[1, 2, 3]),
            segment(0xC9, &sof_payload(8, 10, 20, &[(1, 1)])),
        ]);
        assert_eq!(probe(&bytes).unwrap().process, JpegProcess::Other(0xC9));
    }

    #[test]
    fn real_encoder_rgb_and_gray() {
        let rgb = encode_rgb(37, 21);
        let got = probe(&rgb).unwrap();
        // image 0.25's encoder writes 1x1 sampling for every component (4:4:4).
        assert_eq!(
            got,
            JpegInfo {
                width: 37,
                height: 21,
                components: 3,
                precision: 8,
                process: JpegProcess::Baseline,
                sampling: vec![(1, 1), (1, 1), (1, 1)],
                adobe_transform: None,
            }
        );
        assert_eq!(gpu_unsupported_reason(&got), None);

        let gray = GrayImage::from_fn(300, 2, |x, y| Luma([(x + y) as u8]));
        let mut bytes = Vec::new();
        JpegEncoder::new(&mut bytes).encode_image(&gray).unwrap();
        let got = probe(&bytes).unwrap();
        assert_eq!(
            got,
            JpegInfo {
                width: 300,
                height: 2,
                components: 1,
                precision: 8,
                process: JpegProcess::Baseline,
                sampling: vec![(1, 1)],
                adobe_transform: None,
            }
        );
        assert_eq!(gpu_unsupported_reason(&got), None);
    }

    #[test]
    fn fill_bytes_and_standalone_markers_before_the_frame() {
        let mut bytes = vec![0xFF, SOI];
        bytes.extend_from_slice(&[0xFF, 0xFF, 0xFF]); // fill, then APP0 marker
        bytes.extend_from_slice(&jfif()[1..]);
        bytes.extend_from_slice(&[0xFF, 0xD0, 0xFF, 0xFF, 0xD7, 0xFF, TEM]); // RST0, fill+RST7, TEM
        bytes.extend_from_slice(&[0xFF, 0xFF]); // fill before SOF1
        bytes.extend_from_slice(&segment(
            0xC1,
            &sof_payload(8, 7, 9, &[(1, 2), (1, 1), (1, 1)]),
        ));
        let got = probe(&bytes).unwrap();
        assert_eq!((got.width, got.height), (9, 7));
        assert_eq!(got.process, JpegProcess::ExtendedSequential);
        assert_eq!(got.sampling, vec![(1, 2), (1, 1), (1, 1)]);
        assert_eq!(gpu_unsupported_reason(&got), None);

        // Fill bytes do not shift the reported offset: it is the last FF before the marker byte.
        let mut bytes = vec![0xFF, SOI, 0xFF, 0xFF, 0xFF, EOI];
        assert_eq!(
            probe(&bytes),
            Err(JpegHeaderError::NoFrameHeader {
                offset: 4,
                marker: EOI
            })
        );
        bytes.truncate(5);
        assert_eq!(
            probe(&bytes),
            Err(JpegHeaderError::Truncated {
                offset: 5,
                what: "a marker byte after FF"
            })
        );
    }

    #[test]
    fn every_truncated_prefix_of_a_real_jpeg_is_an_error_and_longer_ones_succeed() {
        let bytes = encode_rgb(64, 48);
        let full = probe(&bytes).unwrap();
        // The SOF0 segment follows the APP0 segment: locate its end independently.
        let sof_at = 2 + 2 + be16(&bytes, 4) as usize;
        assert_eq!(&bytes[sof_at..sof_at + 2], &[0xFF, 0xC0]);
        let sof_end = sof_at + 2 + be16(&bytes, sof_at + 2) as usize;
        for n in 0..bytes.len() {
            let r = probe(&bytes[..n]);
            if n < sof_end {
                assert!(
                    matches!(
                        r,
                        Err(JpegHeaderError::Truncated { .. }
                            | JpegHeaderError::TruncatedSegment { .. })
                    ),
                    "prefix {n}: {r:?}"
                );
            } else {
                assert_eq!(r.as_ref(), Ok(&full), "prefix {n}");
            }
        }
        assert_eq!(
            probe(&bytes[..sof_end - 1]),
            Err(JpegHeaderError::TruncatedSegment {
                offset: sof_at,
                marker: 0xC0,
                end: sof_end,
                len: sof_end - 1
            })
        );
    }

    #[test]
    fn random_garbage_and_mutated_headers_never_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x05EE_D1E6);
        // Counts (ok, err) so the test shows both paths were reached.
        let mut counts = [0usize; 2];
        let mut check = |bytes: &[u8]| match probe(bytes) {
            Ok(info) => {
                assert!(info.width > 0 && info.height > 0 && info.components > 0);
                assert_eq!(info.sampling.len(), info.components as usize);
                let _ = gpu_unsupported_reason(&info);
                counts[0] += 1;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                counts[1] += 1;
            }
        };
        let mut buf = Vec::new();
        for i in 0..20_000 {
            let len = rng.gen_range(0..128);
            buf.clear();
            if i % 2 == 0 {
                buf.extend_from_slice(&[0xFF, SOI]); // get past the SOI check
            }
            // Bias towards FF and SOF/SOS/RST bytes so the marker paths are exercised.
            for _ in 0..len {
                let b = match rng.gen_range(0..8) {
                    0 => 0xFF,
                    1 => rng.gen_range(0xC0..=0xDF),
                    2 => rng.gen_range(0..4),
                    _ => rng.gen(),
                };
                buf.push(b);
            }
            check(&buf);
        }
        let real = encode_rgb(40, 30);
        let header_len = 200.min(real.len());
        for _ in 0..20_000 {
            let mut m = real[..header_len].to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(2..header_len);
                m[at] = rng.gen();
            }
            check(&m);
        }
        assert!(counts[0] > 1000 && counts[1] > 1000, "{counts:?}");
    }

    #[test]
    fn dnl_zero_width_and_other_frame_errors() {
        let bytes = stream(&[segment(0xC0, &sof_payload(8, 0, 640, &[(1, 1)]))]);
        let err = probe(&bytes).unwrap_err();
        assert_eq!(err, JpegHeaderError::DnlHeight { offset: 2 });
        assert!(err.to_string().contains("DNL"), "{err}");

        let bytes = stream(&[segment(0xC0, &sof_payload(8, 480, 0, &[(1, 1)]))]);
        assert_eq!(probe(&bytes), Err(JpegHeaderError::ZeroWidth { offset: 2 }));

        let bytes = stream(&[jfif(), segment(0xC0, &sof_payload(8, 480, 640, &[]))]);
        assert_eq!(
            probe(&bytes),
            Err(JpegHeaderError::ZeroComponents { offset: 20 })
        );

        // Nf says 3 but only two component entries are present.
        let mut p = sof_payload(8, 480, 640, &[(1, 1), (1, 1)]);
        p[5] = 3;
        let err = probe(&stream(&[segment(0xC2, &p)])).unwrap_err();
        assert_eq!(
            err,
            JpegHeaderError::SofLength {
                offset: 2,
                length: 14,
                components: 3,
                expected: 17
            }
        );
        assert_eq!(
            err.to_string(),
            "frame header at offset 2: segment length 14 but 3 components need 17"
        );

        let bytes = stream(&[segment(0xC0, &[8, 0, 1, 0])]);
        assert_eq!(
            probe(&bytes),
            Err(JpegHeaderError::SofTooShort {
                offset: 2,
                marker: 0xC0,
                length: 6
            })
        );
    }

    #[test]
    fn framing_errors() {
        assert_eq!(
            probe(b"\x89PNG\r\n"),
            Err(JpegHeaderError::NotJpeg {
                found: "89 50".into()
            })
        );
        assert_eq!(
            probe(b"\x89PNG").unwrap_err().to_string(),
            "not a JPEG: expected SOI (FF D8) at offset 0, found 89 50"
        );
        assert_eq!(
            probe(&[0x00]),
            Err(JpegHeaderError::NotJpeg { found: "00".into() })
        );
        assert!(matches!(
            probe(&[]),
            Err(JpegHeaderError::Truncated { offset: 0, .. })
        ));
        assert!(matches!(
            probe(&[0xFF]),
            Err(JpegHeaderError::Truncated { offset: 1, .. })
        ));
        assert_eq!(
            probe(&[0xFF, SOI]),
            Err(JpegHeaderError::Truncated {
                offset: 2,
                what: "a marker before the frame header"
            })
        );

        let bytes = stream(&[jfif(), dqt(), vec![0xFF, SOS, 0, 8]]);
        let err = probe(&bytes).unwrap_err();
        assert_eq!(
            err,
            JpegHeaderError::NoFrameHeader {
                offset: 2 + 18 + 69,
                marker: SOS
            }
        );
        assert_eq!(
            err.to_string(),
            "no frame header: marker FFDA at offset 89 comes before any SOFn"
        );
        assert_eq!(
            probe(&stream(&[vec![0xFF, EOI]])),
            Err(JpegHeaderError::NoFrameHeader {
                offset: 2,
                marker: EOI
            })
        );

        let bytes = stream(&[vec![0xFF, 0xE0, 0x00, 0x01]]);
        let err = probe(&bytes).unwrap_err();
        assert_eq!(
            err,
            JpegHeaderError::BadSegmentLength {
                offset: 2,
                marker: 0xE0,
                length: 1
            }
        );
        assert_eq!(
            err.to_string(),
            "marker FFE0 at offset 2: segment length 1 is below 2"
        );
        // An empty segment (length 2) is legal.
        let bytes = stream(&[
            vec![0xFF, 0xE5, 0x00, 0x02],
            segment(0xC0, &sof_payload(8, 1, 1, &[(1, 1)])),
        ]);
        assert_eq!(probe(&bytes).unwrap().width, 1);

        assert_eq!(
            probe(&stream(&[vec![0xFF, 0xE0, 0x00]])),
            Err(JpegHeaderError::Truncated {
                offset: 4,
                what: "a 2-byte segment length"
            })
        );
        assert_eq!(
            probe(&stream(&[jfif(), vec![0x12, 0x34]])),
            Err(JpegHeaderError::ExpectedMarker {
                offset: 20,
                found: 0x12
            })
        );
        assert_eq!(
            probe(&stream(&[vec![0xFF, 0x00]])),
            Err(JpegHeaderError::InvalidMarker {
                offset: 2,
                marker: 0x00
            })
        );
        assert_eq!(
            probe(&stream(&[vec![0xFF, SOI]])),
            Err(JpegHeaderError::InvalidMarker {
                offset: 2,
                marker: SOI
            })
        );
    }

    #[test]
    fn progressive_and_twelve_bit_frames() {
        let bytes = stream(&[
            jfif(),
            segment(0xC2, &sof_payload(8, 100, 200, &[(2, 1), (1, 1), (1, 1)])),
        ]);
        let got = probe(&bytes).unwrap();
        assert_eq!(got.process, JpegProcess::Progressive);
        assert_eq!(got.sampling, vec![(2, 1), (1, 1), (1, 1)]);
        assert_eq!(gpu_unsupported_reason(&got), Some("progressive JPEG"));

        let bytes = stream(&[segment(0xC1, &sof_payload(12, 100, 200, &[(1, 1)]))]);
        let got = probe(&bytes).unwrap();
        assert_eq!(
            (got.precision, got.process),
            (12, JpegProcess::ExtendedSequential)
        );
        assert_eq!(gpu_unsupported_reason(&got), Some("12-bit precision"));
    }

    #[test]
    fn adobe_transform_is_recorded_only_from_a_full_adobe_segment_before_the_frame() {
        let sof3 = || segment(0xC0, &sof_payload(8, 16, 16, &[(1, 1), (1, 1), (1, 1)]));
        for t in 0..=2 {
            let got = probe(&stream(&[adobe(t), sof3()])).unwrap();
            assert_eq!(got.adobe_transform, Some(t));
        }
        // The last Adobe segment wins.
        let got = probe(&stream(&[adobe(0), dqt(), adobe(1), sof3()])).unwrap();
        assert_eq!(got.adobe_transform, Some(1));
        // Too short for the transform byte.
        let short = segment(APP14, b"Adobe\0\x64\0\0\0\0");
        assert_eq!(
            probe(&stream(&[short, sof3()])).unwrap().adobe_transform,
            None
        );
        // APP14 with another identifier.
        let other = segment(APP14, b"Adobf\0\x64\0\0\0\0\x01");
        assert_eq!(
            probe(&stream(&[other, sof3()])).unwrap().adobe_transform,
            None
        );
        // After the frame header: not seen.
        assert_eq!(
            probe(&stream(&[sof3(), adobe(0)])).unwrap().adobe_transform,
            None
        );
        // CMYK with Adobe transform 2 (YCCK).
        let cmyk = segment(0xC0, &sof_payload(8, 16, 16, &[(1, 1); 4]));
        let got = probe(&stream(&[adobe(2), cmyk])).unwrap();
        assert_eq!((got.components, got.adobe_transform), (4, Some(2)));
        assert_eq!(
            gpu_unsupported_reason(&got),
            Some("4-component (CMYK/YCCK) JPEG")
        );
    }

    #[test]
    fn gpu_eligibility_rules() {
        use JpegProcess::*;
        let yuv420 = [(2, 2), (1, 1), (1, 1)];
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 8, &yuv420, None)),
            None
        );
        assert_eq!(
            gpu_unsupported_reason(&info(ExtendedSequential, 8, &yuv420, Some(1))),
            None
        );
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 8, &[(1, 1)], None)),
            None
        );
        // Adobe transform 0 on a single component is plain grayscale.
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 8, &[(1, 1)], Some(0))),
            None
        );
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 8, &yuv420, Some(0))),
            Some("Adobe RGB-coded JPEG (no YCbCr transform)")
        );
        assert_eq!(
            gpu_unsupported_reason(&info(Progressive, 8, &yuv420, None)),
            Some("progressive JPEG")
        );
        assert_eq!(
            gpu_unsupported_reason(&info(Lossless, 8, &yuv420, None)),
            Some("lossless JPEG")
        );
        for m in [0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF] {
            assert_eq!(
                gpu_unsupported_reason(&info(Other(m), 8, &yuv420, None)),
                Some("arithmetic or hierarchical JPEG")
            );
        }
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 12, &yuv420, None)),
            Some("12-bit precision")
        );
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 16, &yuv420, None)),
            Some("sample precision other than 8 or 12 bits")
        );
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 8, &[(1, 1); 4], Some(0))),
            Some("4-component (CMYK/YCCK) JPEG")
        );
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 8, &[(1, 1); 2], None)),
            Some("component count other than 1, 3 or 4")
        );
        for bad in [(0, 1), (1, 0), (5, 1), (1, 5), (15, 15)] {
            assert_eq!(
                gpu_unsupported_reason(&info(Baseline, 8, &[bad, (1, 1), (1, 1)], None)),
                Some("invalid sampling factor (not 1..=4)"),
                "{bad:?}"
            );
        }
        assert_eq!(
            gpu_unsupported_reason(&info(Baseline, 8, &[(4, 4), (1, 1), (1, 1)], None)),
            None
        );
        let mut mismatched = info(Baseline, 8, &yuv420, None);
        mismatched.sampling.pop();
        assert_eq!(
            gpu_unsupported_reason(&mismatched),
            Some("sampling factors do not match the component count")
        );
        let mut big = info(Baseline, 8, &yuv420, None);
        big.width = MAX_SIDE;
        big.height = MAX_SIDE;
        assert_eq!(gpu_unsupported_reason(&big), None);
        big.width = MAX_SIDE + 1;
        assert_eq!(
            gpu_unsupported_reason(&big),
            Some("side larger than 32768 pixels")
        );
        big.width = 1;
        big.height = MAX_SIDE + 1;
        assert_eq!(
            gpu_unsupported_reason(&big),
            Some("side larger than 32768 pixels")
        );
    }

    #[test]
    fn coco_tiny_train_sizes_match_the_cpu_decoder() {
        let Some(dir) = crate::test_support::coco_tiny() else {
            return;
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.join("train2017"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        paths.sort();
        assert!(!paths.is_empty(), "no JPEGs in {}", dir.display());
        let mut out = DecodedImage::default();
        let mut eligible = 0;
        let mut reasons = std::collections::BTreeMap::<&str, usize>::new();
        let mut layouts = std::collections::BTreeMap::<Vec<(u8, u8)>, usize>::new();
        for path in &paths {
            let bytes = std::fs::read(path).unwrap();
            let info = probe(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            CpuDecoder.decode_into(&bytes, &mut out).unwrap();
            assert_eq!(
                (info.width, info.height),
                (out.width, out.height),
                "{}",
                path.display()
            );
            assert_eq!(info.sampling.len(), info.components as usize);
            *layouts.entry(info.sampling.clone()).or_default() += 1;
            match gpu_unsupported_reason(&info) {
                None => eligible += 1,
                Some(r) => *reasons.entry(r).or_default() += 1,
            }
        }
        println!(
            "coco_tiny train2017: {eligible}/{} nvJPEG-eligible; CPU fallback: {reasons:?}; \
             sampling: {layouts:?}",
            paths.len()
        );
    }
}
