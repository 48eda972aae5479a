//! COCO → TFRecord conversion with the feature layout of google/automl's
//! `dataset/create_coco_tfrecord.py`: same keys, types and values, example `i` in shard
//! `i % num_shards`, in the image order of the image-info file.
//!
//! Work is streamed: a producer hands images to worker threads through a bounded channel,
//! workers build serialized Examples, and the writer puts them back in order, so memory stays
//! bounded by the channel sizes however large the dataset is.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};

use super::{
    group_by_image, load_json, mask, CaptionAnnotation, CaptionsFile, Category, ImageInfo,
    ImageInfoFile, InstancesFile, ObjectAnnotation,
};
use crate::example::{Example, Feature};
use crate::tfrecord::AtomicRecordWriter;

/// Options of one conversion run (automl's flag names in snake case).
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub image_dir: PathBuf,
    pub object_annotations_file: Option<PathBuf>,
    pub caption_annotations_file: Option<PathBuf>,
    pub image_info_file: Option<PathBuf>,
    pub output_file_prefix: String,
    pub num_shards: usize,
    pub include_masks: bool,
    /// Worker threads; 0 = all cores.
    pub num_threads: usize,
}

/// What a run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConvertSummary {
    pub images: u64,
    pub annotations_written: u64,
    pub annotations_skipped: u64,
    pub image_bytes: u64,
    pub output_bytes: u64,
    pub shards: Vec<PathBuf>,
}

/// Index of the annotation files, shared read-only by the workers.
pub struct CocoIndex {
    pub images: Vec<ImageInfo>,
    objects: Option<HashMap<u64, Vec<ObjectAnnotation>>>,
    captions: Option<HashMap<u64, Vec<CaptionAnnotation>>>,
    categories: HashMap<i64, Category>,
}

impl CocoIndex {
    /// Loads the files the way automl does: images from `image_info_file`, else from the
    /// object annotations, else from the captions.
    pub fn load(opts: &ConvertOptions) -> anyhow::Result<CocoIndex> {
        let mut images = None;
        if let Some(p) = &opts.image_info_file {
            images = Some(load_json::<ImageInfoFile>(p)?.images);
        }
        let mut objects = None;
        let mut categories = HashMap::new();
        if let Some(p) = &opts.object_annotations_file {
            let f: InstancesFile = load_json(p)?;
            if images.is_none() {
                images = Some(f.images);
            }
            categories = f.categories.into_iter().map(|c| (c.id, c)).collect();
            objects = Some(group_by_image(f.annotations, |a| a.image_id));
        }
        let mut captions = None;
        if let Some(p) = &opts.caption_annotations_file {
            let f: CaptionsFile = load_json(p)?;
            if images.is_none() {
                images = Some(f.images);
            }
            captions = Some(group_by_image(f.annotations, |a| a.image_id));
        }
        let images = images.ok_or_else(|| {
            anyhow!("all annotation files are missing: give --image_info_file, --object_annotations_file or --caption_annotations_file")
        })?;
        Ok(CocoIndex {
            images,
            objects,
            captions,
            categories,
        })
    }

