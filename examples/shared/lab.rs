//! A small engine for problems on a few scalars, run through the GPU optimizer exactly as a
//! training engine would: per step, a kernel writes the gradient, the optimizer's step is
//! recorded after it into the same encoder, and an optional kernel projects the parameters
//! onto a box. Every step's gradient, parameters and optimizer state are copied aside on the
//! device and read back once at the end, and [`Run::check`] replays each step with the CPU
//! reference (`wgpu_optim::reference::step`).
//!
//! The problems have gradients affine in the parameters, `g_t = c * x + b_t` (element-wise,
//! `b_t` a table with one row per step): enough for a constant, a noisy, an adversarial
//! online or a noisy quadratic objective.

use wgpu_optim::{BufferView, Config, EpsMode, Optimizer, Parameter, TensorState, reference};

use super::Result;
use super::gpu::{Gpu, Kernel, STEPS_PER_SUBMIT, UNIT_ROUNDOFF};

/// `steps` gradients `g_t = curvature * x + offsets[t - 1]` on `x0.len()` scalars, with the
/// parameters projected onto `[lo, hi]` after each step when `bounds` is set.
pub struct Problem {
    pub x0: Vec<f32>,
    pub curvature: Vec<f32>,
    /// Row `t - 1` (of `x0.len()` values) is step `t`'s offset.
    pub offsets: Vec<f32>,
    pub bounds: Option<(f32, f32)>,
}

impl Problem {
    pub fn len(&self) -> usize {
        self.x0.len()
    }
    pub fn steps(&self) -> usize {
        self.offsets.len() / self.len()
    }
}

/// One optimizer's run: its inputs and what the GPU computed, step by step.
#[derive(Clone, Debug)]
pub struct Run {
    pub label: String,
    pub config: Config,
    pub bounds: Option<(f32, f32)>,
    /// The learning rate of step `t` at `[t - 1]`.
    pub lrs: Vec<f64>,
    /// The parameters after step `t` at `[t]`; `[0]` is the start.
    pub params: Vec<Vec<f32>>,
    /// The gradient of step `t` at `[t - 1]`, as the GPU computed it.
    pub grads: Vec<Vec<f32>>,
    /// The optimizer state after step `t` at `[t]`; `[0]` is the initial state.
    pub states: Vec<TensorState>,
}

impl Run {
    pub fn steps(&self) -> usize {
        self.grads.len()
    }

    /// Element `i` of the parameters after each step, `t = 0..=steps`.
    pub fn param_path(&self, i: usize) -> Vec<f32> {
        self.params.iter().map(|p| p[i]).collect()
    }
}

