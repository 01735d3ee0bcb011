//! The optimizer step against the device's memory-bandwidth ceiling (`shared/spec/bench-output.md`).
//!
//! ```text
//! cargo bench --bench step                          # 1M, 4M and 16M elements
//! cargo bench --bench step -- --quick --json out.json
//! cargo bench --bench step -- --elements 4194304    # sizes of your choosing
//! ```
//!
//! For every size it measures a plain copy over the same bytes (`shaders/copy.wgsl`, the fastest
//! of several workgroup shapes, picked in this run) and the fused step of each kernel, all on the
//! adapter `wgpu_optim::util::request_device_blocking` picks. Every kernel is checked against the
//! CPU reference (the copy against its source) before it is timed; a wrong one is reported, not
//! timed, and the benchmark exits non-zero. The timed runs of a size take turns, one run of each
//! kernel after another, so that a noisy machine slows them all alike.

use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use wgpu_optim::testing::workgroup_grid;
use wgpu_optim::util::read_f32_blocking;
use wgpu_optim::{
    BufferView, Config, FlatParameters, FlatTensor, Optimizer, Parameter, TensorState, reference,
};

const COPY_WGSL: &str = include_str!("../shaders/copy.wgsl");
const SEED: u64 = 0x5eed_0004;

/// The copy shapes tried: (invocations per workgroup, vec4s each invocation copies). One vec4
/// per invocation suits GPUs; lavapipe (one CPU thread per workgroup) prefers large workgroups
/// that copy several (16 vec4s an invocation was no faster there than 4 or 8).
const COPY_SHAPES: [(u32, u32); 6] = [(64, 1), (256, 1), (1024, 1), (256, 4), (1024, 4), (1024, 8)];

/// One step kernel of the table: a name for the `kernel` column and the configuration.
struct StepKernel {
    name: &'static str,
    config: Config,
}

fn step_kernels() -> Vec<StepKernel> {
    let kernel = |name, config| StepKernel { name, config };
    vec![
        kernel("adam", Config::adam()),
        kernel("adamw", Config::adamw()),
        kernel("yogi", Config::yogi()),
        kernel("adam_amsgrad", Config::adam().amsgrad(true)),
    ]
}

/// Bytes an fp32 step moves per element: p, g, m, v read and p, m, v written; vmax both ways.
fn bytes_per_element(config: &Config) -> u64 {
    if config.amsgrad { 36 } else { 28 }
}

/// What a group of rows updates: `elements` in all, split into `tensors` parameter tensors.
#[derive(Clone, Copy)]
struct Workload {
    elements: u64,
    tensors: u64,
}

struct Args {
    quick: bool,
    json: Option<PathBuf>,
    elements: Option<Vec<u64>>,
    runs: Option<usize>,
}

impl Args {
    /// `--quick`, `--json PATH`, `--elements N[,N...]`, `--runs N` (timed runs per kernel,
    /// 10 to 2048); anything else (cargo passes `--bench`) is ignored.
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            quick: false,
            json: None,
            elements: None,
            runs: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match flag.as_str() {
                "--quick" => args.quick = true,
                "--json" => args.json = Some(value("--json")?.into()),
                "--elements" => {
                    let list = value("--elements")?;
                    let sizes = list
                        .split(',')
                        .map(|s| s.trim().parse::<u64>().ok().filter(|&n| n > 0))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| format!("--elements {list}: want N[,N...], each N > 0"))?;
                    args.elements = Some(sizes);
                }
                "--runs" => {
                    let n = value("--runs")?;
                    // Two timestamps a run, and a query set holds at most 4096.
                    let runs = n.parse::<usize>().ok().filter(|r| (10..=2048).contains(r));
                    args.runs = Some(runs.ok_or_else(|| format!("--runs {n}: want 10 to 2048"))?);
                }
                "--bench" => {}
                other => eprintln!("ignoring argument `{other}`"),
            }
        }
        Ok(args)
    }
}

/// The device, and how it is timed.
struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// GPU timestamp queries on the step's compute pass; else host time of submit + wait.
    timestamps: bool,
    limits: wgpu::Limits,
}

impl Gpu {
    fn wait(&self) {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("the device finishes its work");
    }

