//! Adam with L2 regularisation is not AdamW: two weights whose loss gradient is pure noise, one
//! with large and one with small variance, under the same decay coefficient. Coupled L2 goes
//! through Adam's normalisation and barely shrinks the large-gradient weight; decoupled decay
//! shrinks both at the same rate.
//!
//! `cargo run --release --example adamw_vs_l2` prints the numbers, checks every step of the GPU
//! optimizer against the CPU reference and writes `docs/plots/adamw_vs_l2.svg`.

#[path = "shared/mod.rs"]
mod shared;

fn main() -> shared::Result<()> {
    let gpu = shared::gpu::Gpu::new()?;
    println!("adapter: {}", gpu.adapter);
    shared::seeds::adamw_vs_l2(&gpu, shared::seeds::DECAY_STEPS)?.main()
}
