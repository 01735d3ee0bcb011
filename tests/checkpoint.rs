//! Checkpoints: the file layout, save and load round trips, resuming bit for bit on the GPU, a
//! checkpoint written by PyTorch, and every mismatch refused with the optimizer untouched.

mod common;
mod raw;

use std::path::{Path, PathBuf};

use common::{Rng, STORAGE, Tolerance, buffer, compare, gpu, max_abs, read, write};
use raw::Raw;
use safetensors::tensor::Dtype;
use wgpu_optim::checkpoint::{self, Checkpoint};
use wgpu_optim::{BufferView, Config, EpsMode, Error, Optimizer, Parameter, TensorState};

/// An optimizer over fresh buffers, the parameters set to `init`.
struct Model {
    names: Vec<String>,
    params: Vec<wgpu::Buffer>,
    grads: Vec<wgpu::Buffer>,
    optimizer: Optimizer,
}

impl Model {
    fn new(config: &Config, names: &[&str], init: &[Vec<f32>]) -> Model {
        let params: Vec<_> = init
            .iter()
            .map(|p| buffer(p.len() as u64, STORAGE))
            .collect();
        let grads: Vec<_> = init
            .iter()
            .map(|p| buffer(p.len() as u64, STORAGE))
            .collect();
        for (b, p) in params.iter().zip(init) {
            write(b, 0, p);
        }
        let parameters: Vec<Parameter> = names
            .iter()
            .zip(init)
            .zip(params.iter().zip(&grads))
            .map(|((name, p), (pb, gb))| {
                let len = p.len() as u64;
                Parameter::new(
                    *name,
                    BufferView::new(pb, 0, len),
                    BufferView::new(gb, 0, len),
                )
            })
            .collect();
        let optimizer = Optimizer::new(&gpu().0, config.clone(), &parameters).unwrap();
        Model {
            names: names.iter().map(|n| n.to_string()).collect(),
            params,
            grads,
            optimizer,
        }
    }

    fn lens(&self) -> Vec<u64> {
        (0..self.names.len())
            .map(|i| self.optimizer.tensors()[i].len)
            .collect()
    }

    /// One step with the gradients `grads(t, i, len)` and learning rate `lr(t)`.
    fn step(&mut self, grads: &dyn Fn(u64, usize, u64) -> Vec<f32>, lr: f64) {
        let t = self.optimizer.step_count() + 1;
        for (i, len) in self.lens().into_iter().enumerate() {
            write(&self.grads[i], 0, &grads(t, i, len));
        }
        self.optimizer.set_lr(lr).unwrap();
        let (device, queue) = gpu();
        self.optimizer.step_blocking(device, queue).unwrap();
    }

    fn params(&self) -> Vec<Vec<f32>> {
        self.lens()
            .into_iter()
            .zip(&self.params)
            .map(|(len, b)| read(b, 0, len))
            .collect()
    }

    fn states(&self) -> Vec<TensorState> {
        let (device, queue) = gpu();
        (0..self.names.len())
            .map(|i| {
                self.optimizer
                    .read_state_blocking(device, queue, i)
                    .unwrap()
            })
            .collect()
    }

    /// Everything a load may change: the state, the step counter, the learning rate.
    fn snapshot(&self) -> (Vec<TensorState>, u64, f64) {
        (
            self.states(),
            self.optimizer.step_count(),
            self.optimizer.lr(),
        )
    }
}

/// Seeded gradients that differ per step and tensor, with scales from 1e-3 to 3.
fn grads(t: u64, i: usize, len: u64) -> Vec<f32> {
    Rng::new(t * 1000 + i as u64).normals(len as usize, [1.0, 1e-3, 3.0][i % 3])
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-{name}"));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn same_bits(a: &TensorState, b: &TensorState) -> bool {
    bits(&a.exp_avg) == bits(&b.exp_avg)
        && bits(&a.exp_avg_sq) == bits(&b.exp_avg_sq)
        && a.max_exp_avg_sq.as_deref().map(bits) == b.max_exp_avg_sq.as_deref().map(bits)
}

const NAMES: [&str; 3] = ["encoder.layer.0.weight", "temperature", "head.bias"];

