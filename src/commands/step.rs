//! One training step, shared by `train` and `bench-train`: forward (training BN) → automl loss
//! → backward → clip → SGD (momentum) → EMA, on whichever device the model lives. Host reads
//! are batched (the four loss scalars in one transfer, the gradient norms in one), since on a
//! GPU each read is a synchronization. Gradients come from the model's tape
//! (`effdet_model::tape`: the forward records its ops, the loss is differentiated by hand) rather
//! than candle's backward, which zero-fills and adds a full-size buffer per graph node;
//! `EFFDET_CANDLE_BACKWARD=1` switches back to candle's for comparison.

use candle_core::{DType, Device, Tensor};
use effdet_model::config::Config;
use effdet_model::loss::{detection_loss, tape_gradients};
use effdet_model::ops::marker::{phase_end, Phase};
use effdet_model::ops::{multi_tensor, tensors_created};
use effdet_model::optim::{clip_factors, clip_gradients, Ema, Sgd};
use effdet_model::tape::Tape;
use effdet_model::{DynamicLossScaler, EfficientDet, ModelVars, Precision};
use effdet_pipeline::loader::{Batch, ImageData, Loader};
use std::cell::RefCell;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

/// Model, optimizer state and EMA of one training run.
pub struct Trainer {
    pub cfg: Config,
    pub vars: ModelVars,
    pub model: EfficientDet,
    pub sgd: Sgd,
    pub ema: Ema,
    /// Dynamic loss scaling (enabled for fp16 only).
    pub scaler: DynamicLossScaler,
    l2: Vec<Tensor>,
    /// Per `sgd.vars()` entry: whether it is one of the `l2` kernels (weight decay).
    decayed: Vec<bool>,
    /// Gradients through the tape (else candle's backward).
    use_tape: bool,
    /// With the tape: the optimizer's per-variable work in multi-tensor passes
    /// (`EFFDET_UNFUSED_UPDATE=1` turns it off, for comparison).
    fuse_update: bool,
    /// The last [`Trainer::loss`]'s recorded forward, for [`Trainer::gradients`].
    recorded: RefCell<Option<Recorded>>,
}

/// A recorded forward pass and what its loss was computed from.
struct Recorded {
    tape: Tape,
    cls: Vec<Tensor>,
    boxes: Vec<Tensor>,
    cls_targets: Vec<Tensor>,
    box_targets: Vec<Tensor>,
    num_positives: Tensor,
    /// The total loss tensor of that forward (gradients are only for it).
    total: Tensor,
}

/// What one step measured.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub loss: f64,
    pub cls_loss: f64,
    pub box_loss: f64,
    pub reg_loss: f64,
    pub gradient_norm: f64,
    /// The loss scaler found an overflow: no update was made and the scale was halved.
    pub skipped: bool,
    /// Loss scale used for this step (1 without scaling).
    pub loss_scale: f64,
    /// Host wall time of the step's phases, split at its device reads (no extra syncs).
    pub phases: PhaseTimes,
    /// Tensors each phase created (`ops::tensors_created`): its launch count, device-free.
    pub tensors: PhaseTensors,
}

/// Tensors created by each phase of a step (views included): on a GPU nearly every one is a
/// launch or an allocation, so this is the step's host overhead in a number any machine can
/// measure. `backward` runs to the finite check, `update` covers clipping, SGD and the EMA.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PhaseTensors {
    pub forward: u64,
    pub backward: u64,
    pub update: u64,
}

/// Where a step's host wall time goes, in seconds. Each `*_queued` is the time to enqueue the
/// phase's work; the phase itself ends at the next device read (loss scalars, gradient norms),
/// so `queued ≈ total` means the host (launch overhead) is the limit and `queued ≪ total`
/// means the device is. `update` is enqueue-only: its device time shows in the caller's sync.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PhaseTimes {
    pub forward_queued: f64,
    pub forward: f64,
    pub backward_queued: f64,
    pub backward: f64,
    pub update_queued: f64,
}

impl PhaseTimes {
    /// Element-wise sum (for averaging over steps).
    pub fn add(&mut self, o: &PhaseTimes) {
        self.forward_queued += o.forward_queued;
        self.forward += o.forward;
        self.backward_queued += o.backward_queued;
        self.backward += o.backward;
        self.update_queued += o.update_queued;
    }

