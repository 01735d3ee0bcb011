//! The CPU reference: `semantics.md` written out once, for clarity rather than speed.
//!
//! Arithmetic is f64 on f32 inputs; the state is rounded to f32 as soon as it is computed,
//! because that is what every stored copy of it (GPU buffers, checkpoints, PyTorch) holds, and
//! then to its storage dtype when stored (`docs/semantics.md`, "Storage dtypes"): 16-bit values
//! are kept here widened to f32, which holds them exactly. The GPU path is tested against
//! these functions.
//!
//! Owns: the update formula on the CPU (the WGSL family is the other place it lives). May not
//! touch the GPU or depend on how the kernel is dispatched.

use crate::config::{Algorithm, Config, EpsMode};
use crate::dtype::{self, Dtype, q8};
use crate::protocol::decoupled_decay;

/// The optimizer state of one parameter tensor, with PyTorch's names.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorState {
    /// `m`, the first moment.
    pub exp_avg: Vec<f32>,
    /// `v`, the second moment.
    pub exp_avg_sq: Vec<f32>,
    /// `vmax`, the running maximum of `v`; present only with `amsgrad`.
    pub max_exp_avg_sq: Option<Vec<f32>>,
    /// The f32 copy of 16-bit parameters; present only with `master_weights` (it starts from
    /// the parameters at the first step).
    pub master_param: Option<Vec<f32>>,
}

impl TensorState {
    /// The state before the first step: `m = 0`, `v = initial_accumulator` (as its dtype
    /// stores it: a q8 block of equal values holds them exactly), `vmax = 0`, master weights
    /// 0 (unused until the first step sets them).
    pub fn new(config: &Config, len: usize) -> Self {
        let mut exp_avg_sq = vec![config.initial_accumulator as f32; len];
        store_state(config.exp_avg_sq_dtype, "exp_avg_sq", &mut exp_avg_sq);
        TensorState {
            exp_avg: vec![0.0; len],
            exp_avg_sq,
            max_exp_avg_sq: config.amsgrad.then(|| vec![0.0; len]),
            master_param: config.keeps_master().then(|| vec![0.0; len]),
        }
    }
}

