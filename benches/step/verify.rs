//! Verification: every kernel runs once on random inputs and is checked before it is timed;
//! a wrong one is reported and not timed. Steps are checked against the CPU reference
//! (`wgpu_optim::reference`: `step` for plain steps and steps in 16-bit dtypes, `iteration`
//! for steps with pre-step features), the ceilings bit for bit against what they must write.

use std::ops::Range;

use wgpu_optim::reference::{self, IterationState, IterationTensor};
use wgpu_optim::testing::{Rng, Tolerance, compare, max_abs, spacing, yogi_ties};
use wgpu_optim::{Config, Dtype, TensorState, dtype};

use crate::ceilings::{Ceiling, StepBuffers, TRAFFIC_BUFFERS, TRAFFIC_SCALE};
use crate::gpu::Gpu;
use crate::steps::{Step, StepKernel, loss_scale};
use crate::timing::Kernel;

/// `n` magnitudes uniform in [lo, hi), each with a random sign when `signed`.
pub fn values(rng: &mut Rng, n: u64, lo: f32, hi: f32, signed: bool) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let bits = rng.next_u64();
            let x = lo + (hi - lo) * ((bits >> 40) as f32 / (1u64 << 24) as f32);
            if signed && bits & 1 == 1 { -x } else { x }
        })
        .collect()
}

/// The starting values of a size: random, never zero, the state in a trained-like range.
pub struct Inputs {
    pub param: Vec<f32>,
    pub grad: Vec<f32>,
    pub state: TensorState,
}

impl Inputs {
    pub fn new(rng: &mut Rng, n: u64) -> Self {
        Inputs {
            param: values(rng, n, 0.01, 1.0, true),
            grad: values(rng, n, 0.01, 1.0, true),
            state: TensorState {
                exp_avg: values(rng, n, 0.001, 0.1, true),
                exp_avg_sq: values(rng, n, 0.005, 0.75, false),
                max_exp_avg_sq: Some(values(rng, n, 0.005, 0.75, false)),
                master_param: None,
            },
        }
    }

    /// The gradient times the loss scale `s`, in f32, as the loss-scale rows' buffer holds it;
    /// an error if a product overflows.
    pub fn scaled_grad(&self, s: f32) -> Result<Vec<f32>, String> {
        let scaled: Vec<f32> = self.grad.iter().map(|&g| g * s).collect();
        match scaled.iter().position(|g| !g.is_finite()) {
            None => Ok(scaled),
            Some(i) => Err(format!(
                "grad[{i}] = {:e} times S = {s} overflows",
                self.grad[i]
            )),
        }
    }

    /// The state of elements `range` for `config`: vmax only with amsgrad, and with master
    /// weights the parameters themselves (in f32) as the master copy.
    fn state(&self, range: Range<usize>, config: &Config) -> TensorState {
        TensorState {
            exp_avg: self.state.exp_avg[range.clone()].to_vec(),
            exp_avg_sq: self.state.exp_avg_sq[range.clone()].to_vec(),
            max_exp_avg_sq: self
                .state
                .max_exp_avg_sq
                .as_ref()
                .filter(|_| config.amsgrad)
                .map(|v| v[range.clone()].to_vec()),
            master_param: config.keeps_master().then(|| self.param[range].to_vec()),
        }
    }

    /// The gradient of elements `range` as a buffer of `dtype` holds it (rounded to nearest).
    pub fn grad_as(&self, dtype: Dtype, range: Range<usize>) -> Vec<f32> {
        rounded(dtype, &self.grad[range])
    }
}

/// `data` as a buffer of `dtype` holds it: rounded to nearest, widened back (exact).
fn rounded(dtype: Dtype, data: &[f32]) -> Vec<f32> {
    data.iter().map(|&x| dtype::round_to(dtype, x)).collect()
}

/// `state` as the optimizer stores it in `config`'s dtypes (what `load_state` leaves there).
fn stored(config: &Config, state: TensorState) -> TensorState {
    let (m, v) = (config.exp_avg_dtype, config.exp_avg_sq_dtype);
    TensorState {
        exp_avg: rounded(m, &state.exp_avg),
        exp_avg_sq: rounded(v, &state.exp_avg_sq),
        max_exp_avg_sq: state.max_exp_avg_sq.map(|x| rounded(v, &x)),
        master_param: state.master_param,
    }
}

