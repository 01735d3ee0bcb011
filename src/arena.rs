//! An arena: one flat parameter buffer and one flat gradient buffer for a list of tensors,
//! allocated by the library for an engine that has no flat buffers of its own.
//!
//! Owns: the layout of tensors in the arena. May not touch the optimizer's state or plan.

use crate::error::{Error, Result};
use crate::gpu;
use crate::params::{self, BufferView, FlatParameters, FlatTensor};
use crate::plan;

/// A flat parameter buffer and a gradient buffer with the same layout, allocated for a list of
/// tensors: each tensor starts at a multiple of [`crate::Optimizer::chunk_granularity`] elements, so
/// that its views can also be bound on their own (`min_storage_buffer_offset_alignment`).
#[derive(Debug)]
pub struct Arena {
    pub param: wgpu::Buffer,
    pub grad: wgpu::Buffer,
    tensors: Vec<FlatTensor>,
}

impl Arena {
    /// Lays out `(name, len, group)` tensors in order. The buffers have `STORAGE`,
    /// `COPY_DST` and `COPY_SRC` usage and start zeroed.
    pub fn new(device: &wgpu::Device, tensors: &[(&str, u64, usize)]) -> Result<Self> {
        let align = plan::granularity(params::storage_alignment(&device.limits()), 4);
        let mut end = 0u64;
        let tensors: Vec<FlatTensor> = tensors
            .iter()
            .map(|&(name, len, group)| {
                let offset = end.next_multiple_of(align);
                end = offset + len;
                FlatTensor::new(name, offset, len).in_group(group)
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
        let buffer = |label| gpu::engine_buffer(device, label, end * 4);
        gpu::create_scoped(device, "the arena's buffers", || {
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

    /// The arena as flat parameters, for [`crate::Optimizer::with_groups`].
    pub fn flat(&self) -> FlatParameters {
        FlatParameters::new(
            BufferView::whole(&self.param),
            BufferView::whole(&self.grad),
            self.tensors.clone(),
        )
    }
}
