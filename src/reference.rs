//! The CPU reference: `semantics.md` written out once, for clarity rather than speed.
//!
//! Arithmetic is f64 on f32 inputs; the state is rounded to f32 as soon as it is computed,
//! because that is what every stored copy of it (GPU buffers, checkpoints, PyTorch) holds.
//! The GPU path is tested against this function.
//!
//! Owns: the update formula on the CPU (the WGSL family is the other place it lives). May not
//! touch the GPU or depend on how the kernel is dispatched.

use crate::config::{Algorithm, Config, EpsMode};
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
}

impl TensorState {
    /// The state before the first step: `m = 0`, `v = initial_accumulator`, `vmax = 0`.
    pub fn new(config: &Config, len: usize) -> Self {
        TensorState {
            exp_avg: vec![0.0; len],
            exp_avg_sq: vec![config.initial_accumulator as f32; len],
            max_exp_avg_sq: config.amsgrad.then(|| vec![0.0; len]),
        }
    }
}

/// One step `t` (1-based) with learning rate `lr` over `param`, as `semantics.md` defines it.
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
    for i in 0..n {
        let mut p = param[i] as f64;
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
        // 5: exp_avg.
        let m = round(b1 * state.exp_avg[i] as f64 + (1.0 - b1) * g);
        state.exp_avg[i] = m as f32;
        // 6: exp_avg_sq.
        let v_prev = state.exp_avg_sq[i] as f64;
        let v = round(match config.algorithm {
            Algorithm::Adam | Algorithm::AdamW => b2 * v_prev + (1.0 - b2) * g * g,
            Algorithm::Yogi => v_prev - (1.0 - b2) * sign(v_prev - g * g) * g * g,
        });
        state.exp_avg_sq[i] = v as f32;
        // 7: amsgrad's max_exp_avg_sq replaces v below.
        let v = match state.max_exp_avg_sq.as_mut() {
            Some(vmax) if config.amsgrad => {
                vmax[i] = vmax[i].max(v as f32);
                vmax[i] as f64
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
        param[i] = (p - update) as f32;
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
