//! Checkpoints: the optimizer's state as a safetensors file with PyTorch's state names, so that
//! it survives a restart and moves between PyTorch and wgpu-optim.
//!
//! | tensor | content |
//! | --- | --- |
//! | `exp_avg.<name>` | in `exp_avg_dtype` (F32, BF16, F16, or U8 codes for q8), one element per parameter element |
//! | `exp_avg_sq.<name>` | in `exp_avg_sq_dtype`, the same shape |
//! | `max_exp_avg_sq.<name>` | in `exp_avg_sq_dtype`, the same shape; only with amsgrad |
//! | `<state>_absmax.<name>` | F32 `[ceil(len / 256)]`: each block's absmax, for each of the three states above that is q8 |
//! | `master_param.<name>` | f32, the same shape; only with master weights ([`Config::keeps_master`]) |
//! | `step.<name>` | f32, 0-d: the step count, like torch's per-parameter `step` |
//!
//! Each state is written as its buffer stores it, so a 16-bit state is saved and restored bit
//! for bit (the values a 16-bit buffer holds are exact in f32, where the host keeps them), and
//! a q8 state as its codes and absmax ([`Optimizer::read_q8_state`]), restored as they were
//! ([`Optimizer::load_q8_state`]): quantising its dequantised values again need not give them
//! back. Element `i` of a q8 state is `f32(map[code[i]] * absmax[i / 256])`.
//!
//! | metadata | content |
//! | --- | --- |
//! | `config` | the effective configuration ([`Config::to_json`]), `lr` being the one in effect |
//! | `step` | the step count, decimal (exact where f32 is not) |
//! | `q8_maps` | with q8 states: each q8 state's map name, a JSON object (`{"exp_avg": "dynamic_signed", "exp_avg_sq": "dynamic_unsigned"}`); it must name each state's own map |
//! | `param_names` | the parameter names as a JSON list, in the optimizer's order |
//! | `groups` | with several parameter groups only: every group's effective configuration |
//! | `param_groups` | with `groups` only: each parameter's group, a JSON list beside `param_names` |
//! | `iterations`, `loss_scale`, `growth_tracker` | with `loss_scale`, `skip_nonfinite` or `max_grad_norm`: the iterations recorded (`step` is then t, the applied steps), the loss scale S and its growth tracker, all restored on load |
//!
//! The optimizer knows element counts, not shapes: it saves its tensors flat (`[len]`), and a
//! tensor of any shape with the right element count loads (torch saves the parameter's shape).
//! `scripts/torch_checkpoint.py` maps a `torch.optim.Adam`/`AdamW` state dict to and from this
//! layout. Other metadata keys are ignored.
//!
//! Loading checks the file on its own (names, each tensor's dtype against the file's config,
//! shapes, the config, `q8_maps`, every `step.<name>` equal to `step`), then against the optimizer (the
//! same parameter names, element counts, and config in every key but `lr`: the storage keys
//! included), and only then writes the state, the step counter and the learning rate: a failed
//! load returns a typed error and leaves the optimizer as it was.
//! Saving writes a temporary file in the same directory and renames it over the target.
//!
//! Owns: the checkpoint format (`docs/checkpoint-format.md`). May not reach into the optimizer
//! beyond its public state I/O (`read_state_blocking`, `read_q8_state_blocking`, `load_state`,
//! `load_q8_state`, `set_step_count`).
//!
//! ```no_run
//! # fn main() -> Result<(), wgpu_optim::Error> {
//! # let (_, device, queue) = wgpu_optim::util::request_device_blocking()?;
//! # let mut optimizer = wgpu_optim::Optimizer::new(&device, wgpu_optim::Config::adam(), &[])?;
//! use wgpu_optim::checkpoint;
//! checkpoint::save(&optimizer, &device, &queue, "optimizer.safetensors")?;
//! // ... later, in a fresh process, with an optimizer over the same parameters:
//! checkpoint::load(&mut optimizer, &queue, "optimizer.safetensors")?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde_json::Value;

