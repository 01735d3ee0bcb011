//! What the engine hands the optimizer (views of its buffers, parameters, flat buffers,
//! options), and the checks that turn it into validated spans for the planner: usages,
//! lengths, bounds, overlaps, groups and the device limits the step needs.
//!
//! Owns: every refusal of the user's layout. May not touch the device beyond reading its
//! limits and the buffers' sizes and usages (no creation, no recording).

use crate::config::Config;
use crate::dtype::q8;
use crate::error::{Error, Result};
use crate::plan::{self, Segment};
use crate::protocol::Storage;
use crate::protocol::{BINDINGS, BindingKind, HINTS_BYTES, MAX_GROUPS};

/// A range of elements in a user's buffer: `len` elements starting `offset` elements in, in
/// the dtype the config gives the buffer (`param_dtype` / `grad_dtype`; f32 by default).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BufferView {
    pub buffer: wgpu::Buffer,
    /// In elements of the buffer's dtype, from the start of the buffer.
    pub offset: u64,
    /// In elements of the buffer's dtype.
    pub len: u64,
}

impl BufferView {
    /// `len` elements of `buffer`, starting `offset` elements in.
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
#[non_exhaustive]
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

    /// Puts the parameter in group `group` (an index into the optimizer's groups).
    pub fn in_group(mut self, group: usize) -> Self {
        self.group = group;
        self
    }
}

/// One tensor of a flat buffer: `len` elements at `offset` (in elements, from the start of the
/// flat views), in parameter group `group`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlatTensor {
    pub name: String,
    pub offset: u64,
    pub len: u64,
    pub group: usize,
}

impl FlatTensor {
    /// `len` elements at `offset`, in group 0.
    pub fn new(name: impl Into<String>, offset: u64, len: u64) -> Self {
        FlatTensor {
            name: name.into(),
            offset,
            len,
            group: 0,
        }
    }

    /// Puts the tensor in group `group` (an index into the optimizer's groups).
    pub fn in_group(mut self, group: usize) -> Self {
        self.group = group;
        self
    }
}

/// Many tensors in one parameter view and one gradient view with the same layout: updated by
/// one dispatch per binding-size chunk. Elements that belong to no tensor are never written.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FlatParameters {
    pub param: BufferView,
    pub grad: BufferView,
    pub tensors: Vec<FlatTensor>,
}

impl FlatParameters {
    /// The tensors `tensors` laid out alike in the views `param` and `grad` (offsets are
    /// relative to the views' starts).
    pub fn new(param: BufferView, grad: BufferView, tensors: Vec<FlatTensor>) -> Self {
        FlatParameters {
            param,
            grad,
            tensors,
        }
    }
}

/// Knobs that change how the step is dispatched, never what it computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OptimizerOptions {
    /// Invocations per workgroup. Default 256. (With q8 state the step goes block by block,
    /// 64 invocations per 256-element block, whatever this says.)
    pub workgroup_size: u32,
    /// Elements bound per dispatch. `None`: as many as the device's
    /// `max_storage_buffer_binding_size` allows. A value must be a positive multiple of
    /// [`crate::Optimizer::chunk_granularity_for`] the config (with f32 storage
    /// [`crate::Optimizer::chunk_granularity`]) and no larger than the default.
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

impl OptimizerOptions {
    /// Invocations per workgroup (default 256).
    pub fn workgroup_size(mut self, workgroup_size: u32) -> Self {
        self.workgroup_size = workgroup_size;
        self
    }

    /// Elements bound per dispatch (default: as many as the device allows).
    pub fn chunk_elements(mut self, chunk_elements: Option<u64>) -> Self {
        self.chunk_elements = chunk_elements;
        self
    }
}

/// What the optimizer tells about one of its tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TensorInfo {
    /// As given (a PyTorch state-dict name).
    pub name: String,
    /// Elements (f32).
    pub len: u64,
    /// Its parameter group.
    pub group: usize,
}

