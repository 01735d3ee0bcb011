//! The ceilings a step is held against, and every pipeline the benchmark builds itself.
//!
//! - `copy` (`shaders/copy.wgsl`): `dst = src` over as many bytes as the step moves: the
//!   device's bandwidth.
//! - `traffic` (`shaders/traffic.wgsl`): the step's own loads and stores over the step's own
//!   buffers, with trivial arithmetic: the roofline of the step's access pattern. Its amsgrad
//!   form is the same shader with the `AMSGRAD` override constant.
//!
//! The copy tries several workgroup shapes (`SHAPES`) and keeps the fastest, picked in the same
//! run; the traffic kernel runs in the step's own shape (`STEP_SHAPE`), so that it differs from
//! the step in nothing but the step's arithmetic and bookkeeping (and no noisy pick moves it).
//! Their pipelines are built by the library's own wgpu code (`testing::auxiliary_pipeline`, the
//! layout taken from the shader), in one place here (`pipelines`).

use std::num::NonZeroU64;

use wgpu_optim::testing::{auxiliary_pipeline, workgroup_grid};

use crate::gpu::Gpu;
use crate::timing::{Kernel, Quartiles, Timer};

const COPY_WGSL: &str = include_str!("../../shaders/copy.wgsl");
const TRAFFIC_WGSL: &str = include_str!("../../shaders/traffic.wgsl");

/// What the traffic kernel adds: `x + TRAFFIC_SCALE * g`. A power of two, so each result is
/// rounded once and the CPU can check it bit for bit; small, so values barely drift.
pub const TRAFFIC_SCALE: f32 = 1.0 / 1024.0;

/// The shapes tried: (invocations per workgroup, vec4s each invocation moves). One vec4 per
/// invocation (the step's own shape is (256, 1)) suits GPUs; lavapipe (one CPU thread per
/// workgroup) may prefer large workgroups that move several.
const SHAPES: [(u32, u32); 6] = [(64, 1), (256, 1), (1024, 1), (256, 4), (1024, 4), (1024, 8)];

/// The step's own shape with the library's default options: 256 invocations, one vec4 each.
const STEP_SHAPE: [(u32, u32); 1] = [(256, 1)];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Copy,
    Traffic,
}

impl Which {
    /// The name in the table, and the entry point of its shader.
    pub fn name(self) -> &'static str {
        match self {
            Which::Copy => "copy",
            Which::Traffic => "traffic",
        }
    }

    fn wgsl(self) -> &'static str {
        match self {
            Which::Copy => COPY_WGSL,
            Which::Traffic => TRAFFIC_WGSL,
        }
    }
}

/// The buffers of a one-tensor step, each from element 0 (the traffic kernel's bindings).
pub struct StepBuffers<'a> {
    pub param: &'a wgpu::Buffer,
    pub grad: &'a wgpu::Buffer,
    pub exp_avg: &'a wgpu::Buffer,
    pub exp_avg_sq: &'a wgpu::Buffer,
    pub max_exp_avg_sq: Option<&'a wgpu::Buffer>,
}

/// A ceiling's pipeline in one workgroup shape, and its bind groups.
struct Shaped {
    shape: (u32, u32),
    pipeline: wgpu::ComputePipeline,
    chunks: Vec<(wgpu::BindGroup, u64)>,
}

/// One ceiling kernel over fixed buffers, in chunks the device can bind.
pub struct Ceiling {
    pub which: Which,
    /// Elements: f32 copied (copy), or step elements (traffic; a multiple of 4).
    pub len: u64,
    /// Bytes one run moves.
    pub bytes: u64,
    /// One pipeline per shape of `SHAPES` the device allows, with its bind groups: one per
    /// chunk, and the vec4s it covers (a layout taken from a shader binds with its own
    /// pipeline only).
    pipelines: Vec<Shaped>,
    /// The index in `pipelines` of the shape `record` uses.
    pub shape: usize,
}

impl Ceiling {
    /// `dst = src` over `len` f32 (a multiple of 4).
    pub fn copy(gpu: &Gpu, src: &wgpu::Buffer, dst: &wgpu::Buffer, len: u64) -> Self {
        let buffers = [Some(src), Some(dst)];
        Ceiling {
            which: Which::Copy,
            len,
            bytes: 8 * len,
            pipelines: pipelines(gpu, Which::Copy, &SHAPES, &[], &buffers, len),
            shape: 0,
        }
    }

    /// The step's loads and stores over its first `len` elements (a multiple of 4).
    pub fn traffic(gpu: &Gpu, b: &StepBuffers, len: u64) -> Self {
        let amsgrad = b.max_exp_avg_sq.is_some();
        let constants = [
            ("AMSGRAD", if amsgrad { 1.0 } else { 0.0 }),
            ("SCALE", TRAFFIC_SCALE as f64),
        ];
        // Without amsgrad, vmax is a placeholder the shader never touches.
        let buffers = [
            Some(b.param),
            Some(b.grad),
            Some(b.exp_avg),
            Some(b.exp_avg_sq),
            b.max_exp_avg_sq,
        ];
        Ceiling {
            which: Which::Traffic,
            len,
            bytes: len * if amsgrad { 36 } else { 28 },
            pipelines: pipelines(gpu, Which::Traffic, &STEP_SHAPE, &constants, &buffers, len),
            shape: 0,
        }
    }

