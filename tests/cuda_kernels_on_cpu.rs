//! The CUDA kernel sources, compiled as host C++ (g++ with `tests/cuda_on_cpu/shim.h`) and run
//! on the CPU, so machines without a GPU test the kernels' index arithmetic, bounds and tap
//! order: the unrolled depthwise specializations against the generic kernels (which a GPU run
//! checked against the CPU ops), the generic forward against `depthwise_conv2d`, and the nvJPEG
//! stage's render kernel against `deferred::render_reference`, bit for bit. Grids are chosen
//! small so every grid-stride loop wraps.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use effdet_pipeline::augment::{AugmentConfig, ScaleParams};
use effdet_pipeline::decode::DecodedImage;
use effdet_pipeline::deferred::{render_norm_args, render_reference, RenderJob};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Grid = (u32, u32, u32, u32, u32, u32);

/// Calls runner `run_<name>` of the CPU-compiled library with a grid and the kernel's own
/// arguments, typed as listed.
macro_rules! run {
    ($lib:expr, $name:expr, $grid:expr, ($($t:ty),*), $($arg:expr),*) => {{
        let g: Grid = $grid;
        let symbol = format!("run_{}\0", $name);
        // SAFETY: the runner in runners.cpp has exactly this signature; the caller sizes the
        // buffers for the arguments.
        unsafe {
            let f = $lib
                .get::<unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, $($t),*)>(
                    symbol.as_bytes(),
                )
                .unwrap_or_else(|e| panic!("{}: {e}", $name));
            f(g.0, g.1, g.2, g.3, g.4, g.5, $($arg),*);
        }
    }};
}

/// Builds the kernels into a shared library; None (test skipped) without g++ unless CI=true.
fn build(dir: &Path) -> Option<libloading::Library> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join("libeffdet_kernels_cpu.so");
    let status = Command::new("g++")
        .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-ffp-contract=off"])
        .args(["-Wno-unknown-pragmas", "-Wno-unused-parameter"])
        .arg("-include")
        .arg(root.join("tests/cuda_on_cpu/shim.h"))
        .args(["-x", "c++"])
        .arg(root.join("model/src/ops/kernels.cu"))
        .arg(root.join("pipeline/src/nvjpeg/render.cu"))
        .arg(root.join("tests/cuda_on_cpu/runners.cpp"))
        .arg("-o")
        .arg(&out)
        .arg("-lpthread")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("g++ failed on the CUDA sources ({s})"),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "g++ is needed to test the CUDA kernels on the CPU: {e}"
            );
            eprintln!("skipped: no g++ ({e})");
            return None;
        }
    }
    // SAFETY: our own test library; its initializers only set up globals.
    Some(unsafe { libloading::Library::new(&out) }.expect("load the CPU-compiled kernels"))
}

#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    s: usize,
    oh: usize,
    ow: usize,
    pt: usize,
    pl: usize,
}

impl Geom {
    fn new(b: usize, h: usize, w: usize, c: usize, k: usize, s: usize) -> Geom {
        let (oh, pt, _) = effdet_model::ops::same_padding(h, k, s);
        let (ow, pl, _) = effdet_model::ops::same_padding(w, k, s);
        Geom {
            b,
            h,
            w,
            c,
            k,
            s,
            oh,
            ow,
            pt,
            pl,
        }
    }
    fn ints(&self) -> [i32; 10] {
        [
            self.b, self.h, self.w, self.c, self.k, self.s, self.oh, self.ow, self.pt, self.pl,
        ]
        .map(|v| v as i32)
    }
}

/// Runs depthwise runner `name` (f32 inputs, `T` output) on geometry `geo`.
fn call<T>(
    lib: &libloading::Library,
    name: &str,
    g: Grid,
    a: &[f32],
    b: &[f32],
    out: &mut [T],
    geo: &Geom,
) {
    let i = geo.ints();
    run!(
        lib,
        name,
        g,
        (
            *const f32,
            *const f32,
            *mut T,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32
        ),
        a.as_ptr(),
        b.as_ptr(),
        out.as_mut_ptr(),
        i[0],
        i[1],
        i[2],
        i[3],
        i[4],
        i[5],
        i[6],
        i[7],
        i[8],
        i[9]
    );
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// The library, built once for all tests of this file.
fn library() -> Option<&'static libloading::Library> {
    static LIB: OnceLock<Option<(tempfile::TempDir, libloading::Library)>> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let lib = build(dir.path())?;
        Some((dir, lib))
    })
    .as_ref()
    .map(|(_, lib)| lib)
}

