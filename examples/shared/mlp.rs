//! A training engine in miniature: a two-layer classifier of the 8x8 digits, trained entirely
//! on the GPU. Forward pass, softmax cross-entropy and backward pass are WGSL kernels
//! (`mlp.wgsl`); all four tensors live in one [`Arena`], biases in a group without weight decay;
//! AdamW's step is recorded into the same encoder right after the backward pass, its learning
//! rate following a warmup + cosine [`Schedule`]. The loss and the accuracies are summed on the
//! GPU and read back asynchronously once per epoch: no step waits for the host.
//!
//! [`cpu_gradients`] computes the same network's gradients on the CPU in f64, with a bound on
//! what f32 rounding allows the GPU's to differ by.

use std::collections::VecDeque;
use std::time::Instant;

use plotters::prelude::SeriesLabelPosition;
use wgpu_optim::{Arena, Config, Optimizer, OptimizerOptions, Schedule, groups};

use super::Result;
use super::gpu::{Gpu, Kernel, Rng, STEPS_PER_SUBMIT, UNIT_ROUNDOFF, permutation};
use super::plot::{self, Axis, Panel, Series};

pub const INPUTS: usize = 64;
pub const CLASSES: usize = 10;
/// The tensors as torch would name them, in arena order.
pub const TENSORS: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];

/// The binding numbers of `mlp.wgsl`'s group 0 (each kernel binds the ones it uses).
mod binding {
    pub const PARAMS: u32 = 0;
    pub const GRADS: u32 = 1;
    pub const X: u32 = 2;
    pub const Y: u32 = 3;
    pub const HIDDEN: u32 = 4;
    pub const DLOGITS: u32 = 5;
    pub const DHIDDEN: u32 = 6;
    pub const METRICS: u32 = 7;
    pub const TEST_X: u32 = 8;
    pub const TEST_Y: u32 = 9;
}

/// Images (pixels / 16, so in [0, 1]) and labels.
pub struct Split {
    pub x: Vec<f32>,
    pub y: Vec<u32>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.y.len()
    }
}

/// The digits of `data/digits/digits.csv`, split as its README says: the `k`-th image of each
/// class is a test image when `k % 5 == 4`.
pub struct Digits {
    pub train: Split,
    pub test: Split,
}

impl Digits {
    pub fn load() -> Result<Self> {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/digits/digits.csv"
        ));
        let mut train = Split {
            x: Vec::new(),
            y: Vec::new(),
        };
        let mut test = Split {
            x: Vec::new(),
            y: Vec::new(),
        };
        let mut seen = [0usize; CLASSES];
        for (i, line) in text.lines().enumerate() {
            let values: Vec<u32> = line
                .split(',')
                .map(|v| v.trim().parse::<u32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| format!("digits.csv line {}: {e}", i + 1))?;
            if values.len() != INPUTS + 1 || values[INPUTS] as usize >= CLASSES {
                return Err(format!("digits.csv line {}: not 64 pixels and a class", i + 1).into());
            }
            let class = values[INPUTS] as usize;
            let split = if seen[class] % 5 == 4 {
                &mut test
            } else {
                &mut train
            };
            seen[class] += 1;
            split
                .x
                .extend(values[..INPUTS].iter().map(|&p| p as f32 / 16.0));
            split.y.push(values[INPUTS]);
        }
        Ok(Digits { train, test })
    }
}

/// The hyperparameters of a run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub hidden: usize,
    pub batch: usize,
    pub epochs: usize,
    /// AdamW's peak learning rate, reached after `warmup_steps` and decayed along a cosine to 0
    /// at the last step.
    pub lr: f64,
    pub warmup_steps: u64,
    /// For the weights; the biases have none.
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            hidden: 64,
            batch: 32,
            epochs: 40,
            lr: 1e-2,
            warmup_steps: 100,
            weight_decay: 1e-2,
            seed: 7,
        }
    }
}

