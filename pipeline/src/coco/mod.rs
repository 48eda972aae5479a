//! COCO annotation files (`instances_*.json`, `captions_*.json`, `image_info_*.json`):
//! typed loading with errors that name the file and the JSON field, mask rasterization
//! ([`mask`]), conversion to TFRecord shards ([`convert`]) and a synthetic COCO-format
//! dataset generator ([`synth`]).

pub mod convert;
pub mod eval;
pub mod mask;
pub mod synth;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One entry of `images`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub id: u64,
    pub file_name: String,
    pub height: u32,
    pub width: u32,
}

/// One entry of `categories`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Category {
    pub id: i64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
}

/// RLE counts: compressed COCO string or a plain list of run lengths.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RleCounts {
    Compressed(String),
    Uncompressed(Vec<u64>),
}

/// An RLE segmentation; `size` is `[height, width]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rle {
    pub size: [u32; 2],
    pub counts: RleCounts,
}

/// Instance segmentation: polygons (`[[x0, y0, x1, y1, …], …]`) or RLE.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    Rle(Rle),
}

/// One entry of `annotations` in an instances file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectAnnotation {
    #[serde(default)]
    pub id: u64,
    pub image_id: u64,
    pub category_id: i64,
    /// `[x, y, width, height]` in pixels, top-left origin.
    pub bbox: [f64; 4],
    #[serde(default)]
    pub area: f64,
    #[serde(default)]
    pub iscrowd: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
}

/// One entry of `annotations` in a captions file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptionAnnotation {
    pub image_id: u64,
    pub caption: String,
}

/// An instances file (any of its keys may be absent).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstancesFile {
    #[serde(default)]
    pub images: Vec<ImageInfo>,
    #[serde(default)]
    pub annotations: Vec<ObjectAnnotation>,
    #[serde(default)]
    pub categories: Vec<Category>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CaptionsFile {
    #[serde(default)]
    pub images: Vec<ImageInfo>,
    #[serde(default)]
    pub annotations: Vec<CaptionAnnotation>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageInfoFile {
    #[serde(default)]
    pub images: Vec<ImageInfo>,
}

/// Reads and parses a JSON file; errors name the file and the JSON path of the bad field.
pub fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let de = &mut serde_json::Deserializer::from_slice(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        anyhow::anyhow!(
            "{}: malformed COCO JSON at field `{}`: {}",
            path.display(),
            field,
            e.inner()
        )
    })
}

/// Annotations grouped by image id, in file order within each image.
pub fn group_by_image<T, F: Fn(&T) -> u64>(items: Vec<T>, key: F) -> HashMap<u64, Vec<T>> {
    let mut map: HashMap<u64, Vec<T>> = HashMap::new();
    for item in items {
        map.entry(key(&item)).or_default().push(item);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        std::fs::write(
            &p,
            r#"{"images":[{"id":1,"file_name":"a.jpg","height":10,"width":"x"}]}"#,
        )
        .unwrap();
        let err = load_json::<InstancesFile>(&p).unwrap_err().to_string();
        assert!(err.contains("bad.json"), "{err}");
        assert!(err.contains("images[0].width"), "{err}");
    }

    #[test]
    fn parses_polygon_and_rle_segmentations() {
        let poly: Segmentation = serde_json::from_str("[[1,2,3,4,5,6]]").unwrap();
        assert!(matches!(poly, Segmentation::Polygons(_)));
        let rle: Segmentation =
            serde_json::from_str(r#"{"size":[4,5],"counts":[3,2,15]}"#).unwrap();
        assert!(matches!(
            rle,
            Segmentation::Rle(Rle {
                counts: RleCounts::Uncompressed(_),
                ..
            })
        ));
        let rle: Segmentation = serde_json::from_str(r#"{"size":[4,5],"counts":"abc"}"#).unwrap();
        assert!(matches!(
            rle,
            Segmentation::Rle(Rle {
                counts: RleCounts::Compressed(_),
                ..
            })
        ));
    }
}