/// One step `t` (1-based) with learning rate `lr` over `param`, as `semantics.md` defines it.
/// With 16-bit dtypes, `param` and `grad` hold their values widened to f32, and the results
/// are stored rounded as the config's storage keys say; the random bits of stochastic
/// rounding use `t` and each element's index in `param`.
///
/// # Panics
/// If `grad` or the state differ in length from `param`, or `amsgrad` is on and the state has
/// no `max_exp_avg_sq` (the reference is a test oracle, not a checked API).
pub fn step(
    config: &Config,
    t: u64,
    lr: f64,
    param: &mut [f32],
    grad: &[f32],
    state: &mut TensorState,
) {
    assert!(t >= 1, "steps count from 1");
    let n = param.len();
    assert_eq!(grad.len(), n);
    assert_eq!(state.exp_avg.len(), n);
    assert_eq!(state.exp_avg_sq.len(), n);
    let [b1, b2] = config.betas;
    let wd = config.weight_decay;
    let lr_wd = decoupled_decay(config, lr) as f32 as f64;
    let bc1 = 1.0 - b1.powf(t as f64);
    let bc2 = 1.0 - b2.powf(t as f64);
    let master = config.keeps_master();
    assert!(
        !master || state.master_param.is_some(),
        "master weights need master_param"
    );
    for i in 0..n {
        // With master weights the f32 copy is the parameter, from the second step on.
        let mut p = match &state.master_param {
            Some(copy) if master && t != 1 => copy[i] as f64,
            _ => param[i] as f64,
        };
        // 1-3: rescale, clip, maximize.
        let mut g = grad[i] as f64 * config.rescale_grad;
        if let Some(c) = config.clip_gradient {
            g = g.clamp(-c, c);
        }
        if config.maximize {
            g = -g;
        }
        // 4: weight decay, coupled or decoupled (`p - (lr * wd) * p`, lr * wd in f32 as the
        // kernel has it; skipped at 0, where it would turn an infinite p into NaN).
        if wd != 0.0 {
            match config.algorithm {
                Algorithm::Adam | Algorithm::Yogi => g += wd * p,
                Algorithm::AdamW if lr_wd != 0.0 => p -= lr_wd * p,
                Algorithm::AdamW => {}
            }
        }
        // 5: exp_avg (stored rounded to its dtype below, once the tensor is done).
        let m = round(b1 * state.exp_avg[i] as f64 + (1.0 - b1) * g);
        state.exp_avg[i] = m as f32;
        // 6: exp_avg_sq.
        let v_prev = state.exp_avg_sq[i] as f64;
        let v = round(match config.algorithm {
            Algorithm::Adam | Algorithm::AdamW => b2 * v_prev + (1.0 - b2) * g * g,
            Algorithm::Yogi => v_prev - (1.0 - b2) * sign(v_prev - g * g) * g * g,
        });
        state.exp_avg_sq[i] = v as f32;
        // 7: amsgrad's max_exp_avg_sq replaces v below (the fresh f32 maximum; the stored one
        // is rounded to v's dtype).
        let v = match state.max_exp_avg_sq.as_mut() {
            Some(vmax) if config.amsgrad => {
                let fresh = vmax[i].max(v as f32);
                vmax[i] = fresh;
                fresh as f64
            }
            _ => {
                assert!(!config.amsgrad, "amsgrad needs max_exp_avg_sq");
                v
            }
        };
        // 8: the parameter update.
        let update = if !config.bias_correction {
            lr * m / ((v + config.eps_root).sqrt() + config.eps)
        } else {
            match config.eps_mode {
                EpsMode::Torch => {
                    (lr / bc1) * m / ((v / bc2 + config.eps_root).sqrt() + config.eps)
                }
                EpsMode::Folded => {
                    (lr * bc2.sqrt() / bc1) * m / ((v + config.eps_root).sqrt() + config.eps)
                }
            }
        };
        param[i] = store_param(
            config,
            t,
            i,
            (p - update) as f32,
            state.master_param.as_mut(),
        );
    }
    // The state as stored: each value rounded to its dtype; q8 block by block from the
    // tensor's first element, each block's absmax over its fresh values.
    let (m, v) = (config.exp_avg_dtype, config.exp_avg_sq_dtype);
    store_state(m, "exp_avg", &mut state.exp_avg);
    store_state(v, "exp_avg_sq", &mut state.exp_avg_sq);
    if let Some(vmax) = state.max_exp_avg_sq.as_mut().filter(|_| config.amsgrad) {
        store_state(v, "max_exp_avg_sq", vmax);
    }
}

/// Fresh f32 values of one state of a tensor as its dtype stores them.
fn store_state(dtype: Dtype, name: &str, values: &mut [f32]) {
    if dtype == Dtype::Q8 {
        q8::Map::for_state(name).round_tensor(values);
    } else {
        values
            .iter_mut()
            .for_each(|x| *x = dtype::round_to(dtype, *x));
    }
}

/// The parameter as its buffer stores it: with master weights the f32 value goes to the copy
/// and the parameter is rounded to nearest; without, rounded as `rounding` says.
fn store_param(config: &Config, t: u64, i: usize, p: f32, master: Option<&mut Vec<f32>>) -> f32 {
    if let Some(copy) = master.filter(|_| config.keeps_master()) {
        copy[i] = p;
        return dtype::round_to(config.param_dtype, p);
    }
    if !config.rounds_stochastically() {
        return dtype::round_to(config.param_dtype, p);
    }
    let random = dtype::rounding_bits(config.seed, t as u32, i as u32);
    match config.param_dtype {
        Dtype::Bf16 => dtype::widen_bf16(dtype::stochastic_bf16(p, random)),
        Dtype::F16 => dtype::widen_f16(dtype::stochastic_f16(p, random)),
        Dtype::F32 | Dtype::Q8 => p,
    }
}

/// The state is stored in f32: round as storing does.
fn round(x: f64) -> f64 {
    x as f32 as f64
}

/// sign with sign(0) = 0 (f64::signum gives 1 for +0).
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The optimizer-wide state of the iterations (`docs/semantics.md`, "Before the per-element
/// step"): the loss scale S and its growth tracker, and t, the count of applied steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IterationState {
    /// S (1 without `loss_scale`), in f32 as torch's `GradScaler` keeps it.
    pub loss_scale: f32,
    pub growth_tracker: u32,
    /// t: the steps applied so far (skipped iterations do not count).
    pub step: u64,
}

