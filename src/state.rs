//! The optimizer state on the GPU: buffers with PyTorch's names, allocated and owned here, and
//! the optimizer's state I/O (read back, restore, the step counter).
//!
//! Owns: the state buffers and every copy in or out of them. May not plan or record steps.

use crate::config::Config;
use crate::dtype::{self, Dtype, q8};
use crate::error::{Error, Result};
use crate::gpu;
use crate::optimizer::Optimizer;
use crate::params::{Location, TensorInfo};
use crate::protocol::DeviceScalars;
use crate::reference::TensorState;

/// The state buffers of one parameter tensor (or of a flat buffer's tensors, at their
/// offsets): one element per parameter element, each buffer in its dtype (f32, or bf16 / f16
/// two to a 32-bit word, low half first).
#[derive(Debug)]
#[non_exhaustive]
pub struct StateBuffers {
    pub exp_avg: wgpu::Buffer,
    pub exp_avg_sq: wgpu::Buffer,
    /// Only with `amsgrad` (in `exp_avg_sq`'s dtype).
    pub max_exp_avg_sq: Option<wgpu::Buffer>,
    /// Only with master weights (16-bit parameters and `master_weights`): f32.
    pub master_param: Option<wgpu::Buffer>,
    pub exp_avg_dtype: Dtype,
    pub exp_avg_sq_dtype: Dtype,
}

impl StateBuffers {
    /// The initial state: `m = 0`, `v = initial_accumulator`, `vmax = 0`, master weights 0
    /// (the first step starts them from the parameters).
    /// `len` elements of the span, `blocks` q8 blocks (its tensors').
    pub(crate) fn new(
        device: &wgpu::Device,
        config: &Config,
        name: &str,
        len: u64,
        blocks: u64,
    ) -> Self {
        let (m, v) = (config.exp_avg_dtype, config.exp_avg_sq_dtype);
        let buffer = |state: &str, dtype: Dtype, fill: f32| {
            let label = format!("wgpu-optim {state}.{name}");
            if dtype == Dtype::Q8 {
                // Every element `fill`: each block's absmax is |fill|, its codes fill's.
                let map = q8::Map::for_state(state);
                let absmax = fill.abs();
                let code = map.code(fill, absmax) as u32;
                gpu::q8_state_buffer(device, &label, blocks, absmax, code * 0x0101_0101)
            } else {
                gpu::state_buffer(device, &label, dtype, len, fill)
            }
        };
        let v0 = config.initial_accumulator as f32;
        StateBuffers {
            exp_avg: buffer("exp_avg", m, 0.0),
            exp_avg_sq: buffer("exp_avg_sq", v, v0),
            max_exp_avg_sq: config.amsgrad.then(|| buffer("max_exp_avg_sq", v, 0.0)),
            master_param: config
                .keeps_master()
                .then(|| buffer("master_param", Dtype::F32, 0.0)),
            exp_avg_dtype: m,
            exp_avg_sq_dtype: v,
        }
    }