/// The values of one stored buffer of a step that are not the reference's rounding bit for
/// bit, over all its tensors: how many, of how many, and the first few.
#[derive(Default)]
struct Inexact {
    count: usize,
    total: usize,
    shown: Vec<String>,
}

impl Inexact {
    /// At most 2 + 2% of a 16-bit buffer's values may differ from the reference's rounding
    /// (`compare_as`); an error names the buffer, the count and the first few.
    fn check(&self, what: &str, dtype: Dtype) -> Result<(), String> {
        if self.count <= 2 + self.total / 50 {
            return Ok(());
        }
        Err(format!(
            "{what} ({}): {} of {} stored values are not the reference's rounding: {}",
            dtype.name(),
            self.count,
            self.total,
            self.shown.join(", ")
        ))
    }
}

/// A stored buffer of `dtype` of one tensor against the reference: f32 as `testing::compare`
/// (with `allowed` mismatches); 16-bit as `tests/storage.rs` checks it. There each value may
/// differ by the f32 tolerance plus one rounding of the dtype (the spacing at the larger of
/// the two: an f32 result within its tolerance of a rounding boundary may round either way),
/// and the values that are not the reference's rounding bit for bit are counted in `inexact`,
/// which the caller checks over the whole buffer (`Inexact::check`): the f32 results within
/// their tolerance of a boundary are about 1e-4 of random values, while a rounding done wrong
/// (truncation, a wrong half of a word) differs in about half of them. The count is over the
/// buffer, not per tensor, because with 16-bit inputs a result is often exactly a tie: with
/// bf16 `m` and `g` (8-bit significands), `0.9 m + 0.1 g` in f64 is often exactly the midpoint
/// of two bf16 values (0.3% of the elements of a random step), which the reference rounds to
/// even and the kernel, whose f32 result is an ulp to one side, may round the other way: a
/// 32-element bias may hold three such.
fn compare_as(
    what: &str,
    dtype: Dtype,
    got: &[f32],
    want: &[f32],
    tol: Tolerance,
    allowed: usize,
    inexact: &mut Inexact,
) -> Result<(), String> {
    if !dtype.is_16bit() {
        return compare(what, got, want, tol, allowed);
    }
    if got.len() != want.len() {
        return Err(format!(
            "{what}: got {} elements, want {}",
            got.len(),
            want.len()
        ));
    }
    let same = |g: f32, w: f32| g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan();
    let far: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|&(_, (&g, &w))| {
            let slack = tol.abs + tol.rel * w.abs() + spacing(dtype, g.abs().max(w.abs()));
            !((g - w).abs() <= slack || same(g, w))
        })
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g:e} want {w:e}"))
        .collect();
    inexact.total += got.len();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !same(g, w) {
            inexact.count += 1;
            if inexact.shown.len() < 3 {
                inexact
                    .shown
                    .push(format!("{what}[{i}] got {g:e} want {w:e}"));
            }
        }
    }
    if far.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what} ({}): beyond {tol:?} plus one rounding: {}",
            dtype.name(),
            far.join(", ")
        ))
    }
}

/// Records, submits and waits for one run of `kernel`.
fn run_once(gpu: &Gpu, kernel: &mut dyn Kernel) {
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    kernel.record(gpu, &mut encoder, None);
    gpu.queue.submit([encoder.finish()]);
    gpu.wait();
}

