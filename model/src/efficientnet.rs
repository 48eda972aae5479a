//! EfficientNet backbone as automl's EfficientDet uses it (`features_only`: no 1280-channel
//! head, no classifier). Returns the stride-8, 16 and 32 features (P3, P4, P5), NHWC.

use crate::config::BackboneConfig;
use crate::layers::{BatchNorm, Conv1x1, StemConv};
use crate::ops::{self, Activation};
use crate::precision::Precision;
use crate::vars::{Init, ModelVars};
use candle_core::{Result, Tensor};

/// One stage of the B0 base network: (repeats, kernel, first stride, expand ratio, in, out).
/// Every block has squeeze-and-excitation with ratio 0.25 of its input channels.
pub const B0_STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// Stem channels before width scaling.
pub const STEM_CHANNELS: usize = 32;
const SE_RATIO: f64 = 0.25;

/// Channels after width scaling: nearest multiple of 8 (at least 8), bumped up by 8 if rounding
/// lost more than 10%.
pub fn round_filters(filters: usize, width: f64) -> usize {
    let divisor = 8usize;
    let f = filters as f64 * width;
    let mut new = divisor.max(((f + divisor as f64 / 2.0) as usize) / divisor * divisor);
    if (new as f64) < 0.9 * f {
        new += divisor;
    }
    new
}

/// Repeats after depth scaling: ceil(depth · repeats).
pub fn round_repeats(repeats: usize, depth: f64) -> usize {
    (depth * repeats as f64).ceil() as usize
}

/// The arguments of one MBConv block after scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockArgs {
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Depthwise stride.
    pub stride: usize,
    /// Expansion ratio of the 1×1 expand conv (1 = no expand conv).
    pub expand: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Squeeze-excitation channels: max(1, floor(0.25 · cin)).
    pub se: usize,
}

/// All blocks of the scaled network, in order, and the index of the last block of each stage.
pub fn block_args(cfg: &BackboneConfig) -> (Vec<BlockArgs>, Vec<usize>) {
    let mut blocks = Vec::new();
    let mut stage_ends = Vec::new();
    for &(r, k, s, e, i, o) in &B0_STAGES {
        let cin = round_filters(i, cfg.width_coefficient);
        let cout = round_filters(o, cfg.width_coefficient);
        for j in 0..round_repeats(r, cfg.depth_coefficient) {
            let bin = if j == 0 { cin } else { cout };
            blocks.push(BlockArgs {
                kernel: k,
                stride: if j == 0 { s } else { 1 },
                expand: e,
                cin: bin,
                cout,
                se: 1.max((bin as f64 * SE_RATIO) as usize),
            });
        }
        stage_ends.push(blocks.len() - 1);
    }
    (blocks, stage_ends)
}

/// Channels of the P3, P4, P5 features for this backbone.
pub fn feature_channels(cfg: &BackboneConfig) -> [usize; 3] {
    let w = cfg.width_coefficient;
    [
        round_filters(40, w),
        round_filters(112, w),
        round_filters(320, w),
    ]
}

struct SqueezeExcite {
    reduce: Conv1x1,
    expand: Conv1x1,
}

struct MbConv {
    args: BlockArgs,
    expand: Option<(Conv1x1, BatchNorm)>,
    dw: Tensor,
    dw_bn: BatchNorm,
    se: SqueezeExcite,
    project: Conv1x1,
    project_bn: BatchNorm,
    survival_prob: f64,
}

impl MbConv {
    fn new(
        vars: &ModelVars,
        p: &str,
        a: BlockArgs,
        cfg: &BackboneConfig,
        survival_prob: f64,
    ) -> Result<Self> {
        let (m, eps) = (cfg.batch_norm_momentum, cfg.batch_norm_epsilon);
        let mid = a.cin * a.expand;
        let expand = if a.expand != 1 {
            let conv = Conv1x1::new(
                vars,
                &format!("{p}.expand"),
                a.cin,
                mid,
                false,
                Init::efficientnet_conv(mid),
            )?;
            Some((
                conv,
                BatchNorm::new(vars, &format!("{p}.expand_bn"), mid, m, eps)?,
            ))
        } else {
            None
        };
        // Depthwise kernels have one output filter per channel: fan_out = k·k.
        let dw = vars.param(
            &format!("{p}.dw.weight"),
            &[a.kernel, a.kernel, mid],
            Init::efficientnet_conv(a.kernel * a.kernel),
        )?;
        let dw_bn = BatchNorm::new(vars, &format!("{p}.dw_bn"), mid, m, eps)?;
        let se = SqueezeExcite {
            reduce: Conv1x1::new(
                vars,
                &format!("{p}.se.reduce"),
                mid,
                a.se,
                true,
                Init::efficientnet_conv(a.se),
            )?,
            expand: Conv1x1::new(
                vars,
                &format!("{p}.se.expand"),
                a.se,
                mid,
                true,
                Init::efficientnet_conv(mid),
            )?,
        };
        let project = Conv1x1::new(
            vars,
            &format!("{p}.project"),
            mid,
            a.cout,
            false,
            Init::efficientnet_conv(a.cout),
        )?;
        let project_bn = BatchNorm::new(vars, &format!("{p}.project_bn"), a.cout, m, eps)?;
        Ok(MbConv {
            args: a,
            expand,
            dw,
            dw_bn,
            se,
            project,
            project_bn,
            survival_prob,
        })
    }

