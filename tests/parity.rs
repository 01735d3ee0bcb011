//! The GPU step against the CPU reference: one table of described cases, crossed with tensor
//! sizes, buffer layouts, chunked bindings and step counts. Every case compares the parameters
//! and every state buffer.

mod common;

use common::{Rng, STORAGE, Tolerance, buffer, compare, gpu, max_abs, read, write, yogi_ties};
use wgpu_optim::{
    BufferView, Config, EpsMode, Optimizer, OptimizerOptions, Parameter, TensorState, reference,
};

/// 0-d, 1 element, around the vec4 width, around the workgroup size, and past 65,536.
const SIZES: [u64; 10] = [1, 1, 3, 4, 5, 255, 256, 257, 1025, 65537];
const STEPS: u64 = 31;

struct Case {
    name: &'static str,
    config: Config,
    /// The learning rate of step t, when it changes between steps.
    schedule: Option<fn(u64) -> f64>,
}

fn case(name: &'static str, config: Config) -> Case {
    Case {
        name,
        config,
        schedule: None,
    }
}

fn cases() -> Vec<Case> {
    vec![
        case("adam default", Config::adam()),
        case(
            "adam weight decay",
            Config::adam().lr(1e-2).weight_decay(0.1),
        ),
        case("adamw default", Config::adamw()),
        case(
            "adamw weight decay",
            Config::adamw().lr(1e-2).weight_decay(0.3),
        ),
        case("yogi default", Config::yogi()),
        case("yogi weight decay", Config::yogi().weight_decay(0.05)),
        case("adam amsgrad", Config::adam().lr(1e-2).amsgrad(true)),
        case(
            "adamw amsgrad",
            Config::adamw().amsgrad(true).betas(0.8, 0.99),
        ),
        case("yogi amsgrad", Config::yogi().amsgrad(true)),
        case(
            "adam maximize",
            Config::adam().maximize(true).weight_decay(0.02),
        ),
        case(
            "adamw maximize amsgrad",
            Config::adamw().maximize(true).amsgrad(true).lr(5e-3),
        ),
        case("yogi maximize", Config::yogi().maximize(true)),
        case(
            "adam no bias correction",
            Config::adam().bias_correction(false),
        ),
        case(
            "yogi no bias correction",
            Config::yogi().bias_correction(false).eps(1e-6),
        ),
        case(
            "adam folded eps",
            Config::adam().eps_mode(EpsMode::Folded).eps(1e-3),
        ),
        case(
            "adamw folded eps_root",
            Config::adamw().eps_mode(EpsMode::Folded).eps_root(1e-4),
        ),
        case("adam eps_root", Config::adam().eps_root(1e-3).eps(0.0)),
        case(
            "adam rescale and clip",
            Config::adam().rescale_grad(0.25).clip_gradient(Some(0.2)),
        ),
        case("adamw clip", Config::adamw().clip_gradient(Some(0.5))),
        case("yogi rescale", Config::yogi().rescale_grad(8.0)),
        case(
            "adam initial accumulator",
            Config::adam().initial_accumulator(0.5),
        ),
        case(
            "adam extreme betas",
            Config::adam().betas(0.0, 0.0).lr(1e-4),
        ),
        case("adamw low betas", Config::adamw().betas(0.5, 0.9).eps(1e-3)),
        Case {
            name: "adamw changing lr",
            config: Config::adamw().lr(1e-3),
            // linear warmup over 10 steps, then cosine decay
            schedule: Some(|t| {
                if t <= 10 {
                    1e-2 * t as f64 / 10.0
                } else {
                    1e-3 + 9e-3
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * (t - 10) as f64 / 30.0).cos())
                }
            }),
        },
    ]
}

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// Each tensor in its own param and grad buffers.
    Separate,
    /// All tensors in one param buffer and one grad buffer, at offsets that are often not
    /// 16-byte aligned (and differently misaligned in the two buffers).
    Packed,
}

