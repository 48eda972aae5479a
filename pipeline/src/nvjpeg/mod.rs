//! The nvJPEG decode stage: the JPEGs a deferred-decode loader left in a batch
//! ([`crate::loader::Batch::encoded`]) are decoded on the GPU and rendered straight into the
//! batch's device image tensor. [`ffi`] (always compiled, so its logic is tested on CPU
//! machines) loads nvJPEG at run time; [`stage`] (feature `nvjpeg`) drives it with cudarc.
//!
//! Per batch: each JPEG goes to the hardware decoder (A100/H100 have one) when nvJPEG says it
//! can take it, else to nvJPEG's default (CUDA) backend, both as batched decodes into one
//! device arena ([`crate::deferred::DecodePlan`]); a batched call that fails is retried image by
//! image, and an image nvJPEG cannot decode is decoded by the CPU decoder and uploaded. One
//! kernel launch then renders every image (flip, resize, crop, pad, normalize) into its slot.
//! Labels were made by the loader's workers from the same geometry, so targets equal the CPU
//! path's exactly.

pub mod ffi;
#[cfg(feature = "nvjpeg")]
pub mod stage;