    fn storage_buffer(&self, label: &str, len: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (len * 4).max(16),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    fn write(&self, buffer: &wgpu::Buffer, offset_elements: u64, data: &[f32]) {
        if !data.is_empty() {
            self.queue
                .write_buffer(buffer, offset_elements * 4, bytemuck::cast_slice(data));
        }
    }

    fn read(&self, buffer: &wgpu::Buffer, offset_elements: u64, len: u64) -> Vec<f32> {
        read_f32_blocking(&self.device, &self.queue, buffer, offset_elements * 4, len)
            .expect("reading a buffer back")
    }
}

/// Something the benchmark times: it records one run into an encoder, in one compute pass.
trait Kernel {
    fn record(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
    );
}

/// The timed runs of one kernel.
struct Timing {
    /// Two timestamps per timed run, when the device has them.
    queries: Option<wgpu::QuerySet>,
    host_ms: Vec<f64>,
    host_us: Vec<f64>,
    /// Host time to record the step alone (no finish, no submit).
    record_us: Vec<f64>,
}

impl Timing {
    fn new(gpu: &Gpu, runs: usize) -> Self {
        let queries = gpu.timestamps.then(|| {
            gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * runs as u32,
            })
        });
        Timing {
            queries,
            host_ms: Vec::new(),
            host_us: Vec::new(),
            record_us: Vec::new(),
        }
    }

    /// Records, submits and waits for one run of `kernel`; with `timed`, keeps its times.
    fn run(&mut self, gpu: &Gpu, kernel: &mut dyn Kernel, timed: bool) {
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

    /// The median time of a run in ms (timestamps if there are any), and of recording and
    /// submitting one in us.
    fn medians(&self, gpu: &Gpu) -> (f64, f64) {
        let ms = match &self.queries {
            None => self.host_ms.clone(),
            Some(set) => {
                let count = 2 * self.host_us.len() as u32;
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
                let words = gpu.read(&resolve, 0, 2 * count as u64);
                let tick = |i: usize| {
                    (words[2 * i].to_bits() as u64) | ((words[2 * i + 1].to_bits() as u64) << 32)
                };
                let period_ns = gpu.queue.get_timestamp_period() as f64;
                (0..self.host_us.len())
                    .map(|r| tick(2 * r + 1).saturating_sub(tick(2 * r)) as f64 * period_ns / 1e6)
                    .collect()
            }
        };
        (median(ms), median(self.host_us.clone()))
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The plain copy `dst = src` of `len` f32 (a multiple of 4), in chunks the device can bind.
struct CopyKernel {
    len: u64,
    dst: wgpu::Buffer,
    /// One bind group per chunk, and the vec4s it copies.
    chunks: Vec<(wgpu::BindGroup, u64)>,
    /// One pipeline per shape of `COPY_SHAPES` the device allows.
    pipelines: Vec<((u32, u32), wgpu::ComputePipeline)>,
    /// The index in `pipelines` of the shape `record` uses.
    shape: usize,
}

impl CopyKernel {
    fn new(gpu: &Gpu, src: &wgpu::Buffer, dst: &wgpu::Buffer, len: u64) -> Self {
        let device = &gpu.device;
        let entry = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("bench copy"),
            entries: &[entry(0, true), entry(1, false)],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("bench copy"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("bench copy"),
            source: wgpu::ShaderSource::Wgsl(COPY_WGSL.into()),
        });
        let limits = &gpu.limits;
        let pipelines = COPY_SHAPES
            .iter()
            .filter(|(size, _)| {
                *size <= limits.max_compute_workgroup_size_x
                    && *size <= limits.max_compute_invocations_per_workgroup
            })
            .map(|&(size, per_invocation)| {
                let constants = [
                    ("WORKGROUP_SIZE", size as f64),
                    ("VEC4_PER_INVOCATION", per_invocation as f64),
                ];
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some("bench copy"),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some("copy"),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
                ((size, per_invocation), pipeline)
            })
            .collect();

        // Equal chunks, each a multiple of the binding alignment and no larger than a binding.
        let align = (limits.min_storage_buffer_offset_alignment as u64).max(16);
        let max_chunk =
            (limits.max_storage_buffer_binding_size as u64).min(1 << 32) / align * align;
        let bytes = len * 4;
        let chunk = bytes
            .div_ceil(bytes.div_ceil(max_chunk).max(1))
            .next_multiple_of(align);
        let chunks = (0..bytes)
            .step_by(chunk as usize)
            .map(|offset| {
                let size = chunk.min(bytes - offset);
                let range = |buffer| {
                    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset,
                        size: NonZeroU64::new(size),
                    })
                };
                let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("bench copy"),
                    layout: &layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: range(src),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: range(dst),
                        },
                    ],
                });
                (bind_group, size / 16)
            })
            .collect();
        CopyKernel {
            len,
            dst: dst.clone(),
            chunks,
            pipelines,
            shape: 0,
        }
    }

    fn shape_name(&self, shape: usize) -> String {
        let (size, per_invocation) = self.pipelines[shape].0;
        format!("workgroup {size}, {per_invocation} vec4/invocation")
    }

    /// Clears `dst`, copies with the current shape and compares `dst` with `want` (= src).
    fn verify(&mut self, gpu: &Gpu, want: &[f32]) -> Result<(), String> {
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(&self.dst, 0, None);
        self.record(gpu, &mut encoder, None);
        gpu.queue.submit([encoder.finish()]);
        let got = gpu.read(&self.dst, 0, self.len);
        match got
            .iter()
            .zip(want)
            .position(|(g, w)| g.to_bits() != w.to_bits())
        {
            None => Ok(()),
            Some(i) => Err(format!(
                "copy ({}): dst[{i}] = {:e}, src[{i}] = {:e}",
                self.shape_name(self.shape),
                got[i],
                want[i]
            )),
        }
    }
}