/// Steps `case` on the GPU and on the CPU and returns every mismatch.
fn run(
    case: &Case,
    sizes: &[u64],
    layout: Layout,
    options: OptimizerOptions,
    steps: u64,
    seed: u64,
) -> Vec<String> {
    let (device, queue) = gpu();
    let mut rng = Rng::new(seed);
    let n = sizes.len();
    // Per-tensor scales spread the magnitudes the way real models do.
    let grad_scales: Vec<f64> = (0..n).map(|i| [1.0, 1e-2, 3.0, 1e-4][i % 4]).collect();
    let mut params: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&s| rng.normals(s as usize, 1.0))
        .collect();

    // Place the tensors.
    let (mut param_offsets, mut grad_offsets) = (vec![0u64; n], vec![0u64; n]);
    let (param_buffers, grad_buffers): (Vec<wgpu::Buffer>, Vec<wgpu::Buffer>) = match layout {
        Layout::Separate => sizes
            .iter()
            .map(|&s| (buffer(s, STORAGE), buffer(s, STORAGE)))
            .unzip(),
        Layout::Packed => {
            let (mut p_end, mut g_end) = (0, 0);
            for i in 0..n {
                param_offsets[i] = p_end + (i as u64 * 3) % 7;
                grad_offsets[i] = g_end + (i as u64 * 5) % 4;
                p_end = param_offsets[i] + sizes[i];
                g_end = grad_offsets[i] + sizes[i];
            }
            let (p, g) = (buffer(p_end + 5, STORAGE), buffer(g_end + 2, STORAGE));
            (vec![p; n], vec![g; n])
        }
    };
    let parameters: Vec<Parameter> = (0..n)
        .map(|i| {
            Parameter::new(
                format!("tensor{i}"),
                BufferView::new(&param_buffers[i], param_offsets[i], sizes[i]),
                BufferView::new(&grad_buffers[i], grad_offsets[i], sizes[i]),
            )
        })
        .collect();
    for i in 0..n {
        write(&param_buffers[i], param_offsets[i], &params[i]);
    }
    let mut optimizer = Optimizer::with_options(device, case.config.clone(), &parameters, options)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let mut states: Vec<TensorState> = sizes
        .iter()
        .map(|&s| TensorState::new(&case.config, s as usize))
        .collect();

    let mut lr_max = case.config.lr;
    // The largest processed gradient each tensor saw (rescaled, clipped, plus L2 decay): the
    // moments' rounding errors scale with it.
    let mut g_max = vec![0f32; n];
    for t in 1..=steps {
        let lr = case.schedule.map_or(case.config.lr, |f| f(t));
        lr_max = lr_max.max(lr);
        optimizer.set_lr(lr).unwrap();
        // Gradients shrink and wobble over the steps, so that v falls and amsgrad matters.
        let wobble = 3.0 * 0.9f64.powi(t as i32) * (1.5 + (t as f64).sin());
        for i in 0..n {
            let grad = rng.normals(sizes[i] as usize, grad_scales[i] * wobble);
            write(&grad_buffers[i], grad_offsets[i], &grad);
            let c = case.config.clip_gradient.unwrap_or(f64::INFINITY) as f32;
            let g = (max_abs(&grad) * case.config.rescale_grad as f32).min(c)
                + case.config.weight_decay as f32 * max_abs(&params[i]);
            g_max[i] = g_max[i].max(g);
            reference::step(&case.config, t, lr, &mut params[i], &grad, &mut states[i]);
        }
        optimizer.step_blocking(device, queue).unwrap();
    }

    let mut errors = Vec::new();
    // Tolerances: wgpu_optim::testing::Tolerance derives them from float32 rounding, and
    // lets Yogi resolve a few near-ties of sign(v - g^2) differently (`yogi_ties`).
    let allowed = |len: u64| {
        if case.config.algorithm == wgpu_optim::Algorithm::Yogi {
            yogi_ties(len)
        } else {
            0
        }
    };
    for i in 0..n {
        let g = g_max[i];
        let what = |buf: &str| format!("{} [size {}, {buf}]", case.name, sizes[i]);
        let got = read(&param_buffers[i], param_offsets[i], sizes[i]);
        let param_tol = Tolerance::param(steps, max_abs(&params[i]), lr_max);
        let state = optimizer.read_state_blocking(device, queue, i).unwrap();
        let want = &states[i];
        let checks = [
            compare(
                &what("param"),
                &got,
                &params[i],
                param_tol,
                allowed(sizes[i]),
            ),
            compare(
                &what("exp_avg"),
                &state.exp_avg,
                &want.exp_avg,
                Tolerance::exp_avg(max_abs(&want.exp_avg), g),
                allowed(sizes[i]),
            ),
            compare(
                &what("exp_avg_sq"),
                &state.exp_avg_sq,
                &want.exp_avg_sq,
                Tolerance::exp_avg_sq(max_abs(&want.exp_avg_sq), g),
                allowed(sizes[i]),
            ),
        ];
        errors.extend(checks.into_iter().filter_map(Result::err));
        match (&state.max_exp_avg_sq, &want.max_exp_avg_sq) {
            (Some(got), Some(w)) => errors.extend(
                compare(
                    &what("max_exp_avg_sq"),
                    got,
                    w,
                    Tolerance::exp_avg_sq(max_abs(w), g),
                    allowed(sizes[i]),
                )
                .err(),
            ),
            (None, None) => {}
            _ => errors.push(what("max_exp_avg_sq present on one side only")),
        }
    }
    errors
}