/// Runs `problem` through an optimizer with `config`, step `t` at learning rate `lr(t)`.
pub fn run(
    gpu: &Gpu,
    problem: &Problem,
    label: &str,
    config: &Config,
    lr: impl Fn(u64) -> f64,
) -> Result<Run> {
    let (n, steps) = (problem.len(), problem.steps());
    let param = gpu.buffer_from("x", &problem.x0);
    let grad = gpu.zeroed("grad x", n);
    let curvature = gpu.buffer_from("curvature", &problem.curvature);
    let offsets = gpu.buffer_from("offsets", &problem.offsets);
    let offset = gpu.zeroed("offset of this step", n);
    let mut optimizer = Optimizer::new(
        &gpu.device,
        config.clone(),
        &[Parameter::new(
            "x",
            BufferView::whole(&param),
            BufferView::whole(&grad),
        )],
    )?;

    let module = gpu.module("lab.wgsl", "", include_str!("lab.wgsl"));
    let gradient = gpu.kernel(
        &module,
        "affine_gradient",
        &[("lower", 0.0), ("upper", 0.0)],
    );
    let gradient = Kernel {
        bind_group: gpu.bind(
            &gradient,
            "affine_gradient",
            &[(0, &param), (1, &curvature), (2, &offset), (3, &grad)],
        ),
        pipeline: gradient,
        invocations: n as u32,
        workgroup_size: 64,
    };
    let projection = problem.bounds.map(|(lo, hi)| {
        let pipeline = gpu.kernel(
            &module,
            "project",
            &[("lower", lo as f64), ("upper", hi as f64)],
        );
        Kernel {
            bind_group: gpu.bind(&pipeline, "project", &[(4, &param)]),
            pipeline,
            invocations: n as u32,
            workgroup_size: 64,
        }
    });

    // Where each step's gradient, parameters and state are copied, step after step.
    let record = |name: &str| gpu.zeroed(name, steps * n);
    let (rec_grad, rec_param, rec_m, rec_v) = (
        record("grads"),
        record("params"),
        record("exp_avg"),
        record("exp_avg_sq"),
    );
    let rec_vmax = config.amsgrad.then(|| record("max_exp_avg_sq"));
    let bytes = (n * 4) as u64;
    let (state, state_offset) = optimizer.state_buffers(0)?;
    let (m_buf, v_buf) = (state.exp_avg.clone(), state.exp_avg_sq.clone());
    let vmax_buf = state.max_exp_avg_sq.clone();
    let state_at = state_offset * 4;

    let mut lrs = Vec::with_capacity(steps);
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    for t in 1..=steps as u64 {
        let row = (t - 1) * bytes;
        encoder.copy_buffer_to_buffer(&offsets, row, &offset, 0, bytes);
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            gradient.dispatch(&mut pass);
        }
        encoder.copy_buffer_to_buffer(&grad, 0, &rec_grad, row, bytes);
        let lr_t = lr(t);
        optimizer.set_lr(lr_t)?;
        lrs.push(lr_t);
        optimizer.step(&gpu.queue, &mut encoder);
        if let Some(projection) = &projection {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            projection.dispatch(&mut pass);
        }
        encoder.copy_buffer_to_buffer(&param, 0, &rec_param, row, bytes);
        encoder.copy_buffer_to_buffer(&m_buf, state_at, &rec_m, row, bytes);
        encoder.copy_buffer_to_buffer(&v_buf, state_at, &rec_v, row, bytes);
        if let (Some(src), Some(dst)) = (&vmax_buf, &rec_vmax) {
            encoder.copy_buffer_to_buffer(src, state_at, dst, row, bytes);
        }
        if t.is_multiple_of(STEPS_PER_SUBMIT) || t == steps as u64 {
            let full = std::mem::replace(
                &mut encoder,
                gpu.device.create_command_encoder(&Default::default()),
            );
            gpu.queue.submit([full.finish()]);
        }
    }

    let rows = |buffer: &wgpu::Buffer| -> Result<Vec<Vec<f32>>> {
        Ok(gpu
            .read(buffer, 0, steps * n)?
            .chunks(n)
            .map(<[f32]>::to_vec)
            .collect())
    };
    let mut params = vec![problem.x0.clone()];
    params.extend(rows(&rec_param)?);
    let (ms, vs) = (rows(&rec_m)?, rows(&rec_v)?);
    let vmaxs = rec_vmax.as_ref().map(rows).transpose()?;
    let mut states = vec![TensorState::new(config, n)];
    for t in 0..steps {
        states.push(TensorState {
            exp_avg: ms[t].clone(),
            exp_avg_sq: vs[t].clone(),
            max_exp_avg_sq: vmaxs.as_ref().map(|v| v[t].clone()),
            master_param: None,
        });
    }
    Ok(Run {
        label: label.into(),
        config: config.clone(),
        bounds: problem.bounds,
        lrs,
        params,
        grads: rows(&rec_grad)?,
        states,
    })
}

/// The outcome of replaying a run with the CPU reference.
#[derive(Debug)]
pub struct Check {
    pub label: String,
    /// Values compared: (params + each state buffer) x elements x steps.
    pub compared: usize,
    /// The largest |gpu - reference| / tolerance over them.
    pub worst: f64,
    pub worst_at: String,
    /// Values beyond their tolerance, and how many may be (Yogi's sign ties, see below).
    pub mismatches: Vec<String>,
    pub allowed: usize,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.mismatches.len() <= self.allowed
    }

    /// An error naming the first mismatches, unless the check passed.
    pub fn result(&self) -> Result<()> {
        if self.passed() {
            return Ok(());
        }
        let shown: Vec<&str> = self.mismatches.iter().take(5).map(String::as_str).collect();
        Err(format!(
            "{}: {} values differ from the CPU reference beyond their tolerance (at most {} may): {}",
            self.label,
            self.mismatches.len(),
            self.allowed,
            shown.join("; ")
        )
        .into())
    }

    pub fn summary(&self) -> String {
        format!(
            "{}: {} values match the CPU reference step by step, the largest difference {:.2} of its tolerance ({})",
            self.label, self.compared, self.worst, self.worst_at
        )
    }
}

