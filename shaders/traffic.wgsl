// The optimizer step's memory traffic with none of its arithmetic: the second ceiling of the
// benchmark (benches/step/ceilings.rs). It makes exactly the loads and stores of the fused step
// in shaders/adam_family.wgsl over the step's own buffers (read p, g, m, v and write p, m, v;
// with AMSGRAD also read and write vmax), four f32 at a time, so no step kernel that moves
// these bytes this way can be faster. On drivers where a load costs more than a store, this
// kernel, not a copy of as many bytes, is the step's roofline.
//
// The arithmetic is trivial but cannot be dropped: each stored value depends on the loads.
// SCALE is a power of two, so `x + SCALE * g` is rounded once (with or without a fused
// multiply-add), and the benchmark checks the result bit for bit against the CPU. The values
// drift by at most SCALE per run, far too little to reach an infinity or a subnormal.
//
// Each invocation handles VEC4_PER_INVOCATION vec4s, WORKGROUP_SIZE apart (as copy.wgsl does);
// the benchmark tries several shapes and keeps the fastest.

override WORKGROUP_SIZE: u32 = 256u;
override VEC4_PER_INVOCATION: u32 = 1u;
override AMSGRAD: bool = false;
override SCALE: f32 = 0.0009765625;  // 2^-10

@group(0) @binding(0) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> exp_avg: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> exp_avg_sq: array<vec4<f32>>;
// Bound only with AMSGRAD (a 16-byte placeholder otherwise, never touched).
@group(0) @binding(4) var<storage, read_write> max_exp_avg_sq: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn traffic(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // 2-D grid: more than 65,535 workgroups spill into y.
    let group = workgroup.y * workgroups.x + workgroup.x;
    let first = group * WORKGROUP_SIZE * VEC4_PER_INVOCATION + lane;
    let count = arrayLength(&param);
    for (var k = 0u; k < VEC4_PER_INVOCATION; k++) {
        let i = first + k * WORKGROUP_SIZE;
        if i < count {
            // The step's order: p and g loaded, m and v updated and stored, p stored last.
            let p = param[i];
            let d = SCALE * grad[i];
            exp_avg[i] = exp_avg[i] + d;
            let v = exp_avg_sq[i] + abs(d);
            exp_avg_sq[i] = v;
            if AMSGRAD {
                max_exp_avg_sq[i] = max(max_exp_avg_sq[i], v);
            }
            param[i] = p + d;
        }
    }
}
