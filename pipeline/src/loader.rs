//! Batches from shards: a source thread reads records (see [`crate::source`]) and numbers
//! them, and worker threads parse, decode, augment and label record `i` straight into slot
//! `i % B` of batch `i / B` (see [`crate::slots`]): the image is rendered into the batch's image
//! tensor and the targets are copied into its level-major arrays, so no thread copies a
//! finished sample again. An assembler thread hands batches out in order as their slots fill,
//! through a bounded prefetch queue. Dropping a [`Batch`] returns its buffers to the pool, so
//! the steady state allocates nothing per image.
//!
//! Determinism: all randomness of sample `n` of epoch `e` comes from `(seed, e, n, rank)`, and
//! a record's slot depends only on its position, so the batch stream is the same for any
//! thread count. A record that fails to parse, decode or label leaves a *hole*: zero pixels,
//! every anchor ignored, no ground truth (the GPU decode stage's [`Batch::ignore_slot`] does
//! the same), so a bad image never shifts the records after it into other batches.
//!
//! Layouts: images `[B, 3, H, W]` (f32 or f16); targets level-major, each level contiguous as
//! `[B, H_l, W_l, A]` for classes and `[B, H_l, W_l, 4A]` for boxes, `A` anchors per cell.
//!
//! Deferred decode ([`LoaderConfig::defer_jpeg_decode`], for a GPU decode stage): workers read
//! only the JPEG header, sample the geometry from its size, label the anchors and leave the
//! JPEG encoded in [`Batch::encoded`] with its [`ScaleParams`]; JPEGs the GPU decoder cannot
//! take (see [`crate::jpeg_header::gpu_unsupported_reason`]) and other formats are decoded and
//! rendered by the worker as usual. Labels are therefore identical in both modes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use half::f16;
use prost::bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::augment::{
    render_image, transform_boxes, AugmentConfig, ImageWorkspace, Mode, ScaleParams,
};
use crate::decode::{DecodedImage, ImageDecoder};
use crate::example::Example;
use crate::jpeg_header;
use crate::labeler::{LabelError, Labeler, Targets};
use crate::sample::Sample;
use crate::slots::{BatchShape, BatchSlots, SlotImage, SlotMut};
use crate::source::{mix_seed, EpochReader, SourceConfig, SourceRecord};

/// Element type of the image tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageDtype {
    F32,
    F16,
}

/// Everything the loader needs to know.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub mode: Mode,
    pub augment: AugmentConfig,
    pub batch_size: usize,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Batches queued ahead of the consumer.
    pub prefetch: usize,
    pub image_dtype: ImageDtype,
    /// Ground-truth rows per image in `gt_boxes` / `gt_classes` (automl: 100).
    pub max_instances: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// First epoch to produce (for resuming).
    pub start_epoch: u64,
    /// Epochs to produce; `None` repeats forever.
    pub epochs: Option<u64>,
    /// Samples of the first epoch to skip without decoding (for resuming).
    pub skip_samples: u64,
    pub shuffle_buffer: usize,
    pub cycle_length: usize,
    /// Only read, decode and resize (the pipeline's own ceiling); no labels.
    pub decode_only: bool,
    /// Leave GPU-decodable JPEGs encoded for a GPU decode stage (see the module docs).
    pub defer_jpeg_decode: bool,
}

impl LoaderConfig {
    /// Defaults for a mode: train shuffles and repeats; eval reads the files once in order.
    pub fn new(mode: Mode, image_size: u32, batch_size: usize) -> LoaderConfig {
        let train = mode == Mode::Train;
        LoaderConfig {
            mode,
            augment: AugmentConfig::d0(image_size),
            batch_size,
            threads: 0,
            prefetch: 2,
            image_dtype: ImageDtype::F32,
            max_instances: 100,
            seed: 0,
            rank: 0,
            world_size: 1,
            start_epoch: 0,
            epochs: if train { None } else { Some(1) },
            skip_samples: 0,
            shuffle_buffer: if train { 64 } else { 0 },
            cycle_length: if train { 4 } else { 1 },
            decode_only: false,
            defer_jpeg_decode: false,
        }
    }