use crate::config::{CONFIG_KEYS, Config};
use crate::dtype::{Dtype, q8};
use crate::error::{Error, Result};
use crate::file::{self, FileTensor, Safetensors};
use crate::optimizer::Optimizer;
use crate::reference::TensorState;
use crate::state::Q8State;

/// The state of one optimizer, on the host: what a checkpoint file holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    config: Config,
    /// Groups 1.. of an optimizer with several parameter groups (group 0 is `config`).
    other_groups: Vec<Config>,
    step: u64,
    /// With a pass before the step (loss scaling, skipping, clipping): what lives on the
    /// device besides the tensors' state.
    iteration: Option<SavedIteration>,
    tensors: Vec<Saved>,
}

/// The optimizer-wide numbers of an optimizer with a pass before the step.
#[derive(Clone, Copy, Debug, PartialEq)]
struct SavedIteration {
    /// Iterations recorded, skipped ones included: what schedules count.
    iterations: u64,
    loss_scale: f32,
    growth_tracker: u32,
}

#[derive(Clone, Debug, PartialEq)]
struct Saved {
    name: String,
    group: usize,
    shape: Vec<usize>,
    /// Every state, q8 ones dequantised.
    state: TensorState,
    /// The q8 states as stored (codes and absmax), by kind: what a load writes back.
    q8: Vec<(&'static str, Q8State)>,
}

/// Saves the optimizer's state to `path` ([`Checkpoint::capture`], then [`Checkpoint::save`]).
pub fn save(
    optimizer: &Optimizer,
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    path: impl AsRef<Path>,
) -> Result<()> {
    Checkpoint::capture(optimizer, device, queue)?.save(path)
}

/// Loads `path` into the optimizer ([`Checkpoint::read`], then [`Checkpoint::restore`]).
pub fn load(optimizer: &mut Optimizer, queue: &wgpu::Queue, path: impl AsRef<Path>) -> Result<()> {
    Checkpoint::read(path)?.restore(optimizer, queue)
}

impl Checkpoint {
    /// Reads the optimizer's state back from the device (after the work submitted so far).
    pub fn capture(
        optimizer: &Optimizer,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
    ) -> Result<Self> {
        let names = unique_names(optimizer)?;
        let mut tensors = Vec::with_capacity(names.len());
        let q8_kinds = q8_states(optimizer.config());
        for (i, name) in names.into_iter().enumerate() {
            let q8 = q8_kinds
                .iter()
                .map(|&kind| {
                    Ok((
                        kind,
                        optimizer.read_q8_state_blocking(device, queue, i, kind)?,
                    ))
                })
                .collect::<Result<_>>()?;
            tensors.push(Saved {
                name,
                group: optimizer.tensors()[i].group,
                shape: vec![optimizer.tensors()[i].len as usize],
                state: optimizer.read_state_blocking(device, queue, i)?,
                q8,
            });
        }
        // Each group's configuration with the learning rate in effect.
        let mut groups = optimizer
            .groups()
            .iter()
            .zip(optimizer.group_lrs())
            .map(|(g, &lr)| Config { lr, ..g.clone() });
        let config = groups.next().expect("an optimizer has a group");
        let (step, iteration) = if config.has_pre_step() {
            let status = optimizer.read_status_blocking(device, queue)?;
            let iteration = SavedIteration {
                iterations: optimizer.step_count(),
                loss_scale: status.loss_scale,
                growth_tracker: status.growth_tracker,
            };
            (status.applied_steps, Some(iteration))
        } else {
            (optimizer.step_count(), None)
        };
        Ok(Checkpoint {
            config,
            other_groups: groups.collect(),
            step,
            iteration,
            tensors,
        })
    }

    /// The configuration saved (of group 0; its `lr` is the one in effect at the save).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every group's saved configuration (one for a single-group optimizer).
    pub fn groups(&self) -> impl Iterator<Item = &Config> {
        std::iter::once(&self.config).chain(&self.other_groups)
    }

    /// Steps applied before the save (skipped iterations do not count).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Iterations recorded before the save, skipped ones included (what schedules count).
    pub fn iterations(&self) -> u64 {
        self.iteration.map_or(self.step, |i| i.iterations)
    }

