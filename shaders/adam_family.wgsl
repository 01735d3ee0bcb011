// The fused Adam / AdamW / Yogi step (docs/semantics.md): one pass reads param, grad
// and the state once and writes param and the state once.
//
// A dispatch walks a range of `Elem`s that may hold many parameter tensors (segments), each in
// a parameter group with its own per-step numbers. `Elem`, `Index`, `Mask`, `LANES` and `LANE`
// come from a generated prelude: four lanes for ranges aligned to 4 elements, two (16-bit
// storage only: one word of two values), or one. Every operation below is component-wise, so
// one source serves all. Each per-element buffer is read and written through the prelude's
// `load_<name>` / `store_<name>`, which widen from and round to its storage dtype (arithmetic
// is f32 whatever the dtype; shaders/storage.wgsl has the conversions). With q8 state the step
// is `step_blocks` instead: a workgroup per 256-element block, so that the block's absmax can
// be reduced before its codes are stored (shaders/q8.wgsl). Variants are override constants
// and prelude constants: the driver folds the branches away.

override ALGORITHM: u32 = 0u;          // ADAM (coupled L2), ADAMW (decoupled) or YOGI
override AMSGRAD: bool = false;
override MAXIMIZE: bool = false;
override CLIP: bool = false;          // some group clips (each checks its own `clips`)
override WEIGHT_DECAY: bool = false;  // some group has weight_decay != 0
override WORKGROUP_SIZE: u32 = 256u;
override SEGMENTED: bool = false;     // the dispatch holds several tensors (a flat buffer)
// Before the per-element step (docs/semantics.md), read from `device`, which the `grad_norm`
// and `finish` passes fill in each iteration before the step:
override SCALE: bool = false;         // gradients arrive multiplied by the loss scale
override SKIP: bool = false;          // an iteration with a non-finite gradient is skipped;
                                      // t is then the device's, bias factors from `table`
override NORM_CLIP: bool = false;     // the global norm is clipped to MAX_GRAD_NORM
// `finish` only: the optimizer-wide numbers, fixed when the optimizer is built.
override PARTIALS: u32 = 0u;          // per-workgroup partial sums `grad_norm` writes
override MAX_GRAD_NORM: f32 = 0.0;
override DYNAMIC: bool = false;
// The factors as torch applies them, `f32(f64(S) * factor)`: each factor is split by the host
// into a mantissa in [1, 2) as two f32 (hi + lo: 48 bits) and an exponent.
override GROWTH_HI: f32 = 1.0;
override GROWTH_LO: f32 = 0.0;
override GROWTH_EXP: i32 = 1;
override BACKOFF_HI: f32 = 1.0;
override BACKOFF_LO: f32 = 0.0;
override BACKOFF_EXP: i32 = -1;
override GROWTH_INTERVAL: u32 = 1u;

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
    // SKIP only: this group's bias factors (sqrt(bc2)/bc1, sqrt(bc2), bc2) for t = 1, 2, ...,
    // BIAS_ROW u32 each in `table` from `bias_base`; past `bias_len` they are 1. step_size,
    // eps and eps_root are then unfolded, and `eps_scaled` says whether the eps get factors.
    bias_base: u32,
    bias_len: u32,
    eps_scaled: u32,
    step: u32,            // t as the host counts it (without SKIP)
}

// Mirrors src/protocol.rs DeviceScalars: the iteration's numbers, kept on the device.
struct DeviceScalars {
    loss_scale: f32,       // S for the next iteration's unscale (the engine scales its loss by it)
    inv_scale: f32,        // f32(1 / loss_scale)
    step_inv_scale: f32,   // this iteration's f32(1 / S), for the step
    clip_coef: f32,        // this iteration's clip factor (1 when not clipping)
    global_norm: f32,      // this iteration's global norm of the unscaled gradient
    step: u32,             // t: applied steps, this iteration's included
    found_inf: u32,        // this iteration's gradient held a NaN or an infinity
    growth_tracker: u32,
}

