//! `effdet dump-batch`: writes the first batch of the pipeline (file order, no shuffling) as
//! safetensors, for cross-checking against automl's InputReader.

use std::path::{Path, PathBuf};

use effdet_pipeline::augment::Mode;

use effdet_pipeline::loader::ImageData;
use safetensors::tensor::{Dtype, TensorView};

use super::data::{start_loader, DataArgs, LabelSpec, ModeArg};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, value_enum, default_value_t = ModeArg::Eval)]
    mode: ModeArg,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of_val(v));
    for x in v {
        // SAFETY: T is a plain numeric type; we copy its bytes (little-endian host).
        let b = unsafe {
            std::slice::from_raw_parts(x as *const T as *const u8, std::mem::size_of::<T>())
        };
        out.extend_from_slice(b);
    }
    out
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    dump(&a.data, a.mode.into(), a.batch_size, &a.out)?;
    Ok(0)
}

/// Writes the first `batch_size` examples of `data` (file order) to `out`.
pub fn dump(data: &DataArgs, mode: Mode, batch_size: usize, out: &Path) -> anyhow::Result<()> {
    let files = data.files()?;
    let mut cfg = data.loader_config(mode, batch_size);
    // The first B examples in file order, whatever the mode.
    cfg.shuffle_buffer = 0;
    cfg.cycle_length = 1;
    let mut loader = start_loader(cfg, files, &LabelSpec::default_anchors(data.image_size()))?;
    let batch = loader
        .next_batch()
        .ok_or_else(|| anyhow::anyhow!("no batch: the input holds no usable example"))??;
    let b = batch.batch_size;
    let (h, w) = batch.image_size;
    let bufs = batch.buffers();
    let a_per = batch.anchors_per_cell;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    match &bufs.images {
        ImageData::F32(v) => {
            tensors.push(("images".into(), Dtype::F32, vec![b, 3, h, w], bytes_of(v)))
        }
        ImageData::F16(v) => {
            tensors.push(("images".into(), Dtype::F16, vec![b, 3, h, w], bytes_of(v)))
        }
    }
    for (l, lv) in batch.levels.iter().enumerate() {
        let level = l + 3;
        tensors.push((
            format!("cls_targets_{level}"),
            Dtype::I32,
            vec![b, lv.height, lv.width, a_per],
            bytes_of(batch.cls_targets(l)),
        ));
        tensors.push((
            format!("box_targets_{level}"),
            Dtype::F32,
            vec![b, lv.height, lv.width, a_per * 4],
            bytes_of(batch.box_targets(l)),
        ));
    }
    let max = bufs.gt_classes.len() / b;
    tensors.push((
        "num_positives".into(),
        Dtype::F32,
        vec![b],
        bytes_of(&bufs.num_positives),
    ));
    tensors.push((
        "source_ids".into(),
        Dtype::I64,
        vec![b],
        bytes_of(&bufs.source_ids),
    ));
    tensors.push((
        "image_scales".into(),
        Dtype::F32,
        vec![b],
        bytes_of(&bufs.image_scales),
    ));
    tensors.push((
        "gt_boxes".into(),
        Dtype::F32,
        vec![b, max, 4],
        bytes_of(&bufs.gt_boxes),
    ));
    tensors.push((
        "gt_classes".into(),
        Dtype::F32,
        vec![b, max],
        bytes_of(&bufs.gt_classes),
    ));
    let views = tensors
        .iter()
        .map(|(name, dt, shape, data)| {
            Ok((name.clone(), TensorView::new(*dt, shape.clone(), data)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("layout".to_string(), "images NCHW; targets [B,H,W,9] / [B,H,W,36], anchors octave-major then aspect (1,2,0.5); boxes ymin,xmin,ymax,xmax".to_string());
    meta.insert("samples".to_string(), batch.len.to_string());
    let data = safetensors::serialize(views, Some(meta))?;
    let tmp = out.with_extension("safetensors.tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, out)?;
    eprintln!("wrote {} samples to {}", batch.len, out.display());
    Ok(())
}
