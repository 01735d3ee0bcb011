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
//! stores with trivial arithmetic (`ceilings.rs`). AdamW is also timed with the pre-step
//! features (`max_grad_norm`, `loss_scale`, both: 32 bytes, the step's 28 and the norm pass's
//! gradient read) against the plain AdamW step. Every kernel is checked before it is timed
//! (`verify.rs`); a wrong one is reported, not timed, and the benchmark exits 1. Then the
//! timing: a block per plain step kernel and size (its copy, its traffic kernel, the step on
//! one tensor and on 1000) and, for AdamW, a block per tensor count (the plain step and the
//! three with features) run back to back, and every block runs once a round, the rounds
//! spreading each ratio's runs over the whole benchmark. Each ratio is the median of the
//! per-round ratios (`timing.rs`), so that a noisy machine slows both sides of a ratio alike;
//! a feature row's ratios to copy and traffic pair it with the plain AdamW block's ceilings of
//! the same round. `output.rs` prints the table and writes the JSON.
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
use steps::{
    MULTI_TENSORS, Step, StepKernel, bytes_per_element, loss_scale, step_kernels, step_pass_bytes,
};
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
         traf = over the traffic kernel's, vs 1 = time over the one-tensor twin's, plain = \
         time over the plain step's on as many tensors"
    );
    println!();
    println!("{}", output::header());

    let kernels = step_kernels();
    let mut classes: Vec<u64> = kernels.iter().map(|k| step_pass_bytes(&k.config)).collect();
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
        // The loss-scale rows' gradient: the same, times S.
        let mut scaled = None;
        if kernels.iter().any(|k| k.config.loss_scale.is_some()) {
            match inputs.scaled_grad(loss_scale()) {
                Ok(g) => {
                    let buffer = gpu.storage_buffer("bench grad x S", n);
                    gpu.write(&buffer, 0, &g);
                    scaled = Some(buffer);
                }
                Err(e) => {
                    let f = format!("{n} elements, loss scaling: {e}");
                    progress.println(&format!("FAILED CHECK, not timed: {f}"));
                    failures.push(f);
                }
            }
        }
        let grads = Grads {
            plain: &grad,
            scaled: scaled.as_ref(),
        };
        for &class in &classes {
            let class_kernels: Vec<&StepKernel> = kernels
                .iter()
                .filter(|k| step_pass_bytes(&k.config) == class)
                .collect();
            let class = Class {
                elements: n,
                bytes_per_element: class,
                kernels: class_kernels,
            };
            let (ready, new_failures) =
                prepare(&gpu, &mut rng, class, &inputs, grads, &runs, &progress);
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
            let new_blocks = p.blocks(&gpu, runs.timed);
            p.block_count = new_blocks.len();
            blocks.extend(new_blocks);
            bytes.extend(p.kernel_bytes());
            members.extend(p.kernels());
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
        match p.rows(&gpu, &blocks[p.first_block..p.first_block + p.block_count]) {
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
    let rounds = (runs.warm_up + runs.timed) as u64;
    let mut bytes = 0;
    for &n in sizes {
        for &class in classes {
            let ks: Vec<&StepKernel> = kernels
                .iter()
                .filter(|k| step_pass_bytes(&k.config) == class)
                .collect();
            // Every step on one tensor and on many.
            let steps: u64 = ks.iter().map(|k| 2 * bytes_per_element(&k.config)).sum();
            // The copy's shapes checked and picked; the traffic kernel's one shape checked.
            let per_ceiling = (shapes * (2 + runs.per_shape as u64) + 1) * class;
            // A block per plain kernel (copy, traffic, one tensor, many) and, for a plain
            // kernel with features, one per tensor count (the plain step, those with features).
            let plain = ks.iter().filter(|k| k.is_plain());
            let ceilings = 2 * plain.clone().count() as u64 * class;
            let twins: u64 = plain
                .filter(|p| ks.iter().any(|k| !k.is_plain() && k.name == p.name))
                .map(|p| 2 * bytes_per_element(&p.config))
                .sum();
            bytes += (CHECK_RUNS * steps + per_ceiling + rounds * (ceilings + steps + twins)) * n;
        }
    }
    bytes
}

/// The steps of one size whose per-element pass moves as many bytes per element, timed
/// together with their ceilings (which move as many; a pass before the step adds its own).
struct Class<'a> {
    elements: u64,
    /// The step pass's bytes per element: the ceilings'.
    bytes_per_element: u64,
    kernels: Vec<&'a StepKernel>,
}

