//! Batches that workers fill in place. Record `i` of a run (counting from its first job) goes
//! to slot `i % B` of batch `i / B`, so a worker knows where its sample lands before it
//! starts, renders the image straight into the batch's image tensor and copies its targets
//! into the batch's level-major arrays. Nothing is copied again on the way out: the loader's
//! assembler only waits for a batch's `B` slots and hands the buffers over.
//!
//! Safety rests on one rule, which the loader keeps by construction: each slot of an open
//! batch is written by exactly one worker (record indices are unique), and the buffers are
//! only touched again once every worker has dropped its handle on the batch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::Receiver;
use half::f16;

use crate::labeler::Targets;
use crate::loader::{BatchBuffers, EncodedImage, ImageData, LevelLayout, StageTimes};

/// The geometry of every batch in a run.
#[derive(Debug, Clone)]
pub(crate) struct BatchShape {
    pub batch_size: usize,
    /// Elements of one image, `3 · H · W`.
    pub image_len: usize,
    /// Anchors of one image (0 when the run makes no targets).
    pub num_anchors: usize,
    pub anchors_per_cell: usize,
    pub levels: Vec<LevelLayout>,
    pub max_instances: usize,
    pub f16_images: bool,
}

impl BatchShape {
    /// Buffers for one batch, with every slot in its empty state.
    pub fn fresh_buffers(&self) -> BatchBuffers {
        let b = self.batch_size;
        let images = if self.f16_images {
            ImageData::F16(vec![f16::ZERO; b * self.image_len])
        } else {
            ImageData::F32(vec![0.0; b * self.image_len])
        };
        BatchBuffers {
            images,
            cls_targets: vec![-1; b * self.num_anchors],
            box_targets: vec![0.0; b * self.num_anchors * 4],
            num_positives: vec![0.0; b],
            source_ids: vec![-1; b],
            image_scales: vec![0.0; b],
            gt_boxes: vec![-1.0; b * self.max_instances * 4],
            gt_classes: vec![-1.0; b * self.max_instances],
        }
    }
}

/// One batch being filled.
pub(crate) struct OpenBatch {
    /// Not touched while the batch is open: workers write through `raw`.
    buffers: BatchBuffers,
    encoded: Vec<Option<EncodedImage>>,
    raw: RawParts,
    shape: Arc<BatchShape>,
}

/// Pointers to the storage of each buffer, taken once while the batch was exclusively owned.
struct RawParts {
    image_f32: *mut f32,
    image_f16: *mut f16,
    cls: *mut i32,
    boxes: *mut f32,
    num_positives: *mut f32,
    source_ids: *mut i64,
    image_scales: *mut f32,
    gt_boxes: *mut f32,
    gt_classes: *mut f32,
    encoded: *mut Option<EncodedImage>,
}

// SAFETY: workers reach the storage only through `slot`, whose contract makes the regions they
// write disjoint; the Vecs themselves are neither read nor resized until `into_parts`, which
// needs sole ownership (`Arc::try_unwrap`).
unsafe impl Sync for OpenBatch {}
unsafe impl Send for OpenBatch {}

/// The image region of one slot.
pub(crate) enum SlotImage<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

/// Mutable views of everything one sample owns in its batch.
pub(crate) struct SlotMut<'a> {
    pub image: SlotImage<'a>,
    /// Per level, this sample's `[H, W, A]` class targets.
    pub cls: Vec<&'a mut [i32]>,
    /// Per level, this sample's `[H, W, 4A]` box targets.
    pub boxes: Vec<&'a mut [f32]>,
    pub num_positives: &'a mut f32,
    pub source_id: &'a mut i64,
    pub image_scale: &'a mut f32,
    pub gt_boxes: &'a mut [f32],
    pub gt_classes: &'a mut [f32],
    pub encoded: &'a mut Option<EncodedImage>,
}