/// The network on the GPU: parameters, optimizer, the epoch's data and the kernels.
pub struct Mlp {
    pub settings: Settings,
    pub arena: Arena,
    pub optimizer: Optimizer,
    /// The training set in this epoch's order, and the batch the kernels read.
    train_x: wgpu::Buffer,
    train_y: wgpu::Buffer,
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    pub metrics: wgpu::Buffer,
    train_len: usize,
    forward_hidden: Kernel,
    forward_loss: Kernel,
    backward_output: Kernel,
    backward_hidden: Kernel,
    backward_input: Kernel,
    evaluate: Kernel,
}

impl Mlp {
    /// Uploads the test set, initialises the parameters as torch's `nn.Linear` does (uniform in
    /// ±1/sqrt(fan_in), from `settings.seed`) and builds the optimizer and the kernels.
    pub fn new(gpu: &Gpu, settings: &Settings, digits: &Digits) -> Result<Self> {
        let (h, b) = (settings.hidden, settings.batch);
        if !(1..=256).contains(&b) || h == 0 {
            return Err(
                "the batch must hold 1 to 256 samples, the hidden layer at least one".into(),
            );
        }
        let steps = (digits.train.len() / b * settings.epochs) as u64;
        let lens = [h * INPUTS, h, CLASSES * h, CLASSES];
        let group_of = groups::weight_decay_groups(TENSORS, &["bias"], 0, 1);
        let specs: Vec<(&str, u64, usize)> = (0..4)
            .map(|k| (TENSORS[k], lens[k] as u64, group_of[k]))
            .collect();
        let arena = Arena::new(&gpu.device, &specs)?;
        let mut rng = Rng::new(settings.seed);
        for (k, t) in arena.tensors().iter().enumerate() {
            let fan_in = if k < 2 { INPUTS } else { h };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let init: Vec<f32> = (0..lens[k])
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect();
            gpu.queue
                .write_buffer(&arena.param, t.offset * 4, bytemuck::cast_slice(&init));
        }
        // As transformers train: the gradient's global norm clipped to 1, on the device.
        let decay = Config::adamw()
            .lr(settings.lr)
            .weight_decay(settings.weight_decay)
            .max_grad_norm(Some(1.0));
        let no_decay = decay.clone().weight_decay(0.0);
        let mut optimizer = Optimizer::with_groups(
            &gpu.device,
            &[decay, no_decay],
            &[],
            &[arena.flat()],
            OptimizerOptions::default(),
        )?;
        let schedule = Schedule::warmup_cosine(settings.warmup_steps, steps.max(2), 0.0)?;
        for group in 0..2 {
            optimizer.set_schedule(group, Some(schedule.clone()))?;
        }

        let offset = |k: usize| arena.tensors()[k].offset;
        let prelude = format!(
            "const INPUTS: u32 = {INPUTS}u;\nconst HIDDEN: u32 = {h}u;\nconst CLASSES: u32 = {CLASSES}u;\n\
             const BATCH: u32 = {b}u;\nconst TEST: u32 = {}u;\n\
             const W1: u32 = {}u;\nconst B1: u32 = {}u;\nconst W2: u32 = {}u;\nconst B2: u32 = {}u;\n",
            digits.test.len(),
            offset(0),
            offset(1),
            offset(2),
            offset(3),
        );
        let module = gpu.module("mlp.wgsl", &prelude, include_str!("mlp.wgsl"));
        let n = digits.train.len();
        let train_x = gpu.zeroed("train x (epoch order)", n * INPUTS);
        let train_y = gpu.zeroed("train y (epoch order)", n);
        let x = gpu.zeroed("batch x", b * INPUTS);
        let y = gpu.zeroed("batch y", b);
        let hidden = gpu.zeroed("hidden", b * h);
        let dlogits = gpu.zeroed("dlogits", b * CLASSES);
        let dhidden = gpu.zeroed("dhidden", b * h);
        let metrics = gpu.zeroed("metrics", 4);
        let test_x = gpu.buffer_from("test x", &digits.test.x);
        let test_y = gpu.buffer_from("test y", &digits.test.y);
        let (params, grads) = (&arena.param, &arena.grad);
        let kernel =
            |entry: &str, invocations: usize, workgroup: usize, bind: &[(u32, &wgpu::Buffer)]| {
                let pipeline = gpu.kernel(&module, entry, &[]);
                Kernel {
                    bind_group: gpu.bind(&pipeline, entry, bind),
                    pipeline,
                    invocations: invocations as u32,
                    workgroup_size: workgroup as u32,
                }
            };
        let forward_hidden = kernel(
            "forward_hidden",
            b * h,
            64,
            &[
                (binding::PARAMS, params),
                (binding::X, &x),
                (binding::HIDDEN, &hidden),
            ],
        );
        let forward_loss = kernel(
            "forward_loss",
            b,
            b,
            &[
                (binding::PARAMS, params),
                (binding::Y, &y),
                (binding::HIDDEN, &hidden),
                (binding::DLOGITS, &dlogits),
                (binding::METRICS, &metrics),
            ],
        );
        let backward_output = kernel(
            "backward_output",
            CLASSES * (h + 1),
            64,
            &[
                (binding::GRADS, grads),
                (binding::HIDDEN, &hidden),
                (binding::DLOGITS, &dlogits),
            ],
        );
        let backward_hidden = kernel(
            "backward_hidden",
            b * h,
            64,
            &[
                (binding::PARAMS, params),
                (binding::HIDDEN, &hidden),
                (binding::DLOGITS, &dlogits),
                (binding::DHIDDEN, &dhidden),
            ],
        );
        let backward_input = kernel(
            "backward_input",
            h * (INPUTS + 1),
            64,
            &[
                (binding::GRADS, grads),
                (binding::X, &x),
                (binding::DHIDDEN, &dhidden),
            ],
        );
        let evaluate = kernel(
            "evaluate",
            256,
            256,
            &[
                (binding::PARAMS, params),
                (binding::METRICS, &metrics),
                (binding::TEST_X, &test_x),
                (binding::TEST_Y, &test_y),
            ],
        );
        Ok(Mlp {
            settings: settings.clone(),
            arena,
            optimizer,
            train_x,
            train_y,
            x,
            y,
            metrics,
            train_len: n,
            forward_hidden,
            forward_loss,
            backward_output,
            backward_hidden,
            backward_input,
            evaluate,
        })
    }

