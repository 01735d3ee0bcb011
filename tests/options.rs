//! No option is silently ignored: flipping any config field changes the result, on the GPU and
//! in the CPU reference alike; and the properties that should hold between variants do.

mod common;

use common::{Rng, STORAGE, buffer, gpu, max_abs, read, write};
use wgpu_optim::{BufferView, Config, EpsMode, Optimizer, Parameter, TensorState, reference};

const LEN: usize = 1000;
const STEPS: u64 = 6;

/// The parameter and its state after `STEPS` steps, on the GPU and on the CPU. Gradients
/// shrink over the steps (so v falls and amsgrad matters) and have scale `grad_scale`.
fn run(config: &Config, grad_scale: f64) -> [Vec<f32>; 2] {
    let (device, queue) = gpu();
    let mut rng = Rng::new(42);
    let mut cpu_param = rng.normals(LEN, 1.0);
    let (pb, gb) = (buffer(LEN as u64, STORAGE), buffer(LEN as u64, STORAGE));
    write(&pb, 0, &cpu_param);
    let mut optimizer = Optimizer::new(
        device,
        config.clone(),
        &[Parameter::new(
            "p",
            BufferView::whole(&pb),
            BufferView::whole(&gb),
        )],
    )
    .unwrap();
    let mut cpu_state = TensorState::new(config, LEN);
    for t in 1..=STEPS {
        let grad = rng.normals(LEN, grad_scale * 0.5f64.powi(t as i32 - 1));
        write(&gb, 0, &grad);
        optimizer.step_blocking(device, queue).unwrap();
        reference::step(config, t, config.lr, &mut cpu_param, &grad, &mut cpu_state);
    }
    let gpu_state = optimizer.read_state_blocking(device, queue, 0).unwrap();
    let flatten = |param: Vec<f32>, s: TensorState| {
        let mut all = param;
        all.extend(s.exp_avg);
        all.extend(s.exp_avg_sq);
        all.extend(s.max_exp_avg_sq.unwrap_or_default());
        all
    };
    [
        flatten(read(&pb, 0, LEN as u64), gpu_state),
        flatten(cpu_param, cpu_state),
    ]
}

/// Largest difference between two runs, relative to the largest value of the first.
fn relative_change(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY; // amsgrad adds a state buffer
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / max_abs(a)
}

