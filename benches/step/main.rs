//! The optimizer step against the device's memory-bandwidth ceilings (`shared/spec/bench-output.md`).
//!
//! ```text
//! cargo bench --bench step                          # 1M, 4M and 16M elements
//! cargo bench --bench step -- --quick --json out.json
//! cargo bench --bench step -- --elements 4194304    # sizes of your choosing
//! ```
//!
//! For every size, each kind of step (the 28-byte steps, and amsgrad's 36) is timed with its
//! two ceilings: `copy`, a plain copy of as many bytes, and `traffic`, the step's own loads and
//! stores with trivial arithmetic (`ceilings.rs`). Every kernel is checked before it is timed
//! (`verify.rs`); a wrong one is reported, not timed, and the benchmark exits 1. Then the
//! timing: a block per step kernel and size (its copy, its traffic kernel, the step on one
//! tensor and on 1000) runs back to back, and every block runs once a round, the rounds
//! spreading each ratio's runs over the whole benchmark. Each ratio is the median of the
//! per-round ratios (`timing.rs`), so that a noisy machine slows both sides of a ratio alike.
//! `output.rs` prints the table and writes the JSON.
//!
//! Modules: `args` (command line), `gpu` (device and buffers), `ceilings` (copy and traffic
//! kernels, the benchmark's own pipelines), `steps` (the optimizers timed, through the
//! library's public API), `timing`, `verify`, `output`.

mod args;
mod ceilings;
mod gpu;
mod output;
mod steps;
mod timing;
mod verify;

use args::{Args, Runs};
use ceilings::Ceiling;
use gpu::Gpu;
use output::{Adapter, Progress, Report, Row};
use steps::{MULTI_TENSORS, Step, StepKernel, bytes_per_element, step_kernels};
use timing::{Kernel, Quartiles, Slot, Timer, paired_rounds};
use verify::Inputs;
use wgpu_optim::testing::Rng;

const SEED: u64 = 0x5eed_0004;

/// For the progress bar: checking a step against the CPU reference takes about as long as
/// this many runs of it.
const CHECK_RUNS: u64 = 10;

fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
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
    let gpu = Gpu::new(device, queue);
    let sizes = args.sizes();
    let runs = args.runs();
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
        "timer: {timer} ({}); {} paired rounds after {} warm-up",
        if gpu.timestamps {
            "GPU timestamp queries around each compute pass"
        } else {
            "host time from submit to the end of a blocking poll"
        },
        runs.timed,
        runs.warm_up
    );
    println!(
        "ratios: median of per-round ratios (IQR beside it); copy = GB/s over a copy's GB/s, \
         traf = over the traffic kernel's, vs 1 = time over the one-tensor twin's"
    );
    println!();
    println!("{}", output::header());

    let kernels = step_kernels();
    let mut classes: Vec<u64> = kernels
        .iter()
        .map(|k| bytes_per_element(&k.config))
        .collect();
    classes.sort();
    classes.dedup();
    let planned = planned_bytes(&sizes, &classes, &kernels, &runs, &gpu.limits);
    let progress = Progress::new(planned);

    // Check every kernel and pick the ceilings' shapes, size by size; then time everything in
    // rounds, so that each ratio's runs spread over the whole benchmark.
    let mut rng = Rng::new(SEED);
    let mut failures = Vec::new();
    let mut prepared = Vec::new();
    for &n in &sizes {
        progress.message(format!("{n} elements: inputs"));
        let inputs = Inputs::new(&mut rng, n);
        let grad = gpu.storage_buffer("bench grad", n);
        gpu.write(&grad, 0, &inputs.grad);
        for &class in &classes {
            let class_kernels: Vec<&StepKernel> = kernels
                .iter()
                .filter(|k| bytes_per_element(&k.config) == class)
                .collect();
            let class = Class {
                elements: n,
                bytes_per_element: class,
                kernels: class_kernels,
            };
            let (ready, new_failures) =
                prepare(&gpu, &mut rng, class, &inputs, &grad, &runs, &progress);
            for f in &new_failures {
                progress.println(&format!("FAILED CHECK, not timed: {f}"));
            }
            failures.extend(new_failures);
            prepared.extend(ready);
        }
    }

    progress.message("timing".into());
    let mut blocks = Vec::new();
    let mut bytes = Vec::new();
    {
        let mut members: Vec<&mut dyn Kernel> = Vec::new();
        for p in &mut prepared {
            let base = members.len();
            p.first_block = blocks.len();
            p.first_kernel = base;
            blocks.extend(p.blocks(&gpu, runs.timed));
            let run_bytes = p.class.bytes_per_element * p.class.elements;
            for k in p.kernels() {
                members.push(k);
                bytes.push(run_bytes);
            }
        }
        paired_rounds(
            &gpu,
            &mut members,
            &mut blocks,
            runs.warm_up,
            runs.timed,
            &mut |k| progress.inc(bytes[k]),
        );
    }
    let mut rows = Vec::new();
    for p in &prepared {
        match p.rows(
            &gpu,
            &blocks[p.first_block..p.first_block + p.class.kernels.len()],
        ) {
            Ok(new_rows) => rows.extend(new_rows),
            Err(e) => failures.push(e),
        }
    }
    progress.finish();
    for r in &rows {
        println!("{}", output::line(r));
    }
    for f in &failures {
        println!("FAILED CHECK, not timed: {f}");
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
        if let Err(e) = report.write(path) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        println!("\nwrote {}", path.display());
    }
    if !failures.is_empty() {
        eprintln!(
            "{} kernel(s) failed their check and were not timed",
            failures.len()
        );
        std::process::exit(1);
    }
}

