//! The buffers the optimizer creates, the small per-step upload, readback, and the error
//! scopes around creation: part of `gpu`, the only module that builds wgpu descriptors.

use crate::dtype::Dtype;
use crate::dtype::q8::BLOCK_WORDS;
use crate::error::{Error, Result};

/// Runs `create` inside validation and out-of-memory error scopes: whatever the device refuses
/// comes back as [`Error::Creation`] naming `what`, rather than reaching the device's
/// uncaptured-error handler (which panics by default). On native backends the scopes' answers
/// are ready at once: nothing waits on the GPU.
pub(crate) fn create_scoped<T>(
    device: &wgpu::Device,
    what: &str,
    create: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let created = create();
    let memory = pollster::block_on(memory.pop());
    let validation = pollster::block_on(validation.pop());
    match memory.or(validation) {
        Some(e) => Err(Error::Creation {
            what: what.to_string(),
            reason: e.to_string(),
        }),
        None => created,
    }
}

/// A storage buffer of `len` elements of `dtype` (f32, or 16-bit two to a word), every element
/// `fill` rounded to the dtype; whole words, and at least 16 bytes so that an empty tensor still
/// has something to bind.
pub(crate) fn state_buffer(
    device: &wgpu::Device,
    label: &str,
    dtype: Dtype,
    len: u64,
    fill: f32,
) -> wgpu::Buffer {
    let size = (len * dtype.bytes()).next_multiple_of(4);
    // The fill as a word: the f32, or the 16-bit value twice.
    let word = match dtype {
        Dtype::Bf16 => (crate::dtype::narrow_bf16(fill) as u32) * 0x1_0001,
        Dtype::F16 => (crate::dtype::narrow_f16(fill) as u32) * 0x1_0001,
        Dtype::F32 | Dtype::Q8 => fill.to_bits(),
    };
    pattern_buffer(device, label, size, &[word])
}

/// A q8 state buffer of `blocks` blocks (`dtype::q8`'s layout), each with this `absmax` and
/// every code word `codes`.
pub(crate) fn q8_state_buffer(
    device: &wgpu::Device,
    label: &str,
    blocks: u64,
    absmax: f32,
    codes: u32,
) -> wgpu::Buffer {
    let mut block = vec![codes; BLOCK_WORDS];
    block[0] = absmax.to_bits();
    pattern_buffer(device, label, blocks * BLOCK_WORDS as u64 * 4, &block)
}

/// A storage buffer of `size` bytes (at least 16) holding `pattern` over and over.
fn pattern_buffer(device: &wgpu::Device, label: &str, size: u64, pattern: &[u32]) -> wgpu::Buffer {
    let size = size.max(16);
    let nonzero = pattern.iter().any(|&w| w != 0);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: nonzero,
    });
    if nonzero {
        // New buffers are zeroed; only a non-zero fill needs writing, a run at a time.
        let run: Vec<u32> = pattern
            .iter()
            .copied()
            .cycle()
            .take(pattern.len() * (1usize << 16).div_ceil(pattern.len()))
            .collect();
        let run: &[u8] = bytemuck::cast_slice(&run);
        // A buffer the device could not create does not map: its error scope reports it.
        if let Ok(mut view) = buffer.get_mapped_range_mut(..) {
            let bytes = view.len();
            for start in (0..bytes).step_by(run.len()) {
                let end = (start + run.len()).min(bytes);
                view.slice(start..end).copy_from_slice(&run[..end - start]);
            }
        }
        buffer.unmap();
    }
    buffer
}

/// Records into `encoder` a copy of `data` into the start of `target`, through a fresh buffer
/// mapped at creation: the copy runs in encoder order, so each recorded step reads its own
/// numbers however many are recorded before a submit (a `Queue::write_buffer` would land
/// before the whole submit, and a reused upload buffer would need the host to know when the
/// caller submits). `data.len()` is a multiple of 4.
pub(crate) fn upload(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    target: &wgpu::Buffer,
    data: &[u8],
) {
    let upload = buffer_init(
        device,
        "wgpu-optim step upload",
        wgpu::BufferUsages::COPY_SRC,
        data,
    );
    encoder.copy_buffer_to_buffer(&upload, 0, target, 0, data.len() as u64);
}

/// A uniform buffer of `size` bytes, written later by copies ([`upload`]).
pub(crate) fn uniform_buffer(device: &wgpu::Device, label: &str, size: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// A zeroed buffer of `bytes` (at least 16) that the engine reads and writes and the optimizer
/// binds: an arena's flat parameters or gradients.
pub(crate) fn engine_buffer(device: &wgpu::Device, label: &str, bytes: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(16),
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

/// A buffer holding `data`, with `usage` (UNIFORM, or STORAGE for read-only tables).
pub(crate) fn buffer_init(
    device: &wgpu::Device,
    label: &str,
    usage: wgpu::BufferUsages,
    data: &[u8],
) -> wgpu::Buffer {
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (data.len() as u64).max(16),
        usage,
        mapped_at_creation: true,
    });
    // A buffer the device could not create does not map: its error scope reports it.
    if !data.is_empty()
        && let Ok(mut view) = buffer.get_mapped_range_mut(..data.len() as u64)
    {
        view.copy_from_slice(data);
    }
    buffer.unmap();
    buffer
}

/// Copies `len` f32 from `buffer` at byte `offset` into a fresh staging buffer, submits, and
/// asks to map it. The returned future resolves once the device is polled past the copy.
pub(crate) fn read_f32(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: u64,
) -> impl Future<Output = Result<Vec<f32>, String>> + use<> {
    let staging = (len > 0).then(|| {
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu-optim readback"),
            size: len * 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, len * 4);
        queue.submit([encoder.finish()]);
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            sender.send(result).ok();
        });
        (staging, receiver)
    });
    async move {
        let Some((staging, receiver)) = staging else {
            return Ok(Vec::new());
        };
        match receiver.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the map callback was dropped".into()),
        }
        let data = match staging.get_mapped_range(..) {
            Ok(view) => bytemuck::cast_slice(&view).to_vec(),
            Err(e) => return Err(e.to_string()),
        };
        staging.unmap();
        Ok(data)
    }
}

/// Blocks on the device until `read_f32`'s copy is done, then returns the values.
pub(crate) fn read_f32_blocking(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: u64,
) -> Result<Vec<f32>, String> {
    let future = read_f32(device, queue, buffer, offset, len);
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| e.to_string())?;
    pollster::block_on(future)
}
