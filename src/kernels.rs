//! Pipelines, layouts, bind groups and buffers: the only file that builds wgpu descriptors, so
//! a wgpu upgrade touches this file alone.

use std::num::NonZeroU64;

use crate::config::{Algorithm, Config};
use crate::error::{Error, Result};
pub use crate::plan::Width;
use crate::uniforms::{Chunk, MAX_GROUPS, MAX_HINTS, StepUniforms};

/// Bytes of one dispatch's window of workgroup hints.
pub const HINTS_BYTES: u64 = MAX_HINTS * 4;

/// Bytes of one step's uniforms: every group's `StepUniforms`.
pub const GROUPS_BYTES: u64 = (MAX_GROUPS * size_of::<StepUniforms>()) as u64;

/// The WGSL family every variant is built from.
pub const ADAM_FAMILY_WGSL: &str = include_str!("../shaders/adam_family.wgsl");

/// The complete WGSL source for one element width: the generated prelude, then the family.
pub fn wgsl_source(width: Width) -> String {
    let prelude = match width {
        Width::Vec4 => {
            "alias Elem = vec4<f32>;\nalias Index = vec4<u32>;\nconst LANES: u32 = 4u;\n\
             const LANE = vec4<u32>(0u, 1u, 2u, 3u);\n"
        }
        Width::Scalar => {
            "alias Elem = f32;\nalias Index = u32;\nconst LANES: u32 = 1u;\nconst LANE = 0u;\n"
        }
    };
    format!("{prelude}{ADAM_FAMILY_WGSL}")
}

/// The override constants that pick one variant of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub algorithm: Algorithm,
    pub amsgrad: bool,
    pub maximize: bool,
    pub clip: bool,
    pub weight_decay: bool,
    pub workgroup_size: u32,
}

impl Variant {
    /// The variant for these groups (which agree on algorithm, amsgrad and maximize).
    pub fn new(groups: &[Config], workgroup_size: u32) -> Self {
        Variant {
            algorithm: groups[0].algorithm,
            amsgrad: groups[0].amsgrad,
            maximize: groups[0].maximize,
            clip: groups.iter().any(|g| g.clip_gradient.is_some()),
            weight_decay: groups.iter().any(|g| g.weight_decay != 0.0),
            workgroup_size,
        }
    }

    /// Workgroups of a segmented dispatch are smaller (64 at most): fewer of them straddle a
    /// tensor boundary and take the search path.
    pub fn segmented_workgroup_size(&self) -> u32 {
        self.workgroup_size.min(64)
    }

