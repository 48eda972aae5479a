//! Our reader against a file written by TensorFlow's own `tf.io.TFRecordWriter`.

mod common;

use base64::Engine;
use effdet_pipeline::example::{Example, Kind};
use effdet_pipeline::tfrecord::RecordReader;
use serde_json::Value;

#[test]
fn reads_tensorflow_written_records_exactly() {
    let expected: Vec<Value> =
        serde_json::from_slice(&std::fs::read(common::fixture("tf_written.json")).unwrap())
            .unwrap();
    let records: Vec<_> = RecordReader::open(common::fixture("tf_written.tfrecord"))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(records.len(), expected.len());
    let b64 = base64::engine::general_purpose::STANDARD;
    for (i, (rec, exp)) in records.iter().zip(&expected).enumerate() {
        let ex = Example::decode_bytes(rec.payload.clone()).unwrap();
        let exp = exp.as_object().unwrap();
        assert_eq!(ex.features().len(), exp.len(), "record {i}: feature count");
        for (key, spec) in exp {
            let feature = ex
                .get(key)
                .unwrap_or_else(|| panic!("record {i}: missing {key}"));
            let kind = spec["kind"].as_str().unwrap();
            match (&feature.kind, kind) {
                (Some(Kind::Int64List(l)), "int64") => {
                    let want: Vec<i64> = spec["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_i64().unwrap())
                        .collect();
                    assert_eq!(l.value, want, "record {i} {key}");
                }
                (Some(Kind::FloatList(l)), "float") => {
                    let want: Vec<u32> = spec["bits"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap() as u32)
                        .collect();
                    let got: Vec<u32> = l.value.iter().map(|f| f.to_bits()).collect();
                    assert_eq!(got, want, "record {i} {key}");
                }
                (Some(Kind::BytesList(l)), "bytes") => {
                    let want: Vec<Vec<u8>> = spec["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| b64.decode(v.as_str().unwrap()).unwrap())
                        .collect();
                    let got: Vec<Vec<u8>> = l.value.iter().map(|b| b.to_vec()).collect();
                    assert_eq!(got, want, "record {i} {key}");
                }
                (other, _) => panic!("record {i} {key}: kind {kind} but decoded {other:?}"),
            }
        }
    }
}

#[test]
fn our_writer_reproduces_tensorflow_framing() {
    // Re-framing TF's payloads with our writer gives TF's bytes back, CRCs included.
    let original = std::fs::read(common::fixture("tf_written.tfrecord")).unwrap();
    let mut ours = Vec::new();
    for rec in RecordReader::open(common::fixture("tf_written.tfrecord")).unwrap() {
        effdet_pipeline::tfrecord::write_record(&mut ours, &rec.unwrap().payload).unwrap();
    }
    assert_eq!(ours, original);
}