    /// Every field scaled by `k` (e.g. 1000 / steps for mean milliseconds).
    pub fn scaled(&self, k: f64) -> PhaseTimes {
        PhaseTimes {
            forward_queued: self.forward_queued * k,
            forward: self.forward * k,
            backward_queued: self.backward_queued * k,
            backward: self.backward * k,
            update_queued: self.update_queued * k,
        }
    }
}

/// A batch's tensors on a device: images `[B, 3, H, W]`, per-level class and box targets,
/// num_positives `[B]`.
pub struct BatchTensors {
    pub images: Tensor,
    pub cls: Vec<Tensor>,
    pub boxes: Vec<Tensor>,
    pub num_positives: Tensor,
}

impl BatchTensors {
    /// Copies a pipeline batch to `dev`.
    pub fn from_batch(b: &Batch, dev: &Device) -> anyhow::Result<BatchTensors> {
        let (h, w) = b.image_size;
        let bs = b.batch_size;
        // f16 batches travel as f16 (half the bytes to copy) and widen on the device.
        let shape = (bs, 3, h, w);
        let images = match &b.buffers().images {
            ImageData::F32(v) => Tensor::from_slice(v, shape, dev)?,
            ImageData::F16(v) => Tensor::from_slice(v, shape, dev)?.to_dtype(DType::F32)?,
        };
        let a = b.anchors_per_cell;
        let mut cls = Vec::new();
        let mut boxes = Vec::new();
        for (l, lv) in b.levels.iter().enumerate() {
            cls.push(Tensor::from_slice(
                b.cls_targets(l),
                (bs, lv.height, lv.width, a),
                dev,
            )?);
            boxes.push(Tensor::from_slice(
                b.box_targets(l),
                (bs, lv.height, lv.width, 4 * a),
                dev,
            )?);
        }
        let num_positives = Tensor::from_slice(&b.buffers().num_positives, bs, dev)?;
        Ok(BatchTensors {
            images,
            cls,
            boxes,
            num_positives,
        })
    }
}

impl Trainer {
    /// A freshly initialized model (weights drawn from `seed`, identical on every device);
    /// matrix products in `precision`, master weights in f32.
    pub fn new(
        cfg: &Config,
        dev: &Device,
        seed: u64,
        precision: Precision,
    ) -> anyhow::Result<Trainer> {
        let vars = ModelVars::new(dev, seed);
        let model = EfficientDet::new_with_precision(cfg, &vars, precision)?;
        let sgd = Sgd::new(vars.trainable(), cfg.train.momentum)?;
        let ema_vars: Vec<_> = vars
            .trainable()
            .into_iter()
            .chain(vars.bn_stats())
            .collect();
        let ema = Ema::new(ema_vars, cfg.train.moving_average_decay)?;
        let l2 = model.l2_kernels();
        let kernel_ids: std::collections::HashSet<_> = l2.iter().map(|k| k.id()).collect();
        let decayed = sgd
            .vars()
            .iter()
            .map(|(_, v)| kernel_ids.contains(&v.id()))
            .collect();
        Ok(Trainer {
            cfg: cfg.clone(),
            vars,
            model,
            sgd,
            ema,
            scaler: DynamicLossScaler::for_precision(precision),
            l2,
            decayed,
            use_tape: std::env::var("EFFDET_CANDLE_BACKWARD")
                .map_or(true, |v| v.is_empty() || v == "0"),
            fuse_update: std::env::var("EFFDET_UNFUSED_UPDATE")
                .map_or(true, |v| v.is_empty() || v == "0"),
            recorded: RefCell::new(None),
        })
    }

    /// Whether gradients come from the tape (the default) or candle's backward.
    pub fn uses_tape(&self) -> bool {
        self.use_tape
    }

    /// Whether a tape step runs the optimizer's per-variable work fused (the default).
    #[cfg(test)]
    pub fn set_fuse_update(&mut self, on: bool) {
        self.fuse_update = on;
    }

    /// Chooses the tape (true) or candle's backward (false) for the following steps.
    pub fn set_use_tape(&mut self, on: bool) {
        self.use_tape = on;
        *self.recorded.borrow_mut() = None;
    }

