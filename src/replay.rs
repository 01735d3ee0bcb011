//! Replay: run a recorded gradient trace through the GPU optimizer, as `docs/replay-format.md`
//! defines it.
//!
//! A **trace** is a safetensors file with metadata `config` (the JSON of [`Config::from_json`]),
//! tensors `param.<name>` (the initial parameters, f32, any shape, 0-d included),
//! `grad.<t>.<name>` (the gradient of every parameter at every step t = 1..T, f32, the param's
//! shape) and optionally `lr` (f32, shape `[T]`: the learning rate of each step, overriding
//! `config.lr`). `<name>` is everything after the first dot (after `grad.<t>.` for gradients)
//! and may itself hold dots. Other metadata keys are ignored; any other tensor is an error.
//!
//! The **result** holds, for every name, `param.<name>` after T steps, `exp_avg.<name>`,
//! `exp_avg_sq.<name>` and, with amsgrad, `max_exp_avg_sq.<name>`, all f32 with the param's
//! shape; metadata `step` = t, the applied steps (T unless iterations were skipped),
//! `skipped` = T - t, `config` = the effective configuration and, with `loss_scale`, the final
//! `loss_scale`.
//!
//! ```no_run
//! # fn main() -> Result<(), wgpu_optim::Error> {
//! let (_, device, queue) = wgpu_optim::util::request_device_blocking()?;
//! let trace = wgpu_optim::replay::Trace::read("run.trace.safetensors")?;
//! trace.run(&device, &queue)?.write("run.out.safetensors")?;
//! # Ok(()) }
//! ```
//!
//! Parsing validates everything before any GPU work: the config (unknown keys, missing
//! `algorithm`, NaN and out-of-range values), dtypes (f32 only), shapes, that every gradient
//! is present, the length and values of `lr`, that params are finite, and that gradients are
//! too unless `loss_scale` or `skip_nonfinite` is set (then a non-finite gradient skips its
//! iteration). Every error names the tensor, key or file.
//!
//! Owns: the trace and result formats. May not reach into the optimizer beyond its public API.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::file::{self, FileTensor, Safetensors};
use crate::gpu;
use crate::optimizer::Optimizer;
use crate::params::{BufferView, Parameter};
use crate::reference::{self, TensorState};

/// A named f32 tensor with its shape (`[]` for 0-d, which has one element).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, shape: &[usize], data: Vec<f32>) -> Self {
        NamedTensor {
            name: name.into(),
            shape: shape.to_vec(),
            data,
        }
    }
}

/// A parsed, validated trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub config: Config,
    /// The initial parameters, sorted by name.
    pub params: Vec<NamedTensor>,
    /// `grads[t - 1][i]`: the gradient of `params[i]` at step `t`.
    pub grads: Vec<Vec<Vec<f32>>>,
    /// The learning rate of each step, when the trace has an `lr` tensor.
    pub lr: Option<Vec<f32>>,
}

/// What a replay produces: the parameters and the state after the trace's last step.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ReplayResult {
    /// The effective configuration (every key, defaults filled in).
    pub config: Config,
    /// Steps applied: T less the iterations skipped for a non-finite gradient.
    pub step: u64,
    /// Iterations skipped (T - `step`).
    pub skipped: u64,
    /// The final loss scale S, with `loss_scale`.
    pub loss_scale: Option<f32>,
    /// The parameters after the last step, in the trace's order and shapes.
    pub params: Vec<NamedTensor>,
    /// The state of each parameter, in the same order.
    pub state: Vec<TensorState>,
}