// What the step reads of the iteration: the scalars and each group's bias factors
// (sqrt(bc2)/bc1, sqrt(bc2), bc2, 1) at the device's t. `finish` writes them into `device`,
// and the host copies them into the `iteration` uniform between the passes: a uniform is read
// once per workgroup where a storage buffer may be read once per invocation (llvmpipe).
struct Iteration {
    scalars: DeviceScalars,
    factors: array<vec4<f32>, MAX_GROUPS>,
}

struct DeviceState {
    scalars: DeviceScalars,
    factors: array<vec4<f32>, MAX_GROUPS>,
    // One per workgroup of `grad_norm`: (sum of squares, 1 if a non-finite value was seen).
    partials: array<vec2<f32>>,
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
    partials_base: u32,   // grad_norm: this dispatch's first entry in `device.partials`
    tensor_element: u32,  // unsegmented: the index within its tensor of element 0 (wrapping)
    block_base: u32,      // blockwise: the q8 binding's block of the dispatch's first block
    _pad3: u32,
}

// Mirrors src/protocol.rs q8_maps_bytes: bitsandbytes' dynamic maps (signed for m, unsigned
// for v and vmax) and the thresholds between their neighbouring entries (src/dtype/q8.rs).
struct Q8Maps {
    signed_values: array<vec4<f32>, 64>,
    unsigned_values: array<vec4<f32>, 64>,
    signed_thresholds: array<vec4<f32>, 64>,
    unsigned_thresholds: array<vec4<f32>, 64>,
}

// Where an invocation's Elem lives in each per-element buffer: what the prelude's
// `load_<name>(at)` and `store_<name>(at, ...)` read. Element-wise: the Elem's index in the
// param, grad and state bindings. Blockwise: the element index of its first lane in each, its
// block in the q8 bindings, its invocation in the block, the lanes inside the block, and
// whether the workgroup has a block at all.
struct At {
    param: u32,
    grad: u32,
    state: u32,
    block: u32,
    lane: u32,
    valid: Mask,
    live: bool,
}

// The bindings (`groups`, `chunk`, `param`, `grad`, `exp_avg`, `exp_avg_sq`,
// `max_exp_avg_sq`, the segment `table` and the workgroup `hints`) are declared by the
// prelude, from the table in src/protocol.rs. In a segmented dispatch the table holds the
// segments as rows of SEGMENT_ROW u32 (start, end, group, index within the tensor of start)
// in elements, sorted and disjoint, and `hints` one u32 per workgroup:
// WHOLE_BLOCK | segment << GROUP_BITS | group when all its elements lie inside one segment,
// else the first segment that ends past its first element.

// Where an invocation's Elem lies: its group, the end of its tensor (lanes at or past it
// are not the tensor's), with STOCHASTIC the index within the tensor of its first lane, or
// `valid` false when it lies outside every tensor (or past the dispatch). An unsegmented
// dispatch is one tensor of one group. In a segmented one the host marks workgroups that lie
// inside one tensor (no search, no lane mask); elsewhere the search starts at the hint's
// segment and skips gaps between tensors.
struct Place {
    valid: bool,
    group: u32,
    end: u32,
    index: u32,
}

