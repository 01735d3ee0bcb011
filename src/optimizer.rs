//! The optimizer: validates the user's buffers once, plans the dispatches once, and records
//! one step into the caller's `CommandEncoder` each time it is asked.
//!
//! Every parameter tensor is a *segment* of a *span*: a parameter in its own buffers is a span
//! of one segment; a flat buffer of many tensors ([`FlatParameters`], [`Arena`]) is one span of
//! many. A span is dispatched once per binding-size chunk, whatever its number of tensors.

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::kernels::{
    self, Bindings, Dispatch, GROUPS_BYTES, HINTS_BYTES, Kernels, Range, Variant,
};
use crate::plan::{self, PlanLimits, Planned, Segment, SpanLayout};
use crate::reference::TensorState;
use crate::schedule::Schedule;
use crate::state::StateBuffers;
use crate::uniforms::{Chunk, MAX_GROUPS, MAX_HINTS, StepUniforms};

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

/// One parameter tensor in buffers of its own: its name (as in a PyTorch state dict), its
/// values, its gradient and its parameter group. Both buffers need `BufferUsages::STORAGE`;
/// the gradient must be in another buffer.
#[derive(Clone, Debug)]
pub struct Parameter {
    pub name: String,
    pub param: BufferView,
    pub grad: BufferView,
    /// Index into the optimizer's groups; 0 unless set with [`Parameter::in_group`].
    pub group: usize,
}

impl Parameter {
    pub fn new(name: impl Into<String>, param: BufferView, grad: BufferView) -> Self {
        Parameter {
            name: name.into(),
            param,
            grad,
            group: 0,
        }
    }

    pub fn in_group(mut self, group: usize) -> Self {
        self.group = group;
        self
    }
}

/// One tensor of a flat buffer: `len` elements at `offset` (in elements, from the start of the
/// flat views), in parameter group `group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatTensor {
    pub name: String,
    pub offset: u64,
    pub len: u64,
    pub group: usize,
}

/// Many tensors in one parameter view and one gradient view with the same layout: updated by
/// one dispatch per binding-size chunk. Elements that belong to no tensor are never written.
#[derive(Clone, Debug)]
pub struct FlatParameters {
    pub param: BufferView,
    pub grad: BufferView,
    pub tensors: Vec<FlatTensor>,
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

/// A parameter tensor as the optimizer keeps it: where its state lives.
struct Tensor {
    name: String,
    group: usize,
    span: usize,
    offset: u64,
    len: u64,
}

/// A contiguous range of param and grad elements with its state, dispatched as a whole.
struct Span {
    state: StateBuffers,
    dispatches: Vec<Dispatch>,
}

/// A fused Adam / AdamW / Yogi optimizer over the user's parameter buffers.
///
/// It borrows the user's `Device` and `Queue` when it needs them, keeps clones of the
/// parameter and gradient buffers (wgpu buffers are reference counted) and owns the state.
pub struct Optimizer {
    groups: Vec<Config>,
    /// Each group's base learning rate, and the schedule that scales it per step.
    lrs: Vec<f64>,
    schedules: Vec<Option<Schedule>>,
    step: u64,
    kernels: Kernels,
    /// For the small upload buffer each step records (see [`Optimizer::step`]).
    device: wgpu::Device,
    step_uniforms: wgpu::Buffer,
    tensors: Vec<Tensor>,
    spans: Vec<Span>,
}

impl Optimizer {
    /// An optimizer with default options. See [`Optimizer::with_groups`].
    pub fn new(device: &wgpu::Device, config: Config, parameters: &[Parameter]) -> Result<Self> {
        Self::with_options(device, config, parameters, OptimizerOptions::default())
    }

    /// One group, separate buffers. See [`Optimizer::with_groups`].
    pub fn with_options(
        device: &wgpu::Device,
        config: Config,
        parameters: &[Parameter],
        options: OptimizerOptions,
    ) -> Result<Self> {
        Self::with_groups(device, &[config], parameters, &[], options)
    }

