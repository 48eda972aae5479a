//! The CUDA input feed (feature `cuda`): batches reach the GPU through pinned host buffers on
//! a copy stream of their own, so the copy of batch n+1 overlaps the training step on batch n;
//! with `gpu_decode` the loader leaves JPEGs encoded and the nvJPEG stage (feature `nvjpeg`)
//! decodes and renders them on that stream.
//!
//! Ownership instead of cudarc's automatic cross-stream events: every device allocation would
//! otherwise carry two events and every kernel argument a wait and a record once a second
//! stream exists (tens of thousands per step). A fixed ring of [`Slot`]s (device buffers,
//! pinned staging, events) moves between the feeder thread and the consumer:
//!
//! ```text
//! feeder:   slot back from consumer → copy stream waits for its `consumed` event (GPU side),
//!           host waits for its previous `uploaded` event (pinned buffers and JPEG bytes free)
//!           → stage pinned → async copies / nvJPEG + render on the copy stream → record `uploaded`
//! consumer: host waits for `uploaded` (counted as data wait) → main stream copies the slot into
//!           fresh tensors (device to device, ~0.1 ms) → record `consumed` → slot back to feeder
//! ```
//!
//! The tensors handed to the model are ordinary allocations of the main stream, so candle's
//! memory handling is unchanged. "Main stream" is candle's: the per-thread default stream of
//! the thread that runs the model, which is why the consumer side (`next_batch`) must run on
//! that thread.

use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Storage, Tensor};
use effdet_pipeline::loader::{Batch, ImageData, Loader};
use half::f16;

use super::step::{BatchTensors, FedBatch};

/// Settings of the CUDA feed.
#[derive(Debug, Clone)]
pub struct CudaFeedOptions {
    /// Batches uploaded ahead of the consumer.
    pub depth: usize,
    /// Decode the loader's deferred JPEGs with nvJPEG (the loader must run with
    /// `defer_jpeg_decode`).
    pub gpu_decode: bool,
}

/// Turns off cudarc's per-allocation event pairs and per-launch cross-stream waits: candle
/// works on one stream and the feed synchronizes its copy stream by hand. Call before the
/// first allocation.
pub fn disable_event_tracking(dev: &CudaDevice) {
    // SAFETY: all of candle's work is on one stream; the only other stream is the feed's,
    // whose buffers are handed over with explicit events (see the module docs).
    unsafe { dev.cuda_stream().context().disable_event_tracking() };
}

