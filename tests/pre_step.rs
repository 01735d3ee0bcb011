//! Before the per-element step, on the device: loss scaling, non-finite skip and global-norm
//! clipping (`docs/semantics.md`), against the CPU reference's `iteration`, with iterations
//! skipped at the first, a middle and the last step; the norm's accuracy at 100M elements; a
//! NaN in one tensor of 300 skipping all of them; and many iterations in one encoder.

mod common;

use common::{Rng, STORAGE, Tolerance, buffer, compare, gpu, max_abs, read, write, yogi_ties};
use wgpu_optim::reference::{self, IterationState, IterationTensor};
use wgpu_optim::{
    Algorithm, Arena, BufferView, Config, EpsMode, LossScale, Optimizer, OptimizerOptions,
    Parameter, TensorState,
};

/// The per-group options of the parity table, each crossed with the features below.
fn cases() -> Vec<(&'static str, Config)> {
    vec![
        ("adam", Config::adam().lr(1e-2)),
        ("adamw decay", Config::adamw().lr(1e-2).weight_decay(0.1)),
        ("yogi", Config::yogi()),
        (
            "adam amsgrad decay",
            Config::adam().amsgrad(true).weight_decay(0.05),
        ),
        ("adamw maximize", Config::adamw().maximize(true)),
        (
            "adam no bias correction",
            Config::adam().bias_correction(false),
        ),
        (
            "adam folded eps_root",
            Config::adam().eps_mode(EpsMode::Folded).eps_root(1e-4),
        ),
        ("adam eps_root", Config::adam().eps_root(1e-3).eps(0.0)),
        (
            "adam rescale and clip",
            Config::adam().rescale_grad(0.5).clip_gradient(Some(0.3)),
        ),
        (
            "adam initial accumulator",
            Config::adam().initial_accumulator(0.1),
        ),
    ]
}

