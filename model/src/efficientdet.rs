//! The full EfficientDet network: EfficientNet backbone → BiFPN → class and box nets.

use crate::bifpn::BiFpn;
use crate::config::Config;
use crate::efficientnet::{feature_channels, EfficientNet};
use crate::heads::{class_prior_bias, HeadNet};
use crate::precision::Precision;
use crate::vars::ModelVars;
use candle_core::{DType, Result, Tensor};

/// EfficientDet-D0…D7 as configured. Parameters live in the [`ModelVars`] it was built with.
pub struct EfficientDet {
    cfg: Config,
    backbone: EfficientNet,
    fpn: BiFpn,
    class_net: HeadNet,
    box_net: HeadNet,
    precision: Precision,
    num_params: usize,
    num_stats: usize,
}

impl EfficientDet {
    /// Creates (or, if `vars` already holds them, reuses) every variable of the network.
    /// Names: `backbone.*`, `fpn.*`, `class_net.*`, `box_net.*`.
    pub fn new(cfg: &Config, vars: &ModelVars) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (p0, s0) = (vars.num_trainable(), vars.num_stats());
        let backbone = EfficientNet::new(vars, "backbone", &cfg.backbone)?;
        let fpn = BiFpn::new(vars, "fpn", cfg, feature_channels(&cfg.backbone))?;
        let a = cfg.head.num_anchors();
        let class_net = HeadNet::new(
            vars,
            "class_net",
            cfg,
            a * cfg.head.num_classes,
            class_prior_bias(),
        )?;
        let box_net = HeadNet::new(vars, "box_net", cfg, a * 4, 0.0)?;
        Ok(EfficientDet {
            cfg: cfg.clone(),
            backbone,
            fpn,
            class_net,
            box_net,
            precision: Precision::F32,
            num_params: vars.num_trainable() - p0,
            num_stats: vars.num_stats() - s0,
        })
    }

    /// [`Self::new`] with the matrix products and convolutions autocast to `precision` (see
    /// [`crate::precision`]); `Precision::F32` is exactly [`Self::new`].
    pub fn new_with_precision(
        cfg: &Config,
        vars: &ModelVars,
        precision: Precision,
    ) -> Result<Self> {
        let mut model = Self::new(cfg, vars)?;
        model.set_precision(precision);
        Ok(model)
    }

    /// Compute precision of the matrix products and convolutions.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Switches the compute precision (e.g. to evaluate in f32 a model trained in fp16); the
    /// variables are untouched, they are f32 in every precision.
    pub fn set_precision(&mut self, precision: Precision) {
        self.backbone.set_precision(precision);
        self.fpn.set_precision(precision);
        self.class_net.set_precision(precision);
        self.box_net.set_precision(precision);
        self.precision = precision;
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// `images` `[B, 3, H, W]` f32 (normalized RGB) → per level min..=max: class logits
    /// `[B, h, w, anchors·classes]` and box regressions `[B, h, w, anchors·4]`, with
    /// h = ceil(H / 2^level). Channel a·classes + k is anchor a, class k; anchors are ordered
    /// octave scale first, then aspect ratio. `train` selects batch statistics (and updates the
    /// running averages) plus drop-connect; otherwise running statistics are used.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (b, c, h, w) = images.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "EfficientDet: images must be [B, 3, H, W], got {:?}",
                images.dims()
            ))
        })?;
        if c != 3 || b == 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "EfficientDet: images must be [B>0, 3, H>0, W>0], got {:?}",
                images.dims()
            );
        }
        if images.dtype() != DType::F32 {
            candle_core::bail!("EfficientDet: images must be f32, got {:?}", images.dtype());
        }
        // Activations are stored in the compute type from the stem on (16-bit under mixed
        // precision); the outputs return to f32 for the losses and post-processing.
        let feats = self.backbone.forward(images, train)?;
        let feats = self.fpn.forward(&feats, train)?;
        let f32s = |v: Vec<Tensor>| {
            v.into_iter()
                .map(|t| t.to_dtype(DType::F32))
                .collect::<Result<Vec<_>>>()
        };
        let cls = f32s(self.class_net.forward(&feats, train)?)?;
        let boxes = f32s(self.box_net.forward(&feats, train)?)?;
        Ok((cls, boxes))
    }

    /// [`Self::forward`] with every op recorded on a fresh [`crate::tape::Tape`] (no candle
    /// graph is built): differentiate with [`crate::tape::Tape::backward`], seeded with the
    /// outputs' gradients.
    #[allow(clippy::type_complexity)]
    pub fn forward_recorded(
        &self,
        images: &Tensor,
        train: bool,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>, crate::tape::Tape)> {
        let tape = std::rc::Rc::new(crate::tape::Tape::default());
        let (cls, boxes) = crate::tape::record(&tape, || self.forward(images, train))?;
        let tape = std::rc::Rc::try_unwrap(tape)
            .map_err(|_| candle_core::Error::Msg("tape still shared after the forward".into()))?;
        Ok((cls, boxes, tape))
    }

    /// Every convolution kernel (regular, depthwise, pointwise, 1×1, squeeze-excitation): the
    /// variables automl's L2 regularizer selects (names ending in `kernel`). Batch-norm
    /// parameters, biases and BiFPN fusion weights are excluded.
    pub fn l2_kernels(&self) -> Vec<Tensor> {
        let mut k = self.backbone.kernels();
        k.extend(self.fpn.kernels());
        k.extend(self.class_net.kernels());
        k.extend(self.box_net.kernels());
        k
    }

    /// Trainable scalars of this network.
    pub fn num_params(&self) -> usize {
        self.num_params
    }

    /// Batch-norm running-statistic scalars of this network.
    pub fn num_bn_stats(&self) -> usize {
        self.num_stats
    }

    /// One line describing the parameter count, e.g. for the CLI to print.
    pub fn param_summary(&self) -> String {
        format!(
            "{}: {} trainable parameters ({:.2}M), plus {} batch-norm statistics",
            self.cfg.name,
            group_thousands(self.num_params),
            self.num_params as f64 / 1e6,
            group_thousands(self.num_stats)
        )
    }

    /// Prints [`Self::param_summary`] to stdout.
    pub fn print_param_count(&self) {
        println!("{}", self.param_summary());
    }
}

