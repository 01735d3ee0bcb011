//! Keeps the examples honest: the digits classifier's GPU gradients equal a CPU computation of
//! the same network, its loss falls and it reaches the accuracy it promises; each seed
//! experiment's trajectory matches the CPU reference step by step and shows the effect its
//! example claims; the README shows only pictures that exist and that a command it names makes.
//!
//! The examples' code is included from `examples/shared/`, so these run what they run.

#[path = "../examples/shared/mod.rs"]
mod shared;

use std::sync::OnceLock;

use shared::gpu::{Gpu, UNIT_ROUNDOFF};
use shared::lab::Check;
use shared::mlp::{self, Digits, Mlp, Settings};
use shared::seeds;

/// One device for the whole file. Panics (fails the test) when there is no adapter: tests never
/// skip for want of a GPU; without one, Mesa's lavapipe is the adapter.
fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let gpu =
            Gpu::new().unwrap_or_else(|e| panic!("no GPU adapter, and the tests need one: {e}"));
        eprintln!("adapter: {}", gpu.adapter);
        gpu
    })
}

fn digits() -> &'static Digits {
    static DIGITS: OnceLock<Digits> = OnceLock::new();
    DIGITS.get_or_init(|| Digits::load().expect("data/digits/digits.csv parses"))
}

