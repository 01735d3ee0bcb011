//! The optimizer step against the device's memory-bandwidth ceilings (`shared/spec/bench-output.md`).
//!
//! ```text
//! cargo bench --bench step                          # 1M, 4M and 16M elements
//! cargo bench --bench step -- --quick --json out.json
//! cargo bench --bench step -- --elements 4194304    # sizes of your choosing
//! ```
//!
//! For every size, each kind of step is timed with the two ceilings of its pattern (the bytes
//! and dtypes it loads and stores: `steps::Pattern`): `copy`, a plain copy of as many bytes,
//! and `traffic`, the step's own loads and stores in its dtypes with trivial arithmetic
//! (`ceilings.rs`). The plain f32 steps move 28 bytes per element (amsgrad 36). AdamW is also
//! timed with the pre-step features (`max_grad_norm`, `loss_scale`, both: 32 bytes, the step's
//! 28 and the norm pass's gradient read) and in 16-bit storage dtypes (bf16 `m` and `v`: 20
//! bytes; bf16 `p`, `g`, `m`, `v`: 14; the same with f32 master weights: 20), each against the
//! plain f32 AdamW step. Every kernel is checked before it is timed (`verify.rs`); a wrong one
//! is reported, not timed, and the benchmark exits 1. Then the timing (`plan_blocks`): a block
//! per plain step kernel and size (its copy, its traffic kernel, the step on one tensor and on
//! 1000) and, for AdamW, a block per size, tensor count and comparison (the plain step and the
//! three with features; the plain step and the three in 16-bit dtypes, whose one-tensor block
//! also holds each dtype row's own ceilings) run back to back, and every block runs once a
//! round, the rounds spreading each ratio's runs over the whole benchmark. Each ratio is the
//! median of the per-round ratios (`timing.rs`), so that a noisy machine slows both sides of a
//! ratio alike; a ratio whose other side is not in a row's own block pairs it with that side's
//! runs of the same round in another block (a feature row's ceilings: the plain AdamW block's;
//! a 1000-tensor dtype row's ceilings: the one-tensor dtype block's). `output.rs` prints the
//! table and writes the JSON.
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
    Comparison, MULTI_TENSORS, Pattern, Step, StepKernel, bytes_per_element, loss_scale,
    step_kernels,
};
use timing::{Kernel, Quartiles, Slot, Timer, paired_rounds};
use verify::Inputs;
use wgpu_optim::Dtype;
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
    let planned = planned_bytes(&sizes, &kernels, &runs, &gpu.limits);
    let progress = Progress::new(planned);

    // Check every kernel and pick the ceilings' shapes, size by size; then time everything in
    // rounds, so that each ratio's runs spread over the whole benchmark.
    let mut rng = Rng::new(SEED);
    let mut failures = Vec::new();
    let mut prepared = Vec::new();
    for &n in &sizes {
        progress.message(format!("{n} elements: inputs"));
        let inputs = Inputs::new(&mut rng, n);
        let (grads, grad_failures) = Grads::new(&gpu, &kernels, &inputs, n);
        for f in &grad_failures {
            progress.println(&format!("FAILED CHECK, not timed: {f}"));
        }
        failures.extend(grad_failures);
        let (ready, new_failures) = prepare(
            &gpu, &mut rng, n, &kernels, &inputs, &grads, &runs, &progress,
        );
        for f in &new_failures {
            progress.println(&format!("FAILED CHECK, not timed: {f}"));
        }
        failures.extend(new_failures);
        prepared.extend(ready);
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

/// The bytes the runs of the whole benchmark move, for the progress bar: per size, one
/// checked step per kernel and workload, each pattern's ceilings (the copy's shapes checked
/// and picked with `per_shape + 1` runs, the traffic kernel's one shape checked), and the
/// paired rounds of `plan_blocks`.
fn planned_bytes(sizes: &[u64], kernels: &[StepKernel], runs: &Runs, limits: &wgpu::Limits) -> u64 {
    let shapes = ceilings::shape_count(limits) as u64;
    let rounds = (runs.warm_up + runs.timed) as u64;
    let steps: Vec<(&StepKernel, u64)> = [1, MULTI_TENSORS]
        .into_iter()
        .flat_map(|tensors| kernels.iter().map(move |k| (k, tensors)))
        .collect();
    let patterns = patterns(steps.iter().map(|(k, _)| *k));
    let checks: u64 = steps
        .iter()
        .map(|(k, _)| CHECK_RUNS * bytes_per_element(&k.config))
        .sum();
    let picks: u64 = patterns
        .iter()
        .map(|p| (shapes * (2 + runs.per_shape as u64) + 1) * p.bytes())
        .sum();
    let timed: u64 = plan_blocks(&steps, &patterns)
        .iter()
        .flatten()
        .map(|m| match *m {
            Member::Copy(p) | Member::Traffic(p) => patterns[p].bytes(),
            Member::Step(i) => bytes_per_element(&steps[i].0.config),
        })
        .sum();
    sizes
        .iter()
        .map(|&n| (checks + picks + rounds * timed) * n)
        .sum()
}

/// The patterns of `kernels`, in the order they first appear.
fn patterns<'a>(kernels: impl Iterator<Item = &'a StepKernel>) -> Vec<Pattern> {
    let mut out: Vec<Pattern> = Vec::new();
    for k in kernels {
        if !out.contains(&k.pattern()) {
            out.push(k.pattern());
        }
    }
    out
}

