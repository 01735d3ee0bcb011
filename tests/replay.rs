//! Replay (`docs/replay-format.md`): the committed PyTorch traces reproduced on the GPU,
//! traces made here from the CPU reference for the options torch lacks, and every bad input
//! refused with a typed error (through the library) or a message and exit status (through
//! `examples/replay.rs`, run as a subprocess).

mod common;
mod raw;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Rng, Tolerance, compare, gpu, max_abs};
use raw::Raw;
use safetensors::tensor::Dtype;
use wgpu_optim::replay::{NamedTensor, Trace};
use wgpu_optim::{Algorithm, Config, EpsMode, Error};

fn torch_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch")
}

/// Every committed torch case: `scripts/torch_golden.py`'s and `scripts/torch_trace.py demo`'s.
const TORCH_CASES: [&str; 10] = [
    "adam_default",
    "adam_wd",
    "adam_amsgrad",
    "adam_maximize",
    "adamw_default",
    "adamw_amsgrad_maximize",
    "adam_lr_schedule",
    "adamw_eps",
    "recorded_adam_cosine",
    "recorded_adamw_amsgrad",
];

/// Compares a result file's tensors with the expected ones (torch's, or the CPU reference's),
/// for a trace. Returns every mismatch and the worst error as a fraction of its tolerance.
///
/// Tolerances, from f32 rounding (u = 2^-24). Torch and we compute the same formula in another
/// order (torch: `exp_avg.lerp_(g, 1 - b1)`, `v.mul_(b2).addcmul_(g, g, 1 - b2)`,
/// `p.addcdiv_(m, sqrt(v) / sqrt(bc2) + eps, -lr / bc1)`; we: `b1 * m + (1 - b1) * g` and
/// `p - a_t * m / (sqrt(v) + eps * sqrt(bc2))`), so each step may differ by a few ulps:
/// - moments (exp_avg, exp_avg_sq, max_exp_avg_sq) are weighted sums of the gradient history:
///   old differences decay by b1 (b2), so they stay within ~100u of the largest gradient the
///   tensor saw (squared, for v). Tolerance: 1e-5 of that (and 1e-5 relative); a skipped or
///   doubled step moves them by (1 - b) of it, 1e3 to 1e4 times more.
/// - param: each step rounds p (2u |p|) and inherits the moments' ~1e-5 relative difference in
///   its update lr * m / (sqrt(v) + eps); so T * (2u * max|p| + 1e-4 * max lr). A skipped step
///   moves p by ~0.1 lr to lr, at least 100 times more over 12 steps.
fn check_result(case: &str, trace: &Trace, got: &Raw, want: &Raw, errors: &mut Vec<String>) -> f64 {
    let got_names: Vec<&String> = got.tensors.keys().collect();
    let want_names: Vec<&String> = want.tensors.keys().collect();
    if got_names != want_names {
        errors.push(format!(
            "{case}: tensors {got_names:?}, want {want_names:?}"
        ));
        return f64::INFINITY;
    }
    // Applied steps, skipped iterations and the final loss scale: exactly the expected ones
    // (older expected files carry only `step`, which is then T).
    let want_step = want
        .metadata
        .get("step")
        .cloned()
        .unwrap_or(trace.steps().to_string());
    if got.metadata["step"] != want_step {
        errors.push(format!(
            "{case}: step {}, want {want_step}",
            got.metadata["step"]
        ));
    }
    for key in ["skipped", "loss_scale"] {
        let number = |m: &std::collections::HashMap<String, String>| {
            m.get(key).map(|v| v.parse::<f64>().unwrap_or(f64::NAN))
        };
        if want.metadata.contains_key(key) && number(&got.metadata) != number(&want.metadata) {
            errors.push(format!(
                "{case}: {key} {:?}, want {:?}",
                got.metadata.get(key),
                want.metadata[key]
            ));
        }
    }
    let config = &trace.config;
    let steps: u64 = want_step.parse().unwrap();
    let processed = processed_grad_max(trace);
    let lr_max = (1..=trace.steps())
        .map(|t| trace.lr_at(t))
        .fold(config.lr, f64::max);
    let mut worst = 0f64;
    for (i, p) in trace.params.iter().enumerate() {
        let p_max = max_abs(&p.data).max(max_abs(&want.f32(&format!("param.{}", p.name)).1));
        // The largest processed gradient: unscaled and norm-clipped in the iterations that
        // were applied, rescaled, clipped, plus coupled L2 decay.
        let clip = config.clip_gradient.unwrap_or(f64::INFINITY) as f32;
        let mut g_max = (processed[i] * config.rescale_grad as f32).min(clip);
        if config.algorithm != Algorithm::AdamW {
            g_max += config.weight_decay as f32 * p_max;
        }
        for kind in ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
            let key = format!("{kind}.{}", p.name);
            if !want.tensors.contains_key(&key) {
                continue;
            }
            let ((got_shape, g), (want_shape, w)) = (got.f32(&key), want.f32(&key));
            if got_shape != want_shape || got_shape != p.shape {
                errors.push(format!(
                    "{case} {key}: shape {got_shape:?}, want {want_shape:?}"
                ));
                continue;
            }
            let tol = match kind {
                "param" => Tolerance::param(steps, max_abs(&w), lr_max),
                "exp_avg" => Tolerance::exp_avg(max_abs(&w), g_max),
                _ => Tolerance::exp_avg_sq(max_abs(&w), g_max),
            };
            for (a, b) in g.iter().zip(&w) {
                let allowed = tol.abs as f64 + tol.rel as f64 * b.abs() as f64;
                worst = worst.max((*a as f64 - *b as f64).abs() / allowed.max(f64::MIN_POSITIVE));
            }
            errors.extend(compare(&format!("{case} {key}"), &g, &w, tol, 0).err());
        }
    }
    worst
}

