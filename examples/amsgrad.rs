//! Why AMSGrad exists: Reddi, Kale and Kumar's online convex problem on [-1, 1], where Adam
//! goes to the worst point (+1) and AMSGrad to the best (-1). The engine projects the
//! parameter onto [-1, 1] with its own kernel after each optimizer step.
//!
//! `cargo run --release --example amsgrad` prints the numbers, checks every step of the GPU
//! optimizer against the CPU reference and writes `docs/plots/amsgrad.svg`.

#[path = "shared/mod.rs"]
mod shared;

fn main() -> shared::Result<()> {
    let gpu = shared::gpu::Gpu::new()?;
    println!("adapter: {}", gpu.adapter);
    shared::seeds::amsgrad(&gpu, shared::seeds::REDDI_STEPS)?.main()
}
