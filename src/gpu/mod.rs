//! Everything that talks to wgpu's descriptor API: shader modules, pipelines, the bind group
//! layout and bind groups (both from the binding table of `protocol.rs`), buffers, recording,
//! readback, error scopes and the device request of `util.rs`. The only file that builds wgpu
//! descriptors, so that a wgpu upgrade touches this file alone.
//!
//! Owns: how the protocol is bound and dispatched. May not decide what is dispatched (that is
//! `plan.rs`) nor compute any step's numbers (`protocol.rs`).

use std::num::NonZeroU64;

use crate::config::Config;
use crate::protocol::{
    self, BINDINGS, BLOCK_INVOCATIONS, BindingKind, ITERATION_BYTES, Slot, Storage, Width,
};

mod buffers;
mod device;

pub(crate) use buffers::{
    buffer_init, create_scoped, engine_buffer, q8_state_buffer, read_f32, read_f32_blocking,
    state_buffer, uniform_buffer, upload,
};
pub use device::auxiliary_pipeline;
pub(crate) use device::request_device;

/// The WGSL family every variant is built from.
const ADAM_FAMILY_WGSL: &str = include_str!("../../shaders/adam_family.wgsl");

/// The 16-bit conversions and stochastic rounding's bits, which the prelude's loads and stores
/// call.
const STORAGE_WGSL: &str = include_str!("../../shaders/storage.wgsl");

/// q8 dequantisation and rounding, which a blockwise prelude's loads and stores call.
const Q8_WGSL: &str = include_str!("../../shaders/q8.wgsl");

/// The complete WGSL source for one element width and storage: the generated prelude, the
/// conversions (and, blockwise, q8's), then the family.
pub(crate) fn wgsl_source(width: Width, storage: &Storage) -> String {
    let q8 = if width == Width::Blocks { Q8_WGSL } else { "" };
    format!(
        "{}{STORAGE_WGSL}{q8}{ADAM_FAMILY_WGSL}",
        protocol::wgsl_prelude(width, storage)
    )
}

/// The override constants that pick one variant of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Variant {
    pub algorithm: crate::config::Algorithm,
    pub amsgrad: bool,
    pub maximize: bool,
    pub clip: bool,
    pub weight_decay: bool,
    pub workgroup_size: u32,
    pub segmented: bool,
    /// Before the per-element step (optimizer-wide): unscale, skip, clip the global norm.
    pub scale: bool,
    pub skip: bool,
    pub norm_clip: bool,
    /// Optimizer-wide storage dtypes and rounding (in the generated prelude).
    pub storage: Storage,
}

impl Variant {
    /// The one-tensor variant for these groups (which agree on algorithm, amsgrad and
    /// maximize).
    pub fn new(groups: &[Config], workgroup_size: u32) -> Self {
        Variant {
            algorithm: groups[0].algorithm,
            amsgrad: groups[0].amsgrad,
            maximize: groups[0].maximize,
            clip: groups.iter().any(|g| g.clip_gradient.is_some()),
            weight_decay: groups.iter().any(|g| g.weight_decay != 0.0),
            workgroup_size,
            segmented: false,
            scale: groups[0].loss_scale.is_some(),
            skip: groups[0].skips(),
            norm_clip: groups[0].max_grad_norm.is_some(),
            storage: Storage::new(&groups[0]),
        }
    }

    /// Whether an iteration runs the `grad_norm` and `finish` passes before the step.
    pub fn pre_step(&self) -> bool {
        self.scale || self.skip || self.norm_clip
    }

    /// The same variant for segmented dispatches: smaller workgroups (64 at most), so that
    /// fewer of them straddle a tensor boundary and take the search path.
    pub fn segmented(self) -> Self {
        Variant {
            workgroup_size: self.workgroup_size.min(64),
            segmented: true,
            ..self
        }
    }

    /// `(name, value)` pairs for `PipelineCompilationOptions::constants`.
    pub fn constants(&self) -> [(&'static str, f64); 10] {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        [
            ("ALGORITHM", protocol::algorithm_code(self.algorithm) as f64),
            ("AMSGRAD", flag(self.amsgrad)),
            ("MAXIMIZE", flag(self.maximize)),
            ("CLIP", flag(self.clip)),
            ("WEIGHT_DECAY", flag(self.weight_decay)),
            ("WORKGROUP_SIZE", self.workgroup_size as f64),
            ("SEGMENTED", flag(self.segmented)),
            ("SCALE", flag(self.scale)),
            ("SKIP", flag(self.skip)),
            ("NORM_CLIP", flag(self.norm_clip)),
        ]
    }

