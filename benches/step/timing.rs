//! Timing: one run of a kernel, a kernel's timed runs, and paired rounds.
//!
//! A shared machine slows the runs of one moment all alike, so the kernels that are compared
//! (a step with its ceilings, a 1000-tensor step with its one-tensor twin) run back to back,
//! in turns, round after round, and each ratio is the median of the per-round ratios, with its
//! interquartile range.

use std::time::Instant;

use crate::gpu::Gpu;

/// Something the benchmark times: it records one run into an encoder, in one compute pass.
pub trait Kernel {
    fn record(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
    );
}

/// The timed runs of one kernel, in order.
pub struct Timer {
    /// Two timestamps per timed run, when the device has them.
    queries: Option<wgpu::QuerySet>,
    capacity: usize,
    /// Host time from submit to the end of the wait.
    host_ms: Vec<f64>,
    /// Host time to record, finish and submit.
    host_us: Vec<f64>,
    /// Host time to record alone.
    record_us: Vec<f64>,
}

impl Timer {
    /// A timer for up to `capacity` timed runs.
    pub fn new(gpu: &Gpu, capacity: usize) -> Self {
        let queries = gpu.timestamps.then(|| {
            gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * capacity as u32,
            })
        });
        Timer {
            queries,
            capacity,
            host_ms: Vec::new(),
            host_us: Vec::new(),
            record_us: Vec::new(),
        }
    }

    /// Records, submits and waits for one run of `kernel`; with `timed`, keeps its times.
    pub fn run(&mut self, gpu: &Gpu, kernel: &mut dyn Kernel, timed: bool) {
        let timed = timed && self.host_us.len() < self.capacity;
        let index = 2 * self.host_us.len() as u32;
        let writes = self.queries.as_ref().filter(|_| timed).map(|query_set| {
            wgpu::ComputePassTimestampWrites {
                query_set,
                beginning_of_pass_write_index: Some(index),
                end_of_pass_write_index: Some(index + 1),
            }
        });
        let start = Instant::now();
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        kernel.record(gpu, &mut encoder, writes);
        let recorded = start.elapsed();
        let commands = encoder.finish();
        let submitted = Instant::now();
        gpu.queue.submit([commands]);
        let host = start.elapsed();
        gpu.wait();
        let done = submitted.elapsed();
        if timed {
            self.host_us.push(host.as_secs_f64() * 1e6);
            self.record_us.push(recorded.as_secs_f64() * 1e6);
            self.host_ms.push(done.as_secs_f64() * 1e3);
        }
    }

    /// The time of each timed run in ms, in order: GPU timestamps if there are any.
    pub fn times_ms(&self, gpu: &Gpu) -> Result<Vec<f64>, String> {
        let Some(set) = &self.queries else {
            return Ok(self.host_ms.clone());
        };
        let count = 2 * self.host_us.len() as u32;
        if count == 0 {
            return Ok(Vec::new());
        }
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench timestamps"),
            size: count as u64 * wgpu::QUERY_SIZE as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.resolve_query_set(set, 0..count, &resolve, 0);
        gpu.queue.submit([encoder.finish()]);
        // Each u64 timestamp is read back as two f32 words (little-endian).
        let words = gpu.read(&resolve, 0, 2 * count as u64)?;
        let tick = |i: usize| {
            (words[2 * i].to_bits() as u64) | ((words[2 * i + 1].to_bits() as u64) << 32)
        };
        let period_ns = gpu.queue.get_timestamp_period() as f64;
        Ok((0..self.host_us.len())
            .map(|r| tick(2 * r + 1).saturating_sub(tick(2 * r)) as f64 * period_ns / 1e6)
            .collect())
    }

    /// Median host time to record and submit one run, and to record it alone, in us.
    pub fn host_us(&self) -> (f64, f64) {
        (
            Quartiles::of(&self.host_us).median,
            Quartiles::of(&self.record_us).median,
        )
    }
}

/// One member of a block of [`paired_rounds`]: which kernel, and the timer of its runs in
/// this block.
pub struct Slot {
    pub kernel: usize,
    pub timer: Timer,
}

/// Runs the blocks one after the other, round after round: `warm_up` untimed rounds, then
/// `timed` timed ones. A block is the kernels compared with each other (a step, its ceilings,
/// its 1000-tensor twin); they run back to back, the order rotating by one each round so that
/// no kernel always follows the same one. Run `r` of every slot of a block is from round `r`.
/// `done(k)` is called after each run of `kernels[k]`.
pub fn paired_rounds(
    gpu: &Gpu,
    kernels: &mut [&mut dyn Kernel],
    blocks: &mut [Vec<Slot>],
    warm_up: usize,
    timed: usize,
    done: &mut dyn FnMut(usize),
) {
    for round in 0..warm_up + timed {
        for block in blocks.iter_mut() {
            let n = block.len();
            for k in 0..n {
                let slot = &mut block[(round + k) % n];
                slot.timer
                    .run(gpu, &mut *kernels[slot.kernel], round >= warm_up);
                done(slot.kernel);
            }
        }
    }
}

/// The median and quartiles of some figures (linear interpolation between order statistics).
#[derive(Clone, Copy, Debug)]
pub struct Quartiles {
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
}

impl Quartiles {
    /// NaN for no figures.
    pub fn of(xs: &[f64]) -> Self {
        let mut xs = xs.to_vec();
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if xs.is_empty() {
                return f64::NAN;
            }
            let h = q * (xs.len() - 1) as f64;
            let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
            xs[lo] + (h - lo as f64) * (xs[hi] - xs[lo])
        };
        Quartiles {
            q1: at(0.25),
            median: at(0.5),
            q3: at(0.75),
        }
    }

    /// Of the per-round ratios `f(a[r], b[r])` of two kernels timed in the same rounds.
    pub fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Self {
        let ratios: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
        Quartiles::of(&ratios)
    }
}