/// A member of a block: the copy or the traffic kernel of pattern `p` (an index into the
/// patterns), or step `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Member {
    Copy(usize),
    Traffic(usize),
    Step(usize),
}

/// The blocks of one size, from its steps (kernel, tensor count) and the patterns of their
/// ceilings:
///
/// - one per plain kernel: its pattern's copy and traffic kernel, the step on one tensor and
///   on `MULTI_TENSORS`;
/// - one per comparison (features, dtypes), kernel name and tensor count: the plain step and
///   the steps compared with it;
/// - the ceilings that no plain block holds (those of the dtype rows' own patterns) join the
///   first block with a step of their pattern, beside it: the dtype rows' one-tensor block.
fn plan_blocks(steps: &[(&StepKernel, u64)], patterns: &[Pattern]) -> Vec<Vec<Member>> {
    let pattern = |k: &StepKernel| patterns.iter().position(|p| *p == k.pattern());
    let ceilings = |p: usize| [Member::Copy(p), Member::Traffic(p)];
    let mut plain: Vec<&StepKernel> = Vec::new();
    let mut compared: Vec<(&str, Comparison, u64)> = Vec::new();
    for &(k, tensors) in steps {
        match k.comparison() {
            None if !plain.iter().any(|p| std::ptr::eq(*p, k)) => plain.push(k),
            Some(c) if !compared.contains(&(k.name, c, tensors)) => {
                compared.push((k.name, c, tensors))
            }
            _ => {}
        }
    }
    let mut blocks: Vec<Vec<Member>> = plain
        .iter()
        .map(|&k| {
            let own = steps
                .iter()
                .enumerate()
                .filter(|(_, (s, _))| std::ptr::eq(*s, k));
            pattern(k)
                .into_iter()
                .flat_map(ceilings)
                .chain(own.map(|(i, _)| Member::Step(i)))
                .collect()
        })
        .collect();
    for (name, comparison, tensors) in compared {
        let twin = steps
            .iter()
            .position(|(s, n)| s.is_plain() && s.name == name && *n == tensors);
        let members = steps.iter().enumerate().filter(|(_, (s, n))| {
            s.name == name && s.comparison() == Some(comparison) && *n == tensors
        });
        let block = twin
            .into_iter()
            .chain(members.map(|(i, _)| i))
            .map(Member::Step)
            .collect();
        blocks.push(block);
    }
    for p in 0..patterns.len() {
        if blocks.iter().flatten().any(|m| *m == Member::Copy(p)) {
            continue;
        }
        let of_p = |m: &Member| matches!(*m, Member::Step(i) if pattern(steps[i].0) == Some(p));
        for block in &mut blocks {
            if let Some(at) = block.iter().position(of_p) {
                block.splice(at + 1..at + 1, ceilings(p));
                break;
            }
        }
    }
    blocks
}

/// A step that passed its check: which kernel, on how many tensors.
struct Checked<'a> {
    kernel: &'a StepKernel,
    tensors: u64,
    step: Step,
}