impl Run {
    /// Replays each step `t` with the CPU reference, from the GPU's parameters and state after
    /// step `t - 1` and the GPU's gradient of step `t`, and compares the result with the GPU's
    /// parameters and state after step `t`.
    ///
    /// Replaying each step from the GPU's own inputs keeps the rounding of one step, not of
    /// the whole trajectory, in each comparison. With `u` the unit roundoff of f32 (2^-24),
    /// and the reference exact (f64) up to its final rounding to f32:
    /// - `m = b1 m + (1 - b1) g` costs the GPU at most a few roundings (the constants, two
    ///   products, a sum), each within `u` of the larger term: |error| <= 8u (|m| + |g|),
    ///   where `g` includes coupled weight decay (`wd |p|`). The same bound holds for `v` with
    ///   `g^2` (Adam and Yogi), and `max_exp_avg_sq` is an exact maximum of it.
    /// - the update `a m / (sqrt(v) + eps)`, `a` the bias-corrected learning rate folded on the
    ///   host in f64 and rounded once, costs a few roundings more (WGSL allows a quotient 2.5
    ///   ulp and sqrt about 4.5, an ulp being 2u; a sum or product u): 32u of its size, plus
    ///   what the errors in `m` and `v` carry into it (first order), plus 4u |p| for the decayed and updated parameter's roundings.
    /// - clamping is exact and moves two values no further apart.
    ///
    /// A skipped step, a wrong bias correction or a wrong weight decay shows up as an error of
    /// the size of the update itself, many thousand times these bounds. Yogi's `sign(v - g^2)`
    /// can resolve an exact tie differently in f32 and f64 (once in ~1e7 element-steps), so
    /// Yogi may have one mismatch per 10,000 element-steps, as in the library's parity tests.
    pub fn check(&self) -> Check {
        let u = UNIT_ROUNDOFF;
        let config = &self.config;
        let coupled_wd = match config.algorithm {
            wgpu_optim::Algorithm::AdamW => 0.0,
            _ => config.weight_decay,
        };
        let mut check = Check {
            label: self.label.clone(),
            compared: 0,
            worst: 0.0,
            worst_at: String::new(),
            mismatches: Vec::new(),
            allowed: if config.algorithm == wgpu_optim::Algorithm::Yogi {
                self.steps() * self.params[0].len() / 10_000
            } else {
                0
            },
        };
        let mut compare = |what: &str, t: usize, i: usize, got: f32, want: f64, tol: f64| {
            let ratio = (got as f64 - want).abs() / tol;
            check.compared += 1;
            if ratio.is_nan() || ratio > 1.0 {
                check.mismatches.push(format!(
                    "step {t} {what}[{i}]: gpu {got:e}, reference {want:e}, tolerance {tol:.1e}"
                ));
            }
            if ratio > check.worst {
                check.worst = ratio;
                check.worst_at = format!("step {t}, {what}[{i}]");
            }
        };
        for t in 1..=self.steps() {
            let (prev, prev_state) = (&self.params[t - 1], &self.states[t - 1]);
            let grad = &self.grads[t - 1];
            let lr = self.lrs[t - 1];
            let mut want = prev.clone();
            let mut want_state = prev_state.clone();
            reference::step(config, t as u64, lr, &mut want, grad, &mut want_state);
            if let Some((lo, hi)) = self.bounds {
                want.iter_mut().for_each(|p| *p = p.clamp(lo, hi));
            }
            let (got, got_state) = (&self.params[t], &self.states[t]);
            for i in 0..prev.len() {
                let g = (grad[i] as f64 * config.rescale_grad).abs()
                    + coupled_wd * (prev[i] as f64).abs();
                let tol_m =
                    8.0 * u * ((prev_state.exp_avg[i] as f64).abs() + g) + f64::MIN_POSITIVE;
                let tol_v = 8.0 * u * (prev_state.exp_avg_sq[i] as f64 + g * g) + f64::MIN_POSITIVE;
                let v_used = match &want_state.max_exp_avg_sq {
                    Some(vmax) => vmax[i] as f64,
                    None => want_state.exp_avg_sq[i] as f64,
                };
                let (a, root, denom) = update_scale(config, t as u64, lr, v_used);
                let update = a * (want_state.exp_avg[i] as f64).abs() / denom;
                let from_v = if root > 0.0 {
                    update * tol_v / (2.0 * root * denom)
                } else {
                    0.0
                };
                let tol_p = 4.0 * u * (prev[i] as f64).abs()
                    + 32.0 * u * update
                    + a * tol_m / denom
                    + from_v
                    + f64::MIN_POSITIVE;
                compare("param", t, i, got[i], want[i] as f64, tol_p);
                compare(
                    "exp_avg",
                    t,
                    i,
                    got_state.exp_avg[i],
                    want_state.exp_avg[i] as f64,
                    tol_m,
                );
                compare(
                    "exp_avg_sq",
                    t,
                    i,
                    got_state.exp_avg_sq[i],
                    want_state.exp_avg_sq[i] as f64,
                    tol_v,
                );
                if let (Some(got), Some(want)) =
                    (&got_state.max_exp_avg_sq, &want_state.max_exp_avg_sq)
                {
                    compare("max_exp_avg_sq", t, i, got[i], want[i] as f64, tol_v);
                }
            }
        }
        check
    }
}

/// For step `t` at learning rate `lr` with second moment `v` (after amsgrad's maximum): the
/// update is `a * m / denom`; `root` is the square root inside `denom` scaled so that
/// d(denom)/dv = 1 / (2 root). See `semantics.md`, step 8.
pub fn update_scale(config: &Config, t: u64, lr: f64, v: f64) -> (f64, f64, f64) {
    let [b1, b2] = config.betas;
    let (bc1, bc2) = if config.bias_correction {
        (1.0 - b1.powf(t as f64), 1.0 - b2.powf(t as f64))
    } else {
        (1.0, 1.0)
    };
    match config.eps_mode {
        EpsMode::Torch => {
            let sqrt = (v / bc2 + config.eps_root).sqrt();
            (lr / bc1, sqrt * bc2, sqrt + config.eps)
        }
        EpsMode::Folded => {
            let sqrt = (v + config.eps_root).sqrt();
            (lr * bc2.sqrt() / bc1, sqrt, sqrt + config.eps)
        }
    }
}