    /// Forward and loss; returns the loss parts as tensors (no host read).
    pub fn loss(&self, t: &BatchTensors) -> anyhow::Result<effdet_model::loss::LossParts> {
        let parts_of = |cls: &[Tensor], boxes: &[Tensor]| {
            detection_loss(
                cls,
                boxes,
                &t.cls,
                &t.boxes,
                &t.num_positives,
                &self.l2,
                &self.cfg.loss,
            )
        };
        if !self.use_tape {
            let (cls, boxes) = self.model.forward(&t.images, true)?;
            return Ok(parts_of(&cls, &boxes)?);
        }
        let (cls, boxes, tape) = self.model.forward_recorded(&t.images, true)?;
        let parts = effdet_model::tape::profile_section(
            "loss",
            effdet_model::tape::Phase::Forward,
            || -> anyhow::Result<_> {
                self.with_fused_l2(detection_loss(
                    &cls,
                    &boxes,
                    &t.cls,
                    &t.boxes,
                    &t.num_positives,
                    &[],
                    &self.cfg.loss,
                )?)
            },
        )?;
        *self.recorded.borrow_mut() = Some(Recorded {
            tape,
            cls,
            boxes,
            cls_targets: t.cls.clone(),
            box_targets: t.boxes.clone(),
            num_positives: t.num_positives.clone(),
            total: parts.total.clone(),
        });
        Ok(parts)
    }

    /// `parts` (computed without regularization) plus weight_decay/2 · Σ‖kernel‖², the sums of
    /// squares in one multi-tensor pass rather than three small ops per kernel.
    fn with_fused_l2(
        &self,
        parts: effdet_model::loss::LossParts,
    ) -> anyhow::Result<effdet_model::loss::LossParts> {
        if self.l2.is_empty() {
            return Ok(parts);
        }
        let kernels: Vec<&Tensor> = self.l2.iter().collect();
        let ones = vec![(1.0, 0.0); kernels.len()];
        let squares = multi_tensor::sums_of_squares(&kernels, &[], &ones)?;
        let reg = (squares.sum_all()? * (self.cfg.loss.weight_decay / 2.0))?
            .to_dtype(parts.total.dtype())?;
        Ok(effdet_model::loss::LossParts {
            total: (&parts.total + &reg)?,
            reg,
            ..parts
        })
    }

    /// Gradients of the total loss for `sgd.vars()` (None where a variable got none).
    pub fn gradients(&self, total: &Tensor) -> anyhow::Result<Vec<Option<Tensor>>> {
        self.scaled_gradients(total, 1.0)
    }

    /// Gradients of `scale ·` the total loss of the last [`Trainer::loss`] (`total` is that
    /// loss tensor), for `sgd.vars()`.
    pub fn scaled_gradients(
        &self,
        total: &Tensor,
        scale: f64,
    ) -> anyhow::Result<Vec<Option<Tensor>>> {
        self.gradients_with(total, scale, true)
    }

    /// [`Trainer::scaled_gradients`]; from the tape without the L2 term when `!with_l2` (the
    /// fused update adds it).
    fn gradients_with(
        &self,
        total: &Tensor,
        scale: f64,
        with_l2: bool,
    ) -> anyhow::Result<Vec<Option<Tensor>>> {
        let recorded = self.recorded.borrow_mut().take();
        let Some(r) = recorded.filter(|r| r.total.id() == total.id()) else {
            anyhow::ensure!(
                !self.use_tape,
                "gradients of a loss this trainer's last forward did not record"
            );
            let scaled = if scale == 1.0 {
                total.clone()
            } else {
                total.affine(scale, 0.0)?
            };
            let grads = scaled.backward()?;
            return Ok(self
                .sgd
                .vars()
                .iter()
                .map(|(_, v)| grads.get(v).map(|g| g.detach()))
                .collect());
        };
        let mut grads = tape_gradients(
            r.tape,
            &r.cls,
            &r.boxes,
            &r.cls_targets,
            &r.box_targets,
            &r.num_positives,
            if with_l2 { &self.l2 } else { &[] },
            &self.cfg.loss,
            scale,
        )?;
        Ok(self
            .sgd
            .vars()
            .iter()
            .map(|(_, v)| grads.remove(&v.id()))
            .collect())
    }