    /// Full batches per epoch (the remainder of the shuffled set waits for another epoch).
    pub fn steps_per_epoch(&self) -> usize {
        self.train_len / self.settings.batch
    }

    /// Writes the training set in the order `order` for the next epoch; the queue applies the
    /// write before the next submit, after all work submitted before it.
    pub fn upload_epoch(&self, gpu: &Gpu, digits: &Digits, order: &[usize]) {
        let x: Vec<f32> = order
            .iter()
            .flat_map(|&i| digits.train.x[i * INPUTS..][..INPUTS].iter().copied())
            .collect();
        let y: Vec<u32> = order.iter().map(|&i| digits.train.y[i]).collect();
        gpu.queue
            .write_buffer(&self.train_x, 0, bytemuck::cast_slice(&x));
        gpu.queue
            .write_buffer(&self.train_y, 0, bytemuck::cast_slice(&y));
    }

    /// Records the forward and backward passes of batch `k` of this epoch's order: the loss
    /// is added to the metrics, the gradients land in the arena's gradient buffer.
    pub fn record_backward(&self, encoder: &mut wgpu::CommandEncoder, k: usize) {
        let b = self.settings.batch as u64;
        let k = k as u64;
        encoder.copy_buffer_to_buffer(
            &self.train_x,
            k * b * INPUTS as u64 * 4,
            &self.x,
            0,
            b * INPUTS as u64 * 4,
        );
        encoder.copy_buffer_to_buffer(&self.train_y, k * b * 4, &self.y, 0, b * 4);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("forward + backward"),
            timestamp_writes: None,
        });
        for kernel in [
            &self.forward_hidden,
            &self.forward_loss,
            &self.backward_output,
            &self.backward_hidden,
            &self.backward_input,
        ] {
            kernel.dispatch(&mut pass);
        }
    }

    /// Records one training step on batch `k`: forward, backward, and the optimizer's step.
    pub fn record_step(
        &mut self,
        queue: &wgpu::Queue,
        encoder: &mut wgpu::CommandEncoder,
        k: usize,
    ) {
        self.record_backward(encoder, k);
        self.optimizer.step(queue, encoder);
    }

    /// Records the evaluation of the test set: its loss and correct count join the metrics.
    pub fn record_evaluation(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("evaluate"),
            timestamp_writes: None,
        });
        self.evaluate.dispatch(&mut pass);
    }

    /// Tensor `k`'s parameters, read back.
    pub fn read_param(&self, gpu: &Gpu, k: usize) -> Result<Vec<f32>> {
        let t = &self.arena.tensors()[k];
        gpu.read(&self.arena.param, t.offset as usize, t.len as usize)
    }

    /// Tensor `k`'s gradient, read back.
    pub fn read_grad(&self, gpu: &Gpu, k: usize) -> Result<Vec<f32>> {
        let t = &self.arena.tensors()[k];
        gpu.read(&self.arena.grad, t.offset as usize, t.len as usize)
    }
}