    /// Validates the groups, the device's limits and every parameter, allocates the state and
    /// builds the pipelines and bind groups. Nothing is recorded or submitted.
    ///
    /// `groups` are like `torch.optim` param_groups: each a full [`Config`]; they must agree on
    /// `algorithm`, `amsgrad`, `maximize` and `initial_accumulator` (one kernel runs them all),
    /// and may differ in everything else. At most [`MAX_GROUPS`]. Tensors are numbered
    /// `parameters` first, then the tensors of each of `flats` in order (for
    /// [`Optimizer::read_state`] and friends).
    pub fn with_groups(
        device: &wgpu::Device,
        groups: &[Config],
        parameters: &[Parameter],
        flats: &[FlatParameters],
        options: OptimizerOptions,
    ) -> Result<Self> {
        check_groups(groups)?;
        let limits = device.limits();
        check_limits(&limits, options.workgroup_size)?;
        let chunk_len = chunk_len(&limits, options)?;

        // Every span with its segments, sorted, relative to the span.
        let mut plans: Vec<(BufferView, BufferView, Vec<Segment>)> = Vec::new();
        let mut tensors = Vec::new();
        for p in parameters {
            check_views(&p.name, &p.param, &p.grad)?;
            check_group(&p.name, p.group, groups.len())?;
            tensors.push(Tensor {
                name: p.name.clone(),
                group: p.group,
                span: plans.len(),
                offset: 0,
                len: p.param.len,
            });
            plans.push((
                p.param.clone(),
                p.grad.clone(),
                vec![Segment {
                    start: 0,
                    end: p.param.len,
                    group: p.group as u32,
                }]
                .into_iter()
                .filter(|s| s.end > 0)
                .collect(),
            ));
        }
        for (k, flat) in flats.iter().enumerate() {
            check_views(&format!("flat #{k}"), &flat.param, &flat.grad)?;
            let mut segments = Vec::new();
            for t in &flat.tensors {
                check_group(&t.name, t.group, groups.len())?;
                if t.offset
                    .checked_add(t.len)
                    .is_none_or(|end| end > flat.param.len)
                {
                    return Err(Error::OutOfBounds {
                        tensor: t.name.clone(),
                        which: "flat",
                        offset: t.offset,
                        len: t.len,
                        buffer_bytes: flat.param.len * 4,
                    });
                }
                tensors.push(Tensor {
                    name: t.name.clone(),
                    group: t.group,
                    span: plans.len(),
                    offset: t.offset,
                    len: t.len,
                });
                if t.len > 0 {
                    segments.push(Segment {
                        start: t.offset,
                        end: t.offset + t.len,
                        group: t.group as u32,
                    });
                }
            }
            segments.sort();
            if let Some(w) = segments.windows(2).find(|w| w[0].end > w[1].start) {
                let name = |s: Segment| {
                    let t = flat
                        .tensors
                        .iter()
                        .find(|t| t.offset == s.start && t.len > 0);
                    t.map_or(String::new(), |t| t.name.clone())
                };
                return Err(Error::OverlappingTensors {
                    first: name(w[0]),
                    second: name(w[1]),
                });
            }
            plans.push((flat.param.clone(), flat.grad.clone(), segments));
        }

        let variant = Variant::new(groups, options.workgroup_size);
        let segmented_workgroup_size = variant.segmented_workgroup_size();
        // Plan every dispatch first, so that their Chunk entries share one uniform buffer and
        // their segment tables one storage buffer.
        let plan_limits = PlanLimits {
            chunk_len,
            align: storage_alignment(&limits),
            workgroup_size: options.workgroup_size,
            segmented_workgroup_size,
            max_hints: MAX_HINTS,
        };
        let mut table: Vec<u32> = Vec::new();
        let mut planned: Vec<Vec<Planned>> = Vec::new();
        for (param, grad, segments) in &plans {
            let span = SpanLayout {
                param_offset: param.offset,
                grad_offset: grad.offset,
                len: param.len,
                segments,
            };
            let mut dispatches = plan::plan_span(&span, &plan_limits);
            // Cheap (no walk over elements): a planner bug becomes an error, not a wrong step.
            plan::check(&span, &plan_limits, &dispatches).map_err(Error::Internal)?;
            for d in &mut dispatches {
                d.chunk.segments = table.len() as u32;
                table.extend(d.rows.iter().flatten());
            }
            planned.push(dispatches);
        }
        // Everything the device creates, in error scopes: out of memory, or a user buffer that
        // fails validation (destroyed, say), comes back as an error instead of reaching wgpu's
        // uncaptured-error handler (which panics by default) after an `Ok`.
        kernels::create_scoped(
            device,
            "the optimizer's state, pipelines and bind groups",
            || {
                let kernels = Kernels::new(device, variant);
                let uniform_align = limits.min_uniform_buffer_offset_alignment as u64;
                let step_uniforms =
                    kernels::uniform_buffer(device, "wgpu-optim step uniforms", GROUPS_BYTES);

                let chunk_stride = (size_of::<Chunk>() as u64).next_multiple_of(uniform_align);
                let mut chunk_bytes =
                    vec![0u8; chunk_stride as usize * planned.iter().flatten().count()];
                for (i, d) in planned.iter().flatten().enumerate() {
                    let at = i * chunk_stride as usize;
                    chunk_bytes[at..at + size_of::<Chunk>()]
                        .copy_from_slice(bytemuck::bytes_of(&d.chunk));
                }
                let chunk_uniforms = kernels::buffer_init(
                    device,
                    "wgpu-optim chunks",
                    wgpu::BufferUsages::UNIFORM,
                    &chunk_bytes,
                );
                let table = kernels::buffer_init(
                    device,
                    "wgpu-optim segments",
                    wgpu::BufferUsages::STORAGE,
                    bytemuck::cast_slice(&table),
                );
                // Each segmented dispatch's hints at its own aligned offset; every window of
                // HINTS_BYTES fits in the buffer (windows may overlap: the shader reads only its own).
                let mut hint_offsets = Vec::new();
                let mut hint_bytes: Vec<u8> = Vec::new();
                for d in planned.iter().flatten() {
                    hint_offsets.push(hint_bytes.len() as u64);
                    hint_bytes.extend(bytemuck::cast_slice(&d.hints));
                    hint_bytes.resize(
                        (hint_bytes.len() as u64).next_multiple_of(uniform_align) as usize,
                        0,
                    );
                }
                hint_bytes.resize(hint_bytes.len() + HINTS_BYTES as usize, 0);
                let hints = kernels::buffer_init(
                    device,
                    "wgpu-optim workgroup hints",
                    wgpu::BufferUsages::UNIFORM,
                    &hint_bytes,
                );
                // amsgrad off: the max_exp_avg_sq binding is never read, but must be bound.
                let unused =
                    kernels::state_buffer(device, "wgpu-optim unused max_exp_avg_sq", 4, 0.0);

                let mut chunk_index = 0u64;
                let spans = plans
                    .iter()
                    .zip(&planned)
                    .enumerate()
                    .map(|(i, ((param, grad, _), planned))| {
                        let name = match parameters.get(i) {
                            Some(p) => p.name.clone(),
                            None => format!("flat{}", i - parameters.len()),
                        };
                        let state = StateBuffers::new(device, &groups[0], &name, param.len);
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
                                        buffer: &param.buffer,
                                        offset: d.param.0,
                                        size: d.param.1,
                                    },
                                    grad: Range {
                                        buffer: &grad.buffer,
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
                                    table: &table,
                                    hints: Range {
                                        buffer: &hints,
                                        offset: hint_offsets[chunk_index as usize],
                                        size: HINTS_BYTES,
                                    },
                                };
                                chunk_index += 1;
                                Dispatch {
                                    width: d.width,
                                    segmented: d.segmented,
                                    bind_group: kernels::bind_group(device, &kernels, &bindings),
                                    grid: kernels::workgroup_grid(
                                        d.chunk.count as u64,
                                        d.workgroup_size,
                                        limits.max_compute_workgroups_per_dimension,
                                    ),
                                }
                            })
                            .collect();
                        Span { state, dispatches }
                    })
                    .collect();

