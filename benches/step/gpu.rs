//! The device the benchmark runs on: how it is timed, and the few buffer helpers every other
//! module uses. Reading back goes through the library's `util::read_f32_blocking`.

use wgpu_optim::util::read_f32_blocking;

/// The device, and what the benchmark needs to know about it.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// GPU timestamp queries around each compute pass; else host time of submit + wait.
    pub timestamps: bool,
    pub limits: wgpu::Limits,
}

impl Gpu {
    pub fn new(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        Gpu {
            timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
            limits: device.limits(),
            device,
            queue,
        }
    }

    /// Blocks until the device has finished everything submitted.
    pub fn wait(&self) {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("the device finishes its work");
    }

    /// A storage buffer of `len` f32 (at least 16 bytes) that can be written and read back.
    pub fn storage_buffer(&self, label: &str, len: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (len * 4).max(16),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// Writes `data` from element `offset`; it lands before the next submit's work.
    pub fn write(&self, buffer: &wgpu::Buffer, offset: u64, data: &[f32]) {
        if !data.is_empty() {
            self.queue
                .write_buffer(buffer, offset * 4, bytemuck::cast_slice(data));
        }
    }

    /// `len` f32 from element `offset`, once the device has finished everything before.
    pub fn read(&self, buffer: &wgpu::Buffer, offset: u64, len: u64) -> Result<Vec<f32>, String> {
        read_f32_blocking(&self.device, &self.queue, buffer, offset * 4, len)
            .map_err(|e| format!("reading a buffer back: {e}"))
    }
}