fn init(sizes: &[usize], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    sizes.iter().map(|&n| rng.normals(n, 1.0)).collect()
}

#[test]
fn save_and_load_round_trip() {
    let (device, queue) = gpu();
    let config = Config::adam().amsgrad(true).weight_decay(0.01);
    let sizes = [1025, 1, 6];
    let mut model = Model::new(&config, &NAMES, &init(&sizes, 1));
    for t in 1..=4 {
        model.step(&grads, 0.01 * t as f64);
    }
    let dir = scratch("round-trip");
    let path = dir.join("optimizer.safetensors");
    checkpoint::save(&model.optimizer, device, queue, &path).unwrap();

    // The layout: torch's names, flat tensors, a 0-d step each, the metadata.
    let raw = Raw::read(&path);
    let mut want = Vec::new();
    for (name, size) in NAMES.iter().zip(sizes) {
        for kind in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
            assert_eq!(raw.f32(&format!("{kind}.{name}")).0, [size]);
            want.push(format!("{kind}.{name}"));
        }
        assert_eq!(raw.f32(&format!("step.{name}")), (vec![], vec![4.0]));
        want.push(format!("step.{name}"));
    }
    want.sort();
    assert_eq!(raw.tensors.keys().cloned().collect::<Vec<_>>(), want);
    assert_eq!(raw.metadata["step"], "4");
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&raw.metadata["param_names"]).unwrap(),
        NAMES
    );
    let saved_config = Config::from_json(&raw.metadata["config"]).unwrap();
    assert_eq!(
        saved_config,
        config.clone().lr(0.04),
        "lr is the one in effect"
    );

    // Read back: the same as what was captured.
    let captured = Checkpoint::capture(&model.optimizer, device, queue).unwrap();
    let read_back = Checkpoint::read(&path).unwrap();
    assert_eq!(read_back.step(), 4);
    assert_eq!(read_back.names().collect::<Vec<_>>(), NAMES);
    for (name, state) in NAMES.iter().zip(model.states()) {
        assert!(
            same_bits(read_back.state(name).unwrap().0, &state),
            "{name}"
        );
    }
    assert_eq!(read_back, captured);

    // Into a fresh optimizer over parameters listed in another order: state, step and lr.
    let order = [2, 0, 1];
    let names: Vec<&str> = order.iter().map(|&i| NAMES[i]).collect();
    let sizes2: Vec<usize> = order.iter().map(|&i| sizes[i]).collect();
    let mut fresh = Model::new(&config, &names, &init(&sizes2, 2));
    checkpoint::load(&mut fresh.optimizer, queue, &path).unwrap();
    assert_eq!(fresh.optimizer.step_count(), 4);
    assert_eq!(fresh.optimizer.lr(), 0.04);
    let states = model.states();
    for (k, &i) in order.iter().enumerate() {
        assert!(same_bits(&fresh.states()[k], &states[i]), "{}", NAMES[i]);
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file"
    );
}

#[test]
fn resume_is_bit_exact() {
    // N steps, save, load into a fresh optimizer over copies of the parameters, M more steps:
    // the same bits as N + M steps without the break.
    let (device, queue) = gpu();
    let (n, m) = (5, 4);
    let cases = [
        (
            "adam amsgrad",
            Config::adam().amsgrad(true).weight_decay(0.02),
        ),
        ("adamw", Config::adamw().lr(3e-3)),
        ("yogi maximize", Config::yogi().maximize(true)),
        (
            "adam folded eps_root",
            Config::adam().eps_mode(EpsMode::Folded).eps_root(1e-6),
        ),
        (
            "adam no bias correction",
            Config::adam().bias_correction(false),
        ),
    ];
    let sizes = [1027, 1, 8];
    let dir = scratch("resume");
    for (k, (case, config)) in cases.into_iter().enumerate() {
        // A schedule, so that the saved lr matters too.
        let lr = |t: u64| config.lr * (1.0 + 0.1 * t as f64);
        let start = init(&sizes, 10 + k as u64);

        let mut straight = Model::new(&config, &NAMES, &start);
        for t in 1..=n + m {
            straight.step(&grads, lr(t));
        }

        let path = dir.join(format!("{k}.safetensors"));
        let params_at_save = {
            let mut first = Model::new(&config, &NAMES, &start);
            for t in 1..=n {
                first.step(&grads, lr(t));
            }
            checkpoint::save(&first.optimizer, device, queue, &path).unwrap();
            first.params()
        };
        // A fresh optimizer, constructed with another lr: the checkpoint brings its own.
        let mut resumed = Model::new(&config.clone().lr(1.0), &NAMES, &params_at_save);
        checkpoint::load(&mut resumed.optimizer, queue, &path).unwrap();
        assert_eq!(resumed.optimizer.step_count(), n, "{case}");
        assert_eq!(resumed.optimizer.lr(), lr(n), "{case}");
        for t in n + 1..=n + m {
            resumed.step(&grads, lr(t));
        }

        for (i, name) in NAMES.iter().enumerate() {
            assert_eq!(
                bits(&resumed.params()[i]),
                bits(&straight.params()[i]),
                "{case}: param {name}"
            );
            assert!(
                same_bits(&resumed.states()[i], &straight.states()[i]),
                "{case}: state of {name}"
            );
        }
    }
}