    fn set_precision(&mut self, p: Precision) {
        if let Some((conv, _)) = &mut self.expand {
            conv.set_precision(p);
        }
        // The squeeze-and-excitation convolutions stay f32: they see [B, C] means (spatial_mean
        // gives f32), cost nothing, and their gradients, sums over H·W, overflow f16.
        self.project.set_precision(p);
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        if let Some((conv, bn)) = &self.expand {
            h = bn.forward(&conv.forward(&h)?, train, Activation::Swish)?;
        }
        h = ops::depthwise_conv2d(&h, &self.dw, self.args.stride)?;
        h = self.dw_bn.forward(&h, train, Activation::Swish)?;
        // Squeeze-and-excitation: global mean → reduce + swish → expand + sigmoid → gate.
        let pooled = ops::spatial_mean(&h)?;
        let s = ops::swish(&self.se.reduce.forward(&pooled)?)?;
        let gate = crate::tape::sigmoid(&self.se.expand.forward(&s)?)?;
        h = ops::channel_gate(&h, &gate)?;
        h = self
            .project_bn
            .forward(&self.project.forward(&h)?, train, Activation::None)?;
        if self.args.stride == 1 && self.args.cin == self.args.cout {
            if train && self.survival_prob > 0.0 && self.survival_prob < 1.0 {
                h = drop_connect(&h, self.survival_prob)?;
            }
            h = crate::tape::add(&h, x)?;
        }
        Ok(h)
    }
}

/// Zeroes whole samples with probability 1 − p and scales survivors by 1/p.
fn drop_connect(x: &Tensor, p: f64) -> Result<Tensor> {
    let b = x.dim(0)?;
    // The keep mask is drawn in f32 and cast once (in f16, u + p would round).
    let u = Tensor::rand(0f32, 1f32, b, x.device())?;
    let keep = ((u + p)?.floor()? / p)?;
    ops::scale_samples(x, &keep)
}

/// The backbone: stem + MBConv blocks; [`EfficientNet::forward`] returns P3, P4, P5.
pub struct EfficientNet {
    stem: StemConv,
    stem_bn: BatchNorm,
    blocks: Vec<MbConv>,
    /// Block indices whose outputs are P3, P4, P5 (ends of stages 3, 5 and 7).
    taps: [usize; 3],
}

impl EfficientNet {
    /// Builds the scaled backbone under the name prefix `prefix`.
    pub fn new(vars: &ModelVars, prefix: &str, cfg: &BackboneConfig) -> Result<Self> {
        let (m, eps) = (cfg.batch_norm_momentum, cfg.batch_norm_epsilon);
        let stem_c = round_filters(STEM_CHANNELS, cfg.width_coefficient);
        let stem = StemConv::new(vars, &format!("{prefix}.stem.conv"), stem_c)?;
        let stem_bn = BatchNorm::new(vars, &format!("{prefix}.stem.bn"), stem_c, m, eps)?;
        let (args, ends) = block_args(cfg);
        let n = args.len();
        let mut blocks = Vec::with_capacity(n);
        for (i, a) in args.into_iter().enumerate() {
            // automl: survival probability decays linearly from 1 towards the configured value.
            let sp = if cfg.survival_prob > 0.0 {
                1.0 - (1.0 - cfg.survival_prob) * i as f64 / n as f64
            } else {
                0.0
            };
            blocks.push(MbConv::new(
                vars,
                &format!("{prefix}.blocks.{i}"),
                a,
                cfg,
                sp,
            )?);
        }
        Ok(EfficientNet {
            stem,
            stem_bn,
            blocks,
            taps: [ends[2], ends[4], ends[6]],
        })
    }

    /// Compute precision of the stem convolution and every 1×1 product (expansion,
    /// squeeze-excitation, projection), which is also the activations' storage type.
    pub fn set_precision(&mut self, precision: Precision) {
        self.stem.set_precision(precision);
        for b in &mut self.blocks {
            b.set_precision(precision);
        }
    }

