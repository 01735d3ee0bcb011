//! Many tensors in one flat buffer, one dispatch per chunk, each tensor with its group's
//! hyperparameters: equal, element for element, to stepping each tensor on its own.

mod common;

use common::{Rng, STORAGE, Tolerance, buffer, compare, gpu, max_abs, read, write};
use wgpu_optim::{
    Arena, BufferView, Config, Error, FlatParameters, FlatTensor, Optimizer, OptimizerOptions,
    Parameter, Schedule, TensorState, groups, reference,
};

/// Three groups as a BERT fine-tune would have them, differing in every per-group value.
fn three_groups() -> Vec<Config> {
    vec![
        Config::adamw().lr(1e-3).weight_decay(0.01),
        Config::adamw().lr(2e-3).weight_decay(0.0), // biases and LayerNorm weights
        Config::adamw()
            .lr(5e-4)
            .weight_decay(0.1)
            .betas(0.8, 0.99)
            .eps(1e-6)
            .clip_gradient(Some(1.5)),
    ]
}

/// Random sizes from 1 to ~5000, log-uniform: 0-d tensors, single elements, sizes that are not
/// multiples of 4 and some that are.
fn random_sizes(rng: &mut Rng, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| match i % 10 {
            0 => 1, // 0-d
            1 => 4 * (1 + rng.next_u64() % 64),
            _ => (5000f64.powf(rng.uniform())) as u64,
        })
        .collect()
}

#[test]
fn flat_arena_equals_separate_tensors_element_for_element() {
    flat_equals_separate(OptimizerOptions::default(), 1);
}

#[test]
fn flat_arena_split_into_hinted_chunks() {
    // One workgroup hint per invocation: a segmented dispatch then covers at most
    // 4 * 16,384 elements, so the arena is cut into several chunks (and a 2-D grid).
    let options = OptimizerOptions::default().workgroup_size(1);
    flat_equals_separate(options, 3);
}

