//! `effdet-pipeline` owns everything between files on disk and training batches:
//! TFRecord framing ([`tfrecord`]), `tf.train.Example` messages ([`example`]),
//! COCO annotation handling and conversion ([`coco`]), anchor geometry ([`anchors`]) and
//! training target assignment ([`labeler`]), and (later) decode, augmentation and batching.
//!
//! It does not depend on the model crate; the model consumes its flat batch arrays.

pub mod anchors;
pub mod coco;
pub mod example;
pub mod labeler;
pub mod tfrecord;
