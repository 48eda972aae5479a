//! A gradient tape for the training step, in place of candle's own backward pass.
//!
//! candle's `Tensor::backward` materializes every node's input gradient as
//! `zeros_like(input) + gradient` (`GradStore::or_insert`): a zero fill and an add over the
//! whole tensor for each input of each node, which in a bandwidth-bound network like EfficientDet costs about as much
//! memory traffic as the backward kernels themselves. While a tape is active on a thread
//! ([`record`]), the model's ops compute on detached tensors (candle builds no graph at all)
//! and append one entry per op with its backward rule; [`Tape::backward`] then walks the
//! entries in reverse, inserting each gradient the first time and adding only when a tensor
//! feeds several ops. The backward rules are the ops' own (`CustomOp*::bwd` of the same
//! kernels), so the gradients equal candle's up to the order in which multiple contributions
//! are summed (tested on the whole network).
//!
//! Only the ops in [`crate::ops`] record themselves, plus [`add`] and [`sigmoid`], which the
//! network uses in place of candle's operators; anything else computed while a tape is active
//! carries no gradient (the network's own code uses nothing else on tracked values).

use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Tensor, TensorId};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Backward = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Entry {
    /// What the op is, for the anomaly report.
    label: &'static str,
    inputs: Vec<TensorId>,
    output: TensorId,
    /// The output's dims, kept only for `EFFDET_OP_PROFILE=shapes`.
    profiled_dims: Option<Vec<usize>>,
    backward: Backward,
}

/// Ops recorded during one forward pass, in order.
#[derive(Default)]
pub struct Tape {
    entries: RefCell<Vec<Entry>>,
    /// Outputs of recorded ops: the values gradients flow through.
    produced: RefCell<HashSet<TensorId>>,
}

thread_local! {
    static ACTIVE: RefCell<Option<Rc<Tape>>> = const { RefCell::new(None) };
}

/// Restores the previously active tape when dropped (also on early return or panic).
struct Activation(Option<Rc<Tape>>);

impl Drop for Activation {
    fn drop(&mut self) {
        let previous = self.0.take();
        ACTIVE.with(|a| *a.borrow_mut() = previous);
    }
}

/// Runs `f` with `tape` recording the ops of this thread.
pub fn record<R>(tape: &Rc<Tape>, f: impl FnOnce() -> R) -> R {
    let previous = ACTIVE.with(|a| a.borrow_mut().replace(tape.clone()));
    let _restore = Activation(previous);
    f()
}

/// The tape recording on this thread, if any.
pub(crate) fn active() -> Option<Rc<Tape>> {
    ACTIVE.with(|a| a.borrow().clone())
}

impl Tape {
    /// Number of recorded ops.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether gradients flow into `t`: a variable, or the output of a recorded op.
    pub(crate) fn tracks(&self, t: &Tensor) -> bool {
        t.is_variable() || self.produced.borrow().contains(&t.id())
    }

    /// Appends an op: `output` computed from `inputs`; `backward` maps the output's gradient
    /// to one optional gradient per input, in order.
    pub(crate) fn push(
        &self,
        label: &'static str,
        inputs: &[&Tensor],
        output: &Tensor,
        backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) {
        self.produced.borrow_mut().insert(output.id());
        self.entries.borrow_mut().push(Entry {
            label,
            inputs: inputs.iter().map(|t| t.id()).collect(),
            output: output.id(),
            profiled_dims: (profile_mode() == ProfileMode::Shapes).then(|| output.dims().to_vec()),
            backward: Box::new(backward),
        });
    }

    /// Back-propagates `seeds` (gradients of some recorded outputs) through every recorded op
    /// and returns the gradients that reached tensors no op produced: the variables.
    /// With `EFFDET_DETECT_ANOMALY` set, fails at the first non-finite gradient (see
    /// [`detect_anomaly`]).
    pub fn backward(self, seeds: Vec<(TensorId, Tensor)>) -> Result<HashMap<TensorId, Tensor>> {
        self.backward_checked(seeds, detect_anomaly())
    }

