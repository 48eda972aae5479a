//! Example → [`Sample`]: the fields automl's `TfExampleDecoder` reads, with its defaults
//! (missing `is_crowd` → all false, missing `area` → normalized box area, empty source id → -1).
//! Bytes stay slices of the record, so the JPEG is not copied.

use bytes::Bytes;

use crate::example::{Example, FeatureError};

/// One parsed, not yet decoded, training or evaluation example.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// `image/source_id` as a number (automl: empty → -1).
    pub source_id: i64,
    pub image: Bytes,
    /// `(ymin, xmin, ymax, xmax)`, normalized to [0, 1].
    pub boxes: Vec<[f32; 4]>,
    /// COCO category ids.
    pub classes: Vec<i32>,
    pub is_crowd: Vec<bool>,
    pub area: Vec<f32>,
}

/// Why an Example could not become a Sample.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SampleError {
    #[error(transparent)]
    Feature(#[from] FeatureError),
    #[error("`image/object/*` lists disagree in length ({0})")]
    Ragged(String),
    #[error("`image/source_id` is not a number: {0:?}")]
    BadSourceId(String),
}

impl Sample {
    pub fn from_example(ex: &Example) -> Result<Sample, SampleError> {
        let image = ex.bytes_first("image/encoded")?.clone();
        let source_id = match ex.bytes_list_or_empty("image/source_id")?.first() {
            None => -1,
            Some(b) if b.is_empty() => -1,
            Some(b) => {
                let s = String::from_utf8_lossy(b);
                s.trim()
                    .parse::<f64>()
                    .map(|v| v as i64)
                    .map_err(|_| SampleError::BadSourceId(s.into_owned()))?
            }
        };
        let xmin = ex.float_list_or_empty("image/object/bbox/xmin")?;
        let xmax = ex.float_list_or_empty("image/object/bbox/xmax")?;
        let ymin = ex.float_list_or_empty("image/object/bbox/ymin")?;
        let ymax = ex.float_list_or_empty("image/object/bbox/ymax")?;
        let labels = ex.int64_list_or_empty("image/object/class/label")?;
        let crowd = ex.int64_list_or_empty("image/object/is_crowd")?;
        let area = ex.float_list_or_empty("image/object/area")?;
        let n = labels.len();
        let lens = [xmin.len(), xmax.len(), ymin.len(), ymax.len()];
        if lens.iter().any(|&l| l != n)
            || (!crowd.is_empty() && crowd.len() != n)
            || (!area.is_empty() && area.len() != n)
        {
            return Err(SampleError::Ragged(format!(
                "label {n}, xmin/xmax/ymin/ymax {lens:?}, is_crowd {}, area {}",
                crowd.len(),
                area.len()
            )));
        }
        let boxes: Vec<[f32; 4]> = (0..n)
            .map(|i| [ymin[i], xmin[i], ymax[i], xmax[i]])
            .collect();
        let area = if area.is_empty() {
            boxes
                .iter()
                .map(|b| (b[3] - b[1]) * (b[2] - b[0]))
                .collect()
        } else {
            area.to_vec()
        };
        Ok(Sample {
            source_id,
            image,
            classes: labels.iter().map(|&l| l as i32).collect(),
            is_crowd: if crowd.is_empty() {
                vec![false; n]
            } else {
                crowd.iter().map(|&c| c != 0).collect()
            },
            boxes,
            area,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::Feature;
    use std::collections::BTreeMap;

    fn example(pairs: Vec<(&str, Feature)>) -> Example {
        Example::from_features(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn parses_objects_and_defaults() {
        let ex = example(vec![
            (
                "image/encoded",
                Feature::bytes([Bytes::from_static(b"jpg")]),
            ),
            (
                "image/source_id",
                Feature::bytes([Bytes::from_static(b"42")]),
            ),
            ("image/object/bbox/xmin", Feature::floats(vec![0.1, 0.2])),
            ("image/object/bbox/xmax", Feature::floats(vec![0.5, 0.6])),
            ("image/object/bbox/ymin", Feature::floats(vec![0.0, 0.3])),
            ("image/object/bbox/ymax", Feature::floats(vec![0.5, 0.4])),
            ("image/object/class/label", Feature::int64s(vec![1, 90])),
        ]);
        let s = Sample::from_example(&ex).unwrap();
        assert_eq!(s.source_id, 42);
        assert_eq!(s.boxes, vec![[0.0, 0.1, 0.5, 0.5], [0.3, 0.2, 0.4, 0.6]]);
        assert_eq!(s.classes, vec![1, 90]);
        assert_eq!(s.is_crowd, vec![false, false]);
        assert!((s.area[0] - 0.2).abs() < 1e-7 && (s.area[1] - 0.04).abs() < 1e-7);
    }

    #[test]
    fn image_without_objects_and_empty_source_id() {
        let ex = example(vec![
            (
                "image/encoded",
                Feature::bytes([Bytes::from_static(b"jpg")]),
            ),
            ("image/source_id", Feature::bytes([Bytes::new()])),
        ]);
        let s = Sample::from_example(&ex).unwrap();
        assert_eq!(s.source_id, -1);
        assert!(s.boxes.is_empty() && s.classes.is_empty());
    }

    #[test]
    fn ragged_lists_and_missing_image_are_errors() {
        let ex = example(vec![
            (
                "image/encoded",
                Feature::bytes([Bytes::from_static(b"jpg")]),
            ),
            ("image/object/bbox/xmin", Feature::floats(vec![0.1])),
            ("image/object/class/label", Feature::int64s(vec![1, 2])),
        ]);
        assert!(matches!(
            Sample::from_example(&ex),
            Err(SampleError::Ragged(_))
        ));
        let ex = example(vec![]);
        assert_eq!(
            Sample::from_example(&ex).unwrap_err(),
            SampleError::Feature(FeatureError::Missing("image/encoded".into()))
        );
    }
}