    /// Each buffer with its dtype and state name: exp_avg, exp_avg_sq, max_exp_avg_sq,
    /// master_param.
    fn buffers(&self) -> [(Option<&wgpu::Buffer>, Dtype, &'static str); 4] {
        [
            (Some(&self.exp_avg), self.exp_avg_dtype, "exp_avg"),
            (Some(&self.exp_avg_sq), self.exp_avg_sq_dtype, "exp_avg_sq"),
            (
                self.max_exp_avg_sq.as_ref(),
                self.exp_avg_sq_dtype,
                "max_exp_avg_sq",
            ),
            (self.master_param.as_ref(), Dtype::F32, "master_param"),
        ]
    }

    /// Copies the state of a tensor back to the host, widened to f32 (q8 dequantised): `len`
    /// elements from element `offset`, and for q8 its blocks from block `block`. The copies
    /// are submitted now; the future resolves once the device has been polled past them.
    pub(crate) fn read(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        (offset, block): (u64, u64),
        len: u64,
    ) -> impl Future<Output = Result<TensorState>> + use<> {
        let reads = self.buffers().map(|(buffer, dtype, name)| {
            buffer.map(|b| {
                // Whole words: a 16-bit range may start or end inside one.
                let (first, words) = word_range(dtype, (offset, block), len);
                (
                    gpu::read_f32(device, queue, b, first * 4, words),
                    dtype,
                    name,
                )
            })
        });
        let skip = move |dtype: Dtype| (offset * dtype.bytes() % 4 / dtype.bytes()) as usize;
        async move {
            let mut out = Vec::new();
            for read in reads {
                out.push(match read {
                    Some((future, dtype, name)) => {
                        let words = future.await.map_err(Error::Readback)?;
                        Some(if dtype == Dtype::Q8 {
                            let words: &[u32] = bytemuck::cast_slice(&words);
                            q8::Map::for_state(name).decode(words, len as usize)
                        } else {
                            decode(dtype, &words, skip(dtype), len as usize)
                        })
                    }
                    None => None,
                });
            }
            let [exp_avg, exp_avg_sq, max_exp_avg_sq, master_param] =
                <[Option<Vec<f32>>; 4]>::try_from(out).expect("four buffers");
            Ok(TensorState {
                exp_avg: exp_avg.unwrap_or_default(),
                exp_avg_sq: exp_avg_sq.unwrap_or_default(),
                max_exp_avg_sq,
                master_param,
            })
        }
    }

    /// Overwrites the state of a tensor (from element `offset`, q8 from block `block`) with
    /// `state`, rounded to each buffer's dtype, through `queue` (the writes land before the
    /// work of the next submit). The caller has checked the lengths; an absent
    /// `max_exp_avg_sq` or `master_param` on either side is skipped. A 16-bit range starts on
    /// a word (tensors do, `params.rs`); a last odd element's word gets a 0 in its other half,
    /// which no tensor owns.
    pub(crate) fn write(
        &self,
        queue: &wgpu::Queue,
        (offset, block): (u64, u64),
        state: &TensorState,
    ) {
        let data = [
            Some(&state.exp_avg),
            Some(&state.exp_avg_sq),
            state.max_exp_avg_sq.as_ref(),
            state.master_param.as_ref(),
        ];
        for ((buffer, dtype, name), data) in self.buffers().into_iter().zip(data) {
            if let (Some(buffer), Some(data)) = (buffer, data)
                && !data.is_empty()
            {
                if dtype == Dtype::Q8 {
                    let words = q8::Map::for_state(name).encode(data);
                    let at = block * q8::BLOCK_WORDS as u64 * 4;
                    queue.write_buffer(buffer, at, bytemuck::cast_slice(&words));
                } else {
                    queue.write_buffer(buffer, offset * dtype.bytes(), &encode(dtype, data));
                }
            }
        }
    }
}

/// The 32-bit words that hold elements `offset..offset + len` of `dtype` (for q8, the blocks
/// of those elements from block `block`): (first, count).
fn word_range(dtype: Dtype, (offset, block): (u64, u64), len: u64) -> (u64, u64) {
    if dtype == Dtype::Q8 {
        let words = q8::BLOCK_WORDS as u64;
        return (block * words, q8::blocks(len) * words);
    }
    let bytes = dtype.bytes();
    let first = offset * bytes / 4;
    let end = ((offset + len) * bytes).div_ceil(4);
    (first, end - first)
}

/// `data` as `dtype` stores it (rounded to nearest), padded to whole words.
pub(crate) fn encode(dtype: Dtype, data: &[f32]) -> Vec<u8> {
    let mut out = dtype::to_bytes(dtype, data);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

/// `len` values of `dtype` from `words` (read as f32 words), skipping the first `skip`.
pub(crate) fn decode(dtype: Dtype, words: &[f32], skip: usize, len: usize) -> Vec<f32> {
    let bytes: &[u8] = bytemuck::cast_slice(words);
    let start = skip * dtype.bytes() as usize;
    let end = start + len * dtype.bytes() as usize;
    dtype::from_bytes(dtype, &bytes[start..end])
}

/// One tensor's q8 state as its buffer holds it: the quantisation map's name, each block's
/// absmax and each element's code. Element `i` is stored as
/// `f32(map.values[codes[i]] * absmax[i / 256])` ([`q8::Map::value`]); the codes and absmax are
/// what a bit-exact checkpoint keeps, since quantising the dequantised values again need not
/// give them back (module docs of [`q8`]). See [`Optimizer::read_q8_state`] and
/// [`Optimizer::load_q8_state`].
#[derive(Clone, Debug, PartialEq)]
pub struct Q8State {
    /// The map's name ([`q8::Map::name`]): `"dynamic_signed"` for `exp_avg`,
    /// `"dynamic_unsigned"` for `exp_avg_sq` and `max_exp_avg_sq`.
    pub map: String,
    /// The absmax of each block of [`q8::BLOCK`] elements from the tensor's first:
    /// [`q8::blocks`]`(len)` values, each a magnitude (sign bit clear).
    pub absmax: Vec<f32>,
    /// One code per element of the tensor.
    pub codes: Vec<u8>,
}

impl Q8State {
    /// Checks this state against state `kind` (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`) of
    /// parameter `name` of `len` elements: the map that state uses, one code per element, one
    /// absmax per block, each absmax a magnitude. Errors name `<kind>.<name>` (the codes) or
    /// `<kind>_absmax.<name>`.
    pub(crate) fn check(&self, kind: &str, name: &str, len: u64) -> Result<()> {
        let tensor = format!("{kind}.{name}");
        let map = q8::Map::for_state(kind);
        if self.map != map.name {
            return Err(Error::Q8Map {
                tensor,
                map: self.map.clone(),
                expected: map.name,
            });
        }
        if self.codes.len() as u64 != len {
            return Err(Error::Shape {
                tensor,
                shape: vec![self.codes.len()],
                expected: format!("{len} codes, one per element of parameter `{name}`"),
            });
        }
        let absmax = format!("{kind}_absmax.{name}");
        let blocks = q8::blocks(len);
        if self.absmax.len() as u64 != blocks {
            return Err(Error::Shape {
                tensor: absmax,
                shape: vec![self.absmax.len()],
                expected: format!(
                    "{blocks} values, one per block of {} elements of parameter `{name}` \
                     ({len} elements)",
                    q8::BLOCK
                ),
            });
        }
        // The kernel's absmax is the largest |x| (NaN and infinity included): never negative.
        if let Some(index) = self.absmax.iter().position(|a| a.is_sign_negative()) {
            return Err(Error::TensorValue {
                tensor: absmax,
                index,
                value: self.absmax[index],
                expected: "a magnitude (sign bit clear), the largest |value| of its block".into(),
            });
        }
        Ok(())
    }

    /// The values stored, dequantised with `map`. The lengths have been checked (`check`).
    pub(crate) fn values(&self, map: &q8::Map) -> Vec<f32> {
        self.codes
            .iter()
            .zip(self.absmax.iter().flat_map(|&a| [a; q8::BLOCK]))
            .map(|(&c, a)| map.value(a, c))
            .collect()
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
                .read(device, queue, (at.offset, at.block), t.len)
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
        match (&state.master_param, self.config().keeps_master()) {
            (Some(master), true) => check("master_param", master)?,
            (None, false) => {}
            (None, true) => {
                return Err(Error::MissingTensor {
                    tensor: format!("master_param.{name}"),
                    expected: "the f32 master weights, as master_weights is on".into(),
                });
            }
            (Some(_), false) => {
                return Err(Error::UnexpectedTensor {
                    tensor: format!("master_param.{name}"),
                    expected: "no master_param, as master weights are off".into(),
                });
            }
        }
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
        self.spans[at.span]
            .state
            .write(queue, (at.offset, at.block), state);
        Ok(())
    }

    /// The q8 buffer of state `kind` of tensor `index`, the tensor and where it lives; an
    /// error when the index, the state or its dtype is not so.
    fn q8_buffer(
        &self,
        index: usize,
        kind: &str,
    ) -> Result<(&wgpu::Buffer, &TensorInfo, Location)> {
        let (tensor, at) = self.tensor(index)?;
        let buffers = &self.spans[at.span].state;
        let found = buffers
            .buffers()
            .into_iter()
            .find(|&(buffer, _, name)| name == kind && buffer.is_some());
        let Some((Some(buffer), dtype, _)) = found else {
            let present: Vec<&str> = buffers
                .buffers()
                .into_iter()
                .filter_map(|(b, _, name)| b.map(|_| name))
                .collect();
            return Err(Error::UnexpectedTensor {
                tensor: format!("{kind}.{}", tensor.name),
                expected: format!("a state this optimizer keeps: {}", present.join(", ")),
            });
        };
        if dtype != Dtype::Q8 {
            let why = match kind {
                "exp_avg" => format!("`exp_avg_dtype` is \"{}\"", dtype.name()),
                "master_param" => "master weights are always f32".into(),
                _ => format!("`exp_avg_sq_dtype` is \"{}\"", dtype.name()),
            };
            return Err(Error::DType {
                tensor: format!("{kind}.{}", tensor.name),
                dtype: dtype.name().into(),
                expected: format!("q8, but this optimizer stores it so ({why})"),
            });
        }
        Ok((buffer, tensor, at))
    }

    /// Copies q8 state `kind` (`"exp_avg"`, `"exp_avg_sq"` or `"max_exp_avg_sq"`) of tensor
    /// `index` back to the host as its buffer holds it: map name, absmax and codes (no
    /// rounding, unlike the dequantised [`Optimizer::read_state`]). An error names the tensor
    /// when the optimizer has no such tensor or state, or stores it in another dtype. The copy
    /// is submitted at once; the future resolves when the device is polled past it.
    pub fn read_q8_state(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        index: usize,
        kind: &str,
    ) -> impl Future<Output = Result<Q8State>> + use<> {
        let read = self.q8_buffer(index, kind).map(|(buffer, tensor, at)| {
            let words = q8::BLOCK_WORDS as u64;
            let at_byte = at.block * words * 4;
            let read = gpu::read_f32(
                device,
                queue,
                buffer,
                at_byte,
                q8::blocks(tensor.len) * words,
            );
            (read, tensor.len as usize, q8::Map::for_state(kind).name)
        });
        async move {
            let (read, len, map) = read?;
            let words = read.await.map_err(Error::Readback)?;
            let (absmax, codes) = q8::Map::unpack(bytemuck::cast_slice(&words), len);
            Ok(Q8State {
                map: map.to_string(),
                absmax,
                codes,
            })
        }
    }

    /// [`Optimizer::read_q8_state`], waiting on the device.
    pub fn read_q8_state_blocking(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        index: usize,
        kind: &str,
    ) -> Result<Q8State> {
        let future = self.read_q8_state(device, queue, index, kind);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Readback(e.to_string()))?;
        pollster::block_on(future)
    }

    /// Overwrites q8 state `kind` of tensor `index` with `state`, codes and absmax as they are
    /// (bit for bit: what a checkpoint needs to resume exactly). Checks first that the
    /// optimizer stores that state as q8, that `state.map` is the map it uses
    /// ([`q8::Map::for_state`]), that there is one code per element and one absmax per block,
    /// each a magnitude; on error nothing is written. Codes past the tensor's end in its last
    /// block get the code of 0. The write goes through `queue` and lands before the work of
    /// the next submit: load between submits.
    pub fn load_q8_state(
        &mut self,
        queue: &wgpu::Queue,
        index: usize,
        kind: &str,
        state: &Q8State,
    ) -> Result<()> {
        let (buffer, tensor, at) = self.q8_buffer(index, kind)?;
        state.check(kind, &tensor.name, tensor.len)?;
        if !state.codes.is_empty() {
            let words = q8::Map::for_state(kind).pack(&state.absmax, &state.codes);
            let at_byte = at.block * q8::BLOCK_WORDS as u64 * 4;
            queue.write_buffer(buffer, at_byte, bytemuck::cast_slice(&words));
        }
        Ok(())
    }

    /// Sets the iteration counter: the next iteration is `step + 1` (its schedules' value, and
    /// without skipping its bias correction, use it; with skipping, a checkpoint restores the
    /// device's t beside it).
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }
}