/// 300 tensors of random sizes in three groups: an arena against separate buffers.
fn flat_equals_separate(options: OptimizerOptions, min_dispatches: usize) {
    let (device, queue) = gpu();
    let mut rng = Rng::new(5);
    let sizes = random_sizes(&mut rng, 300);
    let groups = three_groups();
    let names: Vec<String> = (0..sizes.len())
        .map(|i| match i % 3 {
            0 => format!("layer.{i}.weight"),
            1 => format!("layer.{i}.bias"),
            _ => format!("layer.{i}.LayerNorm.weight"),
        })
        .collect();
    let mut group_of = groups::weight_decay_groups(
        names.iter().map(String::as_str),
        &groups::BERT_NO_DECAY,
        0,
        1,
    );
    for (i, g) in group_of.iter_mut().enumerate() {
        if i % 7 == 0 {
            *g = 2;
        }
    }

    // The arena: one flat param buffer, one flat grad buffer.
    let specs: Vec<(&str, u64, usize)> = (0..sizes.len())
        .map(|i| (names[i].as_str(), sizes[i], group_of[i]))
        .collect();
    let arena = Arena::new(device, &specs).unwrap();
    let granularity = Optimizer::chunk_granularity(&device.limits());
    assert!(arena.tensors().iter().all(|t| t.offset % granularity == 0));
    let mut flat = Optimizer::with_groups(device, &groups, &[], &[arena.flat()], options).unwrap();
    let dispatches = flat.dispatch_count();
    assert!(dispatches >= min_dispatches, "{dispatches} dispatches");
    if options == OptimizerOptions::default() {
        assert!(
            dispatches <= 2,
            "one vec4 dispatch (and at most a scalar tail) per chunk"
        );
    }

    // The same tensors, each in its own buffers.
    let separate_buffers: Vec<(wgpu::Buffer, wgpu::Buffer)> = sizes
        .iter()
        .map(|&s| (buffer(s, STORAGE), buffer(s, STORAGE)))
        .collect();
    let parameters: Vec<Parameter> = (0..sizes.len())
        .map(|i| {
            let (p, g) = &separate_buffers[i];
            Parameter::new(&names[i], BufferView::whole(p), BufferView::whole(g))
                .in_group(group_of[i])
        })
        .collect();
    let mut separate = Optimizer::with_groups(device, &groups, &parameters, &[], options).unwrap();
    assert_eq!(
        separate.parameter_names().collect::<Vec<_>>(),
        flat.parameter_names().collect::<Vec<_>>()
    );

    let mut cpu_params: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&s| rng.normals(s as usize, 1.0))
        .collect();
    let mut cpu_states: Vec<TensorState> = (0..sizes.len())
        .map(|i| TensorState::new(&groups[group_of[i]], sizes[i] as usize))
        .collect();
    for (i, p) in cpu_params.iter().enumerate() {
        write(&arena.param, arena.tensors()[i].offset, p);
        write(&separate_buffers[i].0, 0, p);
    }
    let steps = 6;
    for t in 1..=steps {
        // Each group's lr changes every step, through the uniforms only.
        let lrs: Vec<f64> = groups
            .iter()
            .map(|g| g.lr * (1.0 + 0.3 * (t as f64).sin()))
            .collect();
        for (g, &lr) in lrs.iter().enumerate() {
            flat.set_group_lr(g, lr).unwrap();
            separate.set_group_lr(g, lr).unwrap();
        }
        for i in 0..sizes.len() {
            let grad = rng.normals(sizes[i] as usize, 0.5 + i as f64 % 3.0);
            write(&arena.grad, arena.tensors()[i].offset, &grad);
            write(&separate_buffers[i].1, 0, &grad);
            let g = group_of[i];
            reference::step(
                &groups[g],
                t,
                lrs[g],
                &mut cpu_params[i],
                &grad,
                &mut cpu_states[i],
            );
        }
        let mut encoder = device.create_command_encoder(&Default::default());
        flat.step(queue, &mut encoder);
        separate.step(queue, &mut encoder);
        queue.submit([encoder.finish()]);
    }

    let mut errors = Vec::new();
    for i in 0..sizes.len() {
        let t = &arena.tensors()[i];
        let from_flat = read(&arena.param, t.offset, t.len);
        let from_separate = read(&separate_buffers[i].0, 0, t.len);
        let (flat_state, separate_state) = (
            flat.read_state_blocking(device, queue, i).unwrap(),
            separate.read_state_blocking(device, queue, i).unwrap(),
        );
        // Element for element: the same f32 operations on the same inputs.
        if from_flat != from_separate || flat_state != separate_state {
            errors.push(format!(
                "tensor {i} ({} elements, group {}): flat != separate",
                t.len, t.group
            ));
        }
        // And the groups' hyperparameters are the reference's (tolerance as in parity.rs).
        let lr_max = 1.3 * groups[t.group].lr as f32;
        let tol = Tolerance::param(steps, max_abs(&cpu_params[i]), lr_max as f64);
        errors.extend(compare(&names[i], &from_flat, &cpu_params[i], tol, 0).err());
    }
    assert!(
        errors.is_empty(),
        "{} mismatches:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn engine_flat_buffer_with_gaps_and_unaligned_tensors() {
    // Tensors at odd offsets (so the scalar kernel runs), listed out of order; the flat views
    // start 1 element into the param buffer and 2 into the grad buffer.
    let layout = [
        (3u64, 10u64, 0usize),
        (40, 1, 1),
        (17, 20, 2),
        (50, 33, 0),
        (90, 0, 1),
        (91, 7, 2),
    ];
    engine_flat_buffer(&layout, 1, 2);
}

#[test]
fn engine_flat_buffer_with_gaps_and_aligned_tensors() {
    // Tensors starting at multiples of 4 (so the vec4 kernel runs) whose lengths are not:
    // the lanes past each tensor's end fall in gaps that must stay untouched.
    let layout = [
        (4u64, 10u64, 0usize),
        (40, 1, 1),
        (16, 21, 2),
        (52, 33, 0),
        (88, 0, 1),
        (92, 7, 2),
    ];
    engine_flat_buffer(&layout, 0, 4);
}