impl Trace {
    /// Reads and validates a trace file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        file::read_with(path.as_ref(), Self::from_bytes)
    }

    /// Parses and validates a trace; `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        let st = Safetensors::parse(bytes, file)?;
        let config = st.config()?;

        // Sort the tensors into params, grads (by step, then name) and lr.
        let mut params = BTreeMap::new();
        let mut grads = BTreeMap::new();
        let mut lr = None;
        for (tensor, view) in &st.tensors {
            // Each tensor in its dtype: params in `param_dtype`, gradients in `grad_dtype`.
            let dtype = match parse_name(tensor) {
                Some(Name::Param(_)) => config.param_dtype,
                Some(Name::Grad(..)) => config.grad_dtype,
                _ => crate::dtype::Dtype::F32,
            };
            let data = file::tensor_data(tensor, view, dtype)?;
            let entry = (tensor.as_str(), view.shape().to_vec(), data);
            match parse_name(tensor) {
                Some(Name::Param(name)) => {
                    params.insert(name, entry);
                }
                Some(Name::Grad(t, name)) => {
                    grads.insert((t, name), entry);
                }
                Some(Name::Lr) => lr = Some(entry),
                None => {
                    return Err(Error::UnexpectedTensor {
                        tensor: tensor.clone(),
                        expected: "`param.<name>`, `grad.<t>.<name>` with t = 1, 2, ... or `lr`"
                            .into(),
                    });
                }
            }
        }
        if params.is_empty() {
            return Err(Error::MissingTensor {
                tensor: "param.<name>".into(),
                expected: "at least one parameter".into(),
            });
        }
        for (tensor, _, data) in params.values() {
            file::check_finite(tensor, data)?;
        }
        if let Some((t, name)) = grads.keys().find(|(_, name)| !params.contains_key(name)) {
            return Err(Error::UnexpectedTensor {
                tensor: format!("grad.{t}.{name}"),
                expected: format!("the gradient of a parameter, but there is no `param.{name}`"),
            });
        }

        let steps = grads.keys().map(|(t, _)| *t).max().unwrap_or(0);
        let mut by_step = Vec::new();
        for t in 1..=steps {
            let mut step = Vec::with_capacity(params.len());
            for (name, (param, shape, _)) in &params {
                let Some((tensor, grad_shape, data)) = grads.remove(&(t, *name)) else {
                    return Err(Error::MissingTensor {
                        tensor: format!("grad.{t}.{name}"),
                        expected: format!(
                            "a gradient of every parameter at every step 1..={steps}"
                        ),
                    });
                };
                if grad_shape != *shape {
                    return Err(Error::Shape {
                        tensor: tensor.to_string(),
                        shape: grad_shape,
                        expected: format!("{shape:?}, the shape of `{param}`"),
                    });
                }
                // With skipping, non-finite gradients are what skips an iteration.
                if !config.skips() {
                    file::check_finite(tensor, &data).map_err(|e| match e {
                        Error::TensorValue {
                            tensor,
                            index,
                            value,
                            ..
                        } => Error::TensorValue {
                            tensor,
                            index,
                            value,
                            expected: "a finite number (a non-finite gradient needs \
                                       `loss_scale` or `skip_nonfinite`, which skip its iteration)"
                                .into(),
                        },
                        e => e,
                    })?;
                }
                step.push(data);
            }
            by_step.push(step);
        }

        let lr = match lr {
            None => None,
            Some((tensor, shape, data)) => {
                if shape != [steps as usize] {
                    return Err(Error::Shape {
                        tensor: tensor.to_string(),
                        shape,
                        expected: format!("[{steps}], one learning rate per step"),
                    });
                }
                if let Some(index) = data
                    .iter()
                    .position(|&x| config::check_lr(x as f64).is_err())
                {
                    return Err(Error::TensorValue {
                        tensor: tensor.to_string(),
                        index,
                        value: data[index],
                        expected: format!("a learning rate: {}", config::LR_DOMAIN),
                    });
                }
                Some(data)
            }
        };

        Ok(Trace {
            config,
            params: params
                .into_iter()
                .map(|(name, (_, shape, data))| NamedTensor::new(name, &shape, data))
                .collect(),
            grads: by_step,
            lr,
        })
    }

    /// Serializes the trace (for traces made in Rust; the tests make some).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            tensors.push((
                format!("param.{}", p.name),
                FileTensor::stored(&p.shape, &p.data, self.config.param_dtype),
            ));
            for (t, grads) in self.grads.iter().enumerate() {
                tensors.push((
                    format!("grad.{}.{}", t + 1, p.name),
                    FileTensor::stored(&p.shape, &grads[i], self.config.grad_dtype),
                ));
            }
        }
        if let Some(lr) = &self.lr {
            tensors.push(("lr".into(), FileTensor::new(&[lr.len()], lr)));
        }
        let metadata = HashMap::from([("config".to_string(), self.config.to_json())]);
        file::serialize(&tensors, metadata)
    }

    /// The number of steps T.
    pub fn steps(&self) -> u64 {
        self.grads.len() as u64
    }

    /// The learning rate of step `t` (1-based): the `lr` tensor's, or `config.lr`.
    pub fn lr_at(&self, t: u64) -> f64 {
        match &self.lr {
            Some(lr) => lr[(t - 1) as usize] as f64,
            None => self.config.lr,
        }
    }

    /// Replays the trace on the GPU: one [`Optimizer`] over every parameter, one step per
    /// recorded step, then reads the parameters and the state back.
    pub fn run(&self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<ReplayResult> {
        // Check the sizes before creating buffers: wgpu would panic on an oversized one.
        let max = device.limits().max_buffer_size;
        if let Some(p) = self.params.iter().find(|p| p.data.len() as u64 * 4 > max) {
            return Err(Error::DeviceLimit {
                limit: "max_buffer_size",
                have: max,
                need: p.data.len() as u64 * 4,
                context: format!(" for parameter `{}`", p.name),
            });
        }
        // Each buffer in its dtype (16-bit values two to a word).
        let (param_dtype, grad_dtype) = (self.config.param_dtype, self.config.grad_dtype);
        let buffer = |kind: &str, p: &NamedTensor, dtype| {
            let label = format!("wgpu-optim replay {kind}.{}", p.name);
            gpu::state_buffer(device, &label, dtype, p.data.len() as u64, 0.0)
        };
        let param_buffers: Vec<_> = self
            .params
            .iter()
            .map(|p| buffer("param", p, param_dtype))
            .collect();
        let grad_buffers: Vec<_> = self
            .params
            .iter()
            .map(|p| buffer("grad", p, grad_dtype))
            .collect();
        let parameters: Vec<Parameter> = self
            .params
            .iter()
            .zip(param_buffers.iter().zip(&grad_buffers))
            .map(|(p, (pb, gb))| {
                let len = p.data.len() as u64;
                Parameter::new(
                    p.name.clone(),
                    BufferView::new(pb, 0, len),
                    BufferView::new(gb, 0, len),
                )
            })
            .collect();
        let mut optimizer = Optimizer::new(device, self.config.clone(), &parameters)?;

        let write = |buffer: &wgpu::Buffer, data: &[f32], dtype| {
            if !data.is_empty() {
                queue.write_buffer(buffer, 0, &crate::state::encode(dtype, data));
            }
        };
        for (p, b) in self.params.iter().zip(&param_buffers) {
            write(b, &p.data, param_dtype);
        }
        for (t, grads) in (1..).zip(&self.grads) {
            for (g, b) in grads.iter().zip(&grad_buffers) {
                write(b, g, grad_dtype);
            }
            optimizer.set_lr(self.lr_at(t))?;
            optimizer.step_blocking(device, queue)?;
        }
        let status = optimizer.read_status_blocking(device, queue)?;

        let mut params = Vec::with_capacity(self.params.len());
        let mut state = Vec::with_capacity(self.params.len());
        for (i, (p, b)) in self.params.iter().zip(&param_buffers).enumerate() {
            let len = p.data.len() as u64;
            let words = (len * param_dtype.bytes()).div_ceil(4);
            let data =
                gpu::read_f32_blocking(device, queue, b, 0, words).map_err(Error::Readback)?;
            let data = crate::state::decode(param_dtype, &data, 0, len as usize);
            params.push(NamedTensor::new(p.name.clone(), &p.shape, data));
            state.push(optimizer.read_state_blocking(device, queue, i)?);
        }
        Ok(ReplayResult {
            config: self.config.clone(),
            step: status.applied_steps,
            skipped: self.steps() - status.applied_steps,
            loss_scale: self.config.loss_scale.map(|_| status.loss_scale),
            params,
            state,
        })
    }

    /// Replays the trace on the CPU reference ([`reference::iteration`]), for comparison.
    pub fn run_reference(&self) -> ReplayResult {
        let mut params = self.params.clone();
        let mut state: Vec<TensorState> = params
            .iter()
            .map(|p| TensorState::new(&self.config, p.data.len()))
            .collect();
        let mut iterations = reference::IterationState::new(&self.config);
        let groups = [self.config.clone()];
        for (t, grads) in (1..).zip(&self.grads) {
            let mut tensors: Vec<reference::IterationTensor> = params
                .iter_mut()
                .zip(grads)
                .zip(&mut state)
                .map(|((p, grad), state)| reference::IterationTensor {
                    group: 0,
                    param: &mut p.data,
                    grad,
                    state,
                })
                .collect();
            reference::iteration(&groups, &[self.lr_at(t)], &mut tensors, &mut iterations);
        }
        ReplayResult {
            config: self.config.clone(),
            step: iterations.step,
            skipped: self.steps() - iterations.step,
            loss_scale: self.config.loss_scale.map(|_| iterations.loss_scale),
            params,
            state,
        }
    }
}

