//! Why Adam divides its moments by `1 - b^t`: with a constant gradient, how far each of the
//! first steps moves, in units of the learning rate, with and without bias correction, for
//! betas (0.9, 0.999) and (0.9, 0.99); the first step of BERT's optimizer, which has none.
//!
//! `cargo run --release --example bias_correction` prints the numbers, checks every step of
//! the GPU optimizer against the CPU reference and writes `docs/plots/bias_correction.svg`.

#[path = "shared/mod.rs"]
mod shared;

fn main() -> shared::Result<()> {
    let gpu = shared::gpu::Gpu::new()?;
    println!("adapter: {}", gpu.adapter);
    shared::seeds::bias_correction(&gpu, shared::seeds::BIAS_CORRECTION_STEPS)?.main()
}
