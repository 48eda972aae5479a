//! `effdet train`: the training loop. Pipeline batches (train mode) → candle tensors →
//! forward (training BN) → automl loss → backward → clip → SGD (momentum) → EMA, with
//! checkpoints (weights, BN statistics, EMA and momentum in one safetensors file plus a JSON
//! side file, both written atomically) that `--resume` continues exactly: same schedule, same
//! data order (the loader is deterministic per seed, epoch and sequence).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use effdet_model::config::Config;
use effdet_model::optim::{CosineSchedule, Ema, Sgd};
use effdet_model::{DynamicLossScaler, ModelVars, Precision};
use effdet_pipeline::tfrecord::RecordReader;

use super::data::{start_loader, DataArgs, LabelSpec};
use super::step::{DeviceFeeder, StepStats, Trainer};
use super::tensorboard::EventWriter;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Model config (TOML), e.g. configs/efficientdet-d0.toml, or a built-in name.
    #[arg(long, default_value = "efficientdet-d0")]
    pub config: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// Run directory (checkpoints, TensorBoard events).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from `OUT/latest`.
    #[arg(long)]
    pub resume: bool,
    /// Total training steps (default: num_epochs × steps per epoch). Also the schedule length.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Stop after this many steps in this invocation (the schedule still spans `--steps`).
    #[arg(long)]
    pub max_steps_this_run: Option<u64>,
    /// Global batch size (default: the config's, 64 for D0; on the CPU at most 8 at 512² and
    /// fewer for larger images, as the config's would not fit in memory).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate for this batch size (default: config lr scaled by batch size).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warmup steps (default: lr_warmup_epoch × steps per epoch).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Records per epoch (default: counted from the shards).
    #[arg(long)]
    pub epoch_size: Option<u64>,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Config overrides `section.key=value` (TOML values), repeatable.
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Log scalars every N steps.
    #[arg(long, default_value_t = 1)]
    pub log_every: u64,
    /// No progress bar (tests, logs).
    #[arg(long)]
    pub quiet: bool,
    /// fp32, or mixed precision: fp16 (dynamic loss scaling) or bf16 matrix products.
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    /// Run on the CPU or the first CUDA GPU (CUDA builds).
    #[arg(long, value_enum, default_value_t = super::bench_train::DeviceArg::Cpu)]
    pub device: super::bench_train::DeviceArg,
    #[command(flatten)]
    pub feed: super::data::FeedArgs,
}

/// Loads a config file or built-in name and applies `section.key=value` overrides.
pub fn load_config(spec: &str, sets: &[String]) -> anyhow::Result<Config> {
    let text = if Path::new(spec).exists() {
        std::fs::read_to_string(spec).with_context(|| format!("reading {spec}"))?
    } else {
        let c = Config::builtin(spec).with_context(|| format!("config {spec}"))?;
        toml::to_string(&c)?
    };
    let mut doc: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {spec}"))?;
    for s in sets {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {s}: expected section.key=value"))?;
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .map(|mut t| t.remove("v").unwrap_or(toml::Value::String(value.into())))
            .unwrap_or_else(|_| toml::Value::String(value.into()));
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut table = &mut doc;
        for p in parts {
            table = table
                .get_mut(p)
                .and_then(|v| v.as_table_mut())
                .ok_or_else(|| anyhow::anyhow!("--set {s}: no section {p}"))?;
        }
        anyhow::ensure!(table.contains_key(last), "--set {s}: unknown key {last}");
        table.insert(last.to_string(), value);
    }
    Ok(Config::from_toml_str(&toml::to_string(&doc)?)?)
}

/// Checkpoint side file.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct CheckpointMeta {
    pub step: u64,
    /// Loader position of the next sample: epoch and sequence within it.
    pub next_epoch: u64,
    pub next_sequence: u64,
    pub samples_seen: u64,
    pub epoch_size: u64,
    pub batch_size: usize,
    pub image_size: u32,
    pub seed: u64,
    pub schedule_total_steps: u64,
    pub schedule_warmup_steps: u64,
    pub peak_lr: f64,
    pub config: Config,
    /// Matrix-product precision (absent in older checkpoints: fp32).
    #[serde(default)]
    pub precision: Precision,
    /// Loss-scaler state (fp16).
    #[serde(default)]
    pub loss_scaler: Option<DynamicLossScaler>,
}

/// Counts records across shard files (the epoch length in samples for one replica).
fn count_records(files: &[PathBuf]) -> anyhow::Result<u64> {
    let mut n = 0;
    for f in files {
        for r in RecordReader::open(f)? {
            r?;
            n += 1;
        }
    }
    Ok(n)
}

fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    write(&tmp)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Result of a training run (for the quickstart and tests).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub first_step: u64,
    pub last_step: u64,
    pub losses: Vec<f64>,
    pub mean_step_secs: f64,
    pub images_per_sec: f64,
    pub checkpoint: Option<PathBuf>,
    pub events: PathBuf,
    /// With `--gpu-decode`: images per nvJPEG decoder (hardware, CUDA, CPU fallback, blank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_decode: Option<serde_json::Value>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let s = train(&a)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(0)
}

/// Safetensors prefixes of the checkpoint's groups.
const P_PARAM: &str = "param/";
const P_STAT: &str = "stat/";
const P_EMA: &str = "ema/";
const P_MOM: &str = "momentum/";

pub fn train(a: &Args) -> anyhow::Result<TrainSummary> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let dev = super::bench_train::device(a.device)?;
    let resume_meta: Option<CheckpointMeta> = if a.resume {
        let latest = a.out.join("latest");
        let name = std::fs::read_to_string(&latest)
            .with_context(|| format!("--resume: reading {}", latest.display()))?;
        let meta_path = a.out.join(format!("{}.json", name.trim()));
        let text = std::fs::read_to_string(&meta_path)
            .with_context(|| format!("reading {}", meta_path.display()))?;
        Some(serde_json::from_str(&text).with_context(|| format!("{}", meta_path.display()))?)
    } else {
        // A fresh run would overwrite the checkpoints and `latest` of the one already there
        // (TensorFlow's estimator would silently continue it instead): make the user choose.
        let latest = a.out.join("latest");
        if let Ok(name) = std::fs::read_to_string(&latest) {
            anyhow::bail!(
                "{} already holds a training run (latest checkpoint {}); pass --resume to continue \
                 it, or choose another --out",
                a.out.display(),
                name.trim()
            );
        }
        None
    };
    let cfg = match &resume_meta {
        Some(m) => m.config.clone(),
        None => load_config(&a.config, &a.set)?,
    };
    let mut data = a.data.sized_for(cfg.input.image_size as u32);
    if let Some(m) = &resume_meta {
        data.image_size = Some(m.image_size);
        data.seed = m.seed;
    }
    let batch_size = match resume_meta.as_ref().map(|m| m.batch_size).or(a.batch_size) {
        Some(b) => b,
        None => {
            let b = default_batch_size(&cfg, dev.is_cpu(), data.image_size());
            if b < cfg.train.batch_size {
                eprintln!(
                    "note: batch size {b} on the CPU (the config's {} would need ~{:.0} GB here); \
                     --batch-size sets it, and the learning rate follows it",
                    cfg.train.batch_size,
                    cfg.train.batch_size as f64 * cpu_gb_per_image(data.image_size())
                );
            }
            b
        }
    };
    // Resume positions and the epoch length are counted for one process reading every shard.
    anyhow::ensure!(
        data.world_size == 1,
        "train runs as one process (--world-size {} is not supported)",
        data.world_size
    );
    let files = data.files()?;
    let epoch_size = match (&resume_meta, a.epoch_size) {
        (Some(m), _) => m.epoch_size,
        (None, Some(n)) => n,
        (None, None) => count_records(&files)?,
    };
    anyhow::ensure!(epoch_size > 0, "the shards hold no records");
    let steps_per_epoch = (epoch_size / batch_size as u64).max(1);
    let schedule = match &resume_meta {
        Some(m) => CosineSchedule {
            peak: m.peak_lr,
            warmup_init: cfg.train.lr_warmup_init,
            warmup_steps: m.schedule_warmup_steps,
            total_steps: m.schedule_total_steps,
        },
        None => {
            let mut s =
                CosineSchedule::from_config(&cfg.train, batch_size, steps_per_epoch, a.steps);
            if let Some(lr) = a.lr {
                s.peak = lr;
            }
            if let Some(w) = a.warmup_steps {
                s.warmup_steps = w.min(s.total_steps);
            }
            s
        }
    };

    let precision = resume_meta.as_ref().map_or(a.precision, |m| m.precision);
    let mut trainer = Trainer::new(&cfg, &dev, data.seed, precision)?;
    if let Some(s) = resume_meta.as_ref().and_then(|m| m.loss_scaler.clone()) {
        trainer.scaler = s;
    }
    let (mut step, mut next_epoch, mut next_seq) = (0u64, 0u64, 0u64);
    if let Some(m) = &resume_meta {
        let path = a.out.join(format!("ckpt-{}.safetensors", m.step));
        let t = &mut trainer;
        load_checkpoint(&path, &t.vars, &mut t.sgd, &mut t.ema, &dev)?;
        step = m.step;
        next_epoch = m.next_epoch;
        next_seq = m.next_sequence;
    }

    let mut lcfg = data.train_loader_config(&cfg, batch_size);
    lcfg.start_epoch = next_epoch;
    lcfg.skip_samples = next_seq;
    let feed = a.feed.apply(&mut lcfg, 2);
    let feeder = DeviceFeeder::start(
        start_loader(lcfg, files, &LabelSpec::for_model(&cfg, data.image_size()))?,
        dev.clone(),
        feed,
    )?;
    let mut events = EventWriter::create(&a.out)?;

    let end = schedule.total_steps.min(
        a.max_steps_this_run
            .map_or(u64::MAX, |n| step.saturating_add(n)),
    );
    let first_step = step;
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        effdet_tools::progress_bar(end - step, "steps")
    };
    let mut losses = Vec::new();
    let t_all = Instant::now();
    let mut last_ckpt = None;
    let checkpoint_meta = |step: u64, next_epoch: u64, next_sequence: u64| CheckpointMeta {
        step,
        next_epoch,
        next_sequence,
        samples_seen: step * batch_size as u64,
        epoch_size,
        batch_size,
        image_size: data.image_size(),
        seed: data.seed,
        schedule_total_steps: schedule.total_steps,
        schedule_warmup_steps: schedule.warmup_steps,
        peak_lr: schedule.peak,
        config: cfg.clone(),
        precision,
        loss_scaler: None,
    };
    while step < end {
        let t = Instant::now();
        let b = feeder
            .next_batch()
            .ok_or_else(|| anyhow::anyhow!("the input pipeline ended at step {step}"))??;
        // Position of the sample after this batch, wrapping into the next epoch.
        next_epoch = b.epoch;
        next_seq = b.first_sequence + b.len as u64;
        while next_seq >= epoch_size {
            next_seq -= epoch_size;
            next_epoch += 1;
        }
        let images_in_batch = b.len;
        let tensors = b.tensors;

        let lr = schedule.lr(step);
        let stats = match trainer.step(&tensors, lr, step) {
            Ok(s) => s,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        let StepStats {
            loss,
            cls_loss: cls_l,
            box_loss: box_l,
            reg_loss: reg_l,
            gradient_norm: gnorm,
            loss_scale,
            ..
        } = stats;
        step += 1;
        losses.push(loss);

        let secs = t.elapsed().as_secs_f64();
        let ips = images_in_batch as f64 / secs;
        if a.log_every > 0 && step % a.log_every == 0 {
            events.scalars(
                step,
                &[
                    ("loss", loss),
                    ("cls_loss", cls_l),
                    ("box_loss", box_l),
                    ("reg_loss", reg_l),
                    ("lr", lr),
                    ("gradient_norm", gnorm),
                    ("images_per_sec", ips),
                    ("loss_scale", loss_scale),
                ],
            )?;
        }
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {ips:.1} img/s"));
        bar.inc(1);
        if a.checkpoint_every > 0 && step % a.checkpoint_every == 0 && step < end {
            let mut meta = checkpoint_meta(step, next_epoch, next_seq);
            meta.loss_scaler = Some(trainer.scaler.clone());
            let t = &trainer;
            last_ckpt = Some(save_checkpoint(&a.out, &meta, &t.vars, &t.sgd, &t.ema)?);
        }
    }
    bar.finish();
    let gpu_decode = feeder.gpu_decode_counts();
    drop(feeder);
    if step > first_step || last_ckpt.is_none() {
        let mut meta = checkpoint_meta(step, next_epoch, next_seq);
        meta.loss_scaler = Some(trainer.scaler.clone());
        let t = &trainer;
        last_ckpt = Some(save_checkpoint(&a.out, &meta, &t.vars, &t.sgd, &t.ema)?);
    }
    events.flush()?;
    let n = (step - first_step).max(1) as f64;
    let secs = t_all.elapsed().as_secs_f64();
    Ok(TrainSummary {
        first_step,
        last_step: step,
        losses,
        mean_step_secs: secs / n,
        images_per_sec: n * batch_size as f64 / secs,
        checkpoint: last_ckpt,
        events: events.path.clone(),
        gpu_decode,
    })
}