/// Feature-map (height, width) of each level min..=max for an input of `h`×`w`: every stride-2
/// step rounds up, so level l is ceil(h / 2^l) × ceil(w / 2^l).
pub fn feature_sizes(cfg: &Config, h: usize, w: usize) -> Vec<(usize, usize)> {
    (cfg.fpn.min_level..=cfg.fpn.max_level)
        .map(|l| (h.div_ceil(1 << l), w.div_ceil(1 << l)))
        .collect()
}

fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::efficientnet::block_args;
    use crate::vars::ModelVars;
    use candle_core::Device;

    /// Parameter count derived from the architecture description alone (not from the code
    /// that builds the network), following automl's layer list.
    fn expected_params(cfg: &Config) -> usize {
        let bn = |c: usize| 2 * c;
        let w = cfg.backbone.width_coefficient;
        let stem = crate::efficientnet::round_filters(32, w);
        let mut p = 27 * stem + bn(stem);
        for b in block_args(&cfg.backbone).0 {
            let mid = b.cin * b.expand;
            if b.expand != 1 {
                p += b.cin * mid + bn(mid);
            }
            p += b.kernel * b.kernel * mid + bn(mid);
            p += mid * b.se + b.se + b.se * mid + mid;
            p += mid * b.cout + bn(b.cout);
        }
        let nf = cfg.fpn.num_filters;
        let [c3, c4, c5] = feature_channels(&cfg.backbone);
        p += c5 * nf + nf + bn(nf); // P6 1×1 conv (with bias) + BN
        let sep = |cin: usize, cout: usize| 9 * cin + cin * cout + cout;
        let fusion = matches!(cfg.fpn.weight_method, crate::config::WeightMethod::Fastattn);
        for cell in 0..cfg.fpn.cell_repeats {
            // First-cell resample convs: P5'←P5, P4'←P4, P3''←P3, P4''←P4, P5''←P5.
            if cell == 0 {
                for c in [c5, c4, c3, c4, c5] {
                    p += c * nf + nf + bn(nf);
                }
            }
            // 8 nodes with 2,2,2,2,3,3,3,2 inputs.
            if fusion {
                p += 2 + 2 + 2 + 2 + 3 + 3 + 3 + 2;
            }
            p += 8 * (sep(nf, nf) + bn(nf));
        }
        let a = cfg.head.num_anchors();
        for out in [a * cfg.head.num_classes, a * 4] {
            p += cfg.head.box_class_repeats * (sep(nf, nf) + 5 * bn(nf));
            p += sep(nf, out);
        }
        p
    }

    #[test]
    fn d0_parameter_count_matches_automl() -> Result<()> {
        let cfg = Config::builtin("efficientdet-d0").unwrap();
        let vars = ModelVars::new(&Device::Cpu, 0);
        let model = EfficientDet::new(&cfg, &vars)?;
        // automl reports 3.9M for D0 (90 classes); its Keras model (TF 2.21, tf_keras) has
        // exactly 3,880,067 trainable and 47,136 non-trainable (BN moving stats) scalars.
        assert_eq!(expected_params(&cfg), 3_880_067);
        assert_eq!(model.num_params(), 3_880_067);
        assert_eq!(vars.num_trainable(), 3_880_067);
        // Running mean + variance of every batch norm (each BN has 2·C trainable scalars too).
        assert_eq!(model.num_bn_stats(), 47_136);
        assert!(
            model.param_summary().contains("3,880,067"),
            "{}",
            model.param_summary()
        );
        // automl's L2 set for D0 (trainable variables named `*kernel:0`): 150 kernels,
        // 3,820,384 scalars (counted on automl's Keras model).
        let kernels = model.l2_kernels();
        assert_eq!(kernels.len(), 150);
        assert_eq!(
            kernels.iter().map(|k| k.elem_count()).sum::<usize>(),
            3_820_384
        );
        Ok(())
    }

    #[test]
    fn larger_configs_match_the_architecture_formula() -> Result<()> {
        // Building D1–D7 is cheap (no forward). automl's README: D1 6.6M, D2 8.1M, D3 12.0M,
        // D4 20.7M, D5 33.7M, D6 51.9M, D7 51.9M.
        let readme = [6.6, 8.1, 12.0, 20.7, 33.7, 51.9, 51.9];
        for (i, name) in Config::builtin_names().enumerate().skip(1) {
            let cfg = Config::builtin(name).unwrap();
            let vars = ModelVars::new(&Device::Cpu, 0);
            let model = EfficientDet::new(&cfg, &vars)?;
            assert_eq!(model.num_params(), expected_params(&cfg), "{name}");
            let m = model.num_params() as f64 / 1e6;
            assert!((m - readme[i - 1]).abs() < 0.06, "{name}: {m}M");
        }
        Ok(())
    }

    #[test]
    fn feature_sizes_at_512_and_odd_sizes() {
        let cfg = Config::builtin("efficientdet-d0").unwrap();
        assert_eq!(
            feature_sizes(&cfg, 512, 512),
            vec![(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
        );
        assert_eq!(
            feature_sizes(&cfg, 100, 64),
            vec![(13, 8), (7, 4), (4, 2), (2, 1), (1, 1)]
        );
        // 512: 49104 anchors (9 per position).
        let n: usize = feature_sizes(&cfg, 512, 512)
            .iter()
            .map(|(h, w)| h * w * 9)
            .sum();
        assert_eq!(n, 49104);
    }

    fn images(b: usize, h: usize, w: usize, seed: u64) -> Result<Tensor> {
        let t = crate::ops::fd::rand_tensor(&[b, 3, h, w], seed)?;
        t.to_dtype(DType::F32)
    }

    fn check_shapes(
        cfg: &Config,
        cls: &[Tensor],
        boxes: &[Tensor],
        b: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let sizes = feature_sizes(cfg, h, w);
        assert_eq!(cls.len(), 5);
        assert_eq!(boxes.len(), 5);
        for (l, &(fh, fw)) in sizes.iter().enumerate() {
            assert_eq!(cls[l].dims(), &[b, fh, fw, 9 * 90], "level {}", l + 3);
            assert_eq!(boxes[l].dims(), &[b, fh, fw, 36], "level {}", l + 3);
            for t in [&cls[l], &boxes[l]] {
                let s = t.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(s.is_finite(), "non-finite output at level {}", l + 3);
            }
        }
        Ok(())
    }

    #[test]
    fn d0_shapes_at_128_train_and_eval() -> Result<()> {
        let cfg = Config::builtin("efficientdet-d0").unwrap();
        let vars = ModelVars::new(&Device::Cpu, 1);
        let model = EfficientDet::new(&cfg, &vars)?;
        let x = images(2, 128, 128, 5)?;
        let stats_before: Vec<f32> = vars.bn_stats()[0].1.flatten_all()?.to_vec1()?;
        let (cls, boxes) = model.forward(&x, true)?;
        check_shapes(&cfg, &cls, &boxes, 2, 128, 128)?;
        // Training mode moved the running statistics; eval mode leaves them alone.
        let stats_after: Vec<f32> = vars.bn_stats()[0].1.flatten_all()?.to_vec1()?;
        assert_ne!(stats_before, stats_after);
        let (cls_e, boxes_e) = model.forward(&x, false)?;
        check_shapes(&cfg, &cls_e, &boxes_e, 2, 128, 128)?;
        let stats_eval: Vec<f32> = vars.bn_stats()[0].1.flatten_all()?.to_vec1()?;
        assert_eq!(stats_after, stats_eval);
        // Non-square input and bad inputs.
        let (cls_r, boxes_r) = model.forward(&images(1, 96, 160, 6)?, false)?;
        check_shapes(&cfg, &cls_r, &boxes_r, 1, 96, 160)?;
        assert!(model
            .forward(
                &Tensor::zeros((1, 1, 64, 64), DType::F32, &Device::Cpu)?,
                false
            )
            .is_err());
        assert!(model
            .forward(
                &Tensor::zeros((1, 3, 64, 64), DType::F64, &Device::Cpu)?,
                false
            )
            .is_err());
        assert!(model
            .forward(
                &Tensor::zeros((3, 64, 64), DType::F32, &Device::Cpu)?,
                false
            )
            .is_err());
        Ok(())
    }

    #[test]
    fn d0_shapes_at_512() -> Result<()> {
        let cfg = Config::builtin("efficientdet-d0").unwrap();
        let vars = ModelVars::new(&Device::Cpu, 2);
        let model = EfficientDet::new(&cfg, &vars)?;
        let (cls, boxes) = model.forward(&images(1, 512, 512, 7)?, false)?;
        check_shapes(&cfg, &cls, &boxes, 1, 512, 512)?;
        let anchors: usize = cls.iter().map(|t| t.dims()[1] * t.dims()[2] * 9).sum();
        assert_eq!(anchors, 49104);
        Ok(())
    }

    #[test]
    fn untrained_class_scores_start_near_the_prior() -> Result<()> {
        // With BN in eval mode at initialization the heads see small activations, so the
        // prediction bias −log(99) dominates: mean sigmoid score ≈ 0.01.
        let cfg = Config::builtin("efficientdet-d0").unwrap();
        let vars = ModelVars::new(&Device::Cpu, 3);
        let model = EfficientDet::new(&cfg, &vars)?;
        let (cls, _) = model.forward(&images(1, 64, 64, 8)?, false)?;
        let p = candle_nn::ops::sigmoid(&cls[0])?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!(p > 0.002 && p < 0.05, "{p}");
        Ok(())
    }

    #[test]
    fn sgd_steps_lower_the_loss_on_a_fixed_batch() -> Result<()> {
        use crate::loss::detection_loss;
        use rand::{Rng, SeedableRng};
        let cfg = Config::builtin("efficientdet-d0").unwrap();
        let dev = Device::Cpu;
        let vars = ModelVars::new(&dev, 4);
        let model = EfficientDet::new(&cfg, &vars)?;
        let (b, h, w) = (2, 64, 64);
        let x = images(b, h, w, 9)?;
        // Synthetic targets: ~3% positives with random classes and box targets.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        let mut cls_t = Vec::new();
        let mut box_t = Vec::new();
        let mut positives = vec![0f32; b];
        for (fh, fw) in feature_sizes(&cfg, h, w) {
            let n = fh * fw * 9;
            let mut ids = vec![-1i64; b * n];
            let mut bx = vec![0f32; b * n * 4];
            for (i, id) in ids.iter_mut().enumerate() {
                if rng.gen::<f32>() < 0.03 {
                    *id = rng.gen_range(0..90);
                    positives[i / n] += 1.0;
                    for k in 0..4 {
                        bx[i * 4 + k] = rng.gen_range(-0.5..0.5);
                    }
                }
            }
            cls_t.push(Tensor::from_vec(ids, (b, fh, fw, 9), &dev)?);
            box_t.push(Tensor::from_vec(bx, (b, fh, fw, 36), &dev)?);
        }
        let num_pos = Tensor::from_vec(positives, b, &dev)?;
        let params = vars.trainable();
        let lr = 0.2;
        let mut losses = Vec::new();
        for _ in 0..5 {
            let (cls, boxes) = model.forward(&x, true)?;
            let parts = detection_loss(
                &cls,
                &boxes,
                &cls_t,
                &box_t,
                &num_pos,
                &model.l2_kernels(),
                &cfg.loss,
            )?;
            losses.push(parts.total.to_scalar::<f32>()?);
            let grads = parts.total.backward()?;
            for (_, v) in &params {
                if let Some(g) = grads.get(v) {
                    v.set(&(v.as_tensor() - (g * lr)?)?)?;
                }
            }
        }
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        // Full-batch gradient descent on one batch: every step must lower the loss.
        assert!(
            losses.windows(2).all(|w| w[1] < w[0]),
            "loss did not drop: {losses:?}"
        );
        assert!(
            losses[4] < 0.92 * losses[0],
            "loss dropped too little: {losses:?}"
        );
        Ok(())
    }
}