                Ok(Optimizer {
                    lrs: groups.iter().map(|g| g.lr).collect(),
                    schedules: vec![None; groups.len()],
                    groups: groups.to_vec(),
                    step: 0,
                    kernels,
                    device: device.clone(),
                    step_uniforms,
                    tensors,
                    spans,
                })
            },
        )
    }

    /// Records one step over every parameter into `encoder`, in one compute pass, and
    /// advances the step counter. The step's numbers (learning rates, bias corrections) travel
    /// in a small buffer copied in `encoder` just before the pass, so any number of steps may
    /// be recorded before a submit, in one encoder or several, each reading its own. The
    /// gradients must be written before the encoder's work runs. (`queue` is unused since the
    /// numbers moved into the encoder; it stays for the signature's stability.)
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
        let _ = queue;
        self.step += 1;
        let uniforms: Vec<StepUniforms> = (0..self.groups.len())
            .map(|g| StepUniforms::new(&self.groups[g], self.step, self.lr_at(g, self.step)))
            .collect();
        kernels::upload(
            &self.device,
            encoder,
            &self.step_uniforms,
            bytemuck::cast_slice(&uniforms),
        );
        let mut dispatches = self.spans.iter().flat_map(|s| &s.dispatches);
        kernels::record(encoder, &self.kernels, &mut dispatches, timestamp_writes);
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

    /// Sets the base learning rate of every group for the following steps (finite, >= 0; a
    /// schedule scales it).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        config::check_lr(lr)?;
        self.lrs.fill(lr);
        Ok(())
    }

    /// Sets the base learning rate of group `group` for the following steps (finite, >= 0).
    /// Only the per-step uniforms change; nothing is re-recorded.
    pub fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        config::check_lr(lr)?;
        check_group("set_group_lr", group, self.groups.len())?;
        self.lrs[group] = lr;
        Ok(())
    }

    /// From the next step on, group `group` runs at `schedule.lr(base_lr, t)` for step `t`,
    /// where `base_lr` is the group's base learning rate (its config's `lr`, or the last
    /// [`Optimizer::set_group_lr`]). `None` removes the schedule.
    pub fn set_schedule(&mut self, group: usize, schedule: Option<Schedule>) -> Result<()> {
        check_group("set_schedule", group, self.groups.len())?;
        if let Some(s) = &schedule {
            s.validate()?;
        }
        self.schedules[group] = schedule;
        Ok(())
    }

    /// Group 0's base learning rate.
    pub fn lr(&self) -> f64 {
        self.lrs[0]
    }

    /// Each group's base learning rate.
    pub fn group_lrs(&self) -> &[f64] {
        &self.lrs
    }

    /// The learning rate group `group` runs at in step `t` (its schedule applied).
    pub fn lr_at(&self, group: usize, t: u64) -> f64 {
        let base = self.lrs[group];
        self.schedules[group]
            .as_ref()
            .map_or(base, |s| s.lr(base, t))
    }

    /// Steps recorded so far (`t` of the last one; 0 before the first).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The validated configuration of group 0.
    pub fn config(&self) -> &Config {
        &self.groups[0]
    }

    /// The validated configuration of every group.
    pub fn groups(&self) -> &[Config] {
        &self.groups
    }

    /// The tensors' names: the separate parameters, then each flat buffer's tensors.
    pub fn parameter_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// The state buffers that hold tensor `index`, and the element offset of its state in them,
    /// for an engine that reads them itself.
    pub fn state_buffers(&self, index: usize) -> Result<(&StateBuffers, u64)> {
        let t = self.tensor(index)?;
        Ok((&self.spans[t.span].state, t.offset))
    }

    /// Copies the state of tensor `index` back to the host. The copies are submitted at
    /// once; the future resolves when the device is polled past them (`Device::poll`), which
    /// the caller arranges. See [`Optimizer::read_state_blocking`].
    pub fn read_state(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        index: usize,
    ) -> impl Future<Output = Result<TensorState>> + use<> {
        let read = self.tensor(index).map(|t| {
            self.spans[t.span]
                .state
                .read(device, queue, t.offset, t.len)
        });
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

    /// The smallest unit of [`OptimizerOptions::chunk_elements`] on this device, and the
    /// alignment (in elements) at which an [`Arena`] places its tensors.
    pub fn chunk_granularity(limits: &wgpu::Limits) -> u64 {
        plan::granularity(storage_alignment(limits))
    }

    /// Dispatches one step records.
    pub fn dispatch_count(&self) -> usize {
        self.spans.iter().map(|s| s.dispatches.len()).sum()
    }

    fn tensor(&self, index: usize) -> Result<&Tensor> {
        self.tensors.get(index).ok_or_else(|| {
            Error::NoSuchParameter(format!("{index} (it has {})", self.tensors.len()))
        })
    }
}