/// Host memory a D0 training step keeps per image on the CPU at `image_size`², in GB: ~1.0 GB
/// peak at batch 2 and 512² (BENCHMARKS.md), ~0.45 GB of it per image, scaling with the area.
fn cpu_gb_per_image(image_size: u32) -> f64 {
    0.45 * (image_size as f64 / 512.0).powi(2)
}

/// The batch size when `--batch-size` is not given: the config's (the recipe's global batch) on
/// a GPU; on the CPU at most what keeps a step near 4 GB (8 at 512², 1 at 1536²), because the
/// recipe's 64 would need ~29 GB at 512² and the process would be killed for memory.
fn default_batch_size(cfg: &Config, on_cpu: bool, image_size: u32) -> usize {
    let recipe = cfg.train.batch_size;
    if !on_cpu {
        return recipe;
    }
    let fits = (3.6 / cpu_gb_per_image(image_size)).floor() as usize;
    recipe.min(fits.max(1))
}

/// Writes `ckpt-STEP.safetensors` + `ckpt-STEP.json` (temp + rename each) and then `latest`.
fn save_checkpoint(
    dir: &Path,
    meta: &CheckpointMeta,
    vars: &ModelVars,
    sgd: &Sgd,
    ema: &Ema,
) -> anyhow::Result<PathBuf> {
    let name = format!("ckpt-{}", meta.step);
    let mut all = std::collections::HashMap::new();
    for (n, v) in vars.trainable() {
        all.insert(format!("{P_PARAM}{n}"), v.as_tensor().clone());
    }
    for (n, v) in vars.bn_stats() {
        all.insert(format!("{P_STAT}{n}"), v.as_tensor().clone());
    }
    for (n, t) in ema.shadows() {
        all.insert(format!("{P_EMA}{n}"), t.clone());
    }
    for (n, t) in sgd.buffers() {
        all.insert(format!("{P_MOM}{n}"), t.clone());
    }
    let st = dir.join(format!("{name}.safetensors"));
    write_atomic(&st, |p| Ok(candle_core::safetensors::save(&all, p)?))?;
    write_atomic(&dir.join(format!("{name}.json")), |p| {
        Ok(std::fs::write(p, serde_json::to_string_pretty(meta)?)?)
    })?;
    write_atomic(&dir.join("latest"), |p| Ok(std::fs::write(p, &name)?))?;
    Ok(st)
}