/// A contiguous range of param and grad elements and the tensors in it, validated: what the
/// planner plans and the optimizer binds. `name` labels its state and bind groups.
pub(crate) struct SpanInput {
    pub name: String,
    pub param: BufferView,
    pub grad: BufferView,
    /// Sorted, disjoint, non-empty, inside the views.
    pub segments: Vec<Segment>,
}

/// Where a tensor's state lives: its span, its first element in the span, and (for q8
/// state) its first block in the span's q8 buffers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Location {
    pub span: usize,
    pub offset: u64,
    pub block: u64,
}

/// The validated spans, and every tensor with where its state lives.
pub(crate) type Spans = (Vec<SpanInput>, Vec<(TensorInfo, Location)>);

/// Validates every parameter and flat buffer against `groups` groups and turns them into
/// spans: a parameter in its own buffers is a span of one segment, a flat buffer one span of
/// many. Tensors are numbered `parameters` first, then each flat buffer's tensors in order.
pub(crate) fn spans(
    groups: usize,
    storage: &Storage,
    parameters: &[Parameter],
    flats: &[FlatParameters],
) -> Result<Spans> {
    let mut spans = Vec::new();
    let mut tensors = Vec::new();
    // With 16-bit storage every view and tensor starts on a word (an even element).
    let on_word = |tensor: &str, which: &'static str, offset: u64| {
        if !storage.pairs() || offset.is_multiple_of(2) {
            return Ok(());
        }
        Err(Error::Misaligned {
            tensor: tensor.to_string(),
            which,
            offset,
            dtypes: format!(
                "param {}, grad {}, exp_avg {}, exp_avg_sq {}",
                storage.param.name(),
                storage.grad.name(),
                storage.exp_avg.name(),
                storage.exp_avg_sq.name()
            ),
        })
    };
    for p in parameters {
        check_views(&p.name, &p.param, &p.grad, storage)?;
        on_word(&p.name, "param view", p.param.offset)?;
        on_word(&p.name, "grad view", p.grad.offset)?;
        check_group(&p.name, p.group, groups)?;
        let location = Location {
            span: spans.len(),
            offset: 0,
            block: 0,
        };
        tensors.push((info(&p.name, p.param.len, p.group), location));
        let segment = Segment {
            start: 0,
            end: p.param.len,
            group: p.group as u32,
        };
        spans.push(SpanInput {
            name: p.name.clone(),
            param: p.param.clone(),
            grad: p.grad.clone(),
            segments: if p.param.len > 0 {
                vec![segment]
            } else {
                vec![]
            },
        });
    }
    for (k, flat) in flats.iter().enumerate() {
        let name = format!("flat #{k}");
        check_views(&name, &flat.param, &flat.grad, storage)?;
        on_word(&name, "param view", flat.param.offset)?;
        on_word(&name, "grad view", flat.grad.offset)?;
        let mut segments = Vec::new();
        for t in &flat.tensors {
            check_group(&t.name, t.group, groups)?;
            if t.len > 0 {
                on_word(&t.name, "tensor", t.offset)?;
            }
            if t.offset
                .checked_add(t.len)
                .is_none_or(|end| end > flat.param.len)
            {
                return Err(Error::OutOfBounds {
                    tensor: t.name.clone(),
                    which: "flat",
                    offset: t.offset,
                    len: t.len,
                    buffer_bytes: flat.param.len * storage.param.bytes(),
                });
            }
            let location = Location {
                span: spans.len(),
                offset: t.offset,
                block: 0, // numbered below, once the segments are sorted
            };
            tensors.push((info(&t.name, t.len, t.group), location));
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
        spans.push(SpanInput {
            name,
            param: flat.param.clone(),
            grad: flat.grad.clone(),
            segments,
        });
    }
    // A tensor's q8 blocks follow those of the tensors before it in its span.
    for (_, at) in &mut tensors {
        at.block = spans[at.span]
            .segments
            .iter()
            .filter(|s| s.start < at.offset)
            .map(|s| q8::blocks(s.end - s.start))
            .sum();
    }
    Ok((spans, tensors))
}

