//! Verification: every kernel runs once on random inputs and is checked before it is timed;
//! a wrong one is reported and not timed. Steps are checked against the CPU reference
//! (`wgpu_optim::reference`: `step` for plain steps, `iteration` for steps with pre-step
//! features), the ceilings bit for bit against what they must write.

use std::ops::Range;

use wgpu_optim::TensorState;
use wgpu_optim::reference::{self, IterationState, IterationTensor};
use wgpu_optim::testing::{Rng, Tolerance, compare, max_abs, yogi_ties};

use crate::ceilings::{Ceiling, StepBuffers, TRAFFIC_SCALE};
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

    /// The state of elements `range`, with vmax only for `amsgrad`.
    fn state(&self, range: std::ops::Range<usize>, amsgrad: bool) -> TensorState {
        TensorState {
            exp_avg: self.state.exp_avg[range.clone()].to_vec(),
            exp_avg_sq: self.state.exp_avg_sq[range.clone()].to_vec(),
            max_exp_avg_sq: self
                .state
                .max_exp_avg_sq
                .as_ref()
                .filter(|_| amsgrad)
                .map(|v| v[range].to_vec()),
            master_param: None,
        }
    }
}

/// Records, submits and waits for one run of `kernel`.
fn run_once(gpu: &Gpu, kernel: &mut dyn Kernel) {
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    kernel.record(gpu, &mut encoder, None);
    gpu.queue.submit([encoder.finish()]);
    gpu.wait();
}