    /// Settings for a GPU decode stage: JPEGs stay encoded, and images the workers still
    /// render are f32, the type the GPU renders (so its slots need no conversion).
    pub fn defer_for_gpu(&mut self) {
        self.defer_jpeg_decode = true;
        self.image_dtype = ImageDtype::F32;
    }

    fn worker_threads(&self) -> usize {
        if self.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.threads
        }
    }
}

/// Image tensor storage.
#[derive(Debug, Clone)]
pub enum ImageData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl ImageData {
    pub fn len(&self) -> usize {
        match self {
            ImageData::F32(v) => v.len(),
            ImageData::F16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The images as f32 (converted when stored as f16).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            ImageData::F32(v) => v.clone(),
            ImageData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// Per-level layout of the flat target arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelLayout {
    pub height: usize,
    pub width: usize,
    /// Offset of this level in one image's anchor list.
    pub anchor_offset: usize,
}

/// The reusable storage of one batch.
#[derive(Debug)]
pub struct BatchBuffers {
    pub images: ImageData,
    pub cls_targets: Vec<i32>,
    pub box_targets: Vec<f32>,
    pub num_positives: Vec<f32>,
    pub source_ids: Vec<i64>,
    pub image_scales: Vec<f32>,
    pub gt_boxes: Vec<f32>,
    pub gt_classes: Vec<f32>,
}

/// One batch. Dropping it hands its buffers back to the loader.
#[derive(Debug)]
pub struct Batch {
    /// Slots in use (the batch size, except a last eval batch); holes (see the module docs)
    /// count, with source id −1.
    pub len: usize,
    pub batch_size: usize,
    /// Epoch of the first sample and its sequence number in that epoch.
    pub epoch: u64,
    pub first_sequence: u64,
    pub image_size: (usize, usize),
    pub anchors_per_cell: usize,
    pub levels: Vec<LevelLayout>,
    /// Images whose original size was larger than the output etc. are all the same shape:
    /// `[batch_size, 3, H, W]`; unused slots of a short batch are zero.
    pub buffers: Option<BatchBuffers>,
    /// Per slot (`batch_size` entries): the JPEG a GPU decode stage must still decode and
    /// render into that slot's image, or `None` when the host images already hold it.
    pub encoded: Vec<Option<EncodedImage>>,
    recycle: Option<Sender<BatchBuffers>>,
}

impl Batch {
    pub fn buffers(&self) -> &BatchBuffers {
        self.buffers
            .as_ref()
            .expect("batch buffers present until drop")
    }
    pub fn num_anchors(&self) -> usize {
        self.levels
            .last()
            .map(|l| l.anchor_offset + l.height * l.width * self.anchors_per_cell)
            .unwrap_or(0)
    }
    /// Class targets of level index `l` (0 = lowest level): `[batch_size, H, W, A]`.
    pub fn cls_targets(&self, l: usize) -> &[i32] {
        let (start, len) = self.level_span(l, 1);
        &self.buffers().cls_targets[start..start + len]
    }
    /// Box targets of level index `l`: `[batch_size, H, W, 4A]`.
    pub fn box_targets(&self, l: usize) -> &[f32] {
        let (start, len) = self.level_span(l, 4);
        &self.buffers().box_targets[start..start + len]
    }
    /// Slots whose images a GPU stage must still produce.
    pub fn deferred_slots(&self) -> impl Iterator<Item = (usize, &EncodedImage)> {
        self.encoded
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i, e)))
    }

    /// Makes sample `slot` contribute nothing to the loss, for an image that could not be
    /// produced after its labels were made: every anchor ignored (−2), box targets and
    /// positives zero, no ground truth. The caller zeroes its pixels.
    pub fn ignore_slot(&mut self, slot: usize) {
        assert!(slot < self.batch_size, "slot {slot} out of range");
        let (bs, a) = (self.batch_size, self.anchors_per_cell);
        let levels = self.levels.clone();
        let b = self
            .buffers
            .as_mut()
            .expect("batch buffers present until drop");
        if !b.cls_targets.is_empty() {
            for lv in &levels {
                let n = lv.height * lv.width * a;
                let from = lv.anchor_offset * bs + slot * n;
                b.cls_targets[from..from + n].fill(-2);
                b.box_targets[from * 4..(from + n) * 4].fill(0.0);
            }
        }
        b.num_positives[slot] = 0.0;
        let max_inst = b.gt_classes.len() / bs;
        b.gt_boxes[slot * max_inst * 4..(slot + 1) * max_inst * 4].fill(-1.0);
        b.gt_classes[slot * max_inst..(slot + 1) * max_inst].fill(-1.0);
        self.encoded[slot] = None;
    }

    fn level_span(&self, l: usize, per_anchor: usize) -> (usize, usize) {
        let lv = &self.levels[l];
        let start = lv.anchor_offset * self.batch_size * per_anchor;
        let len = self.batch_size * lv.height * lv.width * self.anchors_per_cell * per_anchor;
        (start, len)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let (Some(b), Some(tx)) = (self.buffers.take(), self.recycle.take()) {
            let _ = tx.try_send(b);
        }
    }
}

