// The fused Adam / AdamW / Yogi step (docs/semantics.md): one pass reads param, grad
// and the state once and writes param and the state once.
//
// A dispatch walks a range of `Elem`s that may hold many parameter tensors (segments), each in
// a parameter group with its own per-step numbers. `Elem`, `Index`, `LANES` and `LANE` come
// from a generated prelude: `vec4<f32>` / `vec4<u32>` / 4 / (0, 1, 2, 3) for 16-byte aligned
// ranges, `f32` / `u32` / 1 / 0 otherwise. Every operation below is component-wise, so one
// source serves both. Variants are override constants: the driver folds the branches away.

override ALGORITHM: u32 = 0u;          // ADAM (coupled L2), ADAMW (decoupled) or YOGI
override AMSGRAD: bool = false;
override MAXIMIZE: bool = false;
override CLIP: bool = false;          // some group clips (each checks its own `clips`)
override WEIGHT_DECAY: bool = false;  // some group has weight_decay != 0
override WORKGROUP_SIZE: u32 = 256u;
override SEGMENTED: bool = false;     // the dispatch holds several tensors (a flat buffer)

// Mirrors src/protocol.rs StepUniforms: one group's numbers for this step.
struct StepUniforms {
    step_size: f32,
    eps: f32,
    eps_root: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    weight_decay: f32,
    lr_weight_decay: f32,
    rescale_grad: f32,
    clip_gradient: f32,
    clips: u32,
}

// Mirrors src/protocol.rs Chunk: what one dispatch covers; fixed when the step is planned.
struct Chunk {
    count: u32,           // Elems in this dispatch
    param_base: u32,      // index of the dispatch's first Elem in the param binding
    grad_base: u32,
    state_base: u32,
    first_element: u32,   // f32 element of the first Elem, relative to the segments' origin
    segments: u32,        // where this dispatch's segments start in `table`
    segment_count: u32,
    group: u32,           // the group of an unsegmented dispatch
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

// The bindings (`groups`, `chunk`, `param`, `grad`, `exp_avg`, `exp_avg_sq`,
// `max_exp_avg_sq`, the segment `table` and the workgroup `hints`) are declared by the
// prelude, from the table in src/protocol.rs. In a segmented dispatch the table holds the
// segments as rows of SEGMENT_ROW u32 (start, end, group, 0) in f32 elements, sorted and
// disjoint, and `hints` one u32 per workgroup: WHOLE_BLOCK | group when all its elements lie
// inside one segment, else the first segment that ends past its first element.

@compute @workgroup_size(WORKGROUP_SIZE)
fn step(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // 2-D grid: more than 65,535 workgroups spill into y.
    let block = workgroup.y * workgroups.x + workgroup.x;
    let i = block * WORKGROUP_SIZE + lane;
    if i >= chunk.count {
        return;
    }

    // An unsegmented dispatch is one tensor of one group. In a segmented one, find the tensor
    // holding this Elem: the host marks workgroups that lie inside one tensor (no search, no
    // lane mask); elsewhere search from the hint's segment and skip gaps between tensors.
    var group = chunk.group;
    var end = 0xffffffffu;
    let e = chunk.first_element + i * LANES;
    if SEGMENTED {
        let hint = hints[block / 4u][block % 4u];
        if (hint & WHOLE_BLOCK) != 0u {
            group = hint & ~WHOLE_BLOCK;
        } else {
            var s = hint;
            while s + 1u < chunk.segment_count && table[chunk.segments + SEGMENT_ROW * s + 1u] <= e {
                s += 1u;
            }
            end = table[chunk.segments + SEGMENT_ROW * s + 1u];
            if e < table[chunk.segments + SEGMENT_ROW * s] || e >= end {
                return;
            }
            group = table[chunk.segments + SEGMENT_ROW * s + 2u];
        }
    }
    let u = groups[group];

    let k = chunk.state_base + i;
    let p_in = param[chunk.param_base + i];
    var p = p_in;

    var g = grad[chunk.grad_base + i] * u.rescale_grad;
    // CLIP and WEIGHT_DECAY say that some group uses the option; each group checks its own
    // value, so that no group's result depends on the options of another.
    if CLIP && u.clips != 0u {
        g = clamp(g, Elem(-u.clip_gradient), Elem(u.clip_gradient));
    }
    if MAXIMIZE {
        g = -g;
    }
    if WEIGHT_DECAY {
        if ALGORITHM == ADAMW {
            if u.lr_weight_decay != 0.0 {
                p = p - u.lr_weight_decay * p;
            }
        } else if u.weight_decay != 0.0 {
            g = g + u.weight_decay * p;
        }
    }

    let m = u.beta1 * exp_avg[k] + u.one_minus_beta1 * g;
    exp_avg[k] = m;

    let g2 = g * g;
    var v = exp_avg_sq[k];
    if ALGORITHM == YOGI {
        v = v - u.one_minus_beta2 * sign(v - g2) * g2;
    } else {
        v = u.beta2 * v + u.one_minus_beta2 * g2;
    }
    exp_avg_sq[k] = v;

    if AMSGRAD {
        v = max(max_exp_avg_sq[k], v);
        max_exp_avg_sq[k] = v;
    }

    // Bias correction and eps_mode are folded into step_size, eps and eps_root on the host.
    p = p - u.step_size * m / (sqrt(v + u.eps_root) + u.eps);
    if SEGMENTED {
        // Lanes past the tensor's end (vec4 only) keep their values.
        p = select(p_in, p, Index(e) + LANE < Index(end));
    }
    param[chunk.param_base + i] = p;
}