    /// `images` `[B, 3, H, W]` → [P3, P4, P5], each `[B, h, w, C]`.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut x = self
            .stem_bn
            .forward(&self.stem.forward(images)?, train, Activation::Swish)?;
        let mut feats = Vec::with_capacity(3);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, train)?;
            if self.taps.contains(&i) {
                feats.push(x.clone());
            }
        }
        Ok(feats)
    }

    /// Kernels that receive L2 weight decay.
    pub(crate) fn kernels(&self) -> Vec<Tensor> {
        let mut k = vec![self.stem.weight.clone()];
        for b in &self.blocks {
            if let Some((c, _)) = &b.expand {
                k.push(c.weight.clone());
            }
            k.push(b.dw.clone());
            k.push(b.se.reduce.weight.clone());
            k.push(b.se.expand.weight.clone());
            k.push(b.project.weight.clone());
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn rounding_matches_automl() {
        // b0 keeps channels; b2 (1.1) and b4 (1.4) values from automl's round_filters.
        assert_eq!(round_filters(32, 1.0), 32);
        assert_eq!(round_filters(16, 1.1), 16); // 17.6 → 16 (≥ 90%)
        assert_eq!(round_filters(24, 1.1), 24); // 26.4 → 24 (≥ 90%)
        assert_eq!(round_filters(40, 1.1), 48); // 44 → 48
        assert_eq!(round_filters(112, 1.4), 160); // 156.8 → 160
        assert_eq!(round_filters(320, 1.8), 576);
        assert_eq!(round_repeats(3, 1.1), 4);
        assert_eq!(round_repeats(1, 1.0), 1);
        assert_eq!(round_repeats(4, 2.6), 11);
    }

    #[test]
    fn drop_connect_keeps_or_drops_whole_samples() -> Result<()> {
        let x = Tensor::ones(
            (4000, 2, 2, 3),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        let y = drop_connect(&x, 0.8)?;
        let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
        // Every sample is all zeros or all 1/0.8.
        for s in v.chunks(12) {
            assert!(s.iter().all(|&a| a == 0.0) || s.iter().all(|&a| (a - 1.25).abs() < 1e-6));
        }
        let kept = v.chunks(12).filter(|s| s[0] != 0.0).count() as f64 / 4000.0;
        assert!((kept - 0.8).abs() < 0.03, "{kept}");
        Ok(())
    }

    #[test]
    fn d1_trains_with_drop_connect() -> Result<()> {
        // D1 (b1 backbone, survival 0.8) runs the drop-connect path in training mode.
        let cfg = Config::builtin("efficientdet-d1").unwrap();
        let vars = crate::ModelVars::new(&candle_core::Device::Cpu, 0);
        let net = EfficientNet::new(&vars, "b", &cfg.backbone)?;
        assert_eq!(net.blocks.len(), 23);
        assert!((net.blocks[22].survival_prob - (1.0 - 0.2 * 22.0 / 23.0)).abs() < 1e-12);
        assert_eq!(net.blocks[0].survival_prob, 1.0);
        let x = Tensor::randn(0f32, 1f32, (2, 3, 64, 64), &candle_core::Device::Cpu)?;
        let feats = net.forward(&x, true)?;
        let dims: Vec<Vec<usize>> = feats.iter().map(|f| f.dims().to_vec()).collect();
        assert_eq!(
            dims,
            vec![vec![2, 8, 8, 40], vec![2, 4, 4, 112], vec![2, 2, 2, 320]]
        );
        Ok(())
    }

    #[test]
    fn b0_has_16_blocks_and_automl_se_sizes() {
        let c = Config::builtin("efficientdet-d0").unwrap();
        let (blocks, ends) = block_args(&c.backbone);
        assert_eq!(blocks.len(), 16);
        assert_eq!(ends, vec![0, 2, 4, 7, 10, 14, 15]);
        assert_eq!(feature_channels(&c.backbone), [40, 112, 320]);
        // SE uses the block input channels: block 1 (16 in) → 4; block 2 (24 in) → 6.
        assert_eq!(blocks[0].se, 8);
        assert_eq!(blocks[1].se, 4);
        assert_eq!(blocks[2].se, 6);
        assert_eq!(
            blocks[15],
            BlockArgs {
                kernel: 3,
                stride: 1,
                expand: 6,
                cin: 192,
                cout: 320,
                se: 48
            }
        );
        let strides: Vec<usize> = blocks.iter().map(|b| b.stride).collect();
        assert_eq!(
            strides,
            vec![1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
        );
    }
}
