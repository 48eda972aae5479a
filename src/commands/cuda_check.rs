//! `effdet cuda-check`: GPU results against the CPU. First every own op (forward and
//! gradients on random inputs; f32, then with f16 and bf16 activations as mixed precision
//! stores them), then the whole D0 training loss and all its gradients for one
//! pipeline batch and identical weights. Prints one JSON object and exits non-zero when any
//! relative error (‖gpu − cpu‖ / ‖cpu‖) exceeds `--tolerance`.

use candle_core::{DType, Device, Tensor, Var};
use effdet_model::ops::{self, Activation, FocalParams};
use effdet_pipeline::augment::Mode;
use serde::Serialize;

use super::bench_train::device_info;
use super::data::{start_loader, DataArgs, LabelSpec};
use super::step::{BatchTensors, Trainer};
use super::train::load_config;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Model config (TOML path or built-in name).
    #[arg(long, default_value = "efficientdet-d0")]
    pub config: String,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Largest relative error accepted.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
}

#[derive(Serialize, Debug)]
struct Check {
    name: String,
    /// Relative error of the output.
    output: f64,
    /// Largest relative error over the gradients.
    gradients: f64,
    /// The variable with the largest gradient error (model check).
    worst: Option<String>,
    /// Largest accepted error (the tolerance, unless the check sets its own).
    limit: Option<f64>,
    pass: bool,
}

#[derive(Serialize, Debug)]
struct Report {
    device_name: String,
    tolerance: f64,
    checks: Vec<Check>,
    pass: bool,
    /// What one op costs the host (informational; not part of `pass`).
    host_costs: Vec<HostCost>,
}

/// The host time of one op on a tiny tensor, where the device's work is negligible: what a
/// training step pays per launch when it is launch-bound (its `tensors_per_step` times this).
#[derive(Serialize, Debug)]
struct HostCost {
    op: &'static str,
    /// Host time per op while enqueueing `count` of them, µs.
    enqueue_us: f64,
    /// Per op until the device has run them all, µs (above `enqueue_us`: the device's own
    /// per-kernel time is the limit for ops this small).
    completed_us: f64,
    count: usize,
}

/// Times `count` repetitions of each kind of op a step is made of, on tiny tensors: an own
/// kernel updating in place (lookup + launch), an own op with a new output (+ allocation and
/// free), a stock candle op with a new output, and a stock broadcasting op (+ a host-to-device
/// copy of its shape and strides).
fn host_costs(dev: &Device, count: usize) -> anyhow::Result<Vec<HostCost>> {
    let x = Tensor::ones(4usize, DType::F32, dev)?;
    let y = Tensor::ones(4usize, DType::F32, dev)?;
    let (col, row) = (x.reshape((4, 1))?, y.reshape((1, 4))?);
    type Op<'a> = Box<dyn Fn() -> anyhow::Result<()> + 'a>;
    let cases: Vec<(&'static str, Op)> = vec![
        (
            "own kernel in place (axpby)",
            Box::new(|| Ok(ops::axpby_inplace(&x, &y, 1.0, 0.0)?)),
        ),
        (
            "own op, new output (swish)",
            Box::new(|| {
                ops::swish(&x)?;
                Ok(())
            }),
        ),
        (
            "candle op, new output (affine)",
            Box::new(|| {
                x.affine(1.0, 0.0)?;
                Ok(())
            }),
        ),
        (
            "candle broadcast op (broadcast_add)",
            Box::new(|| {
                col.broadcast_add(&row)?;
                Ok(())
            }),
        ),
    ];
    let mut out = Vec::new();
    for (op, f) in cases {
        for _ in 0..count.min(200) {
            f()?;
        }
        dev.synchronize()?;
        let t0 = std::time::Instant::now();
        for _ in 0..count {
            f()?;
        }
        let enqueued = t0.elapsed();
        dev.synchronize()?;
        let completed = t0.elapsed();
        let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / count.max(1) as f64;
        out.push(HostCost {
            op,
            enqueue_us: per(enqueued),
            completed_us: per(completed),
            count,
        });
    }
    Ok(out)
}

/// ‖a − b‖ / ‖b‖ (both moved to the CPU as f64).
fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

/// Deterministic inputs in [-1, 1).
fn random(shape: &[usize], seed: u64) -> anyhow::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

type OpFn = dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// Runs `f` on the CPU and the GPU from the same inputs; compares the output and the gradients
/// of Σ output·r (r random) with respect to every input.
fn check_op(name: &str, gpu: &Device, inputs: &[Tensor], f: &OpFn) -> anyhow::Result<Check> {
    check_op_with(name, gpu, inputs, f, false)
}

