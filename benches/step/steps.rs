//! The step kernels of the table and the workloads they run on, built through the library's
//! public API only (`Optimizer::new` for one tensor, `Optimizer::with_groups` over a
//! `FlatParameters` for many). The plain steps of four algorithms, and AdamW with the pre-step
//! features (`max_grad_norm`, `loss_scale`, both), each timed against plain AdamW.

use wgpu_optim::{BufferView, Config, FlatParameters, FlatTensor, LossScale, Optimizer, Parameter};

use crate::ceilings::StepBuffers;
use crate::gpu::Gpu;
use crate::timing::Kernel;

/// How many tensors the multi-tensor rows split a size into.
pub const MULTI_TENSORS: u64 = 1000;

/// One step kernel of the table: a name for the `kernel` column, the pre-step features for
/// the `features` column, and the configuration.
pub struct StepKernel {
    pub name: &'static str,
    pub features: &'static [&'static str],
    pub config: Config,
    /// Yogi's `sign(v - g^2)` can resolve a near-tie differently in f32 and in the f64
    /// reference (`wgpu_optim::testing::yogi_ties`).
    pub near_ties: bool,
}

impl StepKernel {
    /// The step without features of the same name: what a feature row is timed against.
    pub fn is_plain(&self) -> bool {
        self.features.is_empty()
    }

    /// `adamw [max_grad_norm, loss_scale]`, for messages.
    pub fn label(&self) -> String {
        if self.is_plain() {
            self.name.into()
        } else {
            format!("{} [{}]", self.name, self.features.join(", "))
        }
    }
}

/// `max_grad_norm` of the feature rows: the random gradients' global norm is far above it
/// (about `sqrt(n / 3)` for `n` elements), so the step clips.
pub const MAX_GRAD_NORM: f64 = 1.0;

pub fn step_kernels() -> Vec<StepKernel> {
    let kernel = |name, config, near_ties| StepKernel {
        name,
        features: &[],
        config,
        near_ties,
    };
    let adamw = |features, config| StepKernel {
        name: "adamw",
        features,
        config,
        near_ties: false,
    };
    let clipped = Config::adamw().max_grad_norm(Some(MAX_GRAD_NORM));
    let scaled = |c: Config| c.loss_scale(Some(LossScale::default()));
    vec![
        kernel("adam", Config::adam(), false),
        kernel("adamw", Config::adamw(), false),
        kernel("yogi", Config::yogi(), true),
        kernel("adam_amsgrad", Config::adam().amsgrad(true), false),
        adamw(&["max_grad_norm"], clipped.clone()),
        adamw(&["loss_scale"], scaled(Config::adamw())),
        adamw(&["max_grad_norm", "loss_scale"], scaled(clipped)),
    ]
}

/// Bytes the per-element step pass moves per element in fp32: p, g, m, v read and p, m, v
/// written; vmax both ways. The ceilings move as many.
pub fn step_pass_bytes(config: &Config) -> u64 {
    if config.amsgrad { 36 } else { 28 }
}

/// Bytes a step moves per element: the step pass's, and 4 more where a pass before it reads
/// the gradient (any pre-step feature: clipping needs the norm, loss scaling found_inf).
pub fn bytes_per_element(config: &Config) -> u64 {
    step_pass_bytes(config) + if config.has_pre_step() { 4 } else { 0 }
}

/// The initial loss scale S (`LossScale::default()`, torch's 65536): the loss-scale rows'
/// gradients are the random ones times S, in f32. A power of two, so scaling and unscaling are
/// exact; the random gradients are below 1 in magnitude, so `g * S` stays far from overflow.
pub fn loss_scale() -> f32 {
    LossScale::default().init_scale as f32
}