/// (name, optimizer-wide keys): clipping alone, scaling alone, both, skipping alone.
/// A feature: its name and how it changes a config.
type Feature = (&'static str, fn(Config) -> Config);

fn features() -> Vec<Feature> {
    vec![
        ("max_grad_norm", |c| c.max_grad_norm(Some(0.5))),
        ("loss_scale", |c| {
            c.loss_scale(Some(
                LossScale::default().init_scale(1024.0).growth_interval(3),
            ))
        }),
        ("loss_scale + max_grad_norm", |c| {
            c.loss_scale(Some(
                LossScale::default().init_scale(4096.0).growth_interval(2),
            ))
            .max_grad_norm(Some(1.0))
        }),
        ("skip_nonfinite", |c| c.skip_nonfinite(true)),
    ]
}

/// Sizes around the vec4 width and the workgroup size, in separate buffers, plus an arena
/// of three tensors (a flat buffer, segmented dispatches) in a second group.
const SIZES: [u64; 4] = [1, 5, 257, 1025];
const ARENA: [u64; 3] = [3, 100, 64];
const ITERATIONS: u64 = 9;

struct Model {
    optimizer: Optimizer,
    params: Vec<(wgpu::Buffer, u64)>,
    grads: Vec<(wgpu::Buffer, u64)>,
    lens: Vec<u64>,
}

fn model(groups: &[Config], init: &[Vec<f32>]) -> Model {
    let (device, _) = gpu();
    let mut params = Vec::new();
    let mut grads = Vec::new();
    let mut parameters = Vec::new();
    for (i, &len) in SIZES.iter().enumerate() {
        let (p, g) = (buffer(len, STORAGE), buffer(len, STORAGE));
        write(&p, 0, &init[i]);
        parameters.push(Parameter::new(
            format!("p{i}"),
            BufferView::whole(&p),
            BufferView::whole(&g),
        ));
        params.push((p, 0));
        grads.push((g, 0));
    }
    let specs: Vec<(String, u64, usize)> = ARENA
        .iter()
        .enumerate()
        .map(|(i, &len)| (format!("a{i}"), len, 1))
        .collect();
    let specs: Vec<(&str, u64, usize)> =
        specs.iter().map(|(n, l, g)| (n.as_str(), *l, *g)).collect();
    let arena = Arena::new(device, &specs).unwrap();
    for (k, t) in arena.tensors().iter().enumerate() {
        write(&arena.param, t.offset, &init[SIZES.len() + k]);
        params.push((arena.param.clone(), t.offset));
        grads.push((arena.grad.clone(), t.offset));
    }
    let optimizer = Optimizer::with_groups(
        device,
        groups,
        &parameters,
        &[arena.flat()],
        OptimizerOptions::default(),
    )
    .unwrap();
    let lens = SIZES.iter().chain(&ARENA).copied().collect();
    Model {
        optimizer,
        params,
        grads,
        lens,
    }
}

#[test]
fn gpu_matches_the_reference_with_scaling_clipping_and_skips() {
    let (device, queue) = gpu();
    let mut errors = Vec::new();
    for (case, config) in cases() {
        for (feature, with) in features() {
            let base = with(config.clone());
            let groups = [base.clone(), with(config.clone().lr(config.lr * 0.5))];
            let what = format!("{case} with {feature}");
            let mut rng = Rng::new(case.len() as u64 * 31 + feature.len() as u64);
            let init: Vec<Vec<f32>> = SIZES
                .iter()
                .chain(&ARENA)
                .map(|&n| rng.normals(n as usize, 1.0))
                .collect();
            let mut m = model(&groups, &init);
            let mut params = init.clone();
            let mut states: Vec<TensorState> = (0..params.len())
                .map(|i| TensorState::new(&groups[(i >= SIZES.len()) as usize], params[i].len()))
                .collect();
            let mut state = IterationState::new(&base);
            let lrs = [groups[0].lr, groups[1].lr];
            let mut g_max = 0f32;
            let skips = base.skips();
            for k in 1..=ITERATIONS {
                // Iterations 1, 5 and 9 carry a non-finite element where skipping is on.
                let poison = skips && [1, 5, ITERATIONS].contains(&k);
                let scale = state.loss_scale;
                let wobble = 3.0 * 0.9f64.powi(k as i32) * (1.5 + (k as f64).sin());
                let mut grads: Vec<Vec<f32>> = m
                    .lens
                    .iter()
                    .map(|&n| {
                        let g = rng.normals(n as usize, wobble);
                        g_max = g_max.max(max_abs(&g) * 1.5);
                        g.iter().map(|x| x * scale).collect()
                    })
                    .collect();
                if poison {
                    let bad = [f32::INFINITY, f32::NAN, f32::NEG_INFINITY][(k % 3) as usize];
                    let t = (k as usize * 3) % grads.len();
                    let at = grads[t].len() / 2;
                    grads[t][at] = bad;
                }
                for (i, g) in grads.iter().enumerate() {
                    write(&m.grads[i].0, m.grads[i].1, g);
                }
                m.optimizer.step_blocking(device, queue).unwrap();
                let mut tensors: Vec<IterationTensor> = params
                    .iter_mut()
                    .zip(&grads)
                    .zip(&mut states)
                    .enumerate()
                    .map(|(i, ((param, grad), state))| IterationTensor {
                        group: (i >= SIZES.len()) as usize,
                        param,
                        grad,
                        state,
                    })
                    .collect();
                let report = reference::iteration(&groups, &lrs, &mut tensors, &mut state);
                assert_eq!(report.found_inf, poison, "{what}: iteration {k}");
                let status = m.optimizer.read_status_blocking(device, queue).unwrap();
                if status.found_inf != report.found_inf
                    || status.applied_steps != state.step
                    || status.loss_scale != state.loss_scale
                    || status.growth_tracker != state.growth_tracker
                {
                    errors.push(format!(
                        "{what}: iteration {k}: status {status:?}, reference {report:?} {state:?}"
                    ));
                }
                if base.max_grad_norm.is_some() && !poison {
                    let norm = status.global_norm as f64;
                    if (norm - report.global_norm).abs() > 1e-5 * report.global_norm {
                        errors.push(format!(
                            "{what}: iteration {k}: norm {norm} vs {}",
                            report.global_norm
                        ));
                    }
                }
            }
            // Tolerances as the parity tests' (tests/common, wgpu_optim::testing::Tolerance),
            // with the gradients' largest magnitude after clipping and decay.
            let allowed = |len: usize| {
                if config.algorithm == Algorithm::Yogi {
                    yogi_ties(len as u64)
                } else {
                    0
                }
            };
            for (i, want) in params.iter().enumerate() {
                let got = read(&m.params[i].0, m.params[i].1, m.lens[i]);
                let tol = Tolerance::param(state.step, max_abs(want), config.lr);
                errors.extend(
                    compare(
                        &format!("{what}: param {i}"),
                        &got,
                        want,
                        tol,
                        allowed(want.len()),
                    )
                    .err(),
                );
                let s = m.optimizer.read_state_blocking(device, queue, i).unwrap();
                let g = g_max + config.weight_decay as f32 * 4.0;
                let w = &states[i];
                let m_tol = Tolerance::exp_avg(max_abs(&w.exp_avg), g);
                let v_tol = Tolerance::exp_avg_sq(max_abs(&w.exp_avg_sq), g);
                errors.extend(
                    compare(
                        &format!("{what}: exp_avg {i}"),
                        &s.exp_avg,
                        &w.exp_avg,
                        m_tol,
                        allowed(want.len()),
                    )
                    .err(),
                );
                errors.extend(
                    compare(
                        &format!("{what}: exp_avg_sq {i}"),
                        &s.exp_avg_sq,
                        &w.exp_avg_sq,
                        v_tol,
                        allowed(want.len()),
                    )
                    .err(),
                );
                if let (Some(a), Some(b)) = (&s.max_exp_avg_sq, &w.max_exp_avg_sq) {
                    let tol = Tolerance::exp_avg_sq(max_abs(b), g);
                    errors.extend(
                        compare(
                            &format!("{what}: max_exp_avg_sq {i}"),
                            a,
                            b,
                            tol,
                            allowed(want.len()),
                        )
                        .err(),
                    );
                }
            }
            if skips {
                assert_eq!(
                    state.step,
                    ITERATIONS - 3,
                    "{what}: three iterations skipped"
                );
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{} mismatches:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn a_nan_in_one_tensor_of_300_skips_them_all() {
    let (device, queue) = gpu();
    let config = Config::adamw().lr(1e-2).skip_nonfinite(true);
    let mut rng = Rng::new(300);
    let specs: Vec<(String, u64, usize)> = (0..300)
        .map(|i| (format!("t{i}"), 1 + rng.below(200), 0))
        .collect();
    let specs: Vec<(&str, u64, usize)> =
        specs.iter().map(|(n, l, g)| (n.as_str(), *l, *g)).collect();
    let arena = Arena::new(device, &specs).unwrap();
    let total = arena.param.size() / 4;
    write(&arena.param, 0, &rng.normals(total as usize, 1.0));
    let mut optimizer = Optimizer::with_groups(
        device,
        &[config],
        &[],
        &[arena.flat()],
        OptimizerOptions::default(),
    )
    .unwrap();
    let grads = |rng: &mut Rng| rng.normals(total as usize, 1.0);
    write(&arena.grad, 0, &grads(&mut rng));
    optimizer.step_blocking(device, queue).unwrap();
    let before = read(&arena.param, 0, total);
    let state_before = optimizer.read_state_blocking(device, queue, 0).unwrap();
    let mut g = grads(&mut rng);
    let t = &arena.tensors()[137];
    g[(t.offset + t.len / 2) as usize] = f32::NAN;
    write(&arena.grad, 0, &g);
    optimizer.step_blocking(device, queue).unwrap();
    let status = optimizer.read_status_blocking(device, queue).unwrap();
    assert!(status.found_inf);
    assert_eq!(status.applied_steps, 1);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&read(&arena.param, 0, total)),
        bits(&before),
        "no parameter moved"
    );
    let state_after = optimizer.read_state_blocking(device, queue, 0).unwrap();
    assert_eq!(bits(&state_after.exp_avg), bits(&state_before.exp_avg));
    // The next finite iteration steps again, as t = 2.
    write(&arena.grad, 0, &grads(&mut rng));
    optimizer.step_blocking(device, queue).unwrap();
    let status = optimizer.read_status_blocking(device, queue).unwrap();
    assert!(!status.found_inf);
    assert_eq!(status.applied_steps, 2);
    assert_ne!(bits(&read(&arena.param, 0, total)), bits(&before));
}

#[test]
fn the_global_norm_of_100m_elements_is_within_1e_6_of_f64() {
    // Per-workgroup partial sums, Kahan-compensated per invocation of the finishing pass,
    // then trees: the f32 norm stays within 1e-6 of the exact one at 100M elements.
    let (device, queue) = gpu();
    let n = 100_000_000u64;
    let mut rng = Rng::new(100);
    // Magnitudes over six decades, so that small terms would be lost to a naive sum.
    let grad: Vec<f32> = (0..n)
        .map(|_| {
            let u = rng.uniform();
            ((u - 0.5) * 10f64.powf(3.0 * (rng.uniform() - 0.5))) as f32
        })
        .collect();
    let exact: f64 = grad
        .iter()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt();
    let (p, g) = (buffer(n, STORAGE), buffer(n, STORAGE));
    write(&g, 0, &grad);
    drop(grad);
    let config = Config::adam().max_grad_norm(Some(1.0));
    let mut optimizer = Optimizer::new(
        device,
        config,
        &[Parameter::new(
            "w",
            BufferView::whole(&p),
            BufferView::whole(&g),
        )],
    )
    .unwrap();
    optimizer.step_blocking(device, queue).unwrap();
    let norm = optimizer
        .read_status_blocking(device, queue)
        .unwrap()
        .global_norm as f64;
    let relative = (norm - exact).abs() / exact;
    assert!(
        relative < 1e-6,
        "norm {norm}, exact {exact}: relative error {relative:e}"
    );
}

#[test]
fn iterations_recorded_in_one_encoder_equal_one_submit_each() {
    // Nothing travels to the host: 12 iterations with skips and a moving loss scale recorded
    // into one encoder give the same bits as 12 submits.
    let (device, queue) = gpu();
    let config = Config::adamw()
        .lr(1e-2)
        .loss_scale(Some(
            LossScale::default()
                .init_scale(2.0f64.powi(20))
                .growth_interval(2),
        ))
        .max_grad_norm(Some(0.5));
    let n = 301;
    let mut rng = Rng::new(12);
    let init = rng.normals(n, 1.0);
    // Scaled gradients, the same each iteration, with an overflow in iterations 2 and 7.
    let grads: Vec<Vec<f32>> = (0..12)
        .map(|k| {
            let mut g = rng.normals(n, 3e3);
            if k == 1 || k == 6 {
                g[7] = f32::INFINITY;
            }
            g
        })
        .collect();
    let build = || {
        let (p, gs): (wgpu::Buffer, Vec<wgpu::Buffer>) = (
            buffer(n as u64, STORAGE),
            (0..12).map(|_| buffer(n as u64, STORAGE)).collect(),
        );
        write(&p, 0, &init);
        for (b, g) in gs.iter().zip(&grads) {
            write(b, 0, g);
        }
        (p, gs)
    };
    // One optimizer per gradient buffer would not share state: copy each iteration's
    // gradient into the one the optimizer reads, in the same encoder.
    let run = |batched: bool| {
        let (p, gs) = build();
        let g = buffer(n as u64, STORAGE);
        let mut optimizer = Optimizer::new(
            device,
            config.clone(),
            &[Parameter::new(
                "w",
                BufferView::whole(&p),
                BufferView::whole(&g),
            )],
        )
        .unwrap();
        let mut encoder = device.create_command_encoder(&Default::default());
        for gk in &gs {
            encoder.copy_buffer_to_buffer(gk, 0, &g, 0, n as u64 * 4);
            optimizer.step(queue, &mut encoder);
            if !batched {
                queue.submit([encoder.finish()]);
                encoder = device.create_command_encoder(&Default::default());
            }
        }
        queue.submit([encoder.finish()]);
        let status = optimizer.read_status_blocking(device, queue).unwrap();
        (read(&p, 0, n as u64), status)
    };
    let (a, sa) = run(true);
    let (b, sb) = run(false);
    assert_eq!(sa, sb);
    assert_eq!(sa.applied_steps, 10);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn garbage_between_tensors_of_a_flat_buffer_counts_for_nothing() {
    // The gradient buffer holds NaN, infinity and a huge value in the padding between the
    // tensors of a flat buffer (inside the vec4 lanes of their last elements, and in gaps):
    // no tensor's element, so no skip, and a finite norm equal to the tensors' own.
    let (device, queue) = gpu();
    let layout = [(0u64, 5u64), (8, 7), (16, 300), (320, 1)];
    let len = 324;
    let (param, grad) = (buffer(len, STORAGE), buffer(len, STORAGE));
    let garbage = [f32::NAN, f32::INFINITY, 3e38, f32::NEG_INFINITY];
    write(
        &grad,
        0,
        &(0..len)
            .map(|i| garbage[i as usize % 4])
            .collect::<Vec<f32>>(),
    );
    let mut rng = Rng::new(3);
    let mut grads = Vec::new();
    for &(offset, n) in &layout {
        let g = rng.normals(n as usize, 1.0);
        write(&grad, offset, &g);
        grads.push(g);
    }
    let config = Config::adam().max_grad_norm(Some(1.0)).skip_nonfinite(true);
    let tensors = layout
        .iter()
        .enumerate()
        .map(|(i, &(offset, n))| wgpu_optim::FlatTensor::new(format!("t{i}"), offset, n))
        .collect();
    let flat = wgpu_optim::FlatParameters::new(
        BufferView::new(&param, 0, len),
        BufferView::new(&grad, 0, len),
        tensors,
    );
    let mut optimizer =
        Optimizer::with_groups(device, &[config], &[], &[flat], Default::default()).unwrap();
    optimizer.step_blocking(device, queue).unwrap();
    let status = optimizer.read_status_blocking(device, queue).unwrap();
    let norm = grads
        .iter()
        .flatten()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt();
    assert!(!status.found_inf, "{status:?}");
    assert_eq!(status.applied_steps, 1);
    assert!(
        ((status.global_norm as f64) - norm).abs() <= 1e-6 * norm,
        "{} vs {norm}",
        status.global_norm
    );
    assert!(read(&param, 0, len).iter().enumerate().all(|(i, p)| {
        let inside = layout
            .iter()
            .any(|&(o, n)| (o..o + n).contains(&(i as u64)));
        !inside || p.is_finite()
    }));
}
