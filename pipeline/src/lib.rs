//! `effdet-pipeline` owns everything between files on disk and training batches:
//! TFRecord framing ([`tfrecord`]), `tf.train.Example` messages ([`example`]), COCO
//! annotations and conversion ([`coco`]), record sources ([`source`]), Example → sample
//! parsing ([`sample`]), header-only JPEG probing ([`jpeg_header`]), image decoding ([`decode`]), D0 augmentation ([`augment`]), anchor
//! geometry ([`anchors`]) and training target assignment ([`labeler`]), and the
//! multi-threaded batch loader ([`loader`]).
//!
//! It does not depend on the model crate; the model consumes its flat batch arrays.

pub mod anchors;
pub mod augment;
pub mod coco;
pub mod decode;
pub mod example;
pub mod jpeg_header;
pub mod labeler;
pub mod loader;
pub mod sample;
pub mod source;
pub mod tfrecord;
