//! The optimizer: validates the user's buffers once, plans the dispatches once, and records
//! one step into the caller's `CommandEncoder` each time it is asked.

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::kernels::{self, Bindings, Dispatch, Kernels, Range, Variant, Width};
use crate::reference::TensorState;
use crate::state::StateBuffers;
use crate::uniforms::{Chunk, StepUniforms};

/// Steps that can be recorded before the queue is submitted. Each step writes its uniforms to
/// its own slot of a ring with `Queue::write_buffer`, which lands at the next submit; more
/// unsubmitted steps than this would overwrite a slot still waiting to be read.
pub const MAX_STEPS_PER_SUBMIT: u64 = 64;

/// A range of f32 elements in a user's buffer: `len` elements starting `offset` elements in.
#[derive(Clone, Debug)]
pub struct BufferView {
    pub buffer: wgpu::Buffer,
    /// In elements (f32), from the start of the buffer.
    pub offset: u64,
    /// In elements (f32).
    pub len: u64,
}

impl BufferView {
    pub fn new(buffer: &wgpu::Buffer, offset: u64, len: u64) -> Self {
        BufferView {
            buffer: buffer.clone(),
            offset,
            len,
        }
    }

    /// The whole buffer as f32 elements.
    pub fn whole(buffer: &wgpu::Buffer) -> Self {
        Self::new(buffer, 0, buffer.size() / 4)
    }
}

/// One parameter tensor: its name (as in a PyTorch state dict), its values and its gradient.
/// Both buffers need `BufferUsages::STORAGE`; the gradient must be in another buffer.
#[derive(Clone, Debug)]
pub struct Parameter {
    pub name: String,
    pub param: BufferView,
    pub grad: BufferView,
}

impl Parameter {
    pub fn new(name: impl Into<String>, param: BufferView, grad: BufferView) -> Self {
        Parameter {
            name: name.into(),
            param,
            grad,
        }
    }
}

/// Knobs that change how the step is dispatched, never what it computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptimizerOptions {
    /// Invocations per workgroup. Default 256.
    pub workgroup_size: u32,
    /// Elements bound per dispatch. `None`: as many as the device's
    /// `max_storage_buffer_binding_size` allows. A value must be a positive multiple of
    /// [`Optimizer::chunk_granularity`] and no larger than the default.
    pub chunk_elements: Option<u64>,
}

impl Default for OptimizerOptions {
    fn default() -> Self {
        OptimizerOptions {
            workgroup_size: 256,
            chunk_elements: None,
        }
    }
}

struct Tensor {
    name: String,
    len: u64,
    state: StateBuffers,
    dispatches: Vec<Dispatch>,
}

/// A fused Adam / AdamW / Yogi optimizer over the user's parameter buffers.
///
/// It borrows the user's `Device` and `Queue` when it needs them, keeps clones of the
/// parameter and gradient buffers (wgpu buffers are reference counted) and owns the state.
pub struct Optimizer {
    config: Config,
    lr: f64,
    step: u64,
    kernels: Kernels,
    step_uniforms: wgpu::Buffer,
    slot_stride: u64,
    tensors: Vec<Tensor>,
}

impl Optimizer {
    /// An optimizer with default options. See [`Optimizer::with_options`].
    pub fn new(device: &wgpu::Device, config: Config, parameters: &[Parameter]) -> Result<Self> {
        Self::with_options(device, config, parameters, OptimizerOptions::default())
    }