    /// A label that says which variant a pipeline or bind group is, for validation messages.
    pub fn label(&self, width: Width) -> String {
        let mut label = format!("wgpu-optim {:?}", self.algorithm).to_lowercase();
        for (on, name) in [
            (self.amsgrad, "amsgrad"),
            (self.maximize, "maximize"),
            (self.clip, "clip"),
            (self.weight_decay, "decay"),
            (self.segmented, "segmented"),
            (self.scale, "scale"),
            (self.skip, "skip"),
            (self.norm_clip, "norm-clip"),
        ] {
            if on {
                label += " ";
                label += name;
            }
        }
        let s = &self.storage;
        for (slot, name) in [
            (Slot::Param, "param"),
            (Slot::Grad, "grad"),
            (Slot::ExpAvg, "m"),
            (Slot::ExpAvgSq, "v"),
        ] {
            if s.dtype(slot) != crate::dtype::Dtype::F32 {
                label += &format!(" {name}:{}", s.dtype(slot).name());
            }
        }
        if s.master {
            label += " master";
        }
        if s.stochastic {
            label += " stochastic";
        }
        label
            + match width {
                Width::Vec4 => " vec4",
                Width::Vec2 => " vec2",
                Width::Scalar => " scalar",
                Width::Blocks => " blocks",
            }
    }
}

/// The pipelines of one variant: vec4 body or scalar tail, one tensor per dispatch or several
/// (`SEGMENTED`), all sharing one bind group layout.
pub(crate) struct Kernels {
    pub variant: Variant,
    layout: wgpu::BindGroupLayout,
    /// Indexed by [`Kernels::index`]; vec2 only with 16-bit storage.
    pipelines: Pipelines,
    /// With a pass before the step: `grad_norm` (indexed alike) and `finish`.
    pre_step: Option<(Pipelines, wgpu::ComputePipeline)>,
}

/// The `finish` pass's override constants: the optimizer-wide numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Finish {
    pub partials: u32,
    pub max_grad_norm: f32,
    pub dynamic: bool,
    pub growth: SplitFactor,
    pub backoff: SplitFactor,
    pub growth_interval: u32,
}

/// A factor f64 as the shader multiplies by it: `(hi + lo) * 2^exp`, `hi + lo` in [1, 2)
/// with `hi` its f32 rounding and `lo` the f32 of the rest (48 bits in all).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SplitFactor {
    pub hi: f32,
    pub lo: f32,
    pub exp: i32,
}

impl SplitFactor {
    pub fn new(factor: f64) -> Self {
        // factor = m * 2^exp with m in [1, 2), exactly (a power of two scales exactly).
        let exp = factor.log2().floor() as i32;
        let m = factor / 2f64.powi(exp);
        let (m, exp) = if m >= 2.0 {
            (m / 2.0, exp + 1)
        } else if m < 1.0 {
            (m * 2.0, exp - 1)
        } else {
            (m, exp)
        };
        let hi = m as f32;
        SplitFactor {
            hi,
            lo: (m - hi as f64) as f32,
            exp,
        }
    }
}

impl Finish {
    pub fn new(config: &Config, partials: u32) -> Self {
        let ls = config.loss_scale.unwrap_or_default();
        Finish {
            partials,
            max_grad_norm: config.max_grad_norm.unwrap_or(0.0) as f32,
            dynamic: config.loss_scale.is_some_and(|l| l.dynamic),
            growth: SplitFactor::new(ls.growth_factor),
            backoff: SplitFactor::new(ls.backoff_factor),
            growth_interval: ls.growth_interval.min(u32::MAX as u64) as u32,
        }
    }

    pub fn constants(&self) -> [(&'static str, f64); 10] {
        [
            ("PARTIALS", self.partials as f64),
            ("MAX_GRAD_NORM", self.max_grad_norm as f64),
            ("DYNAMIC", if self.dynamic { 1.0 } else { 0.0 }),
            ("GROWTH_HI", self.growth.hi as f64),
            ("GROWTH_LO", self.growth.lo as f64),
            ("GROWTH_EXP", self.growth.exp as f64),
            ("BACKOFF_HI", self.backoff.hi as f64),
            ("BACKOFF_LO", self.backoff.lo as f64),
            ("BACKOFF_EXP", self.backoff.exp as f64),
            ("GROWTH_INTERVAL", self.growth_interval as f64),
        ]
    }
}

/// Invocations of the `finish` pass's one workgroup.
pub(crate) const FINISH_WORKGROUP_SIZE: u32 = 256;

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("variant", &self.variant)
            .finish_non_exhaustive()
    }
}