#[test]
fn depthwise_specializations_equal_the_generic_kernels() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // 40 channels: one full and one partial 32-channel block.
    for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
        // (8, 9) and (10, 7) pad top and left differently at stride 2.
        for (h, w) in [(9, 11), (8, 9), (10, 7), (1, 3)] {
            let g = Geom::new(2, h, w, 40, k, s);
            let x = random(&mut rng, g.b * g.h * g.w * g.c);
            let wt = random(&mut rng, k * k * g.c);
            let gy = random(&mut rng, g.b * g.oh * g.ow * g.c);
            let n_out = g.b * g.oh * g.ow * g.c;
            let n_in = g.b * g.h * g.w * g.c;
            let ctx = format!("k{k} s{s} {h}x{w}");

            let (mut want, mut got) = (vec![0.0; n_out], vec![f32::NAN; n_out]);
            call(lib, "dw_fwd", (3, 1, 1, 64, 1, 1), &x, &wt, &mut want, &g);
            call(
                lib,
                &format!("dw_fwd_k{k}s{s}"),
                (2, 3, 1, 16, 1, 1),
                &x,
                &wt,
                &mut got,
                &g,
            );
            assert_eq!(got, want, "forward {ctx}");

            let (mut want, mut got) = (vec![0.0; n_in], vec![f32::NAN; n_in]);
            call(
                lib,
                "dw_grad_input",
                (3, 1, 1, 64, 1, 1),
                &gy,
                &wt,
                &mut want,
                &g,
            );
            let name = format!("dw_grad_input_k{k}s{s}");
            call(lib, &name, (2, 3, 1, 16, 1, 1), &gy, &wt, &mut got, &g);
            assert_eq!(got, want, "input gradient {ctx}");

            let taps = k * k;
            let (mut want, mut got) = (vec![0.0f64; taps * g.c], vec![0.0f64; taps * g.c]);
            call(
                lib,
                "dw_grad_weight",
                (2, taps as u32, 2, 32, 8, 1),
                &x,
                &gy,
                &mut want,
                &g,
            );
            call(
                lib,
                &format!("dw_grad_weight_k{k}"),
                (2, 1, 3, 32, 8, 1),
                &x,
                &gy,
                &mut got,
                &g,
            );
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    "kernel gradient {ctx} [{i}]: {a} vs {b}"
                );
            }
            assert!(want.iter().any(|&v| v != 0.0));
        }
    }
}

/// The harness itself: the generic forward kernel equals the model's CPU op.
#[test]
fn generic_depthwise_kernel_equals_the_cpu_op() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for (k, s) in [(3, 1), (5, 2)] {
        let g = Geom::new(2, 7, 10, 6, k, s);
        let x = random(&mut rng, g.b * g.h * g.w * g.c);
        let wt = random(&mut rng, k * k * g.c);
        let mut got = vec![0.0; g.b * g.oh * g.ow * g.c];
        call(lib, "dw_fwd", (1, 1, 1, 32, 1, 1), &x, &wt, &mut got, &g);
        let xt = Tensor::from_vec(x, (g.b, g.h, g.w, g.c), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(wt, (k, k, g.c), &Device::Cpu).unwrap();
        let want: Vec<f32> = effdet_model::ops::depthwise_conv2d(&xt, &wt, s)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5, "k{k} s{s}: {a} vs {b}");
        }
    }
}