    /// One full step at learning rate `lr`; `step` is the global step before it (the EMA ramp
    /// counts `step + 1` updates). Fails on a non-finite loss.
    pub fn step(&mut self, t: &BatchTensors, lr: f64, step: u64) -> anyhow::Result<StepStats> {
        let t0 = Instant::now();
        let n0 = tensors_created();
        let parts = self.loss(t)?;
        let scalars = Tensor::stack(&[&parts.total, &parts.cls, &parts.box_loss, &parts.reg], 0)?
            .to_dtype(DType::F64)?;
        phase_end(t.images.device(), Phase::Forward)?;
        let t_fq = Instant::now();
        let scalars: Vec<f64> = scalars.to_vec1()?;
        let (loss, cls_l, box_l, reg_l) = (scalars[0], scalars[1], scalars[2], scalars[3]);
        let t_f = Instant::now();
        anyhow::ensure!(
            loss.is_finite(),
            "non-finite loss at step {step}: total {loss}, cls {cls_l}, box {box_l}, reg {reg_l}"
        );
        let loss_scale = self.scaler.scale();
        let scale = if self.scaler.is_enabled() {
            loss_scale
        } else {
            1.0
        };
        let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
        let mut stats = StepStats {
            loss,
            cls_loss: cls_l,
            box_loss: box_l,
            reg_loss: reg_l,
            gradient_norm: f64::NAN,
            skipped: false,
            loss_scale,
            phases: PhaseTimes {
                forward_queued: secs(t0, t_fq),
                forward: secs(t0, t_f),
                ..PhaseTimes::default()
            },
            tensors: PhaseTensors {
                forward: tensors_created() - n0,
                ..PhaseTensors::default()
            },
        };
        let n_f = tensors_created();
        if self.use_tape && self.fuse_update {
            return self.fused_update(&parts.total, scale, lr, step, (t_f, n_f), stats);
        }
        let mut all = self.scaled_gradients(&parts.total, scale)?;
        phase_end(t.images.device(), Phase::Backward)?;
        let t_bq = Instant::now();
        let present: Vec<usize> = (0..all.len()).filter(|&i| all[i].is_some()).collect();
        let mut gs: Vec<Tensor> = present.iter().filter_map(|&i| all[i].take()).collect();
        let finite = self.scaler.unscale_and_check(&mut gs)?;
        self.scaler.update(finite);
        stats.skipped = !finite;
        stats.phases.backward_queued = secs(t_f, t_bq);
        let n_b = tensors_created();
        stats.tensors.backward = n_b - n_f;
        if !finite {
            stats.phases.backward = secs(t_f, Instant::now());
            return Ok(stats);
        }
        stats.gradient_norm = clip_gradients(&mut gs, self.cfg.train.clip_gradients_norm)?;
        let t_b = Instant::now();
        stats.phases.backward = secs(t_f, t_b);
        for (i, g) in present.into_iter().zip(gs) {
            all[i] = Some(g);
        }
        self.sgd.step(&all, lr)?;
        self.ema.update(step + 1)?;
        phase_end(t.images.device(), Phase::Update)?;
        stats.phases.update_queued = secs(t_b, Instant::now());
        stats.tensors.update = tensors_created() - n_b;
        Ok(stats)
    }
}

impl Trainer {
    /// The rest of a tape step with the per-variable work fused (`ops::multi_tensor`): one
    /// pass computes every gradient's squared norm of `g/scale + wd·w` (L2 for kernels) — the
    /// finite check and the clipping norms in one host read — and one pass applies
    /// unscaling, L2, clipping and SGD with momentum; the moving average is one more. The same
    /// arithmetic as the unfused path up to rounding (tested).
    fn fused_update(
        &mut self,
        total: &Tensor,
        scale: f64,
        lr: f64,
        step: u64,
        (t_f, n_f): (Instant, u64),
        mut stats: StepStats,
    ) -> anyhow::Result<StepStats> {
        let all = self.gradients_with(total, scale, false)?;
        let t_bq = Instant::now();
        let wd = self.cfg.loss.weight_decay as f32;
        let (mut index, mut grads, mut ws, mut coef) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, (g, (_, w))) in all.into_iter().zip(self.sgd.vars()).enumerate() {
            let Some(g) = g else { continue };
            let b = if self.decayed[i] { wd } else { 0.0 };
            index.push(i);
            grads.push(g);
            ws.push(w.as_tensor());
            coef.push(((1.0 / scale) as f32, b));
        }
        let gs: Vec<&Tensor> = grads.iter().collect();
        let squares = multi_tensor::sums_of_squares(&gs, &ws, &coef)?;
        phase_end(total.device(), Phase::Backward)?;
        let squares: Vec<f64> = squares.to_vec1()?;
        let finite = !self.scaler.is_enabled() || squares.iter().all(|s| s.is_finite());
        self.scaler.update(finite);
        let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
        stats.skipped = !finite;
        stats.phases.backward_queued = secs(t_f, t_bq);
        let t_b = Instant::now();
        stats.phases.backward = secs(t_f, t_b);
        let n_b = tensors_created();
        stats.tensors.backward = n_b - n_f;
        if !finite {
            return Ok(stats);
        }
        let (factors, norm) = clip_factors(&squares, self.cfg.train.clip_gradients_norm);
        stats.gradient_norm = norm;
        for ((a, b), f) in coef.iter_mut().zip(factors) {
            *a = (*a as f64 * f) as f32;
            *b = (*b as f64 * f) as f32;
        }
        self.sgd.fused_step(&index, &grads, &coef, lr)?;
        self.ema.update(step + 1)?;
        phase_end(total.device(), Phase::Update)?;
        stats.phases.update_queued = secs(t_b, Instant::now());
        stats.tensors.update = tensors_created() - n_b;
        Ok(stats)
    }
}