/// Time spent per stage, summed over threads.
#[derive(Debug, Default)]
pub struct StageTimes {
    pub read_ns: AtomicU64,
    pub parse_ns: AtomicU64,
    pub decode_ns: AtomicU64,
    pub augment_ns: AtomicU64,
    pub label_ns: AtomicU64,
    pub batch_ns: AtomicU64,
    pub images: AtomicU64,
    pub skipped_images: AtomicU64,
    pub skipped_records: AtomicU64,
    /// Deferred-decode mode: images left encoded for the GPU, and images the workers decoded
    /// because the GPU decoder cannot take them.
    pub deferred_images: AtomicU64,
    pub cpu_fallback_images: AtomicU64,
    /// Batch buffer sets allocated (the pool's size; it should stop growing after start-up).
    pub buffer_sets: AtomicU64,
}

impl StageTimes {
    fn add(counter: &AtomicU64, since: Instant) -> Instant {
        let now = Instant::now();
        counter.fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
        now
    }
    /// Seconds per stage as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / 1e9;
        serde_json::json!({
            "read": s(&self.read_ns),
            "parse": s(&self.parse_ns),
            "decode": s(&self.decode_ns),
            "augment": s(&self.augment_ns),
            "label": s(&self.label_ns),
            "batch": s(&self.batch_ns),
            "deferred_images": self.deferred_images.load(Ordering::Relaxed),
            "cpu_fallback_images": self.cpu_fallback_images.load(Ordering::Relaxed),
            "buffer_sets": self.buffer_sets.load(Ordering::Relaxed),
        })
    }
}

/// A sample that failed to parse or decode.
#[derive(Debug, Clone)]
pub struct SkippedSample {
    pub file: Arc<PathBuf>,
    pub offset: u64,
    pub source_id: Option<i64>,
    pub reason: String,
}

/// A JPEG left for a GPU decode stage, with the geometry its labels were computed for.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    pub jpeg: Bytes,
    /// Size from the JPEG frame header.
    pub height: u32,
    pub width: u32,
    pub params: ScaleParams,
}

/// What the assembler hears from a worker: record `index` of the run is in its slot.
struct Done {
    index: u64,
    epoch: u64,
    sequence: u64,
    /// Set when the record gave no sample (its slot holds a hole).
    failure: Option<Failure>,
}

/// Why a record gave no sample.
enum Failure {
    /// Bad input: the slot becomes a hole, and the record is logged and counted.
    Skip(SkippedSample),
    /// Input that contradicts the run's settings (a class id the model has no logit for): the
    /// loader stops with this error, since every later batch would fail the same way or train
    /// on labels the model cannot represent.
    Fatal(String),
}

struct Job {
    /// Position in the run: the record goes to slot `index % B` of batch `index / B`.
    index: u64,
    epoch: u64,
    sequence: u64,
    record: SourceRecord,
}

/// The running pipeline; iterate it for batches.
pub struct Loader {
    batches: Receiver<anyhow::Result<Batch>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<StageTimes>,
    pub skipped: Arc<Mutex<Vec<SkippedSample>>>,
    pub worker_threads: usize,
}

