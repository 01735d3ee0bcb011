//! The optimizer state on the GPU: buffers with PyTorch's names, allocated and owned here, and
//! the optimizer's state I/O (read back, restore, the step counter).
//!
//! Owns: the state buffers and every copy in or out of them. May not plan or record steps.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gpu;
use crate::optimizer::Optimizer;
use crate::protocol::DeviceScalars;
use crate::reference::TensorState;

/// The state buffers of one parameter tensor (or of a flat buffer's tensors, at their
/// offsets): f32, one element per parameter element.
#[derive(Debug)]
#[non_exhaustive]
pub struct StateBuffers {
    pub exp_avg: wgpu::Buffer,
    pub exp_avg_sq: wgpu::Buffer,
    /// Only with `amsgrad`.
    pub max_exp_avg_sq: Option<wgpu::Buffer>,
}

impl StateBuffers {
    /// The initial state: `m = 0`, `v = initial_accumulator`, `vmax = 0`.
    pub(crate) fn new(device: &wgpu::Device, config: &Config, name: &str, len: u64) -> Self {
        let label = |state: &str| format!("wgpu-optim {state}.{name}");
        StateBuffers {
            exp_avg: gpu::state_buffer(device, &label("exp_avg"), len, 0.0),
            exp_avg_sq: gpu::state_buffer(
                device,
                &label("exp_avg_sq"),
                len,
                config.initial_accumulator as f32,
            ),
            max_exp_avg_sq: config
                .amsgrad
                .then(|| gpu::state_buffer(device, &label("max_exp_avg_sq"), len, 0.0)),
        }
    }

    /// Copies `len` elements of the state from element `offset` back to the host. The copies
    /// are submitted now; the future resolves once the device has been polled past them.
    pub(crate) fn read(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<TensorState>> + use<> {
        let read = |b| gpu::read_f32(device, queue, b, offset * 4, len);
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

/// The optimizer-wide numbers of the last iteration, as the device holds them
/// ([`Optimizer::read_status`]).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct IterationStatus {
    /// t: the steps applied so far (skipped iterations do not count).
    pub applied_steps: u64,
    /// The loss scale S for the next iteration (1 without `loss_scale`).
    pub loss_scale: f32,
    /// Iterations in a row without overflow since S last moved.
    pub growth_tracker: u32,
    /// Whether the last iteration's gradient held a NaN or an infinity (and was skipped).
    pub found_inf: bool,
    /// The global L2 norm of the last iteration's unscaled gradient (0 without a pass before
    /// the step: without `loss_scale`, `skip_nonfinite` and `max_grad_norm`).
    pub global_norm: f32,
}

impl Optimizer {
    /// Copies the optimizer-wide numbers of the last submitted iteration back to the host
    /// (the copy is submitted at once; the future resolves when the device is polled past it):
    /// for logging, without stalling the GPU. Without a pass before the step, `applied_steps`
    /// is the recorded steps and the rest their neutral values.
    pub fn read_status(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
    ) -> impl Future<Output = Result<IterationStatus>> + use<> {
        let words = (size_of::<DeviceScalars>() / 4) as u64;
        let read = gpu::read_f32(device, queue, &self.device_state, 0, words);
        let pre_step = self.groups()[0].has_pre_step();
        let recorded = self.step;
        async move {
            let data = read.await.map_err(Error::Readback)?;
            let s: DeviceScalars = bytemuck::pod_read_unaligned(bytemuck::cast_slice(&data));
            Ok(IterationStatus {
                applied_steps: if pre_step { s.step as u64 } else { recorded },
                loss_scale: s.loss_scale,
                growth_tracker: s.growth_tracker,
                found_inf: s.found_inf != 0,
                global_norm: s.global_norm,
            })
        }
    }

    /// [`Optimizer::read_status`], waiting on the device.
    pub fn read_status_blocking(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
    ) -> Result<IterationStatus> {
        let future = self.read_status(device, queue);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Readback(e.to_string()))?;
        pollster::block_on(future)
    }

    /// Restores the optimizer-wide numbers on the device (t, S and its growth tracker), as a
    /// checkpoint saved them; the write lands before the next submit's work.
    pub(crate) fn restore_iteration(
        &self,
        queue: &wgpu::Queue,
        applied_steps: u64,
        loss_scale: f32,
        growth_tracker: u32,
    ) {
        let inv_scale = (1.0 / loss_scale as f64) as f32;
        let scalars = DeviceScalars {
            loss_scale,
            inv_scale,
            step_inv_scale: inv_scale,
            clip_coef: 1.0,
            global_norm: 0.0,
            step: applied_steps as u32,
            found_inf: 0,
            growth_tracker,
        };
        let bytes = crate::optimizer::iteration_bytes(&scalars);
        queue.write_buffer(&self.device_state, 0, &bytes);
        queue.write_buffer(&self.iteration, 0, &bytes);
    }

    /// The buffer that holds the loss scale S, an f32 at byte 0 (bind `0..4` as
    /// `var<storage, read> scale: f32`): the engine multiplies its loss by it in its own kernel,
    /// with no trip to the host. It moves in each iteration's `finish` pass.
    pub fn loss_scale_buffer(&self) -> &wgpu::Buffer {
        &self.device_state
    }
}

// Reading and restoring the state of an optimizer's tensors: `checkpoint` builds on these, and
// an engine with a checkpoint format of its own uses them directly (`load_state` for each
// tensor, then `set_step_count`).
impl Optimizer {
    /// The state buffers that hold tensor `index`, and the element offset of its state in them,
    /// for an engine that reads them itself.
    pub fn state_buffers(&self, index: usize) -> Result<(&StateBuffers, u64)> {
        let (_, at) = self.tensor(index)?;
        Ok((&self.spans[at.span].state, at.offset))
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
        let read = self.tensor(index).map(|(t, at)| {
            self.spans[at.span]
                .state
                .read(device, queue, at.offset, t.len)
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
        let (tensor, at) = self.tensor(index)?;
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
        self.spans[at.span].state.write(queue, at.offset, state);
        Ok(())
    }

    /// Sets the iteration counter: the next iteration is `step + 1` (its schedules' value, and
    /// without skipping its bias correction, use it; with skipping, a checkpoint restores the
    /// device's t beside it).
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }
}
