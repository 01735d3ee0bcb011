// A two-layer classifier, INPUTS -> HIDDEN (ReLU) -> CLASSES, with softmax cross-entropy:
// forward, loss and backward for one batch, and the evaluation of a whole set. The constants
// (sizes, and the offsets of the tensors in the arena's flat buffers) come from a prelude that
// mlp.rs writes. Weights are stored as torch's Linear stores them: [out][in].

@group(0) @binding(0) var<storage, read> params: array<f32>;
@group(0) @binding(1) var<storage, read_write> grads: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;               // [BATCH][INPUTS]
@group(0) @binding(3) var<storage, read> y: array<u32>;               // [BATCH]
@group(0) @binding(4) var<storage, read_write> hidden: array<f32>;    // [BATCH][HIDDEN], after ReLU
@group(0) @binding(5) var<storage, read_write> dlogits: array<f32>;   // [BATCH][CLASSES]
@group(0) @binding(6) var<storage, read_write> dhidden: array<f32>;   // [BATCH][HIDDEN]
// [train loss sum, train correct, test loss sum, test correct], summed over an epoch.
@group(0) @binding(7) var<storage, read_write> metrics: array<f32>;
@group(0) @binding(8) var<storage, read> test_x: array<f32>;          // [TEST][INPUTS]
@group(0) @binding(9) var<storage, read> test_y: array<u32>;          // [TEST]

fn w1(j: u32, i: u32) -> f32 { return params[W1 + j * INPUTS + i]; }
fn b1(j: u32) -> f32 { return params[B1 + j]; }
fn w2(o: u32, j: u32) -> f32 { return params[W2 + o * HIDDEN + j]; }
fn b2(o: u32) -> f32 { return params[B2 + o]; }

fn output_logits(h: ptr<function, array<f32, HIDDEN>>) -> array<f32, CLASSES> {
    var z: array<f32, CLASSES>;
    for (var o = 0u; o < CLASSES; o++) {
        var s = b2(o);
        for (var j = 0u; j < HIDDEN; j++) {
            s += (*h)[j] * w2(o, j);
        }
        z[o] = s;
    }
    return z;
}

// Softmax of `z` into `z`; returns (cross-entropy of `label`, 1 if the arg max is `label`).
fn softmax_cross_entropy(z: ptr<function, array<f32, CLASSES>>, label: u32) -> vec2f {
    var top = (*z)[0];
    var arg = 0u;
    for (var o = 1u; o < CLASSES; o++) {
        if (*z)[o] > top { top = (*z)[o]; arg = o; }
    }
    var sum = 0.0;
    for (var o = 0u; o < CLASSES; o++) {
        sum += exp((*z)[o] - top);
    }
    let loss = log(sum) - ((*z)[label] - top);
    for (var o = 0u; o < CLASSES; o++) {
        (*z)[o] = exp((*z)[o] - top) / sum;
    }
    return vec2f(loss, select(0.0, 1.0, arg == label));
}

// hidden = relu(x W1^T + b1): one invocation per (sample, hidden unit).
@compute @workgroup_size(64)
fn forward_hidden(@builtin(global_invocation_id) id: vec3u) {
    let k = id.x;
    if k >= BATCH * HIDDEN { return; }
    let b = k / HIDDEN;
    let j = k % HIDDEN;
    var s = b1(j);
    for (var i = 0u; i < INPUTS; i++) {
        s += x[b * INPUTS + i] * w1(j, i);
    }
    hidden[k] = max(s, 0.0);
}

var<workgroup> batch_loss: array<f32, BATCH>;
var<workgroup> batch_correct: array<f32, BATCH>;

// Logits, softmax and cross-entropy of each sample, and d(mean loss)/d(logits) =
// (softmax - onehot) / BATCH; the batch's loss and correct count are added to the metrics.
// One workgroup, one invocation per sample.
@compute @workgroup_size(BATCH)
fn forward_loss(@builtin(local_invocation_index) b: u32) {
    var h: array<f32, HIDDEN>;
    for (var j = 0u; j < HIDDEN; j++) {
        h[j] = hidden[b * HIDDEN + j];
    }
    var p = output_logits(&h);
    let label = y[b];
    let result = softmax_cross_entropy(&p, label);
    for (var o = 0u; o < CLASSES; o++) {
        dlogits[b * CLASSES + o] = (p[o] - select(0.0, 1.0, o == label)) / f32(BATCH);
    }
    batch_loss[b] = result.x;
    batch_correct[b] = result.y;
    workgroupBarrier();
    if b == 0u {
        var loss = 0.0;
        var correct = 0.0;
        for (var k = 0u; k < BATCH; k++) {
            loss += batch_loss[k];
            correct += batch_correct[k];
        }
        metrics[0] += loss;
        metrics[1] += correct;
    }
}