    /// [`Tape::backward`], checking every gradient for non-finite values when `detect`.
    fn backward_checked(
        self,
        seeds: Vec<(TensorId, Tensor)>,
        detect: bool,
    ) -> Result<HashMap<TensorId, Tensor>> {
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        for (k, (id, g)) in seeds.into_iter().enumerate() {
            if detect && !is_finite(&g)? {
                return Err(candle_core::Error::Msg(format!(
                    "anomaly: seed gradient {k} ({:?} {:?}) is non-finite",
                    g.dtype(),
                    g.dims()
                )));
            }
            accumulate(&mut grads, id, g)?;
        }
        let entries = self.entries.into_inner();
        let count = entries.len();
        for (index, entry) in entries.into_iter().enumerate().rev() {
            // An output nothing downstream needed gets no gradient, and neither do its inputs.
            let Some(g) = grads.remove(&entry.output) else {
                continue;
            };
            let label = entry.label;
            let started = profile_ops().then(Instant::now);
            // Gradients may arrive as views (a broadcast, see `SpatialMean`); the rules and the
            // kernels they launch take contiguous tensors. A copy only for a view that was an
            // input's sole gradient: sums with another gradient are already contiguous.
            let g = g.contiguous()?;
            let input_grads = (entry.backward)(&g)?;
            if let Some(t) = started {
                profile_add(
                    label,
                    entry.profiled_dims.as_deref(),
                    Phase::Backward,
                    t.elapsed(),
                );
            }
            for (k, (id, ig)) in entry.inputs.into_iter().zip(input_grads).enumerate() {
                if let Some(ig) = ig {
                    if detect && !is_finite(&ig)? {
                        return Err(candle_core::Error::Msg(format!(
                            "anomaly: the backward of op #{index} of {count} ({label}) gave a \
                             non-finite gradient for its input {k} ({:?} {:?}); the op's output \
                             gradient ({:?} {:?}) is {}, max |g| {:e}",
                            ig.dtype(),
                            ig.dims(),
                            g.dtype(),
                            g.dims(),
                            if is_finite(&g)? {
                                "finite"
                            } else {
                                "non-finite"
                            },
                            max_abs(&g)?,
                        )));
                    }
                    let started = profile_ops().then(Instant::now);
                    let added = accumulate(&mut grads, id, ig)?;
                    if let (Some(t), true) = (started, added) {
                        profile_add("gradient sum", None, Phase::Backward, t.elapsed());
                    }
                }
            }
        }
        Ok(grads)
    }
}

/// Whether `EFFDET_DETECT_ANOMALY` is set (to anything but `0`): [`Tape::backward`] then checks
/// every gradient it computes and fails at the first non-finite one, naming the op. Each check
/// reads a value back from the device, so this is for debugging (e.g. fp16 steps that keep
/// being skipped), not for timing.
pub fn detect_anomaly() -> bool {
    static DETECT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECT.get_or_init(|| std::env::var("EFFDET_DETECT_ANOMALY").is_ok_and(|v| v != "0"))
}

/// Whether every element is finite: `Σ (t − t)` is 0 exactly then and NaN otherwise.
fn is_finite(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(candle_core::DType::F32)?;
    Ok(t.sub(&t)?.sum_all()?.to_scalar::<f32>()?.is_finite())
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.to_dtype(candle_core::DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// The first gradient of a tensor is stored as it is; later ones are added (then it returns
/// true).
fn accumulate(grads: &mut HashMap<TensorId, Tensor>, id: TensorId, g: Tensor) -> Result<bool> {
    match grads.entry(id) {
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(g);
            Ok(false)
        }
        std::collections::hash_map::Entry::Occupied(mut e) => {
            let sum = crate::ops::add_gradients(e.get(), &g)?;
            *e.get_mut() = sum;
            Ok(true)
        }
    }
}

/// Which pass an op's time was spent in, for [`take_op_profile`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Phase {
    Forward,
    Backward,
}

