// The optimizer step's memory traffic with none of its arithmetic: the second ceiling of the
// benchmark (benches/step/ceilings.rs). It makes exactly the loads and stores of the fused step
// in shaders/adam_family.wgsl over the step's own buffers (read p, g, m, v and write p, m, v;
// with AMSGRAD also read and write vmax; with MASTER read the f32 master copy of the
// parameters in place of p, and write both), four elements at a time, each buffer in its storage dtype, so no step kernel
// that moves these bytes this way can be faster. On drivers where a load costs more than a
// store, this kernel, not a copy of as many bytes, is the step's roofline.
//
// The bindings and `load_<name>(i) -> vec4<f32>` / `store_<name>(i, v)` come from a short
// prefix that the benchmark generates for the step's dtypes: an f32 buffer is an
// array<vec4<f32>>; a 16-bit one an array<vec2<u32>>, two values to a word, low half first,
// widened on load and rounded to nearest on store by shaders/storage.wgsl's functions (placed
// between the prefix and this file). Element i of every array is the same four elements.
//
// The arithmetic is trivial but cannot be dropped: each stored value depends on the loads.
// SCALE is a power of two, so `x + SCALE * g` is rounded once to f32 (with or without a fused
// multiply-add) and then once to the buffer's dtype, and the benchmark checks the result bit for
// bit against the CPU. The values drift by at most SCALE per run, far too little to reach an
// infinity or a subnormal.
//
// Each invocation handles VEC4_PER_INVOCATION groups of four, WORKGROUP_SIZE apart (as
// copy.wgsl does); the benchmark runs it in the step's own shape.

override WORKGROUP_SIZE: u32 = 256u;
override VEC4_PER_INVOCATION: u32 = 1u;
override AMSGRAD: bool = false;
override MASTER: bool = false;
override SCALE: f32 = 0.0009765625;  // 2^-10

// Bound only with AMSGRAD or MASTER (a 16-byte placeholder otherwise, never touched):
// max_exp_avg_sq (binding 4), master_param (binding 5).

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
            // The step's order: p (its master copy, with one) and g loaded, m and v updated
            // and stored, the master copy and p stored last.
            var p: vec4<f32>;
            if MASTER {
                p = load_master_param(i);
            } else {
                p = load_param(i);
            }
            let d = SCALE * load_grad(i);
            store_exp_avg(i, load_exp_avg(i) + d);
            let v = load_exp_avg_sq(i) + abs(d);
            store_exp_avg_sq(i, v);
            if AMSGRAD {
                store_max_exp_avg_sq(i, max(load_max_exp_avg_sq(i), v));
            }
            if MASTER {
                store_master_param(i, p + d);
            }
            store_param(i, p + d);
        }
    }
}