impl ReplayResult {
    /// The result file's bytes: `param.<name>`, `exp_avg.<name>`, `exp_avg_sq.<name>`,
    /// `max_exp_avg_sq.<name>` (amsgrad), each in its dtype, `master_param.<name>` (F32, with
    /// master weights), metadata `step` and `config`.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let c = &self.config;
        let mut tensors = Vec::new();
        for (p, s) in self.params.iter().zip(&self.state) {
            let mut push = |kind: &str, data: &[f32], dtype| {
                let tensor = FileTensor::stored(&p.shape, data, dtype);
                tensors.push((format!("{kind}.{}", p.name), tensor));
            };
            push("param", &p.data, c.param_dtype);
            push("exp_avg", &s.exp_avg, c.exp_avg_dtype);
            push("exp_avg_sq", &s.exp_avg_sq, c.exp_avg_sq_dtype);
            if let Some(vmax) = &s.max_exp_avg_sq {
                push("max_exp_avg_sq", vmax, c.exp_avg_sq_dtype);
            }
            if let Some(master) = &s.master_param {
                push("master_param", master, crate::dtype::Dtype::F32);
            }
        }
        let mut metadata = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            ("skipped".to_string(), self.skipped.to_string()),
            ("config".to_string(), self.config.to_json()),
        ]);
        if let Some(s) = self.loss_scale {
            // The f32 widened to f64, printed shortest (as Python's repr of torch's value).
            metadata.insert("loss_scale".to_string(), (s as f64).to_string());
        }
        file::serialize(&tensors, metadata)
    }

    /// Writes the result file atomically (a temporary file in the same directory, renamed):
    /// on failure there is no new file and an existing one is untouched.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        file::write_atomic(path.as_ref(), &self.to_bytes()?)
    }
}

enum Name<'a> {
    Param(&'a str),
    Grad(u64, &'a str),
    Lr,
}

/// Splits a trace tensor's name; `None` for a name the format does not define.
fn parse_name(tensor: &str) -> Option<Name<'_>> {
    if tensor == "lr" {
        return Some(Name::Lr);
    }
    let (kind, rest) = tensor.split_once('.')?;
    match kind {
        "param" if !rest.is_empty() => Some(Name::Param(rest)),
        "grad" => {
            let (t, name) = rest.split_once('.')?;
            let step: u64 = t.parse().ok()?;
            // Canonical decimal only, so that `grad.01.x` cannot stand in for `grad.1.x`.
            (step >= 1 && step.to_string() == t && !name.is_empty())
                .then_some(Name::Grad(step, name))
        }
        _ => None,
    }
}
