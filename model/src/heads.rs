//! Class and box prediction nets: `repeats` × [separable 3×3 conv shared across levels → batch
//! norm owned by each level → swish], then a separable 3×3 prediction conv, applied to every
//! pyramid level. Outputs stay NHWC: `[B, h, w, anchors·classes]` and `[B, h, w, anchors·4]`.

use crate::config::Config;
use crate::layers::{BatchNorm, SeparableConv};
use crate::ops::Activation;
use crate::precision::Precision;
use crate::vars::{Init, ModelVars};
use candle_core::{Result, Tensor};

/// One prediction net (class or box).
pub struct HeadNet {
    convs: Vec<SeparableConv>,
    /// bns[repeat][level]
    bns: Vec<Vec<BatchNorm>>,
    predict: SeparableConv,
}

impl HeadNet {
    /// `outputs` channels per position; `bias` initializes the prediction bias.
    pub fn new(
        vars: &ModelVars,
        prefix: &str,
        cfg: &Config,
        outputs: usize,
        bias: f64,
    ) -> Result<Self> {
        let nf = cfg.fpn.num_filters;
        let (m, eps) = (
            cfg.backbone.batch_norm_momentum,
            cfg.backbone.batch_norm_epsilon,
        );
        // automl heads use Keras variance_scaling (fan-in, truncated normal) for both kernels;
        // a depthwise kernel [3, 3, C, 1] has fan-in 9·C in Keras' fan computation.
        let dw_init = Init::variance_scaling(9 * nf);
        let pw_init = Init::variance_scaling(nf);
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        for i in 0..cfg.head.box_class_repeats {
            convs.push(SeparableConv::new(
                vars,
                &format!("{prefix}.convs.{i}"),
                nf,
                nf,
                3,
                dw_init,
                pw_init,
                Init::Const(0.0),
            )?);
            let per_level = (cfg.fpn.min_level..=cfg.fpn.max_level)
                .map(|lvl| BatchNorm::new(vars, &format!("{prefix}.bns.{i}.p{lvl}"), nf, m, eps))
                .collect::<Result<Vec<_>>>()?;
            bns.push(per_level);
        }
        let predict = SeparableConv::new(
            vars,
            &format!("{prefix}.predict"),
            nf,
            outputs,
            3,
            dw_init,
            pw_init,
            Init::Const(bias),
        )?;
        let mut predict = predict;
        predict.pw.set_f32_output(true);
        Ok(HeadNet {
            convs,
            bns,
            predict,
        })
    }

    /// Compute precision of the pointwise products of every separable convolution.
    pub fn set_precision(&mut self, precision: Precision) {
        for c in self
            .convs
            .iter_mut()
            .chain(std::iter::once(&mut self.predict))
        {
            c.set_precision(precision);
        }
    }

    /// One output per level of `feats`.
    pub fn forward(&self, feats: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        feats
            .iter()
            .enumerate()
            .map(|(level, f)| {
                let mut x = f.clone();
                for (conv, bns) in self.convs.iter().zip(&self.bns) {
                    let bn = bns.get(level).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "head: no batch norm for level index {level}"
                        ))
                    })?;
                    x = bn.forward(&conv.forward(&x)?, train, Activation::Swish)?;
                }
                self.predict.forward(&x)
            })
            .collect()
    }

    /// Kernels that receive L2 weight decay.
    pub(crate) fn kernels(&self) -> Vec<Tensor> {
        self.convs
            .iter()
            .chain(std::iter::once(&self.predict))
            .flat_map(|c| [c.dw.clone(), c.pw.weight.clone()])
            .collect()
    }
}

/// Class prediction bias: −log((1 − π)/π) with prior π = 0.01, so initial scores are 0.01.
pub fn class_prior_bias() -> f64 {
    -((1.0 - 0.01f64) / 0.01).ln()
}