/// The gradients of a size: the random one in f32 and in each other gradient dtype a kernel
/// reads (rounded to nearest), and in f32 times S for the loss-scale rows (`None` if that
/// overflowed).
struct Grads {
    plain: wgpu::Buffer,
    scaled: Option<wgpu::Buffer>,
    narrow: Vec<(Dtype, wgpu::Buffer)>,
}

impl Grads {
    /// The gradients `kernels` read, and the failure of the scaled one if it overflowed.
    fn new(gpu: &Gpu, kernels: &[StepKernel], inputs: &Inputs, n: u64) -> (Self, Vec<String>) {
        let plain = gpu.storage_buffer("bench grad", n);
        gpu.write(&plain, 0, &inputs.grad);
        let mut failures = Vec::new();
        // The loss-scale rows' gradient: the same, times S.
        let mut scaled = None;
        if kernels.iter().any(|k| k.config.loss_scale.is_some()) {
            match inputs.scaled_grad(loss_scale()) {
                Ok(g) => {
                    let buffer = gpu.storage_buffer("bench grad x S", n);
                    gpu.write(&buffer, 0, &g);
                    scaled = Some(buffer);
                }
                Err(e) => failures.push(format!("{n} elements, loss scaling: {e}")),
            }
        }
        let mut narrow: Vec<(Dtype, wgpu::Buffer)> = Vec::new();
        for k in kernels {
            let dtype = k.config.grad_dtype;
            if dtype != Dtype::F32 && !narrow.iter().any(|(d, _)| *d == dtype) {
                let buffer = gpu.buffer(&format!("bench grad {}", dtype.name()), dtype, n);
                gpu.write_as(&buffer, dtype, 0, &inputs.grad);
                narrow.push((dtype, buffer));
            }
        }
        let grads = Grads {
            plain,
            scaled,
            narrow,
        };
        (grads, failures)
    }

    /// The gradient buffer `kernel` reads.
    fn of(&self, kernel: &StepKernel) -> Result<&wgpu::Buffer, String> {
        let dtype = kernel.config.grad_dtype;
        if kernel.config.loss_scale.is_some() {
            if dtype != Dtype::F32 {
                return Err(format!(
                    "{}: no scaled {} gradient",
                    kernel.label(),
                    dtype.name()
                ));
            }
            self.scaled
                .as_ref()
                .ok_or_else(|| format!("{}: no scaled gradient", kernel.label()))
        } else if dtype == Dtype::F32 {
            Ok(&self.plain)
        } else {
            self.narrow
                .iter()
                .find(|(d, _)| *d == dtype)
                .map(|(_, b)| b)
                .ok_or_else(|| format!("{}: no {} gradient", kernel.label(), dtype.name()))
        }
    }
}

/// The ceilings of one pattern where they passed their checks.
struct Ceilings {
    pattern: Pattern,
    copy: Option<Ceiling>,
    traffic: Option<Ceiling>,
}

/// A size whose steps passed their checks, ready to be timed: the ceilings of their patterns
/// in their picked shapes, and the steps.
struct Prepared<'a> {
    elements: u64,
    ceilings: Vec<Ceilings>,
    steps: Vec<Checked<'a>>,
    /// Where this size's blocks and kernels start in `paired_rounds`'s, and how many blocks
    /// it has.
    first_block: usize,
    first_kernel: usize,
    block_count: usize,
}