/// The bytes the runs of the whole benchmark move, for the progress bar: per size and class,
/// one checked step per kernel and workload, each ceiling's shapes checked once and picked
/// with `per_shape + 1` runs, and the paired rounds.
fn planned_bytes(
    sizes: &[u64],
    classes: &[u64],
    kernels: &[StepKernel],
    runs: &Runs,
    limits: &wgpu::Limits,
) -> u64 {
    let shapes = ceilings::shape_count(limits) as u64;
    let mut bytes = 0;
    for &n in sizes {
        for &class in classes {
            let k = kernels
                .iter()
                .filter(|k| bytes_per_element(&k.config) == class)
                .count() as u64;
            // The copy's shapes checked and picked; the traffic kernel's one shape checked.
            let per_ceiling = shapes * (2 + runs.per_shape as u64) + 1;
            // A block per kernel: copy, traffic, one tensor, many.
            let rounds = 4 * k * (runs.warm_up + runs.timed) as u64;
            bytes += (2 * k * CHECK_RUNS + per_ceiling + rounds) * class * n;
        }
    }
    bytes
}

/// The steps of one size that move as many bytes per element, timed together with their
/// ceilings.
struct Class<'a> {
    elements: u64,
    bytes_per_element: u64,
    kernels: Vec<&'a StepKernel>,
}

/// A step of the class that passed its check: which kernel, on how many tensors.
struct Checked<'a> {
    kernel: &'a StepKernel,
    tensors: u64,
    step: Step,
}

/// A class whose kernels passed their checks, ready to be timed: the ceilings in their
/// picked shapes and the steps.
struct Prepared<'a> {
    class: Class<'a>,
    copy: Option<Ceiling>,
    traffic: Option<Ceiling>,
    steps: Vec<Checked<'a>>,
    /// Where this class's blocks (one per kernel of the class) and kernels start in
    /// `paired_rounds`'s.
    first_block: usize,
    first_kernel: usize,
}

