//! Helpers for examples, tests, tools and engines: getting a device (a training engine brings
//! its own; this shows what to ask for) and reading a buffer back.
//!
//! Owns: conveniences around the public API. The wgpu calls themselves are in `gpu/`.

use crate::error::{Error, Result};

/// A device on the adapter that wgpu's environment variables pick (`WGPU_BACKEND`,
/// `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF`), or the default one.
///
/// It requests the adapter's own limits rather than wgpu's defaults: the default
/// `max_buffer_size` (256 MiB) caps a parameter tensor at 64M elements. It enables
/// `TIMESTAMP_QUERY` where the adapter has it (the benchmark uses it).
pub fn request_device_blocking() -> Result<(wgpu::Adapter, wgpu::Device, wgpu::Queue)> {
    pollster::block_on(request_device())
}

/// The async form of [`request_device_blocking`].
pub async fn request_device() -> Result<(wgpu::Adapter, wgpu::Device, wgpu::Queue)> {
    crate::gpu::request_device().await
}

/// Copies `len` f32 values of `buffer`, starting `byte_offset` bytes in, back to the host: the
/// copy is submitted at once, and the future resolves once the device has been polled past it
/// (`Device::poll`, which the caller arranges). `buffer` needs `BufferUsages::COPY_SRC`, and
/// `byte_offset` and `len * 4` must be multiples of 4. See [`read_f32_blocking`].
pub fn read_f32(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    byte_offset: u64,
    len: u64,
) -> impl Future<Output = Result<Vec<f32>>> + use<> {
    let checked = check_readable(buffer, byte_offset, len)
        .map(|()| crate::gpu::read_f32(device, queue, buffer, byte_offset, len));
    async move { checked?.await.map_err(Error::Readback) }
}

/// [`read_f32`], blocking until the device has finished the copy (named so: it waits on the
/// device, which stalls the GPU queue; use it for tests, tools and logging, not every step).
pub fn read_f32_blocking(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    byte_offset: u64,
    len: u64,
) -> Result<Vec<f32>> {
    let future = read_f32(device, queue, buffer, byte_offset, len);
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Readback(e.to_string()))?;
    pollster::block_on(future)
}

/// The range is inside the buffer, 4-byte aligned, and the buffer can be copied from.
fn check_readable(buffer: &wgpu::Buffer, byte_offset: u64, len: u64) -> Result<()> {
    let usage = buffer.usage();
    if !usage.contains(wgpu::BufferUsages::COPY_SRC) {
        return Err(Error::MissingUsage {
            tensor: "(read_f32)".into(),
            which: "read",
            needed: "COPY_SRC",
            has: format!("{usage:?}"),
        });
    }
    let end = len.checked_mul(4).and_then(|b| b.checked_add(byte_offset));
    if !byte_offset.is_multiple_of(4) || end.is_none_or(|end| end > buffer.size()) {
        return Err(Error::OutOfBounds {
            tensor: "(read_f32)".into(),
            which: "read",
            offset: byte_offset,
            len,
            buffer_bytes: buffer.size(),
        });
    }
    Ok(())
}