/// One epoch's numbers, as read back from the GPU.
#[derive(Clone, Debug)]
pub struct Epoch {
    pub epoch: usize,
    /// Mean over the epoch's training samples, each taken with the parameters of its step.
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// Over the test set, after the epoch.
    pub test_loss: f64,
    pub test_accuracy: f64,
    /// The learning rate of the epoch's last step (group 0).
    pub lr: f64,
    /// Training steps per second of wall time, averaged from the arrival of the first epoch's
    /// numbers to this epoch's (for the first epoch: from the start, with the device's warm-up).
    /// An average, because the numbers of consecutive epochs can arrive together.
    pub steps_per_second: f64,
    /// Since the start of training.
    pub elapsed: f64,
}

/// Trains for `settings.epochs` and returns each epoch's numbers, calling `on_epoch` as each
/// arrives. Epoch `e + 1` is recorded and submitted before epoch `e`'s numbers are waited for,
/// so the device always has an epoch queued while the host reads the previous one.
pub fn train(
    gpu: &Gpu,
    settings: &Settings,
    digits: &Digits,
    mut on_epoch: impl FnMut(&Epoch),
) -> Result<Vec<Epoch>> {
    let mut mlp = Mlp::new(gpu, settings, digits)?;
    let steps = mlp.steps_per_epoch();
    let mut rng = Rng::new(settings.seed.wrapping_add(1));
    let mut pending = VecDeque::new();
    let mut epochs = Vec::new();
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    for epoch in 1..=settings.epochs {
        mlp.upload_epoch(gpu, digits, &permutation(&mut rng, digits.train.len()));
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(&mlp.metrics, 0, None);
        for k in 0..steps {
            mlp.record_step(&gpu.queue, &mut encoder, k);
            if ((k + 1) as u64).is_multiple_of(STEPS_PER_SUBMIT) {
                let full = std::mem::replace(
                    &mut encoder,
                    gpu.device.create_command_encoder(&Default::default()),
                );
                gpu.queue.submit([full.finish()]);
            }
        }
        mlp.record_evaluation(&mut encoder);
        gpu.queue.submit([encoder.finish()]);
        let read = wgpu_optim::util::read_f32(&gpu.device, &gpu.queue, &mlp.metrics, 0, 4);
        // An empty submit: waiting for it waits for every earlier one, the read's copy included.
        let fence = gpu.queue.submit([]);
        let lr = mlp.optimizer.lr_at(0, mlp.optimizer.step_count());
        pending.push_back((epoch, read, fence, lr));
        while pending.len() > 1 || (epoch == settings.epochs && !pending.is_empty()) {
            let (epoch, read, fence, lr) = pending.pop_front().expect("not empty");
            gpu.device.poll(wgpu::PollType::Wait {
                submission_index: Some(fence),
                timeout: None,
            })?;
            let m = pollster::block_on(read)?;
            let now = Instant::now();
            let since = *first.get_or_insert(now);
            let steps_per_second = if epoch == 1 {
                steps as f64 / (now - start).as_secs_f64()
            } else {
                ((epoch - 1) * steps) as f64 / (now - since).as_secs_f64()
            };
            let (n, samples) = (digits.test.len() as f64, (steps * settings.batch) as f64);
            let e = Epoch {
                epoch,
                train_loss: m[0] as f64 / samples,
                train_accuracy: m[1] as f64 / samples,
                test_loss: m[2] as f64 / n,
                test_accuracy: m[3] as f64 / n,
                lr,
                steps_per_second,
                elapsed: (now - start).as_secs_f64(),
            };
            on_epoch(&e);
            epochs.push(e);
        }
    }
    Ok(epochs)
}