/// A batch on the device with its position in the data order.
pub struct FedBatch {
    pub tensors: BatchTensors,
    /// Epoch and sequence number (within it) of the batch's first sample.
    pub epoch: u64,
    pub first_sequence: u64,
    /// Real samples in the batch.
    pub len: usize,
}

/// How batches reach the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeedMode {
    /// The copy stream on CUDA devices, the simple feed elsewhere.
    Auto,
    /// A background thread converts and uploads batches on the model's own stream.
    Simple,
    /// CUDA: pinned staging buffers and a separate copy stream (see `cuda_feed`).
    CopyStream,
}

/// Feed settings.
#[derive(Clone, Copy, Debug)]
pub struct FeedOptions {
    /// Batches prepared ahead of the consumer.
    pub depth: usize,
    pub mode: FeedMode,
    /// Decode JPEGs on the GPU with nvJPEG (copy-stream feed; the loader must defer decoding).
    pub gpu_decode: bool,
}

impl FeedOptions {
    pub fn new(depth: usize) -> FeedOptions {
        FeedOptions {
            depth,
            mode: FeedMode::Auto,
            gpu_decode: false,
        }
    }
}

/// Brings loader batches to the device `depth` batches ahead, so the host-side conversion and
/// copy of the next batch overlap the current step. Order is the loader's; an error ends the
/// stream after being delivered.
pub enum DeviceFeeder {
    /// A thread converts and uploads on the model's stream.
    Simple(SimpleFeed),
    #[cfg(feature = "cuda")]
    CopyStream(super::cuda_feed::CudaFeeder),
}

