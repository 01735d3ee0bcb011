//! Bad input is a typed error from the public API, never a panic.

mod common;

use common::{STORAGE, buffer, gpu};
use wgpu_optim::{BufferView, Config, Error, Optimizer, OptimizerOptions, Parameter};

fn param(len: u64) -> (wgpu::Buffer, wgpu::Buffer) {
    (buffer(len, STORAGE), buffer(len, STORAGE))
}

fn new(config: Config, parameters: &[Parameter]) -> Result<Optimizer, Error> {
    Optimizer::new(&gpu().0, config, parameters)
}

#[test]
fn invalid_config_values_name_the_key() {
    let bad: Vec<(Config, &str)> = vec![
        (Config::adam().lr(-1e-3), "lr"),
        (Config::adam().lr(f64::NAN), "lr"),
        (Config::adam().lr(f64::INFINITY), "lr"),
        (Config::adam().betas(1.0, 0.999), "betas"),
        (Config::adam().betas(0.9, -0.1), "betas"),
        (Config::adam().betas(f64::NAN, 0.9), "betas"),
        (Config::adam().eps(-1e-8), "eps"),
        (Config::adam().eps_root(f64::NAN), "eps_root"),
        (Config::adam().weight_decay(-0.1), "weight_decay"),
        (Config::adam().rescale_grad(0.0), "rescale_grad"),
        (Config::adam().rescale_grad(f64::INFINITY), "rescale_grad"),
        (Config::adam().clip_gradient(Some(0.0)), "clip_gradient"),
        (
            Config::adam().clip_gradient(Some(f64::NAN)),
            "clip_gradient",
        ),
        (
            Config::adam().initial_accumulator(-1.0),
            "initial_accumulator",
        ),
    ];
    let (p, g) = param(4);
    let parameters = [Parameter::new(
        "w",
        BufferView::whole(&p),
        BufferView::whole(&g),
    )];
    for (config, key) in bad {
        for err in [
            config.validate().unwrap_err(),
            new(config.clone(), &parameters).err().unwrap(),
        ] {
            match &err {
                Error::InvalidConfig { key: k, .. } => assert_eq!(*k, key, "{config:?}"),
                other => panic!("{config:?}: expected InvalidConfig for {key}, got {other:?}"),
            }
            assert!(err.to_string().contains(key), "{err}");
        }
    }
}