#[test]
fn render_kernel_equals_its_cpu_reference_bit_for_bit() {
    let Some(lib) = library() else { return };
    let cfg = AugmentConfig::d0(48);
    let plane = 48 * 48;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // Three images back to back in one arena (odd sizes, so rows are unaligned), rendered into
    // slots 2, 0 and 3 of a 4-slot batch, plus a blank job in slot 1.
    let sizes = [(37u32, 53u32), (100, 30), (20, 20)];
    let mut arena = Vec::new();
    let mut images = Vec::new();
    let mut jobs = Vec::new();
    for (i, &(h, w)) in sizes.iter().enumerate() {
        let rgb: Vec<u8> = (0..h * w * 3).map(|_| rng.gen()).collect();
        let offset = arena.len() as u64;
        arena.extend_from_slice(&rgb);
        arena.resize(arena.len().div_ceil(256) * 256, 0xAB);
        let p = if i == 1 {
            ScaleParams::eval(h, w, &cfg)
        } else {
            ScaleParams::train(&mut rng, h, w, &cfg)
        };
        let p = ScaleParams { flip: i != 1, ..p };
        let slot = [2, 0, 3][i];
        jobs.push(RenderJob {
            slot,
            src_offset: offset,
            src_height: h,
            src_width: w,
            scaled_height: p.scaled_height,
            scaled_width: p.scaled_width,
            offset_y: p.offset_y,
            offset_x: p.offset_x,
            flip: p.flip,
        });
        images.push(DecodedImage {
            width: w,
            height: h,
            rgb,
        });
    }
    jobs.push(RenderJob::blank(1));
    let words: Vec<u32> = jobs.iter().flat_map(|j| j.words()).collect();
    let norm = render_norm_args();
    let mut out = vec![f32::NAN; 4 * 3 * plane];
    // 4 slots of 3 planes; every job within the arena.
    run!(
        lib,
        "effdet_render_batch",
        (3, jobs.len() as u32, 1, 64, 1, 1),
        (*const u8, *const u32, *mut f32, u32, u32, *const f32),
        arena.as_ptr(),
        words.as_ptr(),
        out.as_mut_ptr(),
        48,
        48,
        norm.as_ptr()
    );
    let mut want = vec![0.0f32; 3 * plane];
    for (job, img) in jobs.iter().zip(images.iter().map(Some).chain([None])) {
        let blank = DecodedImage::default();
        render_reference(img.unwrap_or(&blank), job, &cfg, &mut want);
        let slot = job.slot as usize;
        let got = &out[slot * 3 * plane..(slot + 1) * 3 * plane];
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "slot {slot} ({job:?}) differs from render_reference");
    }
}

/// Largest |a − b| over max(1, |b|).
fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The CPU op's output and input gradients for Σ op(inputs)·g.
fn cpu_grads(
    inputs: &[Tensor],
    g: &Tensor,
    op: impl Fn(&[Tensor]) -> Tensor,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let vars: Vec<candle_core::Var> = inputs
        .iter()
        .map(|t| candle_core::Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts);
    let loss = (&y * g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let gs = ts.iter().map(|t| vec_of(grads.get(t).unwrap())).collect();
    (vec_of(&y), gs)
}

/// The generic depthwise backward kernels (row-walking kernel gradient, 32-bit indices) against
/// the model's CPU backward.
#[test]
fn generic_depthwise_backward_equals_the_cpu_op() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for (k, s, h, w) in [(3, 1, 7, 10), (5, 2, 10, 7), (3, 2, 8, 9)] {
        let g = Geom::new(2, h, w, 36, k, s);
        let x = random(&mut rng, g.b * g.h * g.w * g.c);
        let wt = random(&mut rng, k * k * g.c);
        let gy = random(&mut rng, g.b * g.oh * g.ow * g.c);
        let dev = Device::Cpu;
        let (_, want) = cpu_grads(
            &[
                Tensor::from_vec(x.clone(), (g.b, g.h, g.w, g.c), &dev).unwrap(),
                Tensor::from_vec(wt.clone(), (k, k, g.c), &dev).unwrap(),
            ],
            &Tensor::from_vec(gy.clone(), (g.b, g.oh, g.ow, g.c), &dev).unwrap(),
            |v| effdet_model::ops::depthwise_conv2d(&v[0], &v[1], s).unwrap(),
        );
        let mut gx = vec![f32::NAN; x.len()];
        call(
            lib,
            "dw_grad_input",
            (2, 1, 1, 64, 1, 1),
            &gy,
            &wt,
            &mut gx,
            &g,
        );
        assert!(worst(&gx, &want[0]) < 1e-5, "input gradient k{k} s{s}");
        let mut gw = vec![0.0f64; k * k * g.c];
        call(
            lib,
            "dw_grad_weight",
            (2, (k * k) as u32, 3, 32, 8, 1),
            &x,
            &gy,
            &mut gw,
            &g,
        );
        let gw: Vec<f32> = gw.iter().map(|&v| v as f32).collect();
        assert!(worst(&gw, &want[1]) < 1e-5, "kernel gradient k{k} s{s}");
    }
}