/// A flat parameter buffer and a gradient buffer with the same layout, allocated for a list of
/// tensors: each tensor starts at a multiple of [`Optimizer::chunk_granularity`] elements, so
/// that its views can also be bound on their own (`min_storage_buffer_offset_alignment`).
pub struct Arena {
    pub param: wgpu::Buffer,
    pub grad: wgpu::Buffer,
    tensors: Vec<FlatTensor>,
}

impl Arena {
    /// Lays out `(name, len, group)` tensors in order. The buffers have `STORAGE`,
    /// `COPY_DST` and `COPY_SRC` usage and start zeroed.
    pub fn new(device: &wgpu::Device, tensors: &[(&str, u64, usize)]) -> Result<Self> {
        let align = Optimizer::chunk_granularity(&device.limits());
        let mut end = 0u64;
        let tensors: Vec<FlatTensor> = tensors
            .iter()
            .map(|&(name, len, group)| {
                let offset = end.next_multiple_of(align);
                end = offset + len;
                FlatTensor {
                    name: name.to_string(),
                    offset,
                    len,
                    group,
                }
            })
            .collect();
        let max = device.limits().max_buffer_size;
        if end * 4 > max {
            return Err(Error::DeviceLimit {
                limit: "max_buffer_size",
                have: max,
                need: end * 4,
                context: " for the arena (request the adapter's limits)".into(),
            });
        }
        let buffer = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: (end * 4).max(16),
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        kernels::create_scoped(device, "the arena's buffers", || {
            Ok(Arena {
                param: buffer("wgpu-optim arena params"),
                grad: buffer("wgpu-optim arena grads"),
                tensors,
            })
        })
    }