#[test]
fn flipping_any_option_changes_the_result() {
    // (option, base config, flipped config, gradient scale at which the option matters)
    let flips: Vec<(&str, Config, Config, f64)> = vec![
        (
            "algorithm adam -> adamw",
            Config::adam().weight_decay(0.1),
            Config::adamw().weight_decay(0.1),
            1.0,
        ),
        // Low b2, so that Yogi's additive v update differs visibly from Adam's average.
        (
            "algorithm adam -> yogi",
            Config::adam().betas(0.9, 0.5),
            Config::yogi()
                .lr(1e-3)
                .eps(1e-8)
                .initial_accumulator(0.0)
                .betas(0.9, 0.5),
            1.0,
        ),
        ("lr", Config::adam(), Config::adam().lr(3e-3), 1.0),
        (
            "betas[0]",
            Config::adam(),
            Config::adam().betas(0.7, 0.999),
            1.0,
        ),
        (
            "betas[1]",
            Config::adam(),
            Config::adam().betas(0.9, 0.9),
            1.0,
        ),
        ("eps", Config::adam(), Config::adam().eps(1e-3), 1e-3),
        (
            "eps_root",
            Config::adam(),
            Config::adam().eps_root(1e-4),
            1e-3,
        ),
        (
            "eps_mode",
            Config::adam().eps(1e-3),
            Config::adam().eps(1e-3).eps_mode(EpsMode::Folded),
            1e-3,
        ),
        (
            "weight_decay (adam)",
            Config::adam(),
            Config::adam().weight_decay(0.5),
            1.0,
        ),
        (
            "weight_decay (adamw)",
            Config::adamw().weight_decay(0.0),
            Config::adamw().weight_decay(0.5),
            1.0,
        ),
        (
            "weight_decay (yogi)",
            Config::yogi(),
            Config::yogi().weight_decay(0.5),
            1.0,
        ),
        ("amsgrad", Config::adam(), Config::adam().amsgrad(true), 1.0),
        (
            "maximize",
            Config::adam(),
            Config::adam().maximize(true),
            1.0,
        ),
        (
            "bias_correction",
            Config::adam(),
            Config::adam().bias_correction(false),
            1.0,
        ),
        (
            "rescale_grad",
            Config::adam().eps(1e-3),
            Config::adam().eps(1e-3).rescale_grad(0.1),
            1e-3,
        ),
        (
            "clip_gradient",
            Config::adam(),
            Config::adam().clip_gradient(Some(0.1)),
            1.0,
        ),
        (
            "initial_accumulator",
            Config::adam(),
            Config::adam().initial_accumulator(0.5),
            1.0,
        ),
    ];
    let mut failures = Vec::new();
    for (option, base, flipped, grad_scale) in &flips {
        let [base_gpu, base_cpu] = run(base, *grad_scale);
        let [flipped_gpu, flipped_cpu] = run(flipped, *grad_scale);
        // Rounding differences between the paths are ~1e-6 relative (see parity.rs); a real
        // effect of the option is orders of magnitude larger.
        for (path, a, b) in [
            ("gpu", &base_gpu, &flipped_gpu),
            ("cpu", &base_cpu, &flipped_cpu),
        ] {
            let change = relative_change(a, b);
            if change < 1e-4 {
                failures.push(format!(
                    "{option}: {path} result changed by only {change:e}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "options ignored:\n{}",
        failures.join("\n")
    );
}

#[test]
fn adamw_without_weight_decay_is_adam() {
    let [adam, _] = run(&Config::adam(), 1.0);
    let [adamw, _] = run(&Config::adamw().weight_decay(0.0), 1.0);
    // The same variant of the kernel runs: bit-identical.
    assert_eq!(adam, adamw);
}

#[test]
fn yogi_moves_v_additively() {
    // With v above g^2 Yogi lowers v by (1 - b2) g^2, where Adam would scale it by b2.
    let yogi = Config::yogi().initial_accumulator(10.0);
    let [gpu_run, cpu_run] = run(&yogi, 1.0);
    let v = &gpu_run[2 * LEN..3 * LEN];
    assert!(v.iter().all(|&v| v < 10.0 && v > 9.0), "v left (9, 10)");
    assert!(relative_change(&cpu_run, &gpu_run) < 1e-4);
}

#[test]
fn decoupled_decay_keeps_its_precision_at_small_lr_times_wd() {
    // AdamW's decay is `p - (lr * wd) * p` with lr * wd as its own f32. The old form,
    // `p * f32(1 - lr * wd)`, rounds lr * wd to a multiple of 2^-24: at 1e-7 it decays 19% too
    // much (a 0.16 to 0.32 ulp shift, which flips the rounding of about a quarter of the
    // elements) and under ~3e-8 it does nothing. With a zero gradient the step is the decay
    // alone (m = 0), so the GPU must match the reference's f32(p - f32(lr * wd) * p) exactly:
    // both round once from values that differ by under 2^-24 of the decay term.
    let (device, queue) = gpu();
    let n = 4096;
    let mut rng = Rng::new(11);
    let init: Vec<f32> = (0..n).map(|_| (4.0 * rng.uniform() - 2.0) as f32).collect();
    // (lr, wd, elements that must move): at lr * wd = 3e-8 only p just under a power of two
    // (half an ulp under 3e-8 |p|) can move, about 1 in 200.
    for (lr, wd, min_moved) in [
        (1e-6, 0.1, n / 2),
        (1e-6, 0.05, n / 2),
        (3e-7, 0.1, 1),
        (1e-4, 1e-3, n / 2),
    ] {
        let config = Config::adamw().lr(lr).weight_decay(wd);
        let (pb, gb) = (buffer(n as u64, STORAGE), buffer(n as u64, STORAGE));
        write(&pb, 0, &init);
        write(&gb, 0, &vec![0.0; n]);
        let parameters = [Parameter::new(
            "p",
            BufferView::whole(&pb),
            BufferView::whole(&gb),
        )];
        let mut optimizer = Optimizer::new(device, config.clone(), &parameters).unwrap();
        optimizer.step_blocking(device, queue).unwrap();
        let mut want = init.clone();
        let mut state = TensorState::new(&config, n);
        reference::step(&config, 1, lr, &mut want, &vec![0.0; n], &mut state);
        let got = read(&pb, 0, n as u64);
        let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(
            differ, 0,
            "lr {lr} wd {wd}: {differ} of {n} elements differ"
        );
        // The decay is there: elements whose decay exceeds half an ulp moved.
        let moved = got.iter().zip(&init).filter(|(g, p)| g != p).count();
        assert!(moved >= min_moved, "lr {lr} wd {wd}: only {moved} moved");
    }
}
