//! The runtime optimizer: builds its pipelines, state and bind groups once from validated spans
//! and their plan, then records one step into the caller's `CommandEncoder` each time it is
//! asked, with each group's learning rate and schedule.
//!
//! Owns: the step counter, the learning rates, the recorded dispatches. May not validate the
//! user's layout (`params.rs`), decide what a dispatch covers (`plan.rs`) or build wgpu
//! descriptors itself (`gpu/`); state I/O is in `state.rs`.

use crate::config::{self, Config};
use crate::dtype::{Dtype, q8};
use crate::error::{Error, Result};
use crate::gpu::{self, Dispatch, Finish, Kernels, Range, Variant};
use crate::params::{
    self, FlatParameters, Location, OptimizerOptions, Parameter, SpanInput, TensorInfo,
};
use crate::plan::{self, PlanLimits, Planned, SpanLayout};
use crate::protocol::{
    self, BIAS_ROW, Chunk, DeviceScalars, GROUPS_BYTES, HINTS_BYTES, ITERATION_BYTES, MAX_GROUPS,
    MAX_HINTS, NORM_BLOCKS, Slot, StepUniforms, Storage, Width,
};
use crate::schedule::Schedule;
use crate::state::StateBuffers;

/// A contiguous range of param and grad elements with its state, dispatched as a whole.
pub(crate) struct Span {
    pub state: StateBuffers,
    dispatches: Vec<Dispatch>,
}

