//! Replays a recorded gradient trace through the GPU optimizer (`docs/replay-format.md`;
//! the README's "Replay a PyTorch run").
//!
//!     cargo run --release --example replay -- TRACE.safetensors OUT.safetensors
//!
//! Runs on the default adapter (wgpu's `WGPU_BACKEND`, `WGPU_ADAPTER_NAME` and
//! `WGPU_POWER_PREF` pick another), prints the adapter and a summary, and writes OUT
//! atomically. Exit status: 0 on success, 1 when the trace is refused or the run fails (the
//! reason on stderr, OUT not written), 2 for a wrong command line.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use wgpu_optim::replay::Trace;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [trace, out] = args.as_slice() else {
        eprintln!("usage: replay TRACE.safetensors OUT.safetensors");
        return ExitCode::from(2);
    };
    match run(Path::new(trace), Path::new(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replay: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(trace_path: &Path, out: &Path) -> wgpu_optim::Result<()> {
    // Validate the whole trace before touching the GPU.
    let trace = Trace::read(trace_path)?;
    let (adapter, device, queue) = wgpu_optim::util::request_device_blocking()?;
    let info = adapter.get_info();
    println!(
        "adapter: {} ({:?}, {:?}; {})",
        info.name, info.backend, info.device_type, info.driver_info
    );

    let start = Instant::now();
    let result = trace.run(&device, &queue)?;
    let seconds = start.elapsed().as_secs_f64();
    result.write(out)?;

    let elements: usize = trace.params.iter().map(|p| p.data.len()).sum();
    let lr = match &trace.lr {
        Some(_) => "per step from the `lr` tensor".to_string(),
        None => format!("{}", trace.config.lr),
    };
    println!(
        "replayed {} iterations of {:?} (lr {lr}) over {} tensors, {elements} elements, in {seconds:.3} s",
        trace.steps(),
        trace.config.algorithm,
        trace.params.len(),
    );
    let c = &trace.config;
    let dtypes = [
        c.param_dtype,
        c.grad_dtype,
        c.exp_avg_dtype,
        c.exp_avg_sq_dtype,
    ];
    if dtypes.iter().any(|&d| d != wgpu_optim::Dtype::F32) {
        println!(
            "storage: param {}, grad {}, exp_avg {}, exp_avg_sq {}{}",
            c.param_dtype.name(),
            c.grad_dtype.name(),
            c.exp_avg_dtype.name(),
            c.exp_avg_sq_dtype.name(),
            if c.keeps_master() {
                ", f32 master weights"
            } else if c.rounds_stochastically() {
                ", stochastic rounding"
            } else {
                ""
            }
        );
    }
    if trace.config.has_pre_step() {
        let scale = result.loss_scale.map_or(String::new(), |s| {
            format!(", final loss scale {}", s as f64)
        });
        println!(
            "{} steps applied, {} skipped{scale}",
            result.step, result.skipped
        );
    }
    println!("wrote {}", out.display());
    Ok(())
}
