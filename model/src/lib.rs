//! `effdet-model` owns the EfficientDet network (EfficientNet backbone, BiFPN, heads), its
//! loss, the hand-written kernels candle lacks (`ops`) and detection post-processing
//! ([`postprocess`]). It does not depend on the pipeline.

pub mod postprocess;