fn info(name: &str, len: u64, group: usize) -> TensorInfo {
    TensorInfo {
        name: name.to_string(),
        len,
        group,
    }
}

/// Binding offsets are multiples of this (and of 16, so that vec4 views stay aligned).
pub(crate) fn storage_alignment(limits: &wgpu::Limits) -> u64 {
    (limits.min_storage_buffer_offset_alignment as u64).max(16)
}

/// Elements per chunk: `options.chunk_elements` or the most a binding holds, a multiple of
/// the granularity for buffers of `min_bytes` per element.
pub(crate) fn chunk_len(
    limits: &wgpu::Limits,
    options: OptimizerOptions,
    storage: &Storage,
) -> Result<u64> {
    let align = storage_alignment(limits);
    let granularity = plan::chunk_unit(align, storage);
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
pub(crate) fn check_groups(groups: &[Config]) -> Result<()> {
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
            // Optimizer-wide keys (docs/semantics.md): one value for every group.
            ("loss_scale", g.loss_scale != first.loss_scale),
            ("skip_nonfinite", g.skip_nonfinite != first.skip_nonfinite),
            ("max_grad_norm", g.max_grad_norm != first.max_grad_norm),
            ("param_dtype", g.param_dtype != first.param_dtype),
            ("grad_dtype", g.grad_dtype != first.grad_dtype),
            ("exp_avg_dtype", g.exp_avg_dtype != first.exp_avg_dtype),
            (
                "exp_avg_sq_dtype",
                g.exp_avg_sq_dtype != first.exp_avg_sq_dtype,
            ),
            ("master_weights", g.master_weights != first.master_weights),
            ("rounding", g.rounding != first.rounding),
            ("seed", g.seed != first.seed),
        ];
        if let Some((key, _)) = differs.iter().find(|(_, d)| *d) {
            return Err(Error::GroupMismatch { group: i, key });
        }
    }
    Ok(())
}

pub(crate) fn check_group(tensor: &str, group: usize, groups: usize) -> Result<()> {
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

pub(crate) fn check_limits(limits: &wgpu::Limits, workgroup_size: u32) -> Result<()> {
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
    // Every binding of the step's table is bound in every dispatch.
    let count = |storage: bool| {
        BINDINGS
            .iter()
            .filter(|b| matches!(b.kind, BindingKind::Storage { .. }) == storage)
            .count() as u64
    };
    need(
        "max_storage_buffers_per_shader_stage",
        limits.max_storage_buffers_per_shader_stage as u64,
        count(true),
    )?;
    need(
        "max_uniform_buffers_per_shader_stage",
        limits.max_uniform_buffers_per_shader_stage as u64,
        count(false),
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
fn check_views(name: &str, param: &BufferView, grad: &BufferView, storage: &Storage) -> Result<()> {
    let tensor = || name.to_string();
    if param.len != grad.len {
        return Err(Error::LengthMismatch {
            tensor: tensor(),
            param: param.len,
            grad: grad.len,
        });
    }
    for (which, view, dtype) in [
        ("param", &param, storage.param),
        ("grad", &grad, storage.grad),
    ] {
        let usage = view.buffer.usage();
        if !usage.contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::MissingUsage {
                tensor: tensor(),
                which,
                needed: "STORAGE",
                has: format!("{usage:?}"),
            });
        }
        // In bytes, to the end of the last element's word (a 16-bit value is loaded and
        // stored with the other half of its word).
        let end = view
            .offset
            .checked_add(view.len)
            .and_then(|e| e.checked_mul(dtype.bytes()))
            .map(|e| e.next_multiple_of(4));
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
