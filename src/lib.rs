//! Fused GPU optimizer steps (Adam, AdamW, Yogi and their variants) as WGSL compute shaders
//! run through wgpu: exact to PyTorch, one pass over memory, recorded into your own
//! `CommandEncoder`.
//!
//! # Quick start
//!
//! The engine owns the device, the parameter and gradient buffers (f32, `STORAGE` usage) and
//! the encoder; the optimizer owns the state (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`) and
//! the step counter, and records one compute pass per step (the README's snippet, checked
//! to be the same by a test):
//!
//! ```rust
//! use wgpu_optim::{BufferView, Config, Optimizer, Parameter};
//!
//! /// Once, when the engine builds its model.
//! fn build_optimizer(
//!     device: &wgpu::Device,
//!     weights: &wgpu::Buffer,
//!     weight_grads: &wgpu::Buffer,
//! ) -> Result<Optimizer, wgpu_optim::Error> {
//!     let config = Config::adamw().lr(3e-4).betas(0.9, 0.95).weight_decay(0.1);
//!     Optimizer::new(
//!         device,
//!         config,
//!         &[Parameter::new("weight", BufferView::whole(weights), BufferView::whole(weight_grads))],
//!     )
//! }
//!
//! /// Every training step, after the backward pass has been recorded into `encoder`.
//! fn train_step(
//!     optimizer: &mut Optimizer,
//!     queue: &wgpu::Queue,
//!     mut encoder: wgpu::CommandEncoder,
//!     lr: f64,
//! ) -> Result<(), wgpu_optim::Error> {
//!     optimizer.set_lr(lr)?;
//!     optimizer.step(queue, &mut encoder);
//!     queue.submit([encoder.finish()]);
//!     Ok(())
//! }
//! ```
//!
//! Many tensors in one flat buffer go through [`FlatParameters`] or an [`Arena`] and
//! [`Optimizer::with_groups`] (one dispatch per chunk, up to [`MAX_GROUPS`] parameter groups);
//! [`Schedule`]s drive each group's learning rate; [`checkpoint`] saves and loads the state
//! with PyTorch's names; [`replay`] runs a recorded PyTorch trace; [`reference::step`] is the
//! same update on the CPU. Every refusal is a typed [`Error`].
//!
//! # Contracts
//!
//! `docs/semantics.md` in the repository defines the update with every option ([`Config`]
//! carries it as pseudo-code); `docs/replay-format.md`, `docs/checkpoint-format.md` and
//! `docs/bench-output.md` define the files and the benchmark's output.
//!
//! # Layout
//!
//! `params` (the engine's views, validated into spans) -> `plan` (pure: spans to dispatches)
//! -> `optimizer` (builds once through `gpu`, records each step) with `state` (buffers and
//! state I/O); `protocol` holds what host and shader share, emitted into the WGSL prelude.

mod arena;
pub mod checkpoint;
mod config;
pub mod dtype;
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
pub use config::{Algorithm, CONFIG_KEYS, Config, EpsMode, LossScale, Rounding};
pub use dtype::Dtype;
pub use error::{Error, Result};
pub use optimizer::Optimizer;
pub use params::{BufferView, FlatParameters, FlatTensor, OptimizerOptions, Parameter, TensorInfo};
pub use protocol::MAX_GROUPS;
pub use reference::TensorState;
pub use schedule::Schedule;
pub use state::{IterationStatus, Q8State, StateBuffers};

#[cfg(test)]
mod tests {
    /// The crate docs' quick start is the README's embedding snippet, word for word.
    #[test]
    fn crate_docs_quick_start_is_the_readmes() {
        let snippet = |text: &str, start: &str| -> String {
            let a = text.find(start).expect("the snippet") + start.len();
            let b = a + text[a..].find("```").expect("its end");
            text[a..b].to_string()
        };
        let readme = include_str!("../README.md");
        let section = &readme[readme.find("## Embedding the step").expect("the section")..];
        let readme = snippet(section, "```rust\n");
        let lib = include_str!("lib.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let lib = snippet(&lib, "```rust\n");
        assert_eq!(lib.trim_end(), readme.trim_end());
    }
}

/// The README's Rust snippets compile as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