    /// The loss scale S and its growth tracker at the save (with `loss_scale`, or another key
    /// of the pass before the step: S is then 1).
    pub fn loss_scale(&self) -> Option<(f32, u32)> {
        self.iteration.map(|i| (i.loss_scale, i.growth_tracker))
    }

    /// The parameter names, in the saved order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// The state of parameter `name` (q8 states dequantised), and the shape its tensors have
    /// in the file.
    pub fn state(&self, name: &str) -> Option<(&TensorState, &[usize])> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .map(|t| (&t.state, t.shape.as_slice()))
    }

    /// State `kind` (`"exp_avg"`, `"exp_avg_sq"`, `"max_exp_avg_sq"`) of parameter `name` as
    /// stored, when the configuration stores it as q8: its map's name, absmax and codes.
    pub fn q8_state(&self, name: &str, kind: &str) -> Option<&Q8State> {
        let t = self.tensors.iter().find(|t| t.name == name)?;
        t.q8.iter().find(|(k, _)| *k == kind).map(|(_, q)| q)
    }

    /// The file's bytes (see the module docs for the layout).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        for t in &self.tensors {
            let mut push = |kind: &str, tensor: FileTensor| {
                tensors.push((format!("{kind}.{}", t.name), tensor));
            };
            // Each state in its dtype: the values were read from buffers of that dtype, so
            // narrowing them again is exact. A q8 state as its codes and absmax.
            for (kind, dtype, data) in state_tensors(&self.config, &t.state) {
                match t.q8.iter().find(|(k, _)| *k == kind) {
                    Some((_, q8)) if dtype == Dtype::Q8 => {
                        push(kind, FileTensor::u8(&t.shape, &q8.codes));
                        let absmax = FileTensor::new(&[q8.absmax.len()], &q8.absmax);
                        push(&format!("{kind}_absmax"), absmax);
                    }
                    _ => push(kind, FileTensor::stored(&t.shape, data, dtype)),
                }
            }
            push("step", FileTensor::new(&[], &[self.step as f32]));
        }
        let names: Vec<&str> = self.names().collect();
        let mut metadata = HashMap::from([
            ("config".to_string(), self.config.to_json()),
            ("step".to_string(), self.step.to_string()),
            (
                "param_names".to_string(),
                serde_json::to_string(&names).expect("strings serialize"),
            ),
        ]);
        let q8_kinds = q8_states(&self.config);
        if !q8_kinds.is_empty() {
            metadata.insert("q8_maps".into(), q8_maps(&q8_kinds).to_string());
        }
        if let Some(i) = &self.iteration {
            metadata.insert("iterations".into(), i.iterations.to_string());
            // The f32 widened to f64, printed shortest: it reads back to the same f32.
            metadata.insert("loss_scale".into(), (i.loss_scale as f64).to_string());
            metadata.insert("growth_tracker".into(), i.growth_tracker.to_string());
        }
        if !self.other_groups.is_empty() {
            let groups: Vec<Value> = self
                .groups()
                .map(|g| serde_json::to_value(g).expect("a Config serializes"))
                .collect();
            let member: Vec<usize> = self.tensors.iter().map(|t| t.group).collect();
            metadata.insert("groups".into(), Value::Array(groups).to_string());
            metadata.insert(
                "param_groups".into(),
                serde_json::to_string(&member).expect("numbers serialize"),
            );
        }
        file::serialize(&tensors, metadata)
    }

    /// Writes the file atomically: on failure there is no new file and an existing one is
    /// untouched.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        file::write_atomic(path.as_ref(), &self.to_bytes()?)
    }

    /// Reads and checks a checkpoint file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        file::read_with(path.as_ref(), Self::from_bytes)
    }

    /// Parses and checks a checkpoint on its own: the config, the metadata, every tensor
    /// present in the dtype the config gives it and with consistent shapes (`master_param.<name>`
    /// exactly with master weights, `max_exp_avg_sq.<name>` exactly with amsgrad), no other
    /// tensor. `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        let st = Safetensors::parse(bytes, file)?;
        let config = st.config()?;
        let integer = |key: &'static str, expected: &'static str| -> Result<u64> {
            let text = st.require_metadata(key, expected)?;
            text.parse::<u64>()
                .ok()
                .filter(|s| s.to_string() == text)
                .ok_or_else(|| Error::InvalidMetadata {
                    file: file.to_string(),
                    key,
                    value: format!("{text:?}"),
                    expected: "a decimal integer >= 0".into(),
                })
        };
        let step = integer("step", "the step count, a decimal integer")?;
        let iteration = if config.has_pre_step() {
            let iterations = integer("iterations", "the iterations recorded, a decimal integer")?;
            let growth_tracker = integer("growth_tracker", "the loss scale's growth tracker")?;
            let text = st.require_metadata("loss_scale", "the loss scale, a decimal number")?;
            let loss_scale = text
                .parse::<f64>()
                .ok()
                .filter(|&s| (s as f32) as f64 == s && s > 0.0 && s.is_finite())
                .ok_or_else(|| Error::InvalidMetadata {
                    file: file.to_string(),
                    key: "loss_scale",
                    value: format!("{text:?}"),
                    expected: "a finite f32 > 0, as its f64 prints".into(),
                })?;
            if iterations < step {
                return Err(Error::InvalidMetadata {
                    file: file.to_string(),
                    key: "iterations",
                    value: iterations.to_string(),
                    expected: format!("at least `step` ({step})"),
                });
            }
            // The device counts in u32.
            for (key, value) in [("step", step), ("growth_tracker", growth_tracker)] {
                if value > u32::MAX as u64 {
                    return Err(Error::InvalidMetadata {
                        file: file.to_string(),
                        key,
                        value: value.to_string(),
                        expected: "at most 2^32 - 1 with a pass before the step".into(),
                    });
                }
            }
            Some(SavedIteration {
                iterations,
                loss_scale: loss_scale as f32,
                growth_tracker: growth_tracker as u32,
            })
        } else {
            None
        };
        let names_text =
            st.require_metadata("param_names", "the parameter names, a JSON list of strings")?;
        let names: Vec<String> =
            serde_json::from_str(names_text).map_err(|_| Error::InvalidMetadata {
                file: file.to_string(),
                key: "param_names",
                value: names_text.to_string(),
                expected: "a JSON list of strings".into(),
            })?;
        check_unique(&names)?;
        let (other_groups, member) = parse_groups(&st, file, &config, names.len())?;
        let q8_kinds = q8_states(&config);
        if !q8_kinds.is_empty() {
            let want = q8_maps(&q8_kinds);
            let text = st.require_metadata(
                "q8_maps",
                "each q8 state's quantisation map, a JSON object (the config has q8 states)",
            )?;
            if serde_json::from_str::<Value>(text).ok().as_ref() != Some(&want) {
                return Err(Error::InvalidMetadata {
                    file: file.to_string(),
                    key: "q8_maps",
                    value: text.to_string(),
                    expected: format!("{want}, the maps of this config's q8 states"),
                });
            }
        }

        let mut views: BTreeMap<&str, _> =
            st.tensors.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let mut tensors = Vec::with_capacity(names.len());
        for (name, group) in names.into_iter().zip(member) {
            let mut q8 = Vec::new();
            // Each tensor must have the dtype the file's config gives it: a q8 state U8 codes
            // beside its F32 absmax, one per block.
            let mut take = |kind: &'static str, expected: &str| {
                let tensor = format!("{kind}.{name}");
                let mut remove = |tensor: &str, expected: String| {
                    views.remove(tensor).ok_or_else(|| Error::MissingTensor {
                        tensor: tensor.to_string(),
                        expected,
                    })
                };
                let view = remove(&tensor, expected.into())?;
                let (dtype, why) = stored_as(&config, kind);
                let with_why = |e| match e {
                    Error::DType {
                        tensor,
                        dtype,
                        expected,
                    } => Error::DType {
                        tensor,
                        dtype,
                        expected: format!("{expected}: {why}"),
                    },
                    e => e,
                };
                let shape = view.shape().to_vec();
                if dtype != Dtype::Q8 {
                    let data = file::tensor_data(&tensor, view, dtype).map_err(with_why)?;
                    return Ok((data, shape));
                }
                if view.dtype() != file::U8 {
                    return Err(with_why(Error::DType {
                        tensor,
                        dtype: format!("{:?}", view.dtype()),
                        expected: "U8 (q8 codes)".into(),
                    }));
                }
                let codes = view.data().to_vec();
                let absmax_name = format!("{kind}_absmax.{name}");
                let absmax_view = remove(
                    &absmax_name,
                    format!("the absmax of each block of `{tensor}` ({why})"),
                )?;
                let absmax =
                    file::tensor_data(&absmax_name, absmax_view, Dtype::F32).map_err(with_why)?;
                let blocks = q8::blocks(codes.len() as u64) as usize;
                if absmax_view.shape() != [blocks] {
                    return Err(Error::Shape {
                        tensor: absmax_name,
                        shape: absmax_view.shape().to_vec(),
                        expected: format!(
                            "[{blocks}], one value per block of {} codes of `{tensor}`",
                            q8::BLOCK
                        ),
                    });
                }
                let map = q8::Map::for_state(kind);
                let state = Q8State {
                    map: map.name.to_string(),
                    absmax,
                    codes,
                };
                state.check(kind, &name, state.codes.len() as u64)?;
                let data = state.values(&map);
                q8.push((kind, state));
                Ok((data, shape))
            };
            let (exp_avg, shape) = take("exp_avg", "the first moment of every parameter")?;
            let same_shape = |kind: &str, (data, s): (Vec<f32>, Vec<usize>)| {
                if s == shape {
                    Ok(data)
                } else {
                    Err(Error::Shape {
                        tensor: format!("{kind}.{name}"),
                        shape: s,
                        expected: format!("{shape:?}, the shape of `exp_avg.{name}`"),
                    })
                }
            };
            let exp_avg_sq = same_shape(
                "exp_avg_sq",
                take("exp_avg_sq", "the second moment of every parameter")?,
            )?;
            let max_exp_avg_sq = match config.amsgrad {
                true => Some(same_shape(
                    "max_exp_avg_sq",
                    take(
                        "max_exp_avg_sq",
                        "the running maximum of exp_avg_sq: amsgrad is on",
                    )?,
                )?),
                false => None,
            };
            let master_param = match config.keeps_master() {
                true => Some(same_shape(
                    "master_param",
                    take(
                        "master_param",
                        "the f32 master weights: master_weights is on with 16-bit params",
                    )?,
                )?),
                false => None,
            };
            let (steps, step_shape) = take("step", "the step count of every parameter")?;
            if steps.len() != 1 {
                return Err(Error::Shape {
                    tensor: format!("step.{name}"),
                    shape: step_shape,
                    expected: "[], one number".into(),
                });
            }
            if steps[0] != step as f32 {
                return Err(Error::TensorValue {
                    tensor: format!("step.{name}"),
                    index: 0,
                    value: steps[0],
                    expected: format!("{step}, the metadata `step`"),
                });
            }
            tensors.push(Saved {
                name,
                group,
                shape,
                state: TensorState {
                    exp_avg,
                    exp_avg_sq,
                    max_exp_avg_sq,
                    master_param,
                },
                q8,
            });
        }
        if let Some(tensor) = views.keys().next() {
            let on = |on: bool| if on { "on" } else { "off" };
            return Err(Error::UnexpectedTensor {
                tensor: tensor.to_string(),
                expected: format!(
                    "`exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`, with amsgrad (here \
                     {}) `max_exp_avg_sq.<name>`, with master weights (here {}: \
                     `master_weights` {}, `param_dtype` \"{}\") `master_param.<name>`, and \
                     `<state>_absmax.<name>` for each q8 state (here {}), for each name of \
                     `param_names`",
                    on(config.amsgrad),
                    on(config.keeps_master()),
                    config.master_weights,
                    config.param_dtype.name(),
                    if q8_kinds.is_empty() {
                        "none".to_string()
                    } else {
                        q8_kinds.join(", ")
                    },
                ),
            });
        }
        Ok(Checkpoint {
            config,
            other_groups,
            step,
            iteration,
            tensors,
        })
    }

    /// Loads the checkpoint into `optimizer`: checks that it has the same parameter names
    /// (in any order), element counts and configuration (every key but `lr`, which is restored
    /// as torch's `load_state_dict` does; the storage keys included, so each state goes back
    /// into a buffer of the dtype it was saved from), then writes the state and sets the step
    /// counter and learning rate. On error the optimizer is untouched. Load between submits.
    pub fn restore(&self, optimizer: &mut Optimizer, queue: &wgpu::Queue) -> Result<()> {
        let saved_groups: Vec<&Config> = self.groups().collect();
        if saved_groups.len() != optimizer.groups().len() {
            return Err(Error::ConfigMismatch {
                key: "groups",
                checkpoint: format!("{} parameter groups", saved_groups.len()),
                optimizer: format!("{} parameter groups", optimizer.groups().len()),
            });
        }
        for (saved, group) in saved_groups.iter().zip(optimizer.groups()) {
            saved.validate()?;
            let (ours, theirs) = (json_map(saved), json_map(group));
            if let Some(key) = CONFIG_KEYS
                .into_iter()
                .find(|&k| k != "lr" && ours.get(k) != theirs.get(k))
            {
                let show = |m: &serde_json::Map<String, Value>| m.get(key).map(Value::to_string);
                return Err(Error::ConfigMismatch {
                    key,
                    checkpoint: show(&ours).unwrap_or_default(),
                    optimizer: show(&theirs).unwrap_or_default(),
                });
            }
        }
        let names = unique_names(optimizer)?;
        let saved: HashMap<&str, &Saved> =
            self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        if names.len() != saved.len() || names.iter().any(|n| !saved.contains_key(n.as_str())) {
            return Err(Error::ParameterNames {
                checkpoint: self.names().map(String::from).collect(),
                optimizer: names,
            });
        }
        let mut order = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let t = saved[name.as_str()];
            let (len, group) = (optimizer.tensors()[i].len, optimizer.tensors()[i].group);
            if t.group != group {
                return Err(Error::ConfigMismatch {
                    key: "param_groups",
                    checkpoint: format!("`{name}` in group {}", t.group),
                    optimizer: format!("`{name}` in group {group}"),
                });
            }
            if t.state.exp_avg.len() as u64 != len {
                return Err(Error::Shape {
                    tensor: format!("exp_avg.{name}"),
                    shape: t.shape.clone(),
                    expected: format!("{len} elements, like parameter `{name}`"),
                });
            }
            order.push((i, t));
        }
        // Everything is checked (lengths agree within a Saved, amsgrad and the q8 states with
        // the config, each q8 state's map, codes and absmax): write. A q8 state goes in twice:
        // quantised from its values by `load_state`, then overwritten (the queue's writes land
        // in order) by its codes and absmax as saved, which re-quantising need not give.
        for (i, t) in order {
            optimizer.load_state(queue, i, &t.state)?;
            for (kind, q8) in &t.q8 {
                optimizer.load_q8_state(queue, i, kind, q8)?;
            }
        }
        optimizer.set_step_count(self.iterations());
        if let Some(i) = &self.iteration {
            optimizer.restore_iteration(queue, self.step, i.loss_scale, i.growth_tracker);
        }
        for (g, saved) in saved_groups.iter().enumerate() {
            optimizer.set_group_lr(g, saved.lr)?;
        }
        Ok(())
    }
}