/// The engine's own flat buffers, with sentinel values between the tensors.
fn engine_flat_buffer(layout: &[(u64, u64, usize)], param_start: u64, grad_start: u64) {
    let (device, queue) = gpu();
    let mut rng = Rng::new(9);
    let groups = three_groups();
    let total = 120u64;
    let (pb, gb) = (buffer(total + 8, STORAGE), buffer(total + 5, STORAGE));
    let sentinel = -1234.5f32;
    let initial: Vec<f32> = vec![sentinel; (total + 8) as usize];
    write(&pb, 0, &initial);
    let tensors: Vec<FlatTensor> = layout
        .iter()
        .enumerate()
        .map(|(i, &(offset, len, group))| {
            FlatTensor::new(format!("t{i}"), offset, len).in_group(group)
        })
        .collect();
    let flat = FlatParameters::new(
        BufferView::new(&pb, param_start, total),
        BufferView::new(&gb, grad_start, total),
        tensors.clone(),
    );
    let options = OptimizerOptions::default()
        .chunk_elements(Some(Optimizer::chunk_granularity(&device.limits())));
    let mut optimizer = Optimizer::with_groups(device, &groups, &[], &[flat], options).unwrap();

    let mut params: Vec<Vec<f32>> = tensors
        .iter()
        .map(|t| rng.normals(t.len as usize, 1.0))
        .collect();
    let mut states: Vec<TensorState> = tensors
        .iter()
        .map(|t| TensorState::new(&groups[t.group], t.len as usize))
        .collect();
    for (t, p) in tensors.iter().zip(&params) {
        write(&pb, param_start + t.offset, p);
    }
    for step in 1..=4 {
        for (i, t) in tensors.iter().enumerate() {
            let grad = rng.normals(t.len as usize, 1.0);
            write(&gb, grad_start + t.offset, &grad);
            reference::step(
                &groups[t.group],
                step,
                groups[t.group].lr,
                &mut params[i],
                &grad,
                &mut states[i],
            );
        }
        optimizer.step_blocking(device, queue).unwrap();
    }
    let all = read(&pb, 0, total + 8);
    let mut expected = initial.clone();
    for (t, p) in tensors.iter().zip(&params) {
        expected[(param_start + t.offset) as usize..][..t.len as usize].copy_from_slice(p);
    }
    // Normal(0, 1) parameters stay under 4 in magnitude.
    let tol = Tolerance::param(4, 4.0, 2e-3);
    compare("flat buffer with its gaps", &all, &expected, tol, 0).unwrap();
    let covered: u64 = layout.iter().map(|t| t.1).sum();
    assert_eq!(
        all.iter().filter(|&&x| x == sentinel).count() as u64,
        total + 8 - covered
    );
    for (i, want) in states.iter().enumerate() {
        let got = optimizer.read_state_blocking(device, queue, i).unwrap();
        // Scale 1 (the gradients' standard deviation): as tight as before the shared module.
        let tol = Tolerance::exp_avg_sq(max_abs(&want.exp_avg_sq), 1.0);
        compare("exp_avg", &got.exp_avg, &want.exp_avg, tol, 0).unwrap();
        compare("exp_avg_sq", &got.exp_avg_sq, &want.exp_avg_sq, tol, 0).unwrap();
    }
}