/// A fused Adam / AdamW / Yogi optimizer over the user's parameter buffers.
///
/// It borrows the user's `Device` and `Queue` when it needs them, keeps clones of the
/// parameter and gradient buffers and of the device (wgpu handles are reference counted), and
/// owns the state.
pub struct Optimizer {
    groups: Vec<Config>,
    /// Each group's base learning rate, and the schedule that scales it per step.
    lrs: Vec<f64>,
    schedules: Vec<Option<Schedule>>,
    pub(crate) step: u64,
    kernels: Kernels,
    /// For the small upload buffer each step records (see [`Optimizer::step`]).
    device: wgpu::Device,
    step_uniforms: wgpu::Buffer,
    /// The iteration's numbers on the device (`DeviceScalars`) and the norm pass's partials.
    pub(crate) device_state: wgpu::Buffer,
    /// The uniform copy of the iteration's numbers that the step reads.
    pub(crate) iteration: wgpu::Buffer,
    /// Binds the device state for the `finish` pass.
    finish_bind_group: wgpu::BindGroup,
    /// With t on the device: each group's (first u32, steps) of bias factors in the table.
    bias: Vec<(u32, u32)>,
    tensors: Vec<TensorInfo>,
    locations: Vec<Location>,
    pub(crate) spans: Vec<Span>,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("groups", &self.groups)
            .field("lrs", &self.lrs)
            .field("schedules", &self.schedules)
            .field("step", &self.step)
            .field("variant", &self.kernels.variant)
            .field("tensors", &self.tensors)
            .field("dispatches", &self.dispatch_count())
            .finish_non_exhaustive()
    }
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
    /// `algorithm`, `amsgrad`, `maximize` and `initial_accumulator` (one kernel runs them all)
    /// and on the optimizer-wide `loss_scale`, `skip_nonfinite`, `max_grad_norm` and storage
    /// keys (`param_dtype`, `grad_dtype`, `exp_avg_dtype`, `exp_avg_sq_dtype`,
    /// `master_weights`, `rounding`, `seed`), and may differ in everything else. At most 16 ([`crate::MAX_GROUPS`]). Tensors are
    /// numbered `parameters` first, then the tensors of each of `flats` in order (for
    /// [`Optimizer::read_state`] and friends). What the device refuses while building (out of
    /// memory, a destroyed buffer) is [`Error::Creation`].
    pub fn with_groups(
        device: &wgpu::Device,
        groups: &[Config],
        parameters: &[Parameter],
        flats: &[FlatParameters],
        options: OptimizerOptions,
    ) -> Result<Self> {
        params::check_groups(groups)?;
        let limits = device.limits();
        params::check_limits(&limits, options.workgroup_size)?;
        let chunk_len = params::chunk_len(&limits, options, &Storage::new(&groups[0]))?;
        let (spans, tensors) =
            params::spans(groups.len(), &Storage::new(&groups[0]), parameters, flats)?;
        let variant = Variant::new(groups, options.workgroup_size);
        let storage = variant.storage;
        let plan_limits = PlanLimits {
            chunk_len,
            align: params::storage_alignment(&limits),
            pairs: storage.pairs(),
            min_bytes: storage.min_bytes(),
            workgroup_size: options.workgroup_size,
            segmented_workgroup_size: variant.segmented().workgroup_size,
            max_hints: MAX_HINTS,
        };
        let (planned, mut table, partials) = plan_all(&spans, &plan_limits, &storage)?;
        // With skipping, t lives on the device: each group's bias factors go in the table.
        let bias: Vec<(u32, u32)> = groups
            .iter()
            .map(|g| {
                let rows = if variant.skip {
                    protocol::bias_table(g)
                } else {
                    Vec::new()
                };
                let at = (table.len() as u32, (rows.len() / BIAS_ROW) as u32);
                table.extend(rows);
                at
            })
            .collect();
        let finish = Finish::new(&groups[0], partials);
        // Everything the device creates, in error scopes: out of memory, or a user buffer that
        // fails validation (destroyed, say), comes back as an error instead of reaching wgpu's
        // uncaptured-error handler (which panics by default) after an `Ok`.
        gpu::create_scoped(
            device,
            "the optimizer's state, pipelines and bind groups",
            || {
                let kernels = Kernels::new(device, variant, Some(finish));
                let step_uniforms =
                    gpu::uniform_buffer(device, "wgpu-optim step uniforms", GROUPS_BYTES);
                let (device_state, iteration) = device_state(device, &groups[0], partials);
                let (built, finish_bind_group) = build_spans(
                    device,
                    &kernels,
                    [&step_uniforms, &device_state, &iteration],
                    &groups[0],
                    &spans,
                    &planned,
                    &table,
                );
                let (tensors, locations) = tensors.into_iter().unzip();
                Ok(Optimizer {
                    lrs: groups.iter().map(|g| g.lr).collect(),
                    schedules: vec![None; groups.len()],
                    groups: groups.to_vec(),
                    step: 0,
                    kernels,
                    device: device.clone(),
                    step_uniforms,
                    device_state,
                    iteration,
                    finish_bind_group,
                    bias,
                    tensors,
                    locations,
                    spans: built,
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
            .map(|g| {
                let (config, lr) = (&self.groups[g], self.lr_at(g, self.step));
                if self.kernels.variant.skip {
                    let (base, len) = self.bias[g];
                    StepUniforms::with_device_step(config, lr, base, len)
                } else {
                    StepUniforms::new(config, self.step, lr)
                }
            })
            .collect();
        gpu::upload(
            &self.device,
            encoder,
            &self.step_uniforms,
            bytemuck::cast_slice(&uniforms),
        );
        let dispatches: Vec<&Dispatch> = self.spans.iter().flat_map(|s| &s.dispatches).collect();
        gpu::record(
            encoder,
            &self.kernels,
            &dispatches,
            (&self.finish_bind_group, &self.device_state, &self.iteration),
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
        params::check_group("set_group_lr", group, self.groups.len())?;
        self.lrs[group] = lr;
        Ok(())
    }

    /// From the next step on, group `group` runs at `schedule.lr(base_lr, t)` for step `t`,
    /// where `base_lr` is the group's base learning rate (its config's `lr`, or the last
    /// [`Optimizer::set_group_lr`]). `None` removes the schedule.
    pub fn set_schedule(&mut self, group: usize, schedule: Option<Schedule>) -> Result<()> {
        params::check_group("set_schedule", group, self.groups.len())?;
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

    /// Iterations recorded so far (0 before the first): what schedules count. Without
    /// skipping it is also t, the steps applied; with skipping t lives on the device
    /// ([`Optimizer::read_status`]).
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

    /// Every tensor (name, length, group), numbered as [`Optimizer::with_groups`] says.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The smallest unit of [`OptimizerOptions::chunk_elements`] on this device with f32
    /// storage, and the alignment (in elements) at which an [`crate::Arena`] places its
    /// tensors. With 16-bit storage see [`Optimizer::chunk_granularity_for`].
    pub fn chunk_granularity(limits: &wgpu::Limits) -> u64 {
        plan::granularity(params::storage_alignment(limits), 4)
    }

    /// The smallest unit of [`OptimizerOptions::chunk_elements`] on this device for `config`'s
    /// storage dtypes: every buffer's binding of a chunk starts at an aligned offset, so a
    /// narrower dtype needs chunks of more elements (twice as many with a 16-bit buffer), and
    /// with q8 state a chunk holds whole blocks with their alignment (64 times the alignment
    /// in bytes: 16,384 elements at wgpu's default).
    pub fn chunk_granularity_for(limits: &wgpu::Limits, config: &Config) -> u64 {
        plan::chunk_unit(params::storage_alignment(limits), &Storage::new(config))
    }

    /// Dispatches one step records.
    pub fn dispatch_count(&self) -> usize {
        self.spans.iter().map(|s| s.dispatches.len()).sum()
    }

    pub(crate) fn tensor(&self, index: usize) -> Result<(&TensorInfo, Location)> {
        match self.tensors.get(index) {
            Some(t) => Ok((t, self.locations[index])),
            None => Err(Error::NoSuchParameter(format!(
                "{index} (it has {})",
                self.tensors.len()
            ))),
        }
    }
}

/// Plans every span, checks each plan's invariants (cheap, no walk over elements: a planner
/// bug becomes an error, not a wrong step), gathers the segment rows into one table and
/// numbers the partial sums of the `grad_norm` pass (their count is the third value).
fn plan_all(
    spans: &[SpanInput],
    limits: &PlanLimits,
    storage: &Storage,
) -> Result<(Vec<Vec<Planned>>, Vec<u32>, u32)> {
    let mut table = Vec::new();
    let mut planned = Vec::new();
    let mut partials = 0u32;
    for s in spans {
        let span = SpanLayout {
            param_offset: s.param.offset,
            grad_offset: s.grad.offset,
            param_bytes: storage.param.bytes(),
            grad_bytes: storage.grad.bytes(),
            len: s.param.len,
            segments: &s.segments,
        };
        let mut dispatches = if storage.blockwise() {
            let plans = plan::plan_blocks(&span, limits);
            plan::check_blocks(&span, limits, &plans).map_err(Error::Internal)?;
            plans
        } else {
            let plans = plan::plan_span(&span, limits);
            plan::check(&span, limits, &plans).map_err(Error::Internal)?;
            plans
        };
        for d in &mut dispatches {
            d.chunk.segments = table.len() as u32;
            table.extend(d.rows.iter().flatten());
            // `grad_norm` writes one partial sum per workgroup (NORM_BLOCKS step blocks).
            d.chunk.partials_base = partials;
            partials += d.workgroups().div_ceil(NORM_BLOCKS as u64) as u32;
        }
        planned.push(dispatches);
    }
    Ok((planned, table, partials))
}

/// The state of each span and a bind group per planned dispatch. The dispatches' `Chunk`s
/// share one uniform buffer, their rows one table, their hint windows one uniform buffer.
fn build_spans(
    device: &wgpu::Device,
    kernels: &Kernels,
    [step_uniforms, device_state, iteration]: [&wgpu::Buffer; 3],
    config: &Config,
    spans: &[SpanInput],
    planned: &[Vec<Planned>],
    table: &[u32],
) -> (Vec<Span>, wgpu::BindGroup) {
    let limits = device.limits();
    let uniform_align = limits.min_uniform_buffer_offset_alignment as u64;
    let all = || planned.iter().flatten();
    let chunk_stride = (size_of::<Chunk>() as u64).next_multiple_of(uniform_align);
    // At least one entry: the `finish` pass binds the first.
    let mut chunk_bytes = vec![0u8; chunk_stride as usize * all().count().max(1)];
    for (i, d) in all().enumerate() {
        let at = i * chunk_stride as usize;
        chunk_bytes[at..at + size_of::<Chunk>()].copy_from_slice(bytemuck::bytes_of(&d.chunk));
    }
    let uniform = wgpu::BufferUsages::UNIFORM;
    let chunks = gpu::buffer_init(device, "wgpu-optim chunks", uniform, &chunk_bytes);
    let storage = wgpu::BufferUsages::STORAGE;
    let table = gpu::buffer_init(
        device,
        "wgpu-optim segments",
        storage,
        bytemuck::cast_slice(table),
    );
    // Each segmented dispatch's hints at its own aligned offset; every window of HINTS_BYTES
    // fits in the buffer (windows may overlap: the shader reads only its own).
    let mut hint_offsets = Vec::new();
    let mut hint_bytes: Vec<u8> = Vec::new();
    for d in all() {
        hint_offsets.push(hint_bytes.len() as u64);
        hint_bytes.extend(bytemuck::cast_slice(&d.hints));
        let aligned = (hint_bytes.len() as u64).next_multiple_of(uniform_align);
        hint_bytes.resize(aligned as usize, 0);
    }
    hint_bytes.resize(hint_bytes.len() + HINTS_BYTES as usize, 0);
    let hints = gpu::buffer_init(device, "wgpu-optim workgroup hints", uniform, &hint_bytes);
    let q8_maps = gpu::buffer_init(
        device,
        "wgpu-optim q8 maps",
        uniform,
        &protocol::q8_maps_bytes(),
    );
    // amsgrad or master weights off: their bindings are never read, but must be bound.
    let unused = |name: &str| {
        let label = format!("wgpu-optim unused {name}");
        gpu::state_buffer(device, &label, Dtype::F32, 4, 0.0)
    };
    let (unused_vmax, unused_master) = (unused("max_exp_avg_sq"), unused("master_param"));

    // The `finish` pass reads and writes only `device`; the rest is bound to stand-ins, one
    // buffer each (a buffer bound read-write may not be bound again in the same dispatch).
    let stand_ins = Slot::ALL.map(|slot| {
        gpu::state_buffer(
            device,
            &format!("wgpu-optim finish stand-in {slot:?}"),
            Dtype::F32,
            4,
            0.0,
        )
    });
    let finish_ranges = Slot::ALL.map(|slot| match slot {
        Slot::Groups => Range::whole(step_uniforms),
        Slot::Chunk => Range {
            buffer: &chunks,
            offset: 0,
            size: size_of::<Chunk>() as u64,
        },
        Slot::Table => Range::whole(&table),
        Slot::Hints => Range {
            buffer: &hints,
            offset: 0,
            size: HINTS_BYTES,
        },
        Slot::Device => Range::whole(device_state),
        Slot::Iteration => Range::whole(iteration),
        Slot::Q8Maps => Range::whole(&q8_maps),
        _ => Range::whole(&stand_ins[slot as usize]),
    });
    let finish_label = format!("{} finish", kernels.variant.label(Width::Scalar));
    let finish = gpu::bind_group(device, kernels, &finish_label, &finish_ranges);
    let mut index = 0;
    let spans = spans
        .iter()
        .zip(planned)
        .map(|(span, planned)| {
            let blocks = span
                .segments
                .iter()
                .map(|s| q8::blocks(s.end - s.start))
                .sum();
            let state = StateBuffers::new(device, config, &span.name, span.param.len, blocks);
            let dispatches = planned
                .iter()
                .enumerate()
                .map(|(k, d)| {
                    let range = |buffer, (offset, size)| Range {
                        buffer,
                        offset,
                        size,
                    };
                    // A state buffer's binding: the chunk's elements in its dtype, or its
                    // blocks for q8.
                    let (first, len) = d.state;
                    let state_range = |b, slot| {
                        let dtype = kernels.variant.storage.dtype(slot);
                        if dtype == Dtype::Q8 {
                            let block_bytes = q8::BLOCK_WORDS as u64 * 4;
                            return range(b, (d.q8.0 * block_bytes, d.q8.1 * block_bytes));
                        }
                        let bytes = dtype.bytes();
                        range(b, (first * bytes, plan::binding_size(0, len, bytes)))
                    };
                    let ranges = Slot::ALL.map(|slot| match slot {
                        Slot::Groups => Range::whole(step_uniforms),
                        Slot::Chunk => {
                            range(&chunks, (index * chunk_stride, size_of::<Chunk>() as u64))
                        }
                        Slot::Param => range(&span.param.buffer, d.param),
                        Slot::Grad => range(&span.grad.buffer, d.grad),
                        Slot::ExpAvg => state_range(&state.exp_avg, slot),
                        Slot::ExpAvgSq => state_range(&state.exp_avg_sq, slot),
                        Slot::MaxExpAvgSq => match &state.max_exp_avg_sq {
                            Some(b) => state_range(b, slot),
                            None => Range::whole(&unused_vmax),
                        },
                        Slot::MasterParam => match &state.master_param {
                            Some(b) => state_range(b, slot),
                            None => Range::whole(&unused_master),
                        },
                        Slot::Table => Range::whole(&table),
                        Slot::Hints => range(&hints, (hint_offsets[index as usize], HINTS_BYTES)),
                        Slot::Device => Range::whole(device_state),
                        Slot::Iteration => Range::whole(iteration),
                        Slot::Q8Maps => Range::whole(&q8_maps),
                    });
                    index += 1;
                    let variant = if d.segmented {
                        kernels.variant.segmented()
                    } else {
                        kernels.variant
                    };
                    let label = format!("{} {}: dispatch {k}", variant.label(d.width), span.name);
                    Dispatch {
                        width: d.width,
                        segmented: d.segmented,
                        bind_group: gpu::bind_group(device, kernels, &label, &ranges),
                        grid: gpu::workgroup_grid(
                            d.workgroups(),
                            1,
                            limits.max_compute_workgroups_per_dimension,
                        ),
                        norm_grid: gpu::workgroup_grid(
                            d.workgroups().div_ceil(NORM_BLOCKS as u64),
                            1,
                            limits.max_compute_workgroups_per_dimension,
                        ),
                    }
                })
                .collect();
            Span { state, dispatches }
        })
        .collect();
    (spans, finish)
}

/// The device's iteration state: `DeviceScalars` (S = `init_scale` and its f32 inverse, no
/// growth, t = 0) followed by room for `partials` partial sums (at least one, and the size a
/// multiple of 16, so that the binding is never shorter than the shader's struct).
fn device_state(
    device: &wgpu::Device,
    config: &Config,
    partials: u32,
) -> (wgpu::Buffer, wgpu::Buffer) {
    let scale = config.loss_scale.map_or(1.0, |l| l.init_scale as f32);
    let inv_scale = (1.0 / scale as f64) as f32;
    let scalars = DeviceScalars {
        loss_scale: scale,
        inv_scale,
        step_inv_scale: inv_scale,
        clip_coef: 1.0,
        ..DeviceScalars::default()
    };
    let bytes = iteration_bytes(&scalars);
    let mut state = bytes.clone();
    // The shader's struct with its runtime-sized array is 16-byte aligned: the binding holds
    // at least one partial, rounded up to that alignment.
    let len = (state.len() + 8 * partials.max(1) as usize).next_multiple_of(16);
    state.resize(len, 0);
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let uniform = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
    (
        gpu::buffer_init(device, "wgpu-optim device state", usage, &state),
        gpu::buffer_init(device, "wgpu-optim iteration", uniform, &bytes),
    )
}

/// The shader's `Iteration` for `scalars`: them, then every group's bias factors at 1.
pub(crate) fn iteration_bytes(scalars: &DeviceScalars) -> Vec<u8> {
    let mut bytes = bytemuck::bytes_of(scalars).to_vec();
    for _ in 0..MAX_GROUPS {
        bytes.extend(bytemuck::bytes_of(&[1.0f32; 4]));
    }
    debug_assert_eq!(bytes.len() as u64, ITERATION_BYTES);
    bytes
}
