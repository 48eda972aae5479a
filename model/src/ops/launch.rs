//! Launch shapes of the CUDA kernels in `kernels.cu`, kept free of CUDA types so they build and
//! are tested without the `cuda` feature. Every kernel loops grid-stride, so a grid only has to
//! respect the hardware limits and fill the GPU; these functions decide how.

/// Threads per block of the elementwise kernels (`focal_loss_*` relies on 256).
pub(crate) const THREADS: u32 = 256;
/// Width (channels) and height (rows) of the column-reduction blocks (`RED_Y` in kernels.cu).
pub(crate) const RED_X: u32 = 32;
pub(crate) const RED_Y: u32 = 8;
/// Elements each thread of the ILP kernels takes per round (`ILP` in kernels.cu).
pub(crate) const ILP: u32 = 4;
/// CUDA's limit on grid y and z.
const GRID_YZ_MAX: usize = 65535;
/// Blocks a reduction aims for (a few per SM on an H100's 132).
const TARGET_BLOCKS: usize = 4096;

/// (grid, block) of a launch.
pub(crate) type Shape3 = ((u32, u32, u32), (u32, u32, u32));

/// Grid-stride launch over `n` elements: one thread per element up to 2^20 blocks.
pub(crate) fn elementwise(n: usize) -> Shape3 {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
    ((blocks, 1, 1), (THREADS, 1, 1))
}

/// Grid-stride launch over `n` elements for the kernels that take [`ILP`] elements per thread
/// per round (`ILP_ROUNDS` in kernels.cu): one round per thread up to 2^20 blocks.
pub(crate) fn elementwise_ilp(n: usize) -> Shape3 {
    let blocks = n.div_ceil((THREADS * ILP) as usize).clamp(1, 1 << 20) as u32;
    ((blocks, 1, 1), (THREADS, 1, 1))
}

/// Grid-stride launch over `n` elements whose blocks each reduce to one value (one atomic add
/// per block): THREADS threads, at most 1024 blocks.
pub(crate) fn block_reduction(n: usize) -> Shape3 {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1024) as u32;
    ((blocks, 1, 1), (THREADS, 1, 1))
}

/// Row-walking kernels: grid y over `rows` rows (the kernel strides past CUDA's 65535), grid x
/// over one row's `row_len` elements, one per thread up to 2^16 blocks.
pub(crate) fn rows(rows: usize, row_len: usize) -> Shape3 {
    let x = row_len.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    let y = rows.clamp(1, GRID_YZ_MAX) as u32;
    ((x, y, 1), (THREADS, 1, 1))
}

/// Column reductions over `rows` rows of `c` channels, `groups` times (grid z): enough row
/// chunks to fill the GPU while each thread still sums ≥ 32 rows.
pub(crate) fn column_reduction(rows: usize, c: usize, groups: usize) -> Shape3 {
    let cblocks = c.div_ceil(RED_X as usize).max(1);
    let groups = groups.clamp(1, GRID_YZ_MAX);
    let want = (TARGET_BLOCKS / (cblocks * groups)).max(1);
    let chunks = rows
        .div_ceil(RED_Y as usize * 32)
        .clamp(1, want.min(GRID_YZ_MAX));
    (
        (cblocks as u32, chunks as u32, groups as u32),
        (RED_X, RED_Y, 1),
    )
}