fn torch_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch")
}

#[test]
fn a_checkpoint_written_by_pytorch_loads_and_continues() {
    // scripts/torch_checkpoint.py make-test-data: a tiny model after 5 AdamW + amsgrad steps in
    // torch, exported; then 3 more torch steps (gradients, params and state after them).
    let (device, queue) = gpu();
    let file = Checkpoint::read(torch_data().join("torch_checkpoint.safetensors")).unwrap();
    let cont = Raw::read(&torch_data().join("torch_checkpoint.continue.safetensors"));
    let names: Vec<String> = serde_json::from_str(&cont.metadata["param_names"]).unwrap();
    assert_eq!(file.names().collect::<Vec<_>>(), names);
    assert_eq!(file.step(), 5);

    // Our parameters in another order than torch's, constructed with another lr.
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.reverse();
    let params: Vec<Vec<f32>> = names
        .iter()
        .map(|n| cont.f32(&format!("param.{n}")).1)
        .collect();
    let config = Config::adamw()
        .lr(1.0)
        .betas(0.9, 0.99)
        .weight_decay(0.05)
        .amsgrad(true);
    let mut model = Model::new(&config, &names, &params);
    file.restore(&mut model.optimizer, queue).unwrap();
    assert_eq!(model.optimizer.step_count(), 5);
    assert_eq!(model.optimizer.lr(), 3e-3);
    // The state is torch's, bit for bit.
    let saved = Raw::read(&torch_data().join("torch_checkpoint.safetensors"));
    for (name, state) in names.iter().zip(model.states()) {
        let (shape, exp_avg) = saved.f32(&format!("exp_avg.{name}"));
        assert_eq!(shape, file.state(name).unwrap().1, "shapes are kept");
        assert_eq!(bits(&state.exp_avg), bits(&exp_avg), "{name}");
        assert_eq!(
            bits(&state.exp_avg_sq),
            bits(&saved.f32(&format!("exp_avg_sq.{name}")).1)
        );
        assert_eq!(
            bits(state.max_exp_avg_sq.as_ref().unwrap()),
            bits(&saved.f32(&format!("max_exp_avg_sq.{name}")).1)
        );
    }

    // Three more steps on the GPU land where torch's did (tolerances as in tests/replay.rs).
    let steps: u64 = cont.metadata["steps"].parse().unwrap();
    let (name_of, recorded) = (names.clone(), cont.clone());
    let torch_grads = move |t: u64, i: usize, _len: u64| {
        recorded.f32(&format!("grad.{}.{}", t - 5, name_of[i])).1
    };
    for _ in 0..steps {
        model.step(&torch_grads, 3e-3);
    }
    let mut errors = Vec::new();
    let (params, states) = (model.params(), model.states());
    for (i, name) in names.iter().enumerate() {
        let want = |kind: &str| cont.f32(&format!("after.{kind}.{name}")).1;
        let g_max = (1..=steps)
            .map(|k| max_abs(&cont.f32(&format!("grad.{k}.{name}")).1))
            .fold(0f32, f32::max);
        let p_tol = Tolerance::param(steps, max_abs(&want("param")), 3e-3);
        let vmax = states[i].max_exp_avg_sq.as_ref().unwrap();
        let checks = [
            compare(
                &format!("param.{name}"),
                &params[i],
                &want("param"),
                p_tol,
                0,
            ),
            compare(
                &format!("exp_avg.{name}"),
                &states[i].exp_avg,
                &want("exp_avg"),
                Tolerance::exp_avg(max_abs(&want("exp_avg")), g_max),
                0,
            ),
            compare(
                &format!("exp_avg_sq.{name}"),
                &states[i].exp_avg_sq,
                &want("exp_avg_sq"),
                Tolerance::exp_avg_sq(max_abs(&want("exp_avg_sq")), g_max),
                0,
            ),
            compare(
                &format!("max_exp_avg_sq.{name}"),
                vmax,
                &want("max_exp_avg_sq"),
                Tolerance::exp_avg_sq(max_abs(&want("max_exp_avg_sq")), g_max),
                0,
            ),
        ];
        errors.extend(checks.into_iter().filter_map(Result::err));
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // The other direction is a manual check with torch (see the README's "Checkpoints"): save
    // where the script expects it.
    let path =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("torch_checkpoint.continued.safetensors");
    checkpoint::save(&model.optimizer, device, queue, &path).unwrap();
    eprintln!(
        "wrote {}; check it in torch with: python scripts/torch_checkpoint.py verify-import {0}",
        path.display()
    );
}

/// Corruptions of a valid checkpoint file, each refused with its own error.
type Corruption = (&'static str, fn(&mut Raw), fn(&Error) -> bool);

/// Valid checkpoints of another optimizer, each refused with its own error.
type Refusal = (&'static str, Checkpoint, fn(&Error) -> bool);

#[test]
fn mismatches_are_refused_and_the_optimizer_is_untouched() {
    let (device, queue) = gpu();
    let config = Config::adam().amsgrad(true).lr(0.01);
    let names = ["layer.weight", "layer.bias"];
    let sizes = [13, 3];

    // The checkpoint: 3 steps. The victim: the same parameters after 2 other steps at lr 0.5.
    let mut source = Model::new(&config, &names, &init(&sizes, 1));
    for _ in 0..3 {
        source.step(&grads, 0.01);
    }
    let good = Checkpoint::capture(&source.optimizer, device, queue)
        .unwrap()
        .to_bytes()
        .unwrap();
    let mut victim = Model::new(&config, &names, &init(&sizes, 2));
    for _ in 0..2 {
        victim.step(&|t, i, len| grads(t + 10, i, len), 0.5);
    }
    let before = victim.snapshot();
    let mut failures = Vec::new();
    let mut attempt =
        |what: &str, result: Result<(), Error>, expected: &dyn Fn(&Error) -> bool| match result {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(e) if expected(&e) => eprintln!("{what}: {e}"),
            Err(e) => failures.push(format!("{what}: unexpected error {e:?}")),
        };

    // Corrupted files: refused by Checkpoint::from_bytes.
    let corruptions: Vec<Corruption> = vec![
        (
            "amsgrad state missing",
            |raw| {
                raw.tensors.remove("max_exp_avg_sq.layer.bias");
            },
            |e| matches!(e, Error::MissingTensor { tensor, .. } if tensor == "max_exp_avg_sq.layer.bias"),
        ),
        (
            "exp_avg missing",
            |raw| {
                raw.tensors.remove("exp_avg.layer.weight");
            },
            |e| matches!(e, Error::MissingTensor { tensor, .. } if tensor == "exp_avg.layer.weight"),
        ),
        (
            "f64 state",
            |raw| raw.retype("exp_avg_sq.layer.bias", Dtype::F64),
            |e| matches!(e, Error::DType { tensor, dtype, .. } if tensor == "exp_avg_sq.layer.bias" && dtype == "F64"),
        ),
        (
            "f16 step",
            |raw| raw.retype("step.layer.weight", Dtype::F16),
            |e| matches!(e, Error::DType { tensor, .. } if tensor == "step.layer.weight"),
        ),
        (
            "shapes disagree within a parameter",
            |raw| raw.set_f32("exp_avg_sq.layer.bias", &[1, 3], &[0.0; 3]),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "exp_avg_sq.layer.bias"),
        ),
        (
            "step is not a number",
            |raw| raw.set_f32("step.layer.bias", &[2], &[3.0, 3.0]),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "step.layer.bias"),
        ),
        (
            "steps disagree",
            |raw| raw.set_f32("step.layer.bias", &[], &[7.0]),
            |e| matches!(e, Error::TensorValue { tensor, value, .. } if tensor == "step.layer.bias" && *value == 7.0),
        ),
        (
            "a tensor of no parameter",
            |raw| raw.set_f32("exp_avg.layer.scale", &[3], &[0.0; 3]),
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "exp_avg.layer.scale"),
        ),
        (
            "no config",
            |raw| {
                raw.metadata.remove("config");
            },
            |e| matches!(e, Error::MissingMetadata { key: "config", .. }),
        ),
        (
            "invalid config",
            |raw| {
                raw.metadata.insert(
                    "config".into(),
                    r#"{"algorithm": "adam", "eps": -1}"#.into(),
                );
            },
            |e| matches!(e, Error::InvalidConfig { key: "eps", .. }),
        ),
        (
            "no param_names",
            |raw| {
                raw.metadata.remove("param_names");
            },
            |e| {
                matches!(
                    e,
                    Error::MissingMetadata {
                        key: "param_names",
                        ..
                    }
                )
            },
        ),
        (
            "param_names not a list",
            |raw| {
                raw.metadata
                    .insert("param_names".into(), "layer.weight".into());
            },
            |e| {
                matches!(
                    e,
                    Error::InvalidMetadata {
                        key: "param_names",
                        ..
                    }
                )
            },
        ),
        (
            "a name twice",
            |raw| {
                raw.metadata.insert(
                    "param_names".into(),
                    r#"["layer.weight", "layer.bias", "layer.bias"]"#.into(),
                );
            },
            |e| matches!(e, Error::DuplicateName(n) if n == "layer.bias"),
        ),
        (
            "step not decimal",
            |raw| {
                raw.metadata.insert("step".into(), "3.0".into());
            },
            |e| matches!(e, Error::InvalidMetadata { key: "step", .. }),
        ),
    ];
    for (what, corrupt, expected) in corruptions {
        let mut raw = Raw::parse(&good);
        corrupt(&mut raw);
        let result = Checkpoint::from_bytes(&raw.bytes(), "ckpt.safetensors")
            .and_then(|c| c.restore(&mut victim.optimizer, queue));
        attempt(what, result, &expected);
    }
    for (what, bytes) in [("truncated", &good[..good.len() - 1]), ("text", &b"{}"[..])] {
        attempt(
            what,
            Checkpoint::from_bytes(bytes, "ckpt.safetensors").map(|_| ()),
            &|e| matches!(e, Error::Safetensors { file, .. } if file == "ckpt.safetensors"),
        );
    }
    attempt(
        "missing file",
        checkpoint::load(
            &mut victim.optimizer,
            queue,
            "/nonexistent/ckpt.safetensors",
        ),
        &|e| matches!(e, Error::Io { file, .. } if file.contains("nonexistent")),
    );

    // Valid files of another optimizer: refused by Checkpoint::restore.
    let other = |config: &Config, names: &[&str], sizes: &[usize]| {
        let mut m = Model::new(config, names, &init(sizes, 3));
        m.step(&grads, 0.01);
        Checkpoint::capture(&m.optimizer, device, queue).unwrap()
    };
    let cases: Vec<Refusal> = vec![
        (
            "another name",
            other(&config, &["layer.weight", "layer.b"], &sizes),
            |e| matches!(e, Error::ParameterNames { .. }),
        ),
        (
            "one parameter fewer",
            other(&config, &["layer.weight"], &sizes[..1]),
            |e| matches!(e, Error::ParameterNames { .. }),
        ),
        (
            // The first parameter fits: it must not be written either.
            "the second parameter longer",
            other(&config, &names, &[13, 4]),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "exp_avg.layer.bias"),
        ),
        (
            "other betas",
            other(&config.clone().betas(0.9, 0.99), &names, &sizes),
            |e| matches!(e, Error::ConfigMismatch { key: "betas", .. }),
        ),
        (
            "another algorithm",
            other(&Config::adamw().amsgrad(true), &names, &sizes),
            |e| {
                matches!(
                    e,
                    Error::ConfigMismatch {
                        key: "algorithm",
                        ..
                    }
                )
            },
        ),
        (
            "amsgrad off",
            other(&config.clone().amsgrad(false), &names, &sizes),
            |e| matches!(e, Error::ConfigMismatch { key: "amsgrad", .. }),
        ),
    ];
    for (what, checkpoint, expected) in cases {
        attempt(
            what,
            checkpoint.restore(&mut victim.optimizer, queue),
            &expected,
        );
    }

    // Optimizer::load_state checks too.
    let mut state = victim.states()[0].clone();
    state.max_exp_avg_sq = None;
    attempt(
        "load_state without max_exp_avg_sq",
        victim.optimizer.load_state(queue, 0, &state),
        &|e| matches!(e, Error::MissingTensor { .. }),
    );
    let mut state = victim.states()[1].clone();
    state.exp_avg_sq.push(1.0);
    attempt(
        "load_state, one element too many",
        victim.optimizer.load_state(queue, 1, &state),
        &|e| matches!(e, Error::Shape { tensor, .. } if tensor == "exp_avg_sq.layer.bias"),
    );
    attempt(
        "load_state, no such parameter",
        victim.optimizer.load_state(queue, 2, &state),
        &|e| matches!(e, Error::NoSuchParameter(_)),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing was written: state, step and lr as before.
    let after = victim.snapshot();
    assert_eq!((after.1, after.2), (before.1, before.2));
    for (a, b) in after.0.iter().zip(&before.0) {
        assert!(same_bits(a, b));
    }
    // And the good file still loads.
    Checkpoint::from_bytes(&good, "good")
        .unwrap()
        .restore(&mut victim.optimizer, queue)
        .unwrap();
    assert_eq!(victim.optimizer.step_count(), 3);
}

