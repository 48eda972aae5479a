//! `effdet-model` owns the EfficientDet network (EfficientNet backbone, BiFPN, heads), its
//! loss and the hand-written kernels candle lacks (`ops`). It does not depend on the pipeline.