/// For each tensor, the largest gradient the per-element step saw: unscaled by the loss scale
/// and multiplied by the clip factor, in the iterations that were applied (by the reference).
fn processed_grad_max(trace: &Trace) -> Vec<f32> {
    use wgpu_optim::reference::{IterationState, IterationTensor, iteration};
    let mut params = trace.params.clone();
    let mut states: Vec<wgpu_optim::TensorState> = params
        .iter()
        .map(|p| wgpu_optim::TensorState::new(&trace.config, p.data.len()))
        .collect();
    let mut state = IterationState::new(&trace.config);
    let mut g_max = vec![0f32; params.len()];
    let groups = [trace.config.clone()];
    for (t, grads) in (1..).zip(&trace.grads) {
        let inv_scale = 1.0 / state.loss_scale;
        let mut tensors: Vec<IterationTensor> = params
            .iter_mut()
            .zip(grads)
            .zip(&mut states)
            .map(|((p, grad), state)| IterationTensor {
                group: 0,
                param: &mut p.data,
                grad,
                state,
            })
            .collect();
        let report = iteration(&groups, &[trace.lr_at(t)], &mut tensors, &mut state);
        if report.applied {
            for (m, g) in g_max.iter_mut().zip(grads) {
                *m = m.max(max_abs(g) * inv_scale * report.clip_coef);
            }
        }
    }
    g_max
}