/// The optional `groups` and `param_groups` metadata: groups 1.. and each tensor's group.
fn parse_groups(
    st: &Safetensors,
    file: &str,
    config: &Config,
    tensors: usize,
) -> Result<(Vec<Config>, Vec<usize>)> {
    let Some(text) = st.metadata.get("groups") else {
        return Ok((Vec::new(), vec![0; tensors]));
    };
    let invalid = |key, value: &str, expected: &str| Error::InvalidMetadata {
        file: file.to_string(),
        key,
        value: value.to_string(),
        expected: expected.to_string(),
    };
    let list: Vec<Value> = serde_json::from_str(text)
        .map_err(|_| invalid("groups", text, "a JSON list of configurations"))?;
    let mut groups = list
        .iter()
        .map(|g| file::config_from_json(&g.to_string()))
        .collect::<Result<Vec<Config>>>()?;
    if groups.len() < 2 || groups[0] != *config {
        return Err(invalid(
            "groups",
            text,
            "two or more configurations, the first equal to `config`",
        ));
    }
    let member_text = st.require_metadata("param_groups", "each parameter's group, a JSON list")?;
    let member: Vec<usize> = serde_json::from_str(member_text)
        .ok()
        .filter(|m: &Vec<usize>| m.len() == tensors && m.iter().all(|&g| g < groups.len()))
        .ok_or_else(|| {
            invalid(
                "param_groups",
                member_text,
                &format!("{tensors} group indices below {}", groups.len()),
            )
        })?;
    groups.remove(0);
    Ok((groups, member))
}

