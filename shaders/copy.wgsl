// A plain copy, `dst = src`, four f32 at a time: the memory-bandwidth ceiling that the
// benchmark (benches/step/ceilings.rs) holds the optimizer step against. It moves the bytes and does
// nothing else, so no kernel that reads and writes as many bytes can be faster.
//
// Each invocation copies VEC4_PER_INVOCATION vec4s, WORKGROUP_SIZE apart, so that neighbouring
// invocations always touch neighbouring addresses. The benchmark tries several shapes.

override WORKGROUP_SIZE: u32 = 256u;
override VEC4_PER_INVOCATION: u32 = 1u;

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn copy(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // 2-D grid: more than 65,535 workgroups spill into y.
    let group = workgroup.y * workgroups.x + workgroup.x;
    let first = group * WORKGROUP_SIZE * VEC4_PER_INVOCATION + lane;
    let count = arrayLength(&dst);
    for (var k = 0u; k < VEC4_PER_INVOCATION; k++) {
        let i = first + k * WORKGROUP_SIZE;
        if i < count {
            dst[i] = src[i];
        }
    }
}