/// A device buffer with its pinned host twin.
struct Staged<T: DeviceRepr> {
    device: CudaSlice<T>,
    pinned: PinnedHostSlice<T>,
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy> Staged<T> {
    fn new(stream: &Arc<CudaStream>, len: usize) -> anyhow::Result<Staged<T>> {
        Ok(Staged {
            device: stream.alloc_zeros::<T>(len)?,
            // SAFETY: fully written before each upload.
            pinned: unsafe { stream.context().alloc_pinned::<T>(len) }?,
        })
    }

    /// Copies `host` into the pinned buffer and queues its upload. The previous upload from
    /// the pinned buffer must have finished (the caller waited for `uploaded`).
    fn upload(&mut self, stream: &Arc<CudaStream>, host: &[T]) -> anyhow::Result<()> {
        anyhow::ensure!(
            host.len() == self.device.len(),
            "staged buffer size mismatch"
        );
        self.pinned.as_mut_slice()?.copy_from_slice(host);
        stream.memcpy_htod(&self.pinned, &mut self.device)?;
        Ok(())
    }
}

enum SlotImages {
    F32(Staged<f32>),
    F16(Staged<f16>),
    /// Written on the device by the nvJPEG stage.
    Rendered(CudaSlice<f32>),
}

/// One ring entry: a batch's device buffers, their pinned staging and the handover events.
struct Slot {
    images: SlotImages,
    cls: Staged<i32>,
    boxes: Staged<f32>,
    num_positives: Staged<f32>,
    uploaded: Option<Arc<CudaEvent>>,
    consumed: Option<CudaEvent>,
    /// The batch whose JPEGs the stage may still be reading, kept until `uploaded`.
    batch: Option<Batch>,
}

impl Slot {
    fn new(stream: &Arc<CudaStream>, b: &Batch, gpu_decode: bool) -> anyhow::Result<Slot> {
        let n = b.buffers().images.len();
        let images = match (&b.buffers().images, gpu_decode) {
            (_, true) => SlotImages::Rendered(stream.alloc_zeros::<f32>(n)?),
            (ImageData::F32(_), false) => SlotImages::F32(Staged::new(stream, n)?),
            (ImageData::F16(_), false) => SlotImages::F16(Staged::new(stream, n)?),
        };
        let bufs = b.buffers();
        Ok(Slot {
            images,
            cls: Staged::new(stream, bufs.cls_targets.len())?,
            boxes: Staged::new(stream, bufs.box_targets.len())?,
            num_positives: Staged::new(stream, bufs.num_positives.len())?,
            uploaded: None,
            consumed: None,
            batch: None,
        })
    }
}

/// What the feeder thread sends: a filled slot and the batch's metadata.
struct Filled {
    slot: Slot,
    epoch: u64,
    first_sequence: u64,
    len: usize,
    batch_size: usize,
    image_size: (usize, usize),
    anchors_per_cell: usize,
    levels: Vec<(usize, usize, usize)>,
}

/// The consumer's end of the CUDA feed.
pub struct CudaFeeder {
    rx: Receiver<anyhow::Result<Filled>>,
    free: Sender<Slot>,
    /// Joined on drop, after both channels are closed (see `Drop`).
    thread: Option<std::thread::JoinHandle<()>>,
    dev: CudaDevice,
    /// nvJPEG stage counters, when the stage runs (updated by the feeder thread).
    #[cfg(feature = "nvjpeg")]
    pub stage_counts: Arc<std::sync::Mutex<effdet_pipeline::nvjpeg::stage::StageCounts>>,
}

impl Drop for CudaFeeder {
    /// Closes both channels (the thread stops at its next send or slot request) and waits for
    /// the thread, so its pinned buffers, stream and device memory are released before the
    /// process tears CUDA down.
    fn drop(&mut self) {
        let (_, closed_rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, closed_rx));
        let (closed_tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.free, closed_tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl CudaFeeder {
    pub fn start(loader: Loader, dev: CudaDevice, opts: CudaFeedOptions) -> anyhow::Result<Self> {
        #[cfg(not(feature = "nvjpeg"))]
        anyhow::ensure!(
            !opts.gpu_decode,
            "GPU decoding needs a binary built with --features nvjpeg (tools/device/build.sh)"
        );
        let copy = dev.cuda_stream().context().new_stream()?;
        let depth = opts.depth.max(1);
        let (tx, rx) = sync_channel(depth);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Slot>();
        #[cfg(feature = "nvjpeg")]
        let stage_counts = Arc::new(std::sync::Mutex::new(Default::default()));
        #[cfg(feature = "nvjpeg")]
        let counts = stage_counts.clone();
        let thread = std::thread::spawn(move || {
            let mut feeder = FeederThread {
                copy,
                slots_made: 0,
                ring: depth + 2,
                gpu_decode: opts.gpu_decode,
                #[cfg(feature = "nvjpeg")]
                stage: None,
                #[cfg(feature = "nvjpeg")]
                counts,
            };
            feeder.run(loader, &tx, &free_rx);
        });
        Ok(CudaFeeder {
            rx,
            free: free_tx,
            thread: Some(thread),
            dev,
            #[cfg(feature = "nvjpeg")]
            stage_counts,
        })
    }

    /// The next batch as fresh tensors of the main stream; None when the loader has ended.
    pub fn next_batch(&self) -> Option<anyhow::Result<FedBatch>> {
        let filled = match self.rx.recv().ok()? {
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        Some(self.take(filled))
    }

    fn take(&self, mut f: Filled) -> anyhow::Result<FedBatch> {
        let main = self.dev.cuda_stream();
        let uploaded = f
            .slot
            .uploaded
            .clone()
            .expect("filled slot has an upload event");
        // Host wait: this is the data wait a step sees.
        uploaded.synchronize()?;
        main.wait(&uploaded)?;
        let (h, w) = f.image_size;
        let bs = f.batch_size;
        let shape = (bs, 3, h, w);
        let images = match &f.slot.images {
            SlotImages::F32(s) => self.copy_out(&s.device, shape)?,
            SlotImages::Rendered(d) => self.copy_out(d, shape)?,
            SlotImages::F16(s) => self.copy_out(&s.device, shape)?.to_dtype(DType::F32)?,
        };
        let cls_all = self.copy_out(&f.slot.cls.device, f.slot.cls.device.len())?;
        let box_all = self.copy_out(&f.slot.boxes.device, f.slot.boxes.device.len())?;
        let num_positives = self.copy_out(&f.slot.num_positives.device, bs)?;
        f.slot.consumed = Some(main.record_event(None)?);
        if let Err(std::sync::mpsc::SendError(slot)) = self.free.send(f.slot) {
            // The feeder has stopped: the slot's buffers are freed here, on the copy stream, so
            // the main stream must be past its copies out of them first.
            if let Some(consumed) = &slot.consumed {
                consumed.synchronize()?;
            }
        }
        let a = f.anchors_per_cell;
        let (mut cls, mut boxes) = (Vec::new(), Vec::new());
        for &(lh, lw, offset) in &f.levels {
            let n = bs * lh * lw * a;
            cls.push(
                cls_all
                    .narrow(0, offset * bs, n)?
                    .reshape((bs, lh, lw, a))?,
            );
            boxes.push(
                box_all
                    .narrow(0, offset * bs * 4, n * 4)?
                    .reshape((bs, lh, lw, 4 * a))?,
            );
        }
        Ok(FedBatch {
            tensors: BatchTensors {
                images,
                cls,
                boxes,
                num_positives,
            },
            epoch: f.epoch,
            first_sequence: f.first_sequence,
            len: f.len,
        })
    }

    /// A main-stream copy of `src` as a tensor of `shape`.
    fn copy_out<T: CudaDType + DeviceRepr, S: Into<candle_core::Shape>>(
        &self,
        src: &CudaSlice<T>,
        shape: S,
    ) -> anyhow::Result<Tensor> {
        let main = self.dev.cuda_stream();
        // SAFETY: fully written by the copy below.
        let mut dst = unsafe { main.alloc::<T>(src.len()) }?;
        main.memcpy_dtod(src, &mut dst)?;
        let storage = CudaStorage::wrap_cuda_slice(dst, self.dev.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

struct FeederThread {
    copy: Arc<CudaStream>,
    slots_made: usize,
    ring: usize,
    gpu_decode: bool,
    #[cfg(feature = "nvjpeg")]
    stage: Option<effdet_pipeline::nvjpeg::stage::NvjpegStage>,
    #[cfg(feature = "nvjpeg")]
    counts: Arc<std::sync::Mutex<effdet_pipeline::nvjpeg::stage::StageCounts>>,
}

impl FeederThread {
    fn run(
        &mut self,
        mut loader: Loader,
        tx: &SyncSender<anyhow::Result<Filled>>,
        free: &Receiver<Slot>,
    ) {
        while let Some(b) = loader.next_batch() {
            let item = b.and_then(|b| self.fill(b, free));
            let item = match item {
                Ok(Some(f)) => Ok(f),
                Ok(None) => return, // the consumer has gone
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                break;
            }
        }
        // Slots still out are freed by the consumer; the ones handed back are freed here, after
        // the main stream's copies out of them and this stream's work on them are done.
        while let Ok(slot) = free.try_recv() {
            if let Some(consumed) = &slot.consumed {
                let _ = consumed.synchronize();
            }
        }
        let _ = self.copy.synchronize();
    }

    /// A free slot: a new one while the ring is not full, else the next one handed back.
    fn slot(&mut self, b: &Batch, free: &Receiver<Slot>) -> anyhow::Result<Option<Slot>> {
        if self.slots_made < self.ring {
            self.slots_made += 1;
            return Ok(Some(Slot::new(&self.copy, b, self.gpu_decode)?));
        }
        let Ok(mut slot) = free.recv() else {
            return Ok(None);
        };
        if let Some(consumed) = slot.consumed.take() {
            // Device buffers: the main stream's copies out of them come first.
            self.copy.wait(&consumed)?;
        }
        if let Some(uploaded) = slot.uploaded.take() {
            // Pinned buffers and the old batch's JPEG bytes: the copy stream is past them.
            uploaded.synchronize()?;
        }
        slot.batch = None;
        Ok(Some(slot))
    }

    fn fill(&mut self, mut b: Batch, free: &Receiver<Slot>) -> anyhow::Result<Option<Filled>> {
        let Some(mut slot) = self.slot(&b, free)? else {
            return Ok(None);
        };
        let copy = self.copy.clone();
        // Images first: a sample the GPU cannot produce changes its targets.
        match &mut slot.images {
            SlotImages::Rendered(out) => self.render(&mut b, out)?,
            SlotImages::F32(s) => match &b.buffers().images {
                ImageData::F32(v) => s.upload(&copy, v)?,
                ImageData::F16(_) => anyhow::bail!("batch image dtype changed mid-run"),
            },
            SlotImages::F16(s) => match &b.buffers().images {
                ImageData::F16(v) => s.upload(&copy, v)?,
                ImageData::F32(_) => anyhow::bail!("batch image dtype changed mid-run"),
            },
        }
        let bufs = b.buffers();
        slot.cls.upload(&copy, &bufs.cls_targets)?;
        slot.boxes.upload(&copy, &bufs.box_targets)?;
        slot.num_positives.upload(&copy, &bufs.num_positives)?;
        slot.uploaded = Some(Arc::new(copy.record_event(None)?));
        let filled = Filled {
            epoch: b.epoch,
            first_sequence: b.first_sequence,
            len: b.len,
            batch_size: b.batch_size,
            image_size: b.image_size,
            anchors_per_cell: b.anchors_per_cell,
            levels: b
                .levels
                .iter()
                .map(|l| (l.height, l.width, l.anchor_offset))
                .collect(),
            slot,
        };
        let mut filled = filled;
        if self.gpu_decode {
            // nvJPEG may still read the JPEG bytes until `uploaded`.
            filled.slot.batch = Some(b);
        }
        Ok(Some(filled))
    }

    #[cfg(feature = "nvjpeg")]
    fn render(&mut self, b: &mut Batch, out: &mut CudaSlice<f32>) -> anyhow::Result<()> {
        use effdet_pipeline::augment::AugmentConfig;
        use effdet_pipeline::nvjpeg::stage::NvjpegStage;
        if self.stage.is_none() {
            let (h, w) = b.image_size;
            let cfg = AugmentConfig {
                image_size: (h as u32, w as u32),
                ..AugmentConfig::d0(h as u32)
            };
            let stage = NvjpegStage::new(self.copy.clone(), cfg)?;
            if let Some(why) = &stage.hardware_unavailable {
                eprintln!(
                    "note: nvJPEG hardware decoder unavailable ({why}); using its CUDA backend"
                );
            }
            self.stage = Some(stage);
        }
        let stage = self.stage.as_mut().expect("stage");
        stage.produce(b, out)?;
        *self.counts.lock().expect("stage counts") = stage.counts;
        Ok(())
    }

    #[cfg(not(feature = "nvjpeg"))]
    fn render(&mut self, _b: &mut Batch, _out: &mut CudaSlice<f32>) -> anyhow::Result<()> {
        anyhow::bail!("GPU decoding needs a binary built with --features nvjpeg")
    }
}