impl Kernel for CopyKernel {
    fn record(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
    ) {
        let ((size, per_invocation), pipeline) = &self.pipelines[self.shape];
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("bench copy"),
            timestamp_writes,
        });
        pass.set_pipeline(pipeline);
        for (bind_group, vec4s) in &self.chunks {
            let invocations = vec4s.div_ceil(*per_invocation as u64);
            let [x, y] = workgroup_grid(
                invocations,
                *size,
                gpu.limits.max_compute_workgroups_per_dimension,
            );
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
    }
}

/// One optimizer over a workload's tensors, all views of one parameter buffer.
struct Step {
    optimizer: Optimizer,
    param: wgpu::Buffer,
    /// (offset, len) of each tensor in elements.
    tensors: Vec<(u64, u64)>,
}

impl Kernel for Step {
    fn record(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites>,
    ) {
        self.optimizer
            .step_with_timestamps(&gpu.queue, encoder, timestamp_writes);
    }
}

/// `elements` split into `tensors` consecutive ranges, (offset, len) each, shaped like a
/// transformer's: weight matrices alternating with biases 1/64 their size, every length a
/// multiple of 4 but the last (which takes the remainder).
fn split(elements: u64, tensors: u64) -> Vec<(u64, u64)> {
    if tensors == 1 {
        return vec![(0, elements)];
    }
    let pairs = tensors / 2;
    let unit = (elements / (pairs * 65)).max(1);
    let bias = (unit / 4 * 4).max(4);
    let weight = (64 * unit / 4 * 4).max(4);
    let mut offset = 0;
    (0..tensors)
        .map(|i| {
            let len = if i + 1 == tensors {
                elements - offset
            } else if i % 2 == 0 {
                weight
            } else {
                bias
            };
            offset += len;
            (offset - len, len)
        })
        .collect()
}

/// The starting values of a workload: random, never zero, the state in a trained-like range.
struct Inputs {
    param: Vec<f32>,
    grad: Vec<f32>,
    state: TensorState,
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// `n` magnitudes uniform in [lo, hi), each with a random sign when `signed`.
    fn values(&mut self, n: u64, lo: f32, hi: f32, signed: bool) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let bits = self.next();
                let x = lo + (hi - lo) * ((bits >> 40) as f32 / (1u64 << 24) as f32);
                if signed && bits & 1 == 1 { -x } else { x }
            })
            .collect()
    }
}

