// The engine's kernels for `lab.rs`: the gradient of an affine-gradient problem, and the
// projection onto a box. One invocation per scalar.

@group(0) @binding(0) var<storage, read> param: array<f32>;
@group(0) @binding(1) var<storage, read> curvature: array<f32>;
@group(0) @binding(2) var<storage, read> offset: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> param_rw: array<f32>;

override lower: f32;
override upper: f32;

// grad = curvature * param + offset: the gradient of 0.5 * c * x^2 + b * x.
@compute @workgroup_size(64)
fn affine_gradient(@builtin(global_invocation_id) id: vec3u) {
    let i = id.x;
    if i < arrayLength(&grad) {
        grad[i] = curvature[i] * param[i] + offset[i];
    }
}

// param = clamp(param, lower, upper): the projection onto the feasible box.
@compute @workgroup_size(64)
fn project(@builtin(global_invocation_id) id: vec3u) {
    let i = id.x;
    if i < arrayLength(&param_rw) {
        param_rw[i] = clamp(param_rw[i], lower, upper);
    }
}