/// The simple feed's consumer end and its thread.
pub struct SimpleFeed {
    rx: Option<Receiver<anyhow::Result<FedBatch>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SimpleFeed {
    /// Closes the channel and waits for the thread: it stops at its next send and frees its
    /// device tensors now, not while the process exits (freeing CUDA memory from a detached
    /// thread during teardown is a crash waiting to happen: seen once as a segfault after
    /// `bench-train` had printed its result).
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl DeviceFeeder {
    pub fn start(loader: Loader, dev: Device, opts: FeedOptions) -> anyhow::Result<DeviceFeeder> {
        let copy_stream = match opts.mode {
            FeedMode::Auto => dev.is_cuda(),
            FeedMode::Simple => false,
            FeedMode::CopyStream => true,
        };
        anyhow::ensure!(
            copy_stream || !opts.gpu_decode,
            "GPU decoding runs on the copy-stream feed"
        );
        if copy_stream {
            return Self::start_copy_stream(loader, &dev, opts);
        }
        let (tx, rx) = sync_channel(opts.depth.max(1));
        let mut loader = loader;
        let handle = std::thread::spawn(move || {
            while let Some(b) = loader.next_batch() {
                let item = b.and_then(|b| {
                    let tensors = BatchTensors::from_batch(&b, &dev)?;
                    // candle's CUDA device works on the per-thread default stream, so this
                    // thread's uploads are on a stream of its own: finish them before the
                    // consumer's stream reads the tensors.
                    if dev.is_cuda() {
                        dev.synchronize()?;
                    }
                    Ok(FedBatch {
                        tensors,
                        epoch: b.epoch,
                        first_sequence: b.first_sequence,
                        len: b.len,
                    })
                });
                let failed = item.is_err();
                // A closed channel means the consumer is done: stop (dropping the loader).
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        });
        Ok(DeviceFeeder::Simple(SimpleFeed {
            rx: Some(rx),
            thread: Some(handle),
        }))
    }

    #[cfg(feature = "cuda")]
    fn start_copy_stream(
        loader: Loader,
        dev: &Device,
        opts: FeedOptions,
    ) -> anyhow::Result<DeviceFeeder> {
        let cuda = dev
            .as_cuda_device()
            .map_err(|_| anyhow::anyhow!("the copy-stream feed needs a CUDA device"))?;
        let copts = super::cuda_feed::CudaFeedOptions {
            depth: opts.depth,
            gpu_decode: opts.gpu_decode,
        };
        Ok(DeviceFeeder::CopyStream(
            super::cuda_feed::CudaFeeder::start(loader, cuda.clone(), copts)?,
        ))
    }

    #[cfg(not(feature = "cuda"))]
    fn start_copy_stream(_: Loader, _: &Device, _: FeedOptions) -> anyhow::Result<DeviceFeeder> {
        anyhow::bail!("the copy-stream feed needs a binary built with --features cuda")
    }

    /// The next batch; None when the loader has ended.
    pub fn next_batch(&self) -> Option<anyhow::Result<FedBatch>> {
        match self {
            DeviceFeeder::Simple(f) => f.rx.as_ref()?.recv().ok(),
            #[cfg(feature = "cuda")]
            DeviceFeeder::CopyStream(f) => f.next_batch(),
        }
    }

    /// nvJPEG stage counters, when the GPU decodes.
    pub fn gpu_decode_counts(&self) -> Option<serde_json::Value> {
        match self {
            #[cfg(feature = "nvjpeg")]
            DeviceFeeder::CopyStream(f) => {
                serde_json::to_value(*f.stage_counts.lock().expect("stage counts")).ok()
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::data::{start_loader, DataArgs, DtypeArg, LabelSpec};

    fn spec(d: &DataArgs) -> LabelSpec {
        LabelSpec::default_anchors(d.image_size())
    }
    use crate::commands::train::tests as t;
    use effdet_pipeline::augment::Mode;

    /// One synthetic 64² batch of two on the CPU (its shards live in the returned folder) and
    /// D0 without drop-connect (whose masks come from the device RNG, which differs between
    /// two runs compared here).
    fn one_batch_and_d0() -> anyhow::Result<(tempfile::TempDir, BatchTensors, Config)> {
        let dir = tempfile::tempdir()?;
        let data = t::shards(dir.path(), 4)?;
        let d = DataArgs::for_paths(vec![data.to_string_lossy().into_owned()], 64);
        let mut loader = start_loader(d.loader_config(Mode::Train, 2), d.files()?, &spec(&d))?;
        let b = loader.next_batch().expect("a batch")?;
        let t = BatchTensors::from_batch(&b, &Device::Cpu)?;
        let mut cfg = Config::builtin("efficientdet-d0")?;
        cfg.backbone.survival_prob = 0.0;
        Ok((dir, t, cfg))
    }

    /// The trainer's tape gives candle's gradients (to the float noise that training-mode batch
    /// norm amplifies) for every variable, weight decay included, with and without loss
    /// scaling; a gradient for another loss than the last recorded one is refused.
    #[test]
    fn tape_and_candle_backward_give_the_same_gradients() -> anyhow::Result<()> {
        let (_dir, t, cfg) = one_batch_and_d0()?;
        let mut trainer = Trainer::new(&cfg, &Device::Cpu, 7, Precision::F32)?;
        assert!(trainer.uses_tape());
        for scale in [1.0, 1024.0] {
            trainer.set_use_tape(true);
            let parts = trainer.loss(&t)?;
            let tape = trainer.scaled_gradients(&parts.total, scale)?;
            trainer.set_use_tape(false);
            let parts = trainer.loss(&t)?;
            let candle = trainer.scaled_gradients(&parts.total, scale)?;
            let (mut num, mut den) = (0f64, 0f64);
            for ((a, c), (name, _)) in tape.iter().zip(&candle).zip(trainer.sgd.vars()) {
                let (a, c) = match (a, c) {
                    (Some(a), Some(c)) => (a, c),
                    _ => anyhow::bail!(
                        "{name}: gradient missing (tape {}, candle {})",
                        a.is_some(),
                        c.is_some()
                    ),
                };
                let d = (a - c)?
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                num += d;
                den += c
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
            let rel = (num / den).sqrt();
            assert!(rel < 1e-4, "scale {scale}: tape vs candle {rel:.2e}");
        }
        trainer.set_use_tape(true);
        let parts = trainer.loss(&t)?;
        let other = (&parts.total * 2.0)?;
        assert!(trainer.gradients(&other).is_err());
        Ok(())
    }

    /// The fused update (multi-tensor norms, L2, unscaling, clipping, SGD, EMA) moves the
    /// weights, momentum and averages as the per-variable passes do, to float rounding, with
    /// and without loss scaling, and with clipping active; the reported norms agree.
    #[test]
    fn fused_update_equals_the_per_variable_update() -> anyhow::Result<()> {
        let (_dir, t, mut cfg) = one_batch_and_d0()?;
        for (precision, clip) in [(Precision::F32, 10.0), (Precision::F16, 0.05)] {
            cfg.train.clip_gradients_norm = clip;
            let mut fused = Trainer::new(&cfg, &Device::Cpu, 3, precision)?;
            let mut plain = Trainer::new(&cfg, &Device::Cpu, 3, precision)?;
            plain.set_fuse_update(false);
            // One applied step: the same forward and tape gradients on both sides, so only the
            // update's arithmetic differs (after that, training-mode batch norm amplifies the
            // weights' last-bit differences in the next gradients). Overflowing fp16 steps,
            // skipped alike on both sides, change nothing but the loss scale.
            for step in 0..16 {
                let a = fused.step(&t, 0.05, step)?;
                let p = plain.step(&t, 0.05, step)?;
                assert_eq!(a.skipped, p.skipped, "{precision:?} step {step}");
                assert_eq!(a.loss_scale, p.loss_scale);
                if a.skipped {
                    assert!(step < 15, "{precision:?}: every step overflowed");
                    continue;
                }
                let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * y.abs().max(1e-12);
                assert!(close(a.loss, p.loss), "loss {} vs {}", a.loss, p.loss);
                assert!(
                    close(a.reg_loss, p.reg_loss),
                    "reg {} vs {}",
                    a.reg_loss,
                    p.reg_loss
                );
                assert!(
                    close(a.gradient_norm, p.gradient_norm),
                    "{precision:?} step {step}: norm {} vs {}",
                    a.gradient_norm,
                    p.gradient_norm
                );
                break;
            }
            let flat = |ts: Vec<Tensor>| -> anyhow::Result<Tensor> {
                let parts: Vec<Tensor> = ts
                    .iter()
                    .map(|t| t.flatten_all())
                    .collect::<candle_core::Result<_>>()?;
                Ok(Tensor::cat(&parts, 0)?.to_dtype(DType::F64)?)
            };
            let rel = |a: Tensor, b: Tensor| -> anyhow::Result<f64> {
                let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
                let den = (&a - &b.zeros_like()?)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
                Ok((num / den).sqrt())
            };
            fn weights(tr: &Trainer) -> Vec<Tensor> {
                tr.sgd
                    .vars()
                    .iter()
                    .map(|(_, v)| v.as_tensor().clone())
                    .collect()
            }
            fn momenta(tr: &Trainer) -> Vec<Tensor> {
                tr.sgd.buffers().map(|(_, t)| t.clone()).collect()
            }
            fn shadows(tr: &Trainer) -> Vec<Tensor> {
                tr.ema.shadows().map(|(_, t)| t.clone()).collect()
            }
            // The changes the step made (from a fresh trainer's state) agree.
            let init = Trainer::new(&cfg, &Device::Cpu, 3, precision)?;
            for (what, get) in [
                ("weights", weights as fn(&Trainer) -> Vec<Tensor>),
                ("momentum", momenta),
                ("averages", shadows),
            ] {
                let start = flat(get(&init))?;
                let da = (flat(get(&fused))? - &start)?;
                let dp = (flat(get(&plain))? - &start)?;
                let size = da.sqr()?.sum_all()?.to_scalar::<f64>()?;
                assert!(size > 0.0, "{precision:?} {what}: the step changed nothing");
                let e = rel(da, dp)?;
                // The weights' and averages' changes are differences of f32 values a step
                // apart (~1e-5 relative): their last bits limit the comparison.
                let tol = if what == "momentum" { 1e-6 } else { 1e-4 };
                assert!(
                    e < tol,
                    "{precision:?} {what}: fused vs per-variable {e:.2e}"
                );
            }
        }
        Ok(())
    }

    /// Feed selection: GPU decoding only on the copy stream, the copy stream only on CUDA
    /// builds; `--gpu-decode` makes the loader defer JPEGs and keep f32 images.
    #[test]
    fn feed_options_are_validated_and_gpu_decode_defers_jpegs() -> anyhow::Result<()> {
        use crate::commands::data::FeedArgs;
        let dir = tempfile::tempdir()?;
        let data = t::shards(dir.path(), 4)?;
        let d = DataArgs::for_paths(vec![data.to_string_lossy().into_owned()], 64);
        let loader = || {
            start_loader(
                d.loader_config(Mode::Train, 2),
                d.files().unwrap(),
                &spec(&d),
            )
        };
        let simple_gpu = FeedOptions {
            mode: FeedMode::Simple,
            gpu_decode: true,
            ..FeedOptions::new(2)
        };
        let err = DeviceFeeder::start(loader()?, Device::Cpu, simple_gpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("copy-stream"), "{err}");
        let copy = FeedOptions {
            mode: FeedMode::CopyStream,
            ..FeedOptions::new(2)
        };
        assert!(DeviceFeeder::start(loader()?, Device::Cpu, copy).is_err());
        // auto on the CPU is the simple feed.
        let f = DeviceFeeder::start(loader()?, Device::Cpu, FeedOptions::new(2))?;
        assert!(matches!(f, DeviceFeeder::Simple(_)));
        assert!(f.gpu_decode_counts().is_none());

        let mut lcfg = d.loader_config(Mode::Train, 2);
        lcfg.image_dtype = effdet_pipeline::loader::ImageDtype::F16;
        let args = FeedArgs {
            gpu_decode: true,
            ..FeedArgs::default()
        };
        let opts = args.apply(&mut lcfg, 3);
        assert!(lcfg.defer_jpeg_decode && opts.gpu_decode);
        assert_eq!(lcfg.image_dtype, effdet_pipeline::loader::ImageDtype::F32);
        assert_eq!((opts.depth, opts.mode), (3, FeedMode::Auto));
        let mut plain = d.loader_config(Mode::Train, 2);
        FeedArgs::default().apply(&mut plain, 2);
        assert!(!plain.defer_jpeg_decode);
        Ok(())
    }

    /// f16 batches reach the device as the same images (to f16 rounding) and identical targets,
    /// through the background feeder as well as directly.
    #[test]
    fn f16_batches_widen_on_the_device_and_the_feeder_keeps_order() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = t::shards(dir.path(), 6)?;
        let batches = |dtype: DtypeArg, feeder: bool| -> anyhow::Result<Vec<BatchTensors>> {
            let mut d = DataArgs::for_paths(vec![data.to_string_lossy().into_owned()], 64);
            d.threads = Some(2);
            d.image_dtype = dtype;
            let loader = start_loader(d.loader_config(Mode::Train, 2), d.files()?, &spec(&d))?;
            if feeder {
                let f = DeviceFeeder::start(loader, Device::Cpu, FeedOptions::new(2))?;
                (0..3)
                    .map(|_| Ok(f.next_batch().expect("batch")?.tensors))
                    .collect()
            } else {
                let mut loader = loader;
                (0..3)
                    .map(|_| {
                        BatchTensors::from_batch(
                            &loader.next_batch().expect("batch")?,
                            &Device::Cpu,
                        )
                    })
                    .collect()
            }
        };
        let a = batches(DtypeArg::F32, false)?;
        let b = batches(DtypeArg::F16, true)?;
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(y.images.dtype(), DType::F32);
            let diff = (&x.images - &y.images)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 2e-2, "f16 images differ by {diff}");
            assert!(diff > 0.0, "f16 rounding should show");
            for (u, v) in x.cls.iter().zip(&y.cls).chain(x.boxes.iter().zip(&y.boxes)) {
                let d = (u.to_dtype(DType::F64)? - v.to_dtype(DType::F64)?)?
                    .abs()?
                    .max_all()?;
                assert_eq!(d.to_scalar::<f64>()?, 0.0);
            }
        }
        Ok(())
    }
}
