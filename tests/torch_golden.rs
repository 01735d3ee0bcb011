//! The GPU path against PyTorch itself: trajectories recorded by `scripts/torch_golden.py`
//! with `torch.optim.Adam` / `AdamW` (see tests/data/torch/README.md), replayed here.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{STORAGE, Tolerance, buffer, compare, gpu, max_abs, read, write};
use safetensors::SafeTensors;
use wgpu_optim::{BufferView, Config, Optimizer, Parameter};

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    bytemuck::pod_collect_to_vec(view.data())
}

fn replay_and_compare(case: &str) -> Vec<String> {
    let (device, queue) = gpu();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch");
    let trace_bytes = std::fs::read(dir.join(format!("{case}.trace.safetensors"))).unwrap();
    let expected_bytes = std::fs::read(dir.join(format!("{case}.expected.safetensors"))).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&trace_bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let config = Config::from_json(&meta["config"]).unwrap();
    let trace = SafeTensors::deserialize(&trace_bytes).unwrap();
    let expected = SafeTensors::deserialize(&expected_bytes).unwrap();

    let names: Vec<String> = trace
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("param.").map(str::to_string))
        .collect();
    let steps = trace
        .names()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .count()
        / names.len();
    let lr: Option<Vec<f32>> = trace.names().contains(&"lr").then(|| f32s(&trace, "lr"));

    let mut buffers = BTreeMap::new();
    let parameters: Vec<Parameter> = names
        .iter()
        .map(|name| {
            let init = f32s(&trace, &format!("param.{name}"));
            let (p, g) = (
                buffer(init.len() as u64, STORAGE),
                buffer(init.len() as u64, STORAGE),
            );
            write(&p, 0, &init);
            buffers.insert(name.clone(), (p.clone(), g.clone(), init.len() as u64));
            Parameter::new(name, BufferView::whole(&p), BufferView::whole(&g))
        })
        .collect();
    let mut optimizer = Optimizer::new(device, config.clone(), &parameters).unwrap();
    let mut g_max: BTreeMap<&str, f32> = BTreeMap::new();
    for t in 1..=steps {
        for name in &names {
            let grad = f32s(&trace, &format!("grad.{t}.{name}"));
            write(&buffers[name].1, 0, &grad);
            let g = g_max.entry(name).or_default();
            *g = g.max(max_abs(&grad));
        }
        if let Some(lr) = &lr {
            optimizer.set_lr(lr[t - 1] as f64).unwrap();
        }
        optimizer.step_blocking(device, queue).unwrap();
    }

    // Tolerances as in parity.rs (f32 rounding of two different operation orders: torch uses
    // lerp for exp_avg and divides by sqrt(bc2) where we fold it), plus the weight decay term
    // in the gradient scale.
    let lr_max = lr.map_or(config.lr, |l| max_abs(&l) as f64) as f32;
    let mut errors = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (p, _, len) = &buffers[name];
        let want_p = f32s(&expected, &format!("param.{name}"));
        let g = g_max[name.as_str()] + config.weight_decay as f32 * max_abs(&want_p);
        let param_tol = Tolerance {
            abs: steps as f32 * (f32::EPSILON * max_abs(&want_p) + 1e-4 * lr_max),
            rel: 0.0,
        };
        let moment = |want: &[f32], scale: f32| Tolerance {
            abs: 1e-5 * max_abs(want).max(scale),
            rel: 1e-5,
        };
        let state = optimizer.read_state_blocking(device, queue, i).unwrap();
        let what = |s: &str| format!("{case} {s}.{name}");
        let want_m = f32s(&expected, &format!("exp_avg.{name}"));
        let want_v = f32s(&expected, &format!("exp_avg_sq.{name}"));
        errors.extend(compare(&what("param"), &read(p, 0, *len), &want_p, param_tol, 0).err());
        errors.extend(
            compare(
                &what("exp_avg"),
                &state.exp_avg,
                &want_m,
                moment(&want_m, g),
                0,
            )
            .err(),
        );
        errors.extend(
            compare(
                &what("exp_avg_sq"),
                &state.exp_avg_sq,
                &want_v,
                moment(&want_v, g * g),
                0,
            )
            .err(),
        );
        match (state.max_exp_avg_sq, config.amsgrad) {
            (Some(got), true) => {
                let want = f32s(&expected, &format!("max_exp_avg_sq.{name}"));
                errors.extend(
                    compare(
                        &what("max_exp_avg_sq"),
                        &got,
                        &want,
                        moment(&want, g * g),
                        0,
                    )
                    .err(),
                );
            }
            (None, false) => {}
            _ => errors.push(what("max_exp_avg_sq present on one side only")),
        }
    }
    errors
}

#[test]
fn gpu_steps_match_pytorch() {
    let cases = [
        "adam_default",
        "adam_wd",
        "adam_amsgrad",
        "adam_maximize",
        "adam_lr_schedule",
        "adamw_default",
        "adamw_amsgrad_maximize",
        "adamw_eps",
    ];
    let errors: Vec<String> = cases.iter().flat_map(|c| replay_and_compare(c)).collect();
    assert!(
        errors.is_empty(),
        "{} mismatches with torch:\n{}",
        errors.len(),
        errors.join("\n")
    );
}