#[test]
fn torch_traces_are_reproduced() {
    let (device, queue) = gpu();
    let mut errors = Vec::new();
    let mut overall = 0f64;
    for case in TORCH_CASES {
        let trace = Trace::read(torch_data().join(format!("{case}.trace.safetensors")))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let result = trace.run(device, queue).unwrap();
        let got = Raw::parse(&result.to_bytes().unwrap());
        let want = Raw::read(&torch_data().join(format!("{case}.expected.safetensors")));
        let worst = check_result(case, &trace, &got, &want, &mut errors);
        eprintln!("{case}: worst error {worst:.3e} of the tolerance");
        overall = overall.max(worst);
    }
    eprintln!("all torch cases: worst error {overall:.3e} of the tolerance");
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// `scripts/torch_trace.py make-amp-test-data`: torch.amp.GradScaler and clip_grad_norm_ runs
/// with iterations skipped for overflow (see tests/data/torch/README.md).
const TORCH_AMP_CASES: [&str; 6] = [
    "amp_adamw_overflow",
    "amp_adam_clip",
    "clip_adamw_schedule",
    "amp_static_adam_amsgrad",
    "amp_odd_factors",
    "skip_adamw_nonfinite",
];

#[test]
fn torch_amp_traces_are_reproduced() {
    // Scaled gradients with overflows, clipping, skipped iterations: the GPU lands where torch
    // did, with the same applied steps, skipped iterations and final loss scale; and so does
    // the CPU reference.
    let (device, queue) = gpu();
    let mut errors = Vec::new();
    for case in TORCH_AMP_CASES {
        let trace = Trace::read(torch_data().join(format!("{case}.trace.safetensors")))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let want = Raw::read(&torch_data().join(format!("{case}.expected.safetensors")));
        let got = Raw::parse(&trace.run(device, queue).unwrap().to_bytes().unwrap());
        let worst = check_result(case, &trace, &got, &want, &mut errors);
        let reference = Raw::parse(&trace.run_reference().to_bytes().unwrap());
        check_result(
            &format!("{case} (reference)"),
            &trace,
            &reference,
            &want,
            &mut errors,
        );
        eprintln!("{case}: worst error {worst:.3e} of the tolerance");
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn a_skipped_step_is_outside_the_tolerance() {
    // The tolerances are loose enough for rounding, and far too tight for a lost step.
    let (device, queue) = gpu();
    for case in ["adam_default", "adamw_eps", "recorded_adamw_amsgrad"] {
        let trace = Trace::read(torch_data().join(format!("{case}.trace.safetensors"))).unwrap();
        let mut skipped = trace.clone();
        skipped.grads.pop();
        if let Some(lr) = skipped.lr.as_mut() {
            lr.pop();
        }
        let got = Raw::parse(&skipped.run(device, queue).unwrap().to_bytes().unwrap());
        let want = Raw::read(&torch_data().join(format!("{case}.expected.safetensors")));
        let mut errors = Vec::new();
        check_result(case, &trace, &got, &want, &mut errors);
        for kind in ["param", "exp_avg", "exp_avg_sq"] {
            let caught = errors
                .iter()
                .filter(|e| e.contains(&format!(" {kind}.")))
                .count();
            assert_eq!(caught, trace.params.len(), "{case} {kind}: {errors:#?}");
        }
    }
}

/// A trace made here: dotted names, a 0-d tensor, sizes around the vec4 width, an empty
/// tensor, per-tensor gradient scales that shrink and wobble over the steps.
fn generated(config: Config, lr: Option<Vec<f32>>, seed: u64) -> Trace {
    // (name, shape, gradient scale), sorted by name as a parsed trace has them.
    let tensors: [(&str, &[usize], f64); 5] = [
        ("decoder.proj", &[301], 1e-4),
        ("empty", &[0, 3], 1.0),
        ("encoder.layer.0.weight", &[5, 13], 3.0),
        ("head.bias", &[7], 1e-2),
        ("temperature", &[], 1.0),
    ];
    let steps = lr.as_ref().map_or(9, |lr| lr.len());
    let mut rng = Rng::new(seed);
    let params: Vec<NamedTensor> = tensors
        .iter()
        .map(|(name, shape, _)| {
            NamedTensor::new(*name, shape, rng.normals(shape.iter().product(), 1.0))
        })
        .collect();
    let grads = (1..=steps)
        .map(|t| {
            let wobble = 3.0 * 0.9f64.powi(t as i32) * (1.5 + (t as f64).sin());
            tensors
                .iter()
                .zip(&params)
                .map(|((_, _, scale), p)| rng.normals(p.data.len(), scale * wobble))
                .collect()
        })
        .collect();
    Trace {
        config,
        params,
        grads,
        lr,
    }
}

#[test]
fn options_torch_lacks_match_the_reference() {
    let (device, queue) = gpu();
    let schedule: Vec<f32> = (1..=11).map(|t| 2e-3 * (1.0 + t as f32) / 12.0).collect();
    let cases: Vec<(&str, Config, Option<Vec<f32>>)> = vec![
        ("yogi", Config::yogi(), None),
        (
            "yogi amsgrad decay",
            Config::yogi().amsgrad(true).weight_decay(0.05),
            None,
        ),
        (
            "yogi no bias correction",
            Config::yogi().bias_correction(false).eps(1e-6),
            None,
        ),
        (
            "adam folded eps",
            Config::adam().eps_mode(EpsMode::Folded).eps(1e-3),
            None,
        ),
        (
            "adamw folded eps_root",
            Config::adamw().eps_mode(EpsMode::Folded).eps_root(1e-4),
            None,
        ),
        (
            "adam eps_root",
            Config::adam().eps_root(1e-3).eps(0.0),
            None,
        ),
        (
            "adam rescale and clip",
            Config::adam().rescale_grad(0.25).clip_gradient(Some(0.2)),
            None,
        ),
        (
            "adamw clip, lr tensor",
            Config::adamw().clip_gradient(Some(0.5)),
            Some(schedule),
        ),
        (
            "adam no bias correction",
            Config::adam().bias_correction(false),
            None,
        ),
        (
            "adam initial accumulator",
            Config::adam().initial_accumulator(0.5).maximize(true),
            None,
        ),
    ];
    let mut errors = Vec::new();
    for (k, (case, config, lr)) in cases.into_iter().enumerate() {
        let trace = generated(config, lr, 1000 + k as u64);
        // Through the file format and back: what a user's file would go through.
        let parsed = Trace::from_bytes(&trace.to_bytes().unwrap(), case).unwrap();
        assert_eq!(parsed, trace, "{case}: the trace changed through its file");
        let got = Raw::parse(&parsed.run(device, queue).unwrap().to_bytes().unwrap());
        let want = Raw::parse(&parsed.run_reference().to_bytes().unwrap());
        check_result(case, &parsed, &got, &want, &mut errors);
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn an_lr_tensor_that_decays_to_zero_replays() {
    // HuggingFace's default schedule ends at exactly 0: such a trace must replay, and the last
    // step (lr 0) must move the moments but not the parameters.
    let (device, queue) = gpu();
    let steps = 6;
    let lr: Vec<f32> = (0..steps)
        .map(|k| 1e-2 * (steps - 1 - k) as f32 / (steps - 1) as f32)
        .collect();
    assert_eq!(lr.last(), Some(&0.0));
    let trace = generated(Config::adamw().weight_decay(0.1), Some(lr), 77);
    let parsed = Trace::from_bytes(&trace.to_bytes().unwrap(), "decay to zero").unwrap();
    let result = parsed.run(device, queue).unwrap();
    let got = Raw::parse(&result.to_bytes().unwrap());
    let want = Raw::parse(&parsed.run_reference().to_bytes().unwrap());
    let mut errors = Vec::new();
    check_result("decay to zero", &parsed, &got, &want, &mut errors);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // One step fewer, then the lr-0 step by hand on the reference: parameters unchanged.
    let mut shorter = parsed.clone();
    shorter.grads.pop();
    shorter.lr.as_mut().unwrap().pop();
    let before = Raw::parse(&shorter.run_reference().to_bytes().unwrap());
    for p in &parsed.params {
        let key = format!("param.{}", p.name);
        assert_eq!(before.f32(&key).1, want.f32(&key).1, "{key} moved at lr 0");
    }
}

#[test]
fn result_file_layout() {
    let (device, queue) = gpu();
    let trace = generated(Config::adamw().amsgrad(true), None, 5);
    let result = trace.run(device, queue).unwrap();
    let raw = Raw::parse(&result.to_bytes().unwrap());
    let mut want: Vec<String> = Vec::new();
    for p in &trace.params {
        for kind in ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
            let key = format!("{kind}.{}", p.name);
            assert_eq!(raw.f32(&key).0, p.shape, "{key}");
            want.push(key);
        }
    }
    want.sort();
    assert_eq!(raw.tensors.keys().cloned().collect::<Vec<_>>(), want);
    assert_eq!(raw.metadata["step"], "9");
    let config = Config::from_json(&raw.metadata["config"]).unwrap();
    assert_eq!(config, trace.config);
    // Every key present: the effective configuration.
    let keys: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&raw.metadata["config"]).unwrap();
    assert_eq!(keys.len(), wgpu_optim::CONFIG_KEYS.len());
}

#[test]
fn zero_steps_return_the_initial_state() {
    let (device, queue) = gpu();
    let mut trace = generated(Config::adam(), None, 9);
    trace.grads.clear();
    let parsed = Trace::from_bytes(&trace.to_bytes().unwrap(), "zero").unwrap();
    assert_eq!(parsed.steps(), 0);
    let result = parsed.run(device, queue).unwrap();
    assert_eq!(result.params, trace.params);
    assert_eq!(result.step, 0);
}

/// A valid trace as a map, to corrupt one thing at a time: params `w` [2, 3] and `b` (0-d),
/// three steps, an `lr` tensor.
fn base() -> Raw {
    let mut raw = Raw::default();
    raw.metadata.insert(
        "config".into(),
        r#"{"algorithm": "adam", "lr": 0.01, "betas": [0.9, 0.999]}"#.into(),
    );
    let mut rng = Rng::new(3);
    raw.set_f32("param.w", &[2, 3], &rng.normals(6, 1.0));
    raw.set_f32("param.b", &[], &rng.normals(1, 1.0));
    for t in 1..=3 {
        raw.set_f32(&format!("grad.{t}.w"), &[2, 3], &rng.normals(6, 1.0));
        raw.set_f32(&format!("grad.{t}.b"), &[], &rng.normals(1, 1.0));
    }
    raw.set_f32("lr", &[3], &[1e-2, 5e-3, 1e-3]);
    raw
}

fn with_config(config: &str) -> impl Fn(&mut Raw) {
    move |raw: &mut Raw| {
        raw.metadata.insert("config".into(), config.to_string());
    }
}

/// Every bad input of the issue, through the library: (what, corruption, expected error).
type Corrupt = Box<dyn Fn(&mut Raw)>;
type BadCase = (&'static str, Corrupt, fn(&Error) -> bool);

fn bad_cases() -> Vec<BadCase> {
    vec![
        (
            "unknown config key",
            Box::new(with_config(
                r#"{"algorithm": "adam", "learning_rate": 0.1}"#,
            )),
            |e| matches!(e, Error::UnknownConfigKey { key, .. } if key == "learning_rate"),
        ),
        (
            "beta out of range",
            Box::new(with_config(r#"{"algorithm": "adam", "betas": [0.9, 1.5]}"#)),
            |e| matches!(e, Error::InvalidConfig { key: "betas", .. }),
        ),
        (
            "NaN lr, as Python's json.dumps writes it",
            Box::new(with_config(r#"{"algorithm": "adam", "lr": NaN}"#)),
            |e| matches!(e, Error::InvalidConfig { key: "lr", value, .. } if value == "NaN"),
        ),
        (
            "infinite eps",
            Box::new(with_config(r#"{"algorithm": "adam", "eps": Infinity}"#)),
            |e| matches!(e, Error::InvalidConfig { key: "eps", .. }),
        ),
        (
            "negative weight decay",
            Box::new(with_config(
                r#"{"algorithm": "adamw", "weight_decay": -0.1}"#,
            )),
            |e| {
                matches!(
                    e,
                    Error::InvalidConfig {
                        key: "weight_decay",
                        ..
                    }
                )
            },
        ),
        (
            "a string for a flag",
            Box::new(with_config(r#"{"algorithm": "adam", "amsgrad": "yes"}"#)),
            |e| matches!(e, Error::InvalidConfig { key: "amsgrad", .. }),
        ),
        (
            "unknown algorithm",
            Box::new(with_config(r#"{"algorithm": "sgd"}"#)),
            |e| {
                matches!(
                    e,
                    Error::InvalidConfig {
                        key: "algorithm",
                        ..
                    }
                )
            },
        ),
        (
            "missing algorithm",
            Box::new(with_config(r#"{"lr": 0.1}"#)),
            |e| matches!(e, Error::MissingAlgorithm),
        ),
        (
            "config not JSON",
            Box::new(with_config("adam, please")),
            |e| matches!(e, Error::ConfigJson(_)),
        ),
        (
            "no config",
            Box::new(|raw: &mut Raw| {
                raw.metadata.remove("config");
            }),
            |e| matches!(e, Error::MissingMetadata { key: "config", .. }),
        ),
        (
            "missing gradient",
            Box::new(|raw: &mut Raw| {
                raw.tensors.remove("grad.2.w");
            }),
            |e| matches!(e, Error::MissingTensor { tensor, .. } if tensor == "grad.2.w"),
        ),
        (
            "gradient of the wrong shape",
            Box::new(|raw: &mut Raw| raw.set_f32("grad.2.w", &[3, 2], &[0.0; 6])),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "grad.2.w"),
        ),
        (
            "gradient [1] of a 0-d param",
            Box::new(|raw: &mut Raw| raw.set_f32("grad.3.b", &[1], &[0.5])),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "grad.3.b"),
        ),
        (
            "f64 gradient",
            Box::new(|raw: &mut Raw| raw.retype("grad.1.w", Dtype::F64)),
            |e| matches!(e, Error::DType { tensor, dtype, .. } if tensor == "grad.1.w" && dtype == "F64"),
        ),
        (
            "bf16 param",
            Box::new(|raw: &mut Raw| raw.retype("param.w", Dtype::BF16)),
            |e| matches!(e, Error::DType { tensor, .. } if tensor == "param.w"),
        ),
        (
            "i32 lr",
            Box::new(|raw: &mut Raw| raw.retype("lr", Dtype::I32)),
            |e| matches!(e, Error::DType { tensor, .. } if tensor == "lr"),
        ),
        (
            "lr too short",
            Box::new(|raw: &mut Raw| raw.set_f32("lr", &[2], &[1e-2, 1e-3])),
            |e| matches!(e, Error::Shape { tensor, shape, .. } if tensor == "lr" && shape == &[2]),
        ),
        (
            "lr too long",
            Box::new(|raw: &mut Raw| raw.set_f32("lr", &[4], &[1e-2; 4])),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "lr"),
        ),
        (
            "lr of rank 2",
            Box::new(|raw: &mut Raw| raw.set_f32("lr", &[3, 1], &[1e-2; 3])),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "lr"),
        ),
        (
            // lr 0 is valid (torch allows it; schedules end there): a negative one is not.
            "negative lr",
            Box::new(|raw: &mut Raw| raw.set_f32("lr", &[3], &[1e-2, -1e-3, 1e-3])),
            |e| matches!(e, Error::TensorValue { tensor, index: 1, .. } if tensor == "lr"),
        ),
        (
            "NaN lr",
            Box::new(|raw: &mut Raw| raw.set_f32("lr", &[3], &[1e-2, 1e-3, f32::NAN])),
            |e| matches!(e, Error::TensorValue { tensor, index: 2, .. } if tensor == "lr"),
        ),
        (
            "NaN gradient",
            Box::new(|raw: &mut Raw| {
                raw.set_f32("grad.3.w", &[2, 3], &[0.0, 0.0, 0.0, 0.0, f32::NAN, 0.0])
            }),
            |e| matches!(e, Error::TensorValue { tensor, index: 4, .. } if tensor == "grad.3.w"),
        ),
        (
            "infinite param",
            Box::new(|raw: &mut Raw| raw.set_f32("param.b", &[], &[f32::NEG_INFINITY])),
            |e| matches!(e, Error::TensorValue { tensor, .. } if tensor == "param.b"),
        ),
        (
            "a tensor the format does not define",
            Box::new(|raw: &mut Raw| raw.set_f32("weights.w", &[1], &[0.0])),
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "weights.w"),
        ),
        (
            "a gradient without a param",
            Box::new(|raw: &mut Raw| raw.set_f32("grad.1.c", &[1], &[0.0])),
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "grad.1.c"),
        ),
        (
            "step 0",
            Box::new(|raw: &mut Raw| raw.set_f32("grad.0.b", &[], &[0.0])),
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "grad.0.b"),
        ),
        (
            "step with a leading zero",
            Box::new(|raw: &mut Raw| raw.set_f32("grad.01.b", &[], &[0.0])),
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "grad.01.b"),
        ),
        (
            "no parameters",
            Box::new(|raw: &mut Raw| raw.tensors.retain(|k, _| k == "lr")),
            |e| matches!(e, Error::MissingTensor { .. }),
        ),
    ]
}

#[test]
fn bad_traces_are_rejected() {
    // The uncorrupted trace is valid, so each case fails for its own reason.
    let trace = Trace::from_bytes(&base().bytes(), "base").unwrap();
    assert_eq!(trace.steps(), 3);
    assert_eq!(trace.params[0].name, "b");
    assert_eq!(trace.params[0].shape, Vec::<usize>::new());

    let mut failures = Vec::new();
    for (what, corrupt, expected) in bad_cases() {
        let mut raw = base();
        corrupt(&mut raw);
        match Trace::from_bytes(&raw.bytes(), "trace.safetensors") {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(e) if expected(&e) => eprintln!("{what}: {e}"),
            Err(e) => failures.push(format!("{what}: unexpected error {e:?}")),
        }
    }
    // Not safetensors at all, or cut short: the error names the file.
    let good = base().bytes();
    for (what, bytes) in [
        ("truncated", &good[..good.len() - 5]),
        ("header cut", &good[..20]),
        ("text", &b"param.w = [1, 2, 3]\n"[..]),
        ("empty", &b""[..]),
    ] {
        match Trace::from_bytes(bytes, "run.trace.safetensors") {
            Err(e @ Error::Safetensors { .. }) if e.to_string().contains("run.trace") => {
                eprintln!("{what}: {e}")
            }
            other => failures.push(format!("{what}: {other:?}")),
        }
    }
    match Trace::read("/nonexistent/run.trace.safetensors") {
        Err(Error::Io { file, .. }) if file.contains("nonexistent") => {}
        other => failures.push(format!("missing file: {other:?}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// --- The example, as a subprocess ---------------------------------------------------------

/// `target/<profile>/examples/replay`, which plain `cargo test` builds (`cargo test --test
/// replay` does not: then build it first, `cargo build --example replay`).
fn replay_bin() -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("examples/replay{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&bin).and_then(|m| m.modified());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = std::fs::read_dir(root.join("src"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .chain([root.join("examples/replay.rs")]);
    let newest = sources
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
        .unwrap();
    match built {
        Ok(built) if built >= newest => bin,
        _ => panic!(
            "{} is missing or older than the sources: plain `cargo test` builds it, or run \
             `cargo build --example replay` first",
            bin.display()
        ),
    }
}

/// A fresh directory under the target's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("replay-{name}"));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run_example(args: &[&Path]) -> Run {
    let out = Command::new(replay_bin()).args(args).output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Files in `dir` other than `keep`: a failed run must leave no temporary file behind.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn example_replays_a_recorded_trace() {
    let dir = scratch("ok");
    let case = "recorded_adamw_amsgrad";
    let trace_path = torch_data().join(format!("{case}.trace.safetensors"));
    let out = dir.join("out.safetensors");
    let run = run_example(&[&trace_path, &out]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("adapter: "), "{}", run.stdout);
    assert!(
        run.stdout.contains("replayed 10 iterations"),
        "{}",
        run.stdout
    );
    // A loss-scaled trace: the summary says what was skipped, and the file matches torch's.
    let amp = torch_data().join("amp_adam_clip.trace.safetensors");
    let amp_out = scratch("ok-amp").join("amp.safetensors");
    let run = run_example(&[&amp, &amp_out]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("10 steps applied, 2 skipped, final loss scale 65536"),
        "{}",
        run.stdout
    );
    let mut errors = Vec::new();
    let want = Raw::read(&torch_data().join("amp_adam_clip.expected.safetensors"));
    check_result(
        "amp_adam_clip",
        &Trace::read(&amp).unwrap(),
        &Raw::read(&amp_out),
        &want,
        &mut errors,
    );
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let trace = Trace::read(&trace_path).unwrap();
    let want = Raw::read(&torch_data().join(format!("{case}.expected.safetensors")));
    let mut errors = Vec::new();
    check_result(case, &trace, &Raw::read(&out), &want, &mut errors);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert_eq!(leftovers(&dir, &["out.safetensors"]), Vec::<String>::new());
}

#[test]
fn example_rejects_bad_input_and_writes_nothing() {
    let dir = scratch("bad");
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let cases: HashMap<&str, Corrupt> = bad_cases()
        .into_iter()
        .map(|(what, corrupt, _)| (what, corrupt))
        .collect();
    let corrupted = |what: &str| {
        let mut raw = base();
        cases[what](&mut raw);
        raw.bytes()
    };
    let good = base().bytes();
    // (trace file, the text stderr must name)
    let traces = [
        (
            write("unknown_key.safetensors", &corrupted("unknown config key")),
            "learning_rate",
        ),
        (
            write(
                "missing_algorithm.safetensors",
                &corrupted("missing algorithm"),
            ),
            "algorithm",
        ),
        (
            write(
                "nan_lr.safetensors",
                &corrupted("NaN lr, as Python's json.dumps writes it"),
            ),
            "lr",
        ),
        (
            write("missing_grad.safetensors", &corrupted("missing gradient")),
            "grad.2.w",
        ),
        (
            write(
                "shape.safetensors",
                &corrupted("gradient of the wrong shape"),
            ),
            "grad.2.w",
        ),
        (
            write("f64.safetensors", &corrupted("f64 gradient")),
            "grad.1.w",
        ),
        (write("lr.safetensors", &corrupted("lr too short")), "`lr`"),
        (
            write("truncated.safetensors", &good[..good.len() - 3]),
            "truncated.safetensors",
        ),
        (
            write("text.safetensors", b"not a trace"),
            "text.safetensors",
        ),
        (dir.join("absent.safetensors"), "absent.safetensors"),
    ];
    let kept = [
        "unknown_key.safetensors",
        "missing_algorithm.safetensors",
        "nan_lr.safetensors",
        "missing_grad.safetensors",
        "shape.safetensors",
        "f64.safetensors",
        "lr.safetensors",
        "truncated.safetensors",
        "text.safetensors",
        "existing.safetensors",
    ];
    let existing = write("existing.safetensors", b"an earlier result");
    let mut failures = Vec::new();
    for (trace, names) in &traces {
        for out in [dir.join("fresh.safetensors"), existing.clone()] {
            let run = run_example(&[trace, &out]);
            let what = trace.file_name().unwrap().to_string_lossy();
            if run.code != Some(1) || !run.stderr.contains(names) || run.stderr.contains("panick") {
                failures.push(format!(
                    "{what}: exit {:?}, stderr: {}",
                    run.code, run.stderr
                ));
            }
            if out == existing {
                eprintln!("{what}: {}", run.stderr.trim());
            }
        }
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"an earlier result");
    assert_eq!(leftovers(&dir, &kept), Vec::<String>::new());

    // A valid trace, but OUT cannot be written: the message names OUT, nothing is left.
    let trace = write("good.safetensors", &good);
    let out = dir.join("no/such/dir/out.safetensors");
    let run = run_example(&[&trace, &out]);
    if run.code != Some(1) || !run.stderr.contains("no/such/dir/out.safetensors") {
        failures.push(format!("unwritable OUT: {:?} {}", run.code, run.stderr));
    }
    let mut kept_good = kept.to_vec();
    kept_good.push("good.safetensors");
    assert_eq!(leftovers(&dir, &kept_good), Vec::<String>::new());

    // A wrong command line: usage, exit 2.
    let run = run_example(&[&trace]);
    if run.code != Some(2) || !run.stderr.contains("usage") {
        failures.push(format!("one argument: {:?} {}", run.code, run.stderr));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn sixteen_bit_traces_replay_in_their_dtypes() {
    use wgpu_optim::dtype::{self, Dtype as Storage};
    let (device, queue) = gpu();
    let config = Config::adamw()
        .lr(1e-2)
        .amsgrad(true)
        .param_dtype(Storage::Bf16)
        .grad_dtype(Storage::F16)
        .exp_avg_dtype(Storage::Bf16)
        .exp_avg_sq_dtype(Storage::F16)
        .master_weights(true);
    // One iteration, so that the GPU and the reference start from the same values and may
    // differ only by one rounding of each stored value.
    let mut trace = generated(config.clone(), Some(vec![1e-2]), 11);
    for p in &mut trace.params {
        p.data
            .iter_mut()
            .for_each(|x| *x = dtype::round_to(Storage::Bf16, *x));
    }
    for g in trace.grads.iter_mut().flatten() {
        g.iter_mut()
            .for_each(|x| *x = dtype::round_to(Storage::F16, *x));
    }
    // The file holds each tensor in its dtype, and reads back exactly.
    let bytes = trace.to_bytes().unwrap();
    let raw = Raw::parse(&bytes);
    for (name, (dtype, _, _)) in &raw.tensors {
        let want = if name.starts_with("param.") {
            Dtype::BF16
        } else if name.starts_with("grad.") {
            Dtype::F16
        } else {
            Dtype::F32
        };
        assert_eq!(*dtype, want, "{name}");
    }
    assert_eq!(Trace::from_bytes(&bytes, "trace").unwrap(), trace);
    // A trace whose param is F32 while the config says bf16 is refused, naming it.
    let mut wrong = raw.clone();
    wrong.set_f32("param.head.bias", &[7], &[0.5; 7]);
    assert!(matches!(
        Trace::from_bytes(&wrong.bytes(), "trace"),
        Err(Error::DType { tensor, expected, .. }) if tensor == "param.head.bias" && expected == "BF16"
    ));

    let got = trace.run(device, queue).unwrap();
    let want = trace.run_reference();
    use wgpu_optim::testing::spacing;
    let close = |what: &str, dtype, got: &[f32], want: &[f32], tol: Tolerance| {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let slack = tol.abs + tol.rel * w.abs() + spacing(dtype, g.abs().max(w.abs()));
            assert!((g - w).abs() <= slack, "{what}[{i}]: got {g:e}, want {w:e}");
        }
    };
    let g_max = processed_grad_max(&trace);
    for (i, p) in trace.params.iter().enumerate() {
        let tol = Tolerance::param(1, max_abs(&p.data), 1e-2);
        close(
            "param",
            Storage::Bf16,
            &got.params[i].data,
            &want.params[i].data,
            tol,
        );
        let (gs, ws) = (&got.state[i], &want.state[i]);
        close(
            "master_param",
            Storage::F32,
            gs.master_param.as_ref().unwrap(),
            ws.master_param.as_ref().unwrap(),
            tol,
        );
        let m_tol = Tolerance::exp_avg(max_abs(&ws.exp_avg), g_max[i]);
        close("exp_avg", Storage::Bf16, &gs.exp_avg, &ws.exp_avg, m_tol);
        let v_tol = Tolerance::exp_avg_sq(max_abs(&ws.exp_avg_sq), g_max[i]);
        close(
            "exp_avg_sq",
            Storage::F16,
            &gs.exp_avg_sq,
            &ws.exp_avg_sq,
            v_tol,
        );
    }
    // The result: each state in its dtype, the master weights in F32, bit for bit.
    let result = Raw::parse(&got.to_bytes().unwrap());
    for (name, (dtype, _, _)) in &result.tensors {
        let want = match name.split('.').next().unwrap() {
            "param" | "exp_avg" => Dtype::BF16,
            "exp_avg_sq" | "max_exp_avg_sq" => Dtype::F16,
            _ => Dtype::F32,
        };
        assert_eq!(*dtype, want, "{name}");
    }
    assert_eq!(result.tensors.len(), 5 * trace.params.len());
}

#[test]
fn q8_traces_replay_with_dequantised_state() {
    use wgpu_optim::dtype::{Dtype as Storage, q8::Map};
    use wgpu_optim::testing::q8_spacing;
    let (device, queue) = gpu();
    let config = Config::adam()
        .lr(1e-2)
        .amsgrad(true)
        .exp_avg_dtype(Storage::Q8)
        .exp_avg_sq_dtype(Storage::Q8);
    // One iteration: the GPU and the reference start from the same values and may differ by
    // the f32 tolerance and one code step of each stored value.
    let trace = generated(config.clone(), Some(vec![1e-2]), 12);
    let bytes = trace.to_bytes().unwrap();
    assert_eq!(Trace::from_bytes(&bytes, "trace").unwrap(), trace);
    let got = trace.run(device, queue).unwrap();
    let want = trace.run_reference();
    let g_max = processed_grad_max(&trace);
    let close = |what: &str, slack: &[f32], got: &[f32], want: &[f32], tol: Tolerance| {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let bound = tol.abs + tol.rel * w.abs() + slack[i];
            assert!((g - w).abs() <= bound, "{what}[{i}]: got {g:e}, want {w:e}");
        }
    };
    for (i, p) in trace.params.iter().enumerate() {
        let tol = Tolerance::param(1, max_abs(&p.data), 1e-2);
        let none = vec![0.0; p.data.len()];
        close(
            "param",
            &none,
            &got.params[i].data,
            &want.params[i].data,
            tol,
        );
        let (gs, ws) = (&got.state[i], &want.state[i]);
        let m_tol = Tolerance::exp_avg(max_abs(&ws.exp_avg), g_max[i]);
        let slack = q8_spacing(&Map::for_state("exp_avg"), &gs.exp_avg, &ws.exp_avg);
        close("exp_avg", &slack, &gs.exp_avg, &ws.exp_avg, m_tol);
        let v_tol = Tolerance::exp_avg_sq(max_abs(&ws.exp_avg_sq), g_max[i]);
        let map = Map::for_state("exp_avg_sq");
        let slack = q8_spacing(&map, &gs.exp_avg_sq, &ws.exp_avg_sq);
        close("exp_avg_sq", &slack, &gs.exp_avg_sq, &ws.exp_avg_sq, v_tol);
        let (gv, wv) = (
            gs.max_exp_avg_sq.as_ref().unwrap(),
            ws.max_exp_avg_sq.as_ref().unwrap(),
        );
        close("max_exp_avg_sq", &q8_spacing(&map, gv, wv), gv, wv, v_tol);
    }
    // The result holds q8 states dequantised, as F32, bit for bit what the optimizer read.
    let result_bytes = got.to_bytes().unwrap();
    let result = Raw::parse(&result_bytes);
    for (name, (dtype, _, _)) in &result.tensors {
        assert_eq!(*dtype, Dtype::F32, "{name}");
    }
    assert_eq!(result.tensors.len(), 4 * trace.params.len());
    let t = &trace.params[0].name;
    let (_, _, data) = &result.tensors[&format!("exp_avg.{t}")];
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(values, got.state[0].exp_avg);
}