fn locate(block: u32, i: u32, e: u32) -> Place {
    var place = Place(i < chunk.count, chunk.group, 0xffffffffu, chunk.tensor_element + e);
    if SEGMENTED && place.valid {
        let hint = hints[block / 4u][block % 4u];
        var s: u32;
        if (hint & WHOLE_BLOCK) != 0u {
            place.group = hint & ((1u << GROUP_BITS) - 1u);
            s = (hint & ~WHOLE_BLOCK) >> GROUP_BITS;
        } else {
            s = hint;
            while s + 1u < chunk.segment_count && table[chunk.segments + SEGMENT_ROW * s + 1u] <= e {
                s += 1u;
            }
            place.end = table[chunk.segments + SEGMENT_ROW * s + 1u];
            place.valid = e >= table[chunk.segments + SEGMENT_ROW * s] && e < place.end;
            place.group = table[chunk.segments + SEGMENT_ROW * s + 2u];
        }
        if STOCHASTIC {
            let row = chunk.segments + SEGMENT_ROW * s;
            place.index = e - table[row] + table[row + 3u];
        }
    }
    return place;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn step(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // A skipped iteration changes nothing (every invocation reads the same flag).
    if SKIP && iteration.scalars.found_inf != 0u {
        return;
    }
    // 2-D grid: more than 65,535 workgroups spill into y.
    let block = workgroup.y * workgroups.x + workgroup.x;
    let i = block * WORKGROUP_SIZE + lane;
    let e = chunk.first_element + i * LANES;
    let place = locate(block, i, e);
    if !place.valid {
        return;
    }
    let u = groups[place.group];
    let at = At(chunk.param_base + i, chunk.grad_base + i, chunk.state_base + i, 0u, 0u,
                Mask(true), true);
    let t = applied_step(u);
    let f = update(u, place.group, t, at);
    // The state is stored rounded to its dtype (state padding lanes are the optimizer's own:
    // no mask); lanes past the tensor's end (vec4 and vec2 only) keep their stored values.
    let keep_none = Mask(false);
    var keep = keep_none;
    if SEGMENTED {
        keep = Index(e) + LANE >= Index(place.end);
    }
    store_all(at, f, t, Index(place.index) + LANE, keep_none, keep, vec3<f32>(0.0));
}

// t as the kernel sees it: the host's, or with SKIP the device's count of applied steps.
fn applied_step(u: StepUniforms) -> u32 {
    if SKIP {
        return iteration.scalars.step;
    }
    return u.step;
}

// One step's results for an Elem: the parameter and the fresh f32 moments (vmax = v without
// AMSGRAD).
struct Fresh {
    p: Elem,
    m: Elem,
    v: Elem,
    vmax: Elem,
}

// docs/semantics.md's per-element step for the Elem at `at`, in group `group` (uniforms `u`)
// at applied step t: loads the parameter, the gradient and the state and computes, storing
// nothing.
fn update(u: StepUniforms, group: u32, t: u32, at: At) -> Fresh {
    // With master weights the f32 copy is the parameter; it starts from the engine's 16-bit
    // values at the first applied step.
    var p: Elem;
    if MASTER && t != 1u {
        p = load_master_param(at);
    } else {
        p = load_param(at);
    }

    // Unscale and clip the global norm, rounding each product to f32 as torch's `unscale_`
    // and `clip_grad_norm_` do, before the per-element step.
    var g = load_grad(at);
    if SCALE {
        g = g * iteration.scalars.step_inv_scale;
    }
    if NORM_CLIP {
        g = g * iteration.scalars.clip_coef;
    }
    g = g * u.rescale_grad;
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

    // The stored state is widened; the step below uses the fresh f32 values.
    let m = u.beta1 * load_exp_avg(at) + u.one_minus_beta1 * g;
    let g2 = g * g;
    var v = load_exp_avg_sq(at);
    if ALGORITHM == YOGI {
        v = v - u.one_minus_beta2 * sign(v - g2) * g2;
    } else {
        v = u.beta2 * v + u.one_minus_beta2 * g2;
    }
    var vmax = v;
    if AMSGRAD {
        vmax = max(load_max_exp_avg_sq(at), v);
    }

    // Bias correction and eps_mode are folded into step_size, eps and eps_root on the host;
    // with SKIP the host cannot know t, and the factors come from the group's table.
    var step_size = u.step_size;
    var eps = u.eps;
    var eps_root = u.eps_root;
    if SKIP {
        let factors = iteration.factors[group];
        step_size = step_size * factors.x;
        if u.eps_scaled != 0u {
            eps = eps * factors.y;
            eps_root = eps_root * factors.z;
        }
    }
    p = p - step_size * m / (sqrt(vmax + eps_root) + eps);
    return Fresh(p, m, v, vmax);
}

// Stores a step's results: the state (`state_keep`: lanes to leave alone; `absmax`: each q8
// state's block absmax, m, v, vmax), the master copy, and the parameter (`keep`), rounded
// with the random bits of `index` (each lane's index within its tensor) when stochastic.
fn store_all(at: At, f: Fresh, t: u32, index: Index, state_keep: Mask, keep: Mask, absmax: vec3<f32>) {
    let no_random = Index(0u);
    store_exp_avg(at, f.m, no_random, state_keep, absmax.x);
    store_exp_avg_sq(at, f.v, no_random, state_keep, absmax.y);
    if AMSGRAD {
        store_max_exp_avg_sq(at, f.vmax, no_random, state_keep, absmax.z);
    }
    if MASTER {
        store_master_param(at, f.p, no_random, state_keep, 0.0);
    }
    var random = no_random;
    if STOCHASTIC {
        random = random_bits(t, index);
    }
    store_param(at, f.p, random, keep, 0.0);
}

// Blockwise (q8 state): the block's largest magnitudes of m, v and vmax, as the bits of |x|
// (a NaN's are above infinity's, so a NaN wins, as in src/dtype/q8.rs).
var<workgroup> block_absmax: array<atomic<u32>, 3>;

// The step for q8 state: one workgroup per block of 256 elements of one tensor (the block
// rows in `table`), four consecutive elements per invocation. The parameter is stored at
// once; each q8 state waits for its block's absmax over the fresh values. Every invocation
// reaches the barriers: a workgroup past the dispatch's blocks, or lanes past its block's
// end, work on nothing.
@compute @workgroup_size(WORKGROUP_SIZE)
fn step_blocks(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    if SKIP && iteration.scalars.found_inf != 0u {
        return;
    }
    let block = workgroup.y * workgroups.x + workgroup.x;
    let at = block_lanes(block, lane);
    let row = chunk.segments + SEGMENT_ROW * min(block, chunk.count - 1u);
    let group = table[row + 2u];
    let u = groups[group];
    let t = applied_step(u);
    let f = update(u, group, t, at);

    if lane == 0u {
        for (var k = 0u; k < 3u; k += 1u) {
            atomicStore(&block_absmax[k], 0u);
        }
    }
    workgroupBarrier();
    if Q8_EXP_AVG {
        atomicMax(&block_absmax[0], magnitude_bits(f.m, at.valid));
    }
    if Q8_EXP_AVG_SQ {
        atomicMax(&block_absmax[1], magnitude_bits(f.v, at.valid));
        if AMSGRAD {
            atomicMax(&block_absmax[2], magnitude_bits(f.vmax, at.valid));
        }
    }
    workgroupBarrier();
    let absmax = vec3<f32>(
        bitcast<f32>(atomicLoad(&block_absmax[0])),
        bitcast<f32>(atomicLoad(&block_absmax[1])),
        bitcast<f32>(atomicLoad(&block_absmax[2])),
    );
    let index = Index(table[row + 3u] + LANES * lane) + LANE;
    store_all(at, f, t, index, !at.valid, !at.valid, absmax);
}

// An invocation's place in block `block` of a blockwise dispatch (see `At`).
fn block_lanes(block: u32, lane: u32) -> At {
    let live = block < chunk.count;
    let row = chunk.segments + SEGMENT_ROW * min(block, chunk.count - 1u);
    let e = table[row] + LANES * lane;
    let valid = Index(e) + LANE < Index(select(0u, table[row + 1u], live));
    return At(chunk.param_base + e, chunk.grad_base + e, e, chunk.block_base + block, lane,
              valid, live);
}

// The largest of `x`'s valid lanes' |x| bits.
fn magnitude_bits(x: Elem, valid: Mask) -> u32 {
    return lane_max(select(Index(0u), bitcast<Index>(x) & Index(0x7fffffffu), valid));
}

// Workgroup scratch of the reductions: (sum, non-finite flag) per invocation.
var<workgroup> scratch: array<vec2<f32>, MAX_WORKGROUP_SIZE>;

// Sums `scratch[0..WORKGROUP_SIZE)` into `scratch[0]` as a tree (any workgroup size).
fn reduce_scratch(lane: u32) {
    var half = 1u;
    while half < WORKGROUP_SIZE {
        half = half * 2u;
    }
    half = half / 2u;
    while half > 0u {
        workgroupBarrier();
        if lane < half && lane + half < WORKGROUP_SIZE {
            let a = scratch[lane];
            let b = scratch[lane + half];
            scratch[lane] = vec2<f32>(a.x + b.x, max(a.y, b.y));
        }
        half = half / 2u;
    }
    workgroupBarrier();
}

// 1 where x is NaN or infinite (all exponent bits set), by its bits: no fast-math can fold it.
fn non_finite(x: Elem) -> Elem {
    let exponent = Index(0x7f800000u);
    return select(Elem(0.0), Elem(1.0), (bitcast<Index>(x) & exponent) == exponent);
}

// The unscaled gradient of an invocation's Elem in step block `block`: 0 in lanes outside
// every tensor (whatever the buffer holds there, a NaN included).
fn unscaled_grad(block: u32, lane: u32) -> Elem {
    var at: At;
    if BLOCKS {
        at = block_lanes(block, lane);
    } else {
        let i = block * WORKGROUP_SIZE + lane;
        let e = chunk.first_element + i * LANES;
        let place = locate(block, i, e);
        if !place.valid {
            return Elem(0.0);
        }
        // Lanes past the tensor's end (vec4 and vec2 only) do not count.
        at = At(0u, chunk.grad_base + i, 0u, 0u, 0u, Index(e) + LANE < Index(place.end), true);
    }
    var g = load_grad(at);
    if SCALE {
        g = g * iteration.scalars.inv_scale;
    }
    return select(Elem(0.0), g, at.valid);
}

// Pass 1 of an iteration: sums of the squared unscaled gradient over the tensors' elements,
// and whether a non-finite one was seen, into `device.partials`. A workgroup covers NORM_BLOCKS
// of the step's workgroups (their hints, their elements), so that the reduction's barriers,
// costly on CPU drivers, are paid once per NORM_BLOCKS blocks.
@compute @workgroup_size(WORKGROUP_SIZE)
fn grad_norm(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let group_index = workgroup.y * workgroups.x + workgroup.x;
    var sum = 0.0;
    for (var k = 0u; k < NORM_BLOCKS; k += 1u) {
        let g = unscaled_grad(group_index * NORM_BLOCKS + k, lane);
        sum += lane_sum(g * g);
    }
    scratch[lane] = vec2<f32>(sum, 0.0);
    reduce_scratch(lane);
    var total = workgroupUniformLoad(&scratch[0]);
    // A NaN or an infinity makes the sum non-finite, and so can finite squares past f32's
    // range: only then (an iteration to skip, or a huge gradient) is each value looked at.
    if SKIP && non_finite_scalar(total.x) != 0u {
        var flag = 0.0;
        for (var k = 0u; k < NORM_BLOCKS; k += 1u) {
            let g = unscaled_grad(group_index * NORM_BLOCKS + k, lane);
            flag = max(flag, lane_sum(non_finite(g)));
        }
        scratch[lane] = vec2<f32>(0.0, min(flag, 1.0));
        reduce_scratch(lane);
        total.y = workgroupUniformLoad(&scratch[0]).y;
    }
    var blocks = (chunk.count + WORKGROUP_SIZE - 1u) / WORKGROUP_SIZE;
    if BLOCKS {
        blocks = chunk.count;
    }
    let groups = (blocks + NORM_BLOCKS - 1u) / NORM_BLOCKS;
    if lane == 0u && group_index < groups {
        device.partials[chunk.partials_base + group_index] = total;
    }
}

// Pass 2 (one workgroup): the global norm and found_inf from the partials, the clip factor,
// t, and the loss scale's move (torch's `_amp_update_scale_`), into `device.scalars`.
@compute @workgroup_size(WORKGROUP_SIZE)
fn finish(@builtin(local_invocation_index) lane: u32) {
    // Each invocation sums every WORKGROUP_SIZE-th partial with Kahan's compensation, then a
    // tree: a 100M-element norm stays within 1e-6 of the exact one.
    var sum = 0.0;
    var carry = 0.0;
    var flag = 0.0;
    for (var k = lane; k < PARTIALS; k += WORKGROUP_SIZE) {
        let p = device.partials[k];
        let y = p.x - carry;
        let t = sum + y;
        carry = (t - sum) - y;
        sum = t;
        flag = max(flag, p.y);
    }
    scratch[lane] = vec2<f32>(sum, flag);
    reduce_scratch(lane);
    if lane != 0u {
        return;
    }
    var s = device.scalars;
    let total = scratch[0];
    let found_inf = SKIP && total.y != 0.0;
    s.found_inf = select(0u, 1u, found_inf);
    s.global_norm = sqrt(total.x);
    s.clip_coef = 1.0;
    if NORM_CLIP {
        // As torch's clamp, a NaN factor (a non-finite gradient, without skipping) stays NaN.
        let coef = MAX_GRAD_NORM / (s.global_norm + 1e-6);
        s.clip_coef = select(min(1.0, coef), coef, non_finite_scalar(coef) != 0u);
    }
    s.step_inv_scale = s.inv_scale;
    if !found_inf {
        s.step += 1u;
    }
    if SCALE && DYNAMIC {
        if found_inf {
            s.loss_scale = scale_by(s.loss_scale, BACKOFF_HI, BACKOFF_LO, BACKOFF_EXP);
            s.growth_tracker = 0u;
        } else if s.growth_tracker + 1u >= GROWTH_INTERVAL {
            let grown = scale_by(s.loss_scale, GROWTH_HI, GROWTH_LO, GROWTH_EXP);
            if non_finite_scalar(grown) == 0u {
                s.loss_scale = grown;
            }
            s.growth_tracker = 0u;
        } else {
            s.growth_tracker += 1u;
        }
        s.inv_scale = reciprocal(s.loss_scale);
    }
    device.scalars = s;
    // Each group's bias factors at the new t, from its table (1 past it, or without one).
    for (var g = 0u; g < MAX_GROUPS; g += 1u) {
        let u = groups[g];
        var factors = vec4<f32>(1.0);
        if s.step >= 1u && s.step <= u.bias_len {
            let row = u.bias_base + BIAS_ROW * (s.step - 1u);
            factors = vec4<f32>(
                bitcast<f32>(table[row]),
                bitcast<f32>(table[row + 1u]),
                bitcast<f32>(table[row + 2u]),
                1.0,
            );
        }
        device.factors[g] = factors;
    }
}

// The rounding error of the f32 product p = a * b, exactly (Dekker's two-product: each factor
// split into two 12-bit halves whose products are exact; WGSL's * and + round correctly).
fn product_error(a: f32, b: f32, p: f32) -> f32 {
    let x = split(a);
    let y = split(b);
    return ((x.x * y.x - p) + x.x * y.y + x.y * y.x) + x.y * y.y;
}

fn split(a: f32) -> vec2<f32> {
    let t = 4097.0 * a;
    let high = t - (t - a);
    return vec2<f32>(high, a - high);
}

// f32(f64(s) * factor) for a factor given as (hi + lo) * 2^exp, hi + lo in [1, 2): the
// mantissas' product to 48 bits, rounded once, then the exponents (ldexp is exact, and gives
// infinity past f32's range as torch's f32 conversion does).
fn scale_by(s: f32, hi: f32, lo: f32, exp: i32) -> f32 {
    let f = frexp(s);
    let m = f.fract * 2.0;
    let p = m * hi;
    let r = p + (product_error(m, hi, p) + m * lo);
    return ldexp(r, f.exp - 1 + exp);
}

// f32(1 / f64(s)), as torch's `unscale_`: a quotient refined with its exact residual (WGSL's
// division alone may be 2.5 ulp off).
fn reciprocal(s: f32) -> f32 {
    let f = frexp(s);
    let m = f.fract * 2.0;
    let q = 1.0 / m;
    let p = m * q;
    let residual = (1.0 - p) - product_error(m, q, p);
    return ldexp(q + q * residual, 1 - f.exp);
}

fn non_finite_scalar(x: f32) -> u32 {
    return select(0u, 1u, (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u);
}
