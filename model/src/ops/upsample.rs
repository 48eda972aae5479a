//! Nearest-neighbour resize of NHWC tensors with TensorFlow `resize_nearest_neighbor` semantics
//! (no corner alignment, no half-pixel centres: source index = floor(dst · in / out)). The exact
//! 2× case is a broadcast + reshape; other sizes gather rows and columns with `index_select`.
//! Both have accumulating gradients, unlike candle's `upsample_nearest2d` backward.

use candle_core::{Result, Tensor};

/// Resizes `x` `[B, H, W, C]` to `[B, out_h, out_w, C]` by nearest-neighbour sampling.
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
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
    let index = |n_in: usize, n_out: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n_out)
            .map(|o| ((o as u64 * n_in as u64) / n_out as u64) as u32)
            .collect();
        Tensor::from_vec(idx, n_out, x.device())
    };
    let rows = if out_h == h {
        x.clone()
    } else {
        x.index_select(&index(h, out_h)?, 1)?
    };
    if out_w == w {
        Ok(rows)
    } else {
        rows.index_select(&index(w, out_w)?, 2)
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