#[test]
fn group_errors_are_typed() {
    let (device, _) = gpu();
    let (p, g) = (buffer(8, STORAGE), buffer(8, STORAGE));
    let param =
        |group| Parameter::new("w", BufferView::whole(&p), BufferView::whole(&g)).in_group(group);
    let options = OptimizerOptions::default();

    let err = Optimizer::with_groups(device, &[Config::adam()], &[param(1)], &[], options)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::InvalidOption { name: "group", .. }),
        "{err}"
    );
    for (other, key) in [
        (Config::adamw(), "algorithm"),
        (Config::adam().amsgrad(true), "amsgrad"),
        (Config::adam().maximize(true), "maximize"),
        (
            Config::adam().initial_accumulator(1.0),
            "initial_accumulator",
        ),
    ] {
        let err =
            Optimizer::with_groups(device, &[Config::adam(), other], &[param(0)], &[], options)
                .err()
                .unwrap();
        assert!(
            matches!(&err, Error::GroupMismatch { group: 1, key: k } if *k == key),
            "{err}"
        );
    }
    let err = Optimizer::with_groups(
        device,
        &[Config::adam().lr(-1.0)],
        &[param(0)],
        &[],
        options,
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig { key: "lr", .. }),
        "{err}"
    );
    let seventeen = vec![Config::adam(); 17];
    let err = Optimizer::with_groups(device, &seventeen, &[param(0)], &[], options)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::InvalidOption { name: "groups", .. }),
        "{err}"
    );
    let err = Optimizer::with_groups(device, &[], &[param(0)], &[], options)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::InvalidOption { name: "groups", .. }),
        "{err}"
    );

    let flat = |tensors: Vec<FlatTensor>| {
        FlatParameters::new(BufferView::whole(&p), BufferView::whole(&g), tensors)
    };
    let t = |name: &str, offset, len| FlatTensor::new(name, offset, len);
    let err = Optimizer::with_groups(
        device,
        &[Config::adam()],
        &[],
        &[flat(vec![t("a", 0, 4), t("b", 3, 2)])],
        options,
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, Error::OverlappingTensors { first, second } if first == "a" && second == "b"),
        "{err}"
    );
    let err = Optimizer::with_groups(
        device,
        &[Config::adam()],
        &[],
        &[flat(vec![t("a", 5, 4)])],
        options,
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, Error::OutOfBounds { tensor, .. } if tensor == "a"),
        "{err}"
    );

    let mut optimizer = Optimizer::with_groups(
        device,
        &[Config::adam(), Config::adam()],
        &[param(1)],
        &[],
        options,
    )
    .unwrap();
    assert!(matches!(
        optimizer.set_group_lr(2, 1e-3),
        Err(Error::InvalidOption { name: "group", .. })
    ));
    assert!(matches!(
        optimizer.set_group_lr(1, f64::NAN),
        Err(Error::InvalidConfig { key: "lr", .. })
    ));
    optimizer.set_group_lr(1, 0.5).unwrap();
    assert_eq!(optimizer.group_lrs(), [1e-3, 0.5]);
}

#[test]
fn schedules_drive_each_groups_lr() {
    // A scheduled optimizer equals, element for element, one whose group lrs are set by hand to
    // the schedule's value each step.
    let (device, queue) = gpu();
    let mut rng = Rng::new(11);
    let groups = three_groups();
    let specs = [("w", 1000u64, 0usize), ("b", 37, 1), ("n", 5, 2)];
    let schedules = [
        Some(Schedule::warmup_cosine(3, 10, 1e-5).unwrap()),
        Some(Schedule::Step {
            step_size: 2,
            gamma: 0.5,
        }),
        None,
    ];
    let arenas = [
        Arena::new(device, &specs).unwrap(),
        Arena::new(device, &specs).unwrap(),
    ];
    let make = |arena: &Arena| {
        Optimizer::with_groups(
            device,
            &groups,
            &[],
            &[arena.flat()],
            OptimizerOptions::default(),
        )
        .unwrap()
    };
    let (mut scheduled, mut by_hand) = (make(&arenas[0]), make(&arenas[1]));
    for (g, s) in schedules.iter().enumerate() {
        scheduled.set_schedule(g, s.clone()).unwrap();
    }
    let len = arenas[0].tensors().last().map_or(0, |t| t.offset + t.len);
    let init = rng.normals(len as usize, 1.0);
    for arena in &arenas {
        write(&arena.param, 0, &init);
    }
    for t in 1..=10u64 {
        for (g, s) in schedules.iter().enumerate() {
            let lr = s.as_ref().map_or(groups[g].lr, |s| s.lr(groups[g].lr, t));
            assert_eq!(scheduled.lr_at(g, t), lr);
            by_hand.set_group_lr(g, lr).unwrap();
        }
        let grad = rng.normals(len as usize, 1.0);
        for arena in &arenas {
            write(&arena.grad, 0, &grad);
        }
        scheduled.step_blocking(device, queue).unwrap();
        by_hand.step_blocking(device, queue).unwrap();
    }
    assert_eq!(
        read(&arenas[0].param, 0, len),
        read(&arenas[1].param, 0, len)
    );
    // The schedules did change the lr: warmup starts at base / 3, StepLR halves after 2 steps.
    assert_eq!(scheduled.lr_at(0, 1), groups[0].lr / 3.0);
    assert_eq!(scheduled.lr_at(1, 3), groups[1].lr * 0.5);
}

