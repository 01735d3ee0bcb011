//! What the examples share (and `tests/examples.rs`, which includes this module by path):
//! the device and compute-pipeline plumbing an engine needs around the optimizer ([`gpu`]),
//! SVG line charts ([`plot`]), a small engine for problems on a few scalars with the
//! trajectory checked against the CPU reference ([`lab`]), the four experiments built on it
//! ([`seeds`]), and a two-layer classifier trained entirely on the GPU ([`mlp`]).
//!
//! Each example uses a part of it, so the parts it leaves unused would warn.
#![allow(dead_code)]

pub mod gpu;
pub mod lab;
pub mod mlp;
pub mod plot;
pub mod seeds;

/// Errors of the examples: the library's typed errors, plotting and I/O errors, and failed
/// checks, all as messages.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
