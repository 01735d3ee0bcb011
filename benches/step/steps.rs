//! The step kernels of the table and the workloads they run on, built through the library's
//! public API only (`Optimizer::new` for one tensor, `Optimizer::with_groups` over a
//! `FlatParameters` for many). The plain f32 steps of four algorithms; AdamW with the pre-step
//! features (`max_grad_norm`, `loss_scale`, both) and AdamW in 16-bit storage dtypes (bf16 `m`
//! and `v`; bf16 everything; bf16 everything with master weights), each timed against the
//! plain f32 AdamW step.

use wgpu_optim::{
    BufferView, Config, Dtype, FlatParameters, FlatTensor, LossScale, Optimizer, Parameter,
};

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

/// What a non-plain step is timed against the plain step of its name for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// Pre-step features (`features` not empty), f32 storage.
    Features,
    /// Storage dtypes other than f32, no features.
    Dtypes,
}

impl StepKernel {
    /// The f32 step without features: what the feature and dtype rows of its name are timed
    /// against.
    pub fn is_plain(&self) -> bool {
        self.comparison().is_none()
    }

    /// `None` for a plain step; else what it is compared with the plain step for.
    pub fn comparison(&self) -> Option<Comparison> {
        if !self.features.is_empty() {
            Some(Comparison::Features)
        } else if !self.pattern().is_f32() {
            Some(Comparison::Dtypes)
        } else {
            None
        }
    }

    pub fn pattern(&self) -> Pattern {
        Pattern::of(&self.config)
    }

    /// `adamw [max_grad_norm, loss_scale]`, `adamw (bf16,bf16,bf16,bf16+master)`, for
    /// messages.
    pub fn label(&self) -> String {
        let mut label = self.name.to_string();
        if !self.features.is_empty() {
            label += &format!(" [{}]", self.features.join(", "));
        }
        if !self.pattern().is_f32() {
            label += &format!(" ({})", self.pattern().label());
        }
        label
    }
}

/// What the per-element step pass loads and stores: each buffer's dtype, `vmax` (amsgrad, in
/// `v`'s dtype) and master weights (an f32 copy of 16-bit parameters, read and written beside
/// them). Steps of one pattern share their ceilings: the copy of as many bytes and the traffic
/// kernel in these dtypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub param: Dtype,
    pub grad: Dtype,
    pub exp_avg: Dtype,
    pub exp_avg_sq: Dtype,
    pub amsgrad: bool,
    pub master: bool,
}

impl Pattern {
    pub fn of(config: &Config) -> Self {
        Pattern {
            param: config.param_dtype,
            grad: config.grad_dtype,
            exp_avg: config.exp_avg_dtype,
            exp_avg_sq: config.exp_avg_sq_dtype,
            amsgrad: config.amsgrad,
            master: config.keeps_master(),
        }
    }

    /// f32 everywhere (and so no master weights).
    pub fn is_f32(&self) -> bool {
        [self.param, self.grad, self.exp_avg, self.exp_avg_sq] == [Dtype::F32; 4] && !self.master
    }

    /// Bytes per element (docs/semantics.md, "Bytes per element"): p read and written, g
    /// read, m and v read and written, vmax read and written, and the master copy read and
    /// written, its read in place of the parameter's (the step reads the 16-bit parameter only at
    /// t = 1). f32: 28 (amsgrad 36); bf16 m and v: 20; bf16 p, g, m, v: 14; with master
    /// weights: 20.
    pub fn bytes(&self) -> u64 {
        let vmax = if self.amsgrad {
            self.exp_avg_sq.bytes()
        } else {
            0
        };
        // The master copy is read instead of the parameter, and both are written.
        let (param_reads, master) = if self.master {
            (0, Dtype::F32.bytes())
        } else {
            (1, 0)
        };
        (1 + param_reads) * self.param.bytes()
            + self.grad.bytes()
            + 2 * self.exp_avg.bytes()
            + 2 * self.exp_avg_sq.bytes()
            + 2 * vmax
            + 2 * master
    }

    /// `f32`, or the dtypes of p, g, m and v (`bf16,bf16,bf16,bf16`) and `+master`.
    pub fn label(&self) -> String {
        if self.is_f32() {
            return "f32".into();
        }
        let names = [self.param, self.grad, self.exp_avg, self.exp_avg_sq].map(Dtype::name);
        let master = if self.master { "+master" } else { "" };
        format!("{}{master}", names.join(","))
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
    let bf16_states = Config::adamw()
        .exp_avg_dtype(Dtype::Bf16)
        .exp_avg_sq_dtype(Dtype::Bf16);
    let bf16 = bf16_states
        .clone()
        .param_dtype(Dtype::Bf16)
        .grad_dtype(Dtype::Bf16);
    vec![
        kernel("adam", Config::adam(), false),
        kernel("adamw", Config::adamw(), false),
        kernel("yogi", Config::yogi(), true),
        kernel("adam_amsgrad", Config::adam().amsgrad(true), false),
        adamw(&["max_grad_norm"], clipped.clone()),
        adamw(&["loss_scale"], scaled(Config::adamw())),
        adamw(&["max_grad_norm", "loss_scale"], scaled(clipped)),
        adamw(&[], bf16_states),
        adamw(&[], bf16.clone()),
        adamw(&[], bf16.master_weights(true)),
    ]
}

/// Bytes the per-element step pass moves per element (`Pattern::bytes`). The ceilings of its
/// pattern move as many.
pub fn step_pass_bytes(config: &Config) -> u64 {
    Pattern::of(config).bytes()
}

/// Bytes a step moves per element: the step pass's, and the gradient's once more where a pass
/// before it reads the gradient (any pre-step feature: clipping needs the norm, loss scaling
/// found_inf).
pub fn bytes_per_element(config: &Config) -> u64 {
    let pre_step = if config.has_pre_step() {
        config.grad_dtype.bytes()
    } else {
        0
    };
    step_pass_bytes(config) + pre_step
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
    /// all reading `grad` (in the kernel's gradient dtype), the parameters in their dtype.
    pub fn new(
        gpu: &Gpu,
        kernel: &StepKernel,
        elements: u64,
        tensors: u64,
        grad: &wgpu::Buffer,
    ) -> Result<Self, String> {
        let label = format!("bench {} x{tensors}", kernel.label());
        let param = gpu.buffer(&label, kernel.config.param_dtype, elements);
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
            pattern: Pattern::of(self.optimizer.config()),
            param: &self.param,
            grad,
            exp_avg: &state.exp_avg,
            exp_avg_sq: &state.exp_avg_sq,
            max_exp_avg_sq: state.max_exp_avg_sq.as_ref(),
            master_param: state.master_param.as_ref(),
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