#[test]
fn saving_is_atomic() {
    let (device, queue) = gpu();
    let mut model = Model::new(&Config::adam(), &["w"], &init(&[10], 4));
    model.step(&grads, 1e-3);
    let dir = scratch("atomic");

    // Into a directory that does not exist: an error naming the file, nothing created.
    let path = dir.join("missing/optimizer.safetensors");
    match checkpoint::save(&model.optimizer, device, queue, &path) {
        Err(Error::Io { file, .. }) if file.contains("missing/optimizer.safetensors") => {}
        other => panic!("{other:?}"),
    }
    assert!(!dir.join("missing").exists());

    // Over something that cannot be replaced (a non-empty directory): it stays, no temporary
    // file is left.
    let blocker = dir.join("blocker.safetensors");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("inside"), b"x").unwrap();
    assert!(matches!(
        checkpoint::save(&model.optimizer, device, queue, &blocker),
        Err(Error::Io { .. })
    ));
    assert!(blocker.join("inside").exists());

    // Over an existing file: replaced whole.
    let path = dir.join("optimizer.safetensors");
    std::fs::write(&path, b"an older checkpoint").unwrap();
    checkpoint::save(&model.optimizer, device, queue, &path).unwrap();
    assert_eq!(Checkpoint::read(&path).unwrap().step(), 1);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["blocker.safetensors", "optimizer.safetensors"]);
}

