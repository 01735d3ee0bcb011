//! Fits a small least-squares model with the GPU optimizer and prints the loss as it falls.
//!
//! `cargo run --release --example fit [adam|adamw|yogi]`
//!
//! The model is `y = X w` with 64 features; the gradient `X^T (X w - y) / n` is computed on the
//! host and uploaded each step, as an engine's backward pass would leave it in the gradient
//! buffer. The final weights are checked against the CPU reference run on the same gradients.

use wgpu_optim::{BufferView, Config, Optimizer, Parameter, TensorState, reference};

const FEATURES: usize = 64;
const SAMPLES: usize = 256;
const STEPS: u64 = 300;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = match std::env::args().nth(1).as_deref() {
        None | Some("adam") => Config::adam().lr(0.05),
        Some("adamw") => Config::adamw().lr(0.05).weight_decay(1e-3),
        Some("yogi") => Config::yogi().lr(0.05),
        Some(other) => {
            return Err(format!("unknown algorithm {other:?}: adam, adamw or yogi").into());
        }
    };
    let (adapter, device, queue) = wgpu_optim::util::request_device_blocking()?;
    let info = adapter.get_info();
    println!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );

    // A fixed problem: features and true weights from a small LCG, targets without noise.
    let mut seed = 12345u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
    };
    let x: Vec<f32> = (0..SAMPLES * FEATURES).map(|_| next()).collect();
    let w_true: Vec<f32> = (0..FEATURES).map(|_| 4.0 * next()).collect();
    let y: Vec<f32> = (0..SAMPLES)
        .map(|i| dot(&x[i * FEATURES..][..FEATURES], &w_true))
        .collect();

    let storage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    let buffer = |label| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (FEATURES * 4) as u64,
            usage: storage,
            mapped_at_creation: false,
        })
    };
    let (weights, grads) = (buffer("weights"), buffer("grads"));
    let mut optimizer = Optimizer::new(
        &device,
        config.clone(),
        &[Parameter::new(
            "weight",
            BufferView::whole(&weights),
            BufferView::whole(&grads),
        )],
    )?;

    let mut w = vec![0f32; FEATURES]; // the GPU's weights, read back each step
    let mut w_cpu = w.clone();
    let mut state_cpu = TensorState::new(&config, FEATURES);
    for t in 1..=STEPS {
        let (loss, grad) = loss_and_grad(&x, &y, &w);
        queue.write_buffer(&grads, 0, bytemuck::cast_slice(&grad));
        optimizer.step_blocking(&device, &queue)?;
        reference::step(&config, t, config.lr, &mut w_cpu, &grad, &mut state_cpu);
        w = wgpu_optim::util::read_f32_blocking(&device, &queue, &weights, 0, FEATURES as u64)?;
        if t == 1 || t % 50 == 0 {
            println!("step {t:4}  loss {loss:.6e}");
        }
    }
    let (loss, _) = loss_and_grad(&x, &y, &w);
    let gpu_vs_cpu = w
        .iter()
        .zip(&w_cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let error = w
        .iter()
        .zip(&w_true)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "{:?}: final loss {loss:.3e}, max |w - w_true| {error:.3e}, max |gpu - cpu reference| {gpu_vs_cpu:.1e}",
        config.algorithm
    );
    Ok(())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Mean squared error / 2 and its gradient.
fn loss_and_grad(x: &[f32], y: &[f32], w: &[f32]) -> (f32, Vec<f32>) {
    let mut grad = vec![0f32; FEATURES];
    let mut loss = 0.0;
    for i in 0..SAMPLES {
        let row = &x[i * FEATURES..][..FEATURES];
        let r = dot(row, w) - y[i];
        loss += 0.5 * r * r / SAMPLES as f32;
        for (g, xi) in grad.iter_mut().zip(row) {
            *g += r * xi / SAMPLES as f32;
        }
    }
    (loss, grad)
}
