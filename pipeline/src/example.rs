//! `tf.train.Example` as prost messages (field numbers from TensorFlow's `example.proto` and
//! `feature.proto`), plus typed accessors. Bytes fields are [`bytes::Bytes`], so decoding a
//! record's payload slices it instead of copying (the JPEG bytes are never copied).

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct Example {
    #[prost(message, optional, tag = "1")]
    pub features: Option<Features>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Features {
    #[prost(btree_map = "string, message", tag = "1")]
    pub feature: BTreeMap<String, Feature>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Feature {
    #[prost(oneof = "Kind", tags = "1, 2, 3")]
    pub kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(message, tag = "1")]
    BytesList(BytesList),
    #[prost(message, tag = "2")]
    FloatList(FloatList),
    #[prost(message, tag = "3")]
    Int64List(Int64List),
}

#[derive(Clone, PartialEq, Message)]
pub struct BytesList {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub value: Vec<Bytes>,
}

#[derive(Clone, PartialEq, Message)]
pub struct FloatList {
    #[prost(float, repeated, packed = "true", tag = "1")]
    pub value: Vec<f32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Int64List {
    #[prost(int64, repeated, packed = "true", tag = "1")]
    pub value: Vec<i64>,
}

impl Feature {
    pub fn bytes<I, B>(values: I) -> Feature
    where
        I: IntoIterator<Item = B>,
        B: Into<Bytes>,
    {
        Feature {
            kind: Some(Kind::BytesList(BytesList {
                value: values.into_iter().map(Into::into).collect(),
            })),
        }
    }
    pub fn floats(values: Vec<f32>) -> Feature {
        Feature {
            kind: Some(Kind::FloatList(FloatList { value: values })),
        }
    }
    pub fn int64s(values: Vec<i64>) -> Feature {
        Feature {
            kind: Some(Kind::Int64List(Int64List { value: values })),
        }
    }
}

/// Error for a missing or mistyped feature.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FeatureError {
    #[error("feature `{0}` is missing")]
    Missing(String),
    #[error("feature `{key}` is not a {expected} list")]
    WrongType { key: String, expected: &'static str },
}

impl Example {
    /// Decodes a serialized Example; slices of `payload` back every bytes value.
    pub fn decode_bytes(payload: Bytes) -> Result<Example, prost::DecodeError> {
        Example::decode(payload)
    }

    pub fn from_features(feature: BTreeMap<String, Feature>) -> Example {
        Example {
            features: Some(Features { feature }),
        }
    }

    pub fn features(&self) -> &BTreeMap<String, Feature> {
        static EMPTY: BTreeMap<String, Feature> = BTreeMap::new();
        self.features.as_ref().map(|f| &f.feature).unwrap_or(&EMPTY)
    }

    pub fn get(&self, key: &str) -> Option<&Feature> {
        self.features().get(key)
    }

    /// Bytes values of `key`; missing → `Ok(&[])` when `optional`, else an error.
    pub fn bytes_list(&self, key: &str) -> Result<&[Bytes], FeatureError> {
        match self.get(key).and_then(|f| f.kind.as_ref()) {
            Some(Kind::BytesList(l)) => Ok(&l.value),
            Some(_) => Err(FeatureError::WrongType {
                key: key.into(),
                expected: "bytes",
            }),
            None => Err(FeatureError::Missing(key.into())),
        }
    }

    pub fn float_list(&self, key: &str) -> Result<&[f32], FeatureError> {
        match self.get(key).and_then(|f| f.kind.as_ref()) {
            Some(Kind::FloatList(l)) => Ok(&l.value),
            Some(_) => Err(FeatureError::WrongType {
                key: key.into(),
                expected: "float",
            }),
            None => Err(FeatureError::Missing(key.into())),
        }
    }

    pub fn int64_list(&self, key: &str) -> Result<&[i64], FeatureError> {
        match self.get(key).and_then(|f| f.kind.as_ref()) {
            Some(Kind::Int64List(l)) => Ok(&l.value),
            Some(_) => Err(FeatureError::WrongType {
                key: key.into(),
                expected: "int64",
            }),
            None => Err(FeatureError::Missing(key.into())),
        }
    }

    /// First bytes value of `key`.
    pub fn bytes_first(&self, key: &str) -> Result<&Bytes, FeatureError> {
        self.bytes_list(key)?
            .first()
            .ok_or_else(|| FeatureError::Missing(key.into()))
    }

    pub fn int64_first(&self, key: &str) -> Result<i64, FeatureError> {
        self.int64_list(key)?
            .first()
            .copied()
            .ok_or_else(|| FeatureError::Missing(key.into()))
    }

    /// Like [`Self::float_list`] but a missing key reads as empty (object lists are absent
    /// on images without annotations).
    pub fn float_list_or_empty(&self, key: &str) -> Result<&[f32], FeatureError> {
        match self.float_list(key) {
            Err(FeatureError::Missing(_)) => Ok(&[]),
            other => other,
        }
    }

    pub fn int64_list_or_empty(&self, key: &str) -> Result<&[i64], FeatureError> {
        match self.int64_list(key) {
            Err(FeatureError::Missing(_)) => Ok(&[]),
            other => other,
        }
    }

    pub fn bytes_list_or_empty(&self, key: &str) -> Result<&[Bytes], FeatureError> {
        match self.bytes_list(key) {
            Err(FeatureError::Missing(_)) => Ok(&[]),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_keeps_values() {
        let mut f = BTreeMap::new();
        f.insert("a".into(), Feature::int64s(vec![1, -2, 1 << 40]));
        f.insert("b".into(), Feature::floats(vec![0.5, -1.25]));
        f.insert("c".into(), Feature::bytes([Bytes::from_static(b"xyz")]));
        let ex = Example::from_features(f);
        let buf = Bytes::from(ex.encode_to_vec());
        let back = Example::decode_bytes(buf).unwrap();
        assert_eq!(back, ex);
        assert_eq!(back.int64_list("a").unwrap(), &[1, -2, 1 << 40]);
        assert_eq!(back.float_list("b").unwrap(), &[0.5, -1.25]);
        assert_eq!(&back.bytes_first("c").unwrap()[..], b"xyz");
        assert_eq!(
            back.float_list("a"),
            Err(FeatureError::WrongType {
                key: "a".into(),
                expected: "float"
            })
        );
        assert!(back.float_list_or_empty("missing").unwrap().is_empty());
    }

    #[test]
    fn decodes_unpacked_repeated_scalars() {
        // proto2-style unpacked encoding of Int64List{value:[3, 4]} must decode too.
        let list = [0x08, 0x03, 0x08, 0x04];
        let l = Int64List::decode(&list[..]).unwrap();
        assert_eq!(l.value, vec![3, 4]);
    }
}