    /// Validates `config`, the device's limits and every parameter, allocates the state and
    /// builds the pipelines and bind groups. Nothing is recorded or submitted.
    pub fn with_options(
        device: &wgpu::Device,
        config: Config,
        parameters: &[Parameter],
        options: OptimizerOptions,
    ) -> Result<Self> {
        config.validate()?;
        let limits = device.limits();
        check_limits(&limits, options.workgroup_size)?;
        let chunk_len = chunk_len(&limits, options)?;
        for p in parameters {
            check_parameter(&limits, p)?;
        }

        let kernels = Kernels::new(device, Variant::new(&config, options.workgroup_size));
        let uniform_align = limits.min_uniform_buffer_offset_alignment as u64;
        let slot_stride = (size_of::<StepUniforms>() as u64).next_multiple_of(uniform_align);
        let step_uniforms = kernels::uniform_buffer(
            device,
            "wgpu-optim step uniforms",
            slot_stride * MAX_STEPS_PER_SUBMIT,
        );
        let align = storage_alignment(&limits);

        // Plan every dispatch first, so that all their Chunk entries share one buffer.
        let plans: Vec<Vec<Planned>> = parameters
            .iter()
            .map(|p| plan(p, chunk_len, align))
            .collect();
        let chunk_stride = (size_of::<Chunk>() as u64).next_multiple_of(uniform_align);
        let mut chunk_bytes = vec![0u8; (chunk_stride as usize) * plans.iter().flatten().count()];
        for (i, planned) in plans.iter().flatten().enumerate() {
            let at = i * chunk_stride as usize;
            chunk_bytes[at..at + size_of::<Chunk>()]
                .copy_from_slice(bytemuck::bytes_of(&planned.chunk));
        }
        let chunk_uniforms =
            kernels::uniform_buffer_init(device, "wgpu-optim chunks", &chunk_bytes);
        // amsgrad off: the max_exp_avg_sq binding is never read, but must be bound.
        let unused = kernels::state_buffer(device, "wgpu-optim unused max_exp_avg_sq", 4, 0.0);

        let mut chunk_index = 0u64;
        let tensors = parameters
            .iter()
            .zip(&plans)
            .map(|(p, planned)| {
                let state = StateBuffers::new(device, &config, &p.name, p.param.len);
                let dispatches = planned
                    .iter()
                    .map(|d| {
                        let state_range = |buffer| Range {
                            buffer,
                            offset: d.state.0,
                            size: d.state.1,
                        };
                        let bindings = Bindings {
                            step_uniforms: &step_uniforms,
                            chunk: Range {
                                buffer: &chunk_uniforms,
                                offset: chunk_index * chunk_stride,
                                size: size_of::<Chunk>() as u64,
                            },
                            param: Range {
                                buffer: &p.param.buffer,
                                offset: d.param.0,
                                size: d.param.1,
                            },
                            grad: Range {
                                buffer: &p.grad.buffer,
                                offset: d.grad.0,
                                size: d.grad.1,
                            },
                            exp_avg: state_range(&state.exp_avg),
                            exp_avg_sq: state_range(&state.exp_avg_sq),
                            max_exp_avg_sq: match &state.max_exp_avg_sq {
                                Some(b) => state_range(b),
                                None => Range {
                                    buffer: &unused,
                                    offset: 0,
                                    size: 16,
                                },
                            },
                        };
                        chunk_index += 1;
                        Dispatch {
                            width: d.width,
                            bind_group: kernels::bind_group(device, &kernels, &bindings),
                            grid: kernels::workgroup_grid(
                                d.chunk.count as u64,
                                options.workgroup_size,
                                limits.max_compute_workgroups_per_dimension,
                            ),
                        }
                    })
                    .collect();
                Tensor {
                    name: p.name.clone(),
                    len: p.param.len,
                    state,
                    dispatches,
                }
            })
            .collect();

        Ok(Optimizer {
            lr: config.lr,
            config,
            step: 0,
            kernels,
            step_uniforms,
            slot_stride,
            tensors,
        })
    }

    /// Records one step over every parameter into `encoder`, in one compute pass, and
    /// advances the step counter. The step's uniforms are written with `queue` and take
    /// effect at the next submit: up to [`MAX_STEPS_PER_SUBMIT`] steps may be recorded before
    /// it. The gradients must be written before the encoder's work runs.
    pub fn step(&mut self, queue: &wgpu::Queue, encoder: &mut wgpu::CommandEncoder) {
        self.step_with_timestamps(queue, encoder, None);
    }

    /// [`Optimizer::step`], with `timestamp_writes` on its compute pass (to time it with a
    /// `QuerySet`; the device needs `Features::TIMESTAMP_QUERY`).
    pub fn step_with_timestamps(
        &mut self,
        queue: &wgpu::Queue,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
    ) {
        self.step += 1;
        let slot = (self.step - 1) % MAX_STEPS_PER_SUBMIT;
        let uniforms = StepUniforms::new(&self.config, self.step, self.lr);
        queue.write_buffer(
            &self.step_uniforms,
            slot * self.slot_stride,
            bytemuck::bytes_of(&uniforms),
        );
        let mut dispatches = self.tensors.iter().flat_map(|t| &t.dispatches);
        kernels::record(
            encoder,
            &self.kernels,
            (slot * self.slot_stride) as u32,
            &mut dispatches,
            timestamp_writes,
        );
    }