/// [`check_op`] with the gradients from the training tape (the ops' recorded backward rules,
/// as a training step computes them) instead of candle's backward.
fn check_taped_op(name: &str, gpu: &Device, inputs: &[Tensor], f: &OpFn) -> anyhow::Result<Check> {
    check_op_with(&format!("{name} (tape)"), gpu, inputs, f, true)
}

fn check_op_with(
    name: &str,
    gpu: &Device,
    inputs: &[Tensor],
    f: &OpFn,
    taped: bool,
) -> anyhow::Result<Check> {
    let run = |dev: &Device| -> anyhow::Result<(Tensor, Vec<Tensor>)> {
        let vars = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        if taped {
            let tape = std::rc::Rc::new(effdet_model::tape::Tape::default());
            let y = effdet_model::tape::record(&tape, || f(&ts))?;
            let tape = std::rc::Rc::try_unwrap(tape)
                .map_err(|_| anyhow::anyhow!("{name}: the tape is still shared"))?;
            let r = random(y.dims(), 99)?.to_dtype(y.dtype())?.to_device(dev)?;
            let mut grads = tape.backward(vec![(y.id(), r)])?;
            let gs = ts
                .iter()
                .map(|t| {
                    grads
                        .remove(&t.id())
                        .ok_or_else(|| anyhow::anyhow!("{name}: no gradient for an input"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            return Ok((y, gs));
        }
        let y = f(&ts)?;
        let r = random(y.dims(), 99)?.to_dtype(y.dtype())?.to_device(dev)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let gs = vars
            .iter()
            .map(|v| {
                grads
                    .get(v)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("{name}: no gradient for an input"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((y, gs))
    };
    let (yc, gc) = run(&Device::Cpu)?;
    let (yg, gg) = run(gpu)?;
    let output = rel_err(&yg, &yc)?;
    let mut gradients = 0f64;
    for (g, c) in gg.iter().zip(&gc) {
        gradients = gradients.max(rel_err(g, c)?);
    }
    Ok(Check {
        name: name.into(),
        output,
        gradients,
        worst: None,
        limit: None,
        pass: false,
    })
}

fn op_checks(gpu: &Device) -> anyhow::Result<Vec<Check>> {
    let mut out = Vec::new();
    for (k, s, h, w) in [(3, 1, 9, 7), (3, 2, 10, 9), (5, 2, 17, 16), (5, 1, 8, 8)] {
        out.push(check_op(
            &format!("depthwise k{k} s{s} {h}x{w}"),
            gpu,
            &[random(&[2, h, w, 40], 1)?, random(&[k, k, 40], 2)?],
            &move |v| ops::depthwise_conv2d(&v[0], &v[1], s),
        )?);
    }
    out.push(check_op(
        "max_pool 3x3 s2",
        gpu,
        &[random(&[2, 11, 10, 24], 3)?],
        &|v| ops::max_pool2d_same(&v[0], (3, 3), (2, 2)),
    )?);
    for act in [Activation::None, Activation::Swish] {
        out.push(check_op(
            &format!("batch_norm_train {act:?}"),
            gpu,
            &[
                (random(&[3, 6, 5, 48], 4)? * 3.0)?,
                random(&[48], 5)?,
                random(&[48], 6)?,
            ],
            &move |v| Ok(ops::batch_norm_train(&v[0], &v[1], &v[2], 1e-3, act)?.0),
        )?);
        let mean = random(&[48], 7)?;
        let var = (random(&[48], 8)?.abs()? + 0.5)?;
        out.push(check_op(
            &format!("batch_norm_eval {act:?}"),
            gpu,
            &[
                random(&[3, 6, 5, 48], 9)?,
                random(&[48], 10)?,
                random(&[48], 11)?,
            ],
            &move |v| {
                let dev = v[0].device();
                let (m, s) = (mean.to_device(dev)?, var.to_device(dev)?);
                ops::batch_norm_eval(&v[0], &v[1], &v[2], &m, &s, 1e-3, act)
            },
        )?);
    }
    // The device-resident batch norm (used on GPUs) against the CPU's host-statistics one.
    for act in [Activation::None, Activation::Swish] {
        out.push(check_op(
            &format!("batch_norm_train_resident {act:?}"),
            gpu,
            &[
                (random(&[3, 6, 5, 48], 4)? * 3.0)?,
                random(&[48], 5)?,
                random(&[48], 6)?,
            ],
            &move |v| {
                if v[0].device().is_cpu() {
                    Ok(ops::batch_norm_train(&v[0], &v[1], &v[2], 1e-3, act)?.0)
                } else {
                    Ok(ops::batch_norm_train_resident(&v[0], &v[1], &v[2], 1e-3, act)?.0)
                }
            },
        )?);
        let mean = random(&[48], 7)?;
        let var = (random(&[48], 8)?.abs()? + 0.5)?;
        out.push(check_op(
            &format!("batch_norm_eval_resident {act:?}"),
            gpu,
            &[
                random(&[3, 6, 5, 48], 9)?,
                random(&[48], 10)?,
                random(&[48], 11)?,
            ],
            &move |v| {
                let dev = v[0].device();
                let (m, s) = (mean.to_device(dev)?, var.to_device(dev)?);
                if dev.is_cpu() {
                    ops::batch_norm_eval(&v[0], &v[1], &v[2], &m, &s, 1e-3, act)
                } else {
                    ops::batch_norm_eval_resident(&v[0], &v[1], &v[2], &m, &s, 1e-3, act)
                }
            },
        )?);
    }
    // Ops whose training gradients come only from their tape rules.
    for k in [2usize, 3] {
        let mut inputs: Vec<Tensor> = (0..k)
            .map(|i| random(&[2, 9, 8, 40], 30 + i as u64))
            .collect::<anyhow::Result<_>>()?;
        inputs.push(Tensor::new(&[0.9f32, -0.3, 1.4][..k], &Device::Cpu)?);
        out.push(check_taped_op(
            &format!("fast_fusion {k} inputs"),
            gpu,
            &inputs,
            &move |v| ops::fast_fusion(&v[..k], &v[k]),
        )?);
    }
    out.push(check_taped_op(
        "batch_norm_train_resident Swish",
        gpu,
        &[
            (random(&[3, 6, 5, 48], 4)? * 3.0)?,
            random(&[48], 5)?,
            random(&[48], 6)?,
        ],
        &|v| Ok(ops::batch_norm_train_resident(&v[0], &v[1], &v[2], 1e-3, Activation::Swish)?.0),
    )?);
    out.push(check_op(
        "swish",
        gpu,
        &[(random(&[4, 1000], 12)? * 6.0)?],
        &|v| ops::swish(&v[0]),
    )?);
    out.push(check_op(
        "add_channel_bias",
        gpu,
        &[random(&[2, 5, 7, 33], 13)?, random(&[33], 14)?],
        &|v| ops::add_channel_bias(&v[0], &v[1]),
    )?);
    out.push(check_op(
        "channel_gate",
        gpu,
        &[random(&[2, 5, 7, 33], 15)?, random(&[2, 33], 16)?],
        &|v| ops::channel_gate(&v[0], &v[1]),
    )?);
    out.push(check_op(
        "spatial_mean",
        gpu,
        &[random(&[3, 9, 8, 33], 17)?],
        &|v| ops::spatial_mean(&v[0]),
    )?);
    // The in-place optimizer/EMA update (no gradient).
    {
        let (x, y) = (random(&[1000, 37], 19)?, random(&[1000, 37], 20)?);
        let run = |dev: &Device| -> anyhow::Result<Tensor> {
            let (x, y) = (x.to_device(dev)?, y.to_device(dev)?);
            ops::axpby_inplace(&x, &y, 0.9, -0.01)?;
            Ok(x)
        };
        out.push(Check {
            name: "axpby_inplace".into(),
            output: rel_err(&run(gpu)?, &run(&Device::Cpu)?)?,
            gradients: 0.0,
            worst: None,
            limit: None,
            pass: false,
        });
    }
    // A BN layer's running averages from its batch moments (in place, one launch).
    {
        let x = random(&[4, 6, 5, 40], 25)?;
        let (g, b) = (random(&[40], 26)?, random(&[40], 27)?);
        let (mean, var) = (random(&[40], 28)?, (random(&[40], 29)?.abs()? + 0.5)?);
        let run = |dev: &Device| -> anyhow::Result<Tensor> {
            let (x, g, b) = (x.to_device(dev)?, g.to_device(dev)?, b.to_device(dev)?);
            let (_, moments) = ops::batch_norm_train_resident(&x, &g, &b, 1e-3, Activation::None)?;
            let (m, v) = (mean.to_device(dev)?.copy()?, var.to_device(dev)?.copy()?);
            ops::batch_norm_update_running(&m, &v, &moments, 0.99, 1e-3, 120.0 / 119.0)?;
            Ok(Tensor::cat(
                &[m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?],
                0,
            )?)
        };
        out.push(Check {
            name: "batch_norm_update_running".into(),
            output: rel_err(&run(gpu)?, &run(&Device::Cpu)?)?,
            gradients: 0.0,
            worst: None,
            limit: None,
            pass: false,
        });
    }
    // The multi-tensor optimizer passes over 70 tensors (three launches of ≤ 32, chunks
    // straddled): sums of squares (`output`), then the SGD step and the moving average
    // (`gradients`: the updated weights, momenta and averages).
    {
        let sizes: Vec<usize> = (0..70).map(|i| [1, 37, 4096, 5000, 9][i % 5] + i).collect();
        let set = |seed: u64| -> anyhow::Result<Vec<Tensor>> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| random(&[n], seed * 100 + i as u64))
                .collect()
        };
        let (g, w, m, e) = (set(21)?, set(22)?, set(23)?, set(24)?);
        let coef: Vec<(f32, f32)> = (0..70)
            .map(|i| (0.5 + i as f32 / 64.0, 4e-5 * (i % 2) as f32))
            .collect();
        let run = |dev: &Device| -> anyhow::Result<(Tensor, Tensor)> {
            let on = |v: &[Tensor]| -> anyhow::Result<Vec<Tensor>> {
                Ok(v.iter()
                    .map(|t| t.to_device(dev)?.copy())
                    .collect::<candle_core::Result<_>>()?)
            };
            let (g, w, m, e) = (on(&g)?, on(&w)?, on(&m)?, on(&e)?);
            fn r(v: &[Tensor]) -> Vec<&Tensor> {
                v.iter().collect()
            }
            let sums = ops::multi_tensor::sums_of_squares(&r(&g), &r(&w), &coef)?;
            ops::multi_tensor::sgd_momentum(&r(&w), &r(&m), &r(&g), &coef, 0.9, 0.08)?;
            ops::multi_tensor::axpby_all(&r(&e), &r(&w), 0.999, 1.0 - 0.999)?;
            let all: Vec<Tensor> = w
                .iter()
                .chain(&m)
                .chain(&e)
                .map(|t| t.to_device(&Device::Cpu))
                .collect::<candle_core::Result<_>>()?;
            Ok((sums.to_device(&Device::Cpu)?, Tensor::cat(&all, 0)?))
        };
        let (gs, gu) = run(gpu)?;
        let (cs, cu) = run(&Device::Cpu)?;
        out.push(Check {
            name: "multi-tensor sums of squares; SGD + moving average (70 tensors)".into(),
            output: rel_err(&gs, &cs)?,
            gradients: rel_err(&gu, &cu)?,
            worst: None,
            limit: None,
            pass: false,
        });
    }
    // Class ids: −2 ignored, −1 background, 0..K−1 positives.
    let (anchors, k) = (9usize, 7usize);
    let ids: Vec<i64> = (0..2 * 6 * anchors)
        .map(|i| (i as i64 * 7919 % (k as i64 + 2)) - 2)
        .collect();
    let ids = Tensor::from_vec(ids, (2, 6, anchors), &Device::Cpu)?;
    let params = FocalParams {
        alpha: 0.25,
        gamma: 1.5,
        label_smoothing: 0.1,
    };
    out.push(check_op(
        "focal_loss",
        gpu,
        &[(random(&[2, 6, anchors * k], 18)? * 4.0)?],
        &move |v| {
            let t = ids.to_device(v[0].device())?;
            ops::focal_loss_sum(&v[0], &t, params)
        },
    )?);
    Ok(out)
}

/// The own ops with 16-bit activations (f32 parameters), as mixed precision runs them: both
/// devices compute in f32 from the same rounded inputs and round once, so they differ only
/// where float rounding flips a 16-bit rounding (one unit in the last place of that value).
fn half_op_checks(gpu: &Device) -> anyhow::Result<Vec<Check>> {
    let mut out = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        // Relative ‖error‖ allowed: a few flipped last places among thousands of values.
        let limit = if dtype == DType::F16 { 2e-3 } else { 1.5e-2 };
        let act = |shape: &[usize], seed: u64, scale: f64| -> anyhow::Result<Tensor> {
            Ok((random(shape, seed)? * scale)?.to_dtype(dtype)?)
        };
        let mut push = |name: String, inputs: &[Tensor], f: &OpFn| -> anyhow::Result<()> {
            let mut c = check_op(&format!("{name} {dtype:?}"), gpu, inputs, f)?;
            c.limit = Some(limit);
            out.push(c);
            Ok(())
        };
        for (k, s) in [(3, 2), (5, 1)] {
            push(
                format!("depthwise k{k} s{s}"),
                &[act(&[2, 11, 9, 40], 1, 1.0)?, random(&[k, k, 40], 2)?],
                &move |v| ops::depthwise_conv2d(&v[0], &v[1], s),
            )?;
        }
        push(
            "max_pool 3x3 s2".into(),
            &[act(&[2, 11, 10, 24], 3, 1.0)?],
            &|v| ops::max_pool2d_same(&v[0], (3, 3), (2, 2)),
        )?;
        push(
            "batch_norm_train_resident Swish".into(),
            &[
                act(&[3, 6, 5, 48], 4, 3.0)?,
                random(&[48], 5)?,
                random(&[48], 6)?,
            ],
            &|v| {
                let bn = if v[0].device().is_cpu() {
                    ops::batch_norm_train(&v[0], &v[1], &v[2], 1e-3, Activation::Swish)?.0
                } else {
                    ops::batch_norm_train_resident(&v[0], &v[1], &v[2], 1e-3, Activation::Swish)?.0
                };
                Ok(bn)
            },
        )?;
        push("swish".into(), &[act(&[4, 1000], 12, 6.0)?], &|v| {
            ops::swish(&v[0])
        })?;
        push(
            "add_channel_bias".into(),
            &[act(&[2, 5, 7, 33], 13, 1.0)?, random(&[33], 14)?],
            &|v| ops::add_channel_bias(&v[0], &v[1]),
        )?;
        push(
            "channel_gate".into(),
            &[act(&[2, 5, 7, 33], 15, 1.0)?, random(&[2, 33], 16)?],
            &|v| ops::channel_gate(&v[0], &v[1]),
        )?;
        push(
            "spatial_mean".into(),
            &[act(&[3, 9, 8, 33], 17, 1.0)?],
            &|v| ops::spatial_mean(&v[0]),
        )?;
        let mut fusion_inputs: Vec<Tensor> = (0..3)
            .map(|i| act(&[2, 9, 8, 40], 30 + i, 1.0))
            .collect::<anyhow::Result<_>>()?;
        fusion_inputs.push(Tensor::new(&[0.9f32, 0.3, 1.4], &Device::Cpu)?);
        let mut c = check_taped_op(
            &format!("fast_fusion 3 inputs {dtype:?}"),
            gpu,
            &fusion_inputs,
            &|v| ops::fast_fusion(&v[..3], &v[3]),
        )?;
        c.limit = Some(limit);
        out.push(c);
    }
    Ok(out)
}

/// The whole training loss and every gradient, CPU against GPU, for one pipeline batch.
///
/// Training-mode batch norm on a real batch of two (letterboxed images: channels that are
/// nearly constant over the padding) amplifies f32 rounding a thousandfold in some gradients,
/// so two correct f32 evaluations differ by far more than 1e-3 there. The CPU therefore
/// computes the gradients twice, with the tape and the im2col stem (as the GPU does) and with
/// candle's backward and candle's convolution for the stem: two valid summation orders. A
/// gradient passes when its GPU error (relative to the tape CPU result) is within the
/// tolerance or within 3× the CPU's own spread for that tensor; `gradients` reports the worst
/// error divided by that allowance, times the tolerance (so it compares with the tolerance). A
/// wrong rule is off by O(1) and fails either way.
fn model_check(a: &Args, gpu: &Device) -> anyhow::Result<Check> {
    let cfg = load_config(&a.config, &[])?;
    let lcfg = a.data.loader_config(Mode::Train, a.batch_size);
    let spec = LabelSpec::for_model(&cfg, a.data.image_size());
    let mut loader = start_loader(lcfg, a.data.files()?, &spec)?;
    let b = loader
        .next_batch()
        .ok_or_else(|| anyhow::anyhow!("the input pipeline gave no batch"))??;
    let mut losses = Vec::new();
    let mut grads = Vec::new();
    let mut names = Vec::new();
    // CPU with the tape, GPU with the tape, CPU with candle's backward (the noise reference).
    for (dev, tape) in [
        (Device::Cpu, true),
        (gpu.clone(), true),
        (Device::Cpu, false),
    ] {
        let mut trainer = Trainer::new(&cfg, &dev, a.data.seed, effdet_model::Precision::F32)?;
        trainer.set_use_tape(tape);
        let t = BatchTensors::from_batch(&b, &dev)?;
        let parts = trainer.loss(&t)?;
        losses.push(parts.total.clone());
        // Compared on the host.
        let on_cpu = trainer
            .gradients(&parts.total)?
            .into_iter()
            .map(|g| g.map(|g| g.to_device(&Device::Cpu)).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?;
        grads.push(on_cpu);
        names = trainer.sgd.vars().iter().map(|(n, _)| n.clone()).collect();
    }
    let output = rel_err(&losses[1], &losses[0])?;
    let norm = |t: &Tensor| -> anyhow::Result<f64> {
        Ok(t.to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?
            .sqrt())
    };
    // Per tensor: ‖gpu − cpu‖, ‖cpu_candle − cpu‖ and ‖cpu‖.
    let mut diffs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (g, c, r) = (&grads[1][i], &grads[0][i], &grads[2][i]);
        let row = match (g, c, r) {
            (Some(g), Some(c), Some(r)) => (norm(&(g - c)?)?, norm(&(r - c)?)?, norm(c)?),
            (None, None, None) => (0.0, 0.0, 0.0),
            _ => (f64::INFINITY, 0.0, 0.0),
        };
        diffs.push((name.clone(), row));
    }
    let total = diffs.iter().map(|(_, r)| r.2 * r.2).sum::<f64>().sqrt();
    // Relative to max(‖cpu‖, 1e-4·‖all gradients‖): the biases of convolutions that feed a
    // training-mode batch norm have an exactly zero gradient in exact arithmetic, so on both
    // devices they hold only rounding noise and a plain relative error is meaningless.
    let floor = (1e-4 * total).max(f64::MIN_POSITIVE);
    let tol = a.tolerance;
    let mut ranked: Vec<(f64, usize)> = diffs
        .iter()
        .enumerate()
        .map(|(i, (_, (d, noise, n)))| (spread_scaled_error(*d, *noise, *n, floor, tol), i))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let worst = ranked.first().map_or(0.0, |r| r.0);
    let global = |k: usize| {
        diffs
            .iter()
            .map(|(_, r)| [r.0, r.1][k].powi(2))
            .sum::<f64>()
            .sqrt()
            / total.max(1e-300)
    };
    // The three worst, with both devices' values where the tensor is small (fusion weights).
    let mut report = Vec::new();
    for &(e, i) in ranked.iter().take(3) {
        let (name, (d, noise, n)) = &diffs[i];
        let scale = n.max(floor);
        let mut line = format!(
            "{name} {e:.2e} (gpu {:.2e}, cpu spread {:.2e}, |grad| {n:.3e})",
            d / scale,
            noise / scale
        );
        if let (Some(g), Some(c)) = (&grads[1][i], &grads[0][i]) {
            if g.elem_count() <= 4 {
                let v = |t: &Tensor| -> anyhow::Result<Vec<f64>> {
                    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)
                };
                line += &format!(" gpu {:?} cpu {:?}", v(g)?, v(c)?);
            }
        }
        report.push(line);
    }
    let worst_name = Some(format!(
        "{}; all {total:.3e}, global: gpu {:.2e}, cpu spread {:.2e}",
        report.join("; "),
        global(0),
        global(1)
    ));
    Ok(Check {
        name: format!(
            "model loss+gradients ({} vars, batch {}, {}²; vs the CPU's own spread)",
            names.len(),
            a.batch_size,
            a.data.image_size()
        ),
        output,
        gradients: worst,
        worst: worst_name,
        limit: None,
        pass: false,
    })
}

/// A gradient's GPU error `d` (absolute) as compared with `tol`: relative to
/// `max(‖cpu‖, floor)`, and divided by the allowance `max(tol, 3 × the CPU's own relative
/// spread)` over `tol`, so a result ≤ `tol` passes.
fn spread_scaled_error(d: f64, spread: f64, norm: f64, floor: f64, tol: f64) -> f64 {
    let scale = norm.max(floor);
    let allowance = tol.max(3.0 * spread / scale);
    d / scale / allowance * tol
}

/// The copy-stream feed (pinned buffers, own stream, hand-made events) against the simple feed:
/// three batches must arrive identical.
fn feed_check(a: &Args, gpu: &Device) -> anyhow::Result<Check> {
    use super::step::{DeviceFeeder, FeedMode, FeedOptions};
    let mut got = Vec::new();
    let spec = LabelSpec::default_anchors(a.data.image_size());
    for mode in [FeedMode::Simple, FeedMode::CopyStream] {
        let lcfg = a.data.loader_config(Mode::Train, a.batch_size);
        let feeder = DeviceFeeder::start(
            start_loader(lcfg, a.data.files()?, &spec)?,
            gpu.clone(),
            FeedOptions {
                mode,
                ..FeedOptions::new(2)
            },
        )?;
        let mut batches = Vec::new();
        for _ in 0..3 {
            let b = feeder
                .next_batch()
                .ok_or_else(|| anyhow::anyhow!("the input pipeline ended"))??;
            batches.push(b.tensors);
        }
        got.push(batches);
    }
    let (mut images, mut targets) = (0f64, 0f64);
    for (s, c) in got[0].iter().zip(&got[1]) {
        images = images.max(rel_err(&c.images, &s.images)?);
        for (x, y) in c.cls.iter().zip(&s.cls).chain(c.boxes.iter().zip(&s.boxes)) {
            targets = targets.max(rel_err(x, y)?);
        }
        targets = targets.max(rel_err(&c.num_positives, &s.num_positives)?);
    }
    Ok(Check {
        name: "copy-stream feed = simple feed (3 batches; output: images, gradients: targets)"
            .into(),
        output: images,
        gradients: targets,
        worst: None,
        limit: Some(0.0),
        pass: false,
    })
}

/// The nvJPEG stage: (1) with every image decoded on the CPU, the render kernel must equal
/// `render_reference` exactly; (2) decoded by nvJPEG, targets must equal the CPU loader's
/// bit for bit and images agree to decoder differences (IDCT and chroma upsampling).
#[cfg(feature = "nvjpeg")]
fn nvjpeg_checks(a: &Args, gpu: &Device) -> anyhow::Result<Vec<Check>> {
    use effdet_pipeline::augment::AugmentConfig;
    use effdet_pipeline::decode::{CpuDecoder, DecodedImage, ImageDecoder};
    use effdet_pipeline::deferred::{render_reference, DecodePlan};
    use effdet_pipeline::nvjpeg::stage::NvjpegStage;

    let stream = gpu.as_cuda_device()?.cuda_stream();
    let size = a.data.image_size();
    let image_len = 3 * (size * size) as usize;
    let mut cpu_cfg = a.data.loader_config(Mode::Train, a.batch_size);
    let mut gpu_cfg = cpu_cfg.clone();
    gpu_cfg.defer_for_gpu();
    cpu_cfg.image_dtype = gpu_cfg.image_dtype;
    let spec = LabelSpec::default_anchors(size);
    let mut cpu_loader = start_loader(cpu_cfg, a.data.files()?, &spec)?;
    let mut gpu_loader = start_loader(gpu_cfg, a.data.files()?, &spec)?;
    let aug = AugmentConfig {
        image_size: (size, size),
        ..AugmentConfig::d0(size)
    };
    let mut checks = Vec::new();
    for force_cpu in [true, false] {
        let mut stage = NvjpegStage::new(stream.clone(), aug.clone())?;
        stage.force_cpu_decode = force_cpu;
        let (mut image_err, mut target_err, mut deferred) = (0f64, 0f64, 0usize);
        for _ in 0..2 {
            let cpu_b = cpu_loader
                .next_batch()
                .ok_or_else(|| anyhow::anyhow!("the input pipeline ended"))??;
            let mut gpu_b = gpu_loader
                .next_batch()
                .ok_or_else(|| anyhow::anyhow!("the input pipeline ended"))??;
            // The reference images: CPU path, or the render kernel's arithmetic on CPU-decoded
            // pixels.
            let mut want = cpu_b.buffers().images.to_f32();
            let plan = DecodePlan::new(gpu_b.deferred_slots());
            deferred += plan.jobs.len();
            if force_cpu {
                let mut img = DecodedImage::default();
                for job in &plan.jobs {
                    let slot = job.slot as usize;
                    let jpeg = &gpu_b.encoded[slot].as_ref().expect("deferred").jpeg;
                    CpuDecoder
                        .decode_into(jpeg, &mut img)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    render_reference(
                        &img,
                        job,
                        &aug,
                        &mut want[slot * image_len..(slot + 1) * image_len],
                    );
                }
            }
            let mut out = stream.alloc_zeros::<f32>(gpu_b.batch_size * image_len)?;
            stage.produce(&mut gpu_b, &mut out)?;
            let got = stream.clone_dtoh(&out)?;
            let t = |v: Vec<f32>| Tensor::from_vec(v, image_len * gpu_b.batch_size, &Device::Cpu);
            image_err = image_err.max(rel_err(&t(got)?, &t(want)?)?);
            let f = |v: &[i32]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let (cg, cc) = (&gpu_b.buffers().cls_targets, &cpu_b.buffers().cls_targets);
            let n = cg.len();
            target_err = target_err.max(rel_err(
                &Tensor::from_vec(f(cg), n, &Device::Cpu)?,
                &Tensor::from_vec(f(cc), n, &Device::Cpu)?,
            )?);
            let (bg, bc) = (&gpu_b.buffers().box_targets, &cpu_b.buffers().box_targets);
            target_err = target_err.max(rel_err(
                &Tensor::from_slice(bg, bg.len(), &Device::Cpu)?,
                &Tensor::from_slice(bc, bc.len(), &Device::Cpu)?,
            )?);
        }
        let c = stage.counts;
        checks.push(Check {
            name: if force_cpu {
                format!("render kernel = render_reference ({deferred} images, CPU-decoded)")
            } else {
                format!(
                    "nvJPEG {} vs CPU path ({deferred} images: hardware {}, cuda {}, single {}, \
                     cpu {}, blank {}; output: images, gradients: targets)",
                    stage.version(),
                    c.hardware,
                    c.cuda_batched,
                    c.cuda_single,
                    c.cpu,
                    c.blank
                )
            },
            output: image_err,
            gradients: target_err,
            worst: stage.hardware_unavailable.clone(),
            // Exact arithmetic on equal pixels; different JPEG decoders give a few levels.
            limit: Some(if force_cpu { 1e-6 } else { 0.05 }),
            pass: false,
        });
    }
    Ok(checks)
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let gpu = super::bench_train::cuda_device()
        .map_err(|e| anyhow::anyhow!("cuda-check needs a CUDA build and a GPU: {e}"))?;
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let mut checks = op_checks(&gpu)?;
    match half_op_checks(&gpu) {
        Ok(c) => checks.extend(c),
        Err(e) => checks.push(Check {
            name: format!("16-bit ops: {e:#}"),
            output: f64::INFINITY,
            gradients: f64::INFINITY,
            worst: None,
            limit: None,
            pass: false,
        }),
    }
    checks.push(model_check(&a, &gpu)?);
    // The feed and nvJPEG checks report their own failure instead of ending the run.
    let failed = |what: &str, e: anyhow::Error| Check {
        name: format!("{what}: {e:#}"),
        output: f64::INFINITY,
        gradients: f64::INFINITY,
        worst: None,
        limit: None,
        pass: false,
    };
    checks.push(feed_check(&a, &gpu).unwrap_or_else(|e| failed("copy-stream feed", e)));
    #[cfg(feature = "nvjpeg")]
    match nvjpeg_checks(&a, &gpu) {
        Ok(c) => checks.extend(c),
        Err(e) => checks.push(failed("nvJPEG stage", e)),
    }
    for c in checks.iter_mut() {
        let limit = c.limit.unwrap_or(a.tolerance);
        c.pass = c.output <= limit && c.gradients <= limit;
    }
    let pass = checks.iter().all(|c| c.pass);
    let report = Report {
        device_name: device_info(&gpu).0,
        tolerance: a.tolerance,
        checks,
        pass,
        host_costs: host_costs(&gpu, 5000)?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(if pass { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::data::DataArgs;
    use crate::commands::train::tests as t;

    #[test]
    fn gradient_errors_are_judged_against_the_cpus_own_spread() {
        let tol = 1e-3;
        // Where the CPU's two evaluations agree, the plain tolerance applies.
        assert!(spread_scaled_error(0.5e-3, 1e-6, 1.0, 1e-4, tol) <= tol);
        assert!(spread_scaled_error(2e-3, 1e-6, 1.0, 1e-4, tol) > tol);
        // An ill-conditioned gradient (the session-5 BiFPN fusion weight: GPU 3.7e-2 from
        // the tape CPU result, the CPU's candle evaluation 3.8e-2 from it) passes ...
        assert!(spread_scaled_error(3.7e-2 * 6.7e-4, 3.8e-2 * 6.7e-4, 6.7e-4, 3.3e-4, tol) <= tol);
        // ... but a wrong rule, O(1) off, fails even there.
        assert!(spread_scaled_error(0.5 * 6.7e-4, 3.8e-2 * 6.7e-4, 6.7e-4, 3.3e-4, tol) > tol);
        // Tiny gradients are measured against the floor, not their own norm.
        assert!(spread_scaled_error(1e-9, 0.0, 1e-8, 1e-4, tol) <= tol);
    }

    /// The model check runs end to end with the CPU standing in for the GPU (the same tape
    /// computation on both sides: exactly zero error, and a report naming the worst tensors).
    /// Every op check's harness (candle and tape gradients, in-place updates, 16-bit inputs)
    /// runs with the CPU standing in for the GPU, and finds no difference there.
    #[test]
    fn op_checks_run_with_the_cpu_as_the_device() -> anyhow::Result<()> {
        let mut checks = op_checks(&Device::Cpu)?;
        checks.extend(half_op_checks(&Device::Cpu)?);
        assert!(checks.len() >= 40, "{} checks", checks.len());
        assert!(checks
            .iter()
            .any(|c| c.name.contains("fast_fusion 3 inputs (tape)")));
        for c in &checks {
            assert!(
                c.output == 0.0 && c.gradients == 0.0,
                "{}: output {:e}, gradients {:e}",
                c.name,
                c.output,
                c.gradients
            );
        }
        Ok(())
    }

    #[test]
    fn host_costs_time_each_kind_of_op() -> anyhow::Result<()> {
        let costs = host_costs(&Device::Cpu, 50)?;
        assert_eq!(costs.len(), 4);
        for c in &costs {
            assert_eq!(c.count, 50);
            assert!(
                c.enqueue_us > 0.0 && c.completed_us >= c.enqueue_us,
                "{}: {c:?}",
                c.op
            );
        }
        Ok(())
    }

    #[test]
    fn model_check_runs_with_the_cpu_as_the_device() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = t::shards(dir.path(), 4)?;
        let a = Args {
            config: "efficientdet-d0".into(),
            data: DataArgs::for_paths(vec![data.to_string_lossy().into_owned()], 64),
            batch_size: 2,
            tolerance: 1e-3,
        };
        let c = model_check(&a, &Device::Cpu)?;
        assert_eq!(c.output, 0.0);
        assert_eq!(c.gradients, 0.0);
        let worst = c.worst.expect("a report");
        assert!(worst.contains("cpu spread"), "{worst}");
        Ok(())
    }
}