/// Where the tests write their SVGs (not over the committed ones).
fn scratch(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn assert_checks_pass(checks: &[Check]) {
    for check in checks {
        eprintln!("{}", check.summary());
        check.result().unwrap();
        assert!(check.compared > 0, "{}: nothing compared", check.label);
    }
}

// ---------------------------------------------------------------------------------------------
// The digits classifier

#[test]
fn digits_split_as_documented() {
    let d = digits();
    assert_eq!((d.train.len(), d.test.len()), (1442, 355));
    assert_eq!(d.train.x.len(), 1442 * mlp::INPUTS);
    assert!(
        d.train
            .x
            .iter()
            .chain(&d.test.x)
            .all(|&p| (0.0..=1.0).contains(&p))
    );
    for class in 0..mlp::CLASSES as u32 {
        let n = d.test.y.iter().filter(|&&y| y == class).count();
        assert!((34..=36).contains(&n), "class {class}: {n} test images");
    }
}

/// The GPU's gradients of one batch, against the CPU's f64 computation of the same network with
/// the GPU's parameters: at initialisation, and again after an epoch of training (parameters no
/// longer random, many units dead or saturated). Each element must lie within the f32 rounding
/// bound of `mlp::cpu_gradients` (Higham's gamma(n) forward-error bounds carried through the
/// layers); and that bound must be tight enough to matter: below 1e-3 of the tensor's largest
/// gradient, where a missing 1/batch, a wrong index or a missing ReLU mask is off by O(1) of it.
#[test]
fn mlp_gradients_match_the_cpu_on_one_batch() {
    let gpu = gpu();
    let d = digits();
    let settings = Settings::default();
    let mut net = Mlp::new(gpu, &settings, d).unwrap();
    let order: Vec<usize> = (0..d.train.len()).collect();
    net.upload_epoch(gpu, d, &order);
    let b = settings.batch;
    for stage in ["initial parameters", "after one epoch"] {
        if stage == "after one epoch" {
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            for k in 0..net.steps_per_epoch().min(32) {
                net.record_step(&gpu.queue, &mut encoder, k);
            }
            gpu.queue.submit([encoder.finish()]);
        }
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(&net.metrics, 0, None);
        net.record_backward(&mut encoder, 0);
        gpu.queue.submit([encoder.finish()]);
        let params: [Vec<f32>; 4] = std::array::from_fn(|k| net.read_param(gpu, k).unwrap());
        let want = mlp::cpu_gradients(
            &params,
            settings.hidden,
            &d.train.x[..b * mlp::INPUTS],
            &d.train.y[..b],
        );
        let loss = gpu.read(&net.metrics, 0, 1).unwrap()[0] as f64 / b as f64;
        // The loss: a sum of `b` terms of (log-sum-exp - logit), each within ~(4 + 2 * spread)
        // ulp plus the logits' errors; 1e-5 relative covers it with room.
        assert!(
            (loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0),
            "{stage}: loss gpu {loss} cpu {}",
            want.loss
        );
        for k in 0..4 {
            let got = net.read_grad(gpu, k).unwrap();
            let (g, bound) = (&want.grads[k], &want.bounds[k]);
            let largest = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let loosest = bound.iter().fold(0.0f64, |m, v| m.max(*v));
            assert!(
                largest > 0.0,
                "{stage} {}: all-zero gradient",
                mlp::TENSORS[k]
            );
            assert!(
                loosest < 1e-3 * largest,
                "{stage} {}: a bound of {loosest:e} against gradients up to {largest:e} would not catch much",
                mlp::TENSORS[k]
            );
            let mut worst: f64 = 0.0;
            let bad: Vec<String> = got
                .iter()
                .zip(g.iter().zip(bound))
                .enumerate()
                .filter_map(|(i, (&got, (&want, &bound)))| {
                    // The GPU's f32 result is rounded once more when stored.
                    let tol = bound + UNIT_ROUNDOFF * want.abs() + f64::MIN_POSITIVE;
                    let ratio = (got as f64 - want).abs() / tol;
                    worst = worst.max(ratio);
                    (ratio > 1.0).then(|| format!("[{i}] gpu {got:e} cpu {want:e} bound {tol:e}"))
                })
                .collect();
            eprintln!(
                "{stage} {}: {} elements within their bounds (largest error {:.3} of its bound; bounds up to {:.1e} of the largest gradient)",
                mlp::TENSORS[k],
                got.len(),
                worst,
                loosest / largest
            );
            assert!(
                bad.is_empty(),
                "{stage} {}: {} of {} gradients differ from the CPU's: {}",
                mlp::TENSORS[k],
                bad.len(),
                got.len(),
                bad[..bad.len().min(5)].join(", ")
            );
        }
    }
}

/// A short run: the loss falls epoch after epoch and the test accuracy is far above chance.
#[test]
fn mlp_loss_falls() {
    let settings = Settings {
        epochs: 4,
        ..Settings::default()
    };
    let epochs = mlp::train(gpu(), &settings, digits(), |_| {}).unwrap();
    assert_eq!(epochs.len(), 4);
    for pair in epochs.windows(2) {
        assert!(
            pair[1].train_loss < pair[0].train_loss,
            "train loss rose: {:?}",
            epochs.iter().map(|e| e.train_loss).collect::<Vec<_>>()
        );
    }
    assert!(epochs[0].train_loss < (mlp::CLASSES as f64).ln() * 1.05);
    let last = &epochs[3];
    assert!(last.train_loss < 0.5 * epochs[0].train_loss);
    assert!(
        last.test_accuracy > 0.85,
        "test accuracy {}",
        last.test_accuracy
    );
    assert!(last.steps_per_second > 0.0 && last.lr >= 0.0);
    mlp::write_curves(&epochs, &scratch("train_mlp.svg")).unwrap();
}

/// The example's own run (a few seconds on lavapipe) keeps its promise: >= 95% test accuracy.
#[test]
fn train_mlp_reaches_95_percent() {
    let epochs = mlp::train(gpu(), &Settings::default(), digits(), |_| {}).unwrap();
    let last = epochs.last().unwrap();
    eprintln!(
        "test accuracy {:.2}% in {:.1} s",
        100.0 * last.test_accuracy,
        last.elapsed
    );
    assert!(
        last.test_accuracy >= 0.95,
        "test accuracy {}",
        last.test_accuracy
    );
    assert_eq!(last.lr, 0.0, "the cosine ends at 0 on the last step");
}

// ---------------------------------------------------------------------------------------------
// The seeds' claims

/// With bias correction every step of a constant gradient is `lr`; without it, step t is
/// `lr (1 - b1^t) / sqrt(1 - b2^t)`: 3.16 lr at step 1 for (0.9, 0.999), up to ~6.6 lr.
#[test]
fn bias_correction_steps() {
    let study = seeds::bias_correction(gpu(), seeds::BIAS_CORRECTION_STEPS).unwrap();
    assert_checks_pass(&study.checks());
    for run in &study.runs {
        let [b1, b2] = run.config.betas;
        let x = run.param_path(0);
        for (t, ratio) in seeds::step_sizes(run).into_iter().enumerate() {
            let t = t + 1;
            let want = if run.config.bias_correction {
                1.0
            } else {
                (1.0 - b1.powi(t as i32)) / (1.0 - b2.powi(t as i32)).sqrt()
            };
            // |x_t - x_(t-1)| is exact in f64 from two f32 values; x_t was rounded to within
            // half an ulp of |x_t| (2^-24 |x_t|) and the update carries ~32u of its own size.
            let tol =
                (UNIT_ROUNDOFF * x[t].abs() as f64) / run.lrs[t - 1] + 64.0 * UNIT_ROUNDOFF * want;
            assert!(
                (ratio - want).abs() <= tol,
                "{} step {t}: {ratio} lr, want {want}",
                run.label
            );
        }
    }
    let bert = seeds::step_sizes(&study.runs[0]);
    assert!((bert[0] - 0.1 / 0.001f64.sqrt()).abs() < 1e-3);
    assert!(bert.iter().cloned().fold(0.0, f64::max) > 6.5);
    study.write_svg(&scratch("bias_correction.svg")).unwrap();
}

/// Same decay coefficient: coupled L2 leaves the large-gradient weight nearly alone and crushes
/// the small-gradient one; decoupled decay shrinks both alike, at (1 - lr wd) per step.
#[test]
fn adamw_decays_both_weights_alike_l2_does_not() {
    let steps = seeds::DECAY_STEPS;
    let study = seeds::adamw_vs_l2(gpu(), steps).unwrap();
    assert_checks_pass(&study.checks());
    let [l2, adamw] = [&study.runs[0], &study.runs[1]];
    assert_eq!(l2.label, "Adam + L2");
    let end = |run: &shared::lab::Run, i: usize| run.params[steps][i].abs() as f64;
    let decay_alone = (1.0 - seeds::DECAY_LR * seeds::DECAY).powi(steps as i32);
    // AdamW: the noise only rocks the weights by ~0.05 lr per step around the decay.
    for i in 0..2 {
        assert!(
            (end(adamw, i) / decay_alone - 1.0).abs() < 0.05,
            "AdamW weight {i}: {} vs (1 - lr wd)^T = {decay_alone}",
            end(adamw, i)
        );
    }
    assert!((end(adamw, 0) / end(adamw, 1) - 1.0).abs() < 1e-3);
    // L2: the large-variance weight keeps most of itself, the small-variance one almost none.
    assert!(end(l2, 0) > 0.5, "L2, large gradients: {}", end(l2, 0));
    assert!(end(l2, 0) > 10.0 * end(adamw, 0));
    assert!(end(l2, 1) < 0.01, "L2, small gradients: {}", end(l2, 1));
    study.write_svg(&scratch("adamw_vs_l2.svg")).unwrap();
}

/// Reddi et al.'s problem: Adam ends at the worst point +1 with a non-vanishing average regret,
/// AMSGrad at the best point -1.
#[test]
fn amsgrad_finds_the_best_point_adam_the_worst() {
    let steps = seeds::REDDI_STEPS;
    let study = seeds::amsgrad(gpu(), steps).unwrap();
    assert_checks_pass(&study.checks());
    let [adam, amsgrad] = [&study.runs[0], &study.runs[1]];
    assert!(!adam.config.amsgrad && amsgrad.config.amsgrad);
    // The mean over the last period of three steps.
    let last_period = |run: &shared::lab::Run| {
        run.params[steps - 2..=steps]
            .iter()
            .map(|x| x[0] as f64)
            .sum::<f64>()
            / 3.0
    };
    assert!(
        last_period(adam) > 0.95,
        "Adam ends at {}",
        last_period(adam)
    );
    assert!(
        last_period(amsgrad) < -0.95,
        "AMSGrad ends at {}",
        last_period(amsgrad)
    );
    assert!(seeds::average_regret(adam) > 0.5);
    assert!(seeds::average_regret(amsgrad) < 0.05);
    for run in [adam, amsgrad] {
        assert!(
            run.params.iter().all(|x| (-1.0..=1.0).contains(&x[0])),
            "projected"
        );
    }
    study.write_svg(&scratch("amsgrad.svg")).unwrap();
}

/// Bursty gradients: between bursts Adam's effective learning rate grows back several-fold (its
/// v forgets) and the next burst throws the loss higher than Yogi's, whose effective learning
/// rate stays put between bursts.
#[test]
fn yogi_remembers_bursts_adam_forgets() {
    let steps = seeds::BURSTY_STEPS;
    let study = seeds::yogi_vs_adam(gpu(), steps).unwrap();
    assert_checks_pass(&study.checks());
    let [adam, yogi] = [&study.runs[0], &study.runs[1]];
    // Effective lr just before burst k + 1 over just after burst k ends.
    let regrowth = |run: &shared::lab::Run| {
        let eff = seeds::effective_lrs(run);
        let bursts: Vec<usize> = (1..)
            .map(|k| k * seeds::BURST_EVERY)
            .take_while(|&s| s + seeds::BURST_EVERY < steps)
            .collect();
        bursts
            .iter()
            .map(|&s| eff[s + seeds::BURST_EVERY - 2] / eff[s + seeds::BURST_LEN])
            .fold(f64::INFINITY, f64::min)
    };
    assert!(
        regrowth(adam) > 5.0,
        "Adam's effective lr regrows {}x",
        regrowth(adam)
    );
    assert!(
        regrowth(yogi) < 1.2,
        "Yogi's effective lr regrows {}x",
        regrowth(yogi)
    );
    let mean_peak = |run: &shared::lab::Run| {
        let peaks = seeds::burst_peaks(&seeds::losses_of(run));
        peaks.iter().sum::<f64>() / peaks.len() as f64
    };
    assert!(
        mean_peak(adam) > 1.5 * mean_peak(yogi),
        "loss peaks after bursts: Adam {} Yogi {}",
        mean_peak(adam),
        mean_peak(yogi)
    );
    study.write_svg(&scratch("yogi_vs_adam.svg")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The README's pictures

/// Every picture the README shows is a committed SVG under `docs/plots/`, and the README names
/// the example that writes it, whose source names the file.
#[test]
fn readme_pictures_exist_and_have_commands() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let pictures: Vec<&str> = readme
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .filter(|link| link.ends_with(".svg"))
        .collect();
    assert!(!pictures.is_empty(), "the README shows no pictures");
    for picture in pictures {
        let svg = std::fs::read_to_string(root.join(picture))
            .unwrap_or_else(|e| panic!("README shows {picture}: {e}"));
        assert!(svg.contains("<svg"), "{picture} is not an SVG");
        let file = picture.rsplit('/').next().unwrap();
        let example = std::fs::read_dir(root.join("examples"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .find(|p| {
                let stem = p.file_stem().unwrap().to_str().unwrap();
                let source = std::fs::read_to_string(p).unwrap();
                source.contains(file)
                    && readme.contains(&format!("cargo run --release --example {stem}"))
            });
        assert!(
            example.is_some(),
            "{picture}: no example names it with a `cargo run --release --example` line in the README"
        );
    }
}