#[test]
fn json_config_parses_fills_defaults_and_rejects_bad_keys() {
    let c = Config::from_json(r#"{"algorithm": "yogi", "betas": [0.8, 0.99]}"#).unwrap();
    assert_eq!(c, Config::yogi().betas(0.8, 0.99));
    assert_eq!((c.lr, c.eps, c.initial_accumulator), (1e-2, 1e-3, 1e-6));
    let c = Config::from_json(r#"{"algorithm": "adamw"}"#).unwrap();
    assert_eq!(c.weight_decay, 1e-2);
    let c = Config::from_json(
        r#"{"algorithm":"adam","eps_mode":"folded","clip_gradient":null,"amsgrad":true,
            "maximize":true,"bias_correction":false,"rescale_grad":0.5,"eps_root":1e-9,
            "initial_accumulator":0.1,"weight_decay":0.2,"lr":0.1,"eps":1e-6}"#,
    )
    .unwrap();
    // Every key round-trips through the effective JSON form.
    assert_eq!(Config::from_json(&c.to_json()).unwrap(), c);
    let c2: Config = serde_json::from_str(&c.to_json()).unwrap();
    assert_eq!(c2, c);

    let err = Config::from_json(r#"{"algorithm": "adam", "learning_rate": 1}"#).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownConfigKey { key, .. } if key == "learning_rate"),
        "{err}"
    );
    assert!(err.to_string().contains("learning_rate"));
    assert!(matches!(
        Config::from_json(r#"{"lr": 1e-3}"#),
        Err(Error::MissingAlgorithm)
    ));
    for (text, key) in [
        (r#"{"algorithm": "sgd"}"#, "algorithm"),
        (r#"{"algorithm": "adam", "lr": "fast"}"#, "lr"),
        (r#"{"algorithm": "adam", "lr": -1}"#, "lr"),
        (r#"{"algorithm": "adam", "betas": [0.9]}"#, "betas"),
        (r#"{"algorithm": "adam", "betas": [0.9, 1.5]}"#, "betas"),
        (r#"{"algorithm": "adam", "eps_mode": "mxnet"}"#, "eps_mode"),
        (r#"{"algorithm": "adam", "amsgrad": 1}"#, "amsgrad"),
        (
            r#"{"algorithm": "adam", "clip_gradient": -2}"#,
            "clip_gradient",
        ),
        (
            r#"{"algorithm": "adam", "weight_decay": null}"#,
            "weight_decay",
        ),
    ] {
        match Config::from_json(text) {
            Err(Error::InvalidConfig { key: k, .. }) => assert_eq!(k, key, "{text}"),
            other => panic!("{text}: expected InvalidConfig for {key}, got {other:?}"),
        }
    }
    assert!(matches!(
        Config::from_json("[1, 2]"),
        Err(Error::ConfigJson(_))
    ));
    assert!(matches!(Config::from_json("{"), Err(Error::ConfigJson(_))));
}

#[test]
fn a_learning_rate_of_zero_is_valid_everywhere() {
    // torch accepts lr = 0 (`0.0 <= lr`), and linear decay to 0 is HuggingFace's default.
    Config::adam().lr(0.0).validate().unwrap();
    let c = Config::from_json(r#"{"algorithm": "adamw", "lr": 0}"#).unwrap();
    assert_eq!(c.lr, 0.0);
    let (p, g) = param(8);
    let parameters = [Parameter::new(
        "w",
        BufferView::whole(&p),
        BufferView::whole(&g),
    )];
    let mut optimizer = new(Config::adamw().lr(0.0), &parameters).unwrap();
    optimizer.set_group_lr(0, 0.0).unwrap();
    let (device, queue) = gpu();
    common::write(&p, 0, &[1.0; 8]);
    common::write(&g, 0, &[0.5; 8]);
    optimizer.step_blocking(device, queue).unwrap();
    // lr 0: the parameters stay, the moments move.
    assert_eq!(common::read(&p, 0, 8), vec![1.0; 8]);
    let state = optimizer.read_state_blocking(device, queue, 0).unwrap();
    assert!(state.exp_avg.iter().all(|&m| m > 0.0));
}

#[test]
fn malformed_json_values_name_their_key() {
    // Numbers too large for f64, syntax errors inside a value, and a key given twice: each
    // error names the key (serde_json alone would say "number out of range at line 1").
    for (text, key) in [
        (r#"{"algorithm": "adam", "lr": 1e999}"#, "lr"),
        (r#"{"algorithm": "adam", "lr": -1e999}"#, "lr"),
        (r#"{"algorithm": "adam", "eps": 1e400}"#, "eps"),
        (r#"{"algorithm": "adam", "betas": [0.9, 1e999]}"#, "betas"),
        (
            r#"{"algorithm": "adam", "weight_decay": 1e999, "lr": 0.1}"#,
            "weight_decay",
        ),
        (
            r#"{"algorithm": "adam", "clip_gradient": 1e999}"#,
            "clip_gradient",
        ),
        (r#"{"algorithm": "adam", "lr": }"#, "lr"),
        (r#"{"algorithm": "adam", "lr": 0.1.2}"#, "lr"),
        (r#"{"algorithm": "adam", "lr": 0.1, "lr": 0.2}"#, "lr"),
        (r#"{"lr": 1e999, "algorithm": "adam"}"#, "lr"),
    ] {
        match Config::from_json(text) {
            Err(e @ Error::InvalidConfig { key: k, .. }) => {
                assert_eq!(k, key, "{text}");
                assert!(e.to_string().contains(&format!("`{key}`")), "{e}");
            }
            other => panic!("{text}: expected InvalidConfig for {key}, got {other:?}"),
        }
    }
    // An unknown key is reported as unknown, even when its value is malformed too.
    assert!(matches!(
        Config::from_json(r#"{"algorithm": "adam", "learning_rate": 1e999}"#),
        Err(Error::UnknownConfigKey { key, .. }) if key == "learning_rate"
    ));
    // The config embedded in a replay trace or a checkpoint goes through the same parser.
    let e = wgpu_optim::replay::Trace::from_bytes(
        &trace_with_config(r#"{"algorithm": "adam", "lr": 1e999}"#),
        "trace",
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { key: "lr", .. }), "{e}");
}

/// A minimal valid trace file whose metadata `config` is `config`.
fn trace_with_config(config: &str) -> Vec<u8> {
    let data = [0u8; 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
    let metadata = std::collections::HashMap::from([("config".to_string(), config.to_string())]);
    safetensors::serialize(
        [("param.w", view.clone()), ("grad.1.w", view)],
        Some(metadata),
    )
    .unwrap()
}

#[test]
fn a_buffer_the_device_refuses_is_an_error_not_a_panic() {
    // A destroyed buffer passes every host check (usage, size) but fails the device's
    // validation when bound: the optimizer must return that as an error, not return Ok and
    // leave the failure to wgpu's uncaptured-error handler (a panic by default).
    let (p, g) = param(64);
    p.destroy();
    let parameters = [Parameter::new(
        "w",
        BufferView::whole(&p),
        BufferView::whole(&g),
    )];
    match new(Config::adam(), &parameters) {
        Err(Error::Creation { what, reason }) => {
            assert!(what.contains("optimizer"), "{what}");
            assert!(!reason.is_empty());
        }
        other => panic!(
            "expected Error::Creation, got {:?}",
            other.map(|_| "an optimizer")
        ),
    }
}

#[test]
fn bad_parameters_are_typed_errors() {
    let (p, g) = param(16);
    let no_storage = buffer(16, wgpu::BufferUsages::COPY_DST);
    let view = BufferView::new;

    let err = new(
        Config::adam(),
        &[Parameter::new("w", view(&p, 0, 16), view(&g, 0, 15))],
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, Error::LengthMismatch { tensor, param: 16, grad: 15 } if tensor == "w"),
        "{err}"
    );

    let err = new(
        Config::adam(),
        &[Parameter::new(
            "w",
            view(&no_storage, 0, 16),
            view(&g, 0, 16),
        )],
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, Error::MissingUsage { which: "param", .. }),
        "{err}"
    );
    let err = new(
        Config::adam(),
        &[Parameter::new(
            "w",
            view(&p, 0, 16),
            view(&no_storage, 0, 16),
        )],
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, Error::MissingUsage { which: "grad", .. }),
        "{err}"
    );

    let err = new(
        Config::adam(),
        &[Parameter::new("w", view(&p, 1, 16), view(&g, 0, 16))],
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            &err,
            Error::OutOfBounds {
                which: "param",
                offset: 1,
                len: 16,
                ..
            }
        ),
        "{err}"
    );
    let err = new(
        Config::adam(),
        &[Parameter::new("w", view(&p, 0, 4), view(&g, u64::MAX, 4))],
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, Error::OutOfBounds { which: "grad", .. }),
        "{err}"
    );

    let err = new(
        Config::adam(),
        &[Parameter::new("w", view(&p, 0, 8), view(&p, 8, 8))],
    )
    .err()
    .unwrap();
    assert!(matches!(&err, Error::AliasedBuffers { .. }), "{err}");
    assert!(err.to_string().contains("`w`"));
}

#[test]
fn bad_options_are_typed_errors() {
    let (device, _) = gpu();
    let (p, g) = param(16);
    let parameters = [Parameter::new(
        "w",
        BufferView::whole(&p),
        BufferView::whole(&g),
    )];
    let granularity = Optimizer::chunk_granularity(&device.limits());
    for chunk in [0, granularity + 1, granularity / 2, u64::MAX] {
        let options = OptimizerOptions::default().chunk_elements(Some(chunk));
        let err = Optimizer::with_options(device, Config::adam(), &parameters, options)
            .err()
            .unwrap();
        assert!(
            matches!(
                &err,
                Error::InvalidOption {
                    name: "chunk_elements",
                    ..
                }
            ),
            "{chunk}: {err}"
        );
    }
    let options = OptimizerOptions::default().workgroup_size(0);
    let err = Optimizer::with_options(device, Config::adam(), &parameters, options)
        .err()
        .unwrap();
    assert!(
        matches!(
            &err,
            Error::InvalidOption {
                name: "workgroup_size",
                ..
            }
        ),
        "{err}"
    );
    let too_big = device.limits().max_compute_invocations_per_workgroup * 2;
    let options = OptimizerOptions::default().workgroup_size(too_big);
    let err = Optimizer::with_options(device, Config::adam(), &parameters, options)
        .err()
        .unwrap();
    assert!(matches!(&err, Error::DeviceLimit { .. }), "{err}");
}

#[test]
fn bad_calls_are_typed_errors() {
    let (device, queue) = gpu();
    let (p, g) = param(16);
    let mut optimizer = new(
        Config::adam(),
        &[Parameter::new(
            "w",
            BufferView::whole(&p),
            BufferView::whole(&g),
        )],
    )
    .unwrap();
    for lr in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            optimizer.set_lr(lr),
            Err(Error::InvalidConfig { key: "lr", .. })
        ));
    }
    assert_eq!(optimizer.lr(), 1e-3, "a refused lr leaves the old one");
    // A per-step lr of 0 is allowed (schedules end there; torch allows it): only the moments move.
    optimizer.set_lr(0.0).unwrap();
    assert_eq!(optimizer.lr(), 0.0);
    let bad = wgpu_optim::Schedule::Step {
        step_size: 0,
        gamma: 0.5,
    };
    assert!(matches!(
        optimizer.set_schedule(0, Some(bad)),
        Err(Error::InvalidSchedule { .. })
    ));
    assert!(matches!(
        optimizer.set_schedule(1, None),
        Err(Error::InvalidOption { name: "group", .. })
    ));
    assert!(matches!(
        optimizer.read_state_blocking(device, queue, 1),
        Err(Error::NoSuchParameter(_))
    ));
    assert!(optimizer.state_buffers(3).is_err());
}

#[test]
fn a_device_without_the_needed_limits_is_refused() {
    // A device that allows only 4 storage buffers per stage cannot bind the step's 8: param,
    // grad, the three moments, the master weights, the table and the device state.
    let (adapter, _, _) = wgpu_optim::util::request_device_blocking().unwrap();
    let (device, _) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: wgpu::Limits {
            max_storage_buffers_per_shader_stage: 4,
            ..wgpu::Limits::downlevel_defaults()
        },
        ..Default::default()
    }))
    .unwrap();
    let make = |usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 64,
            usage,
            mapped_at_creation: false,
        })
    };
    let (p, g) = (
        make(wgpu::BufferUsages::STORAGE),
        make(wgpu::BufferUsages::STORAGE),
    );
    let err = Optimizer::new(
        &device,
        Config::adam(),
        &[Parameter::new(
            "w",
            BufferView::whole(&p),
            BufferView::whole(&g),
        )],
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            &err,
            Error::DeviceLimit {
                limit: "max_storage_buffers_per_shader_stage",
                have: 4,
                need: 8,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn the_public_types_are_send_sync_and_debug() {
    // An engine keeps the optimizer in its own structs, across threads.
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Optimizer>();
    send_sync::<wgpu_optim::Arena>();
    send_sync::<wgpu_optim::StateBuffers>();
    send_sync::<Error>();
    let (p, g) = param(8);
    let optimizer = new(
        Config::adam(),
        &[Parameter::new(
            "w",
            BufferView::whole(&p),
            BufferView::whole(&g),
        )],
    )
    .unwrap();
    let debug = format!("{optimizer:?}");
    assert!(
        debug.contains("Optimizer") && debug.contains("\"w\""),
        "{debug}"
    );
}

#[test]
fn loss_scaling_and_clipping_keys_parse_and_refuse_naming_the_key() {
    use wgpu_optim::LossScale;
    let c = Config::from_json(
        r#"{"algorithm": "adamw", "loss_scale": {"init_scale": 1024, "growth_interval": 3},
            "max_grad_norm": 1.0}"#,
    )
    .unwrap();
    let ls = c.loss_scale.unwrap();
    assert_eq!(
        ls,
        LossScale::default().init_scale(1024.0).growth_interval(3)
    );
    assert_eq!(
        (ls.growth_factor, ls.backoff_factor, ls.dynamic),
        (2.0, 0.5, true)
    );
    assert_eq!(c.max_grad_norm, Some(1.0));
    assert!(!c.skip_nonfinite && c.skips() && c.has_pre_step());
    // Round trip through the effective configuration.
    assert_eq!(Config::from_json(&c.to_json()).unwrap(), c);
    let plain = Config::from_json(r#"{"algorithm": "adam", "loss_scale": null}"#).unwrap();
    assert!(!plain.skips() && !plain.has_pre_step());

    for (text, key) in [
        (
            r#"{"algorithm": "adam", "max_grad_norm": 0}"#,
            "max_grad_norm",
        ),
        (
            r#"{"algorithm": "adam", "max_grad_norm": -1}"#,
            "max_grad_norm",
        ),
        (
            r#"{"algorithm": "adam", "max_grad_norm": 1e999}"#,
            "max_grad_norm",
        ),
        (
            r#"{"algorithm": "adam", "skip_nonfinite": 1}"#,
            "skip_nonfinite",
        ),
        (r#"{"algorithm": "adam", "loss_scale": 5}"#, "loss_scale"),
        (
            r#"{"algorithm": "adam", "loss_scale": {"growth_factor": 1}}"#,
            "loss_scale.growth_factor",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"backoff_factor": 1}}"#,
            "loss_scale.backoff_factor",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"backoff_factor": 0}}"#,
            "loss_scale.backoff_factor",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"growth_interval": 0}}"#,
            "loss_scale.growth_interval",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"growth_interval": 2.5}}"#,
            "loss_scale.growth_interval",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"growth_interval": 2000.0}}"#,
            "loss_scale.growth_interval",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"init_scale": 0}}"#,
            "loss_scale.init_scale",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"init_scale": 1e300}}"#,
            "loss_scale.init_scale",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"dynamic": "yes"}}"#,
            "loss_scale.dynamic",
        ),
    ] {
        match Config::from_json(text) {
            Err(e @ Error::InvalidConfig { key: k, .. }) => {
                assert_eq!(k, key, "{text}");
                assert!(e.to_string().contains(key), "{e}");
            }
            other => panic!("{text}: expected InvalidConfig for {key}, got {other:?}"),
        }
    }
    assert!(matches!(
        Config::from_json(r#"{"algorithm": "adam", "loss_scale": {"scale": 2}}"#),
        Err(Error::UnknownConfigKey { key, .. }) if key == "loss_scale.scale"
    ));
    // The same through the builder.
    let bad = Config::adam().loss_scale(Some(LossScale::default().growth_factor(0.5)));
    assert!(matches!(
        bad.validate(),
        Err(Error::InvalidConfig {
            key: "loss_scale.growth_factor",
            ..
        })
    ));

    // Optimizer-wide keys: every group must agree.
    let (device, _) = gpu();
    for (key, other) in [
        (
            "loss_scale",
            Config::adam().loss_scale(Some(LossScale::default())),
        ),
        ("skip_nonfinite", Config::adam().skip_nonfinite(true)),
        ("max_grad_norm", Config::adam().max_grad_norm(Some(1.0))),
    ] {
        let groups = [Config::adam(), other];
        match Optimizer::with_groups(device, &groups, &[], &[], OptimizerOptions::default()) {
            Err(Error::GroupMismatch { group: 1, key: k }) => assert_eq!(k, key),
            other => panic!("{key}: {:?}", other.map(|_| "an optimizer")),
        }
    }
}

