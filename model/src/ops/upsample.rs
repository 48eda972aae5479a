//! Nearest-neighbour resize of NHWC tensors with TensorFlow `resize_nearest_neighbor` semantics
//! (no corner alignment, no half-pixel centres: source index = floor(dst · in / out)). The exact
//! 2× case is a broadcast + reshape; other sizes gather rows and columns with `index_select`.
//! Both have accumulating gradients, unlike candle's `upsample_nearest2d` backward.

use candle_core::{Result, Tensor};

/// Resizes `x` `[B, H, W, C]` to `[B, out_h, out_w, C]` by nearest-neighbour sampling.
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let Some(tape) = crate::tape::active() else {
        return resize(x, out_h, out_w);
    };
    // One recorded op; the gradient sums each source pixel's copies.
    let (b, h, w, c) = x.dims4()?;
    let y = crate::tape::timed("upsample", || resize(&x.detach(), out_h, out_w))?;
    let dev = x.device().clone();
    tape.push("upsample", &[x], &y, move |g| {
        if out_h == 2 * h && out_w == 2 * w {
            if let Some(gx) = block_sums_2x2_cpu(g, (b, h, w, c))? {
                return Ok(vec![Some(gx)]);
            }
            let gx = g
                .reshape((b, h, 2, w, 2, c))?
                .sum_keepdim(4)?
                .sum_keepdim(2)?
                .reshape((b, h, w, c))?;
            return Ok(vec![Some(gx)]);
        }
        let cols = if out_w == w {
            g.clone()
        } else {
            let z = Tensor::zeros((b, out_h, w, c), g.dtype(), &dev)?;
            z.index_add(&index(w, out_w, &dev)?, &g.contiguous()?, 2)?
        };
        let rows = if out_h == h {
            cols
        } else {
            let z = Tensor::zeros((b, h, w, c), g.dtype(), &dev)?;
            z.index_add(&index(h, out_h, &dev)?, &cols.contiguous()?, 1)?
        };
        Ok(vec![Some(rows)])
    });
    Ok(y)
}

/// The 2× upsample's gradient on the CPU for f32: each source pixel's four copies summed in
/// the order of the reshape-and-sum composition (the two columns of each row, then the two
/// rows), so the bits are the same, in one pass instead of two strided reductions (those took
/// ~5 ns per element, 8 ms of a D0 step at 512²). `None` elsewhere.
fn block_sums_2x2_cpu(
    g: &Tensor,
    (b, h, w, c): (usize, usize, usize, usize),
) -> Result<Option<Tensor>> {
    if !g.device().is_cpu() || g.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let g = g.contiguous()?;
    let (storage, layout) = g.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let src = &cpu.as_slice::<f32>()?[layout.start_offset()..][..b * 4 * h * w * c];
    let row_out = w * c;
    // SAFETY: every output row is written whole below.
    let out = unsafe {
        super::par_filled::<f32>(b * h * row_out, row_out, |r, out_row| {
            let top = &src[2 * r * 2 * row_out..][..2 * row_out];
            let bottom = &src[(2 * r + 1) * 2 * row_out..][..2 * row_out];
            for (x, o) in out_row.chunks_exact_mut(c).enumerate() {
                let (t0, t1) = (&top[2 * x * c..][..c], &top[(2 * x + 1) * c..][..c]);
                let (b0, b1) = (&bottom[2 * x * c..][..c], &bottom[(2 * x + 1) * c..][..c]);
                for i in 0..c {
                    o[i].write((t0[i] + t1[i]) + (b0[i] + b1[i]));
                }
            }
        })
    };
    drop(storage);
    Ok(Some(Tensor::from_vec(out, (b, h, w, c), g.device())?))
}

/// Source index of each of `n_out` positions resized from `n_in`.
fn index(n_in: usize, n_out: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let idx: Vec<u32> = (0..n_out)
        .map(|o| ((o as u64 * n_in as u64) / n_out as u64) as u32)
        .collect();
    Tensor::from_vec(idx, n_out, dev)
}

fn resize(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        candle_core::bail!(
            "upsample_nearest: cannot resize {:?} to {out_h}x{out_w}",
            x.dims()
        );
    }
    if out_h == 2 * h && out_w == 2 * w {
        return x
            .reshape((b, h, 1, w, 1, c))?
            .broadcast_as((b, h, 2, w, 2, c))?
            .reshape((b, out_h, out_w, c));
    }
    let rows = if out_h == h {
        x.clone()
    } else {
        x.index_select(&index(h, out_h, x.device())?, 1)?
    };
    if out_w == w {
        Ok(rows)
    } else {
        rows.index_select(&index(w, out_w, x.device())?, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{check_gradients, rand_tensor};
    use candle_core::Device;

    #[test]
    fn doubles_by_repetition() -> Result<()> {
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4.], (1, 2, 2, 1), &Device::Cpu)?;
        let y = upsample_nearest(&x, 4, 4)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(
            y,
            vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
        );
        Ok(())
    }

    #[test]
    fn general_sizes_follow_tensorflow() -> Result<()> {
        // 3 -> 5: source = floor(o * 3 / 5) = 0, 0, 1, 1, 2.
        let x = Tensor::from_vec(vec![10f32, 20., 30.], (1, 3, 1, 1), &Device::Cpu)?;
        let y = upsample_nearest(&x, 5, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(y, vec![10., 10., 20., 20., 30.]);
        Ok(())
    }

    #[test]
    fn cpu_block_sums_equal_the_composition_bit_for_bit() -> Result<()> {
        let (b, h, w, c) = (2, 5, 3, 7);
        let g = rand_tensor(&[b, 2 * h, 2 * w, c], 52)?.to_dtype(candle_core::DType::F32)?;
        let fast = block_sums_2x2_cpu(&g, (b, h, w, c))?.expect("f32 on the CPU");
        let composed = g
            .reshape((b, h, 2, w, 2, c))?
            .sum_keepdim(4)?
            .sum_keepdim(2)?
            .reshape((b, h, w, c))?;
        let bits = crate::ops::fd::f32_bits;
        assert_eq!(bits(&fast)?, bits(&composed)?);
        // Other dtypes take the composition.
        let g64 = g.to_dtype(candle_core::DType::F64)?;
        assert!(block_sums_2x2_cpu(&g64, (b, h, w, c))?.is_none());
        Ok(())
    }

    #[test]
    fn gradients_accumulate() -> Result<()> {
        let x = rand_tensor(&[2, 3, 2, 3], 51)?;
        check_gradients(
            std::slice::from_ref(&x),
            |v| upsample_nearest(&v[0], 6, 4),
            1e-7,
        )?;
        check_gradients(&[x], |v| upsample_nearest(&v[0], 5, 3), 1e-7)
    }
}