    /// How many shapes there are to try.
    pub fn shapes(&self) -> usize {
        self.pipelines.len()
    }

    pub fn shape_name(&self, shape: usize) -> String {
        let (size, per_invocation) = self.pipelines[shape].shape;
        format!("workgroup {size}, {per_invocation} vec4/invocation")
    }

    /// Times each of `shapes` in turns, `per_shape` timed runs after one untimed, and keeps
    /// the fastest (by median); with one shape, keeps it. `done` is called after each run.
    pub fn pick_shape(
        &mut self,
        gpu: &Gpu,
        shapes: &[usize],
        per_shape: usize,
        done: &mut dyn FnMut(),
    ) -> Result<(), String> {
        if let [only] = shapes {
            self.shape = *only;
            return Ok(());
        }
        let mut timers: Vec<Timer> = shapes.iter().map(|_| Timer::new(gpu, per_shape)).collect();
        for round in 0..=per_shape {
            for (&shape, timer) in shapes.iter().zip(&mut timers) {
                self.shape = shape;
                timer.run(gpu, self, round > 0);
                done();
            }
        }
        let mut best = (f64::INFINITY, shapes[0]);
        for (&shape, timer) in shapes.iter().zip(&timers) {
            let ms = Quartiles::of(&timer.times_ms(gpu)?).median;
            if ms < best.0 {
                best = (ms, shape);
            }
        }
        self.shape = best.1;
        Ok(())
    }
}

impl Kernel for Ceiling {
    fn record(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
    ) {
        let Shaped {
            shape: (size, per_invocation),
            pipeline,
            chunks,
        } = &self.pipelines[self.shape];
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(self.which.name()),
            timestamp_writes,
        });
        pass.set_pipeline(pipeline);
        for (bind_group, vec4s) in chunks {
            let invocations = vec4s.div_ceil(*per_invocation as u64);
            let [x, y] = workgroup_grid(
                invocations,
                *size,
                gpu.limits.max_compute_workgroups_per_dimension,
            );
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
    }
}

/// The benchmark's pipelines: the shader of `which` in each of `shapes` the device allows,
/// with `WORKGROUP_SIZE` and `VEC4_PER_INVOCATION` set and `constants` besides, each with its
/// bind groups over the first `len` f32 of `buffers` (binding `i` is `buffers[i]`).
fn pipelines(
    gpu: &Gpu,
    which: Which,
    shapes: &[(u32, u32)],
    constants: &[(&str, f64)],
    buffers: &[Option<&wgpu::Buffer>],
    len: u64,
) -> Vec<Shaped> {
    shapes
        .iter()
        .filter(|&&shape| allowed(&gpu.limits, shape))
        .map(|&(size, per_invocation)| {
            let mut all = vec![
                ("WORKGROUP_SIZE", size as f64),
                ("VEC4_PER_INVOCATION", per_invocation as f64),
            ];
            all.extend_from_slice(constants);
            let (name, source) = (which.name(), which.wgsl());
            let label = format!("bench {name} ({size} x {per_invocation})");
            let pipeline = auxiliary_pipeline(&gpu.device, &label, source, name, &all);
            let layout = pipeline.get_bind_group_layout(0);
            Shaped {
                shape: (size, per_invocation),
                chunks: bind_chunks(gpu, &label, &layout, buffers, len),
                pipeline,
            }
        })
        .collect()
}

/// Whether the device runs workgroups of this shape.
fn allowed(limits: &wgpu::Limits, (size, _): (u32, u32)) -> bool {
    size <= limits.max_compute_workgroup_size_x
        && size <= limits.max_compute_invocations_per_workgroup
}

/// One bind group per chunk of the first `len` f32 (a multiple of 4) of `buffers`, in equal
/// chunks at the device's binding alignment and within its binding size, with the vec4s each
/// covers. A `None` binding gets a 16-byte placeholder, bound whole.
fn bind_chunks(
    gpu: &Gpu,
    label: &str,
    layout: &wgpu::BindGroupLayout,
    buffers: &[Option<&wgpu::Buffer>],
    len: u64,
) -> Vec<(wgpu::BindGroup, u64)> {
    let placeholder = gpu.storage_buffer(&format!("{label} placeholder"), 4);
    let limits = &gpu.limits;
    let align = (limits.min_storage_buffer_offset_alignment as u64).max(16);
    let max_chunk = limits.max_storage_buffer_binding_size.min(1 << 32) / align * align;
    let bytes = len * 4;
    let chunk = bytes
        .div_ceil(bytes.div_ceil(max_chunk).max(1))
        .next_multiple_of(align);
    (0..bytes)
        .step_by(chunk as usize)
        .map(|offset| {
            let size = chunk.min(bytes - offset);
            let entries: Vec<wgpu::BindGroupEntry> = buffers
                .iter()
                .enumerate()
                .map(|(binding, buffer)| wgpu::BindGroupEntry {
                    binding: binding as u32,
                    resource: match buffer {
                        Some(buffer) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer,
                            offset,
                            size: NonZeroU64::new(size),
                        }),
                        None => placeholder.as_entire_binding(),
                    },
                })
                .collect();
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout,
                entries: &entries,
            });
            (bind_group, size / 16)
        })
        .collect()
}

/// How many of the copy's `SHAPES` the device allows.
pub fn shape_count(limits: &wgpu::Limits) -> usize {
    SHAPES
        .iter()
        .filter(|&&shape| allowed(limits, shape))
        .count()
}
