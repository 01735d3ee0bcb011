//! The device the benchmark runs on: how it is timed, and the few buffer helpers every other
//! module uses, each in a storage dtype: f32, or bf16 / f16 two to a 32-bit word, low half
//! first (docs/semantics.md, "Storage dtypes"), converted by `wgpu_optim::dtype`. Reading back
//! goes through the library's `util::read_f32_blocking`.

use wgpu_optim::Dtype;
use wgpu_optim::dtype;
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
        self.buffer(label, Dtype::F32, len)
    }

    /// A storage buffer of `len` elements of `dtype` in whole words (at least 16 bytes) that
    /// can be written and read back.
    pub fn buffer(&self, label: &str, dtype: Dtype, len: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (len * dtype.bytes()).next_multiple_of(4).max(16),
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

    /// Writes `data` rounded to nearest in `dtype` from element `offset` (a word boundary for
    /// 16-bit dtypes; an odd length's last word gets a 0 in its other half).
    pub fn write_as(&self, buffer: &wgpu::Buffer, dtype: Dtype, offset: u64, data: &[f32]) {
        if !dtype.is_16bit() {
            return self.write(buffer, offset, data);
        }
        assert!(offset.is_multiple_of(2), "16-bit data starts on a word");
        let narrow = match dtype {
            Dtype::Bf16 => dtype::narrow_bf16,
            _ => dtype::narrow_f16,
        };
        let mut bytes: Vec<u8> = data.iter().flat_map(|&x| narrow(x).to_le_bytes()).collect();
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        if !bytes.is_empty() {
            self.queue.write_buffer(buffer, offset * 2, &bytes);
        }
    }

    /// `len` f32 from element `offset`, once the device has finished everything before.
    pub fn read(&self, buffer: &wgpu::Buffer, offset: u64, len: u64) -> Result<Vec<f32>, String> {
        read_f32_blocking(&self.device, &self.queue, buffer, offset * 4, len)
            .map_err(|e| format!("reading a buffer back: {e}"))
    }

    /// `len` elements of `dtype` from element `offset`, widened to f32 (exact).
    pub fn read_as(
        &self,
        buffer: &wgpu::Buffer,
        dtype: Dtype,
        offset: u64,
        len: u64,
    ) -> Result<Vec<f32>, String> {
        if !dtype.is_16bit() {
            return self.read(buffer, offset, len);
        }
        let (first, end) = (offset / 2, (offset + len).div_ceil(2));
        let words = self.read(buffer, first, end - first)?;
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let start = 2 * (offset % 2) as usize;
        Ok(dtype::from_bytes(
            dtype,
            &bytes[start..start + 2 * len as usize],
        ))
    }
}