impl SlotMut<'_> {
    /// Copies one image's targets (level-major over its anchors) into the slot. (Filling the
    /// slot with background and scattering the few positives instead measured no faster: the
    /// dense arrays are still in cache when they are copied.)
    pub fn put_targets(&mut self, t: &Targets, levels: &[LevelLayout]) {
        let (cls, boxes) = (t.cls(), t.boxes());
        for ((lv, dst_cls), dst_boxes) in levels.iter().zip(&mut self.cls).zip(&mut self.boxes) {
            let from = lv.anchor_offset;
            dst_cls.copy_from_slice(&cls[from..from + dst_cls.len()]);
            dst_boxes.copy_from_slice(&boxes[from * 4..from * 4 + dst_boxes.len()]);
        }
    }

    /// Ground truth rows (padded with −1 up to the slot's capacity).
    pub fn put_ground_truth(&mut self, boxes: &[[f32; 4]], classes: &[i32]) {
        self.gt_boxes.fill(-1.0);
        self.gt_classes.fill(-1.0);
        let rows = self.gt_classes.len();
        for (i, (b, &c)) in boxes.iter().zip(classes).take(rows).enumerate() {
            self.gt_boxes[i * 4..i * 4 + 4].copy_from_slice(b);
            self.gt_classes[i] = c as f32;
        }
    }

    /// The state of a slot whose record produced no sample: zero pixels, every anchor ignored
    /// (−2), no positives and no ground truth, so it adds nothing to a loss or an evaluation.
    pub fn make_hole(&mut self) {
        match &mut self.image {
            SlotImage::F32(v) => v.fill(0.0),
            SlotImage::F16(v) => v.fill(f16::ZERO),
        }
        self.cls.iter_mut().for_each(|c| c.fill(-2));
        self.boxes.iter_mut().for_each(|b| b.fill(0.0));
        *self.num_positives = 0.0;
        *self.source_id = -1;
        *self.image_scale = 1.0;
        self.gt_boxes.fill(-1.0);
        self.gt_classes.fill(-1.0);
        *self.encoded = None;
    }

    /// The state of a slot past the end of a short last batch (as automl pads it): zero
    /// pixels, background everywhere, no ground truth.
    pub fn make_padding(&mut self) {
        self.make_hole();
        self.cls.iter_mut().for_each(|c| c.fill(-1));
    }
}

impl OpenBatch {
    fn new(mut buffers: BatchBuffers, shape: Arc<BatchShape>) -> OpenBatch {
        let mut encoded = vec![None; shape.batch_size];
        let (image_f32, image_f16) = match &mut buffers.images {
            ImageData::F32(v) => (v.as_mut_ptr(), std::ptr::null_mut()),
            ImageData::F16(v) => (std::ptr::null_mut(), v.as_mut_ptr()),
        };
        let raw = RawParts {
            image_f32,
            image_f16,
            cls: buffers.cls_targets.as_mut_ptr(),
            boxes: buffers.box_targets.as_mut_ptr(),
            num_positives: buffers.num_positives.as_mut_ptr(),
            source_ids: buffers.source_ids.as_mut_ptr(),
            image_scales: buffers.image_scales.as_mut_ptr(),
            gt_boxes: buffers.gt_boxes.as_mut_ptr(),
            gt_classes: buffers.gt_classes.as_mut_ptr(),
            encoded: encoded.as_mut_ptr(),
        };
        check_sizes(&buffers, &shape);
        OpenBatch {
            buffers,
            encoded,
            raw,
            shape,
        }
    }

