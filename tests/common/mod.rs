//! Shared by the integration tests: one device per test binary, seeded data, buffers, and a
//! comparison that collects every mismatch.
#![allow(dead_code)]

use std::sync::OnceLock;

use wgpu_optim::util::read_f32_blocking;

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

#[allow(unused_imports)]
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

#[allow(unused_imports)]
pub use wgpu_optim::testing::{Tolerance, compare, max_abs, yogi_ties};