#[test]
fn max_pool_kernels_equal_the_cpu_op() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (h, w, kh, sh) in [(9, 8, 3, 2), (8, 9, 3, 2), (5, 6, 2, 2)] {
        let (b, c) = (2usize, 5usize);
        let (oh, pt, _) = effdet_model::ops::same_padding(h, kh, sh);
        let (ow, pl, _) = effdet_model::ops::same_padding(w, kh, sh);
        let x = random(&mut rng, b * h * w * c);
        let gy = random(&mut rng, b * oh * ow * c);
        let dev = Device::Cpu;
        let (want_y, want_g) = cpu_grads(
            &[Tensor::from_vec(x.clone(), (b, h, w, c), &dev).unwrap()],
            &Tensor::from_vec(gy.clone(), (b, oh, ow, c), &dev).unwrap(),
            |v| effdet_model::ops::max_pool2d_same(&v[0], (kh, kh), (sh, sh)).unwrap(),
        );
        let ints = [b, h, w, c, kh, kh, sh, sh, oh, ow, pt, pl].map(|v| v as i32);
        let mut y = vec![f32::NAN; want_y.len()];
        let mut gx = vec![0.0f32; x.len()];
        let i = ints;
        run!(
            lib,
            "maxpool_fwd",
            (2, 1, 1, 16, 1, 1),
            (
                *const f32,
                *mut f32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32
            ),
            x.as_ptr(),
            y.as_mut_ptr(),
            i[0],
            i[1],
            i[2],
            i[3],
            i[4],
            i[5],
            i[6],
            i[7],
            i[8],
            i[9],
            i[10],
            i[11]
        );
        run!(
            lib,
            "maxpool_grad",
            (2, 1, 1, 16, 1, 1),
            (
                *const f32,
                *const f32,
                *mut f32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32
            ),
            x.as_ptr(),
            gy.as_ptr(),
            gx.as_mut_ptr(),
            i[0],
            i[1],
            i[2],
            i[3],
            i[4],
            i[5],
            i[6],
            i[7],
            i[8],
            i[9],
            i[10],
            i[11]
        );
        assert_eq!(y, want_y, "max-pool {h}x{w} k{kh} s{sh}");
        assert!(worst(&gx, &want_g[0]) < 1e-6, "max-pool gradient {h}x{w}");
    }
}