/// The same network's loss gradients on one batch, computed on the CPU in f64, with for each
/// element a bound on how far an f32 computation of it may be off.
pub struct CpuGradients {
    /// Per tensor, in [`TENSORS`] order.
    pub grads: [Vec<f64>; 4],
    pub bounds: [Vec<f64>; 4],
    pub loss: f64,
}

/// `params` in [`TENSORS`] order, `x` a batch of `y.len()` images.
///
/// The bounds are first-order forward-error bounds (Higham's): a sum of `n` products computed
/// in f32, in any order, is within `gamma(n) = n u / (1 - n u)` of the sum of their absolute
/// values (`u` = 2^-24), plus whatever errors its inputs carry, times their weights. Each
/// quantity's error is carried from the layer before: the hidden pre-activations', the logits'
/// (through `exp`, whose WGSL accuracy is `3 + 2 |x|` ulp, into the probabilities), the output
/// gradient's, and the hidden gradient's. A hidden unit whose pre-activation lies within its
/// own error of 0 may be cut off by ReLU on one side and not the other: its gradient counts
/// as wholly uncertain.
pub fn cpu_gradients(params: &[Vec<f32>; 4], hidden: usize, x: &[f32], y: &[u32]) -> CpuGradients {
    let u = UNIT_ROUNDOFF;
    let gamma = |n: usize| n as f64 * u / (1.0 - n as f64 * u);
    let p = |k: usize, i: usize| params[k][i] as f64;
    let (w1, b1, w2, b2) = (0, 1, 2, 3);
    let batch = y.len();
    let mut grads = [
        vec![0.0; hidden * INPUTS],
        vec![0.0; hidden],
        vec![0.0; CLASSES * hidden],
        vec![0.0; CLASSES],
    ];
    let mut bounds = grads.clone();
    let mut loss = 0.0;
    for b in 0..batch {
        let xb = |i: usize| x[b * INPUTS + i] as f64;
        // Forward: h and its error.
        let mut h = vec![0.0; hidden];
        let mut h_err = vec![0.0; hidden];
        let mut uncertain = vec![false; hidden];
        for j in 0..hidden {
            let mut s = p(b1, j);
            let mut a = s.abs();
            for i in 0..INPUTS {
                s += xb(i) * p(w1, j * INPUTS + i);
                a += (xb(i) * p(w1, j * INPUTS + i)).abs();
            }
            let err = gamma(INPUTS + 1) * a;
            h[j] = s.max(0.0);
            // Beyond its error of 0, the unit is on (error carried) or off (exactly 0) on both
            // sides; within it, one side may pass up to 2 err that the other cuts to 0.
            h_err[j] = if s > err {
                err
            } else if s < -err {
                0.0
            } else {
                2.0 * err
            };
            uncertain[j] = s.abs() <= err;
        }
        let mut z = [0.0; CLASSES];
        let mut z_err = [0.0f64; CLASSES];
        for o in 0..CLASSES {
            let mut s = p(b2, o);
            let mut a = s.abs();
            let mut carried = 0.0;
            for j in 0..hidden {
                s += h[j] * p(w2, o * hidden + j);
                a += (h[j] * p(w2, o * hidden + j)).abs();
                carried += h_err[j] * p(w2, o * hidden + j).abs();
            }
            z[o] = s;
            z_err[o] = gamma(hidden + 1) * a + carried;
        }
        let top = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - top).exp()).sum();
        let label = y[b] as usize;
        loss += sum.ln() - (z[label] - top);
        let spread = z.iter().map(|v| (v - top).abs()).fold(0.0, f64::max);
        // Relative error of each probability: the logits' errors (twice: numerator and sum),
        // exp's (3 + 2|x| ulp), the sum's and the quotient's roundings.
        let rel_p = 2.0 * z_err.iter().cloned().fold(0.0, f64::max)
            + (2.0 * (3.0 + 2.0 * spread) + CLASSES as f64 + 8.0) * u;
        let mut dl = [0.0; CLASSES];
        let mut dl_err = [0.0; CLASSES];
        for o in 0..CLASSES {
            let prob = (z[o] - top).exp() / sum;
            let onehot = if o == label { 1.0 } else { 0.0 };
            dl[o] = (prob - onehot) / batch as f64;
            dl_err[o] = (rel_p + 4.0 * u) * (prob + onehot) / batch as f64;
        }
        // Backward. Each gradient element sums `batch` terms: the per-term magnitudes and
        // carried errors are accumulated here, gamma(batch) applied at the end.
        for o in 0..CLASSES {
            grads[b2][o] += dl[o];
            bounds[b2][o] += dl_err[o] + gamma(batch) * dl[o].abs();
            for j in 0..hidden {
                let k = o * hidden + j;
                grads[w2][k] += dl[o] * h[j];
                bounds[w2][k] +=
                    dl_err[o] * h[j] + dl[o].abs() * h_err[j] + gamma(batch) * (dl[o] * h[j]).abs();
            }
        }
        for j in 0..hidden {
            let (mut dh, mut a, mut carried) = (0.0, 0.0, 0.0);
            for o in 0..CLASSES {
                dh += dl[o] * p(w2, o * hidden + j);
                a += (dl[o] * p(w2, o * hidden + j)).abs();
                carried += dl_err[o] * p(w2, o * hidden + j).abs();
            }
            let mut dh_err = gamma(CLASSES) * a + carried;
            if h[j] <= 0.0 {
                dh = 0.0;
            }
            if uncertain[j] {
                dh_err += a;
            } else if h[j] <= 0.0 {
                dh_err = 0.0;
            }
            grads[b1][j] += dh;
            bounds[b1][j] += dh_err + gamma(batch) * dh.abs();
            for i in 0..INPUTS {
                let k = j * INPUTS + i;
                grads[w1][k] += dh * xb(i);
                bounds[w1][k] += dh_err * xb(i).abs() + gamma(batch) * (dh * xb(i)).abs();
            }
        }
    }
    CpuGradients {
        grads,
        bounds,
        loss: loss / batch as f64,
    }
}

/// Loss (log scale) and accuracy per epoch, train and test.
pub fn write_curves(epochs: &[Epoch], path: &std::path::Path) -> Result<()> {
    let curve = |f: fn(&Epoch) -> f64| epochs.iter().map(|e| (e.epoch as f64, f(e))).collect();
    let panels = [
        Panel::new(
            "Cross-entropy",
            Axis::linear("epoch"),
            Axis::log("loss"),
            vec![
                Series::new("train (running)", plot::RED_, curve(|e| e.train_loss)),
                Series::new("test", plot::BLUE_, curve(|e| e.test_loss)),
            ],
        ),
        Panel::new(
            "Accuracy",
            Axis::linear("epoch"),
            Axis::linear("fraction correct").range(0.8, 1.0),
            vec![
                Series::new("train (running)", plot::RED_, curve(|e| e.train_accuracy)),
                Series::new("test", plot::BLUE_, curve(|e| e.test_accuracy)),
            ],
        )
        .legend(SeriesLabelPosition::LowerRight),
    ];
    plot::write_svg(path, (560, 420), &panels)
}
