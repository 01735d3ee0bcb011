//! Shared by the integration tests: one device per test binary, seeded data, buffers, and a
//! comparison that collects every mismatch.
#![allow(dead_code)]

use std::sync::OnceLock;

use wgpu_optim::kernels::read_f32_blocking;

/// The device every test of a binary shares. Panics (fails the test) when there is no adapter:
/// tests never skip for want of a GPU; without one, Mesa's lavapipe is the adapter.
pub fn gpu() -> &'static (wgpu::Device, wgpu::Queue) {
    static GPU: OnceLock<(wgpu::Device, wgpu::Queue)> = OnceLock::new();
    GPU.get_or_init(|| {
        let (adapter, device, queue) = wgpu_optim::util::request_device_blocking()
            .unwrap_or_else(|e| panic!("no GPU adapter, and the tests need one: {e}"));
        let info = adapter.get_info();
        eprintln!(
            "adapter: {} ({:?}, {:?})",
            info.name, info.backend, info.device_type
        );
        (device, queue)
    })
}

pub use wgpu_optim::testing::Rng;

pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

pub fn buffer(len: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    gpu().0.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test"),
        size: (len * 4).max(4),
        usage,
        mapped_at_creation: false,
    })
}

pub fn write(buffer: &wgpu::Buffer, offset: u64, data: &[f32]) {
    if !data.is_empty() {
        gpu()
            .1
            .write_buffer(buffer, offset * 4, bytemuck::cast_slice(data));
    }
}

pub fn read(buffer: &wgpu::Buffer, offset: u64, len: u64) -> Vec<f32> {
    let (device, queue) = gpu();
    read_f32_blocking(device, queue, buffer, offset * 4, len).expect("readback")
}

/// `|got - want| <= abs + rel * |want|` element-wise, via approx.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub abs: f32,
    pub rel: f32,
}

/// Compares element-wise and returns every mismatch (at most 5 shown) as one message.
/// `allowed` mismatches pass: only Yogi uses it, for sign(v - g^2) ties (see parity.rs).
pub fn compare(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: Tolerance,
    allowed: usize,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: got {} elements, want {}",
            got.len(),
            want.len()
        ));
    }
    let bad: Vec<(usize, f32, f32)> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| {
            !approx::relative_eq!(**g, **w, epsilon = tol.abs, max_relative = tol.rel)
                && !(g.is_nan() && w.is_nan())
        })
        .map(|(i, (g, w))| (i, *g, *w))
        .collect();
    if bad.len() <= allowed {
        return Ok(());
    }
    let shown: Vec<String> = bad
        .iter()
        .take(5)
        .map(|(i, g, w)| format!("[{i}] got {g:e} want {w:e} (diff {:e})", (g - w).abs()))
        .collect();
    Err(format!(
        "{what}: {} of {} elements differ beyond {tol:?}: {}",
        bad.len(),
        got.len(),
        shown.join(", ")
    ))
}

pub fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}
