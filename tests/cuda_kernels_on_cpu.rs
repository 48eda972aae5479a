//! The CUDA kernel sources, compiled as host C++ (g++ with `tests/cuda_on_cpu/shim.h`) and run
//! on the CPU, so machines without a GPU test the kernels' index arithmetic, bounds and tap
//! order: the unrolled depthwise specializations against the generic kernels (which a GPU run
//! checked against the CPU ops), the generic forward against `depthwise_conv2d`, and the nvJPEG
//! stage's render kernel against `deferred::render_reference`, bit for bit. The 16-bit
//! instantiations (`_f16`, `_bf16`) of every activation kernel against their f32 kernel on the
//! widened inputs, rounded once, bit for bit; and the shim's f16/bf16 conversions against the
//! `half` crate's. Grids are chosen small so every grid-stride loop wraps.

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

/// Runs depthwise runner `name` (inputs `A` and `B`, output `O`) on geometry `geo`.
fn call<A, B, O>(
    lib: &libloading::Library,
    name: &str,
    g: Grid,
    a: &[A],
    b: &[B],
    out: &mut [O],
    geo: &Geom,
) {
    let i = geo.ints();
    run!(
        lib,
        name,
        g,
        (
            *const A,
            *const B,
            *mut O,
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
        // (5, 23): blocked row kernels with windows entirely inside the row at stride 2 too.
        for (h, w) in [(9, 11), (8, 9), (10, 7), (1, 3), (5, 23)] {
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
            // Grid z 3: one round, some thread rows past the last row; z 1: several rounds.
            for chunks in [3, 1] {
                got.fill(0.0);
                call(
                    lib,
                    &format!("dw_grad_weight_k{k}"),
                    (2, 1, chunks, 32, 8, 1),
                    &x,
                    &gy,
                    &mut got,
                    &g,
                );
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                        "kernel gradient {ctx} z {chunks} [{i}]: {a} vs {b}"
                    );
                }
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
    // x + v[b, c]: the spatial mean's gradient added to another (the CPU op is tested against
    // candle's add in ops::channel).
    let mut ya = vec![f32::NAN; n];
    run!(
        lib,
        "channel_add",
        g,
        (*const f32, *const f32, *mut f32, i64, i64, i32),
        x.as_ptr(),
        gate.as_ptr(),
        ya.as_mut_ptr(),
        nn,
        hw as i64,
        c as i32
    );
    let want_add: Vec<f32> = (0..n)
        .map(|i| x[i] + gate[i / (hw * c) * c + i % c])
        .collect();
    assert_eq!(ya, want_add, "channel add");
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
    // 77 rows: with 2 × 8 row threads, every ILP lane of the column reductions gets rows, twice.
    let (groups, rows, c) = (2usize, 77usize, 40usize);
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

    // Per-group column dot products (the gate's gradient): products exact in f64.
    let y = random(&mut rng, groups * rows * c);
    let mut dots = vec![0.0f64; groups * c];
    run!(
        lib,
        "col_dot",
        reduce,
        (*const f32, *const f32, *mut f64, i64, i32),
        x.as_ptr(),
        y.as_ptr(),
        dots.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    let want_dots: Vec<f64> = (0..groups * c)
        .map(|zc| {
            let (z, ch) = (zc / c, zc % c);
            (0..rows)
                .map(|r| {
                    let i = (z * rows + r) * c + ch;
                    x[i] as f64 * y[i] as f64
                })
                .sum()
        })
        .collect();
    close(&dots, &want_dots, 1e-12, "col_dot");

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

// ---------------------------------------------------------------- 16-bit activation storage

/// A 16-bit activation storage type of the kernels: the `half` crate's type (the bare 16 bits,
/// laid out as `__half` / `__nv_bfloat16`) and the kernels' name suffix for it.
trait Act16: Copy + std::fmt::Debug {
    const SUFFIX: &'static str;
    /// Rounds to nearest even with the `half` crate (independent of the shim's conversions).
    fn round(v: f32) -> Self;
    fn widen(self) -> f32;
    fn bits(self) -> u16;
}

impl Act16 for half::f16 {
    const SUFFIX: &'static str = "_f16";
    fn round(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

impl Act16 for half::bf16 {
    const SUFFIX: &'static str = "_bf16";
    fn round(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// `v` rounded to `T`, and those values widened back: the f32 kernels' inputs.
fn narrow<T: Act16>(v: &[f32]) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = v.iter().map(|&x| T::round(x)).collect();
    let wide = t.iter().map(|x| x.widen()).collect();
    (t, wide)
}

/// An output buffer of NaNs (an element a kernel leaves unwritten fails the comparison).
fn nans<T: Act16>(n: usize) -> Vec<T> {
    vec![T::round(f32::NAN); n]
}

/// The 16-bit kernel's output is the f32 kernel's output rounded once, bit for bit. With
/// `rounds`, some f32 outputs must be inexact in `T`, so the rounding itself is under test.
fn assert_rounded<T: Act16>(got: &[T], want: &[f32], rounds: bool, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    assert!(want.iter().all(|v| v.is_finite()), "{what}: f32 reference");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let r = T::round(w);
        assert_eq!(
            g.bits(),
            r.bits(),
            "{what} ({}) [{i}]: {g:?} vs round({w}) = {r:?}",
            T::SUFFIX
        );
    }
    if rounds {
        let inexact = want.iter().filter(|&&w| T::round(w).widen() != w).count();
        assert!(inexact > 0, "{what} ({}): every output exact", T::SUFFIX);
    }
}

/// Bitwise equality of f64 or f32 results (the reductions and the f32 scratch).
fn assert_bits_eq<F: Copy + Into<f64>>(got: &[F], want: &[F], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = (g.into(), w.into());
        assert_eq!(g.to_bits(), w.to_bits(), "{what} [{i}]: {g} vs {w}");
    }
}

/// Every depthwise kernel (generic and specialized) in `T` against its f32 kernel on the
/// widened inputs, with the same grid.
fn depthwise_16<T: Act16>(lib: &libloading::Library) {
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
        // Odd sizes and channel counts: partial 32-channel blocks, unaligned rows.
        // The weight-gradient kernels synchronize (one std::thread per block thread, slow): at
        // two sizes, and the generic one (K a runtime argument) at k 3 only.
        for (h, w, c, weight) in [
            (9, 11, 40, true),
            (8, 9, 5, true),
            (10, 7, 33, false),
            (1, 3, 40, false),
        ] {
            let g = Geom::new(2, h, w, c, k, s);
            let n_in = g.b * g.h * g.w * g.c;
            let n_out = g.b * g.oh * g.ow * g.c;
            let (x, xw) = narrow::<T>(&random(&mut rng, n_in));
            let (gy, gyw) = narrow::<T>(&random(&mut rng, n_out));
            let wt = random(&mut rng, k * k * c);
            let ctx = format!("k{k} s{s} {h}x{w}x{c}");
            let spec = format!("k{k}s{s}");
            let (generic, rows) = ((3, 1, 1, 64, 1, 1), (2, 3, 1, 16, 1, 1));
            for (name, grid) in [
                ("dw_fwd".to_string(), generic),
                (format!("dw_fwd_{spec}"), rows),
            ] {
                let mut want = vec![f32::NAN; n_out];
                call(lib, &name, grid, &xw, &wt, &mut want, &g);
                let mut got = nans::<T>(n_out);
                call(
                    lib,
                    &(name.clone() + T::SUFFIX),
                    grid,
                    &x,
                    &wt,
                    &mut got,
                    &g,
                );
                assert_rounded(&got, &want, true, &format!("{name} {ctx}"));
            }
            for (name, grid) in [
                ("dw_grad_input".to_string(), generic),
                (format!("dw_grad_input_{spec}"), rows),
            ] {
                let mut want = vec![f32::NAN; n_in];
                call(lib, &name, grid, &gyw, &wt, &mut want, &g);
                let mut got = nans::<T>(n_in);
                call(
                    lib,
                    &(name.clone() + T::SUFFIX),
                    grid,
                    &gy,
                    &wt,
                    &mut got,
                    &g,
                );
                assert_rounded(&got, &want, true, &format!("{name} {ctx}"));
            }
            // Same grid, so the same partial sums meet the f64 atomics in the same order.
            if !weight {
                continue;
            }
            let cx = c.div_ceil(32) as u32;
            let mut weight = vec![(format!("dw_grad_weight_k{k}"), (cx, 1, 2, 32, 8, 1))];
            if k == 3 {
                weight.push(("dw_grad_weight".to_string(), (cx, 9, 1, 32, 8, 1)));
            }
            for (name, grid) in weight {
                let mut want = vec![0.0f64; k * k * c];
                call(lib, &name, grid, &xw, &gyw, &mut want, &g);
                let mut got = vec![0.0f64; k * k * c];
                call(
                    lib,
                    &(name.clone() + T::SUFFIX),
                    grid,
                    &x,
                    &gy,
                    &mut got,
                    &g,
                );
                assert!(want.iter().any(|&v| v != 0.0), "{name} {ctx}");
                assert_bits_eq(&got, &want, &format!("{name}{} {ctx}", T::SUFFIX));
            }
        }
    }
}

#[test]
fn depthwise_kernels_in_16_bit_equal_the_rounded_f32_kernels() {
    let Some(lib) = library() else { return };
    depthwise_16::<half::f16>(lib);
    depthwise_16::<half::bf16>(lib);
}

/// Runs `maxpool_fwd<suffix>` (with `g` None) or `maxpool_grad<suffix>` (f32 scratch `out`).
fn pool_run<X, O>(
    lib: &libloading::Library,
    name: &str,
    x: &[X],
    g: Option<&[X]>,
    out: &mut [O],
    i: [i32; 12],
) {
    let grid = (2, 1, 1, 16, 1, 1);
    if let Some(g) = g {
        run!(
            lib,
            name,
            grid,
            (
                *const X,
                *const X,
                *mut O,
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
            g.as_ptr(),
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
            i[9],
            i[10],
            i[11]
        );
    } else {
        run!(
            lib,
            name,
            grid,
            (
                *const X,
                *mut O,
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
            i[9],
            i[10],
            i[11]
        );
    }
}

/// Runs `cvt_f32_to<suffix>` on a small wrapping grid.
fn cvt_run<T: Act16>(lib: &libloading::Library, src: &[f32]) -> Vec<T> {
    let mut out = nans::<T>(src.len());
    run!(
        lib,
        format!("cvt_f32_to{}", T::SUFFIX),
        (3, 1, 1, 64, 1, 1),
        (*const f32, *mut T, i64),
        src.as_ptr(),
        out.as_mut_ptr(),
        src.len() as i64
    );
    out
}

/// Max-pool forward in `T` is the f32 forward rounded (exact: a maximum of T values); the
/// gradient's f32 scratch equals the f32 kernel's bit for bit, and `cvt_f32_to_*` narrows it.
fn max_pool_16<T: Act16>(lib: &libloading::Library) {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (h, w, kh, sh, c, ties) in [
        (9, 8, 3, 2, 5, false),
        (8, 9, 3, 2, 3, false),
        (5, 6, 2, 2, 5, false),
        (7, 7, 3, 1, 5, false),
        // Integer inputs: many equal maxima, where the first one must get the gradient.
        (9, 8, 3, 2, 5, true),
        (7, 7, 3, 1, 3, true),
    ] {
        let b = 2usize;
        let (oh, pt, _) = effdet_model::ops::same_padding(h, kh, sh);
        let (ow, pl, _) = effdet_model::ops::same_padding(w, kh, sh);
        let mut xs = random(&mut rng, b * h * w * c);
        if ties {
            xs.iter_mut().for_each(|v| *v = (*v * 2.0).round());
        }
        let (x, xw) = narrow::<T>(&xs);
        let (gy, gyw) = narrow::<T>(&random(&mut rng, b * oh * ow * c));
        let ints = [b, h, w, c, kh, kh, sh, sh, oh, ow, pt, pl].map(|v| v as i32);
        let ctx = format!("{h}x{w}x{c} k{kh} s{sh} ties {ties}");

        let mut want = vec![f32::NAN; gy.len()];
        pool_run(lib, "maxpool_fwd", &xw, None, &mut want, ints);
        let mut got = nans::<T>(gy.len());
        let name = format!("maxpool_fwd{}", T::SUFFIX);
        pool_run(lib, &name, &x, None, &mut got, ints);
        assert_rounded(&got, &want, false, &format!("maxpool_fwd {ctx}"));

        let mut want = vec![0.0f32; x.len()];
        pool_run(lib, "maxpool_grad", &xw, Some(&gyw), &mut want, ints);
        let mut got = vec![0.0f32; x.len()];
        let name = format!("maxpool_grad{}", T::SUFFIX);
        pool_run(lib, &name, &x, Some(&gy), &mut got, ints);
        assert!(want.iter().any(|&v| v != 0.0), "maxpool_grad {ctx}");
        assert_bits_eq(&got, &want, &format!("maxpool_grad{} {ctx}", T::SUFFIX));
        assert_rounded(&cvt_run::<T>(lib, &got), &got, false, "cvt_f32_to");
    }
}

#[test]
fn max_pool_kernels_in_16_bit_equal_the_rounded_f32_kernels() {
    let Some(lib) = library() else { return };
    max_pool_16::<half::f16>(lib);
    max_pool_16::<half::bf16>(lib);
}

/// Swish, its gradient, channel bias and channel gate in `T` against their f32 kernels.
fn elementwise_16<T: Act16>(lib: &libloading::Library) {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let (b, hw, c) = (3usize, 35usize, 7usize);
    let n = b * hw * c;
    // Activations up to ±6, where swish and its gradient bend.
    let big: Vec<f32> = random(&mut rng, n).iter().map(|v| v * 6.0).collect();
    let (x, xw) = narrow::<T>(&big);
    let (gy, gyw) = narrow::<T>(&random(&mut rng, n));
    // The gate is f32 for every activation type (a [B, C] sum over H·W in the backward).
    let gatew = random(&mut rng, b * c);
    let bias = random(&mut rng, c);
    let (grid, nn) = ((3u32, 1u32, 1u32, 32u32, 1u32, 1u32), n as i64);
    let sfx = T::SUFFIX;

    let (mut want, mut got) = (vec![f32::NAN; n], nans::<T>(n));
    run!(
        lib,
        "swish_fwd",
        grid,
        (*const f32, *mut f32, i64),
        xw.as_ptr(),
        want.as_mut_ptr(),
        nn
    );
    run!(
        lib,
        format!("swish_fwd{sfx}"),
        grid,
        (*const T, *mut T, i64),
        x.as_ptr(),
        got.as_mut_ptr(),
        nn
    );
    assert_rounded(&got, &want, true, "swish_fwd");

    let (mut want, mut got) = (vec![f32::NAN; n], nans::<T>(n));
    run!(
        lib,
        "swish_grad",
        grid,
        (*const f32, *const f32, *mut f32, i64),
        xw.as_ptr(),
        gyw.as_ptr(),
        want.as_mut_ptr(),
        nn
    );
    run!(
        lib,
        format!("swish_grad{sfx}"),
        grid,
        (*const T, *const T, *mut T, i64),
        x.as_ptr(),
        gy.as_ptr(),
        got.as_mut_ptr(),
        nn
    );
    assert_rounded(&got, &want, true, "swish_grad");

    let (mut want, mut got) = (vec![f32::NAN; n], nans::<T>(n));
    run!(
        lib,
        "bias_add",
        grid,
        (*const f32, *const f32, *mut f32, i64, i32),
        xw.as_ptr(),
        bias.as_ptr(),
        want.as_mut_ptr(),
        nn,
        c as i32
    );
    run!(
        lib,
        format!("bias_add{sfx}"),
        grid,
        (*const T, *const f32, *mut T, i64, i32),
        x.as_ptr(),
        bias.as_ptr(),
        got.as_mut_ptr(),
        nn,
        c as i32
    );
    assert_rounded(&got, &want, true, "bias_add");

    // x · v[b, c] and x + v[b, c].
    for name in ["channel_gate", "channel_add"] {
        let (mut want, mut got) = (vec![f32::NAN; n], nans::<T>(n));
        run!(
            lib,
            name,
            grid,
            (*const f32, *const f32, *mut f32, i64, i64, i32),
            xw.as_ptr(),
            gatew.as_ptr(),
            want.as_mut_ptr(),
            nn,
            hw as i64,
            c as i32
        );
        run!(
            lib,
            format!("{name}{sfx}"),
            grid,
            (*const T, *const f32, *mut T, i64, i64, i32),
            x.as_ptr(),
            gatew.as_ptr(),
            got.as_mut_ptr(),
            nn,
            hw as i64,
            c as i32
        );
        assert_rounded(&got, &want, true, name);
    }
}

#[test]
fn elementwise_kernels_in_16_bit_equal_the_rounded_f32_kernels() {
    let Some(lib) = library() else { return };
    elementwise_16::<half::f16>(lib);
    elementwise_16::<half::bf16>(lib);
}

/// Column sums, squared deviations, the batch-norm kernels and `scale_f64_to_*` in `T` against
/// their f32 kernels on the widened inputs (reductions with the same grid: same f64 sums in the
/// same order, so equal bit for bit).
fn reductions_16<T: Act16>(lib: &libloading::Library) {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    // 77 rows: with 2 × 8 row threads, every ILP lane of the column reductions gets rows, twice.
    let (groups, rows, c) = (2usize, 77usize, 40usize);
    let (x, xw) = narrow::<T>(&random(&mut rng, groups * rows * c));
    let (g, gw) = narrow::<T>(&random(&mut rng, rows * c));
    let reduce = (2u32, 2u32, groups as u32, 32u32, 8u32, 1u32);
    let one = (2u32, 2u32, 1u32, 32u32, 8u32, 1u32);
    let elementwise = (2u32, 1u32, 1u32, 64u32, 1u32, 1u32);
    let sfx = T::SUFFIX;
    let m = rows * c;

    let (mut want, mut got) = (vec![0.0f64; groups * c], vec![0.0f64; groups * c]);
    run!(
        lib,
        "col_sum",
        reduce,
        (*const f32, *mut f64, i64, i32),
        xw.as_ptr(),
        want.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    run!(
        lib,
        format!("col_sum{sfx}"),
        reduce,
        (*const T, *mut f64, i64, i32),
        x.as_ptr(),
        got.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    assert_bits_eq(&got, &want, &format!("col_sum{sfx}"));

    let (y, yw) = narrow::<T>(&random(&mut rng, groups * rows * c));
    let (mut want, mut got) = (vec![0.0f64; groups * c], vec![0.0f64; groups * c]);
    run!(
        lib,
        "col_dot",
        reduce,
        (*const f32, *const f32, *mut f64, i64, i32),
        xw.as_ptr(),
        yw.as_ptr(),
        want.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    run!(
        lib,
        format!("col_dot{sfx}"),
        reduce,
        (*const T, *const T, *mut f64, i64, i32),
        x.as_ptr(),
        y.as_ptr(),
        got.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    assert_bits_eq(&got, &want, &format!("col_dot{sfx}"));

    let mean: Vec<f64> = want[..c].iter().map(|s| s / rows as f64).collect();
    let (mut want, mut got) = (vec![0.0f64; c], vec![0.0f64; c]);
    run!(
        lib,
        "col_sq_dev",
        one,
        (*const f32, *const f64, *mut f64, i64, i32),
        xw.as_ptr(),
        mean.as_ptr(),
        want.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    run!(
        lib,
        format!("col_sq_dev{sfx}"),
        one,
        (*const T, *const f64, *mut f64, i64, i32),
        x.as_ptr(),
        mean.as_ptr(),
        got.as_mut_ptr(),
        rows as i64,
        c as i32
    );
    assert!(want.iter().all(|&v| v > 0.0));
    assert_bits_eq(&got, &want, &format!("col_sq_dev{sfx}"));

    let scale: Vec<f32> = random(&mut rng, c).iter().map(|v| v * 3.0).collect();
    let shift = random(&mut rng, c);
    for act in [0, 1] {
        let (mut want, mut got) = (vec![f32::NAN; m], nans::<T>(m));
        run!(
            lib,
            "bn_apply",
            elementwise,
            (*const f32, *const f32, *const f32, *mut f32, i64, i32, i32),
            xw.as_ptr(),
            scale.as_ptr(),
            shift.as_ptr(),
            want.as_mut_ptr(),
            m as i64,
            c as i32,
            act
        );
        run!(
            lib,
            format!("bn_apply{sfx}"),
            elementwise,
            (*const T, *const f32, *const f32, *mut T, i64, i32, i32),
            x.as_ptr(),
            scale.as_ptr(),
            shift.as_ptr(),
            got.as_mut_ptr(),
            m as i64,
            c as i32,
            act
        );
        assert_rounded(&got, &want, true, &format!("bn_apply act {act}"));
    }

    // chan = [mean, inv, gamma, beta], coef = [k, off, slope].
    let inv: Vec<f32> = (0..c).map(|_| rng.gen_range(0.5f32..2.0)).collect();
    let chan: Vec<f32> = mean
        .iter()
        .map(|&v| v as f32)
        .chain(inv)
        .chain(random(&mut rng, 2 * c))
        .collect();
    let coef = random(&mut rng, 3 * c);
    for act in [0, 1] {
        let (mut want, mut got) = (vec![0.0f64; 2 * c], vec![0.0f64; 2 * c]);
        run!(
            lib,
            "bn_grad_reduce",
            one,
            (*const f32, *const f32, *const f32, *mut f64, i64, i32, i32),
            xw.as_ptr(),
            gw.as_ptr(),
            chan.as_ptr(),
            want.as_mut_ptr(),
            rows as i64,
            c as i32,
            act
        );
        run!(
            lib,
            format!("bn_grad_reduce{sfx}"),
            one,
            (*const T, *const T, *const f32, *mut f64, i64, i32, i32),
            x.as_ptr(),
            g.as_ptr(),
            chan.as_ptr(),
            got.as_mut_ptr(),
            rows as i64,
            c as i32,
            act
        );
        assert!(want.iter().any(|&v| v != 0.0));
        assert_bits_eq(&got, &want, &format!("bn_grad_reduce{sfx} act {act}"));

        let (mut want, mut got) = (vec![f32::NAN; m], nans::<T>(m));
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
            xw.as_ptr(),
            gw.as_ptr(),
            chan.as_ptr(),
            coef.as_ptr(),
            want.as_mut_ptr(),
            m as i64,
            c as i32,
            act
        );
        run!(
            lib,
            format!("bn_grad_input{sfx}"),
            elementwise,
            (
                *const T,
                *const T,
                *const f32,
                *const f32,
                *mut T,
                i64,
                i32,
                i32
            ),
            x.as_ptr(),
            g.as_ptr(),
            chan.as_ptr(),
            coef.as_ptr(),
            got.as_mut_ptr(),
            m as i64,
            c as i32,
            act
        );
        assert_rounded(&got, &want, true, &format!("bn_grad_input act {act}"));
    }

    // f64 → f32 → T, as every store: the f16/bf16 sibling equals the f32 kernel, rounded.
    let src: Vec<f64> = (0..m).map(|_| rng.gen_range(-300.0..300.0)).collect();
    let (mut want, mut got) = (vec![f32::NAN; m], nans::<T>(m));
    run!(
        lib,
        "scale_f64_to_f32",
        elementwise,
        (*const f64, *mut f32, f64, i64),
        src.as_ptr(),
        want.as_mut_ptr(),
        1.0 / 37.0,
        m as i64
    );
    run!(
        lib,
        format!("scale_f64_to{sfx}"),
        elementwise,
        (*const f64, *mut T, f64, i64),
        src.as_ptr(),
        got.as_mut_ptr(),
        1.0 / 37.0,
        m as i64
    );
    assert_rounded(&got, &want, true, "scale_f64_to");
}

#[test]
fn reduction_and_batch_norm_kernels_in_16_bit_equal_the_f32_kernels() {
    let Some(lib) = library() else { return };
    reductions_16::<half::f16>(lib);
    reductions_16::<half::bf16>(lib);
}

/// f32 values around every rounding boundary of `T`: for each finite non-negative `T` value
/// below the largest, the midpoint to the next one (a tie, exact in f32) and its two f32
/// neighbours, with both signs.
fn boundaries<T: Act16>(from_bits: impl Fn(u16) -> T, max_bits: u16) -> Vec<f32> {
    let mut out = Vec::new();
    for b in 0..max_bits {
        let (lo, hi) = (from_bits(b).widen() as f64, from_bits(b + 1).widen() as f64);
        let mid = ((lo + hi) / 2.0) as f32;
        assert_eq!(
            mid as f64,
            (lo + hi) / 2.0,
            "midpoint of {b:#x} is not exact"
        );
        for v in [
            mid,
            f32::from_bits(mid.to_bits() - 1),
            f32::from_bits(mid.to_bits() + 1),
        ] {
            out.extend([v, -v]);
        }
    }
    out
}

/// The shim's f16/bf16 conversions (what the 16-bit kernels run on the CPU) against the `half`
/// crate: widening every bit pattern, and narrowing at every tie and its neighbours, at the
/// overflow and subnormal edges, on NaNs and on random bit patterns; the `cvt_f32_to_*` kernels
/// on the same values.
#[test]
fn shim_16_bit_conversions_equal_the_half_crate() {
    let Some(lib) = library() else { return };
    type Narrow = unsafe extern "C" fn(f32) -> u16;
    type Widen = unsafe extern "C" fn(u16) -> f32;
    // SAFETY: the shim_* exports of runners.cpp have exactly these signatures.
    let (to_f16, from_f16, to_bf16, from_bf16) = unsafe {
        (
            *lib.get::<Narrow>(b"shim_f32_to_f16\0").unwrap(),
            *lib.get::<Widen>(b"shim_f16_to_f32\0").unwrap(),
            *lib.get::<Narrow>(b"shim_f32_to_bf16\0").unwrap(),
            *lib.get::<Widen>(b"shim_bf16_to_f32\0").unwrap(),
        )
    };

    // Widening is exact. The half crate sets a signalling NaN's quiet bit, the shim (like CUDA's
    // bf16 widening, a shift) may not: NaNs need only stay NaN.
    for b in 0..=u16::MAX {
        // SAFETY: plain value functions.
        let (h, bf) = unsafe { (from_f16(b), from_bf16(b)) };
        for (got, want, what) in [
            (h, half::f16::from_bits(b).to_f32(), "f16"),
            (bf, half::bf16::from_bits(b).to_f32(), "bf16"),
        ] {
            if want.is_nan() {
                assert!(got.is_nan(), "{what} {b:#06x} → {got}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{what} {b:#06x}");
            }
        }
    }

    let bits = f32::from_bits;
    let mut edges = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        bits(0x7f80_0001), // signalling NaN
        bits(0xffc1_2345), // negative NaN with payload
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        bits(1),           // smallest f32 subnormal
        bits(0x0040_8000), // f32 subnormal on a bf16 tie
        65504.0,           // f16 max
        bits(0x477f_efff), // just below f16's overflow tie (65520)
        65520.0,           // f16's overflow tie: rounds to infinity
        65536.0,
        1e6,
        bits(0x7f7f_7fff), // just below bf16's overflow tie
        bits(0x7f7f_8000), // bf16's overflow tie: rounds to infinity
        2f32.powi(-24),    // smallest f16 subnormal
        2f32.powi(-25),    // its half: a tie to 0
        1.5 * 2f32.powi(-25),
        3.0 * 2f32.powi(-25), // tie between 2 and 4 × 2^-25: up to the even 4
        2f32.powi(-26),
        2f32.powi(-14) - 2f32.powi(-25), // largest f16 subnormal + half ulp: a tie to normal
        1.0 + 2f32.powi(-11),            // f16 tie at 1: stays 1 (even)
        1.0 + 3.0 * 2f32.powi(-11),      // f16 tie: up to the even 1 + 2^-9
        1.0 + 2f32.powi(-8),             // bf16 tie at 1
        1.0 + 3.0 * 2f32.powi(-8),
    ];
    edges.extend(edges.clone().iter().map(|v| -v));
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let random_bits: Vec<f32> = (0..50_000).map(|_| bits(rng.gen())).collect();

    fn check<T: Act16>(
        lib: &libloading::Library,
        narrow: Narrow,
        values: &[f32],
        what: &str,
    ) -> (usize, usize) {
        let (mut up, mut down) = (0, 0);
        let kernel = cvt_run::<T>(lib, values);
        for (&v, k) in values.iter().zip(kernel) {
            // SAFETY: a plain value function.
            let got = unsafe { narrow(v) };
            let want = T::round(v);
            assert_eq!(
                got,
                want.bits(),
                "{what}{} of {v:e} ({:#010x})",
                T::SUFFIX,
                v.to_bits()
            );
            assert_eq!(k.bits(), got, "cvt_f32_to{} of {v:e}", T::SUFFIX);
            let r = want.widen();
            if r.abs() > v.abs() {
                up += 1;
            } else if r.abs() < v.abs() {
                down += 1;
            }
        }
        (up, down)
    }
    for values in [&edges, &random_bits] {
        check::<half::f16>(lib, to_f16, values, "narrow");
        check::<half::bf16>(lib, to_bf16, values, "narrow");
    }
    // At the ties, nearest-even must round both ways (truncation or round-half-up would not).
    let ties16 = boundaries(half::f16::from_bits, 0x7bff);
    let (up, down) = check::<half::f16>(lib, to_f16, &ties16, "ties");
    assert!(
        up > 10_000 && down > 10_000,
        "f16 ties: {up} up, {down} down"
    );
    let ties_b = boundaries(half::bf16::from_bits, 0x7f7f);
    let (up, down) = check::<half::bf16>(lib, to_bf16, &ties_b, "ties");
    assert!(
        up > 10_000 && down > 10_000,
        "bf16 ties: {up} up, {down} down"
    );
}

/// Every kernel the model's Rust code launches exists in kernels.cu: names passed to
/// `Kernel::new` as they are, names passed to `kernel_for` (dispatch on the activation dtype)
/// also with `_f16` and `_bf16`, and the depthwise specializations `depthwise.rs` builds from
/// D0's shapes. The CPU-compiled library exports the same `extern "C"` names as the PTX.
#[test]
fn every_kernel_the_rust_side_launches_exists() {
    let Some(lib) = library() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("model/src");
    let mut sources = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                sources.push(std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    // The string literal right after `marker` in every source.
    let literals = |marker: &str| -> Vec<String> {
        let mut out = Vec::new();
        for s in &sources {
            for part in s.split(marker).skip(1) {
                if let Some(rest) = part.strip_prefix('"') {
                    out.push(rest.split('"').next().unwrap().to_string());
                }
            }
        }
        out
    };
    let mut names: Vec<String> = literals("Kernel::new(dev, ");
    names.extend(literals("Kernel::new(&dev, "));
    let dispatched = literals("kernel_for(dev, ");
    assert!(
        names.len() >= 10 && dispatched.len() >= 10,
        "found only {names:?} / {dispatched:?}: did the call syntax change?"
    );
    for base in &dispatched {
        names.extend(["", "_f16", "_bf16"].map(|s| format!("{base}{s}")));
    }
    for s in ["", "_f16", "_bf16"] {
        for k in [3, 5] {
            names.push(format!("dw_grad_weight_k{k}{s}"));
            for st in [1, 2] {
                names.push(format!("dw_fwd_k{k}s{st}{s}"));
                names.push(format!("dw_grad_input_k{k}s{st}{s}"));
            }
        }
        names.push(format!(
            "scale_f64_to{}",
            if s.is_empty() { "_f32" } else { s }
        ));
        if !s.is_empty() {
            names.push(format!("cvt_f32_to{s}"));
        }
    }
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| {
            let sym = format!("{n}\0");
            // SAFETY: only the symbol's presence is checked; nothing is called.
            unsafe { lib.get::<unsafe extern "C" fn()>(sym.as_bytes()) }.is_err()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "kernels missing from kernels.cu: {missing:?}"
    );
}

fn refs(v: &[Tensor]) -> Vec<&Tensor> {
    v.iter().collect()
}

/// kernels.cu's `MtTable` with host addresses (the kernels only dereference them).
#[repr(C)]
#[derive(Clone, Copy)]
struct MtTable {
    g: [u64; 32],
    w: [u64; 32],
    m: [u64; 32],
    n: [i64; 32],
    a: [f32; 32],
    b: [f32; 32],
    block_start: [i32; 33],
    count: i32,
}

/// The multi-tensor optimizer kernels (one launch for many tensors, a block per 4096-element
/// chunk) against the CPU path of `ops::multi_tensor`: sums of squares to f64 rounding (the
/// block reduction sums in another order), the SGD and moving-average updates bit for bit.
#[test]
fn multi_tensor_kernels_equal_the_cpu_path() {
    use effdet_model::ops::multi_tensor as mt;
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    // Sizes straddling the 4096-element chunk, and one empty-ish tensor.
    let sizes = [5000usize, 3, 4097, 1];
    let mk =
        |rng: &mut ChaCha8Rng| -> Vec<Vec<f32>> { sizes.iter().map(|&n| random(rng, n)).collect() };
    let (gs, ws, ms) = (mk(&mut rng), mk(&mut rng), mk(&mut rng));
    let coef: Vec<(f32, f32)> = vec![(0.5, 4e-5), (2.0, 0.0), (0.125, 1e-3), (1.0, 1.0)];
    let tensors = |v: &[Vec<f32>]| -> Vec<Tensor> {
        v.iter()
            .map(|x| Tensor::from_vec(x.clone(), x.len(), &Device::Cpu).unwrap())
            .collect()
    };
    let (gt, wt, mtn) = (tensors(&gs), tensors(&ws), tensors(&ms));
    let (gr, wr, mr) = (gt.clone(), wt.clone(), mtn.clone());
    let want_sq: Vec<f64> = mt::sums_of_squares(&refs(&gr), &refs(&wr), &coef)
        .unwrap()
        .to_vec1()
        .unwrap();

    let starts = {
        let mut s = vec![0i32];
        for &n in &sizes {
            s.push(s.last().unwrap() + n.div_ceil(4096).max(1) as i32);
        }
        s
    };
    let (mut gk, mut wk, mut mk_) = (gs.clone(), ws.clone(), ms.clone());
    let table = |g: &mut [Vec<f32>], w: &mut [Vec<f32>], m: &mut [Vec<f32>]| {
        let mut t = MtTable {
            g: [0; 32],
            w: [0; 32],
            m: [0; 32],
            n: [0; 32],
            a: [0.0; 32],
            b: [0.0; 32],
            block_start: [0; 33],
            count: sizes.len() as i32,
        };
        for i in 0..sizes.len() {
            t.g[i] = g[i].as_mut_ptr() as u64;
            t.w[i] = w[i].as_mut_ptr() as u64;
            t.m[i] = m[i].as_mut_ptr() as u64;
            t.n[i] = sizes[i] as i64;
            t.a[i] = coef[i].0;
            t.b[i] = coef[i].1;
        }
        t.block_start[..starts.len()].copy_from_slice(&starts);
        t
    };
    let grid = (*starts.last().unwrap() as u32, 1, 1, 256, 1, 1);
    let tab = table(&mut gk, &mut wk, &mut mk_);
    let mut sq = vec![0f64; sizes.len()];
    run!(
        lib,
        "mt_sum_squares",
        grid,
        (MtTable, *mut f64),
        tab,
        sq.as_mut_ptr()
    );
    for (i, (&got, &want)) in sq.iter().zip(&want_sq).enumerate() {
        assert!(
            (got - want).abs() <= 1e-12 * want.abs(),
            "sum {i}: {got} vs {want}"
        );
    }

    // SGD: the kernel (fewer threads than a chunk, so the in-chunk loop wraps) vs the CPU.
    let small = (grid.0, 1, 1, 64, 1, 1);
    run!(
        lib,
        "mt_sgd",
        small,
        (MtTable, f32, f32),
        tab,
        0.9f32,
        -0.08f32
    );
    mt::sgd_momentum(&refs(&wr), &refs(&mr), &refs(&gr), &coef, 0.9, 0.08).unwrap();
    for i in 0..sizes.len() {
        assert_eq!(wk[i], vec_of(&wr[i]), "weight {i}");
        assert_eq!(mk_[i], vec_of(&mr[i]), "momentum {i}");
    }

    // Moving average: x in w, y in g.
    run!(
        lib,
        "mt_axpby",
        small,
        (MtTable, f32, f32),
        tab,
        0.99f32,
        0.01f32
    );
    mt::axpby_all(&refs(&wr), &refs(&gr), 0.99, 1.0 - 0.99).unwrap();
    for i in 0..sizes.len() {
        assert_eq!(wk[i], vec_of(&wr[i]), "average {i}");
    }
}

/// The batch-norm running-average kernel against `batch_norm_update_running` on the CPU, bit
/// for bit (grid smaller than the channels, so the loop wraps).
#[test]
fn bn_running_update_kernel_equals_the_cpu_op() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let c = 77usize;
    let mean0 = random(&mut rng, c);
    let var0: Vec<f32> = random(&mut rng, c).iter().map(|v| v.abs() + 0.5).collect();
    let moments: Vec<f64> = (0..2 * c)
        .map(|i| {
            if i < c {
                rng.gen_range(-1.0..1.0)
            } else {
                rng.gen_range(0.5..3.0)
            }
        })
        .collect();
    let (m, eps, bessel) = (0.99f64, 1e-3f64, 64.0 / 63.0);
    let (mut mean, mut var) = (mean0.clone(), var0.clone());
    run!(
        lib,
        "bn_running_update",
        (1, 1, 1, 32, 1, 1),
        (*mut f32, *mut f32, *const f64, i32, f64, f64, f64, f64),
        mean.as_mut_ptr(),
        var.as_mut_ptr(),
        moments.as_ptr(),
        c as i32,
        m,
        1.0 - m,
        eps,
        bessel
    );
    let dev = Device::Cpu;
    let mt = Tensor::from_vec(mean0, c, &dev).unwrap();
    let vt = Tensor::from_vec(var0, c, &dev).unwrap();
    let mom = Tensor::from_vec(moments, (2, c), &dev).unwrap();
    effdet_model::ops::batch_norm_update_running(&mt, &vt, &mom, m, eps, bessel).unwrap();
    assert_eq!(mean, vec_of(&mt), "mean");
    assert_eq!(var, vec_of(&vt), "var");
}

/// The batch-norm parameter stacking and input-gradient constants kernels against the CPU ops'
/// formulas (`batch_norm/resident.rs`: `StackParams`, `GradConsts`), bit for bit, in training
/// and evaluation mode (grid smaller than the channels, so the loop wraps).
#[test]
fn bn_stack_params_and_grad_consts_kernels_equal_their_formulas() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    let c = 77usize;
    let moments: Vec<f64> = (0..2 * c).map(|_| rng.gen_range(0.1..3.0)).collect();
    let (gamma, beta) = (random(&mut rng, c), random(&mut rng, c));
    let mut p = vec![f64::NAN; 4 * c];
    run!(
        lib,
        "bn_stack_params",
        (1, 1, 1, 32, 1, 1),
        (*const f64, *const f32, *const f32, *mut f64, i32),
        moments.as_ptr(),
        gamma.as_ptr(),
        beta.as_ptr(),
        p.as_mut_ptr(),
        c as i32
    );
    let widened = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let want_p = [moments.clone(), widened(&gamma), widened(&beta)].concat();
    assert_eq!(p, want_p, "stacked params");

    let sums: Vec<f32> = random(&mut rng, 2 * c).iter().map(|v| v * 300.0).collect();
    let rows = 4096usize;
    for train in [true, false] {
        let mut out = vec![f32::NAN; 7 * c];
        run!(
            lib,
            "bn_grad_consts",
            (1, 1, 1, 32, 1, 1),
            (*const f64, *const f32, *mut f32, i32, f64, i32),
            p.as_ptr(),
            sums.as_ptr(),
            out.as_mut_ptr(),
            c as i32,
            rows as f64,
            train as i32
        );
        let mut want: Vec<f32> = p.iter().map(|&v| v as f32).collect();
        let k: Vec<f64> = (0..c).map(|i| p[2 * c + i] * p[c + i]).collect();
        want.extend(k.iter().map(|&v| v as f32));
        for row in 0..2 {
            want.extend((0..c).map(|i| {
                if train {
                    (k[i] / rows as f64 * sums[row * c + i] as f64) as f32
                } else {
                    0.0
                }
            }));
        }
        assert_eq!(out, want, "gradient constants, train={train}");
    }
}

/// Runs `fusion_fwd{sfx}` on `inputs` (k of them; the unused slots repeat the first) into `y`.
#[allow(clippy::too_many_arguments)]
fn fusion_fwd_run(
    lib: &libloading::Library,
    name: &str,
    grid: Grid,
    inputs: &[*const u8],
    w: &[f32],
    y: *mut u8,
    n: usize,
) {
    let x = |i: usize| *inputs.get(i).unwrap_or(&inputs[0]);
    run!(
        lib,
        name,
        grid,
        (
            *const u8,
            *const u8,
            *const u8,
            *const u8,
            *const f32,
            *mut u8,
            i64,
            i32
        ),
        x(0),
        x(1),
        x(2),
        x(3),
        w.as_ptr(),
        y,
        n as i64,
        inputs.len() as i32
    );
}

/// Runs `fusion_grad{sfx}` for input `i` of `w.len()` over `n` elements: its gradient into `gx`,
/// Σ g·x added into `dot[i]`.
fn fusion_grad_run(
    lib: &libloading::Library,
    name: &str,
    grid: Grid,
    (g, x): (*const u8, *const u8),
    (w, i): (&[f32], usize),
    (gx, n): (*mut u8, usize),
    dot: &mut [f64],
) {
    run!(
        lib,
        name,
        grid,
        (
            *const u8,
            *const u8,
            *const f32,
            i32,
            i32,
            *mut u8,
            *mut f64,
            i64
        ),
        g,
        x,
        w.as_ptr(),
        w.len() as i32,
        i as i32,
        gx,
        dot.as_mut_ptr(),
        n as i64
    );
}

/// The fusion kernels in `T` against the f32 kernels on the widened inputs: outputs and input
/// gradients rounded once, bit for bit; the dot products equal (same grid, same order).
fn fusion_16<T: Act16>(lib: &libloading::Library, xs: &[Vec<f32>], g: &[f32], w: &[f32]) {
    let sfx = T::SUFFIX;
    let n = g.len();
    let k = xs.len();
    let narrowed: Vec<(Vec<T>, Vec<f32>)> = xs.iter().map(|x| narrow::<T>(x)).collect();
    let (g16, gw) = narrow::<T>(g);
    let ptr = |i: usize, wide: bool| -> *const u8 {
        if wide {
            narrowed[i].1.as_ptr() as *const u8
        } else {
            narrowed[i].0.as_ptr() as *const u8
        }
    };
    let grid = (3, 1, 1, 256, 1, 1);
    let mut want = vec![f32::NAN; n];
    let mut got = nans::<T>(n);
    let wide: Vec<*const u8> = (0..k).map(|i| ptr(i, true)).collect();
    fusion_fwd_run(
        lib,
        "fusion_fwd",
        grid,
        &wide,
        w,
        want.as_mut_ptr() as *mut u8,
        n,
    );
    let narrow_in: Vec<*const u8> = (0..k).map(|i| ptr(i, false)).collect();
    fusion_fwd_run(
        lib,
        &format!("fusion_fwd{sfx}"),
        grid,
        &narrow_in,
        w,
        got.as_mut_ptr() as *mut u8,
        n,
    );
    assert_rounded(&got, &want, true, "fusion_fwd");
    for i in 0..k {
        let (mut gx_want, mut gx_got) = (vec![f32::NAN; n], nans::<T>(n));
        let (mut dot_want, mut dot_got) = (vec![0.0f64; k], vec![0.0f64; k]);
        fusion_grad_run(
            lib,
            "fusion_grad",
            grid,
            (
                gw.as_ptr() as *const u8,
                narrowed[i].1.as_ptr() as *const u8,
            ),
            (w, i),
            (gx_want.as_mut_ptr() as *mut u8, n),
            &mut dot_want,
        );
        fusion_grad_run(
            lib,
            &format!("fusion_grad{sfx}"),
            grid,
            (
                g16.as_ptr() as *const u8,
                narrowed[i].0.as_ptr() as *const u8,
            ),
            (w, i),
            (gx_got.as_mut_ptr() as *mut u8, n),
            &mut dot_got,
        );
        // (A negative weight's input gets exact zeros.)
        let rounds = w[i] > 0.0;
        assert_rounded(&gx_got, &gx_want, rounds, "fusion_grad input gradient");
        assert_bits_eq(&dot_got, &dot_want, "fusion_grad dot");
    }
}

/// The BiFPN fusion kernels against the CPU op (`ops::fast_fusion` and its recorded
/// backward): forward and input gradients bit for bit (f32), the dot products and weight
/// gradient to f64 summation order; then the 16-bit instantiations against the f32 kernels.
/// Two and three inputs, a negative weight (relu cut-off), more elements than the grid's threads.
#[test]
fn fusion_kernels_equal_the_cpu_op() {
    use effdet_model::tape::{record, Tape};
    use std::rc::Rc;
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(47);
    let dims = [2usize, 9, 11, 16];
    let n: usize = dims.iter().product();
    for (k, w) in [(2usize, vec![0.8f32, 1.1]), (3, vec![0.6, -0.4, 1.7])] {
        let xs: Vec<Vec<f32>> = (0..k)
            .map(|_| random(&mut rng, n).iter().map(|v| v * 4.0).collect())
            .collect();
        let g = random(&mut rng, n);
        let dev = Device::Cpu;
        let xt: Vec<Tensor> = xs
            .iter()
            .map(|x| Tensor::from_vec(x.clone(), &dims[..], &dev).unwrap())
            .collect();
        let vars: Vec<candle_core::Var> = xt
            .iter()
            .map(|t| candle_core::Var::from_tensor(t).unwrap())
            .collect();
        let wv = candle_core::Var::from_tensor(&Tensor::new(&w[..], &dev).unwrap()).unwrap();
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let tape = Rc::new(Tape::default());
        let y = record(&tape, || {
            effdet_model::ops::fast_fusion(&inputs, wv.as_tensor())
        })
        .unwrap();
        let tape = Rc::try_unwrap(tape).ok().unwrap();
        let gt = Tensor::from_vec(g.clone(), &dims[..], &dev).unwrap();
        let grads = tape.backward(vec![(y.id(), gt)]).unwrap();

        let grid = (5, 1, 1, 256, 1, 1);
        let mut yk = vec![f32::NAN; n];
        let inputs_in: Vec<*const u8> = xs.iter().map(|x| x.as_ptr() as *const u8).collect();
        fusion_fwd_run(
            lib,
            "fusion_fwd",
            grid,
            &inputs_in,
            &w,
            yk.as_mut_ptr() as *mut u8,
            n,
        );
        assert_eq!(yk, vec_of(&y), "fusion_fwd, {k} inputs");
        let mut dots = vec![0.0f64; k];
        for i in 0..k {
            let mut gx = vec![f32::NAN; n];
            fusion_grad_run(
                lib,
                "fusion_grad",
                grid,
                (g.as_ptr() as *const u8, xs[i].as_ptr() as *const u8),
                (&w, i),
                (gx.as_mut_ptr() as *mut u8, n),
                &mut dots,
            );
            assert_eq!(gx, vec_of(&grads[&inputs[i].id()]), "input {i} gradient");
            let exact: f64 = g
                .iter()
                .zip(&xs[i])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            assert!(
                (dots[i] - exact).abs() <= 1e-12 * exact.abs().max(1.0),
                "dot {i}: {} vs {exact}",
                dots[i]
            );
        }
        let mut gw = vec![f32::NAN; k];
        run!(
            lib,
            "fusion_weight_grad",
            (1, 1, 1, 1, 1, 1),
            (*const f32, *const f64, *mut f32, i32),
            w.as_ptr(),
            dots.as_ptr(),
            gw.as_mut_ptr(),
            k as i32
        );
        let want = vec_of(&grads[&wv.as_tensor().id()]);
        for (a, b) in gw.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "weight gradient {gw:?} vs {want:?}"
            );
        }
        assert_eq!(gw[k - 1] == 0.0, w[k - 1] < 0.0, "relu cut-off: {gw:?}");
        fusion_16::<half::f16>(lib, &xs, &g, &w);
        fusion_16::<half::bf16>(lib, &xs, &g, &w);
    }
}

/// Runs `stem_patches{suffix}` over images `x` ([B, C, H, W] in the kernel's storage type) with
/// the kernel's integer arguments; every output starts as `fill`.
fn stem_run<T: Copy>(
    lib: &libloading::Library,
    name: &str,
    x: &[T],
    i: [i32; 8],
    fill: T,
) -> Vec<T> {
    let mut out = vec![fill; (i[0] * i[4] * i[5] * i[1] * 9) as usize];
    run!(
        lib,
        name,
        (3, 1, 1, 32, 1, 1),
        (*const T, *mut T, i32, i32, i32, i32, i32, i32, i32, i32),
        x.as_ptr(),
        out.as_mut_ptr(),
        i[0],
        i[1],
        i[2],
        i[3],
        i[4],
        i[5],
        i[6],
        i[7]
    );
    out
}

/// The stem's im2col kernel equals the CPU op bit for bit (odd and even sizes: "same" pads
/// before the image or not), in f32 and f16.
#[test]
fn stem_patches_kernel_equals_the_cpu_op() {
    let Some(lib) = library() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for (h, w) in [(9, 8), (8, 9), (5, 5)] {
        let (b, c) = (2usize, 3usize);
        let (oh, pt, _) = effdet_model::ops::same_padding(h, 3, 2);
        let (ow, pl, _) = effdet_model::ops::same_padding(w, 3, 2);
        let x = random(&mut rng, b * c * h * w);
        let images = Tensor::from_vec(x.clone(), (b, c, h, w), &Device::Cpu).unwrap();
        let i = [b, c, h, w, oh, ow, pt, pl].map(|v| v as i32);
        let cpu = |t: &Tensor| effdet_model::ops::stem_patches(t, (oh, ow), pt, pl).unwrap();

        let got = stem_run(lib, "stem_patches", &x, i, f32::NAN);
        assert_bits_eq(
            &got,
            &vec_of(&cpu(&images)),
            &format!("stem_patches {h}x{w}"),
        );
        assert!(got.contains(&0.0) && got.iter().any(|&v| v != 0.0));

        let (x16, _) = narrow::<half::f16>(&x);
        let got16 = stem_run(lib, "stem_patches_f16", &x16, i, half::f16::NAN);
        let want16 = cpu(&images.to_dtype(candle_core::DType::F16).unwrap())
            .flatten_all()
            .unwrap()
            .to_vec1::<half::f16>()
            .unwrap();
        let bits = |v: &[half::f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
        assert_eq!(bits(&got16), bits(&want16), "stem_patches_f16 {h}x{w}");
    }
}