    /// The regions of slot `slot`.
    ///
    /// # Safety
    /// No other `SlotMut` of the same slot may be alive.
    pub unsafe fn slot(&self, slot: usize) -> SlotMut<'_> {
        let s = &*self.shape;
        assert!(slot < s.batch_size, "slot {slot} out of range");
        let r = &self.raw;
        // SAFETY (all `part` calls): every range lies inside its buffer (`check_sizes` at
        // open), and the slot contract makes it this view's alone.
        unsafe fn part<'a, T>(base: *mut T, start: usize, len: usize) -> &'a mut [T] {
            std::slice::from_raw_parts_mut(base.add(start), len)
        }
        let image = if r.image_f32.is_null() {
            SlotImage::F16(part(r.image_f16, slot * s.image_len, s.image_len))
        } else {
            SlotImage::F32(part(r.image_f32, slot * s.image_len, s.image_len))
        };
        let (mut cls, mut boxes) = (Vec::new(), Vec::new());
        if s.num_anchors > 0 {
            for lv in &s.levels {
                let n = lv.height * lv.width * s.anchors_per_cell;
                let from = lv.anchor_offset * s.batch_size + slot * n;
                cls.push(part(r.cls, from, n));
                boxes.push(part(r.boxes, from * 4, n * 4));
            }
        }
        let m = s.max_instances;
        SlotMut {
            image,
            cls,
            boxes,
            num_positives: &mut *r.num_positives.add(slot),
            source_id: &mut *r.source_ids.add(slot),
            image_scale: &mut *r.image_scales.add(slot),
            gt_boxes: part(r.gt_boxes, slot * m * 4, m * 4),
            gt_classes: part(r.gt_classes, slot * m, m),
            encoded: &mut *r.encoded.add(slot),
        }
    }

    /// The filled buffers, once every worker has let go of the batch.
    fn into_parts(self) -> (BatchBuffers, Vec<Option<EncodedImage>>) {
        (self.buffers, self.encoded)
    }
}

/// The buffers hold exactly what the shape says (the slot views rely on it).
fn check_sizes(b: &BatchBuffers, s: &BatchShape) {
    let n = s.batch_size;
    let image_ok = match &b.images {
        ImageData::F32(v) => !s.f16_images && v.len() == n * s.image_len,
        ImageData::F16(v) => s.f16_images && v.len() == n * s.image_len,
    };
    assert!(
        image_ok
            && b.cls_targets.len() == n * s.num_anchors
            && b.box_targets.len() == n * s.num_anchors * 4
            && b.num_positives.len() == n
            && b.source_ids.len() == n
            && b.image_scales.len() == n
            && b.gt_boxes.len() == n * s.max_instances * 4
            && b.gt_classes.len() == n * s.max_instances,
        "batch buffers do not match the batch shape"
    );
    if let Some(last) = s.levels.last() {
        let per_image = last.anchor_offset + last.height * last.width * s.anchors_per_cell;
        assert!(
            s.num_anchors == 0 || s.num_anchors == per_image,
            "level layout does not cover the anchors"
        );
    }
}

struct OpenState {
    open: BTreeMap<u64, Arc<OpenBatch>>,
    /// Batches below this number have been handed out.
    next_out: u64,
}

/// The open batches of a run, shared by the workers and the assembler.
pub(crate) struct BatchSlots {
    shape: Arc<BatchShape>,
    state: Mutex<OpenState>,
    moved_on: Condvar,
    /// Batches that may be open at once (bounds memory when the consumer is slow).
    max_open: u64,
    recycled: Receiver<BatchBuffers>,
    stats: Arc<StageTimes>,
    /// Set when the assembler has stopped: no batch will be handed out again.
    shut: AtomicBool,
}

impl BatchSlots {
    pub fn new(
        shape: BatchShape,
        max_open: usize,
        recycled: Receiver<BatchBuffers>,
        stats: Arc<StageTimes>,
    ) -> Self {
        BatchSlots {
            shape: Arc::new(shape),
            state: Mutex::new(OpenState {
                open: BTreeMap::new(),
                next_out: 0,
            }),
            moved_on: Condvar::new(),
            max_open: max_open.max(1) as u64,
            recycled,
            stats,
            shut: AtomicBool::new(false),
        }
    }

    pub fn shape(&self) -> &BatchShape {
        &self.shape
    }

    /// Batch `number`, opened on first use; waits while it lies `max_open` or more batches
    /// ahead of the next one to be handed out. `None` when `stop` is raised while waiting or
    /// the assembler has shut the slots.
    pub fn batch(&self, number: u64, stop: &AtomicBool) -> Option<Arc<OpenBatch>> {
        let mut st = self.state.lock().expect("batch slots lock");
        while number >= st.next_out + self.max_open {
            if stop.load(Ordering::Relaxed) || self.shut.load(Ordering::Relaxed) {
                return None;
            }
            st = self
                .moved_on
                .wait_timeout(st, Duration::from_millis(50))
                .expect("batch slots lock")
                .0;
        }
        let batch = st.open.entry(number).or_insert_with(|| self.open_batch());
        Some(batch.clone())
    }