    /// Records one step, submits it and blocks until the device has finished it.
    pub fn step_blocking(&mut self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<()> {
        let mut encoder = device.create_command_encoder(&Default::default());
        self.step(queue, &mut encoder);
        queue.submit([encoder.finish()]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Readback(e.to_string()))
    }

    /// Sets the learning rate of the following steps (a finite number > 0).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        config::check_lr("lr", lr)?;
        self.lr = lr;
        Ok(())
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Steps recorded so far (`t` of the last one; 0 before the first).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The parameters' names, in the order they were given.
    pub fn parameter_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// The state buffers of parameter `index`, for an engine that reads them itself.
    pub fn state_buffers(&self, index: usize) -> Result<&StateBuffers> {
        Ok(&self.tensor(index)?.state)
    }

    /// Copies the state of parameter `index` back to the host. The copies are submitted at
    /// once; the future resolves when the device is polled past them (`Device::poll`), which
    /// the caller arranges. See [`Optimizer::read_state_blocking`].
    pub fn read_state(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        index: usize,
    ) -> impl Future<Output = Result<TensorState>> + use<> {
        let read = self
            .tensor(index)
            .map(|t| t.state.read(device, queue, t.len));
        async move { read?.await }
    }

    /// [`Optimizer::read_state`], waiting on the device.
    pub fn read_state_blocking(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        index: usize,
    ) -> Result<TensorState> {
        let future = self.read_state(device, queue, index);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Readback(e.to_string()))?;
        pollster::block_on(future)
    }

    /// The smallest unit of [`OptimizerOptions::chunk_elements`] on this device.
    pub fn chunk_granularity(limits: &wgpu::Limits) -> u64 {
        (storage_alignment(limits) / 4).max(4)
    }

    /// Dispatches one step records (for tests and the benchmark's bookkeeping).
    pub fn dispatch_count(&self) -> usize {
        self.tensors.iter().map(|t| t.dispatches.len()).sum()
    }

    fn tensor(&self, index: usize) -> Result<&Tensor> {
        self.tensors.get(index).ok_or_else(|| {
            Error::NoSuchParameter(format!("{index} (it has {})", self.tensors.len()))
        })
    }
}

/// What one dispatch binds (byte offset and size of each range) and updates.
struct Planned {
    width: Width,
    chunk: Chunk,
    param: (u64, u64),
    grad: (u64, u64),
    state: (u64, u64),
}

/// Splits a parameter into chunks of at most `chunk_len` elements; each chunk becomes a vec4
/// dispatch over its body (when param and grad start 16-byte aligned) and a scalar one over
/// the rest. Views are bound from the aligned offset below their start.
fn plan(p: &Parameter, chunk_len: u64, align: u64) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < p.param.len {
        let len = chunk_len.min(p.param.len - start);
        // (binding offset in bytes, first element within the binding)
        let bind = |view: &BufferView| {
            let byte = (view.offset + start) * 4;
            let offset = byte / align * align;
            (offset, (byte - offset) / 4)
        };
        let (param_offset, param_base) = bind(&p.param);
        let (grad_offset, grad_base) = bind(&p.grad);
        let ranges = |width, count: u64, param_base: u64, grad_base: u64, state_base: u64| {
            let lanes = Width::lanes(width);
            Planned {
                width,
                chunk: Chunk {
                    count: count as u32,
                    param_base: (param_base / lanes) as u32,
                    grad_base: (grad_base / lanes) as u32,
                    state_base: (state_base / lanes) as u32,
                },
                param: (
                    param_offset,
                    (p.param.offset + start) * 4 - param_offset + len * 4,
                ),
                grad: (
                    grad_offset,
                    (p.grad.offset + start) * 4 - grad_offset + len * 4,
                ),
                state: (start * 4, len * 4),
            }
        };
        let aligned = param_base % 4 == 0 && grad_base % 4 == 0;
        let body = if aligned { len / 4 * 4 } else { 0 };
        if body > 0 {
            out.push(ranges(Width::Vec4, body / 4, param_base, grad_base, 0));
        }
        if len > body {
            out.push(ranges(
                Width::Scalar,
                len - body,
                param_base + body,
                grad_base + body,
                body,
            ));
        }
        start += len;
    }
    out
}

/// Binding offsets are multiples of this (and of 16, so that vec4 views stay aligned).
fn storage_alignment(limits: &wgpu::Limits) -> u64 {
    (limits.min_storage_buffer_offset_alignment as u64).max(16)
}