/// Uploads `inputs` to the step's parameters and state in their dtypes (the gradient is
/// already in place: the random one in its dtype, times S for loss scaling), runs one step and
/// compares the parameters and every state buffer with the CPU reference, which starts from
/// the inputs rounded to their dtypes: `reference::step` per tensor for a plain step or one in
/// 16-bit dtypes, `reference::iteration` over all the tensors for a step with features, whose
/// optimizer-wide numbers (t, S, found_inf, the global norm) are checked too. With master
/// weights the step checked is t = 2, which steps the f32 copy (the inputs' parameters; the
/// 16-bit buffer holds their rounding) as every timed step does: t = 1 would read the 16-bit
/// parameters instead.
pub fn step(
    gpu: &Gpu,
    step: &mut Step,
    kernel: &StepKernel,
    inputs: &Inputs,
) -> Result<(), String> {
    let name = format!("{} x{}", kernel.label(), step.tensors.len());
    let fail = |e: &dyn std::fmt::Display| format!("{name}: {e}");
    let config = &kernel.config;
    let pattern = kernel.pattern();
    let ranges: Vec<Range<usize>> = step
        .tensors
        .iter()
        .map(|&(offset, len)| offset as usize..(offset + len) as usize)
        .collect();
    if config.keeps_master() {
        step.optimizer.set_step_count(1);
    }
    gpu.write_as(&step.param, pattern.param, 0, &inputs.param);
    for (i, range) in ranges.iter().enumerate() {
        let state = inputs.state(range.clone(), config);
        step.optimizer
            .load_state(&gpu.queue, i, &state)
            .map_err(|e| fail(&e))?;
    }
    let status = |step: &Step| {
        step.optimizer
            .read_status_blocking(&gpu.device, &gpu.queue)
            .map_err(|e| fail(&e))
    };
    let status_before = status(step)?;
    let t = step.optimizer.step_count() + 1;
    run_once(gpu, step);
    let got_param = gpu
        .read_as(&step.param, pattern.param, 0, inputs.param.len() as u64)
        .map_err(|e| fail(&e))?;

    // The reference's parameters and state after the step, per tensor, from the inputs as
    // the buffers hold them.
    let before: Vec<Vec<f32>> = ranges
        .iter()
        .map(|r| rounded(pattern.param, &inputs.param[r.clone()]))
        .collect();
    let mut want = before.clone();
    let mut states: Vec<TensorState> = ranges
        .iter()
        .map(|r| stored(config, inputs.state(r.clone(), config)))
        .collect();
    let mut errors = Vec::new();
    if config.has_pre_step() {
        // The gradient as the step's buffer holds it: scaled by S in f32 (exact: a power of
        // two, and far from overflow).
        let s = if config.loss_scale.is_some() {
            loss_scale()
        } else {
            1.0
        };
        let grads: Vec<Vec<f32>> = ranges
            .iter()
            .map(|r| inputs.grad[r.clone()].iter().map(|&g| g * s).collect())
            .collect();
        let mut state = IterationState {
            loss_scale: status_before.loss_scale,
            growth_tracker: status_before.growth_tracker,
            step: status_before.applied_steps,
        };
        let lrs: Vec<f64> = step.groups.iter().map(|c| c.lr).collect();
        let mut tensors: Vec<IterationTensor> = want
            .iter_mut()
            .zip(&grads)
            .zip(&mut states)
            .enumerate()
            .map(|(i, ((param, grad), state))| IterationTensor {
                group: step.group(i),
                param,
                grad,
                state,
            })
            .collect();
        let report = reference::iteration(&step.groups, &lrs, &mut tensors, &mut state);
        drop(grads);
        let after = status(step)?;
        if config.loss_scale.is_some() && status_before.loss_scale != s {
            errors.push(format!(
                "{name}: S is {}, the gradients were scaled by {s}",
                status_before.loss_scale
            ));
        }
        if report.found_inf || !report.applied {
            errors.push(format!(
                "{name}: the scaled gradients overflowed: the reference skips"
            ));
        }
        if after.found_inf != report.found_inf
            || after.applied_steps != state.step
            || after.loss_scale != state.loss_scale
            || after.growth_tracker != state.growth_tracker
        {
            errors.push(format!(
                "{name}: status {after:?}, reference {report:?} {state:?}"
            ));
        }
        if config.max_grad_norm.is_some() {
            // The norm as tests/pre_step.rs checks it; the step must clip.
            let norm = after.global_norm as f64;
            if (norm - report.global_norm).abs() > 1e-5 * report.global_norm {
                errors.push(format!(
                    "{name}: global norm {norm}, reference {}",
                    report.global_norm
                ));
            }
            if report.clip_coef >= 1.0 {
                errors.push(format!(
                    "{name}: the gradient's norm {} does not exceed max_grad_norm: nothing clipped",
                    report.global_norm
                ));
            }
        }
    } else {
        for (i, range) in ranges.iter().enumerate() {
            let config = &step.groups[step.group(i)];
            let grad = inputs.grad_as(pattern.grad, range.clone());
            reference::step(config, t, config.lr, &mut want[i], &grad, &mut states[i]);
        }
    }

    // One step's tolerances, derived once for every test and the benchmark
    // (`wgpu_optim::testing::Tolerance`), with the largest unscaled gradient (clipping only
    // shrinks it, as in tests/pre_step.rs); Yogi may resolve a few near-ties the other way.
    // 16-bit buffers get one rounding of their dtype more (`compare_as`).
    // (Rounding to nearest keeps the order of magnitudes: the largest rounded gradient is the
    // largest gradient rounded.)
    let g_max = dtype::round_to(pattern.grad, max_abs(&inputs.grad));
    let mut inexact: [Inexact; 5] = Default::default();
    let names = [
        "param",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "master_param",
    ];
    let dtypes = [
        pattern.param,
        pattern.exp_avg,
        pattern.exp_avg_sq,
        pattern.exp_avg_sq,
        Dtype::F32,
    ];
    for (i, range) in ranges.into_iter().enumerate() {
        let config = &step.groups[step.group(i)];
        // The parameter the step starts from: the master copy's f32 values, where it has one.
        let p_max = if config.keeps_master() {
            max_abs(&inputs.param[range.clone()])
        } else {
            max_abs(&before[i])
        };
        let p_tol = Tolerance::param(1, p_max, config.lr);
        let state = &states[i];
        let got_state = step
            .optimizer
            .read_state_blocking(&gpu.device, &gpu.queue, i)
            .map_err(|e| fail(&e))?;
        let allowed = if kernel.near_ties {
            yogi_ties(range.len() as u64)
        } else {
            0
        };
        // (index into `names`, got, want, tolerance)
        let mut checks = vec![
            (0, &got_param[range], &want[i][..], p_tol),
            (
                1,
                &got_state.exp_avg[..],
                &state.exp_avg[..],
                Tolerance::exp_avg(max_abs(&state.exp_avg), g_max),
            ),
            (
                2,
                &got_state.exp_avg_sq[..],
                &state.exp_avg_sq[..],
                Tolerance::exp_avg_sq(max_abs(&state.exp_avg_sq), g_max),
            ),
        ];
        if let (Some(got), Some(want)) = (&got_state.max_exp_avg_sq, &state.max_exp_avg_sq) {
            checks.push((3, got, want, Tolerance::exp_avg_sq(max_abs(want), g_max)));
        }
        match (&got_state.master_param, &state.master_param) {
            (Some(got), Some(want)) => checks.push((4, got, want, p_tol)),
            (None, None) => {}
            _ => errors.push(format!(
                "{name}, tensor {i}: master weights where none were asked, or none where asked"
            )),
        }
        for (k, got, want, tol) in checks {
            let (what, dtype) = (names[k], dtypes[k]);
            if let Err(e) = compare_as(what, dtype, got, want, tol, allowed, &mut inexact[k]) {
                errors.push(format!("{name}, tensor {i}: {e}"));
            }
        }
    }
    for k in 0..names.len() {
        if let Err(e) = inexact[k].check(names[k], dtypes[k]) {
            errors.push(format!("{name}: {e}"));
        }
    }
    // A wrong kernel fails on every tensor: 1000 tensors would bury the table.
    const SHOWN: usize = 12;
    if errors.len() > SHOWN {
        let more = errors.len() - SHOWN;
        errors.truncate(SHOWN);
        errors.push(format!("{name}: {more} more mismatches not shown"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

/// Runs the copy once in each of its shapes, `dst` cleared before each, and compares `dst`
/// with `src` (= `want`) bit for bit. Returns the shapes that passed and the failures.
pub fn copy_shapes(
    gpu: &Gpu,
    copy: &mut Ceiling,
    dst: &wgpu::Buffer,
    want: &[f32],
) -> (Vec<usize>, Vec<String>) {
    let mut passed = Vec::new();
    let mut failures = Vec::new();
    for shape in 0..copy.shapes() {
        copy.shape = shape;
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(dst, 0, None);
        gpu.queue.submit([encoder.finish()]);
        run_once(gpu, copy);
        let checked = gpu.read(dst, 0, copy.len).and_then(|got| {
            match got
                .iter()
                .zip(want)
                .position(|(g, w)| g.to_bits() != w.to_bits())
            {
                None => Ok(()),
                Some(i) => Err(format!("dst[{i}] = {:e}, src[{i}] = {:e}", got[i], want[i])),
            }
        });
        match checked {
            Ok(()) => passed.push(shape),
            Err(e) => failures.push(format!("copy ({}): {e}", copy.shape_name(shape))),
        }
    }
    (passed, failures)
}

/// Runs the traffic kernel once in each of its shapes over the step's buffers `b` and checks
/// every buffer it writes bit for bit: `p + s g` (with master weights `x + s g` from the master
/// copy `x`, into both), `m + s g`, `v + |s g|` and `max(vmax, v)` with `s = TRAFFIC_SCALE` (a power of two: one rounding to f32,
/// fused or not), each computed on the values widened from its dtype and rounded to nearest
/// into it (`wgpu_optim::dtype`, which the shader's conversions equal bit for bit). Returns the
/// shapes that passed and the failures.
pub fn traffic_shapes(
    gpu: &Gpu,
    traffic: &mut Ceiling,
    b: &StepBuffers,
) -> (Vec<usize>, Vec<String>) {
    let len = traffic.len;
    let bindings = b.bindings();
    // Every binding widened to f32 (empty where it is a placeholder); the gradient is read.
    let read_all = || -> Result<Vec<Vec<f32>>, String> {
        bindings
            .iter()
            .map(|&(buffer, dtype)| match buffer {
                Some(buffer) => gpu.read_as(buffer, dtype, 0, len),
                None => Ok(Vec::new()),
            })
            .collect()
    };
    let mut before = match read_all() {
        Ok(x) => x,
        Err(e) => return (Vec::new(), vec![format!("traffic: {e}")]),
    };
    let mut passed = Vec::new();
    let mut failures = Vec::new();
    for shape in 0..traffic.shapes() {
        traffic.shape = shape;
        let [p, g, m, v, vmax, master] = &before[..] else {
            unreachable!("six bindings")
        };
        let round = |k: usize, x: f32| dtype::round_to(bindings[k].1, x);
        let mut want = before.clone();
        for i in 0..len as usize {
            let d = TRAFFIC_SCALE * g[i];
            // As the step: with master weights the copy is the parameter it reads.
            let x = if master.is_empty() { p[i] } else { master[i] };
            want[0][i] = round(0, x + d);
            want[2][i] = round(2, m[i] + d);
            let v_new = v[i] + d.abs();
            want[3][i] = round(3, v_new);
            if !vmax.is_empty() {
                want[4][i] = round(4, vmax[i].max(v_new));
            }
            if !master.is_empty() {
                want[5][i] = x + d;
            }
        }
        run_once(gpu, traffic);
        let got = match read_all() {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("traffic: {e}"));
                break;
            }
        };
        let wrong = (0..bindings.len()).find_map(|k| {
            let i = got[k]
                .iter()
                .zip(&want[k])
                .position(|(g, w)| g.to_bits() != w.to_bits())?;
            Some(format!(
                "{} ({})[{i}] = {:e}, want {:e}",
                TRAFFIC_BUFFERS[k].0,
                bindings[k].1.name(),
                got[k][i],
                want[k][i]
            ))
        });
        match wrong {
            None => passed.push(shape),
            Some(e) => failures.push(format!(
                "traffic {} ({}): {e}",
                b.pattern.label(),
                traffic.shape_name(shape)
            )),
        }
        before = got;
    }
    (passed, failures)
}