impl Kernels {
    /// The pipelines of `variant`; `finish` is given when the variant has a pass before the
    /// step.
    pub fn new(device: &wgpu::Device, variant: Variant, finish: Option<Finish>) -> Self {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = BINDINGS
            .iter()
            .enumerate()
            .map(|(number, b)| wgpu::BindGroupLayoutEntry {
                binding: number as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b.kind {
                        BindingKind::Uniform { .. } => wgpu::BufferBindingType::Uniform,
                        BindingKind::Storage { read_only } => {
                            wgpu::BufferBindingType::Storage { read_only }
                        }
                    },
                    has_dynamic_offset: false,
                    min_binding_size: match b.kind {
                        BindingKind::Uniform { size } => NonZeroU64::new(size),
                        BindingKind::Storage { .. } => None,
                    },
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("wgpu-optim step bindings"),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("wgpu-optim step"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let widths = variant.storage.widths();
        let modules: Vec<(Width, wgpu::ShaderModule)> = widths
            .iter()
            .map(|&width| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&format!("wgpu-optim adam_family {width:?}")),
                    source: wgpu::ShaderSource::Wgsl(wgsl_source(width, &variant.storage).into()),
                });
                (width, module)
            })
            .collect();
        let module = |width: Width| {
            &modules
                .iter()
                .find(|(w, _)| *w == width)
                .expect("a module per width in use")
                .1
        };
        let build = |label: &str, width: Width, entry: &str, constants: &[(&str, f64)]| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: Some(&pipeline_layout),
                module: module(width),
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        };
        let family = |entry: &str| {
            let pipeline = |width: Width, segmented: bool| {
                let v = if segmented {
                    variant.segmented()
                } else {
                    variant
                };
                let label = format!("{} {entry}", v.label(width));
                build(&label, width, entry, &v.constants())
            };
            let mut pipelines: Pipelines = Default::default();
            for &width in widths {
                if width == Width::Blocks {
                    // One workgroup per block: its own entry point for the step, and its own
                    // workgroup size.
                    let v = Variant {
                        workgroup_size: BLOCK_INVOCATIONS,
                        ..variant
                    };
                    let entry = if entry == "step" {
                        "step_blocks"
                    } else {
                        entry
                    };
                    let label = format!("{} {entry}", v.label(width));
                    pipelines[Kernels::index(width, false)] =
                        Some(build(&label, width, entry, &v.constants()));
                    continue;
                }
                for segmented in [false, true] {
                    pipelines[Kernels::index(width, segmented)] = Some(pipeline(width, segmented));
                }
            }
            pipelines
        };
        let pre_step = finish.filter(|_| variant.pre_step()).map(|finish| {
            let v = Variant {
                workgroup_size: FINISH_WORKGROUP_SIZE,
                ..variant
            };
            let mut constants = v.constants().to_vec();
            constants.extend(finish.constants());
            // Any module has `finish` (it reads no per-element buffer): the first built.
            let label = format!("{} finish", v.label(widths[0]));
            (
                family("grad_norm"),
                build(&label, widths[0], "finish", &constants),
            )
        });
        Kernels {
            variant,
            pipelines: family("step"),
            pre_step,
            layout,
        }
    }

    pub fn index(width: Width, segmented: bool) -> usize {
        let w = match width {
            Width::Vec4 => 0,
            Width::Vec2 => 1,
            Width::Scalar => 2,
            Width::Blocks => return 6,
        };
        w + 3 * segmented as usize
    }
    /// The `grad_norm` pipeline of a dispatch, and `finish` (with a pass before the step).
    pub fn pre_step(&self) -> Option<(&Pipelines, &wgpu::ComputePipeline)> {
        self.pre_step.as_ref().map(|(norm, finish)| (norm, finish))
    }
}

/// A pipeline per width and segmentation, and the blockwise one ([`Kernels::index`]); `None`
/// for a width not built.
pub(crate) type Pipelines = [Option<wgpu::ComputePipeline>; 7];

/// A byte range of a buffer to bind.
#[derive(Clone, Debug)]
pub(crate) struct Range<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> Range<'a> {
    /// The whole of `buffer`.
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        Range {
            buffer,
            offset: 0,
            size: buffer.size(),
        }
    }
}

/// One dispatch's bind group: `ranges[slot as usize]` is bound at that slot's number, the
/// binding table's order. `label` names the tensor or span and the dispatch.
pub(crate) fn bind_group(
    device: &wgpu::Device,
    kernels: &Kernels,
    label: &str,
    ranges: &[Range; Slot::ALL.len()],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = Slot::ALL
        .iter()
        .map(|&slot| {
            let r = &ranges[slot as usize];
            wgpu::BindGroupEntry {
                binding: slot as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: r.buffer,
                    offset: r.offset,
                    size: NonZeroU64::new(r.size),
                }),
            }
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &kernels.layout,
        entries: &entries,
    })
}