    /// `(name, value)` pairs for `PipelineCompilationOptions::constants`.
    pub fn constants(&self) -> [(&'static str, f64); 6] {
        let algorithm = match self.algorithm {
            Algorithm::Adam => 0.0,
            Algorithm::AdamW => 1.0,
            Algorithm::Yogi => 2.0,
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        [
            ("ALGORITHM", algorithm),
            ("AMSGRAD", flag(self.amsgrad)),
            ("MAXIMIZE", flag(self.maximize)),
            ("CLIP", flag(self.clip)),
            ("WEIGHT_DECAY", flag(self.weight_decay)),
            ("WORKGROUP_SIZE", self.workgroup_size as f64),
        ]
    }
}

/// The pipelines of one variant: vec4 body or scalar tail, one tensor per dispatch or several
/// (`SEGMENTED`), all sharing one bind group layout.
pub struct Kernels {
    pub variant: Variant,
    pub layout: wgpu::BindGroupLayout,
    /// Indexed by [`Kernels::index`].
    pipelines: [wgpu::ComputePipeline; 4],
}

impl Kernels {
    pub fn new(device: &wgpu::Device, variant: Variant) -> Self {
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let uniform = |binding, has_dynamic_offset, size: usize| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset,
                min_binding_size: NonZeroU64::new(size as u64),
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("wgpu-optim step"),
            entries: &[
                uniform(0, false, GROUPS_BYTES as usize),
                uniform(1, false, size_of::<Chunk>()),
                storage(2, false),
                storage(3, true),
                storage(4, false),
                storage(5, false),
                storage(6, false),
                storage(7, true),
                uniform(8, false, HINTS_BYTES as usize),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("wgpu-optim step"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let modules = [Width::Vec4, Width::Scalar].map(|width| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("wgpu-optim adam_family"),
                source: wgpu::ShaderSource::Wgsl(wgsl_source(width).into()),
            })
        });
        let pipeline = |width: Width, segmented: bool| {
            let mut constants = variant.constants().to_vec();
            constants.push(("SEGMENTED", if segmented { 1.0 } else { 0.0 }));
            if segmented {
                let size = variant.segmented_workgroup_size() as f64;
                constants.retain(|c| c.0 != "WORKGROUP_SIZE");
                constants.push(("WORKGROUP_SIZE", size));
            }
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("wgpu-optim step"),
                layout: Some(&pipeline_layout),
                module: &modules[(width == Width::Scalar) as usize],
                entry_point: Some("step"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        };
        Kernels {
            variant,
            pipelines: [
                pipeline(Width::Vec4, false),
                pipeline(Width::Scalar, false),
                pipeline(Width::Vec4, true),
                pipeline(Width::Scalar, true),
            ],
            layout,
        }
    }

    fn index(width: Width, segmented: bool) -> usize {
        (width == Width::Scalar) as usize + 2 * segmented as usize
    }

    pub fn pipeline(&self, width: Width, segmented: bool) -> &wgpu::ComputePipeline {
        &self.pipelines[Self::index(width, segmented)]
    }
}

/// Runs `create` inside validation and out-of-memory error scopes: whatever the device refuses
/// comes back as [`Error::Creation`] naming `what`, rather than reaching the device's
/// uncaptured-error handler (which panics by default). On native backends the scopes' answers
/// are ready at once: nothing waits on the GPU.
pub fn create_scoped<T>(
    device: &wgpu::Device,
    what: &str,
    create: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let created = create();
    let memory = pollster::block_on(memory.pop());
    let validation = pollster::block_on(validation.pop());
    match memory.or(validation) {
        Some(e) => Err(Error::Creation {
            what: what.to_string(),
            reason: e.to_string(),
        }),
        None => created,
    }
}

/// A byte range of a buffer to bind.
#[derive(Clone, Debug)]
pub struct Range<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> Range<'a> {
    fn binding(&self) -> wgpu::BindingResource<'a> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer,
            offset: self.offset,
            size: NonZeroU64::new(self.size),
        })
    }
}

/// The ranges one dispatch binds, in the shader's binding order.
pub struct Bindings<'a> {
    pub step_uniforms: &'a wgpu::Buffer,
    pub chunk: Range<'a>,
    pub param: Range<'a>,
    pub grad: Range<'a>,
    pub exp_avg: Range<'a>,
    pub exp_avg_sq: Range<'a>,
    pub max_exp_avg_sq: Range<'a>,
    pub table: &'a wgpu::Buffer,
    /// This dispatch's window of workgroup hints (HINTS_BYTES from `hints`).
    pub hints: Range<'a>,
}

pub fn bind_group(device: &wgpu::Device, kernels: &Kernels, b: &Bindings) -> wgpu::BindGroup {
    let step = Range {
        buffer: b.step_uniforms,
        offset: 0,
        size: GROUPS_BYTES,
    };
    let table = Range {
        buffer: b.table,
        offset: 0,
        size: b.table.size(),
    };
    let ranges = [
        &step,
        &b.chunk,
        &b.param,
        &b.grad,
        &b.exp_avg,
        &b.exp_avg_sq,
        &b.max_exp_avg_sq,
        &table,
        &b.hints,
    ];
    let entries: Vec<wgpu::BindGroupEntry> = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: r.binding(),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("wgpu-optim step"),
        layout: &kernels.layout,
        entries: &entries,
    })
}

/// Records `dispatches` into one compute pass. `timestamp_writes`, if any, time the pass (the
/// benchmark uses it).
pub fn record(
    encoder: &mut wgpu::CommandEncoder,
    kernels: &Kernels,
    dispatches: &mut dyn Iterator<Item = &Dispatch>,
    timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("wgpu-optim step"),
        timestamp_writes,
    });
    let mut current = None;
    for d in dispatches {
        if current != Some((d.width, d.segmented)) {
            pass.set_pipeline(kernels.pipeline(d.width, d.segmented));
            current = Some((d.width, d.segmented));
        }
        pass.set_bind_group(0, &d.bind_group, &[]);
        pass.dispatch_workgroups(d.grid[0], d.grid[1], 1);
    }
}