/// What `EFFDET_OP_PROFILE` asks for: nothing (unset or `0`), time per op (any other value),
/// or time per op and output shape (`shapes`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ProfileMode {
    Off,
    Ops,
    Shapes,
}

/// The `EFFDET_OP_PROFILE` setting, read once.
pub fn profile_mode() -> ProfileMode {
    static MODE: std::sync::OnceLock<ProfileMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("EFFDET_OP_PROFILE").as_deref() {
        Err(_) | Ok("0") | Ok("") => ProfileMode::Off,
        Ok("shapes") => ProfileMode::Shapes,
        Ok(_) => ProfileMode::Ops,
    })
}

/// Whether ops are being timed (`EFFDET_OP_PROFILE` set).
pub fn profile_ops() -> bool {
    profile_mode() != ProfileMode::Off
}

/// Host time and call count per (op[, output shape], pass), summed while `EFFDET_OP_PROFILE` is
/// set. Where ops complete synchronously (the CPU) the host time is the op's time; on a GPU it
/// is only the time to enqueue it.
type ProfileTable = HashMap<(String, Phase), (u64, Duration)>;
static OP_PROFILE: Mutex<Option<ProfileTable>> = Mutex::new(None);

fn profile_add(label: &str, dims: Option<&[usize]>, phase: Phase, took: Duration) {
    let key = match dims {
        Some(d) => format!("{label} {d:?}"),
        None => label.to_string(),
    };
    let mut table = OP_PROFILE.lock().unwrap_or_else(|e| e.into_inner());
    let e = table
        .get_or_insert_with(HashMap::new)
        .entry((key, phase))
        .or_default();
    e.0 += 1;
    e.1 += took;
}

/// Takes the op profile gathered so far (and starts a new one): (op, pass, calls, time),
/// longest first. Empty unless `EFFDET_OP_PROFILE` is set.
pub fn take_op_profile() -> Vec<(String, Phase, u64, Duration)> {
    let table = OP_PROFILE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    let mut rows: Vec<_> = table
        .into_iter()
        .map(|((label, phase), (n, t))| (label, phase, n, t))
        .collect();
    rows.sort_by(|a, b| b.3.cmp(&a.3).then(a.0.cmp(&b.0)));
    rows
}

/// Runs `f`, a part of the step that is not a recorded op (the loss, its hand-written
/// gradients), and counts its time as `label` in `phase` under `EFFDET_OP_PROFILE`, so the
/// table covers the whole step. Ops recorded inside `f` count for themselves as well.
pub fn profile_section<R>(label: &'static str, phase: Phase, f: impl FnOnce() -> R) -> R {
    if !profile_ops() {
        return f();
    }
    let started = Instant::now();
    let r = f();
    profile_add(label, None, phase, started.elapsed());
    r
}

/// Runs one op's forward `f`, timing it under `EFFDET_OP_PROFILE`.
pub(crate) fn timed(label: &'static str, f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    if !profile_ops() {
        return f();
    }
    let started = Instant::now();
    let y = f()?;
    let dims = (profile_mode() == ProfileMode::Shapes).then(|| y.dims());
    profile_add(label, dims, Phase::Forward, started.elapsed());
    Ok(y)
}

/// The op type's own name, without its module path.
fn short_name<C>() -> &'static str {
    let full = std::any::type_name::<C>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Records `op` applied to `x` (its `bwd` is the rule), or applies it with candle's graph when
/// no tape is active.
pub(crate) fn op1<C: CustomOp1 + Send + Sync + 'static>(x: &Tensor, op: C) -> Result<Tensor> {
    let Some(tape) = active() else {
        return x.contiguous()?.apply_op1(op);
    };
    let xd = x.detach().contiguous()?;
    let y = timed(short_name::<C>(), || xd.apply_op1_no_bwd(&op))?;
    let yc = y.clone();
    tape.push(short_name::<C>(), &[x], &y, move |g| {
        Ok(vec![op.bwd(&xd, &yc, g)?])
    });
    Ok(y)
}

