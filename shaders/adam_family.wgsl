// The fused Adam / AdamW / Yogi step (shared/spec/semantics.md): one pass reads param, grad
// and the state once and writes param and the state once.
//
// `Elem` comes from a one-line generated prelude: `alias Elem = vec4<f32>;` for the body of a
// tensor whose ranges are 16-byte aligned, `alias Elem = f32;` for tails and unaligned views.
// Every operation below is component-wise, so one source serves both.
// Variants are override constants, so the driver folds the branches away.

override ALGORITHM: u32 = 0u;          // 0 adam (coupled L2), 1 adamw (decoupled), 2 yogi
override AMSGRAD: bool = false;
override MAXIMIZE: bool = false;
override CLIP: bool = false;
override WEIGHT_DECAY: bool = false;  // weight_decay != 0
override WORKGROUP_SIZE: u32 = 256u;

const ADAMW: u32 = 1u;
const YOGI: u32 = 2u;

// Mirrors src/uniforms.rs StepUniforms; written once per step.
struct StepUniforms {
    step_size: f32,
    eps: f32,
    eps_root: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    weight_decay: f32,
    decay_factor: f32,
    rescale_grad: f32,
    clip_gradient: f32,
    _pad: f32,
}

// Mirrors src/uniforms.rs Chunk; fixed per dispatch.
struct Chunk {
    count: u32,
    param_base: u32,
    grad_base: u32,
    state_base: u32,
}

@group(0) @binding(0) var<uniform> u: StepUniforms;
@group(0) @binding(1) var<uniform> chunk: Chunk;
@group(0) @binding(2) var<storage, read_write> param: array<Elem>;
@group(0) @binding(3) var<storage, read> grad: array<Elem>;
@group(0) @binding(4) var<storage, read_write> exp_avg: array<Elem>;
@group(0) @binding(5) var<storage, read_write> exp_avg_sq: array<Elem>;
@group(0) @binding(6) var<storage, read_write> max_exp_avg_sq: array<Elem>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn step(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // 2-D grid: more than 65,535 workgroups spill into y.
    let i = (workgroup.y * workgroups.x + workgroup.x) * WORKGROUP_SIZE + lane;
    if i >= chunk.count {
        return;
    }
    let s = chunk.state_base + i;
    var p = param[chunk.param_base + i];

    var g = grad[chunk.grad_base + i] * u.rescale_grad;
    if CLIP {
        g = clamp(g, Elem(-u.clip_gradient), Elem(u.clip_gradient));
    }
    if MAXIMIZE {
        g = -g;
    }
    if WEIGHT_DECAY {
        if ALGORITHM == ADAMW {
            p = p * u.decay_factor;
        } else {
            g = g + u.weight_decay * p;
        }
    }

    let m = u.beta1 * exp_avg[s] + u.one_minus_beta1 * g;
    exp_avg[s] = m;

    let g2 = g * g;
    var v = exp_avg_sq[s];
    if ALGORITHM == YOGI {
        v = v - u.one_minus_beta2 * sign(v - g2) * g2;
    } else {
        v = u.beta2 * v + u.one_minus_beta2 * g2;
    }
    exp_avg_sq[s] = v;

    if AMSGRAD {
        v = max(max_exp_avg_sq[s], v);
        max_exp_avg_sq[s] = v;
    }

    // Bias correction and eps_mode are folded into step_size, eps and eps_root on the host.
    param[chunk.param_base + i] = p - u.step_size * m / (sqrt(v + u.eps_root) + u.eps);
}