/// Checks the class's steps (each on one tensor and on `MULTI_TENSORS`) and its two ceilings,
/// and picks each ceiling's shape. Returns the class ready to time (`None` if no step passed)
/// and the failed checks.
fn prepare<'a>(
    gpu: &Gpu,
    rng: &mut Rng,
    class: Class<'a>,
    inputs: &Inputs,
    grad: &wgpu::Buffer,
    runs: &Runs,
    progress: &Progress,
) -> (Option<Prepared<'a>>, Vec<String>) {
    let n = class.elements;
    let run_bytes = class.bytes_per_element * n;
    let mut failures = Vec::new();

    progress.message(format!("{n} elements: checking the steps"));
    let mut steps: Vec<Checked> = Vec::new();
    for tensors in [1, MULTI_TENSORS] {
        for &kernel in &class.kernels {
            let checked = Step::new(gpu, kernel, n, tensors, grad)
                .and_then(|mut step| verify::step(gpu, &mut step, kernel, inputs).map(|()| step));
            match checked {
                Ok(step) => steps.push(Checked {
                    kernel,
                    tensors,
                    step,
                }),
                Err(e) => failures.push(e),
            }
            progress.inc(CHECK_RUNS * run_bytes);
        }
    }
    if steps.is_empty() {
        return (None, failures);
    }

    // The copy of as many bytes.
    progress.message(format!("{n} elements: copy shapes"));
    let len = (run_bytes / 8).next_multiple_of(4);
    let src_values = verify::values(rng, len, 0.01, 1.0, true);
    let src = gpu.storage_buffer("bench copy src", len);
    let dst = gpu.storage_buffer("bench copy dst", len);
    gpu.write(&src, 0, &src_values);
    let mut copy = Ceiling::copy(gpu, &src, &dst, len);
    let (passed, copy_failures) = verify::copy_shapes(gpu, &mut copy, &dst, &src_values);
    drop(src_values);
    progress.inc(copy.shapes() as u64 * run_bytes);
    failures.extend(copy_failures);
    let copy = pick(gpu, copy, &passed, runs, progress, run_bytes, &mut failures);

    // The traffic kernel over the first one-tensor step's buffers.
    progress.message(format!("{n} elements: traffic shapes"));
    let mut traffic = None;
    if let Some(first) = steps.iter().find(|s| s.tensors == 1) {
        match first.step.buffers(grad) {
            Ok(buffers) if n >= 4 => {
                let mut kernel = Ceiling::traffic(gpu, &buffers, n / 4 * 4);
                let (passed, traffic_failures) = verify::traffic_shapes(gpu, &mut kernel, &buffers);
                progress.inc(kernel.shapes() as u64 * run_bytes);
                failures.extend(traffic_failures);
                traffic = pick(
                    gpu,
                    kernel,
                    &passed,
                    runs,
                    progress,
                    run_bytes,
                    &mut failures,
                );
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("traffic: {e}")),
        }
    }
    let prepared = Prepared {
        class,
        copy,
        traffic,
        steps,
        first_block: 0,
        first_kernel: 0,
    };
    (Some(prepared), failures)
}