#[test]
fn loss_scale_fields_are_checked_like_top_level_keys() {
    // Inside `loss_scale` too: a field given twice and a number out of f64's range are refused
    // naming `loss_scale.<field>`, malformed JSON inside the object naming `loss_scale` (the
    // object is read as a whole first); an unknown field lists the known ones.
    for (text, key) in [
        (
            r#"{"algorithm": "adam", "loss_scale": {"init_scale": 2, "init_scale": 4}}"#,
            "loss_scale.init_scale",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"growth_factor": 1e999}}"#,
            "loss_scale.growth_factor",
        ),
        (
            r#"{"algorithm": "adam", "loss_scale": {"backoff_factor": 0.5.5}}"#,
            "loss_scale",
        ),
    ] {
        match Config::from_json(text) {
            Err(Error::InvalidConfig { key: k, .. }) => assert_eq!(k, key, "{text}"),
            other => panic!("{text}: expected InvalidConfig for {key}, got {other:?}"),
        }
    }
    match Config::from_json(r#"{"algorithm": "adam", "loss_scale": {"scale": 2}}"#) {
        Err(Error::UnknownConfigKey { key, known }) => {
            assert_eq!(key, "loss_scale.scale");
            assert!(
                known.contains("loss_scale.growth_interval") && !known.contains("betas"),
                "{known}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn storage_keys_parse_and_refuse_naming_the_key() {
    use wgpu_optim::{Dtype, Rounding};
    let c = Config::from_json(
        r#"{"algorithm": "adamw", "param_dtype": "bf16", "grad_dtype": "f16",
            "exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "f32", "master_weights": true,
            "rounding": "stochastic", "seed": 18446744073709551615}"#,
    )
    .unwrap();
    assert_eq!(
        (
            c.param_dtype,
            c.grad_dtype,
            c.exp_avg_dtype,
            c.exp_avg_sq_dtype
        ),
        (Dtype::Bf16, Dtype::F16, Dtype::Bf16, Dtype::F32)
    );
    assert_eq!(
        (c.master_weights, c.rounding, c.seed),
        (true, Rounding::Stochastic, u64::MAX)
    );
    assert_eq!(Config::from_json(&c.to_json()).unwrap(), c);
    // q8 is for the optimizer's states only.
    let q = Config::from_json(
        r#"{"algorithm": "adam", "exp_avg_dtype": "q8", "exp_avg_sq_dtype": "q8"}"#,
    )
    .unwrap();
    assert_eq!(
        (q.exp_avg_dtype, q.exp_avg_sq_dtype),
        (Dtype::Q8, Dtype::Q8)
    );
    assert_eq!(Config::from_json(&q.to_json()).unwrap(), q);
    // Defaults: f32 everywhere, nearest, seed 0, no master weights.
    let d = Config::from_json(r#"{"algorithm": "adam"}"#).unwrap();
    assert_eq!(
        (d.param_dtype, d.rounding, d.seed, d.master_weights),
        (Dtype::F32, Rounding::Nearest, 0, false)
    );
    for (json, key) in [
        (r#""param_dtype": "f64""#, "param_dtype"),
        (r#""param_dtype": "q8""#, "param_dtype"),
        (r#""grad_dtype": "q8""#, "grad_dtype"),
        (r#""grad_dtype": 16"#, "grad_dtype"),
        (r#""exp_avg_dtype": "BF16""#, "exp_avg_dtype"),
        (r#""exp_avg_sq_dtype": "Q8""#, "exp_avg_sq_dtype"),
        (r#""master_weights": "yes""#, "master_weights"),
        (r#""rounding": "up""#, "rounding"),
        (r#""seed": -1"#, "seed"),
        (r#""seed": 1.5"#, "seed"),
        (r#""seed": 18446744073709551616"#, "seed"),
    ] {
        let text = format!(r#"{{"algorithm": "adam", {json}}}"#);
        match Config::from_json(&text) {
            Err(Error::InvalidConfig { key: k, .. }) => assert_eq!(k, key, "{json}"),
            other => panic!("{json}: expected InvalidConfig for {key}, got {other:?}"),
        }
    }
    // Groups must agree on the storage keys.
    let (p, g) = param(4);
    let flat = wgpu_optim::FlatParameters::new(
        BufferView::whole(&p),
        BufferView::whole(&g),
        vec![
            wgpu_optim::FlatTensor::new("a", 0, 2),
            wgpu_optim::FlatTensor::new("b", 2, 2).in_group(1),
        ],
    );
    let groups = [Config::adam(), Config::adam().exp_avg_dtype(Dtype::Bf16)];
    let err =
        Optimizer::with_groups(&gpu().0, &groups, &[], &[flat], Default::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::GroupMismatch {
                key: "exp_avg_dtype",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn sixteen_bit_views_must_start_on_words_and_fit_their_buffers() {
    use wgpu_optim::{Dtype, FlatParameters, FlatTensor};
    let device = &gpu().0;
    let bytes = |n: u64| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: n,
            usage: STORAGE,
            mapped_at_creation: false,
        })
    };
    let bf16 = Config::adam().param_dtype(Dtype::Bf16);
    // A view at an odd element: two invocations would share a word.
    let (p, g) = (bytes(64), bytes(64));
    let odd = Parameter::new("w", BufferView::new(&p, 1, 4), BufferView::new(&g, 0, 4));
    let err = new(bf16.clone(), &[odd]).unwrap_err();
    assert!(
        matches!(&err, Error::Misaligned { tensor, offset: 1, .. } if tensor == "w"),
        "{err}"
    );
    // Even with f32 params, a 16-bit state makes every invocation take whole words.
    let odd_grad = Parameter::new("w", BufferView::new(&p, 0, 4), BufferView::new(&g, 3, 4));
    let err = new(Config::adam().exp_avg_sq_dtype(Dtype::F16), &[odd_grad]).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Misaligned {
                which: "grad view",
                ..
            }
        ),
        "{err}"
    );
    // A flat tensor at an odd element.
    let flat = FlatParameters::new(
        BufferView::new(&p, 0, 16),
        BufferView::new(&g, 0, 16),
        vec![FlatTensor::new("a", 0, 3), FlatTensor::new("b", 3, 5)],
    );
    let err = Optimizer::with_groups(
        device,
        std::slice::from_ref(&bf16),
        &[],
        &[flat],
        Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Misaligned { tensor, which: "tensor", offset: 3, .. } if tensor == "b"),
        "{err}"
    );
    // 3 bf16 elements take 6 bytes but are loaded and stored as 2 words: a 4-byte buffer is
    // refused, an 8-byte one holds them (in f32 they would need 12).
    let (small, g8) = (bytes(4), bytes(12));
    let three = Parameter::new(
        "w",
        BufferView::new(&small, 0, 3),
        BufferView::new(&g8, 0, 3),
    );
    let err = new(bf16.clone(), &[three]).unwrap_err();
    assert!(
        matches!(&err, Error::OutOfBounds { which: "param", .. }),
        "{err}"
    );
    let (p8, g8) = (bytes(8), bytes(12));
    let fits = Parameter::new("w", BufferView::new(&p8, 0, 3), BufferView::new(&g8, 0, 3));
    new(bf16, &[fits]).unwrap();
    // The same views in f32 elements do not fit: the view counts elements of its dtype.
    let f32_view = Parameter::new("w", BufferView::new(&p8, 0, 3), BufferView::new(&g8, 0, 3));
    assert!(matches!(
        new(Config::adam(), &[f32_view]),
        Err(Error::OutOfBounds { .. })
    ));
}
