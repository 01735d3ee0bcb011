//! A training engine in miniature: a two-layer classifier (64 -> 64 ReLU -> 10) of
//! scikit-learn's 8x8 handwritten digits (`data/digits/`), trained entirely on the GPU.
//!
//! `cargo run --release --example train_mlp`
//!
//! Forward pass, softmax cross-entropy and backward pass are the example's WGSL kernels
//! (`examples/shared/mlp.wgsl`); the four tensors live in one `Arena`, biases in a parameter
//! group without weight decay; AdamW's step is recorded into the same encoder after the backward
//! pass, with a warmup + cosine schedule. Loss and accuracy are summed on the GPU and read back
//! asynchronously once per epoch. Prints each epoch (with a progress bar on a terminal) and
//! writes the curves to `docs/plots/train_mlp.svg`.
//!
//! The gradient's global norm is clipped to 1 on the device (`max_grad_norm`), in the same
//! encoder. Not yet here, because the library does not have it yet: a flag to keep the
//! optimizer state in bf16.

#[path = "shared/mod.rs"]
mod shared;

use std::io::IsTerminal;

use shared::mlp::{self, Digits, Settings};
use shared::plot;

/// The test accuracy a person would accept for this data set.
const TARGET_ACCURACY: f64 = 0.95;

fn main() -> shared::Result<()> {
    let gpu = shared::gpu::Gpu::new()?;
    let digits = Digits::load()?;
    let settings = Settings::default();
    println!("adapter: {}", gpu.adapter);
    println!(
        "digits: {} training and {} test images; {settings:?}",
        digits.train.len(),
        digits.test.len()
    );
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(settings.epochs as u64);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "{bar:40} epoch {pos}/{len} {elapsed} (eta {eta})",
        )?);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let epochs = mlp::train(&gpu, &settings, &digits, |e| {
        bar.suspend(|| {
            println!(
                "epoch {:>3}  train loss {:.4}  train acc {:>6.2}%  test loss {:.4}  test acc {:>6.2}%  lr {:.2e}  {:>6.0} steps/s",
                e.epoch,
                e.train_loss,
                100.0 * e.train_accuracy,
                e.test_loss,
                100.0 * e.test_accuracy,
                e.lr,
                e.steps_per_second
            )
        });
        bar.inc(1);
    })?;
    bar.finish_and_clear();

    let last = epochs.last().ok_or("no epochs")?;
    let steps = (digits.train.len() / settings.batch * settings.epochs) as f64;
    println!(
        "test accuracy {:.2}% after {} epochs, {:.1} s of training ({:.0} steps/s overall)",
        100.0 * last.test_accuracy,
        settings.epochs,
        last.elapsed,
        steps / last.elapsed
    );
    let path = plot::docs_plot("train_mlp.svg");
    mlp::write_curves(&epochs, &path)?;
    println!("wrote {}", path.display());
    if last.test_accuracy < TARGET_ACCURACY {
        return Err(format!(
            "test accuracy {:.2}% is below the {:.0}% this example promises",
            100.0 * last.test_accuracy,
            100.0 * TARGET_ACCURACY
        )
        .into());
    }
    Ok(())
}