impl Inputs {
    fn new(rng: &mut Rng, n: u64) -> Self {
        Inputs {
            param: rng.values(n, 0.01, 1.0, true),
            grad: rng.values(n, 0.01, 1.0, true),
            state: TensorState {
                exp_avg: rng.values(n, 0.001, 0.1, true),
                exp_avg_sq: rng.values(n, 0.005, 0.75, false),
                max_exp_avg_sq: Some(rng.values(n, 0.005, 0.75, false)),
            },
        }
    }
}

impl Step {
    fn new(
        gpu: &Gpu,
        kernel: &StepKernel,
        work: Workload,
        grad: &wgpu::Buffer,
    ) -> Result<Self, String> {
        let param = gpu.storage_buffer(kernel.name, work.elements);
        let tensors = split(work.elements, work.tensors);
        let optimizer = if work.tensors == 1 {
            let (offset, len) = tensors[0];
            let parameter = Parameter::new(
                "tensor0",
                BufferView::new(&param, offset, len),
                BufferView::new(grad, offset, len),
            );
            Optimizer::new(&gpu.device, kernel.config.clone(), &[parameter])
        } else {
            // The multi-tensor path: one flat buffer, biases in a group without weight decay.
            let flat = FlatParameters::new(
                BufferView::whole(&param),
                BufferView::new(grad, 0, work.elements),
                tensors
                    .iter()
                    .enumerate()
                    .map(|(i, &(offset, len))| {
                        FlatTensor::new(format!("tensor{i}"), offset, len).in_group(i % 2)
                    })
                    .collect(),
            );
            let groups = [
                kernel.config.clone(),
                kernel.config.clone().weight_decay(0.0),
            ];
            Optimizer::with_groups(&gpu.device, &groups, &[], &[flat], Default::default())
        }
        .map_err(|e| format!("{}: {e}", kernel.name))?;
        Ok(Step {
            optimizer,
            param,
            tensors,
        })
    }