/// The state tensors of one parameter that a file holds, by kind (without `step`).
fn state_tensors<'a>(
    config: &Config,
    state: &'a TensorState,
) -> impl Iterator<Item = (&'static str, Dtype, &'a [f32])> {
    [
        ("exp_avg", Some(&state.exp_avg)),
        ("exp_avg_sq", Some(&state.exp_avg_sq)),
        ("max_exp_avg_sq", state.max_exp_avg_sq.as_ref()),
        ("master_param", state.master_param.as_ref()),
    ]
    .into_iter()
    .filter_map(move |(kind, data)| Some((kind, stored_as(config, kind).0, data?.as_slice())))
}

/// The dtype a tensor of `kind` is stored in under `config`, and why (for errors): the moments
/// in their storage keys' dtypes, the master weights and the step always in f32.
fn stored_as(config: &Config, kind: &str) -> (Dtype, String) {
    let by_key = |key: &str, dtype: Dtype| {
        let why = format!("the checkpoint's config has `{key}` \"{}\"", dtype.name());
        (dtype, why)
    };
    match kind {
        "exp_avg" => by_key("exp_avg_dtype", config.exp_avg_dtype),
        "exp_avg_sq" | "max_exp_avg_sq" => by_key("exp_avg_sq_dtype", config.exp_avg_sq_dtype),
        "master_param" => (Dtype::F32, "master weights are always f32".into()),
        _ => (Dtype::F32, "the step count is always f32".into()),
    }
}