#[test]
fn elementwise_and_optimizer_kernels_equal_the_cpu_ops() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let dev = Device::Cpu;
    let (b, hw, c) = (3usize, 35usize, 7usize);
    let n = b * hw * c;
    let x = random(&mut rng, n);
    let gy = random(&mut rng, n);
    let xt = Tensor::from_vec(x.clone(), (b, 5, 7, c), &dev).unwrap();
    let gt = Tensor::from_vec(gy.clone(), (b, 5, 7, c), &dev).unwrap();
    let grid = (3u32, 1u32, 1u32, 32u32, 1u32, 1u32);
    let (want_y, want_g) = cpu_grads(std::slice::from_ref(&xt), &gt, |v| {
        effdet_model::ops::swish(&v[0]).unwrap()
    });
    let bias = random(&mut rng, c);
    let gate = random(&mut rng, b * c);
    let want_bias = vec_of(
        &effdet_model::ops::add_channel_bias(
            &xt,
            &Tensor::from_vec(bias.clone(), c, &dev).unwrap(),
        )
        .unwrap(),
    );
    let want_gate = vec_of(
        &effdet_model::ops::channel_gate(
            &xt,
            &Tensor::from_vec(gate.clone(), (b, c), &dev).unwrap(),
        )
        .unwrap(),
    );
    let xv = Tensor::from_vec(x.clone(), n, &dev).unwrap();
    effdet_model::ops::axpby_inplace(
        &xv,
        &Tensor::from_vec(gy.clone(), n, &dev).unwrap(),
        0.9,
        -0.05,
    )
    .unwrap();
    let want_axpby = vec_of(&xv);

    let (mut y, mut d, mut yb, mut yg) =
        (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut ax = x.clone();
    // All buffers hold n floats (bias c, gate b·c).
    let (nn, g) = (n as i64, grid);
    run!(
        lib,
        "swish_fwd",
        g,
        (*const f32, *mut f32, i64),
        x.as_ptr(),
        y.as_mut_ptr(),
        nn
    );
    run!(
        lib,
        "swish_grad",
        g,
        (*const f32, *const f32, *mut f32, i64),
        x.as_ptr(),
        gy.as_ptr(),
        d.as_mut_ptr(),
        nn
    );
    run!(
        lib,
        "bias_add",
        g,
        (*const f32, *const f32, *mut f32, i64, i32),
        x.as_ptr(),
        bias.as_ptr(),
        yb.as_mut_ptr(),
        nn,
        c as i32
    );
    run!(
        lib,
        "channel_gate",
        g,
        (*const f32, *const f32, *mut f32, i64, i64, i32),
        x.as_ptr(),
        gate.as_ptr(),
        yg.as_mut_ptr(),
        nn,
        hw as i64,
        c as i32
    );
    run!(
        lib,
        "axpby_f32",
        g,
        (*mut f32, *const f32, f32, f32, i64),
        ax.as_mut_ptr(),
        gy.as_ptr(),
        0.9,
        -0.05,
        nn
    );
    assert!(worst(&y, &want_y) < 1e-6, "swish");
    assert!(worst(&d, &want_g[0]) < 1e-5, "swish gradient");
    assert_eq!(yb, want_bias, "bias add");
    assert_eq!(yg, want_gate, "channel gate");
    assert_eq!(ax, want_axpby, "axpby");
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Column sums, squared deviations and the batch-norm kernels against their formulas in f64
/// (their index arithmetic changed after the last GPU check; `bn_scale_shift_params` is new).
#[test]
fn reduction_and_batch_norm_kernels_equal_their_formulas() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (groups, rows, c) = (2usize, 37usize, 40usize);
    let x = random(&mut rng, groups * rows * c);
    let g = random(&mut rng, rows * c);
    let reduce = (2u32, 2u32, groups as u32, 32u32, 8u32, 1u32);
    let elementwise = (2u32, 1u32, 1u32, 64u32, 1u32, 1u32);

    // Per-group column sums.
    let mut sums = vec![0.0f64; groups * c];
    run!(
        lib,
        "col_sum",
        reduce,
        (*const f32, *mut f64, i64, i32),
        x.as_ptr(),
        sums.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    let want: Vec<f64> = (0..groups * c)
        .map(|zc| {
            let (z, ch) = (zc / c, zc % c);
            (0..rows).map(|r| x[(z * rows + r) * c + ch] as f64).sum()
        })
        .collect();
    close(&sums, &want, 1e-12, "col_sum");

    // Moments of group 0 → inverse std → folded scale/shift, both ways.
    let n = rows as f64;
    let mean: Vec<f64> = sums[..c].iter().map(|s| s / n).collect();
    let mut sq = vec![0.0f64; c];
    let one = (2u32, 2u32, 1u32, 32u32, 8u32, 1u32);
    run!(
        lib,
        "col_sq_dev",
        one,
        (*const f32, *const f64, *mut f64, i64, i32),
        x.as_ptr(),
        mean.as_ptr(),
        sq.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    let want_sq: Vec<f64> = (0..c)
        .map(|ch| {
            (0..rows)
                .map(|r| (x[r * c + ch] as f64 - mean[ch]).powi(2))
                .sum()
        })
        .collect();
    close(&sq, &want_sq, 1e-12, "col_sq_dev");
    let eps = 1e-3;
    run!(
        lib,
        "bn_inv_std",
        elementwise,
        (*mut f64, f64, f64, i32),
        sq.as_mut_ptr(),
        n,
        eps,
        c as i32
    );
    let inv: Vec<f64> = want_sq.iter().map(|s| 1.0 / (s / n + eps).sqrt()).collect();
    close(&sq, &inv, 1e-12, "bn_inv_std");
    let gamma = random(&mut rng, c);
    let beta = random(&mut rng, c);
    let (mut scale, mut shift) = (vec![0f32; c], vec![0f32; c]);
    run!(
        lib,
        "bn_scale_shift",
        elementwise,
        (
            *const f32,
            *const f32,
            *const f64,
            *const f64,
            *mut f32,
            *mut f32,
            i32
        ),
        gamma.as_ptr(),
        beta.as_ptr(),
        mean.as_ptr(),
        inv.as_ptr(),
        scale.as_mut_ptr(),
        shift.as_mut_ptr(),
        c as i32
    );
    let want_scale: Vec<f32> = (0..c).map(|i| (gamma[i] as f64 * inv[i]) as f32).collect();
    let want_shift: Vec<f32> = (0..c)
        .map(|i| (beta[i] as f64 - gamma[i] as f64 * inv[i] * mean[i]) as f32)
        .collect();
    assert_eq!(
        (&scale, &shift),
        (&want_scale, &want_shift),
        "bn_scale_shift"
    );
    let params: Vec<f64> = mean
        .iter()
        .chain(&inv)
        .copied()
        .chain(gamma.iter().map(|&v| v as f64))
        .chain(beta.iter().map(|&v| v as f64))
        .collect();
    let (mut scale2, mut shift2) = (vec![0f32; c], vec![0f32; c]);
    run!(
        lib,
        "bn_scale_shift_params",
        elementwise,
        (*const f64, *mut f32, *mut f32, i32),
        params.as_ptr(),
        scale2.as_mut_ptr(),
        shift2.as_mut_ptr(),
        c as i32
    );
    assert_eq!(
        (&scale2, &shift2),
        (&scale, &shift),
        "bn_scale_shift_params"
    );

    // Apply, without and with swish.
    let m = rows * c;
    for act in [0, 1] {
        let mut y = vec![0f32; m];
        run!(
            lib,
            "bn_apply",
            elementwise,
            (*const f32, *const f32, *const f32, *mut f32, i64, i32, i32),
            x.as_ptr(),
            scale.as_ptr(),
            shift.as_ptr(),
            y.as_mut_ptr(),
            m as i64,
            c as i32,
            act
        );
        for (i, &v) in y.iter().enumerate() {
            let z = x[i] * scale[i % c] + shift[i % c];
            let want = if act == 1 { z / (1.0 + (-z).exp()) } else { z };
            assert!(
                (v - want).abs() <= 1e-6 * want.abs().max(1.0),
                "bn_apply act {act} [{i}]"
            );
        }
    }

    // Backward: Σ g_z, Σ g_z·x̂ and dx = k·g_z − off − x̂·slope.
    let chan: Vec<f32> = mean
        .iter()
        .map(|&v| v as f32)
        .chain(inv.iter().map(|&v| v as f32))
        .chain(gamma.iter().copied())
        .chain(beta.iter().copied())
        .collect();
    let coef = random(&mut rng, 3 * c);
    for act in [0, 1] {
        let xhat_gz = |i: usize| -> (f32, f32) {
            let ch = i % c;
            let xh = (x[i] - chan[ch]) * chan[c + ch];
            let gz = if act == 1 {
                let z = chan[2 * c + ch] * xh + chan[3 * c + ch];
                let s = 1.0 / (1.0 + (-z).exp());
                g[i] * s * (1.0 + z * (1.0 - s))
            } else {
                g[i]
            };
            (xh, gz)
        };
        let mut red = vec![0.0f64; 2 * c];
        run!(
            lib,
            "bn_grad_reduce",
            one,
            (*const f32, *const f32, *const f32, *mut f64, i64, i32, i32),
            x.as_ptr(),
            g.as_ptr(),
            chan.as_ptr(),
            red.as_mut_ptr(),
            rows as i64,
            c as i32,
            act
        );
        let mut want = vec![0.0f64; 2 * c];
        for i in 0..m {
            let (xh, gz) = xhat_gz(i);
            want[i % c] += gz as f64;
            want[c + i % c] += (gz * xh) as f64;
        }
        close(&red, &want, 1e-5, "bn_grad_reduce");
        let mut dx = vec![0f32; m];
        run!(
            lib,
            "bn_grad_input",
            elementwise,
            (
                *const f32,
                *const f32,
                *const f32,
                *const f32,
                *mut f32,
                i64,
                i32,
                i32
            ),
            x.as_ptr(),
            g.as_ptr(),
            chan.as_ptr(),
            coef.as_ptr(),
            dx.as_mut_ptr(),
            m as i64,
            c as i32,
            act
        );
        for (i, &v) in dx.iter().enumerate() {
            let (xh, gz) = xhat_gz(i);
            let ch = i % c;
            let want = coef[ch] * gz - coef[c + ch] - xh * coef[2 * c + ch];
            assert!(
                (v - want).abs() <= 1e-5 * want.abs().max(1.0),
                "bn_grad_input act {act} [{i}]"
            );
        }
    }
}

/// Runs `focal_loss_<suffix>` and `focal_grad_<suffix>` (gradient scale 1): the loss sum, the
/// invalid-id flag and the gradient.
fn focal_run<I>(
    lib: &libloading::Library,
    suffix: &str,
    x: &[f32],
    ids: &[I],
    k: usize,
    (alpha, gamma, smoothing): (f64, f64, f64),
) -> (f64, i32, Vec<f32>) {
    let n = x.len();
    let (mut sum, mut bad, mut d) = ([0.0f64], [0i32], vec![f32::NAN; n]);
    let one = [1.0f64];
    run!(
        lib,
        format!("focal_loss_{suffix}"),
        (2, 1, 1, 256, 1, 1),
        (
            *const f32,
            *const I,
            *mut f64,
            *mut i32,
            i64,
            i32,
            f64,
            f64,
            f64
        ),
        x.as_ptr(),
        ids.as_ptr(),
        sum.as_mut_ptr(),
        bad.as_mut_ptr(),
        n as i64,
        k as i32,
        alpha,
        gamma,
        smoothing
    );
    run!(
        lib,
        format!("focal_grad_{suffix}"),
        (2, 1, 1, 64, 1, 1),
        (
            *const f32,
            *const I,
            *const f64,
            *mut f32,
            *mut i32,
            i64,
            i32,
            f64,
            f64,
            f64
        ),
        x.as_ptr(),
        ids.as_ptr(),
        one.as_ptr(),
        d.as_mut_ptr(),
        bad.as_mut_ptr(),
        n as i64,
        k as i32,
        alpha,
        gamma,
        smoothing
    );
    (sum[0], bad[0], d)
}

/// The fused focal-loss kernels (i32 and i64 class ids) against the model's CPU op: the sum,
/// its gradient, and the invalid-id flag.
#[test]
fn focal_loss_kernels_equal_the_cpu_op() {
    use effdet_model::ops::{focal_loss_sum, FocalParams};
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let (anchors, k) = (45usize, 7usize);
    let x: Vec<f32> = random(&mut rng, anchors * k)
        .iter()
        .map(|v| v * 4.0)
        .collect();
    let ids: Vec<i64> = (0..anchors)
        .map(|i| (i as i64 * 5) % (k as i64 + 2) - 2)
        .collect();
    let p = FocalParams {
        alpha: 0.25,
        gamma: 1.5,
        label_smoothing: 0.1,
    };
    let dev = Device::Cpu;
    // 5 locations × 9 anchors: logits [5, 9·K], ids [5, 9], as the heads lay them out.
    let xv = candle_core::Var::from_tensor(&Tensor::from_vec(x.clone(), (5, 9 * k), &dev).unwrap())
        .unwrap();
    let ids_t = Tensor::from_vec(ids.clone(), (5, 9), &dev).unwrap();
    let loss = focal_loss_sum(xv.as_tensor(), &ids_t, p).unwrap();
    let want_loss = loss
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let want_grad = vec_of(loss.backward().unwrap().get(xv.as_tensor()).unwrap());
    let ids32: Vec<i32> = ids.iter().map(|&v| v as i32).collect();
    let params = (p.alpha, p.gamma, p.label_smoothing);
    for (sum, bad, d) in [
        focal_run(lib, "i32", &x, &ids32, k, params),
        focal_run(lib, "i64", &x, &ids, k, params),
    ] {
        assert_eq!(bad, 0);
        assert!(
            (sum - want_loss).abs() <= 1e-5 * want_loss.abs(),
            "loss {sum} vs {want_loss}"
        );
        assert!(worst(&d, &want_grad) < 1e-5, "focal gradient");
    }
    // An id outside −2..K raises the flag.
    let mut bad_ids = ids32.clone();
    bad_ids[3] = k as i32;
    assert_eq!(focal_run(lib, "i32", &x, &bad_ids, k, params).1, 1);
}
