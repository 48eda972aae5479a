//! BiFPN: the extra P6/P7 inputs and the stacked bidirectional cells (automl
//! `tf2/efficientdet_keras.py` FPNCells/FNode/ResampleFeatureMap, `tf2/fpn_configs.py` bifpn).

use crate::config::{Config, WeightMethod};
use crate::layers::{BatchNorm, Conv1x1, SeparableConv};
use crate::ops::{self, Activation};
use crate::precision::Precision;
use crate::vars::{Init, ModelVars};
use candle_core::{Result, Tensor};

/// One fusion node: its pyramid level and the indices of the features it fuses (0..L are the
/// cell inputs, L.. the nodes created before it in the same cell).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Pyramid level of the node's output.
    pub level: usize,
    /// Indices into the cell's growing feature list.
    pub inputs: Vec<usize>,
}

/// The BiFPN node order for levels `min..=max`: a top-down pass (max−1 down to min, each fusing
/// the level's latest feature with the one above), then a bottom-up pass (min+1 up to max, each
/// fusing every feature of its level with the latest one below).
pub fn bifpn_nodes(min: usize, max: usize) -> Vec<NodeSpec> {
    let n = max - min + 1;
    let mut ids: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    let mut next = n;
    let mut nodes = Vec::new();
    for lvl in (min..max).rev() {
        let i = lvl - min;
        nodes.push(NodeSpec {
            level: lvl,
            inputs: vec![
                *ids[i].last().unwrap_or(&i),
                *ids[i + 1].last().unwrap_or(&(i + 1)),
            ],
        });
        ids[i].push(next);
        next += 1;
    }
    for lvl in min + 1..=max {
        let i = lvl - min;
        let mut inputs = ids[i].clone();
        inputs.push(*ids[i - 1].last().unwrap_or(&(i - 1)));
        nodes.push(NodeSpec { level: lvl, inputs });
        ids[i].push(next);
        next += 1;
    }
    nodes
}

/// Changes channels (1×1 conv with bias + BN, only when they differ) and spatial size (max-pool
/// down, nearest up) of a feature to match a target level.
struct Resample {
    conv: Option<(Conv1x1, BatchNorm)>,
}

impl Resample {
    fn new(vars: &ModelVars, p: &str, cin: usize, cout: usize, cfg: &Config) -> Result<Self> {
        let conv = if cin != cout {
            let bb = &cfg.backbone;
            Some((
                Conv1x1::new(
                    vars,
                    &format!("{p}.conv"),
                    cin,
                    cout,
                    true,
                    Init::glorot_uniform(cin, cout),
                )?,
                BatchNorm::new(
                    vars,
                    &format!("{p}.bn"),
                    cout,
                    bb.batch_norm_momentum,
                    bb.batch_norm_epsilon,
                )?,
            ))
        } else {
            None
        };
        Ok(Resample { conv })
    }

    fn set_precision(&mut self, p: Precision) {
        if let Some((conv, _)) = &mut self.conv {
            conv.set_precision(p);
        }
    }

    fn channels(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.conv {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, train, Activation::None),
            None => Ok(x.clone()),
        }
    }

    /// automl order: 1×1 conv before pooling (conv_after_downsample = false) and before
    /// upsampling.
    fn forward(&self, x: &Tensor, target: (usize, usize), train: bool) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let (th, tw) = target;
        if h > th && w > tw {
            let x = self.channels(x, train)?;
            let (sh, sw) = ((h - 1) / th + 1, (w - 1) / tw + 1);
            ops::max_pool2d_same(&x, (sh + 1, sw + 1), (sh, sw))
        } else if h <= th && w <= tw {
            let x = self.channels(x, train)?;
            if h < th || w < tw {
                ops::upsample_nearest(&x, th, tw)
            } else {
                Ok(x)
            }
        } else {
            candle_core::bail!("BiFPN: cannot resample {h}x{w} to {th}x{tw}")
        }
    }
}

struct Node {
    spec: NodeSpec,
    resample: Vec<Resample>,
    /// Fusion weights `[n_inputs]` (fast normalized fusion) or none (plain sum).
    weights: Option<Tensor>,
    conv: SeparableConv,
    bn: BatchNorm,
}

struct Cell {
    nodes: Vec<Node>,
}

/// P6/P7 generation plus the BiFPN cells.
pub struct BiFpn {
    /// Resamplers turning P5 into P6 and each extra level into the next.
    extra: Vec<Resample>,
    cells: Vec<Cell>,
    min_level: usize,
    max_level: usize,
}