// dW2 = dlogits^T hidden, db2 = column sums of dlogits: one invocation per (class, unit),
// unit HIDDEN being the bias.
@compute @workgroup_size(64)
fn backward_output(@builtin(global_invocation_id) id: vec3u) {
    let k = id.x;
    if k >= CLASSES * (HIDDEN + 1u) { return; }
    let o = k / (HIDDEN + 1u);
    let j = k % (HIDDEN + 1u);
    var s = 0.0;
    if j == HIDDEN {
        for (var b = 0u; b < BATCH; b++) {
            s += dlogits[b * CLASSES + o];
        }
        grads[B2 + o] = s;
    } else {
        for (var b = 0u; b < BATCH; b++) {
            s += dlogits[b * CLASSES + o] * hidden[b * HIDDEN + j];
        }
        grads[W2 + o * HIDDEN + j] = s;
    }
}

// dhidden = (dlogits W2) * relu'(pre-activation): one invocation per (sample, unit).
@compute @workgroup_size(64)
fn backward_hidden(@builtin(global_invocation_id) id: vec3u) {
    let k = id.x;
    if k >= BATCH * HIDDEN { return; }
    let b = k / HIDDEN;
    let j = k % HIDDEN;
    var s = 0.0;
    if hidden[k] > 0.0 {
        for (var o = 0u; o < CLASSES; o++) {
            s += dlogits[b * CLASSES + o] * w2(o, j);
        }
    }
    dhidden[k] = s;
}

// dW1 = dhidden^T x, db1 = column sums of dhidden: one invocation per (unit, input), input
// INPUTS being the bias.
@compute @workgroup_size(64)
fn backward_input(@builtin(global_invocation_id) id: vec3u) {
    let k = id.x;
    if k >= HIDDEN * (INPUTS + 1u) { return; }
    let j = k / (INPUTS + 1u);
    let i = k % (INPUTS + 1u);
    var s = 0.0;
    if i == INPUTS {
        for (var b = 0u; b < BATCH; b++) {
            s += dhidden[b * HIDDEN + j];
        }
        grads[B1 + j] = s;
    } else {
        for (var b = 0u; b < BATCH; b++) {
            s += dhidden[b * HIDDEN + j] * x[b * INPUTS + i];
        }
        grads[W1 + j * INPUTS + i] = s;
    }
}

const EVAL_THREADS: u32 = 256u;
var<workgroup> eval_loss: array<f32, EVAL_THREADS>;
var<workgroup> eval_correct: array<f32, EVAL_THREADS>;

// The loss and correct count over the TEST samples of test_x, into metrics[2] and [3]. One
// workgroup; each invocation takes every EVAL_THREADS-th sample.
@compute @workgroup_size(EVAL_THREADS)
fn evaluate(@builtin(local_invocation_index) lid: u32) {
    var loss = 0.0;
    var correct = 0.0;
    for (var n = lid; n < TEST; n += EVAL_THREADS) {
        var h: array<f32, HIDDEN>;
        for (var j = 0u; j < HIDDEN; j++) {
            var s = b1(j);
            for (var i = 0u; i < INPUTS; i++) {
                s += test_x[n * INPUTS + i] * w1(j, i);
            }
            h[j] = max(s, 0.0);
        }
        var z = output_logits(&h);
        let result = softmax_cross_entropy(&z, test_y[n]);
        loss += result.x;
        correct += result.y;
    }
    eval_loss[lid] = loss;
    eval_correct[lid] = correct;
    workgroupBarrier();
    if lid == 0u {
        var l = 0.0;
        var c = 0.0;
        for (var k = 0u; k < EVAL_THREADS; k++) {
            l += eval_loss[k];
            c += eval_correct[k];
        }
        metrics[2] += l;
        metrics[3] += c;
    }
}