    /// The tensors with their offsets, in the order given.
    pub fn tensors(&self) -> &[FlatTensor] {
        &self.tensors
    }

    /// Tensor `index`'s parameter view, for the engine to read and write.
    pub fn param_view(&self, index: usize) -> Option<BufferView> {
        let t = self.tensors.get(index)?;
        Some(BufferView::new(&self.param, t.offset, t.len))
    }

    /// Tensor `index`'s gradient view, for the engine's backward pass to fill.
    pub fn grad_view(&self, index: usize) -> Option<BufferView> {
        let t = self.tensors.get(index)?;
        Some(BufferView::new(&self.grad, t.offset, t.len))
    }

    /// The arena as flat parameters, for [`Optimizer::with_groups`].
    pub fn flat(&self) -> FlatParameters {
        FlatParameters {
            param: BufferView::whole(&self.param),
            grad: BufferView::whole(&self.grad),
            tensors: self.tensors.clone(),
        }
    }
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

/// Each group valid; at most MAX_GROUPS; the kernel-wide keys equal in all.
fn check_groups(groups: &[Config]) -> Result<()> {
    if groups.is_empty() || groups.len() > MAX_GROUPS {
        return Err(Error::InvalidOption {
            name: "groups",
            value: groups.len().to_string(),
            expected: format!("1 to {MAX_GROUPS} parameter groups"),
        });
    }
    for (i, g) in groups.iter().enumerate() {
        g.validate()?;
        let first = &groups[0];
        let differs = [
            ("algorithm", g.algorithm != first.algorithm),
            ("amsgrad", g.amsgrad != first.amsgrad),
            ("maximize", g.maximize != first.maximize),
            (
                "initial_accumulator",
                g.initial_accumulator != first.initial_accumulator,
            ),
        ];
        if let Some((key, _)) = differs.iter().find(|(_, d)| *d) {
            return Err(Error::GroupMismatch { group: i, key });
        }
    }
    Ok(())
}

fn check_group(tensor: &str, group: usize, groups: usize) -> Result<()> {
    if group < groups {
        Ok(())
    } else {
        Err(Error::InvalidOption {
            name: "group",
            value: format!("{group} (for `{tensor}`)"),
            expected: format!("a group index below {groups}"),
        })
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
        6,
    )?;
    need(
        "max_uniform_buffers_per_shader_stage",
        limits.max_uniform_buffers_per_shader_stage as u64,
        3,
    )?;
    need(
        "max_uniform_buffer_binding_size",
        limits.max_uniform_buffer_binding_size,
        HINTS_BYTES,
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

// A view never exceeds its buffer, and a buffer never exceeds max_buffer_size: the state
// buffers, as long as the views, always fit.
fn check_views(name: &str, param: &BufferView, grad: &BufferView) -> Result<()> {
    let tensor = || name.to_string();
    if param.len != grad.len {
        return Err(Error::LengthMismatch {
            tensor: tensor(),
            param: param.len,
            grad: grad.len,
        });
    }
    for (which, view) in [("param", &param), ("grad", &grad)] {
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
    if param.buffer == grad.buffer {
        return Err(Error::AliasedBuffers { tensor: tensor() });
    }
    Ok(())
}

// Restoring a saved state (`checkpoint.rs` builds on these).
impl Optimizer {
    /// Elements of parameter `index`.
    pub fn parameter_len(&self, index: usize) -> Result<u64> {
        Ok(self.tensor(index)?.len)
    }

    /// The parameter group of parameter `index`.
    pub fn parameter_group(&self, index: usize) -> Result<usize> {
        Ok(self.tensor(index)?.group)
    }

    /// Overwrites the state of parameter `index` with `state`. Checks first that every vector
    /// has the parameter's length and that `max_exp_avg_sq` is present exactly when amsgrad is
    /// on; on error nothing is written. The writes go through `queue` and land before the work
    /// of the next submit: load between submits, not while steps are recorded and unsubmitted.
    pub fn load_state(
        &mut self,
        queue: &wgpu::Queue,
        index: usize,
        state: &TensorState,
    ) -> Result<()> {
        let tensor = self.tensor(index)?;
        let name = &tensor.name;
        let check = |kind: &str, data: &[f32]| {
            if data.len() as u64 == tensor.len {
                Ok(())
            } else {
                Err(Error::Shape {
                    tensor: format!("{kind}.{name}"),
                    shape: vec![data.len()],
                    expected: format!("{} elements, like parameter `{name}`", tensor.len),
                })
            }
        };
        check("exp_avg", &state.exp_avg)?;
        check("exp_avg_sq", &state.exp_avg_sq)?;
        match (&state.max_exp_avg_sq, self.config().amsgrad) {
            (Some(vmax), true) => check("max_exp_avg_sq", vmax)?,
            (None, false) => {}
            (None, true) => {
                return Err(Error::MissingTensor {
                    tensor: format!("max_exp_avg_sq.{name}"),
                    expected: "the running maximum of exp_avg_sq, as amsgrad is on".into(),
                });
            }
            (Some(_), false) => {
                return Err(Error::UnexpectedTensor {
                    tensor: format!("max_exp_avg_sq.{name}"),
                    expected: "no max_exp_avg_sq, as amsgrad is off".into(),
                });
            }
        }
        self.spans[tensor.span]
            .state
            .write(queue, tensor.offset, state);
        Ok(())
    }

    /// Sets the step counter: the next step is `step + 1` (its bias correction uses it).
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }
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