/// Records one iteration. With a pass before the step: a compute pass of `grad_norm` over
/// every dispatch and `finish` (with `finish_bind_group`), a copy of the iteration's numbers
/// from `device_state` into the `iteration` uniform, then a pass of the step; else the step's
/// pass alone. `timestamp_writes`, if any, time from the first pass's start to the last's end
/// (the benchmark uses it).
pub(crate) fn record(
    encoder: &mut wgpu::CommandEncoder,
    kernels: &Kernels,
    dispatches: &[&Dispatch],
    (finish_bind_group, device_state, iteration): (&wgpu::BindGroup, &wgpu::Buffer, &wgpu::Buffer),
    timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
) {
    let step_timestamps;
    if let Some((norm, finish)) = kernels.pre_step() {
        let (first, last) = match timestamp_writes {
            Some(t) => (
                Some(wgpu::ComputePassTimestampWrites {
                    query_set: t.query_set,
                    beginning_of_pass_write_index: t.beginning_of_pass_write_index,
                    end_of_pass_write_index: None,
                }),
                Some(wgpu::ComputePassTimestampWrites {
                    query_set: t.query_set,
                    beginning_of_pass_write_index: None,
                    end_of_pass_write_index: t.end_of_pass_write_index,
                }),
            ),
            None => (None, None),
        };
        step_timestamps = last;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("wgpu-optim grad norm"),
            timestamp_writes: first,
        });
        dispatch_all(&mut pass, norm, dispatches, |d| d.norm_grid);
        pass.set_pipeline(finish);
        pass.set_bind_group(0, finish_bind_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        drop(pass);
        encoder.copy_buffer_to_buffer(device_state, 0, iteration, 0, ITERATION_BYTES);
    } else {
        step_timestamps = timestamp_writes;
    }
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("wgpu-optim step"),
        timestamp_writes: step_timestamps,
    });
    dispatch_all(&mut pass, &kernels.pipelines, dispatches, |d| d.grid);
}

/// Every dispatch with its width's and segmentation's pipeline of `pipelines`.
fn dispatch_all(
    pass: &mut wgpu::ComputePass,
    pipelines: &Pipelines,
    dispatches: &[&Dispatch],
    grid: impl Fn(&Dispatch) -> [u32; 2],
) {
    let mut current = None;
    for d in dispatches {
        let index = Kernels::index(d.width, d.segmented);
        if current != Some(index) {
            // The planner makes vec2 dispatches only with 16-bit storage, whose kernels have
            // them (`plan::check`).
            let pipeline = pipelines[index]
                .as_ref()
                .expect("a pipeline for each width planned");
            pass.set_pipeline(pipeline);
            current = Some(index);
        }
        pass.set_bind_group(0, &d.bind_group, &[]);
        let [x, y] = grid(d);
        pass.dispatch_workgroups(x, y, 1);
    }
}

/// One recorded dispatch of a step.
pub(crate) struct Dispatch {
    pub width: Width,
    pub segmented: bool,
    pub bind_group: wgpu::BindGroup,
    pub grid: [u32; 2],
    /// The `grad_norm` pass's grid: one workgroup per NORM_BLOCKS of the step's.
    pub norm_grid: [u32; 2],
}

/// Workgroups for `units` invocations: x up to `max_per_dim`, the rest in y.
pub fn workgroup_grid(units: u64, workgroup_size: u32, max_per_dim: u32) -> [u32; 2] {
    let groups = units.div_ceil(workgroup_size as u64);
    let x = groups.min(max_per_dim as u64).max(1);
    [x as u32, groups.div_ceil(x) as u32]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_spills_into_y_past_the_dimension_limit() {
        assert_eq!(workgroup_grid(0, 64, 65535), [1, 0]);
        assert_eq!(workgroup_grid(1, 64, 65535), [1, 1]);
        assert_eq!(workgroup_grid(64 * 65535, 64, 65535), [65535, 1]);
        assert_eq!(workgroup_grid(64 * 65535 + 1, 64, 65535), [65535, 2]);
        // Every unit is covered, and by fewer than one extra row of workgroups.
        for units in [1u64, 255, 256, 257, 1 << 24, (1 << 30) + 3] {
            let [x, y] = workgroup_grid(units, 16, 65535);
            let covered = x as u64 * y as u64 * 16;
            assert!(
                covered >= units && covered - units < x as u64 * 16,
                "{units}"
            );
            assert!(x <= 65535 && y <= 65535);
        }
    }

    #[test]
    fn split_factors_hold_48_bits_of_the_factor() {
        for factor in [2.0, 0.5, 0.4, 1000.0, 1.0001, 3e10, 1e-20, 1.5, 0.999] {
            let f = SplitFactor::new(factor);
            assert!((1.0..2.0).contains(&f.hi) || f.hi == 2.0, "{factor}: {f:?}");
            let back = (f.hi as f64 + f.lo as f64) * 2f64.powi(f.exp);
            assert!((back - factor).abs() <= 1e-14 * factor, "{factor}: {back}");
            assert!(
                (f.lo as f64).abs() <= f.hi as f64 * 2f64.powi(-23),
                "{factor}: {f:?}"
            );
        }
    }
}