/// The depthwise kernel gradient: (channel blocks, taps, chunks of output rows); each thread
/// sums whole rows (B·OH of them), at least one.
pub(crate) fn tap_reduction(rows: usize, c: usize, taps: usize) -> Shape3 {
    let cblocks = c.div_ceil(RED_X as usize).max(1);
    let taps = taps.clamp(1, GRID_YZ_MAX);
    let want = (TARGET_BLOCKS / (cblocks * taps)).max(1);
    let chunks = rows
        .div_ceil(RED_Y as usize)
        .clamp(1, want.min(GRID_YZ_MAX));
    (
        (cblocks as u32, taps as u32, chunks as u32),
        (RED_X, RED_Y, 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within_limits(((gx, gy, gz), (bx, by, bz)): Shape3) {
        assert!(gx >= 1 && gy >= 1 && gz >= 1);
        assert!(gy as usize <= GRID_YZ_MAX && gz as usize <= GRID_YZ_MAX);
        assert!(bx * by * bz <= 1024);
    }

    #[test]
    fn ilp_launches_give_each_thread_one_round() {
        assert_eq!(elementwise_ilp(0).0 .0, 1);
        assert_eq!(elementwise_ilp(1024).0 .0, 1);
        assert_eq!(elementwise_ilp(1025).0 .0, 2);
        assert_eq!(elementwise_ilp(64 * 256 * 256 * 96).0 .0, 393_216);
        assert_eq!(elementwise_ilp(1 << 32).0 .0, 1 << 20);
        within_limits(elementwise_ilp(usize::MAX / 2));
        // kernels.cu's ILP is this constant.
        let cu = include_str!("kernels.cu");
        assert!(
            cu.contains(&format!("\n#define ILP {ILP}\n")),
            "ILP differs from kernels.cu"
        );
    }

    #[test]
    fn block_reductions_cover_small_and_cap_large() {
        assert_eq!(block_reduction(0), ((1, 1, 1), (THREADS, 1, 1)));
        assert_eq!(block_reduction(300).0 .0, 2);
        assert_eq!(block_reduction(64 * 64 * 64 * 64).0 .0, 1024);
        within_limits(block_reduction(usize::MAX / 2));
    }

    #[test]
    fn elementwise_covers_small_and_caps_large() {
        assert_eq!(elementwise(0).0 .0, 1);
        assert_eq!(elementwise(1).0 .0, 1);
        assert_eq!(elementwise(257).0 .0, 2);
        // 64 × 256 × 256 × 32 elements (D0's first block at 512², batch 64): one per thread.
        assert_eq!(elementwise(64 * 256 * 256 * 32).0 .0, 1 << 19);
        // × 96 channels (the second block's expansion): capped, the grid-stride loop does the rest.
        assert_eq!(elementwise(64 * 256 * 256 * 96).0 .0, 1 << 20);
        within_limits(elementwise(usize::MAX / 2));
    }

    #[test]
    fn row_launches_cover_each_row_and_respect_limits() {
        // D0's first depthwise at 512², batch 64: 64·256 output rows of 256·32 values.
        let s = rows(64 * 256, 256 * 32);
        assert_eq!(s, ((32, 16384, 1), (THREADS, 1, 1)));
        within_limits(s);
        // More rows than grid y allows: capped (the kernel strides); tiny rows: one block.
        assert_eq!(rows(1 << 20, 3).0, (1, GRID_YZ_MAX as u32, 1));
        assert_eq!(rows(0, 0).0, (1, 1, 1));
        within_limits(rows(usize::MAX / 4, usize::MAX / 4));
    }

    #[test]
    fn reductions_fit_the_hardware_and_fill_the_gpu() {
        // D0 shapes at 512², batch 64: the widest (1152 ch at 16²) and the tallest (32 ch at 256²).
        for (rows, c) in [(64 * 16 * 16, 1152), (64 * 256 * 256, 32), (1, 1), (10, 3)] {
            let s = column_reduction(rows, c, 1);
            within_limits(s);
            assert_eq!(s.0 .0 as usize, c.div_ceil(32));
            // Each thread sums at least 32 rows unless there are few rows.
            let per_thread = rows.div_ceil((s.0 .1 * RED_Y) as usize);
            assert!(per_thread >= 32 || s.0 .1 == 1, "{rows}x{c}: {per_thread}");
        }
        // Many rows, few channels: about TARGET_BLOCKS blocks.
        let ((gx, gy, gz), _) = column_reduction(64 * 256 * 256, 32, 1);
        assert_eq!((gx, gy, gz), (1, 4096, 1));
        // Per-image sums (grid z = batch).
        within_limits(column_reduction(256 * 256, 96, 64));
        within_limits(column_reduction(4, 4, 100_000));
        for (rows, c, k) in [(64 * 256, 32, 9), (64 * 16, 1152, 25), (1, 1, 1)] {
            let s = tap_reduction(rows, c, k);
            within_limits(s);
            assert_eq!(s.0 .1 as usize, k);
            // Never more row chunks than rows per block row.
            assert!(s.0 .2 as usize <= rows.div_ceil(RED_Y as usize));
        }
    }
}
