//! The optimizer state on the GPU: buffers with PyTorch's names, allocated and owned here.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels;
use crate::reference::TensorState;

/// The state buffers of one parameter tensor: f32, one element per parameter element.
pub struct StateBuffers {
    pub exp_avg: wgpu::Buffer,
    pub exp_avg_sq: wgpu::Buffer,
    /// Only with `amsgrad`.
    pub max_exp_avg_sq: Option<wgpu::Buffer>,
}

impl StateBuffers {
    /// The initial state: `m = 0`, `v = initial_accumulator`, `vmax = 0`.
    pub fn new(device: &wgpu::Device, config: &Config, name: &str, len: u64) -> Self {
        let label = |state: &str| format!("wgpu-optim {state}.{name}");
        StateBuffers {
            exp_avg: kernels::state_buffer(device, &label("exp_avg"), len, 0.0),
            exp_avg_sq: kernels::state_buffer(
                device,
                &label("exp_avg_sq"),
                len,
                config.initial_accumulator as f32,
            ),
            max_exp_avg_sq: config
                .amsgrad
                .then(|| kernels::state_buffer(device, &label("max_exp_avg_sq"), len, 0.0)),
        }
    }

    /// Copies `len` elements of the state from element `offset` back to the host. The copies
    /// are submitted now; the future resolves once the device has been polled past them.
    pub fn read(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<TensorState>> + use<> {
        let read = |b| kernels::read_f32(device, queue, b, offset * 4, len);
        let exp_avg = read(&self.exp_avg);
        let exp_avg_sq = read(&self.exp_avg_sq);
        let max_exp_avg_sq = self.max_exp_avg_sq.as_ref().map(read);
        async move {
            let max_exp_avg_sq = match max_exp_avg_sq {
                Some(f) => Some(f.await.map_err(Error::Readback)?),
                None => None,
            };
            Ok(TensorState {
                exp_avg: exp_avg.await.map_err(Error::Readback)?,
                exp_avg_sq: exp_avg_sq.await.map_err(Error::Readback)?,
                max_exp_avg_sq,
            })
        }
    }

    /// Overwrites the state from element `offset` with `state` through `queue` (the writes land before the work
    /// of the next submit). The caller has checked the lengths; an absent `max_exp_avg_sq` on
    /// either side is skipped.
    pub(crate) fn write(&self, queue: &wgpu::Queue, offset: u64, state: &TensorState) {
        let write = |buffer: &wgpu::Buffer, data: &[f32]| {
            if !data.is_empty() {
                queue.write_buffer(buffer, offset * 4, bytemuck::cast_slice(data));
            }
        };
        write(&self.exp_avg, &state.exp_avg);
        write(&self.exp_avg_sq, &state.exp_avg_sq);
        if let (Some(buffer), Some(data)) = (&self.max_exp_avg_sq, &state.max_exp_avg_sq) {
            write(buffer, data);
        }
    }
}