    /// Releases every worker waiting for a batch: the assembler has stopped handing them out.
    pub fn shut(&self) {
        self.shut.store(true, Ordering::Relaxed);
        let _guard = self.state.lock().expect("batch slots lock");
        self.moved_on.notify_all();
    }

    /// A new open batch on pooled buffers, or fresh ones when the pool is empty.
    fn open_batch(&self) -> Arc<OpenBatch> {
        let buffers = self.recycled.try_recv().unwrap_or_else(|_| {
            self.stats.buffer_sets.fetch_add(1, Ordering::Relaxed);
            self.shape.fresh_buffers()
        });
        Arc::new(OpenBatch::new(buffers, self.shape.clone()))
    }

    /// Closes batch `number`, whose slots are all written and whose workers have all dropped
    /// their handles, and returns its buffers. Opens it first if no worker did (a short batch
    /// whose slots the caller pads).
    pub fn close(&self, number: u64) -> (BatchBuffers, Vec<Option<EncodedImage>>) {
        let mut st = self.state.lock().expect("batch slots lock");
        let batch = st.open.remove(&number).unwrap_or_else(|| self.open_batch());
        st.next_out = st.next_out.max(number + 1);
        drop(st);
        self.moved_on.notify_all();
        let batch = Arc::try_unwrap(batch)
            .unwrap_or_else(|_| panic!("batch {number} closed while a worker still holds it"));
        batch.into_parts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anchors::{AnchorConfig, Anchors};
    use crate::labeler::Labeler;
    use crate::loader::level_layouts;

    fn garbage_buffers(shape: &BatchShape) -> BatchBuffers {
        let mut b = shape.fresh_buffers();
        b.cls_targets.iter_mut().for_each(|c| *c = 7);
        b.box_targets.iter_mut().for_each(|v| *v = 3.5);
        b
    }

    /// A sample's targets land level by level in its own slot, whatever a recycled buffer held
    /// before, and nowhere else.
    #[test]
    fn targets_land_in_their_slot_as_the_dense_arrays() {
        let labeler = Labeler::new(Anchors::new(&AnchorConfig::efficientdet(128, 128)).unwrap());
        let levels = level_layouts(&labeler);
        let shape = Arc::new(BatchShape {
            batch_size: 3,
            image_len: 3 * 128 * 128,
            num_anchors: labeler.anchors().num_anchors(),
            anchors_per_cell: labeler.anchors().per_location(),
            levels: levels.clone(),
            max_instances: 4,
            f16_images: false,
        });
        let mut t = labeler.new_targets();
        // Boxes of every size, so positives fall on several levels (the largest on level 7).
        let boxes = [
            [4.0, 4.0, 20.0, 16.0],
            [30.0, 40.0, 90.0, 100.0],
            [0.0, 0.0, 127.0, 127.0],
            [60.0, 10.0, 70.0, 30.0],
        ];
        labeler.label_into(&boxes, &[1, 5, 9, 2], &mut t).unwrap();
        let batch = OpenBatch::new(garbage_buffers(&shape), shape.clone());
        // SAFETY: the only view.
        unsafe { batch.slot(1) }.put_targets(&t, &levels);
        let (b, _) = batch.into_parts();
        let mut levels_with_positives = 0;
        for (info, lv) in labeler.anchors().levels().iter().zip(&levels) {
            let n = lv.height * lv.width * shape.anchors_per_cell;
            let at = lv.anchor_offset * shape.batch_size;
            assert_eq!(&b.cls_targets[at + n..at + 2 * n], t.level_cls(info));
            assert_eq!(
                &b.box_targets[4 * (at + n)..4 * (at + 2 * n)],
                t.level_boxes(info)
            );
            assert!(b.cls_targets[at..at + n].iter().all(|&c| c == 7));
            assert!(b.cls_targets[at + 2 * n..at + 3 * n]
                .iter()
                .all(|&c| c == 7));
            levels_with_positives += t.level_cls(info).iter().any(|&c| c >= 0) as usize;
        }
        assert!(levels_with_positives >= 3, "{levels_with_positives}");
    }
}
