//! The engine's side of the device: buffers, compute pipelines from WGSL and their bind groups.
//! The optimizer records its step into the same encoder as the kernels built here.

use wgpu::util::DeviceExt;

use super::Result;

/// The device and queue, with the adapter's name for the printout.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: String,
}

impl Gpu {
    /// The adapter that wgpu's environment variables pick (lavapipe on a machine without a GPU).
    pub fn new() -> Result<Self> {
        let (adapter, device, queue) = wgpu_optim::util::request_device_blocking()?;
        let info = adapter.get_info();
        Ok(Gpu {
            device,
            queue,
            adapter: format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type),
        })
    }

    /// A storage buffer holding `data` (f32 or u32), readable back and writable by the queue.
    pub fn buffer_from<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> wgpu::Buffer {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.is_empty() {
            return self.zeroed(label, 1);
        }
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage: STORAGE,
            })
    }

    /// A zeroed storage buffer of `len` 4-byte elements.
    pub fn zeroed(&self, label: &str, len: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (len.max(1) * 4) as u64,
            usage: STORAGE,
            mapped_at_creation: false,
        })
    }

    /// Reads `len` f32 from element `offset` of `buffer`, waiting for the device.
    pub fn read(&self, buffer: &wgpu::Buffer, offset: usize, len: usize) -> Result<Vec<f32>> {
        Ok(wgpu_optim::util::read_f32_blocking(
            &self.device,
            &self.queue,
            buffer,
            offset as u64 * 4,
            len as u64,
        )?)
    }

    /// A WGSL module from `source`, with `prelude` (generated constants) in front of it.
    pub fn module(&self, label: &str, prelude: &str, source: &str) -> wgpu::ShaderModule {
        self.device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(format!("{prelude}\n{source}").into()),
            })
    }

    /// The compute pipeline of `entry` in `module`, its layout derived from the shader, with
    /// `constants` for its `override` declarations.
    pub fn kernel(
        &self,
        module: &wgpu::ShaderModule,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> wgpu::ComputePipeline {
        self.device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            })
    }

    /// A bind group for group 0 of `pipeline`: each `(binding, buffer)` binds the whole buffer.
    pub fn bind(
        &self,
        pipeline: &wgpu::ComputePipeline,
        label: &str,
        buffers: &[(u32, &wgpu::Buffer)],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .map(|&(binding, buffer)| wgpu::BindGroupEntry {
                binding,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }
}

/// Storage, written by the queue and by copies, read back by copies.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// A kernel with its bind group and the number of invocations it needs.
pub struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group: wgpu::BindGroup,
    pub invocations: u32,
    pub workgroup_size: u32,
}

impl Kernel {
    /// Records the dispatch into `pass`.
    pub fn dispatch(&self, pass: &mut wgpu::ComputePass) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(self.invocations.div_ceil(self.workgroup_size), 1, 1);
    }
}

/// Steps recorded per submit. The optimizer allows any number between submits; submitting
/// every 32 keeps the device fed while the host records the next ones.
pub const STEPS_PER_SUBMIT: u64 = 32;

/// Half of f32's machine epsilon: the largest relative error of one rounding.
pub const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;

/// The library's test generator (splitmix64, seeded), with a shuffle for the examples.
pub use wgpu_optim::testing::Rng;

/// A uniformly random permutation of `0..n` (Fisher-Yates).
pub fn permutation(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}