/// A step of the class that passed its check: which kernel, on how many tensors.
struct Checked<'a> {
    kernel: &'a StepKernel,
    tensors: u64,
    step: Step,
}

/// The gradients of a size: the random one, and the same times S for the loss-scale rows
/// (`None` if that overflowed).
#[derive(Clone, Copy)]
struct Grads<'a> {
    plain: &'a wgpu::Buffer,
    scaled: Option<&'a wgpu::Buffer>,
}

impl<'a> Grads<'a> {
    fn of(&self, kernel: &StepKernel) -> Result<&'a wgpu::Buffer, String> {
        if kernel.config.loss_scale.is_none() {
            Ok(self.plain)
        } else {
            self.scaled
                .ok_or_else(|| format!("{}: no scaled gradient", kernel.label()))
        }
    }
}

/// A class whose kernels passed their checks, ready to be timed: the ceilings in their
/// picked shapes and the steps.
struct Prepared<'a> {
    class: Class<'a>,
    copy: Option<Ceiling>,
    traffic: Option<Ceiling>,
    steps: Vec<Checked<'a>>,
    /// Where this class's blocks and kernels start in `paired_rounds`'s, and how many blocks
    /// it has.
    first_block: usize,
    first_kernel: usize,
    block_count: usize,
}

/// Checks the class's steps (each on one tensor and on `MULTI_TENSORS`) and its two ceilings,
/// and picks each ceiling's shape. Returns the class ready to time (`None` if no step passed)
/// and the failed checks.
fn prepare<'a>(
    gpu: &Gpu,
    rng: &mut Rng,
    class: Class<'a>,
    inputs: &Inputs,
    grads: Grads,
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
            let checked = grads
                .of(kernel)
                .and_then(|grad| Step::new(gpu, kernel, n, tensors, grad))
                .and_then(|mut step| verify::step(gpu, &mut step, kernel, inputs).map(|()| step));
            match checked {
                Ok(step) => steps.push(Checked {
                    kernel,
                    tensors,
                    step,
                }),
                Err(e) => failures.push(e),
            }
            progress.inc(CHECK_RUNS * bytes_per_element(&kernel.config) * n);
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

    // The traffic kernel over the first plain one-tensor step's buffers.
    progress.message(format!("{n} elements: traffic shapes"));
    let mut traffic = None;
    if let Some(first) = steps
        .iter()
        .find(|s| s.tensors == 1 && s.kernel.config.loss_scale.is_none())
    {
        match first.step.buffers(grads.plain) {
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
        block_count: 0,
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

    /// The bytes each of `kernels` moves per run, in its order.
    fn kernel_bytes(&self) -> Vec<u64> {
        let n = self.class.elements;
        let ceilings = self.copy.iter().chain(&self.traffic).map(|c| c.bytes);
        let steps = self
            .steps
            .iter()
            .map(|s| bytes_per_element(&s.kernel.config) * n);
        ceilings.chain(steps).collect()
    }

    /// The step `i`'s twin without features on as many tensors, if it passed its check.
    fn plain_twin(&self, i: usize) -> Option<usize> {
        let s = &self.steps[i];
        self.steps.iter().position(|o| {
            o.kernel.is_plain() && o.kernel.name == s.kernel.name && o.tensors == s.tensors
        })
    }

    /// The blocks of the class, numbered from `first_kernel`: one per plain step kernel (copy,
    /// traffic, one tensor, 1000 tensors: those that passed their checks), then one per kernel
    /// name with features and tensor count (the plain step and the steps with features).
    fn blocks(&self, gpu: &Gpu, timed: usize) -> Vec<Vec<Slot>> {
        let (copy, traffic, step) = self.ids(self.first_kernel);
        let slots = |ids: Vec<usize>| -> Vec<Slot> {
            ids.into_iter()
                .map(|kernel| Slot {
                    kernel,
                    timer: Timer::new(gpu, timed),
                })
                .collect()
        };
        let mut blocks: Vec<Vec<Slot>> = self
            .class
            .kernels
            .iter()
            .filter(|k| k.is_plain())
            .map(|kernel| {
                let own = self
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| std::ptr::eq(s.kernel, *kernel))
                    .map(|(i, _)| step(i));
                slots(copy.into_iter().chain(traffic).chain(own).collect())
            })
            .collect();
        let mut featured: Vec<(&str, u64)> = Vec::new();
        for s in self.steps.iter().filter(|s| !s.kernel.is_plain()) {
            if !featured.contains(&(s.kernel.name, s.tensors)) {
                featured.push((s.kernel.name, s.tensors));
            }
        }
        for (name, tensors) in featured {
            let ids = self
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.kernel.name == name && s.tensors == tensors)
                .filter(|(i, s)| !s.kernel.is_plain() || self.plain_twin(*i) == Some(*i))
                .map(|(i, _)| step(i))
                .collect();
            blocks.push(slots(ids));
        }
        blocks
    }

    /// The rows of the class from its timed `blocks`: copy, traffic, then the steps, every
    /// kernel on one tensor and then on many. A step's time and ratios come from the first
    /// block it is in (its own); where that block lacks the other side of a ratio (a step with
    /// features: the copy, the traffic kernel, the one-tensor twin), the other side's runs
    /// come from the block of the plain twin (or the other side's own block), of the same
    /// rounds.
    fn rows(&self, gpu: &Gpu, blocks: &[Vec<Slot>]) -> Result<Vec<Row>, String> {
        let (copy_id, traffic_id, step_id) = self.ids(self.first_kernel);
        let n = self.class.elements;
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
        // The first block kernel `id` is in, and its runs and timer in block `b`.
        let home = |id: usize| {
            times
                .iter()
                .position(|b| b.iter().any(|(k, _, _)| *k == id))
        };
        let in_block = |b: Option<usize>, id: Option<usize>| {
            let (b, id) = (b?, id?);
            times[b]
                .iter()
                .find(|(k, _, _)| *k == id)
                .map(|(_, t, timer)| (t, *timer))
        };

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
            let own = home(step_id(i));
            let (t, timer) = in_block(own, Some(step_id(i))).ok_or("a step was not timed")?;
            let plain = self.plain_twin(i).map(&step_id);
            // The other side of a ratio in this step's block, else in `fallback`'s block.
            let other = |id: Option<usize>, fallback: Option<usize>| {
                in_block(own, id).or_else(|| in_block(fallback.and_then(home), id))
            };
            let run_bytes = bytes_per_element(&s.kernel.config) * n;
            let mut row = Row::f32(s.kernel.name, n, s.tensors, run_bytes, median(t));
            row.features = s.kernel.features.iter().map(|f| f.to_string()).collect();
            let gbps_over = |other_bytes: u64, other: &[f64]| {
                Quartiles::paired(t, other, |s_ms, o_ms| {
                    (run_bytes as f64 / s_ms) / (other_bytes as f64 / o_ms)
                })
            };
            if let (Some(c), Some((c_ms, _))) = (&self.copy, other(copy_id, plain)) {
                (row.ceiling_ratio, row.ratio_iqr) = output::split(gbps_over(c.bytes, c_ms));
            }
            if let (Some(tr), Some((tr_ms, _))) = (&self.traffic, other(traffic_id, plain)) {
                (row.traffic_ratio, row.traffic_iqr) = output::split(gbps_over(tr.bytes, tr_ms));
            }
            if s.tensors > 1 {
                let twin = self
                    .steps
                    .iter()
                    .position(|o| o.tensors == 1 && std::ptr::eq(o.kernel, s.kernel))
                    .map(&step_id);
                if let Some((one_ms, _)) = other(twin, twin) {
                    let q = Quartiles::paired(t, one_ms, |a, b| a / b);
                    (row.vs_one_tensor, row.vs_one_iqr) = output::split(q);
                }
            }
            if !s.kernel.is_plain()
                && let Some((plain_ms, _)) = in_block(own, plain)
            {
                let q = Quartiles::paired(t, plain_ms, |a, b| a / b);
                (row.vs_plain, row.vs_plain_iqr) = output::split(q);
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