fn load_checkpoint(
    path: &Path,
    vars: &ModelVars,
    sgd: &mut Sgd,
    ema: &mut Ema,
    dev: &Device,
) -> anyhow::Result<()> {
    let file = candle_core::safetensors::load(path, dev)
        .with_context(|| format!("loading {}", path.display()))?;
    let get = |k: String| {
        file.get(&k)
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor {k}", path.display()))
    };
    for (n, v) in vars.trainable() {
        v.set(get(format!("{P_PARAM}{n}"))?)?;
    }
    for (n, v) in vars.bn_stats() {
        v.set(get(format!("{P_STAT}{n}"))?)?;
    }
    let names: Vec<String> = ema.shadows().map(|(n, _)| n.to_string()).collect();
    for n in names {
        ema.set_shadow(&n, get(format!("{P_EMA}{n}"))?)?;
    }
    let names: Vec<String> = sgd.buffers().map(|(n, _)| n.to_string()).collect();
    for n in names {
        sgd.set_buffer(&n, get(format!("{P_MOM}{n}"))?)?;
    }
    Ok(())
}

/// Loads a checkpoint's EMA weights (parameters and BN statistics) into `vars` for evaluation.
pub fn load_ema_weights(path: &Path, vars: &ModelVars, dev: &Device) -> anyhow::Result<()> {
    let file = candle_core::safetensors::load(path, dev)
        .with_context(|| format!("loading {}", path.display()))?;
    for (n, v) in vars.trainable().into_iter().chain(vars.bn_stats()) {
        let t = file
            .get(&format!("{P_EMA}{n}"))
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor {P_EMA}{n}", path.display()))?;
        v.set(t)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use effdet_pipeline::coco::convert::{convert, ConvertOptions};
    use effdet_pipeline::coco::synth::{generate, SynthOptions};

    pub(crate) fn shards(dir: &Path, images: usize) -> anyhow::Result<PathBuf> {
        let out = generate(
            &dir.join("coco"),
            &SynthOptions {
                images,
                seed: 3,
                split: "train".into(),
                ..Default::default()
            },
        )?;
        let prefix = dir.join("shards").join("train");
        convert(
            &ConvertOptions {
                image_dir: out.image_dir.clone(),
                object_annotations_file: Some(out.annotations.clone()),
                caption_annotations_file: None,
                image_info_file: None,
                output_file_prefix: prefix.to_string_lossy().into_owned(),
                num_shards: 2,
                include_masks: false,
                num_threads: 1,
            },
            &|_, _| {},
        )?;
        Ok(dir.join("shards"))
    }

    pub(crate) fn args(data: &Path, out: &Path, steps: u64) -> Args {
        let mut d = DataArgs::for_paths(vec![data.to_string_lossy().into_owned()], 64);
        d.threads = Some(1);
        d.seed = 5;
        Args {
            config: "efficientdet-d0".into(),
            data: d,
            precision: effdet_model::Precision::F32,
            device: crate::commands::bench_train::DeviceArg::Cpu,
            feed: Default::default(),
            out: out.to_path_buf(),
            resume: false,
            steps: Some(steps),
            max_steps_this_run: None,
            batch_size: Some(2),
            lr: Some(0.02),
            warmup_steps: Some(1),
            epoch_size: None,
            checkpoint_every: 0,
            set: vec!["head.num_classes=3".into()],
            log_every: 1,
            quiet: true,
        }
    }

    #[test]
    fn config_overrides() -> anyhow::Result<()> {
        let c = load_config("efficientdet-d0", &["head.num_classes=3".into()])?;
        assert_eq!(c.head.num_classes, 3);
        assert!(load_config("efficientdet-d0", &["head.nope=3".into()]).is_err());
        assert!(load_config("efficientdet-d0", &["nope".into()]).is_err());
        Ok(())
    }

    #[test]
    fn the_cpu_default_batch_fits_in_memory() -> anyhow::Result<()> {
        let d0 = load_config("efficientdet-d0", &[])?;
        assert_eq!(default_batch_size(&d0, false, 512), 64);
        assert_eq!(default_batch_size(&d0, true, 512), 8);
        assert_eq!(default_batch_size(&d0, true, 128), 64);
        assert_eq!(default_batch_size(&d0, true, 1536), 1);
        let small = load_config("efficientdet-d0", &["train.batch_size=4".into()])?;
        assert_eq!(default_batch_size(&small, true, 512), 4);
        Ok(())
    }

    /// 4 steps straight vs 2 + resume 2 give the same losses (exact), and the events file
    /// holds the scalars.
    #[test]
    fn resume_reproduces_the_next_steps() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = shards(dir.path(), 8)?;
        let straight = train(&args(&data, &dir.path().join("a"), 4))?;
        assert_eq!(straight.losses.len(), 4);
        let mut first = args(&data, &dir.path().join("b"), 4);
        first.max_steps_this_run = Some(2);
        let part1 = train(&first)?;
        let mut second = args(&data, &dir.path().join("b"), 4);
        // Without --resume the run already there is not overwritten.
        let err = train(&second).unwrap_err().to_string();
        assert!(
            err.contains("already holds a training run") && err.contains("--resume"),
            "{err}"
        );
        second.resume = true;
        let part2 = train(&second)?;
        assert_eq!(part2.first_step, 2);
        let joined: Vec<f64> = part1.losses.iter().chain(&part2.losses).copied().collect();
        assert_eq!(joined, straight.losses);

        // Scalars were logged.
        let ev = std::fs::read_dir(dir.path().join("a"))?
            .filter_map(|e| e.ok())
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents.")
            })
            .expect("events file");
        let mut tags = std::collections::BTreeSet::new();
        let mut steps = 0;
        for r in RecordReader::open(ev.path())? {
            let e = <super::super::tensorboard::Event as prost::Message>::decode(&r?.payload[..])?;
            if let Some(s) = e.summary {
                steps += 1;
                tags.extend(s.value.into_iter().map(|v| v.tag));
            }
        }
        assert_eq!(steps, 4);
        for t in [
            "loss",
            "cls_loss",
            "box_loss",
            "reg_loss",
            "lr",
            "images_per_sec",
        ] {
            assert!(tags.contains(t), "{t} missing from {tags:?}");
        }
        Ok(())
    }

    #[test]
    fn a_few_steps_lower_the_loss() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // Two images = one batch per epoch, and no augmentation: the same inputs every step.
        let data = shards(dir.path(), 2)?;
        let mut a = args(&data, &dir.path().join("c"), 6);
        a.set.extend([
            "input.jitter_min=1.0".into(),
            "input.jitter_max=1.0".into(),
            "input.input_rand_hflip=false".into(),
        ]);
        let s = train(&a)?;
        let first = s.losses[0];
        let last = *s.losses.last().unwrap();
        assert!(last < 0.9 * first, "loss did not fall: {:?}", s.losses);
        Ok(())
    }
}