fn chunk_len(limits: &wgpu::Limits, options: OptimizerOptions) -> Result<u64> {
    let granularity = Optimizer::chunk_granularity(limits);
    let align = storage_alignment(limits);
    // A view starts up to align - 4 bytes into its binding, and indices must fit in u32.
    let fits = (limits.max_storage_buffer_binding_size.saturating_sub(align) / 4).min(1 << 30);
    let max = fits / granularity * granularity;
    if max == 0 {
        return Err(Error::DeviceLimit {
            limit: "max_storage_buffer_binding_size",
            have: limits.max_storage_buffer_binding_size,
            need: align + granularity * 4,
            context: String::new(),
        });
    }
    match options.chunk_elements {
        None => Ok(max),
        Some(c) if c > 0 && c % granularity == 0 && c <= max => Ok(c),
        Some(c) => Err(Error::InvalidOption {
            name: "chunk_elements",
            value: c.to_string(),
            expected: format!("a positive multiple of {granularity} up to {max}"),
        }),
    }
}

fn check_limits(limits: &wgpu::Limits, workgroup_size: u32) -> Result<()> {
    let need = |limit, have: u64, need: u64| {
        if have >= need {
            Ok(())
        } else {
            Err(Error::DeviceLimit {
                limit,
                have,
                need,
                context: String::new(),
            })
        }
    };
    need(
        "max_storage_buffers_per_shader_stage",
        limits.max_storage_buffers_per_shader_stage as u64,
        5,
    )?;
    need(
        "max_uniform_buffers_per_shader_stage",
        limits.max_uniform_buffers_per_shader_stage as u64,
        2,
    )?;
    need(
        "max_dynamic_uniform_buffers_per_pipeline_layout",
        limits.max_dynamic_uniform_buffers_per_pipeline_layout as u64,
        1,
    )?;
    if workgroup_size == 0 {
        return Err(Error::InvalidOption {
            name: "workgroup_size",
            value: "0".into(),
            expected: "at least 1".into(),
        });
    }
    need(
        "max_compute_workgroup_size_x",
        limits.max_compute_workgroup_size_x as u64,
        workgroup_size as u64,
    )?;
    need(
        "max_compute_invocations_per_workgroup",
        limits.max_compute_invocations_per_workgroup as u64,
        workgroup_size as u64,
    )
}

fn check_parameter(limits: &wgpu::Limits, p: &Parameter) -> Result<()> {
    let tensor = || p.name.clone();
    if p.param.len != p.grad.len {
        return Err(Error::LengthMismatch {
            tensor: tensor(),
            param: p.param.len,
            grad: p.grad.len,
        });
    }
    for (which, view) in [("param", &p.param), ("grad", &p.grad)] {
        let usage = view.buffer.usage();
        if !usage.contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::MissingUsage {
                tensor: tensor(),
                which,
                needed: "STORAGE",
                has: format!("{usage:?}"),
            });
        }
        let end = view
            .offset
            .checked_add(view.len)
            .and_then(|e| e.checked_mul(4));
        if end.is_none_or(|end| end > view.buffer.size()) {
            return Err(Error::OutOfBounds {
                tensor: tensor(),
                which,
                offset: view.offset,
                len: view.len,
                buffer_bytes: view.buffer.size(),
            });
        }
    }
    if p.param.buffer == p.grad.buffer {
        return Err(Error::AliasedBuffers { tensor: tensor() });
    }
    if p.param.len * 4 > limits.max_buffer_size {
        return Err(Error::DeviceLimit {
            limit: "max_buffer_size",
            have: limits.max_buffer_size,
            need: p.param.len * 4,
            context: format!(
                " for the state of parameter `{}` (request the adapter's limits)",
                p.name
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_spills_into_y_past_the_dimension_limit() {
        assert_eq!(kernels::workgroup_grid(0, 64, 65535), [1, 0]);
        assert_eq!(kernels::workgroup_grid(1, 64, 65535), [1, 1]);
        assert_eq!(kernels::workgroup_grid(64 * 65535, 64, 65535), [65535, 1]);
        assert_eq!(
            kernels::workgroup_grid(64 * 65535 + 1, 64, 65535),
            [65535, 2]
        );
        // Every unit is covered, and by fewer than one extra row of workgroups.
        for units in [1u64, 255, 256, 257, 1 << 24, (1 << 30) + 3] {
            let [x, y] = kernels::workgroup_grid(units, 16, 65535);
            let covered = x as u64 * y as u64 * 16;
            assert!(
                covered >= units && covered - units < x as u64 * 16,
                "{units}"
            );
            assert!(x <= 65535 && y <= 65535);
        }
    }
}
