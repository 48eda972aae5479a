//! `effdet-model` owns the EfficientDet network (EfficientNet backbone, BiFPN, class/box
//! heads), its loss, its configuration files, detection post-processing ([`postprocess`])
//! and the hand-written kernels candle lacks ([`ops`]). It does not depend on the pipeline crate.
//! Engine: candle, CPU by default; the `cuda` feature adds candle's CUDA backend and the ops'
//! own CUDA kernels (`ops/kernels.cu`, compiled to PTX by `build.rs`).
//!
//! # Using it from a training loop
//!
//! ```no_run
//! use candle_core::{Device, Tensor, DType};
//! use effdet_model::{config::Config, loss::detection_loss, EfficientDet, ModelVars};
//!
//! # fn main() -> candle_core::Result<()> {
//! let cfg = Config::builtin("efficientdet-d0").map_err(|e| candle_core::Error::Msg(e.to_string()))?;
//! let dev = Device::Cpu;
//! let vars = ModelVars::new(&dev, 42); // trainable params + BN statistics, kept apart
//! let model = EfficientDet::new(&cfg, &vars)?;
//! model.print_param_count(); // "efficientdet-d0: 3,880,067 trainable parameters ..."
//!
//! let images = Tensor::zeros((2, 3, 512, 512), DType::F32, &dev)?; // normalized RGB, NCHW
//! let (cls, boxes) = model.forward(&images, true)?; // per level, NHWC
//! # let cls_targets: Vec<Tensor> = vec![]; let box_targets: Vec<Tensor> = vec![];
//! # let num_positives = Tensor::zeros(2, DType::F32, &dev)?;
//! // cls_targets[l]: [B, h, w, 9] class ids (−1 background, −2 ignore); box_targets[l]: [B, h, w, 36]
//! let parts = detection_loss(&cls, &boxes, &cls_targets, &box_targets, &num_positives,
//!                            &model.l2_kernels(), &cfg.loss)?;
//! let grads = parts.total.backward()?;
//! for (_name, var) in vars.trainable() {
//!     if let Some(g) = grads.get(&var) { /* optimizer step on var */ let _ = g; }
//! }
//! vars.save("model.safetensors")?;
//! # Ok(()) }
//! ```
//!
//! - [`config`]: `configs/efficientdet-d{0..7}.toml` (compound scaling + the D0 recipe).
//! - [`ModelVars`]: two candle `VarMap`s — [`ModelVars::trainable`] for the optimizer,
//!   [`ModelVars::bn_stats`] (names ending `running_mean`/`running_var`) updated by
//!   training-mode forwards; one safetensors file for both.
//! - [`EfficientDet::forward`]`(images [B,3,H,W] f32, train)` → (class logits, box outputs),
//!   one `[B, ceil(H/2^l), ceil(W/2^l), 9·classes | 36]` tensor per level l = 3..7; anchor a
//!   of a position is channels a·classes.. (classes) and 4a..4a+4 (boxes), anchors ordered
//!   octave-major then aspect ratio, matching the pipeline's `[B, h, w, 9]` targets.
//! - [`loss::detection_loss`] → [`loss::LossParts`] `{ total, cls, box_loss, reg }`, exactly
//!   automl's focal + Huber + L2 (see the module doc).
//! - [`Precision`] / [`EfficientDet::new_with_precision`]: mixed precision (fp16/bf16
//!   products and convolutions, f32 everything else and f32 master weights), with
//!   [`DynamicLossScaler`] for fp16 (see [`precision`]).

pub mod bifpn;
pub mod config;
pub mod efficientdet;
pub mod efficientnet;
pub mod heads;
pub mod layers;
pub mod loss;
pub mod ops;
pub mod optim;
pub mod postprocess;
pub mod precision;
pub mod tape;
pub mod vars;

pub use efficientdet::{feature_sizes, EfficientDet};
pub use optim::DynamicLossScaler;
pub use precision::Precision;
pub use vars::{Init, ModelVars};