impl Prepared<'_> {
    /// The kernels to time, in the order `blocks` numbers them: copy and traffic where they
    /// passed their checks, then the steps.
    fn kernels(&mut self) -> impl Iterator<Item = &mut dyn Kernel> {
        let copy = self.copy.iter_mut().map(|c| c as &mut dyn Kernel);
        let traffic = self.traffic.iter_mut().map(|t| t as &mut dyn Kernel);
        let steps = self
            .steps
            .iter_mut()
            .map(|s| &mut s.step as &mut dyn Kernel);
        copy.chain(traffic).chain(steps)
    }

    /// The number `kernels` gives the copy, the traffic kernel and step `i`, from `base`.
    fn ids(&self, base: usize) -> (Option<usize>, Option<usize>, impl Fn(usize) -> usize) {
        let copy = self.copy.as_ref().map(|_| base);
        let ceilings = self.copy.iter().count() + self.traffic.iter().count();
        let traffic = self.traffic.as_ref().map(|_| base + ceilings - 1);
        (copy, traffic, move |i| base + ceilings + i)
    }

    /// A block per step kernel of the class: copy, traffic, one tensor, 1000 tensors (those
    /// that passed their checks), numbered from `first_kernel`.
    fn blocks(&self, gpu: &Gpu, timed: usize) -> Vec<Vec<Slot>> {
        let (copy, traffic, step) = self.ids(self.first_kernel);
        self.class
            .kernels
            .iter()
            .map(|kernel| {
                let own = self
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.kernel.name == kernel.name)
                    .map(|(i, _)| step(i));
                copy.into_iter()
                    .chain(traffic)
                    .chain(own)
                    .map(|kernel| Slot {
                        kernel,
                        timer: Timer::new(gpu, timed),
                    })
                    .collect()
            })
            .collect()
    }

    /// The rows of the class from its timed `blocks`: copy, traffic, then the steps, every
    /// kernel on one tensor and then on many.
    fn rows(&self, gpu: &Gpu, blocks: &[Vec<Slot>]) -> Result<Vec<Row>, String> {
        let (copy_id, traffic_id, step_id) = self.ids(self.first_kernel);
        let n = self.class.elements;
        let run_bytes = self.class.bytes_per_element * n;
        let mut times: Vec<Vec<(usize, Vec<f64>, &Timer)>> = Vec::new();
        for block in blocks {
            let mut block_times = Vec::new();
            for slot in block {
                let t = slot
                    .timer
                    .times_ms(gpu)
                    .map_err(|e| format!("reading the timestamps: {e}"))?;
                block_times.push((slot.kernel, t, &slot.timer));
            }
            times.push(block_times);
        }
        let all_runs = |id: Option<usize>| -> Vec<f64> {
            times
                .iter()
                .flatten()
                .filter(|(k, _, _)| Some(*k) == id)
                .flat_map(|(_, t, _)| t.iter().copied())
                .collect()
        };
        let median = |t: &[f64]| Quartiles::of(t).median;

        let mut rows = Vec::new();
        let ceiling_row = |c: &Ceiling, t: &[f64]| {
            let mut row = Row::f32(c.which.name(), n, 1, c.bytes, median(t));
            row.note = c.shape_name(c.shape);
            row
        };
        if let Some(c) = &self.copy {
            rows.push(ceiling_row(c, &all_runs(copy_id)));
        }
        if let Some(t) = &self.traffic {
            let traffic_ms = all_runs(traffic_id);
            let mut row = ceiling_row(t, &traffic_ms);
            if let Some(c) = &self.copy {
                let q = Quartiles::paired(&traffic_ms, &all_runs(copy_id), |t_ms, c_ms| {
                    (t.bytes as f64 / t_ms) / (c.bytes as f64 / c_ms)
                });
                row.note = format!("{:.3} of copy; {}", q.median, row.note);
            }
            rows.push(row);
        }
        for (i, s) in self.steps.iter().enumerate() {
            let block = times
                .iter()
                .find(|b| b.iter().any(|(k, _, _)| *k == step_id(i)))
                .ok_or("a step was not timed")?;
            let in_block = |id: Option<usize>| block.iter().find(|(k, _, _)| Some(*k) == id);
            let (_, t, timer) = in_block(Some(step_id(i))).ok_or("a step was not timed")?;
            let mut row = Row::f32(s.kernel.name, n, s.tensors, run_bytes, median(t));
            let gbps_over = |other_bytes: u64, other: &[f64]| {
                Quartiles::paired(t, other, |s_ms, o_ms| {
                    (run_bytes as f64 / s_ms) / (other_bytes as f64 / o_ms)
                })
            };
            if let (Some(c), Some((_, c_ms, _))) = (&self.copy, in_block(copy_id)) {
                (row.ceiling_ratio, row.ratio_iqr) = output::split(gbps_over(c.bytes, c_ms));
            }
            if let (Some(tr), Some((_, tr_ms, _))) = (&self.traffic, in_block(traffic_id)) {
                (row.traffic_ratio, row.traffic_iqr) = output::split(gbps_over(tr.bytes, tr_ms));
            }
            if s.tensors > 1 {
                let twin = self
                    .steps
                    .iter()
                    .position(|o| o.tensors == 1 && o.kernel.name == s.kernel.name);
                if let Some((_, one_ms, _)) = twin.and_then(|j| in_block(Some(step_id(j)))) {
                    let q = Quartiles::paired(t, one_ms, |a, b| a / b);
                    (row.vs_one_tensor, row.vs_one_iqr) = output::split(q);
                }
            }
            let (host_us, record_us) = timer.host_us();
            row.host_us = Some(host_us);
            row.record_us = Some(record_us);
            rows.push(row);
        }
        Ok(rows)
    }
}

/// The ceiling in the fastest of the `passed` shapes, or `None` when none passed its check.
fn pick(
    gpu: &Gpu,
    mut ceiling: Ceiling,
    passed: &[usize],
    runs: &Runs,
    progress: &Progress,
    run_bytes: u64,
    failures: &mut Vec<String>,
) -> Option<Ceiling> {
    if passed.is_empty() {
        return None;
    }
    let picked = ceiling.pick_shape(gpu, passed, runs.per_shape, &mut || progress.inc(run_bytes));
    match picked {
        Ok(()) => Some(ceiling),
        Err(e) => {
            failures.push(format!("{}: {e}", ceiling.which.name()));
            None
        }
    }
}