/// Checks the steps of every kernel (each on one tensor and on `MULTI_TENSORS`) and the
/// ceilings of their patterns, and picks each copy's shape. Returns the size ready to time
/// (`None` if no step passed) and the failed checks.
#[allow(clippy::too_many_arguments)]
fn prepare<'a>(
    gpu: &Gpu,
    rng: &mut Rng,
    n: u64,
    kernels: &'a [StepKernel],
    inputs: &Inputs,
    grads: &Grads,
    runs: &Runs,
    progress: &Progress,
) -> (Option<Prepared<'a>>, Vec<String>) {
    let mut failures = Vec::new();

    progress.message(format!("{n} elements: checking the steps"));
    let mut steps: Vec<Checked> = Vec::new();
    for tensors in [1, MULTI_TENSORS] {
        for kernel in kernels {
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

    let mut ceilings = Vec::new();
    for pattern in patterns(steps.iter().map(|s| s.kernel)) {
        let run_bytes = pattern.bytes() * n;
        let which = pattern.label();
        // The copy of as many bytes.
        progress.message(format!("{n} elements: copy shapes ({which})"));
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

        // The traffic kernel over the buffers of the pattern's first one-tensor step.
        progress.message(format!("{n} elements: traffic ({which})"));
        let mut traffic = None;
        let first = steps.iter().find(|s| {
            s.tensors == 1 && s.kernel.pattern() == pattern && s.kernel.config.loss_scale.is_none()
        });
        if let Some(first) = first {
            match grads.of(first.kernel).and_then(|g| first.step.buffers(g)) {
                Ok(buffers) if n >= 4 => {
                    let mut kernel = Ceiling::traffic(gpu, &buffers, n / 4 * 4);
                    let (passed, traffic_failures) =
                        verify::traffic_shapes(gpu, &mut kernel, &buffers);
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
        ceilings.push(Ceilings {
            pattern,
            copy,
            traffic,
        });
    }
    let prepared = Prepared {
        elements: n,
        ceilings,
        steps,
        first_block: 0,
        first_kernel: 0,
        block_count: 0,
    };
    (Some(prepared), failures)
}

impl Prepared<'_> {
    /// The kernels to time, in the order `ids` numbers them: each pattern's copy and traffic
    /// kernel where they passed their checks, then the steps.
    fn kernels(&mut self) -> impl Iterator<Item = &mut dyn Kernel> {
        let ceilings = self.ceilings.iter_mut().flat_map(|c| {
            let copy = c.copy.iter_mut().map(|c| c as &mut dyn Kernel);
            copy.chain(c.traffic.iter_mut().map(|t| t as &mut dyn Kernel))
        });
        let steps = self
            .steps
            .iter_mut()
            .map(|s| &mut s.step as &mut dyn Kernel);
        ceilings.chain(steps)
    }

    /// The members in the order of `kernels`.
    fn members(&self) -> Vec<Member> {
        let mut out = Vec::new();
        for (p, c) in self.ceilings.iter().enumerate() {
            out.extend(c.copy.as_ref().map(|_| Member::Copy(p)));
            out.extend(c.traffic.as_ref().map(|_| Member::Traffic(p)));
        }
        out.extend((0..self.steps.len()).map(Member::Step));
        out
    }

    /// The number `paired_rounds` gives member `m` (`None`: a ceiling that failed its check).
    fn id(&self, m: Member) -> Option<usize> {
        let at = self.members().iter().position(|&x| x == m)?;
        Some(self.first_kernel + at)
    }

    /// The bytes each of `kernels` moves per run, in its order.
    fn kernel_bytes(&self) -> Vec<u64> {
        self.members()
            .into_iter()
            .map(|m| match m {
                Member::Copy(p) => self.ceilings[p].copy.as_ref().map_or(0, |c| c.bytes),
                Member::Traffic(p) => self.ceilings[p].traffic.as_ref().map_or(0, |c| c.bytes),
                Member::Step(i) => bytes_per_element(&self.steps[i].kernel.config) * self.elements,
            })
            .collect()
    }

    /// The index in `ceilings` of step `i`'s pattern.
    fn pattern_of(&self, i: usize) -> Option<usize> {
        let pattern = self.steps[i].kernel.pattern();
        self.ceilings.iter().position(|c| c.pattern == pattern)
    }

    /// The step `i`'s plain f32 twin on as many tensors, if it passed its check.
    fn plain_twin(&self, i: usize) -> Option<usize> {
        let s = &self.steps[i];
        self.steps.iter().position(|o| {
            o.kernel.is_plain() && o.kernel.name == s.kernel.name && o.tensors == s.tensors
        })
    }

    /// The blocks of `plan_blocks`, numbered from `first_kernel` (ceilings that failed their
    /// checks left out).
    fn blocks(&self, gpu: &Gpu, timed: usize) -> Vec<Vec<Slot>> {
        let steps: Vec<(&StepKernel, u64)> =
            self.steps.iter().map(|s| (s.kernel, s.tensors)).collect();
        let patterns: Vec<Pattern> = self.ceilings.iter().map(|c| c.pattern).collect();
        plan_blocks(&steps, &patterns)
            .into_iter()
            .map(|block| {
                block
                    .into_iter()
                    .filter_map(|m| self.id(m))
                    .map(|kernel| Slot {
                        kernel,
                        timer: Timer::new(gpu, timed),
                    })
                    .collect()
            })
            .collect()
    }

    /// The rows of the size from its timed `blocks`, pattern by pattern: its copy and traffic
    /// kernel, then its steps, every kernel on one tensor and then on many. A step's time and
    /// ratios come from the first block it is in (its own); where that block lacks the other
    /// side of a ratio (a step with features: the copy, the traffic kernel, the one-tensor
    /// twin; a dtype row on many tensors: its ceilings and its one-tensor twin), the other
    /// side's runs come from the block of the plain twin, else from the other side's own
    /// block, of the same rounds.
    fn rows(&self, gpu: &Gpu, blocks: &[Vec<Slot>]) -> Result<Vec<Row>, String> {
        let n = self.elements;
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
        for (p, c) in self.ceilings.iter().enumerate() {
            let copy_id = self.id(Member::Copy(p));
            let traffic_id = self.id(Member::Traffic(p));
            let ceiling_row = |c: &Ceiling, t: &[f64]| {
                let mut row = Row::f32(c.which.name(), n, 1, c.bytes, median(t));
                row.note = c.shape_name(c.shape);
                row
            };
            if let Some(copy) = &c.copy {
                rows.push(ceiling_row(copy, &all_runs(copy_id)).with_pattern(&c.pattern));
            }
            if let Some(t) = &c.traffic {
                let traffic_ms = all_runs(traffic_id);
                let mut row = ceiling_row(t, &traffic_ms);
                if let Some(copy) = &c.copy {
                    let q = Quartiles::paired(&traffic_ms, &all_runs(copy_id), |t_ms, c_ms| {
                        (t.bytes as f64 / t_ms) / (copy.bytes as f64 / c_ms)
                    });
                    row.note = format!("{:.3} of copy; {}", q.median, row.note);
                }
                rows.push(row.with_pattern(&c.pattern));
            }
            for (i, s) in self.steps.iter().enumerate() {
                if self.pattern_of(i) != Some(p) {
                    continue;
                }
                let step_id = |i: usize| self.id(Member::Step(i));
                let own = step_id(i).and_then(home);
                let (t, timer) = in_block(own, step_id(i)).ok_or("a step was not timed")?;
                let plain = self.plain_twin(i).and_then(step_id);
                // The other side of a ratio in this step's block, else in the plain twin's,
                // else in its own.
                let other = |id: Option<usize>| {
                    in_block(own, id)
                        .or_else(|| in_block(plain.and_then(home), id))
                        .or_else(|| in_block(id.and_then(home), id))
                };
                let run_bytes = bytes_per_element(&s.kernel.config) * n;
                let mut row = Row::f32(s.kernel.name, n, s.tensors, run_bytes, median(t))
                    .with_pattern(&c.pattern);
                row.features = s.kernel.features.iter().map(|f| f.to_string()).collect();
                let gbps_over = |other_bytes: u64, other: &[f64]| {
                    Quartiles::paired(t, other, |s_ms, o_ms| {
                        (run_bytes as f64 / s_ms) / (other_bytes as f64 / o_ms)
                    })
                };
                if let (Some(copy), Some((c_ms, _))) = (&c.copy, other(copy_id)) {
                    (row.ceiling_ratio, row.ratio_iqr) = output::split(gbps_over(copy.bytes, c_ms));
                }
                if let (Some(tr), Some((tr_ms, _))) = (&c.traffic, other(traffic_id)) {
                    (row.traffic_ratio, row.traffic_iqr) =
                        output::split(gbps_over(tr.bytes, tr_ms));
                }
                if s.tensors > 1 {
                    let twin = self
                        .steps
                        .iter()
                        .position(|o| o.tensors == 1 && std::ptr::eq(o.kernel, s.kernel))
                        .and_then(step_id);
                    if let Some((one_ms, _)) = other(twin) {
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