fn assert_all(errors: Vec<String>) {
    assert!(
        errors.is_empty(),
        "{} mismatches:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn every_case_matches_the_reference() {
    let mut errors = Vec::new();
    for (k, case) in cases().iter().enumerate() {
        errors.extend(run(
            case,
            &SIZES,
            Layout::Separate,
            OptimizerOptions::default(),
            STEPS,
            k as u64,
        ));
    }
    assert_all(errors);
}

#[test]
fn packed_views_at_unaligned_offsets() {
    let mut errors = Vec::new();
    for (k, case) in cases().iter().enumerate().step_by(3) {
        errors.extend(run(
            case,
            &SIZES,
            Layout::Packed,
            OptimizerOptions::default(),
            7,
            100 + k as u64,
        ));
    }
    assert_all(errors);
}

#[test]
fn chunked_bindings() {
    let granularity = Optimizer::chunk_granularity(&gpu().0.limits());
    let sizes = [
        1,
        5,
        granularity - 1,
        granularity,
        granularity + 3,
        1025,
        65537,
    ];
    let mut errors = Vec::new();
    for chunks in [1, 3] {
        let options = OptimizerOptions::default().chunk_elements(Some(granularity * chunks));
        for (k, case) in cases().iter().enumerate().step_by(4) {
            for layout in [Layout::Separate, Layout::Packed] {
                errors.extend(run(case, &sizes, layout, options, 5, 200 + k as u64));
            }
        }
    }
    assert_all(errors);
}

#[test]
fn more_than_65535_workgroups() {
    // A small workgroup reaches the per-dimension limit of 65,535 workgroups with a tensor
    // that lavapipe can step quickly: vec4 units here, and single elements when the views are
    // unaligned (Packed).
    let workgroup_size = 16;
    let options = OptimizerOptions::default().workgroup_size(workgroup_size);
    let limit = gpu().0.limits().max_compute_workgroups_per_dimension as u64;
    let vec4_size = limit * workgroup_size as u64 * 4 + 4 * 17 + 3;
    let scalar_size = limit * workgroup_size as u64 + 99;
    let cases = cases();
    assert_all(run(
        &cases[3],
        &[vec4_size],
        Layout::Separate,
        options,
        2,
        300,
    ));
    assert_all(run(
        &cases[8],
        &[7, scalar_size],
        Layout::Packed,
        options,
        2,
        301,
    ));
}

#[test]
fn step_counter_and_lr_are_kept() {
    let (device, queue) = gpu();
    let (p, g) = (buffer(8, STORAGE), buffer(8, STORAGE));
    let mut optimizer = Optimizer::new(
        device,
        Config::adam(),
        &[Parameter::new(
            "p",
            BufferView::whole(&p),
            BufferView::whole(&g),
        )],
    )
    .unwrap();
    assert_eq!(optimizer.step_count(), 0);
    assert_eq!(optimizer.lr(), 1e-3);
    optimizer.set_lr(0.5).unwrap();
    optimizer.step_blocking(device, queue).unwrap();
    optimizer.step_blocking(device, queue).unwrap();
    assert_eq!(optimizer.step_count(), 2);
    assert_eq!(optimizer.lr(), 0.5);
    assert_eq!(optimizer.parameter_names().collect::<Vec<_>>(), ["p"]);
}

#[test]
fn several_steps_recorded_before_one_submit() {
    // Each step has its own uniform slot, so steps recorded into one encoder (and submitted
    // together) see their own t and lr.
    let (device, queue) = gpu();
    let config = Config::adam().lr(1e-2);
    let mut rng = Rng::new(7);
    let n = 1000;
    let mut param = rng.normals(n, 1.0);
    let grad = rng.normals(n, 1.0);
    let (pb, gb) = (buffer(n as u64, STORAGE), buffer(n as u64, STORAGE));
    write(&pb, 0, &param);
    write(&gb, 0, &grad);
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
    let mut state = TensorState::new(&config, n);
    let mut encoder = device.create_command_encoder(&Default::default());
    for t in 1..=5u64 {
        let lr = 1e-2 / t as f64;
        optimizer.set_lr(lr).unwrap();
        optimizer.step(queue, &mut encoder);
        reference::step(&config, t, lr, &mut param, &grad, &mut state);
    }
    queue.submit([encoder.finish()]);
    let got = read(&pb, 0, n as u64);
    let tol = Tolerance::param(5, max_abs(&param), 1e-2);
    compare("param", &got, &param, tol, 0).unwrap();
}

#[test]
fn any_number_of_steps_recorded_before_one_submit() {
    // Each step's numbers are copied in the encoder just before its pass, so 150 steps (more
    // than the 64 uniform slots of the old ring, which wrapped silently) recorded into one
    // encoder give the same bits as 150 steps submitted one by one.
    let (device, queue) = gpu();
    let config = Config::adamw().lr(1e-2).weight_decay(0.1);
    let steps = 150u64;
    let mut rng = Rng::new(8);
    let n = 257;
    let init = rng.normals(n, 1.0);
    let grad = rng.normals(n, 1.0);
    let build = || {
        let (pb, gb) = (buffer(n as u64, STORAGE), buffer(n as u64, STORAGE));
        write(&pb, 0, &init);
        write(&gb, 0, &grad);
        let parameters = [Parameter::new(
            "p",
            BufferView::whole(&pb),
            BufferView::whole(&gb),
        )];
        (
            Optimizer::new(device, config.clone(), &parameters).unwrap(),
            pb,
        )
    };
    let lr = |t: u64| 1e-2 * (1.0 + (t as f64).sin()) / 2.0;
    let (mut batched, batched_param) = build();
    let mut encoder = device.create_command_encoder(&Default::default());
    for t in 1..=steps {
        batched.set_lr(lr(t)).unwrap();
        batched.step(queue, &mut encoder);
    }
    queue.submit([encoder.finish()]);
    let (mut single, single_param) = build();
    for t in 1..=steps {
        single.set_lr(lr(t)).unwrap();
        single.step_blocking(device, queue).unwrap();
    }
    let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(
        bits(read(&batched_param, 0, n as u64)),
        bits(read(&single_param, 0, n as u64))
    );
    let (a, b) = (
        batched.read_state_blocking(device, queue, 0).unwrap(),
        single.read_state_blocking(device, queue, 0).unwrap(),
    );
    assert_eq!(bits(a.exp_avg), bits(b.exp_avg));
    assert_eq!(bits(a.exp_avg_sq), bits(b.exp_avg_sq));
    // And both are the reference's trajectory.
    let mut param = init.clone();
    let mut state = TensorState::new(&config, n);
    for t in 1..=steps {
        reference::step(&config, t, lr(t), &mut param, &grad, &mut state);
    }
    let tol = Tolerance::param(steps, max_abs(&param), 1e-2);
    compare("param", &read(&single_param, 0, n as u64), &param, tol, 0).unwrap();
}