/// `elements` split into `tensors` consecutive ranges, (offset, len) each, shaped like a
/// transformer's: weight matrices alternating with biases 1/64 their size, every length a
/// multiple of 4 but the last (which takes the remainder). Too few elements for that: equal
/// lengths (a multiple of 4, maybe 0) and the remainder last.
pub fn split(elements: u64, tensors: u64) -> Vec<(u64, u64)> {
    let pairs = tensors / 2;
    let unit = elements / (pairs * 65).max(1);
    let bias = (unit / 4 * 4).max(4);
    let weight = (64 * unit / 4 * 4).max(4);
    let patterned = |i: u64| if i.is_multiple_of(2) { weight } else { bias };
    let fits = (0..tensors.saturating_sub(1)).map(patterned).sum::<u64>() <= elements;
    let equal = elements / tensors / 4 * 4;
    let mut offset = 0;
    (0..tensors)
        .map(|i| {
            let len = if i + 1 == tensors {
                elements - offset
            } else if fits {
                patterned(i)
            } else {
                equal
            };
            offset += len;
            (offset - len, len)
        })
        .collect()
}

/// One optimizer over a workload's tensors, all views of one parameter buffer.
pub struct Step {
    pub optimizer: Optimizer,
    pub param: wgpu::Buffer,
    /// (offset, len) of each tensor in elements.
    pub tensors: Vec<(u64, u64)>,
    /// The parameter groups: one, or (multi-tensor) weights with decay and biases without.
    pub groups: Vec<Config>,
}

impl Step {
    /// `elements` as `tensors` tensors (1: a `Parameter`; more: a flat buffer, one dispatch),
    /// all reading `grad`.
    pub fn new(
        gpu: &Gpu,
        kernel: &StepKernel,
        elements: u64,
        tensors: u64,
        grad: &wgpu::Buffer,
    ) -> Result<Self, String> {
        let label = format!("bench {} x{tensors}", kernel.label());
        let param = gpu.storage_buffer(&label, elements);
        let ranges = split(elements, tensors);
        let (optimizer, groups) = if tensors == 1 {
            let parameter = Parameter::new(
                "tensor0",
                BufferView::new(&param, 0, elements),
                BufferView::new(grad, 0, elements),
            );
            let optimizer = Optimizer::new(&gpu.device, kernel.config.clone(), &[parameter]);
            (optimizer, vec![kernel.config.clone()])
        } else {
            // The multi-tensor path: one flat buffer, biases in a group without weight decay.
            let flat = FlatParameters::new(
                BufferView::new(&param, 0, elements),
                BufferView::new(grad, 0, elements),
                ranges
                    .iter()
                    .enumerate()
                    .map(|(i, &(offset, len))| {
                        FlatTensor::new(format!("tensor{i}"), offset, len).in_group(i % 2)
                    })
                    .collect(),
            );
            let groups = vec![
                kernel.config.clone(),
                kernel.config.clone().weight_decay(0.0),
            ];
            let optimizer =
                Optimizer::with_groups(&gpu.device, &groups, &[], &[flat], Default::default());
            (optimizer, groups)
        };
        Ok(Step {
            optimizer: optimizer.map_err(|e| format!("{label}: {e}"))?,
            param,
            tensors: ranges,
            groups,
        })
    }

    /// The group of tensor `i`.
    pub fn group(&self, i: usize) -> usize {
        if self.groups.len() == 1 { 0 } else { i % 2 }
    }

    /// The buffers of a one-tensor step, for the traffic kernel.
    pub fn buffers<'a>(&'a self, grad: &'a wgpu::Buffer) -> Result<StepBuffers<'a>, String> {
        let (state, offset) = self.optimizer.state_buffers(0).map_err(|e| e.to_string())?;
        if self.tensors.len() != 1 || offset != 0 {
            return Err("the traffic kernel runs over a one-tensor step's buffers".into());
        }
        Ok(StepBuffers {
            param: &self.param,
            grad,
            exp_avg: &state.exp_avg,
            exp_avg_sq: &state.exp_avg_sq,
            max_exp_avg_sq: state.max_exp_avg_sq.as_ref(),
        })
    }
}

impl Kernel for Step {
    fn record(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
    ) {
        self.optimizer
            .step_with_timestamps(&gpu.queue, encoder, timestamp_writes);
    }
}