/// [`op1`] for two inputs.
pub(crate) fn op2<C: CustomOp2 + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    op: C,
) -> Result<Tensor> {
    let Some(tape) = active() else {
        return a.contiguous()?.apply_op2(&b.contiguous()?, op);
    };
    let (ad, bd) = (a.detach().contiguous()?, b.detach().contiguous()?);
    let y = timed(short_name::<C>(), || ad.apply_op2_no_bwd(&bd, &op))?;
    let yc = y.clone();
    tape.push(short_name::<C>(), &[a, b], &y, move |g| {
        let (ga, gb) = op.bwd(&ad, &bd, &yc, g)?;
        Ok(vec![ga, gb])
    });
    Ok(y)
}

/// [`op1`] for three inputs.
pub(crate) fn op3<C: CustomOp3 + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: C,
) -> Result<Tensor> {
    let Some(tape) = active() else {
        return a
            .contiguous()?
            .apply_op3(&b.contiguous()?, &c.contiguous()?, op);
    };
    let (ad, bd, cd) = (
        a.detach().contiguous()?,
        b.detach().contiguous()?,
        c.detach().contiguous()?,
    );
    let y = timed(short_name::<C>(), || ad.apply_op3_no_bwd(&bd, &cd, &op))?;
    let yc = y.clone();
    tape.push(short_name::<C>(), &[a, b, c], &y, move |g| {
        let (ga, gb, gc) = op.bwd(&ad, &bd, &cd, &yc, g)?;
        Ok(vec![ga, gb, gc])
    });
    Ok(y)
}

/// `a + b` (same shape), recorded when a tape is active.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let Some(tape) = active() else {
        return a + b;
    };
    let y = timed("add", || a.detach() + b.detach())?;
    tape.push("add", &[a, b], &y, |g| {
        Ok(vec![Some(g.clone()), Some(g.clone())])
    });
    Ok(y)
}

