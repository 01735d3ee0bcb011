//! The per-step numbers the kernel reads, computed on the host in f64 once per step.

use bytemuck::{Pod, Zeroable};

use crate::config::{Algorithm, Config, EpsMode};

/// Mirrors `StepUniforms` in `shaders/adam_family.wgsl` field for field (a test checks the
/// offsets with naga). Only 4-byte scalars; padded to a multiple of 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct StepUniforms {
    /// `a_t`: the learning rate with the bias correction folded in.
    pub step_size: f32,
    /// eps as it enters `sqrt(..) + eps` after folding (`eps * sqrt(bc2)` in torch mode).
    pub eps: f32,
    /// eps_root as it enters `sqrt(v + eps_root)` after folding (`eps_root * bc2` in torch mode).
    pub eps_root: f32,
    pub beta1: f32,
    /// `1 - b1`, computed in f64: in f32 inside the shader it would cost precision.
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// `1 - b2`, computed in f64 (in f32, `1 - 0.999` is off by ~1e-5 relative).
    pub one_minus_beta2: f32,
    /// Coupled L2 coefficient (Adam, Yogi); 0 turns the decay off for this group.
    pub weight_decay: f32,
    /// Decoupled decay `lr_t * weight_decay` (AdamW), applied as `p - lr_weight_decay * p`:
    /// as its own f32 it keeps full precision, where `f32(1 - lr_t * wd)` would round it to a
    /// multiple of 2^-24 (19% too strong at 1e-7, nothing under 3e-8). 0: no decay.
    pub lr_weight_decay: f32,
    pub rescale_grad: f32,
    /// Clamp bound `c`, read only when `clips` is 1.
    pub clip_gradient: f32,
    /// 1 when this group clips: in a kernel where another group clips, this one must not.
    pub clips: u32,
}

impl StepUniforms {
    /// The numbers for step `t` (1-based) at learning rate `lr`, as in the spec's "Folding the
    /// bias correction into per-step scalars".
    pub fn new(config: &Config, t: u64, lr: f64) -> Self {
        let [b1, b2] = config.betas;
        let (step_size, eps, eps_root) = if config.bias_correction {
            let bc1 = 1.0 - b1.powf(t as f64);
            let bc2 = 1.0 - b2.powf(t as f64);
            let step_size = lr * bc2.sqrt() / bc1;
            match config.eps_mode {
                EpsMode::Torch => (step_size, config.eps * bc2.sqrt(), config.eps_root * bc2),
                EpsMode::Folded => (step_size, config.eps, config.eps_root),
            }
        } else {
            (lr, config.eps, config.eps_root)
        };
        StepUniforms {
            step_size: step_size as f32,
            eps: eps as f32,
            eps_root: eps_root as f32,
            beta1: b1 as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            weight_decay: config.weight_decay as f32,
            lr_weight_decay: decoupled_decay(config, lr) as f32,
            rescale_grad: config.rescale_grad as f32,
            clip_gradient: config.clip_gradient.unwrap_or(0.0) as f32,
            clips: config.clip_gradient.is_some() as u32,
        }
    }
}

/// AdamW's `lr_t * weight_decay` (0 for Adam and Yogi, whose decay is coupled). The kernel and
/// the CPU reference both take it rounded to f32, as PyTorch's fused kernel does.
pub(crate) fn decoupled_decay(config: &Config, lr: f64) -> f64 {
    match config.algorithm {
        Algorithm::AdamW => lr * config.weight_decay,
        Algorithm::Adam | Algorithm::Yogi => 0.0,
    }
}

/// Parameter groups one optimizer can hold: the shader's `groups` uniform array has this many.
pub const MAX_GROUPS: usize = 16;

/// Mirrors `Chunk` in the shader: which slice of the bound ranges one dispatch updates (in
/// units of the kernel's element type, vec4 or scalar) and where its segment table is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Chunk {
    pub count: u32,
    pub param_base: u32,
    pub grad_base: u32,
    pub state_base: u32,
    /// The f32 element of the first unit, relative to the segments' origin.
    pub first_element: u32,
    /// Index in the table of this dispatch's first segment (4 u32 each).
    pub segments: u32,
    pub segment_count: u32,
    /// The group of an unsegmented dispatch (one tensor).
    pub group: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
    pub _pad3: u32,
}

/// Per-workgroup hints one segmented dispatch can have: the shader's `hints` uniform array
/// (64 KiB, wgpu's default `max_uniform_buffer_binding_size`).
pub const MAX_HINTS: u64 = 16384;