/// One recorded dispatch of a step.
pub struct Dispatch {
    pub width: Width,
    pub segmented: bool,
    pub bind_group: wgpu::BindGroup,
    pub grid: [u32; 2],
}

/// Workgroups for `units` invocations: x up to `max_per_dim`, the rest in y.
pub fn workgroup_grid(units: u64, workgroup_size: u32, max_per_dim: u32) -> [u32; 2] {
    let groups = units.div_ceil(workgroup_size as u64);
    let x = groups.min(max_per_dim as u64).max(1);
    [x as u32, groups.div_ceil(x) as u32]
}

/// A storage buffer of `len` f32, every element `fill`; at least 16 bytes so that an empty
/// tensor still has something to bind.
pub fn state_buffer(device: &wgpu::Device, label: &str, len: u64, fill: f32) -> wgpu::Buffer {
    let size = (len * 4).max(16);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: fill != 0.0,
    });
    if fill != 0.0 {
        // New buffers are zeroed; only a non-zero fill needs writing, a block at a time.
        const BLOCK: usize = 1 << 16;
        let block = vec![fill; BLOCK];
        // A buffer the device could not create does not map: its error scope reports it.
        if let Ok(mut view) = buffer.get_mapped_range_mut(..) {
            let bytes = view.len();
            for start in (0..bytes).step_by(BLOCK * 4) {
                let end = (start + BLOCK * 4).min(bytes);
                view.slice(start..end)
                    .copy_from_slice(&bytemuck::cast_slice(&block)[..end - start]);
            }
        }
        buffer.unmap();
    }
    buffer
}

/// Records into `encoder` a copy of `data` into the start of `target`, through a fresh buffer
/// mapped at creation: the copy runs in encoder order, so each recorded step reads its own
/// numbers however many are recorded before a submit (a `Queue::write_buffer` would land
/// before the whole submit, and a reused upload buffer would need the host to know when the
/// caller submits). `data.len()` is a multiple of 4.
pub fn upload(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    target: &wgpu::Buffer,
    data: &[u8],
) {
    let upload = buffer_init(
        device,
        "wgpu-optim step upload",
        wgpu::BufferUsages::COPY_SRC,
        data,
    );
    encoder.copy_buffer_to_buffer(&upload, 0, target, 0, data.len() as u64);
}

/// A uniform buffer of `size` bytes written later with `Queue::write_buffer`.
pub fn uniform_buffer(device: &wgpu::Device, label: &str, size: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// A buffer holding `data`, with `usage` (UNIFORM, or STORAGE for read-only tables).
pub fn buffer_init(
    device: &wgpu::Device,
    label: &str,
    usage: wgpu::BufferUsages,
    data: &[u8],
) -> wgpu::Buffer {
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (data.len() as u64).max(16),
        usage,
        mapped_at_creation: true,
    });
    // A buffer the device could not create does not map: its error scope reports it.
    if !data.is_empty()
        && let Ok(mut view) = buffer.get_mapped_range_mut(..data.len() as u64)
    {
        view.copy_from_slice(data);
    }
    buffer.unmap();
    buffer
}

/// Copies `len` f32 from `buffer` at byte `offset` into a fresh staging buffer, submits, and
/// asks to map it. The returned future resolves once the device is polled past the copy.
pub fn read_f32(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: u64,
) -> impl Future<Output = Result<Vec<f32>, String>> + use<> {
    let staging = (len > 0).then(|| {
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu-optim readback"),
            size: len * 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, len * 4);
        queue.submit([encoder.finish()]);
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            sender.send(result).ok();
        });
        (staging, receiver)
    });
    async move {
        let Some((staging, receiver)) = staging else {
            return Ok(Vec::new());
        };
        match receiver.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the map callback was dropped".into()),
        }
        let data = match staging.get_mapped_range(..) {
            Ok(view) => bytemuck::cast_slice(&view).to_vec(),
            Err(e) => return Err(e.to_string()),
        };
        staging.unmap();
        Ok(data)
    }
}

/// Blocks on the device until `read_f32`'s copy is done, then returns the values.
pub fn read_f32_blocking(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: u64,
) -> Result<Vec<f32>, String> {
    let future = read_f32(device, queue, buffer, offset, len);
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| e.to_string())?;
    pollster::block_on(future)
}