/// Bits of a result, with every NaN the same (payloads are not part of the contract).
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter()
        .map(|v| {
            if v.is_nan() {
                f32::NAN.to_bits()
            } else {
                v.to_bits()
            }
        })
        .collect()
}

/// Tensor `which` of a run over two tensors, A (37 elements, with infinities, NaN and huge
/// values) and B (50 elements), after 3 steps: (param, exp_avg, exp_avg_sq) as bits. `layout`
/// 0: A alone, one group; 1: separate parameters, A in group 0 and B in group 1; 2: the same
/// in one flat buffer.
fn isolation_run(groups: &[Config], layout: usize, which: usize) -> [Vec<u32>; 3] {
    let (device, queue) = gpu();
    let specials = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e30,
        -1e30,
        0.0,
        -0.0,
        f32::MAX,
    ];
    let mut rng = Rng::new(5);
    let mut a_param = rng.normals(37, 1.0);
    let mut a_grad = rng.normals(37, 1.0);
    a_grad[..specials.len()].copy_from_slice(&specials);
    a_param[10..10 + specials.len()].copy_from_slice(&specials);
    let (b_param, b_grad) = (rng.normals(50, 1.0), rng.normals(50, 2.0));
    let data = [(a_param, a_grad), (b_param, b_grad)];
    let (pb, gb) = (buffer(96, STORAGE), buffer(96, STORAGE));
    let offsets = [0u64, 40];
    for (k, (p, g)) in data.iter().enumerate() {
        write(&pb, offsets[k], p);
        write(&gb, offsets[k], g);
    }
    let view = |b: &wgpu::Buffer, k: usize| BufferView::new(b, offsets[k], data[k].0.len() as u64);
    let options = OptimizerOptions::default();
    let mut optimizer = match layout {
        0 => Optimizer::with_groups(
            device,
            &groups[..1],
            &[Parameter::new("a", view(&pb, 0), view(&gb, 0))],
            &[],
            options,
        ),
        1 => Optimizer::with_groups(
            device,
            groups,
            &[
                Parameter::new("a", view(&pb, 0), view(&gb, 0)),
                Parameter::new("b", view(&pb, 1), view(&gb, 1)).in_group(1),
            ],
            &[],
            options,
        ),
        _ => {
            let tensor = |k: usize, name: &str| {
                FlatTensor::new(name, offsets[k], data[k].0.len() as u64).in_group(k)
            };
            let flat = FlatParameters::new(
                BufferView::new(&pb, 0, 96),
                BufferView::new(&gb, 0, 96),
                vec![tensor(0, "a"), tensor(1, "b")],
            );
            Optimizer::with_groups(device, groups, &[], &[flat], options)
        }
    }
    .unwrap();
    for _ in 0..3 {
        optimizer.step_blocking(device, queue).unwrap();
    }
    let state = optimizer
        .read_state_blocking(device, queue, which.min(layout))
        .unwrap();
    let len = data[which].0.len() as u64;
    [
        bits(&read(&pb, offsets[which], len)),
        bits(&state.exp_avg),
        bits(&state.exp_avg_sq),
    ]
}