/// Uploads `inputs` to the step's parameters and state (the gradient is already in place: the
/// random one, times S for loss scaling), runs one step and compares the parameters and every
/// state buffer with the CPU reference: `reference::step` per tensor for a plain step,
/// `reference::iteration` over all the tensors for a step with features, whose optimizer-wide
/// numbers (t, S, found_inf, the global norm) are checked too.
pub fn step(
    gpu: &Gpu,
    step: &mut Step,
    kernel: &StepKernel,
    inputs: &Inputs,
) -> Result<(), String> {
    let name = format!("{} x{}", kernel.label(), step.tensors.len());
    let fail = |e: &dyn std::fmt::Display| format!("{name}: {e}");
    let amsgrad = kernel.config.amsgrad;
    let ranges: Vec<Range<usize>> = step
        .tensors
        .iter()
        .map(|&(offset, len)| offset as usize..(offset + len) as usize)
        .collect();
    gpu.write(&step.param, 0, &inputs.param);
    for (i, range) in ranges.iter().enumerate() {
        let state = inputs.state(range.clone(), amsgrad);
        let (buffers, at) = step.optimizer.state_buffers(i).map_err(|e| fail(&e))?;
        gpu.write(&buffers.exp_avg, at, &state.exp_avg);
        gpu.write(&buffers.exp_avg_sq, at, &state.exp_avg_sq);
        if let (Some(buffer), Some(v)) = (&buffers.max_exp_avg_sq, &state.max_exp_avg_sq) {
            gpu.write(buffer, at, v);
        }
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
        .read(&step.param, 0, inputs.param.len() as u64)
        .map_err(|e| fail(&e))?;

    // The reference's parameters and state after the step, per tensor.
    let mut want: Vec<Vec<f32>> = ranges
        .iter()
        .map(|r| inputs.param[r.clone()].to_vec())
        .collect();
    let mut states: Vec<TensorState> = ranges
        .iter()
        .map(|r| inputs.state(r.clone(), amsgrad))
        .collect();
    let mut errors = Vec::new();
    if kernel.config.has_pre_step() {
        // The gradient as the step's buffer holds it: scaled by S in f32 (exact: a power of
        // two, and far from overflow).
        let s = if kernel.config.loss_scale.is_some() {
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
        if kernel.config.loss_scale.is_some() && status_before.loss_scale != s {
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
        if kernel.config.max_grad_norm.is_some() {
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
            reference::step(
                config,
                t,
                config.lr,
                &mut want[i],
                &inputs.grad[range.clone()],
                &mut states[i],
            );
        }
    }

    // One step's tolerances, derived once for every test and the benchmark
    // (`wgpu_optim::testing::Tolerance`), with the largest unscaled gradient (clipping only
    // shrinks it, as in tests/pre_step.rs); Yogi may resolve a few near-ties the other way.
    let g_max = max_abs(&inputs.grad);
    for (i, range) in ranges.into_iter().enumerate() {
        let config = &step.groups[step.group(i)];
        let before = &inputs.param[range.clone()];
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
        let mut checks = vec![
            (
                "param",
                &got_param[range],
                &want[i][..],
                Tolerance::param(1, max_abs(before), config.lr),
            ),
            (
                "exp_avg",
                &got_state.exp_avg[..],
                &state.exp_avg[..],
                Tolerance::exp_avg(max_abs(&state.exp_avg), g_max),
            ),
            (
                "exp_avg_sq",
                &got_state.exp_avg_sq[..],
                &state.exp_avg_sq[..],
                Tolerance::exp_avg_sq(max_abs(&state.exp_avg_sq), g_max),
            ),
        ];
        if let (Some(got), Some(want)) = (&got_state.max_exp_avg_sq, &state.max_exp_avg_sq) {
            checks.push((
                "max_exp_avg_sq",
                got,
                want,
                Tolerance::exp_avg_sq(max_abs(want), g_max),
            ));
        }
        for (what, got, want, tol) in checks {
            if let Err(e) = compare(what, got, want, tol, allowed) {
                errors.push(format!("{name}, tensor {i}: {e}"));
            }
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
/// every buffer it writes bit for bit: `p + s g`, `m + s g`, `v + |s g|`, `max(vmax, v)` with
/// `s = TRAFFIC_SCALE` (a power of two: one rounding, fused or not). Returns the shapes that
/// passed and the failures.
pub fn traffic_shapes(
    gpu: &Gpu,
    traffic: &mut Ceiling,
    b: &StepBuffers,
) -> (Vec<usize>, Vec<String>) {
    let len = traffic.len;
    let read_all = || -> Result<[Vec<f32>; 4], String> {
        let vmax = match b.max_exp_avg_sq {
            Some(buffer) => gpu.read(buffer, 0, len)?,
            None => Vec::new(),
        };
        Ok([
            gpu.read(b.param, 0, len)?,
            gpu.read(b.exp_avg, 0, len)?,
            gpu.read(b.exp_avg_sq, 0, len)?,
            vmax,
        ])
    };
    let (before, grad) = match read_all().and_then(|s| Ok((s, gpu.read(b.grad, 0, len)?))) {
        Ok(x) => x,
        Err(e) => return (Vec::new(), vec![format!("traffic: {e}")]),
    };
    let mut before = before;
    let mut passed = Vec::new();
    let mut failures = Vec::new();
    for shape in 0..traffic.shapes() {
        traffic.shape = shape;
        let [p, m, v, vmax] = &before;
        let mut want = [p.clone(), m.clone(), v.clone(), vmax.clone()];
        for i in 0..len as usize {
            let d = TRAFFIC_SCALE * grad[i];
            want[0][i] = p[i] + d;
            want[1][i] = m[i] + d;
            want[2][i] = v[i] + d.abs();
            if !vmax.is_empty() {
                want[3][i] = vmax[i].max(want[2][i]);
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
        let names = ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"];
        let wrong = (0..4).find_map(|k| {
            let i = got[k]
                .iter()
                .zip(&want[k])
                .position(|(g, w)| g.to_bits() != w.to_bits())?;
            Some(format!(
                "{}[{i}] = {:e}, want {:e}",
                names[k], got[k][i], want[k][i]
            ))
        });
        match wrong {
            None => passed.push(shape),
            Some(e) => failures.push(format!("traffic ({}): {e}", traffic.shape_name(shape))),
        }
        before = got;
    }
    (passed, failures)
}