    pub fn objects(&self, image_id: u64) -> &[ObjectAnnotation] {
        self.objects
            .as_ref()
            .and_then(|m| m.get(&image_id))
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    pub fn captions(&self, image_id: u64) -> &[CaptionAnnotation] {
        self.captions
            .as_ref()
            .and_then(|m| m.get(&image_id))
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }
}

/// One converted image.
pub struct BuiltExample {
    pub serialized: Vec<u8>,
    pub annotations_written: u64,
    pub annotations_skipped: u64,
    pub image_bytes: u64,
}

/// Builds the Example of one image exactly as automl's `create_tf_example`.
pub fn build_example(
    image: &ImageInfo,
    index: &CocoIndex,
    image_dir: &Path,
    include_masks: bool,
) -> anyhow::Result<BuiltExample> {
    let full_path = image_dir.join(&image.file_name);
    let encoded = std::fs::read(&full_path).with_context(|| {
        format!(
            "{}: cannot read image file of image id {} (file_name `{}`)",
            full_path.display(),
            image.id,
            image.file_name
        )
    })?;
    let key = hex::encode(Sha256::digest(&encoded));
    let image_bytes = encoded.len() as u64;
    let (w, h) = (image.width as f64, image.height as f64);

    let mut f: BTreeMap<String, Feature> = BTreeMap::new();
    f.insert(
        "image/height".into(),
        Feature::int64s(vec![image.height as i64]),
    );
    f.insert(
        "image/width".into(),
        Feature::int64s(vec![image.width as i64]),
    );
    f.insert(
        "image/filename".into(),
        Feature::bytes([Bytes::from(image.file_name.clone())]),
    );
    f.insert(
        "image/source_id".into(),
        Feature::bytes([Bytes::from(image.id.to_string())]),
    );
    f.insert(
        "image/key/sha256".into(),
        Feature::bytes([Bytes::from(key)]),
    );
    f.insert(
        "image/encoded".into(),
        Feature::bytes([Bytes::from(encoded)]),
    );
    f.insert(
        "image/format".into(),
        Feature::bytes([Bytes::from_static(b"jpeg")]),
    );

    let objects = index.objects(image.id);
    let mut written = 0u64;
    let mut skipped = 0u64;
    // automl tests the annotation list's truthiness: an image with none gets no object keys.
    if !objects.is_empty() {
        let n = objects.len();
        let (mut xmin, mut xmax, mut ymin, mut ymax) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut is_crowd = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        let mut area = Vec::with_capacity(n);
        let mut masks = Vec::new();
        for (k, ann) in objects.iter().enumerate() {
            let [x, y, bw, bh] = ann.bbox;
            if bw <= 0.0 || bh <= 0.0 || x + bw > w || y + bh > h {
                skipped += 1;
                continue;
            }
            let category = index.categories.get(&ann.category_id).ok_or_else(|| {
                anyhow!(
                    "annotation {} (image id {}, #{k}): category_id {} is not in `categories`",
                    ann.id,
                    image.id,
                    ann.category_id
                )
            })?;
            // Python divides in double precision; the FloatList stores float32.
            xmin.push((x / w) as f32);
            xmax.push(((x + bw) / w) as f32);
            ymin.push((y / h) as f32);
            ymax.push(((y + bh) / h) as f32);
            is_crowd.push(ann.iscrowd);
            labels.push(ann.category_id);
            names.push(Bytes::from(category.name.clone()));
            area.push(ann.area as f32);
            if include_masks {
                let seg = ann.segmentation.as_ref().ok_or_else(|| {
                    anyhow!(
                        "annotation {} (image id {}): --include_masks needs `segmentation`",
                        ann.id,
                        image.id
                    )
                })?;
                let m = mask::rasterize(seg, image.height, image.width).with_context(|| {
                    format!(
                        "annotation {} (image id {}): segmentation",
                        ann.id, image.id
                    )
                })?;
                masks.push(Bytes::from(mask::encode_png(
                    &m,
                    image.height,
                    image.width,
                )?));
            }
            written += 1;
        }
        f.insert("image/object/bbox/xmin".into(), Feature::floats(xmin));
        f.insert("image/object/bbox/xmax".into(), Feature::floats(xmax));
        f.insert("image/object/bbox/ymin".into(), Feature::floats(ymin));
        f.insert("image/object/bbox/ymax".into(), Feature::floats(ymax));
        f.insert("image/object/class/text".into(), Feature::bytes(names));
        f.insert("image/object/class/label".into(), Feature::int64s(labels));
        f.insert("image/object/is_crowd".into(), Feature::int64s(is_crowd));
        f.insert("image/object/area".into(), Feature::floats(area));
        if include_masks {
            f.insert("image/object/mask".into(), Feature::bytes(masks));
        }
    }
    let captions = index.captions(image.id);
    if !captions.is_empty() {
        f.insert(
            "image/caption".into(),
            Feature::bytes(captions.iter().map(|c| Bytes::from(c.caption.clone()))),
        );
    }
    Ok(BuiltExample {
        serialized: Example::from_features(f).encode_to_vec(),
        annotations_written: written,
        annotations_skipped: skipped,
        image_bytes,
    })
}

/// Shard file name automl uses: `PREFIX-00003-of-00032.tfrecord`.
pub fn shard_path(prefix: &str, shard: usize, num_shards: usize) -> PathBuf {
    PathBuf::from(format!("{prefix}-{shard:05}-of-{num_shards:05}.tfrecord"))
}

/// Runs a conversion; `progress(done, total)` is called after each written image.
pub fn convert(
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> anyhow::Result<ConvertSummary> {
    anyhow::ensure!(opts.num_shards > 0, "--num_shards must be at least 1");
    let index = CocoIndex::load(opts)?;
    if let Some(dir) = Path::new(&opts.output_file_prefix).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create output directory", dir.display()))?;
        }
    }
    let shards: Vec<PathBuf> = (0..opts.num_shards)
        .map(|i| shard_path(&opts.output_file_prefix, i, opts.num_shards))
        .collect();
    let mut writers = shards
        .iter()
        .map(|p| {
            AtomicRecordWriter::create(p).with_context(|| format!("{}: cannot create", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let threads = if opts.num_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.num_threads
    };
    let total = index.images.len() as u64;
    let mut summary = ConvertSummary {
        shards: shards.clone(),
        ..Default::default()
    };
    let (job_tx, job_rx) = crossbeam_channel::bounded::<usize>(threads * 4);
    let (res_tx, res_rx) =
        crossbeam_channel::bounded::<(usize, anyhow::Result<BuiltExample>)>(threads * 4);
    let failed = AtomicBool::new(false);

    std::thread::scope(|s| -> anyhow::Result<()> {
        let index = &index;
        let failed = &failed;
        s.spawn(move || {
            for i in 0..index.images.len() {
                if failed.load(Ordering::Relaxed) || job_tx.send(i).is_err() {
                    break;
                }
            }
        });
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let res_tx = res_tx.clone();
            s.spawn(move || {
                for i in job_rx {
                    let built =
                        build_example(&index.images[i], index, &opts.image_dir, opts.include_masks);
                    if res_tx.send((i, built)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(res_tx);
        drop(job_rx);

        // Put results back in image order; the reorder buffer is bounded by the channel sizes.
        let mut pending: BTreeMap<usize, BuiltExample> = BTreeMap::new();
        let mut next = 0usize;
        let result = (|| -> anyhow::Result<()> {
            for (i, built) in res_rx.iter() {
                pending.insert(i, built?);
                while let Some(b) = pending.remove(&next) {
                    let shard = next % opts.num_shards;
                    writers[shard]
                        .write(&b.serialized)
                        .with_context(|| format!("{}: write failed", shards[shard].display()))?;
                    summary.images += 1;
                    summary.annotations_written += b.annotations_written;
                    summary.annotations_skipped += b.annotations_skipped;
                    summary.image_bytes += b.image_bytes;
                    next += 1;
                    progress(next as u64, total);
                }
            }
            Ok(())
        })();
        if result.is_err() {
            failed.store(true, Ordering::Relaxed);
            // Drain so blocked workers can exit.
            for _ in res_rx.iter() {}
        }
        result
    })?;
    anyhow::ensure!(
        summary.images == total,
        "internal error: wrote {} of {total} images",
        summary.images
    );
    for w in writers.drain(..) {
        summary.output_bytes += w.bytes();
        w.finish().context("cannot finish shard")?;
    }
    Ok(summary)
}