#[test]
fn a_groups_result_does_not_depend_on_the_options_of_other_groups() {
    // One kernel runs every group; CLIP and WEIGHT_DECAY are on when any group uses them.
    // A group that does not clip must not clamp (an infinite gradient stays infinite), and one
    // without weight decay must not add 0 * p (an infinite parameter would give NaN): tensor A,
    // full of such values, gets the same bits whatever group B turns on, in separate buffers
    // and in a flat buffer; and B gets the bits it gets alone.
    for base in [
        Config::adam(),
        Config::adamw().weight_decay(0.0),
        Config::yogi(),
    ] {
        let others = [
            ("clip_gradient", base.clone().clip_gradient(Some(0.5))),
            ("weight_decay", base.clone().weight_decay(0.1)),
            ("eps_root", base.clone().eps_root(1e-3)),
            ("rescale_grad", base.clone().rescale_grad(0.5)),
            ("bias_correction", base.clone().bias_correction(false)),
            (
                "eps_mode",
                base.clone().eps_mode(wgpu_optim::EpsMode::Folded),
            ),
            ("lr and betas", base.clone().lr(0.1).betas(0.5, 0.9)),
        ];
        let alone = isolation_run(std::slice::from_ref(&base), 0, 0);
        for (option, other) in others {
            let groups = [base.clone(), other.clone()];
            let b_alone = isolation_run(&[other.clone(), other.clone()], 1, 1);
            for layout in [1, 2] {
                let what = format!(
                    "{:?} with {option} in the other group, layout {layout}",
                    base.algorithm
                );
                assert_eq!(isolation_run(&groups, layout, 0), alone, "A: {what}");
                assert_eq!(isolation_run(&groups, layout, 1), b_alone, "B: {what}");
            }
        }
    }
}

#[test]
fn a_single_padded_tensor_past_the_hint_window() {
    // One tensor in a flat view with trailing padding is dispatched segmented; past 4M
    // elements (vec4) its workgroups outnumber the 16,384-entry hint window unless the chunk
    // is capped. (On lavapipe an out-of-window read happens to return the right bytes, so the
    // planner's property tests, src/plan.rs, are what catch the bug; this checks the result.)
    let (device, queue) = gpu();
    let n = (4 << 20) + (1 << 19) + 3;
    let pad = 9u64;
    let total = n + pad;
    let config = Config::adamw().lr(1e-2);
    let mut rng = Rng::new(21);
    let mut param = rng.normals(n as usize, 1.0);
    let grad = rng.normals(n as usize, 1.0);
    let sentinel = -1234.5f32;
    let (pb, gb) = (buffer(total, STORAGE), buffer(total, STORAGE));
    write(&pb, 0, &param);
    write(&pb, n, &vec![sentinel; pad as usize]);
    write(&gb, 0, &grad);
    let flat = FlatParameters::new(
        BufferView::new(&pb, 0, total),
        BufferView::new(&gb, 0, total),
        vec![FlatTensor::new("w", 0, n)],
    );
    let mut optimizer = Optimizer::with_groups(
        device,
        std::slice::from_ref(&config),
        &[],
        &[flat],
        OptimizerOptions::default(),
    )
    .unwrap();
    assert!(
        optimizer.dispatch_count() >= 2,
        "the chunk is capped at the hint window"
    );
    optimizer.step_blocking(device, queue).unwrap();
    let mut state = TensorState::new(&config, n as usize);
    reference::step(&config, 1, config.lr, &mut param, &grad, &mut state);
    let got = read(&pb, 0, total);
    assert_eq!(
        got[n as usize..],
        vec![sentinel; pad as usize][..],
        "padding untouched"
    );
    let tol = Tolerance::param(1, max_abs(&param), 1e-2);
    compare("param", &got[..n as usize], &param, tol, 0).unwrap();
}
