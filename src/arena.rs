//! An arena: one flat parameter buffer and one flat gradient buffer for a list of tensors,
//! allocated by the library for an engine that has no flat buffers of its own.
//!
//! Owns: the layout of tensors in the arena. May not touch the optimizer's state or plan.

use crate::dtype::Dtype;
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
    /// Elements in each buffer (the last tensor's end).
    len: u64,
}

impl Arena {
    /// Lays out `(name, len, group)` tensors in order. The buffers have `STORAGE`,
    /// `COPY_DST` and `COPY_SRC` usage and start zeroed.
    pub fn new(device: &wgpu::Device, tensors: &[(&str, u64, usize)]) -> Result<Self> {
        Self::with_dtypes(device, tensors, Dtype::F32, Dtype::F32)
    }

    /// [`Arena::new`] with parameters and gradients stored as `param_dtype` and `grad_dtype`
    /// (the config's): 16-bit values two to a word, each tensor starting on a word (its
    /// offset, a multiple of the granularity, is even).
    pub fn with_dtypes(
        device: &wgpu::Device,
        tensors: &[(&str, u64, usize)],
        param_dtype: Dtype,
        grad_dtype: Dtype,
    ) -> Result<Self> {
        for (key, dtype) in [("param_dtype", param_dtype), ("grad_dtype", grad_dtype)] {
            if dtype == Dtype::Q8 {
                return Err(Error::InvalidOption {
                    name: key,
                    value: "q8".into(),
                    expected: "f32, bf16 or f16 for the engine's buffers".into(),
                });
            }
        }
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
        let bytes = |dtype: Dtype| (end * dtype.bytes()).next_multiple_of(4);
        let need = bytes(param_dtype).max(bytes(grad_dtype));
        if need > max {
            return Err(Error::DeviceLimit {
                limit: "max_buffer_size",
                have: max,
                need,
                context: " for the arena (request the adapter's limits)".into(),
            });
        }
        gpu::create_scoped(device, "the arena's buffers", || {
            Ok(Arena {
                param: gpu::engine_buffer(device, "wgpu-optim arena params", bytes(param_dtype)),
                grad: gpu::engine_buffer(device, "wgpu-optim arena grads", bytes(grad_dtype)),
                tensors,
                len: end,
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
            BufferView::new(&self.param, 0, self.len),
            BufferView::new(&self.grad, 0, self.len),
            self.tensors.clone(),
        )
    }
}
