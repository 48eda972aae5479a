//! `effdet-pipeline` owns everything between files on disk and training batches:
//! TFRecord framing ([`tfrecord`]), `tf.train.Example` messages ([`example`]), COCO
//! annotations and conversion ([`coco`]), record sources ([`source`]), Example → sample
//! parsing ([`sample`]), image decoding ([`decode`]), D0 augmentation ([`augment`]), anchor
//! geometry ([`anchors`]) and training target assignment ([`labeler`]), the
//! multi-threaded batch loader ([`loader`]), and the GPU decode stage: header probing
//! ([`jpeg_header`]), its CPU-side plan and reference render ([`deferred`]) and nvJPEG
//! ([`nvjpeg`]; the CUDA part under feature `nvjpeg`).
//!
//! It does not depend on the model crate; the model consumes its flat batch arrays.

pub mod anchors;
pub mod augment;
pub mod coco;
pub mod decode;
pub mod deferred;
pub mod example;
pub mod jpeg_header;
pub mod labeler;
pub mod loader;
pub mod nvjpeg;
pub mod sample;
mod slots;
pub mod source;
#[doc(hidden)]
pub mod test_support;
pub mod tfrecord;