impl IterationState {
    /// Before the first iteration: S = `init_scale`, no growth, t = 0.
    pub fn new(config: &Config) -> Self {
        IterationState {
            loss_scale: config.loss_scale.map_or(1.0, |l| l.init_scale as f32),
            growth_tracker: 0,
            step: 0,
        }
    }
}

/// What one iteration found before its step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IterationReport {
    /// A NaN or infinity in the unscaled gradient (only looked for when skipping is on).
    pub found_inf: bool,
    /// The global L2 norm of the unscaled gradient, in f64 (only with `max_grad_norm`; else 0).
    pub global_norm: f64,
    /// The factor the gradient was clipped by (1 without clipping).
    pub clip_coef: f32,
    /// Whether the step ran (t moved).
    pub applied: bool,
}

/// One tensor of an iteration: its group, values, (scaled) gradient and state.
#[derive(Debug)]
pub struct IterationTensor<'a> {
    pub group: usize,
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub state: &'a mut TensorState,
}

/// One iteration over every tensor, as `docs/semantics.md` defines it: unscale (`f32(1 / S)`,
/// products rounded to f32 as the device rounds them), found_inf, skip or clip (the clip
/// factor applied to the unscaled gradient in f32, as `clip_grad_norm_` does), the per-element
/// [`step`] of each tensor's group with the applied count t, then the loss scale's update.
/// The optimizer-wide keys are `groups[0]`'s; `lrs[g]` is group g's learning rate.
pub fn iteration(
    groups: &[Config],
    lrs: &[f64],
    tensors: &mut [IterationTensor],
    state: &mut IterationState,
) -> IterationReport {
    let wide = &groups[0];
    // torch's `unscale_`: f32(1 / f64(S)).
    let inv_scale = (1.0 / state.loss_scale as f64) as f32;
    let unscaled: Vec<Vec<f32>> = tensors
        .iter()
        .map(|t| {
            if wide.loss_scale.is_some() {
                t.grad.iter().map(|&g| g * inv_scale).collect()
            } else {
                t.grad.to_vec()
            }
        })
        .collect();
    let found_inf = wide.skips() && unscaled.iter().flatten().any(|g| !g.is_finite());
    let mut report = IterationReport {
        found_inf,
        global_norm: 0.0,
        clip_coef: 1.0,
        applied: !found_inf,
    };
    if let Some(c) = wide.max_grad_norm {
        let sum: f64 = unscaled
            .iter()
            .flatten()
            .map(|&g| g as f64 * g as f64)
            .sum();
        report.global_norm = sum.sqrt();
        // torch's clamp keeps a NaN (a non-finite gradient without skipping): so does this.
        let coef = c / (report.global_norm + 1e-6);
        report.clip_coef = if coef.is_nan() {
            f32::NAN
        } else {
            coef.min(1.0) as f32
        };
    }
    if !found_inf {
        state.step += 1;
        for (t, g) in tensors.iter_mut().zip(unscaled) {
            let g: Vec<f32> = match wide.max_grad_norm {
                Some(_) => g.iter().map(|&x| x * report.clip_coef).collect(),
                None => g,
            };
            let config = &groups[t.group];
            step(config, state.step, lrs[t.group], t.param, &g, t.state);
        }
    }
    // torch's `_amp_update_scale_`: S is an f32, moved by `f32(f64(S) * factor)`.
    let scale_by = |s: f32, factor: f64| (s as f64 * factor) as f32;
    if let Some(ls) = wide.loss_scale.filter(|l| l.dynamic) {
        if found_inf {
            state.loss_scale = scale_by(state.loss_scale, ls.backoff_factor);
            state.growth_tracker = 0;
        } else if state.growth_tracker as u64 + 1 >= ls.growth_interval {
            let grown = scale_by(state.loss_scale, ls.growth_factor);
            if grown.is_finite() {
                state.loss_scale = grown;
            }
            state.growth_tracker = 0;
        } else {
            state.growth_tracker += 1;
        }
    }
    report
}