impl Loader {
    /// Starts the pipeline threads.
    pub fn start(
        cfg: LoaderConfig,
        files: Vec<PathBuf>,
        labeler: Arc<Labeler>,
        decoder: Arc<dyn ImageDecoder>,
    ) -> anyhow::Result<Loader> {
        anyhow::ensure!(cfg.batch_size > 0, "batch size must be at least 1");
        let train = cfg.mode == Mode::Train;
        let source_cfg = SourceConfig {
            files,
            rank: cfg.rank,
            world_size: cfg.world_size,
            shuffle_files: train,
            cycle_length: cfg.cycle_length,
            shuffle_buffer: cfg.shuffle_buffer,
            seed: cfg.seed,
        };
        source_cfg.validate()?;
        let threads = cfg.worker_threads();
        let stats = Arc::new(StageTimes::default());
        let skipped = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = Arc::new(cfg);

        let levels = level_layouts(&labeler);
        let num_anchors = labeler.anchors().num_anchors();
        let (out_h, out_w) = (
            cfg.augment.image_size.0 as usize,
            cfg.augment.image_size.1 as usize,
        );
        let image_len = 3 * out_h * out_w;

        let shape = BatchShape {
            batch_size: cfg.batch_size,
            image_len,
            num_anchors: if cfg.decode_only { 0 } else { num_anchors },
            anchors_per_cell: labeler.anchors().per_location(),
            levels,
            max_instances: cfg.max_instances,
            f16_images: cfg.image_dtype == ImageDtype::F16,
        };
        // Open batches cover the records in flight (each worker's, and the job queue's), so
        // workers seldom wait; beyond that a slow consumer holds them back.
        let job_queue = threads * 2;
        let max_open = ((threads + job_queue).div_ceil(cfg.batch_size) + 1).max(2);
        // Every buffer set comes back to the pool: the pool grows to the most sets ever in use
        // at once (open, queued, held by the consumer) and no further. A bounded pool would
        // drop sets when the consumer hands several back at once and allocate them again later
        // (header-only runs then grew their RSS batch after batch through heap fragmentation).
        let (recycle_tx, recycle_rx) = unbounded::<BatchBuffers>();
        let slots = Arc::new(BatchSlots::new(shape, max_open, recycle_rx, stats.clone()));
        let (job_tx, job_rx) = bounded::<Job>(job_queue);
        let (done_tx, done_rx) = unbounded::<Done>();
        let (batch_tx, batch_rx) = bounded::<anyhow::Result<Batch>>(cfg.prefetch.max(1));
        let mut handles = Vec::new();

        // Source thread.
        {
            let cfg = cfg.clone();
            let stop = stop.clone();
            let stats = stats.clone();
            let batch_tx = batch_tx.clone();
            handles.push(std::thread::spawn(move || {
                let result = run_source(&cfg, &source_cfg, &job_tx, &stop, &stats);
                if let Err(e) = result {
                    let _ = batch_tx.send(Err(e));
                }
            }));
        }
        // Workers.
        for _ in 0..threads {
            let (cfg, stop, stats) = (cfg.clone(), stop.clone(), stats.clone());
            let (job_rx, done_tx, slots) = (job_rx.clone(), done_tx.clone(), slots.clone());
            let (labeler, decoder) = (labeler.clone(), decoder.clone());
            handles.push(std::thread::spawn(move || {
                let batch_size = cfg.batch_size as u64;
                let mut worker = Worker::new(cfg, labeler, decoder, stats);
                while let Ok(job) = job_rx.recv() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Some(batch) = slots.batch(job.index / batch_size, &stop) else {
                        break;
                    };
                    let slot = (job.index % batch_size) as usize;
                    // SAFETY: record indices are unique, so no other worker has this slot.
                    let mut view = unsafe { batch.slot(slot) };
                    let failure = worker.process(&job, &mut view, &slots.shape().levels).err();
                    if failure.is_some() {
                        view.make_hole();
                    }
                    drop(view);
                    // Let go of the batch before reporting, so the assembler can close it.
                    drop(batch);
                    let done = Done {
                        index: job.index,
                        epoch: job.epoch,
                        sequence: job.sequence,
                        failure,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(done_tx);
        // Assembler.
        {
            let (cfg, stop, stats, skipped) =
                (cfg.clone(), stop.clone(), stats.clone(), skipped.clone());
            handles.push(std::thread::spawn(move || {
                let mut asm = Assembler {
                    cfg,
                    slots,
                    recycle_tx,
                    stats,
                    skipped,
                };
                asm.run(done_rx, batch_tx, &stop);
                // Workers waiting for a batch that will never open must not wait forever.
                asm.slots.shut();
            }));
        }
        Ok(Loader {
            batches: batch_rx,
            stop,
            threads: handles,
            stats,
            skipped,
            worker_threads: threads,
        })
    }

    /// Next batch; `None` when the configured epochs are done.
    pub fn next_batch(&mut self) -> Option<anyhow::Result<Batch>> {
        self.batches.recv().ok()
    }
}

impl Iterator for Loader {
    type Item = anyhow::Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Drain so blocked senders wake up and see the stop flag.
        while self.batches.try_recv().is_ok() {}
        let (tx, rx) = bounded::<anyhow::Result<Batch>>(0);
        drop(tx);
        self.batches = rx;
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// Per-level offsets of the anchor list.
pub fn level_layouts(labeler: &Labeler) -> Vec<LevelLayout> {
    labeler
        .anchors()
        .levels()
        .iter()
        .map(|l| LevelLayout {
            height: l.height,
            width: l.width,
            anchor_offset: l.offset,
        })
        .collect()
}

fn run_source(
    cfg: &LoaderConfig,
    source: &SourceConfig,
    jobs: &Sender<Job>,
    stop: &AtomicBool,
    stats: &StageTimes,
) -> anyhow::Result<()> {
    let mut epoch = cfg.start_epoch;
    let mut to_skip = cfg.skip_samples;
    let mut index = 0u64;
    loop {
        if cfg.epochs.is_some_and(|n| epoch >= cfg.start_epoch + n) {
            return Ok(());
        }
        let mut reader = EpochReader::new(source, epoch);
        let mut produced = 0u64;
        let mut t = Instant::now();
        while let Some(record) = reader.next_record()? {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            produced += 1;
            if to_skip > 0 {
                to_skip -= 1;
                continue;
            }
            StageTimes::add(&stats.read_ns, t);
            let job = Job {
                index,
                epoch,
                sequence: record.sequence,
                record,
            };
            index += 1;
            if jobs.send(job).is_err() {
                return Ok(());
            }
            t = Instant::now();
        }
        stats
            .skipped_records
            .fetch_add(reader.skipped.len() as u64, Ordering::Relaxed);
        anyhow::ensure!(
            produced > 0 || !reader.skipped.is_empty(),
            "epoch {epoch}: the input files hold no records"
        );
        epoch += 1;
    }
}

struct Worker {
    cfg: Arc<LoaderConfig>,
    labeler: Arc<Labeler>,
    decoder: Arc<dyn ImageDecoder>,
    stats: Arc<StageTimes>,
    decoded: DecodedImage,
    ws: ImageWorkspace,
    targets: Targets,
    boxes: Vec<[f32; 4]>,
    classes: Vec<i32>,
    out_boxes: Vec<[f32; 4]>,
    kept_classes: Vec<i32>,
    keep: Vec<usize>,
}

impl Worker {
    fn new(
        cfg: Arc<LoaderConfig>,
        labeler: Arc<Labeler>,
        decoder: Arc<dyn ImageDecoder>,
        stats: Arc<StageTimes>,
    ) -> Worker {
        let targets = if cfg.decode_only {
            Targets::default()
        } else {
            labeler.new_targets()
        };
        Worker {
            cfg,
            labeler,
            decoder,
            stats,
            decoded: DecodedImage::default(),
            ws: ImageWorkspace::default(),
            targets,
            boxes: Vec::new(),
            classes: Vec::new(),
            out_boxes: Vec::new(),
            kept_classes: Vec::new(),
            keep: Vec::new(),
        }
    }

    /// Writes the job's sample into its batch slot; on `Err` the slot is left for the caller
    /// to turn into a hole.
    fn process(
        &mut self,
        job: &Job,
        slot: &mut SlotMut,
        levels: &[LevelLayout],
    ) -> Result<(), Failure> {
        let skip = |reason: String, source_id| {
            Failure::Skip(SkippedSample {
                file: job.record.file.clone(),
                offset: job.record.offset,
                source_id,
                reason,
            })
        };
        let t = Instant::now();
        let sample = Example::decode_bytes(Bytes::clone(&job.record.payload))
            .map_err(|e| format!("malformed Example: {e}"))
            .and_then(|ex| Sample::from_example(&ex).map_err(|e| e.to_string()))
            .map_err(|reason| skip(reason, None))?;
        let t = StageTimes::add(&self.stats.parse_ns, t);
        let cfg = &self.cfg;
        // Deferred mode: only the header is read when the GPU decoder can take the JPEG.
        let header = if cfg.defer_jpeg_decode {
            jpeg_header::probe(&sample.image)
                .ok()
                .filter(|info| jpeg_header::gpu_unsupported_reason(info).is_none())
        } else {
            None
        };
        let (h, w) = match &header {
            Some(info) => (info.height, info.width),
            None => {
                if let Err(e) = self.decoder.decode_into(&sample.image, &mut self.decoded) {
                    return Err(skip(
                        format!("cannot decode image: {e}"),
                        Some(sample.source_id),
                    ));
                }
                if cfg.defer_jpeg_decode {
                    self.stats
                        .cpu_fallback_images
                        .fetch_add(1, Ordering::Relaxed);
                }
                (self.decoded.height, self.decoded.width)
            }
        };
        let t = StageTimes::add(&self.stats.decode_ns, t);
        let params = match cfg.mode {
            Mode::Train => {
                let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[
                    cfg.seed,
                    job.epoch,
                    job.sequence,
                    cfg.rank as u64,
                ]));
                ScaleParams::train(&mut rng, h, w, &cfg.augment)
            }
            Mode::Eval => ScaleParams::eval(h, w, &cfg.augment),
        };
        if header.is_some() {
            // The GPU stage renders this slot's image.
            self.stats.deferred_images.fetch_add(1, Ordering::Relaxed);
            *slot.encoded = Some(EncodedImage {
                jpeg: Bytes::clone(&sample.image),
                height: h,
                width: w,
                params,
            });
        } else {
            *slot.encoded = None;
            let (img, aug, ws) = (&self.decoded, &cfg.augment, &mut self.ws);
            let rendered = match &mut slot.image {
                SlotImage::F32(out) => render_image(img, &params, aug, ws, out),
                SlotImage::F16(out) => render_image(img, &params, aug, ws, out),
            };
            if let Err(e) = rendered {
                return Err(skip(
                    format!("cannot resize image: {e}"),
                    Some(sample.source_id),
                ));
            }
        }
        *slot.source_id = sample.source_id;
        *slot.image_scale = 1.0 / params.image_scale;
        if cfg.decode_only {
            *slot.num_positives = 0.0;
            slot.put_ground_truth(&[], &[]);
            StageTimes::add(&self.stats.augment_ns, t);
            return Ok(());
        }
        self.boxes.clear();
        self.classes.clear();
        let drop_crowd = cfg.mode == Mode::Train && cfg.augment.skip_crowd_during_training;
        for i in 0..sample.boxes.len() {
            if drop_crowd && sample.is_crowd[i] {
                continue;
            }
            self.boxes.push(sample.boxes[i]);
            self.classes.push(sample.classes[i]);
        }
        transform_boxes(
            &self.boxes,
            &params,
            &cfg.augment,
            &mut self.out_boxes,
            &mut self.keep,
        );
        let t = StageTimes::add(&self.stats.augment_ns, t);
        self.kept_classes.clear();
        self.kept_classes
            .extend(self.keep.iter().map(|&i| self.classes[i]));
        match self
            .labeler
            .label_into(&self.out_boxes, &self.kept_classes, &mut self.targets)
        {
            Ok(()) => {}
            Err(e @ LabelError::ClassOutOfRange { .. }) => {
                return Err(Failure::Fatal(format!(
                    "sample {} from {} at byte offset {}: {e}",
                    sample.source_id,
                    job.record.file.display(),
                    job.record.offset
                )));
            }
            Err(e) => {
                return Err(skip(
                    format!("cannot label anchors: {e}"),
                    Some(sample.source_id),
                ));
            }
        }
        let t = StageTimes::add(&self.stats.label_ns, t);
        slot.put_targets(&self.targets, levels);
        *slot.num_positives = self.targets.num_positives();
        // Ground truth for evaluation: boxes back in original pixels (automl multiplies the
        // clipped boxes by 1 / image_scale).
        let to_original = *slot.image_scale;
        for b in &mut self.out_boxes {
            *b = b.map(|v| v * to_original);
        }
        slot.put_ground_truth(&self.out_boxes, &self.kept_classes);
        StageTimes::add(&self.stats.batch_ns, t);
        Ok(())
    }
}

/// The loader fails when this many records (or a batch's worth, if more) have all been holes.
const UNUSABLE_INPUT_RECORDS: u64 = 100;

/// Hands out batches in order as their slots fill.
struct Assembler {
    cfg: Arc<LoaderConfig>,
    slots: Arc<BatchSlots>,
    recycle_tx: Sender<BatchBuffers>,
    stats: Arc<StageTimes>,
    skipped: Arc<Mutex<Vec<SkippedSample>>>,
}

/// Progress of one batch: slots written, and the position of its first record.
#[derive(Default)]
struct Filling {
    written: usize,
    first: Option<(u64, u64)>,
}

impl Assembler {
    fn run(
        &mut self,
        done: Receiver<Done>,
        batches: Sender<anyhow::Result<Batch>>,
        stop: &AtomicBool,
    ) {
        let bsz = self.cfg.batch_size;
        let mut filling: BTreeMap<u64, Filling> = BTreeMap::new();
        let mut next = 0u64;
        for d in done.iter() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let f = filling.entry(d.index / bsz as u64).or_default();
            f.written += 1;
            if d.index % bsz as u64 == 0 {
                f.first = Some((d.epoch, d.sequence));
            }
            match d.failure {
                None => {
                    self.stats.images.fetch_add(1, Ordering::Relaxed);
                }
                Some(Failure::Fatal(message)) => {
                    let _ = batches.send(Err(anyhow::anyhow!(message)));
                    return;
                }
                Some(Failure::Skip(info)) => {
                    eprintln!(
                        "warning: skipping sample{} from {} at byte offset {}: {}",
                        info.source_id
                            .map(|id| format!(" {id}"))
                            .unwrap_or_default(),
                        info.file.display(),
                        info.offset,
                        info.reason
                    );
                    let holes = self.stats.skipped_images.fetch_add(1, Ordering::Relaxed) + 1;
                    let reason = info.reason.clone();
                    self.skipped.lock().expect("skip log").push(info);
                    // Input where nothing decodes would otherwise train on empty batches forever.
                    if self.stats.images.load(Ordering::Relaxed) == 0
                        && holes >= UNUSABLE_INPUT_RECORDS.max(bsz as u64)
                    {
                        let _ = batches.send(Err(anyhow::anyhow!(
                            "{holes} records failed before any gave a sample; is this image data? (the last: {reason})"
                        )));
                        return;
                    }
                }
            }
            while filling.get(&next).is_some_and(|f| f.written == bsz) {
                let f = filling.remove(&next).expect("full batch");
                let batch = self.close(next, bsz, f.first);
                next += 1;
                if batches.send(Ok(batch)).is_err() {
                    return;
                }
            }
        }
        // End of stream: pad and send a short batch in eval mode (training drops it). Every
        // worker is gone, so nothing else holds the batch.
        if let Some(f) = filling.remove(&next) {
            if self.cfg.mode == Mode::Eval && f.written > 0 && !stop.load(Ordering::Relaxed) {
                if let Some(open) = self.slots.batch(next, stop) {
                    for slot in f.written..bsz {
                        // SAFETY: the workers have exited; this is the only view.
                        unsafe { open.slot(slot) }.make_padding();
                    }
                }
                let batch = self.close(next, f.written, f.first);
                let _ = batches.send(Ok(batch));
            }
        }
    }

    /// Takes batch `number` from the open set as a [`Batch`] of `len` samples.
    fn close(&self, number: u64, len: usize, first: Option<(u64, u64)>) -> Batch {
        let t = Instant::now();
        let (buffers, encoded) = self.slots.close(number);
        let shape = self.slots.shape();
        let (epoch, first_sequence) = first.expect("slot 0 of every handed-out batch is written");
        StageTimes::add(&self.stats.batch_ns, t);
        Batch {
            len,
            batch_size: shape.batch_size,
            epoch,
            first_sequence,
            image_size: (
                self.cfg.augment.image_size.0 as usize,
                self.cfg.augment.image_size.1 as usize,
            ),
            anchors_per_cell: shape.anchors_per_cell,
            levels: shape.levels.clone(),
            buffers: Some(buffers),
            encoded,
            recycle: Some(self.recycle_tx.clone()),
        }
    }
}