/// The states `config` stores as q8, in file order.
fn q8_states(config: &Config) -> Vec<&'static str> {
    ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        .into_iter()
        .filter(|&kind| kind != "max_exp_avg_sq" || config.amsgrad)
        .filter(|&kind| stored_as(config, kind).0 == Dtype::Q8)
        .collect()
}

/// The `q8_maps` metadata of these q8 states: each one's map name, by state.
fn q8_maps(kinds: &[&str]) -> Value {
    let maps = kinds
        .iter()
        .map(|&kind| (kind.to_string(), q8::Map::for_state(kind).name.into()));
    Value::Object(maps.collect())
}

fn json_map(config: &Config) -> serde_json::Map<String, Value> {
    match serde_json::to_value(config) {
        Ok(Value::Object(map)) => map,
        _ => unreachable!("a Config serializes to an object"),
    }
}

fn unique_names(optimizer: &Optimizer) -> Result<Vec<String>> {
    let names: Vec<String> = optimizer.parameter_names().map(String::from).collect();
    check_unique(&names)?;
    Ok(names)
}

fn check_unique(names: &[String]) -> Result<()> {
    let mut seen = HashSet::new();
    match names.iter().find(|n| !seen.insert(n.as_str())) {
        Some(n) => Err(Error::DuplicateName(n.clone())),
        None => Ok(()),
    }
}
