//! Fused GPU optimizer steps (Adam, AdamW, Yogi and their variants) in WGSL, run through wgpu.
//!
//! The semantics are those of `docs/semantics.md` (PyTorch's to the letter where PyTorch
//! has the variant); see [`Config`] for the algorithm with every option.
//!
//! ```no_run
//! use wgpu_optim::{BufferView, Config, Optimizer, Parameter};
//! # fn main() -> Result<(), wgpu_optim::Error> {
//! # let (_, device, queue) = wgpu_optim::util::request_device_blocking()?;
//! # let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
//! # let buffer = |size| device.create_buffer(&wgpu::BufferDescriptor {
//! #     label: None, size, usage: storage, mapped_at_creation: false });
//! // The engine's own f32 buffers: weights and their gradients.
//! let (weights, weight_grads) = (buffer(4096 * 4), buffer(4096 * 4));
//! let mut optimizer = Optimizer::new(
//!     &device,
//!     Config::adamw().lr(3e-4).weight_decay(0.1),
//!     &[Parameter::new("weight", BufferView::whole(&weights), BufferView::whole(&weight_grads))],
//! )?;
//! let mut encoder = device.create_command_encoder(&Default::default());
//! // ... the engine records its backward pass here ...
//! optimizer.step(&queue, &mut encoder);
//! queue.submit([encoder.finish()]);
//! # Ok(()) }
//! ```

mod arena;
pub mod checkpoint;
mod config;
mod error;
mod file;
mod gpu;
pub mod groups;
mod optimizer;
mod params;
mod plan;
mod protocol;
pub mod reference;
pub mod replay;
pub mod schedule;
mod state;
#[doc(hidden)]
pub mod testing;
pub mod util;

pub use arena::Arena;
pub use config::{Algorithm, CONFIG_KEYS, Config, EpsMode};
pub use error::{Error, Result};
pub use optimizer::Optimizer;
pub use params::{BufferView, FlatParameters, FlatTensor, OptimizerOptions, Parameter, TensorInfo};
pub use protocol::MAX_GROUPS;
pub use reference::TensorState;
pub use schedule::Schedule;
pub use state::StateBuffers;

/// The README's Rust snippets compile as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