#[test]
fn several_groups_resume_bit_exact_with_their_own_lrs() {
    // An arena of tensors in three groups, one group scheduled and one with a learning rate set
    // by hand: N steps, save, load into a fresh optimizer, M steps equals N + M steps.
    let (device, queue) = gpu();
    let groups = [
        Config::adamw().lr(1e-3),
        Config::adamw().lr(3e-3).weight_decay(0.0),
        Config::adamw().lr(5e-4).betas(0.8, 0.99),
    ];
    let specs = [
        ("w", 300u64, 0usize),
        ("b", 7, 1),
        ("n", 1, 2),
        ("w2", 64, 0),
    ];
    let build = |arena: &wgpu_optim::Arena| {
        let mut o =
            Optimizer::with_groups(device, &groups, &[], &[arena.flat()], Default::default())
                .unwrap();
        o.set_schedule(
            0,
            Some(wgpu_optim::Schedule::warmup_cosine(2, 8, 0.0).unwrap()),
        )
        .unwrap();
        o
    };
    let arenas: Vec<wgpu_optim::Arena> = (0..2)
        .map(|_| wgpu_optim::Arena::new(device, &specs).unwrap())
        .collect();
    let len = arenas[0]
        .tensors()
        .last()
        .map(|t| t.offset + t.len)
        .unwrap();
    let init = Rng::new(3).normals(len as usize, 1.0);
    let (mut straight, mut first) = (build(&arenas[0]), build(&arenas[1]));
    for arena in &arenas {
        write(&arena.param, 0, &init);
    }
    let mut rng = Rng::new(4);
    let step = |o: &mut Optimizer, arena: &wgpu_optim::Arena, grad: &[f32]| {
        write(&arena.grad, 0, grad);
        o.step_blocking(device, queue).unwrap();
    };
    for t in 1..=3 {
        let grad = rng.normals(len as usize, 1.0);
        straight.set_group_lr(1, 3e-3 / t as f64).unwrap();
        first.set_group_lr(1, 3e-3 / t as f64).unwrap();
        step(&mut straight, &arenas[0], &grad);
        step(&mut first, &arenas[1], &grad);
    }
    let path = scratch("groups").join("optimizer.safetensors");
    checkpoint::save(&first, device, queue, &path).unwrap();
    let saved = Checkpoint::read(&path).unwrap();
    assert_eq!(
        saved.groups().map(|g| g.lr).collect::<Vec<_>>(),
        [1e-3, 1e-3, 5e-4]
    );

    // A fresh optimizer over the same arena (its parameters already hold the first run's).
    let mut resumed = build(&arenas[1]);
    checkpoint::load(&mut resumed, queue, &path).unwrap();
    assert_eq!(resumed.group_lrs(), [1e-3, 1e-3, 5e-4]);
    assert_eq!(resumed.step_count(), 3);
    for _ in 4..=6 {
        let grad = rng.normals(len as usize, 1.0);
        step(&mut straight, &arenas[0], &grad);
        step(&mut resumed, &arenas[1], &grad);
    }
    assert_eq!(
        bits(&read(&arenas[0].param, 0, len)),
        bits(&read(&arenas[1].param, 0, len))
    );
    for i in 0..specs.len() {
        let a = straight.read_state_blocking(device, queue, i).unwrap();
        let b = resumed.read_state_blocking(device, queue, i).unwrap();
        assert!(same_bits(&a, &b), "tensor {i}");
    }

    // Another number of groups, or a tensor in another group, is refused untouched.
    let one_group = Optimizer::with_groups(
        device,
        &groups[..1],
        &[],
        &[wgpu_optim::Arena::new(device, &specs[..1]).unwrap().flat()],
        Default::default(),
    );
    let err = checkpoint::load(&mut one_group.unwrap(), queue, &path).unwrap_err();
    assert!(
        matches!(&err, Error::ConfigMismatch { key: "groups", .. }),
        "{err}"
    );
    let moved: Vec<(&str, u64, usize)> = specs
        .iter()
        .map(|&(n, l, g)| (n, l, if n == "b" { 0 } else { g }))
        .collect();
    let mut other = Optimizer::with_groups(
        device,
        &groups,
        &[],
        &[wgpu_optim::Arena::new(device, &moved).unwrap().flat()],
        Default::default(),
    )
    .unwrap();
    let err = checkpoint::load(&mut other, queue, &path).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ConfigMismatch {
                key: "param_groups",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(other.step_count(), 0);
}

#[test]
fn a_checkpoint_saved_at_lr_zero_loads() {
    // A schedule that decays to 0 ends there; the checkpoint of that run must load (lr >= 0 is
    // the one learning-rate domain of the library and of torch).
    let (device, queue) = gpu();
    let config = Config::adamw();
    let sizes = [5, 17, 1];
    let mut model = Model::new(&config, &NAMES, &init(&sizes, 3));
    model.step(&grads, 1e-3);
    model.step(&grads, 0.0);
    let path = scratch("lr-zero").join("optimizer.safetensors");
    checkpoint::save(&model.optimizer, device, queue, &path).unwrap();
    let mut fresh = Model::new(&config, &NAMES, &init(&sizes, 3));
    fresh.optimizer.set_lr(1.0).unwrap();
    checkpoint::load(&mut fresh.optimizer, queue, &path).unwrap();
    assert_eq!(fresh.optimizer.lr(), 0.0);
    assert_eq!(fresh.optimizer.step_count(), 2);
    for (a, b) in fresh.states().iter().zip(model.states()) {
        assert!(same_bits(a, &b));
    }
}

#[test]
fn loss_scaled_runs_with_skips_resume_bit_exact() {
    // With loss scaling, skipping and clipping, the device holds t, S and its growth tracker:
    // the checkpoint saves them (and the iterations schedules count), and resuming gives the
    // same bits as running through.
    let (device, queue) = gpu();
    let config = Config::adamw()
        .lr(1e-2)
        .max_grad_norm(Some(1.0))
        .loss_scale(Some(
            wgpu_optim::LossScale::default()
                .init_scale(2f64.powi(20))
                .growth_interval(2),
        ));
    let scaled = |t: u64, i: usize, len: u64| {
        let mut g: Vec<f32> = grads(t, i, len).iter().map(|x| x * 1024.0).collect();
        if (t == 2 || t == 6) && i == 0 {
            g[0] = f32::INFINITY;
        }
        g
    };
    let sizes = [33, 1, 7];
    let mut through = Model::new(&config, &NAMES, &init(&sizes, 9));
    for _ in 0..8 {
        through.step(&scaled, 1e-2);
    }
    let mut first = Model::new(&config, &NAMES, &init(&sizes, 9));
    for _ in 0..4 {
        first.step(&scaled, 1e-2);
    }
    let path = scratch("loss-scaled").join("optimizer.safetensors");
    checkpoint::save(&first.optimizer, device, queue, &path).unwrap();
    let saved = Checkpoint::read(&path).unwrap();
    assert_eq!(
        (saved.step(), saved.iterations()),
        (3, 4),
        "iteration 2 was skipped"
    );
    let (device_scale, tracker) = saved.loss_scale().unwrap();
    let status = first.optimizer.read_status_blocking(device, queue).unwrap();
    assert_eq!(
        (device_scale, tracker),
        (status.loss_scale, status.growth_tracker)
    );

    let mut resumed = Model::new(&config, &NAMES, &init(&sizes, 9));
    for (b, p) in resumed.params.iter().zip(first.params()) {
        write(b, 0, &p);
    }
    checkpoint::load(&mut resumed.optimizer, queue, &path).unwrap();
    assert_eq!(resumed.optimizer.step_count(), 4);
    for _ in 0..4 {
        resumed.step(&scaled, 1e-2);
    }
    let bits = |v: Vec<Vec<f32>>| v.into_iter().map(|x| bits(&x)).collect::<Vec<_>>();
    assert_eq!(bits(resumed.params()), bits(through.params()));
    for (a, b) in resumed.states().iter().zip(through.states()) {
        assert!(same_bits(a, &b));
    }
    let (a, b) = (
        resumed
            .optimizer
            .read_status_blocking(device, queue)
            .unwrap(),
        through
            .optimizer
            .read_status_blocking(device, queue)
            .unwrap(),
    );
    assert_eq!(a.applied_steps, 6);
    assert_eq!(
        (a.applied_steps, a.loss_scale, a.growth_tracker),
        (b.applied_steps, b.loss_scale, b.growth_tracker)
    );

    // A checkpoint of such an optimizer without its loss scale is refused, naming the key.
    let mut raw = Raw::read(&path);
    raw.metadata.remove("loss_scale");
    match Checkpoint::from_bytes(&raw.bytes(), "no scale") {
        Err(Error::MissingMetadata {
            key: "loss_scale", ..
        }) => {}
        other => panic!("{other:?}"),
    }
}
