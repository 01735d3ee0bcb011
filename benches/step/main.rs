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
//! (`verify.rs`); a wrong one is reported, not timed, and the benchmark exits 1. The steps, the
//! ceilings and the 1000-tensor twins take turns run by run, and each ratio is the median of
//! the per-round ratios (`timing.rs`), so that a noisy machine slows both sides of a ratio
//! alike. `output.rs` prints the table and writes the JSON.
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
use verify::{Inputs, Rng};

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

    let mut rng = Rng(SEED);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
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
            let (new_rows, new_failures) = bench_class(
                &gpu,
                &mut rng,
                &Class {
                    elements: n,
                    bytes_per_element: class,
                    kernels: &class_kernels,
                },
                &inputs,
                &grad,
                &runs,
                &progress,
            );
            for r in &new_rows {
                progress.println(&output::line(r));
            }
            for f in &new_failures {
                progress.println(&format!("FAILED CHECK, not timed: {f}"));
            }
            rows.extend(new_rows);
            failures.extend(new_failures);
        }
    }
    progress.finish();

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
            let per_ceiling = shapes * (2 + runs.per_shape as u64);
            // A block per kernel: copy, traffic, one tensor, many.
            let rounds = 4 * k * (runs.warm_up + runs.timed) as u64;
            bytes += (2 * k * CHECK_RUNS + 2 * per_ceiling + rounds) * class * n;
        }
    }
    bytes
}

/// The steps of one size that move as many bytes per element, timed together with their
/// ceilings.
struct Class<'a> {
    elements: u64,
    bytes_per_element: u64,
    kernels: &'a [&'a StepKernel],
}

/// A step of the class that passed its check: which kernel, on how many tensors.
struct Checked<'a> {
    kernel: &'a StepKernel,
    tensors: u64,
    step: Step,
}