/// Logistic sigmoid, recorded when a tape is active (gradient g·s·(1 − s)).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    let Some(tape) = active() else {
        return candle_nn::ops::sigmoid(x);
    };
    let y = timed("sigmoid", || candle_nn::ops::sigmoid(&x.detach()))?;
    let s = y.clone();
    tape.push("sigmoid", &[x], &y, move |g| {
        let one_minus = s.affine(-1.0, 1.0)?;
        Ok(vec![Some(((g * &s)? * one_minus)?)])
    });
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::rand_tensor;
    use candle_core::Var;

    type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

    /// Each recording op: the tape's gradients equal candle's backward through the same op
    /// (f64 inputs, all of them variables), including the device-resident batch norm that the
    /// model only runs on GPUs and the upsampling's gather path.
    #[test]
    fn every_recording_op_matches_candle_backward() -> Result<()> {
        use crate::ops::{self, Activation};
        let t = |d: &[usize], s: u64| rand_tensor(d, s);
        let mean = t(&[6], 40)?;
        let var = (t(&[6], 41)?.abs()? + 0.5)?;
        let mut cases: Vec<(&str, Vec<Tensor>, Box<OpFn>)> = vec![
            (
                "depthwise s2",
                vec![t(&[2, 7, 6, 6], 1)?, t(&[3, 3, 6], 2)?],
                Box::new(|v| ops::depthwise_conv2d(&v[0], &v[1], 2)),
            ),
            (
                "max_pool",
                vec![t(&[2, 7, 6, 6], 3)?],
                Box::new(|v| ops::max_pool2d_same(&v[0], (3, 3), (2, 2))),
            ),
            (
                "swish",
                vec![t(&[2, 7, 6], 4)?],
                Box::new(|v| ops::swish(&v[0])),
            ),
            (
                "bias",
                vec![t(&[2, 3, 4, 6], 5)?, t(&[6], 6)?],
                Box::new(|v| ops::add_channel_bias(&v[0], &v[1])),
            ),
            (
                "gate",
                vec![t(&[2, 3, 4, 6], 7)?, t(&[2, 6], 8)?],
                Box::new(|v| ops::channel_gate(&v[0], &v[1])),
            ),
            (
                "spatial_mean",
                vec![t(&[2, 3, 4, 6], 9)?],
                Box::new(|v| ops::spatial_mean(&v[0])),
            ),
            (
                "scale_samples",
                vec![t(&[2, 3, 4, 6], 10)?],
                Box::new(|v| {
                    let s = Tensor::new(&[1.25f64, 0.0], v[0].device())?;
                    ops::scale_samples(&v[0], &s)
                }),
            ),
            (
                "linear",
                vec![t(&[2, 3, 4, 6], 11)?, t(&[6, 5], 12)?, t(&[5], 13)?],
                Box::new(|v| {
                    ops::linear(&v[0], &v[1], Some(&v[2]), candle_core::DType::F64, false)
                }),
            ),
            (
                "upsample 2x",
                vec![t(&[2, 3, 4, 6], 14)?],
                Box::new(|v| ops::upsample_nearest(&v[0], 6, 8)),
            ),
            (
                "upsample gather",
                vec![t(&[2, 3, 4, 6], 15)?],
                Box::new(|v| ops::upsample_nearest(&v[0], 5, 7)),
            ),
            (
                "add + sigmoid",
                vec![t(&[2, 5], 16)?, t(&[2, 5], 17)?],
                Box::new(|v| sigmoid(&add(&v[0], &v[1])?)),
            ),
        ];
        for act in [Activation::None, Activation::Swish] {
            let bn = || -> Result<Vec<Tensor>> {
                Ok(vec![
                    (t(&[2, 3, 4, 6], 20)? * 3.0)?,
                    t(&[6], 21)?,
                    t(&[6], 22)?,
                ])
            };
            cases.push((
                "bn train",
                bn()?,
                Box::new(move |v| Ok(ops::batch_norm_train(&v[0], &v[1], &v[2], 1e-3, act)?.0)),
            ));
            cases.push((
                "bn train resident",
                bn()?,
                Box::new(move |v| {
                    Ok(ops::batch_norm_train_resident(&v[0], &v[1], &v[2], 1e-3, act)?.0)
                }),
            ));
            let (m, s) = (mean.clone(), var.clone());
            cases.push((
                "bn eval",
                bn()?,
                Box::new(move |v| ops::batch_norm_eval(&v[0], &v[1], &v[2], &m, &s, 1e-3, act)),
            ));
            let (m, s) = (mean.clone(), var.clone());
            cases.push((
                "bn eval resident",
                bn()?,
                Box::new(move |v| {
                    ops::batch_norm_eval_resident(&v[0], &v[1], &v[2], &m, &s, 1e-3, act)
                }),
            ));
        }
        for (name, inputs, f) in cases {
            let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts)?;
            let r = rand_tensor(y.dims(), 99)?;
            let want = (&y * &r)?.sum_all()?.backward()?;
            let tape = Rc::new(Tape::default());
            let yt = record(&tape, || f(&ts))?;
            assert!(
                !yt.track_op(),
                "{name}: built a candle graph while recording"
            );
            let tape =
                Rc::try_unwrap(tape).map_err(|_| candle_core::Error::Msg("shared".into()))?;
            let got = tape.backward(vec![(yt.id(), r)])?;
            for (i, v) in vars.iter().enumerate() {
                let (g, w) = (got.get(&v.id()), want.get(v));
                let (g, w) = match (g, w) {
                    (Some(g), Some(w)) => (g, w),
                    (None, None) => continue,
                    (g, w) => panic!(
                        "{name}: input {i} tape {} candle {}",
                        g.is_some(),
                        w.is_some()
                    ),
                };
                let d = (g - w)?.abs()?.max_all()?.to_scalar::<f64>()?;
                let n = w.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-300);
                assert!(
                    d <= 1e-12 * n.max(1.0),
                    "{name}: input {i} differs by {d:e}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_are_inserted_then_added_and_unused_branches_are_skipped() -> Result<()> {
        let a = Var::from_tensor(&rand_tensor(&[5], 1)?)?;
        let b = Var::from_tensor(&rand_tensor(&[5], 2)?)?;
        let unused = Var::from_tensor(&rand_tensor(&[5], 3)?)?;
        let tape = Rc::new(Tape::default());
        // y = s(a) + (s(a) + b): a feeds two ops through s; `unused` feeds an op nobody uses.
        let (s, y, dead) = record(&tape, || -> Result<_> {
            let s = sigmoid(a.as_tensor())?;
            let inner = add(&s, b.as_tensor())?;
            let dead = sigmoid(unused.as_tensor())?;
            Ok((s.clone(), add(&s, &inner)?, dead))
        })?;
        assert!(active().is_none(), "the tape is deactivated after `record`");
        assert!(
            !y.track_op() && !s.track_op(),
            "no candle graph while recording"
        );
        assert!(tape.tracks(&s) && tape.tracks(&dead) && tape.tracks(a.as_tensor()));
        assert!(!tape.tracks(&rand_tensor(&[5], 4)?));
        assert_eq!(tape.len(), 4);
        let r = rand_tensor(&[5], 5)?;
        let tape = Rc::try_unwrap(tape).map_err(|_| candle_core::Error::Msg("shared".into()))?;
        let grads = tape.backward(vec![(y.id(), r.clone())])?;
        // Reference: candle's own backward of Σ r·y.
        let s_ref = candle_nn::ops::sigmoid(a.as_tensor())?;
        let y_ref = (&s_ref + (&s_ref + b.as_tensor())?)?;
        let want = (y_ref * &r)?.sum_all()?.backward()?;
        for v in [&a, &b] {
            let (got, exp) = (grads.get(&v.id()).unwrap(), want.get(v).unwrap());
            let d = (got - exp)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-15, "{d}");
        }
        assert!(!grads.contains_key(&unused.id()));
        Ok(())
    }

    /// Anomaly detection names the op whose backward first overflows: here a 1×1 convolution
    /// computing in f16, whose kernel gradient (300·300 summed) exceeds f16's 65504.
    #[test]
    fn anomaly_detection_names_the_overflowing_op() -> Result<()> {
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::full(300f32, (1, 2, 2, 4), &dev)?.to_dtype(DType::F16)?)?;
        let w = Var::from_tensor(&Tensor::full(0.5f32, (4, 3), &dev)?)?;
        let run = |detect: bool| -> Result<HashMap<TensorId, Tensor>> {
            let tape = Rc::new(Tape::default());
            let y = record(&tape, || {
                crate::ops::linear(x.as_tensor(), w.as_tensor(), None, DType::F16, false)
            })?;
            let seed = Tensor::full(300f32, y.dims(), &dev)?.to_dtype(DType::F16)?;
            let tape =
                Rc::try_unwrap(tape).map_err(|_| candle_core::Error::Msg("shared".into()))?;
            tape.backward_checked(vec![(y.id(), seed)], detect)
        };
        // Unchecked, the overflow reaches the weight's gradient as inf (the loss scaler's case).
        let grads = run(false)?;
        let gw = grads[&w.as_tensor().id()].flatten_all()?.to_vec1::<f32>()?;
        assert!(gw.iter().all(|v| v.is_infinite()), "{gw:?}");
        let err = run(true).unwrap_err().to_string();
        assert!(err.contains("(linear)") && err.contains("input 1"), "{err}");
        Ok(())
    }
}