    /// Uploads `inputs` (the gradient is already in place), runs the first step and compares
    /// the parameters and every state buffer with the CPU reference.
    fn verify(&mut self, gpu: &Gpu, name: &str, inputs: &Inputs) -> Result<(), String> {
        let config = self.optimizer.config().clone();
        gpu.write(&self.param, 0, &inputs.param);
        for (i, &(offset, len)) in self.tensors.iter().enumerate() {
            let range = offset as usize..(offset + len) as usize;
            let state = TensorState {
                exp_avg: inputs.state.exp_avg[range.clone()].to_vec(),
                exp_avg_sq: inputs.state.exp_avg_sq[range.clone()].to_vec(),
                max_exp_avg_sq: inputs
                    .state
                    .max_exp_avg_sq
                    .as_ref()
                    .filter(|_| config.amsgrad)
                    .map(|v| v[range].to_vec()),
            };
            // The engine's way to set a state: write the public state buffers.
            let (buffers, at) = self
                .optimizer
                .state_buffers(i)
                .map_err(|e| format!("{name}: {e}"))?;
            let write = |b: &wgpu::Buffer, v: &[f32]| {
                if !v.is_empty() {
                    gpu.queue.write_buffer(b, at * 4, bytemuck::cast_slice(v));
                }
            };
            write(&buffers.exp_avg, &state.exp_avg);
            write(&buffers.exp_avg_sq, &state.exp_avg_sq);
            if let (Some(b), Some(v)) = (&buffers.max_exp_avg_sq, &state.max_exp_avg_sq) {
                write(b, v);
            }
        }
        let t = self.optimizer.step_count() + 1;
        self.optimizer
            .step_blocking(&gpu.device, &gpu.queue)
            .map_err(|e| format!("{name}: {e}"))?;
        let got_param = gpu.read(&self.param, 0, self.param.size() / 4);

        // Tolerances for one step from f32 rounding (u = 2^-24 per operation):
        // - the moments: a few roundings of values the size of the largest one, and a missing
        //   step would move them by (1 - b) of it: 1e-5 of the largest, 1e-5 relative;
        // - param: p is rounded once or twice (4u of the largest |p|) and the update carries
        //   the moments' ~1e-6 relative error: 1e-5 of the largest update. A missing step
        //   would be off by a whole update.
        // Yogi's sign(v - g^2) can resolve a near-tie differently in f32 and f64 (about once
        // in 1e7 elements), flipping that v by 2 (1 - b2) g^2: it may miss on 1e-4 of them.
        let allowed = |len: u64| {
            if config.algorithm == wgpu_optim::Algorithm::Yogi {
                len as usize / 10_000
            } else {
                0
            }
        };
        let mut errors = Vec::new();
        for (i, &(offset, len)) in self.tensors.iter().enumerate() {
            let group = self.optimizer.tensors()[i].group;
            let config = &self.optimizer.groups()[group];
            let range = offset as usize..(offset + len) as usize;
            let before = &inputs.param[range.clone()];
            let mut want = before.to_vec();
            let mut state = TensorState {
                exp_avg: inputs.state.exp_avg[range.clone()].to_vec(),
                exp_avg_sq: inputs.state.exp_avg_sq[range.clone()].to_vec(),
                max_exp_avg_sq: config
                    .amsgrad
                    .then(|| inputs.state.max_exp_avg_sq.as_ref().unwrap()[range.clone()].to_vec()),
            };
            reference::step(
                &config,
                t,
                config.lr,
                &mut want,
                &inputs.grad[range.clone()],
                &mut state,
            );
            let got_state = self
                .optimizer
                .read_state_blocking(&gpu.device, &gpu.queue, i)
                .map_err(|e| e.to_string())?;
            let largest_update = want
                .iter()
                .zip(before)
                .fold(0.0f32, |m, (w, b)| m.max((w - b).abs()));
            let param_abs = 4.0 * f32::EPSILON / 2.0 * max_abs(before) + 1e-5 * largest_update;
            let moment = |want: &[f32]| (1e-5 * max_abs(want), 1e-5);
            let mut checks = vec![
                ("param", &got_param[range], &want[..], (param_abs, 0.0)),
                (
                    "exp_avg",
                    &got_state.exp_avg[..],
                    &state.exp_avg[..],
                    moment(&state.exp_avg),
                ),
                (
                    "exp_avg_sq",
                    &got_state.exp_avg_sq[..],
                    &state.exp_avg_sq[..],
                    moment(&state.exp_avg_sq),
                ),
            ];
            if let (Some(got), Some(want)) = (&got_state.max_exp_avg_sq, &state.max_exp_avg_sq) {
                checks.push(("max_exp_avg_sq", got, want, moment(want)));
            }
            for (what, got, want, (abs, rel)) in checks {
                if let Err(e) = compare(got, want, abs, rel, allowed(len)) {
                    errors.push(format!("{name}, tensor {i}, {what}: {e}"));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Passes when at most `allowed` elements are off by more than `abs + rel * |want|` (a NaN
/// or an infinity is always off).
fn compare(got: &[f32], want: &[f32], abs: f32, rel: f32, allowed: usize) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} elements, want {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| {
            let (g, w) = (got[i], want[i]);
            !(g.is_finite() && (g - w).abs() <= abs + rel * w.abs())
        })
        .collect();
    if bad.len() <= allowed {
        return Ok(());
    }
    let shown: Vec<String> = bad
        .iter()
        .take(3)
        .map(|&i| format!("[{i}] got {:e} want {:e}", got[i], want[i]))
        .collect();
    Err(format!(
        "{} of {} elements beyond {abs:e} + {rel:e}|want|: {}",
        bad.len(),
        got.len(),
        shown.join(", ")
    ))
}

/// One row of the table and of the JSON, as `bench-output.md` names the fields.
#[derive(Serialize)]
struct Row {
    kernel: String,
    elements: u64,
    tensors: u64,
    bytes: u64,
    median_ms: f64,
    gbps: f64,
    ceiling_ratio: Option<f64>,
    host_us: Option<f64>,
    /// For the table only: the copy's workgroup shape.
    #[serde(skip)]
    note: String,
}

#[derive(Serialize)]
struct Adapter {
    name: String,
    backend: String,
    device_type: String,
}

#[derive(Serialize)]
struct Report<'a> {
    adapter: Adapter,
    timer: &'static str,
    results: &'a [Row],
}

/// How many runs: warm-up, timed, and timed per copy shape when picking one.
struct Runs {
    warm_up: usize,
    timed: usize,
    per_shape: usize,
}

/// A kernel being timed in a workload: its table name, the bytes it moves per run and per
/// element of the workload (a step is compared with the copy of as many) and its runs.
struct Timed {
    name: String,
    bytes: u64,
    per_element: u64,
    is_copy: bool,
    note: String,
    kernel: Box<dyn Kernel>,
    timing: Timing,
}

/// Checks and times every kernel of `work`; returns its rows and the failed checks.
fn bench_workload(
    gpu: &Gpu,
    rng: &mut Rng,
    work: Workload,
    kernels: &[StepKernel],
    runs: &Runs,
) -> (Vec<Row>, Vec<String>) {
    let mut failures = Vec::new();
    let mut timed: Vec<Timed> = Vec::new();
    let n = work.elements;

    // The ceilings: a copy over the same bytes as each kind of step, through one pair of
    // buffers sized for the largest.
    let mut per_element: Vec<u64> = kernels
        .iter()
        .map(|k| bytes_per_element(&k.config))
        .collect();
    per_element.sort();
    per_element.dedup();
    let largest = (per_element.last().unwrap() * n / 8).next_multiple_of(4);
    let src_values = rng.values(largest, 0.01, 1.0, true);
    let src = gpu.storage_buffer("bench copy src", largest);
    let dst = gpu.storage_buffer("bench copy dst", largest);
    gpu.write(&src, 0, &src_values);
    for &b in &per_element {
        let len = (b * n / 8).next_multiple_of(4);
        let mut copy = CopyKernel::new(gpu, &src, &dst, len);
        // Check every shape, time each briefly, keep the fastest.
        let mut best = (f64::INFINITY, None);
        for shape in 0..copy.pipelines.len() {
            copy.shape = shape;
            if let Err(e) = copy.verify(gpu, &src_values[..len as usize]) {
                failures.push(e);
                continue;
            }
            let mut timing = Timing::new(gpu, runs.per_shape);
            timing.run(gpu, &mut copy, false);
            for _ in 0..runs.per_shape {
                timing.run(gpu, &mut copy, true);
            }
            let (ms, _) = timing.medians(gpu);
            if ms < best.0 {
                best = (ms, Some(shape));
            }
        }
        if let Some(shape) = best.1 {
            copy.shape = shape;
            timed.push(Timed {
                name: "copy".into(),
                bytes: len * 8,
                per_element: b,
                is_copy: true,
                note: copy.shape_name(shape),
                kernel: Box::new(copy),
                timing: Timing::new(gpu, runs.timed),
            });
        }
    }
    drop(src_values);

    // The steps, all over one gradient buffer (they only read it).
    let inputs = Inputs::new(rng, n);
    let grad = gpu.storage_buffer("bench grad", n);
    gpu.write(&grad, 0, &inputs.grad);
    for kernel in kernels {
        let checked = Step::new(gpu, kernel, work, &grad)
            .and_then(|mut step| step.verify(gpu, kernel.name, &inputs).map(|()| step));
        match checked {
            Ok(step) => timed.push(Timed {
                name: kernel.name.into(),
                bytes: bytes_per_element(&kernel.config) * n,
                per_element: bytes_per_element(&kernel.config),
                is_copy: false,
                note: String::new(),
                kernel: Box::new(step),
                timing: Timing::new(gpu, runs.timed),
            }),
            Err(e) => failures.push(e),
        }
    }
    drop(inputs);

    // Warm up, then take turns.
    for t in &mut timed {
        for _ in 0..runs.warm_up {
            t.timing.run(gpu, t.kernel.as_mut(), false);
        }
    }
    for _ in 0..runs.timed {
        for t in &mut timed {
            t.timing.run(gpu, t.kernel.as_mut(), true);
        }
    }

    // Each copy above the steps it is the ceiling of.
    timed.sort_by_key(|t| (t.per_element, !t.is_copy));
    let mut rows: Vec<Row> = timed
        .iter()
        .map(|t| {
            let (median_ms, host_us) = t.timing.medians(gpu);
            Row {
                kernel: t.name.clone(),
                elements: n,
                tensors: if t.is_copy { 1 } else { work.tensors },
                bytes: t.bytes,
                median_ms,
                gbps: t.bytes as f64 / (median_ms * 1e-3) / 1e9,
                ceiling_ratio: None,
                host_us: (!t.is_copy).then_some(host_us),
                note: if t.is_copy {
                    t.note.clone()
                } else {
                    format!("record {:.1} us", median(t.timing.record_us.clone()))
                },
            }
        })
        .collect();
    for (i, t) in timed.iter().enumerate() {
        if !t.is_copy {
            let copy = timed
                .iter()
                .position(|c| c.is_copy && c.per_element == t.per_element);
            rows[i].ceiling_ratio = copy.map(|c| rows[i].gbps / rows[c].gbps);
        }
    }
    (rows, failures)
}

fn print_header() {
    println!(
        "{:<14} {:>10} {:>7} {:>9} {:>10} {:>8} {:>8} {:>9}  note",
        "kernel", "elements", "tensors", "MB/step", "median ms", "GB/s", "ceiling", "host us"
    );
}

fn print_row(r: &Row) {
    let ratio = r.ceiling_ratio.map_or("-".into(), |x| format!("{x:.3}"));
    let host = r.host_us.map_or("-".into(), |x| format!("{x:.1}"));
    println!(
        "{:<14} {:>10} {:>7} {:>9.1} {:>10.3} {:>8.2} {:>8} {:>9}  {}",
        r.kernel,
        r.elements,
        r.tensors,
        r.bytes as f64 / 1e6,
        r.median_ms,
        r.gbps,
        ratio,
        host,
        r.note
    );
}

fn main() {
    let args = match Args::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let (adapter, device, queue) = match wgpu_optim::util::request_device_blocking() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let info = adapter.get_info();
    let gpu = Gpu {
        timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
        limits: device.limits(),
        device,
        queue,
    };
    let sizes = args.elements.clone().unwrap_or(if args.quick {
        vec![1 << 18, 1 << 20]
    } else {
        vec![1 << 20, 1 << 22, 1 << 24]
    });
    let mut runs = if args.quick {
        Runs {
            warm_up: 2,
            timed: 10,
            per_shape: 3,
        }
    } else {
        Runs {
            warm_up: 3,
            timed: 15,
            per_shape: 5,
        }
    };
    if let Some(n) = args.runs {
        runs.timed = n;
    }
    let timer = if gpu.timestamps { "timestamp" } else { "host" };
    let software = if info.device_type == wgpu::DeviceType::Cpu {
        " - a software driver: the figures measure the CPU"
    } else {
        ""
    };
    println!(
        "adapter: {} ({:?}, {:?}){software}",
        info.name, info.backend, info.device_type
    );
    println!("driver: {} {}", info.driver, info.driver_info);
    println!(
        "timer: {} ({}), median of {} runs after {} warm-up",
        timer,
        if gpu.timestamps {
            "GPU timestamp queries around the compute pass"
        } else {
            "host time from submit to the end of a blocking poll"
        },
        runs.timed,
        runs.warm_up
    );
    println!("ceiling: copy over the same bytes; ceiling = GB/s / copy GB/s");
    println!();
    print_header();

    // Each size as one tensor, and as 1000 tensors in one flat buffer (one dispatch).
    let workloads: Vec<Workload> = sizes
        .iter()
        .flat_map(|&elements| [1, 1000].map(|tensors| Workload { elements, tensors }))
        .collect();
    let kernels = step_kernels();
    let mut rng = Rng(SEED);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &work in &workloads {
        let (new_rows, new_failures) = bench_workload(&gpu, &mut rng, work, &kernels, &runs);
        for r in &new_rows {
            print_row(r);
        }
        for f in &new_failures {
            println!("FAILED CHECK, not timed: {f}");
        }
        rows.extend(new_rows);
        failures.extend(new_failures);
    }

    if let Some(path) = &args.json {
        let report = Report {
            adapter: Adapter {
                name: info.name.clone(),
                backend: format!("{:?}", info.backend).to_lowercase(),
                device_type: format!("{:?}", info.device_type).to_lowercase(),
            },
            timer,
            results: &rows,
        };
        let text = serde_json::to_string_pretty(&report).expect("the report serializes");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("error: writing {}: {e}", path.display());
            std::process::exit(1);
        }
        println!("\nwrote {}", path.display());
    }
    if !failures.is_empty() {
        eprintln!(
            "{} kernel(s) failed their check against the CPU reference",
            failures.len()
        );
        std::process::exit(1);
    }
}