impl BiFpn {
    /// `in_channels`: channels of the backbone's P3, P4, P5.
    pub fn new(
        vars: &ModelVars,
        prefix: &str,
        cfg: &Config,
        in_channels: [usize; 3],
    ) -> Result<Self> {
        let f = &cfg.fpn;
        let nf = f.num_filters;
        let (m, eps) = (
            cfg.backbone.batch_norm_momentum,
            cfg.backbone.batch_norm_epsilon,
        );
        let mut extra = Vec::new();
        let mut c = in_channels[2];
        for lvl in 6..=f.max_level {
            extra.push(Resample::new(
                vars,
                &format!("{prefix}.p{lvl}"),
                c,
                nf,
                cfg,
            )?);
            c = nf;
        }
        let specs = bifpn_nodes(f.min_level, f.max_level);
        let num_levels = f.max_level - f.min_level + 1;
        let mut cells = Vec::new();
        for ci in 0..f.cell_repeats {
            // Channels of every feature index in this cell; only the first cell sees backbone
            // widths, so only it has channel-changing resample convs.
            let mut chans: Vec<usize> = (0..num_levels)
                .map(|i| if ci == 0 && i < 3 { in_channels[i] } else { nf })
                .collect();
            let mut nodes = Vec::new();
            for (ni, spec) in specs.iter().enumerate() {
                let p = format!("{prefix}.cells.{ci}.nodes.{ni}");
                let resample = spec
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(k, &inp)| {
                        Resample::new(vars, &format!("{p}.resample.{k}"), chans[inp], nf, cfg)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let weights = match f.weight_method {
                    WeightMethod::Fastattn => Some(vars.param(
                        &format!("{p}.fusion"),
                        &[spec.inputs.len()],
                        Init::Const(1.0),
                    )?),
                    WeightMethod::Sum => None,
                };
                // Keras SeparableConv2D defaults: glorot-uniform kernels, zero bias.
                let conv = SeparableConv::new(
                    vars,
                    &format!("{p}.conv"),
                    nf,
                    nf,
                    3,
                    Init::glorot_uniform(9 * nf, 9),
                    Init::glorot_uniform(nf, nf),
                    Init::Const(0.0),
                )?;
                let bn = BatchNorm::new(vars, &format!("{p}.bn"), nf, m, eps)?;
                nodes.push(Node {
                    spec: spec.clone(),
                    resample,
                    weights,
                    conv,
                    bn,
                });
                chans.push(nf);
            }
            cells.push(Cell { nodes });
        }
        Ok(BiFpn {
            extra,
            cells,
            min_level: f.min_level,
            max_level: f.max_level,
        })
    }

    /// Compute precision of every 1×1 resample convolution and every pointwise product of
    /// the node convolutions; fusion, pooling, upsampling and batch norms stay f32.
    pub fn set_precision(&mut self, precision: Precision) {
        for r in &mut self.extra {
            r.set_precision(precision);
        }
        for node in self.cells.iter_mut().flat_map(|c| c.nodes.iter_mut()) {
            for r in &mut node.resample {
                r.set_precision(precision);
            }
            node.conv.set_precision(precision);
        }
    }

    /// [P3, P4, P5] from the backbone → the BiFPN outputs for levels min..=max.
    pub fn forward(&self, backbone: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let mut feats: Vec<Tensor> = backbone.to_vec();
        for r in &self.extra {
            let last = feats
                .last()
                .ok_or_else(|| candle_core::Error::Msg("BiFPN: no input".into()))?;
            let (_, h, w, _) = last.dims4()?;
            // automl: the next level is half the size, rounded up.
            let next = r.forward(last, (h.div_ceil(2), w.div_ceil(2)), train)?;
            feats.push(next);
        }
        let n = self.max_level - self.min_level + 1;
        for cell in &self.cells {
            let sizes: Vec<(usize, usize)> = feats
                .iter()
                .map(|f| f.dims4().map(|(_, h, w, _)| (h, w)))
                .collect::<Result<_>>()?;
            let mut all = feats.clone();
            for node in &cell.nodes {
                let target = sizes[node.spec.level - self.min_level];
                let inputs = node
                    .spec
                    .inputs
                    .iter()
                    .zip(&node.resample)
                    .map(|(&i, r)| r.forward(&all[i], target, train))
                    .collect::<Result<Vec<_>>>()?;
                let fused = fuse(&inputs, node.weights.as_ref())?;
                // automl (conv_bn_act_pattern = false): swish, separable conv, BN.
                let out = node.bn.forward(
                    &node.conv.forward(&ops::swish(&fused)?)?,
                    train,
                    Activation::None,
                )?;
                all.push(out);
            }
            // Each level's output is the last node computed at that level.
            feats = (0..n)
                .map(|i| {
                    let lvl = self.min_level + i;
                    let pos = cell.nodes.iter().rposition(|nd| nd.spec.level == lvl);
                    match pos {
                        Some(p) => all[n + p].clone(),
                        None => all[i].clone(),
                    }
                })
                .collect();
        }
        Ok(feats)
    }

    /// Kernels that receive L2 weight decay.
    pub(crate) fn kernels(&self) -> Vec<Tensor> {
        let mut k = Vec::new();
        let resample = |r: &Resample, k: &mut Vec<Tensor>| {
            if let Some((c, _)) = &r.conv {
                k.push(c.weight.clone());
            }
        };
        for r in &self.extra {
            resample(r, &mut k);
        }
        for cell in &self.cells {
            for node in &cell.nodes {
                for r in &node.resample {
                    resample(r, &mut k);
                }
                k.push(node.conv.dw.clone());
                k.push(node.conv.pw.weight.clone());
            }
        }
        k
    }
}

/// Fast normalized fusion Σ relu(w_i)·x_i / (Σ relu(w) + 1e-4), or a plain sum.
pub(crate) fn fuse(inputs: &[Tensor], weights: Option<&Tensor>) -> Result<Tensor> {
    let Some(w) = weights else {
        let mut acc = inputs[0].clone();
        for x in &inputs[1..] {
            acc = crate::tape::add(&acc, x)?;
        }
        return Ok(acc);
    };
    if crate::tape::active().is_some() {
        // One recorded op (one kernel forward) in place of the composition below.
        return ops::fast_fusion(inputs, w);
    }
    let w = w.relu()?;
    // Normalized in f32, then cast to the activations' dtype (f32 or 16-bit).
    let norm = w
        .broadcast_div(&(w.sum_all()? + 1e-4)?)?
        .to_dtype(inputs[0].dtype())?;
    let mut acc: Option<Tensor> = None;
    for (i, x) in inputs.iter().enumerate() {
        // (The gate kernel with the weight broadcast to [B, C] was measured 0.91× as fast
        // forward + backward on the CPU: its backward's x·g product and per-image means cost
        // more than candle's full-size weight gradient.)
        let term = x.broadcast_mul(&norm.narrow(0, i, 1)?.reshape((1, 1, 1, 1))?)?;
        acc = Some(match acc {
            Some(a) => (a + term)?,
            None => term,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("BiFPN: node without inputs".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn node_order_matches_automl_p3_p7() {
        let got: Vec<(usize, Vec<usize>)> = bifpn_nodes(3, 7)
            .into_iter()
            .map(|n| (n.level, n.inputs))
            .collect();
        // Top-down nodes get ids 5..8 (P6', P5', P4', P3''); bottom-up nodes fuse every
        // feature of their level with the newest one below.
        let want = vec![
            (6, vec![3, 4]),
            (5, vec![2, 5]),
            (4, vec![1, 6]),
            (3, vec![0, 7]),
            (4, vec![1, 7, 8]),
            (5, vec![2, 6, 9]),
            (6, vec![3, 5, 10]),
            (7, vec![4, 11]),
        ];
        assert_eq!(got, want);
    }

    /// The fusion weights' gradient is a difference of nearly equal sums over the whole
    /// feature map when the inputs are alike; in f32 it must still match the f64 value (a plain
    /// f32 sum of the products misses by ~1e-2 relative here).
    #[test]
    fn recorded_fusion_weight_gradient_keeps_its_digits_in_f32() -> Result<()> {
        use crate::ops::fd::rand_tensor;
        use candle_core::{DType, Var};
        use std::rc::Rc;
        let dims = [4, 64, 64, 64];
        let x = (rand_tensor(&dims, 1)? + 3.0)?;
        let inputs64 = [x.clone(), (&x + (rand_tensor(&dims, 2)? * 1e-3)?)?];
        let g64 = (rand_tensor(&dims, 3)? + 1.0)?;
        let w64 = Tensor::new(&[1.0f64, 1.0], &Device::Cpu)?;
        let weight_grad = |dtype: DType| -> Result<Vec<f64>> {
            let xs: Vec<Tensor> = inputs64
                .iter()
                .map(|t| t.to_dtype(dtype))
                .collect::<Result<_>>()?;
            let w = Var::from_tensor(&w64.to_dtype(dtype)?)?;
            let tape = Rc::new(crate::tape::Tape::default());
            let y = crate::tape::record(&tape, || fuse(&xs, Some(w.as_tensor())))?;
            let tape = Rc::try_unwrap(tape).map_err(|_| candle_core::Error::Msg("tape".into()))?;
            let grads = tape.backward(vec![(y.id(), g64.to_dtype(dtype)?)])?;
            grads[&w.as_tensor().id()].to_dtype(DType::F64)?.to_vec1()
        };
        let (want, got) = (weight_grad(DType::F64)?, weight_grad(DType::F32)?);
        for (g, w) in got.iter().zip(&want) {
            let rel = (g - w).abs() / w.abs();
            assert!(rel < 1e-4, "f32 {got:?} vs f64 {want:?}: rel err {rel:.2e}");
        }
        Ok(())
    }

    #[test]
    fn fast_fusion_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::full(2f32, (1, 1, 1, 2), &dev)?;
        let b = Tensor::full(10f32, (1, 1, 1, 2), &dev)?;
        // relu([3, -1]) = [3, 0] → 3·2 / (3 + 1e-4) + 0.
        let w = Tensor::new(&[3f32, -1.], &dev)?;
        let y = fuse(&[a.clone(), b.clone()], Some(&w))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!((y[0] - 6.0 / 3.0001).abs() < 1e-5, "{y:?}");
        let s = fuse(&[a, b], None)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(s, vec![12.0, 12.0]);
        Ok(())
    }
}