/// Checks the class's steps (each on one tensor and on `MULTI_TENSORS`) and its two ceilings,
/// picks each ceiling's shape, then times them all in paired rounds. Returns the rows (copy,
/// traffic, then the steps) and the failed checks.
fn bench_class(
    gpu: &Gpu,
    rng: &mut Rng,
    class: &Class,
    inputs: &Inputs,
    grad: &wgpu::Buffer,
    runs: &Runs,
    progress: &Progress,
) -> (Vec<Row>, Vec<String>) {
    let n = class.elements;
    let run_bytes = class.bytes_per_element * n;
    let mut failures = Vec::new();

    progress.message(format!("{n} elements: checking the steps"));
    let mut steps: Vec<Checked> = Vec::new();
    for tensors in [1, MULTI_TENSORS] {
        for &kernel in class.kernels {
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
        return (Vec::new(), failures);
    }

    // The copy of as many bytes.
    progress.message(format!("{n} elements: copy shapes"));
    let len = (run_bytes / 8).next_multiple_of(4);
    let src_values = rng.values(len, 0.01, 1.0, true);
    let src = gpu.storage_buffer("bench copy src", len);
    let dst = gpu.storage_buffer("bench copy dst", len);
    gpu.write(&src, 0, &src_values);
    let mut copy = Ceiling::copy(gpu, &src, &dst, len);
    let (passed, copy_failures) = verify::copy_shapes(gpu, &mut copy, &dst, &src_values);
    drop(src_values);
    progress.inc(copy.shapes() as u64 * run_bytes);
    failures.extend(copy_failures);
    let mut copy = pick(gpu, copy, &passed, runs, progress, run_bytes, &mut failures);

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

    // Paired rounds: a block per step kernel, [copy, traffic, one tensor, 1000 tensors], its
    // members back to back.
    progress.message(format!(
        "{n} elements: timing {}",
        class
            .kernels
            .iter()
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    const COPY: usize = 0;
    const TRAFFIC: usize = 1;
    let step_id = |i: usize| 2 + i;
    let mut blocks: Vec<Vec<Slot>> = class
        .kernels
        .iter()
        .map(|kernel| {
            let ceilings = [(COPY, copy.is_some()), (TRAFFIC, traffic.is_some())]
                .into_iter()
                .filter(|&(_, present)| present)
                .map(|(id, _)| id);
            let own = steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.kernel.name == kernel.name)
                .map(|(i, _)| step_id(i));
            ceilings
                .chain(own)
                .map(|kernel| Slot {
                    kernel,
                    timer: Timer::new(gpu, runs.timed),
                })
                .collect()
        })
        .collect();
    let (mut no_copy, mut no_traffic) = (Idle, Idle);
    {
        let mut kernels: Vec<&mut dyn Kernel> = vec![
            match copy.as_mut() {
                Some(c) => c,
                None => &mut no_copy,
            },
            match traffic.as_mut() {
                Some(t) => t,
                None => &mut no_traffic,
            },
        ];
        kernels.extend(steps.iter_mut().map(|s| &mut s.step as &mut dyn Kernel));
        paired_rounds(
            gpu,
            &mut kernels,
            &mut blocks,
            runs.warm_up,
            runs.timed,
            &mut |_| progress.inc(run_bytes),
        );
    }

    // Every slot's times, by block; a kernel's row takes the median of all its runs.
    let mut times: Vec<Vec<(usize, Vec<f64>, &Timer)>> = Vec::new();
    for block in &blocks {
        let mut block_times = Vec::new();
        for slot in block {
            match slot.timer.times_ms(gpu) {
                Ok(t) => block_times.push((slot.kernel, t, &slot.timer)),
                Err(e) => {
                    failures.push(format!("reading the timestamps: {e}"));
                    return (Vec::new(), failures);
                }
            }
        }
        times.push(block_times);
    }
    let all_runs = |id: usize| -> Vec<f64> {
        times
            .iter()
            .flatten()
            .filter(|(k, _, _)| *k == id)
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
    if let Some(c) = &copy {
        rows.push(ceiling_row(c, &all_runs(COPY)));
    }
    if let Some(t) = &traffic {
        let mut row = ceiling_row(t, &all_runs(TRAFFIC));
        if let Some(c) = &copy {
            let traffic_ms = all_runs(TRAFFIC);
            let q = Quartiles::paired(&traffic_ms, &all_runs(COPY), |t_ms, c_ms| {
                (t.bytes as f64 / t_ms) / (c.bytes as f64 / c_ms)
            });
            row.note = format!("{:.3} of copy; {}", q.median, row.note);
        }
        rows.push(row);
    }
    // The steps in the order they were made: every kernel on one tensor, then on many.
    for (i, s) in steps.iter().enumerate() {
        let block = times
            .iter()
            .find(|b| b.iter().any(|(k, _, _)| *k == step_id(i)))
            .expect("every step is in a block");
        let in_block = |id: usize| block.iter().find(|(k, _, _)| *k == id);
        let (_, t, timer) = in_block(step_id(i)).expect("the step is in its block");
        let bytes = run_bytes;
        let mut row = Row::f32(s.kernel.name, n, s.tensors, bytes, median(t));
        let gbps_over = |other_bytes: u64, other: &[f64]| {
            Quartiles::paired(t, other, |s_ms, o_ms| {
                (bytes as f64 / s_ms) / (other_bytes as f64 / o_ms)
            })
        };
        if let (Some(c), Some((_, c_ms, _))) = (&copy, in_block(COPY)) {
            (row.ceiling_ratio, row.ratio_iqr) = output::split(gbps_over(c.bytes, c_ms));
        }
        if let (Some(tr), Some((_, tr_ms, _))) = (&traffic, in_block(TRAFFIC)) {
            (row.traffic_ratio, row.traffic_iqr) = output::split(gbps_over(tr.bytes, tr_ms));
        }
        if s.tensors > 1 {
            let twin = steps
                .iter()
                .position(|o| o.tensors == 1 && o.kernel.name == s.kernel.name);
            if let Some((_, one_ms, _)) = twin.and_then(|j| in_block(step_id(j))) {
                let q = Quartiles::paired(t, one_ms, |a, b| a / b);
                (row.vs_one_tensor, row.vs_one_iqr) = output::split(q);
            }
        }
        let (host_us, record_us) = timer.host_us();
        row.host_us = Some(host_us);
        row.record_us = Some(record_us);
        rows.push(row);
    }
    (rows, failures)
}

/// Stands in for a ceiling that failed its check: never in a block, never run.
struct Idle;

impl Kernel for Idle {
    fn record(
        &mut self,
        _: &Gpu,
        _: &mut wgpu::CommandEncoder,
        _: Option<wgpu::ComputePassTimestampWrites>,
    ) {
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
