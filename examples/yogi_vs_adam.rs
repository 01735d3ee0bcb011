//! What Yogi changes: on a quadratic with rare bursts of large gradient noise, Adam's second
//! moment forgets each burst and the next one throws the parameters far; Yogi's additive
//! update of the second moment remembers them. Plots the loss and the effective learning rate.
//!
//! `cargo run --release --example yogi_vs_adam` prints the numbers, checks every step of the
//! GPU optimizer against the CPU reference and writes `docs/plots/yogi_vs_adam.svg`.

#[path = "shared/mod.rs"]
mod shared;

fn main() -> shared::Result<()> {
    let gpu = shared::gpu::Gpu::new()?;
    println!("adapter: {}", gpu.adapter);
    shared::seeds::yogi_vs_adam(&gpu, shared::seeds::BURSTY_STEPS)?.main()
}
