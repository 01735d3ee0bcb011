//! Checkpoints: the file layout, save and load round trips, resuming bit for bit on the GPU
//! (f32, and each state in its storage dtype: 16-bit states, 16-bit parameters with master
//! weights or stochastic rounding), a checkpoint written by PyTorch, and every mismatch refused
//! with the optimizer untouched.

mod common;
mod raw;

use std::path::{Path, PathBuf};

use common::{Rng, STORAGE, Tolerance, compare, gpu, max_abs, read, write};
use raw::Raw;
use safetensors::tensor::Dtype;
use wgpu_optim::checkpoint::{self, Checkpoint};
use wgpu_optim::dtype::{self, Dtype as Storage};
use wgpu_optim::{
    BufferView, Config, EpsMode, Error, FlatParameters, FlatTensor, LossScale, Optimizer,
    Parameter, Q8State, Rounding, TensorState,
};

/// A buffer of `len` elements of `dtype` (whole 32-bit words, 16-bit values two to a word).
fn buffer_of(dtype: Storage, len: u64) -> wgpu::Buffer {
    gpu().0.create_buffer(&wgpu::BufferDescriptor {
        label: Some("checkpoint test"),
        size: (len * dtype.bytes()).next_multiple_of(4).max(4),
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

/// `data` as a buffer of `dtype` holds it (rounded to nearest), as 32-bit words.
fn encode(dtype: Storage, data: &[f32]) -> Vec<u32> {
    let mut bytes = dtype::to_bytes(dtype, data);
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The first `len` values of `dtype` in `words`, widened to f32.
fn decode(dtype: Storage, words: &[u32], len: usize) -> Vec<f32> {
    let bytes: &[u8] = bytemuck::cast_slice(words);
    dtype::from_bytes(dtype, &bytes[..len * dtype.bytes() as usize])
}

/// Writes 32-bit words at the start of `buffer`.
fn write_words(buffer: &wgpu::Buffer, words: &[u32]) {
    if !words.is_empty() {
        gpu().1.write_buffer(buffer, 0, bytemuck::cast_slice(words));
    }
}

/// The 32-bit words that hold `len` elements of `dtype` from the start of `buffer`.
fn read_words(buffer: &wgpu::Buffer, dtype: Storage, len: u64) -> Vec<u32> {
    bits(&read(buffer, 0, (len * dtype.bytes()).div_ceil(4)))
}

/// An optimizer over fresh buffers of the config's `param_dtype` and `grad_dtype`, the
/// parameters set to `init` (rounded to nearest into 16-bit buffers).
struct Model {
    names: Vec<String>,
    params: Vec<wgpu::Buffer>,
    grads: Vec<wgpu::Buffer>,
    param_dtype: Storage,
    grad_dtype: Storage,
    optimizer: Optimizer,
}

impl Model {
    fn new(config: &Config, names: &[&str], init: &[Vec<f32>]) -> Model {
        let (param_dtype, grad_dtype) = (config.param_dtype, config.grad_dtype);
        let params: Vec<_> = init
            .iter()
            .map(|p| buffer_of(param_dtype, p.len() as u64))
            .collect();
        let grads: Vec<_> = init
            .iter()
            .map(|p| buffer_of(grad_dtype, p.len() as u64))
            .collect();
        for (b, p) in params.iter().zip(init) {
            write_words(b, &encode(param_dtype, p));
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
            param_dtype,
            grad_dtype,
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
            write_words(&self.grads[i], &encode(self.grad_dtype, &grads(t, i, len)));
        }
        self.optimizer.set_lr(lr).unwrap();
        let (device, queue) = gpu();
        self.optimizer.step_blocking(device, queue).unwrap();
    }

    /// The parameters, widened to f32.
    fn params(&self) -> Vec<Vec<f32>> {
        self.param_words()
            .iter()
            .zip(self.lens())
            .map(|(words, len)| decode(self.param_dtype, words, len as usize))
            .collect()
    }

    /// The parameter buffers' bytes, as 32-bit words (a 16-bit buffer's last half word too).
    fn param_words(&self) -> Vec<Vec<u32>> {
        self.lens()
            .into_iter()
            .zip(&self.params)
            .map(|(len, b)| read_words(b, self.param_dtype, len))
            .collect()
    }

    /// Overwrites the parameter buffers with another model's bytes.
    fn set_param_words(&self, words: &[Vec<u32>]) {
        for (b, w) in self.params.iter().zip(words) {
            write_words(b, w);
        }
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
        && a.master_param.as_deref().map(bits) == b.master_param.as_deref().map(bits)
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

/// Storage keys on top of `config`: the dtypes of params, grads, exp_avg and exp_avg_sq, and
/// for 16-bit params master weights or the rounding (with a fixed seed).
fn stored(config: Config, dtypes: [Storage; 4], master: bool, rounding: Rounding) -> Config {
    let [param, grad, m, v] = dtypes;
    config
        .param_dtype(param)
        .grad_dtype(grad)
        .exp_avg_dtype(m)
        .exp_avg_sq_dtype(v)
        .master_weights(master)
        .rounding(rounding)
        .seed(0x2545_f491_4f6c_dd1d)
}

fn safetensors_dtype(dtype: Storage) -> Dtype {
    match dtype {
        Storage::Bf16 => Dtype::BF16,
        Storage::F16 => Dtype::F16,
        _ => Dtype::F32,
    }
}

/// The bytes of elements `offset..offset + len` of a buffer of `dtype`.
fn element_bytes(buffer: &wgpu::Buffer, dtype: Storage, offset: u64, len: u64) -> Vec<u8> {
    let size = dtype.bytes();
    let first = offset * size / 4;
    let words = read(buffer, first, ((offset + len) * size).div_ceil(4) - first);
    let skip = (offset * size - first * 4) as usize;
    bytemuck::cast_slice::<f32, u8>(&words)[skip..skip + (len * size) as usize].to_vec()
}

/// The file `model` saved to `path` holds each state tensor in its dtype with the bytes of its
/// state buffer (`master_param` in F32 exactly with master weights), a 0-d F32 step each, and
/// nothing else.
fn check_layout(case: &str, model: &Model, path: &Path) -> Vec<String> {
    let raw = Raw::read(path);
    let config = model.optimizer.config();
    let mut errors = Vec::new();
    let mut want = Vec::new();
    for (i, (name, len)) in model.names.iter().zip(model.lens()).enumerate() {
        let (buffers, offset) = model.optimizer.state_buffers(i).unwrap();
        let (m, v) = (config.exp_avg_dtype, config.exp_avg_sq_dtype);
        let states = [
            ("exp_avg", Some(&buffers.exp_avg), m),
            ("exp_avg_sq", Some(&buffers.exp_avg_sq), v),
            ("max_exp_avg_sq", buffers.max_exp_avg_sq.as_ref(), v),
            ("master_param", buffers.master_param.as_ref(), Storage::F32),
        ];
        for (kind, buffer, dtype) in states {
            let tensor = format!("{kind}.{name}");
            let Some(buffer) = buffer else { continue };
            match raw.tensors.get(&tensor) {
                None => errors.push(format!("{case}: no {tensor} in the file")),
                Some((got, shape, bytes)) => {
                    if (*got, shape.as_slice()) != (safetensors_dtype(dtype), &[len as usize][..]) {
                        errors.push(format!(
                            "{case}: {tensor} is {got:?} {shape:?}, want {dtype:?} [{len}]"
                        ));
                    } else if *bytes != element_bytes(buffer, dtype, offset, len) {
                        errors.push(format!(
                            "{case}: {tensor} holds other bytes than its buffer"
                        ));
                    }
                }
            }
            want.push(tensor);
        }
        let step = format!("step.{name}");
        if raw.tensors.get(&step).map(|t| t.0) != Some(Dtype::F32) {
            errors.push(format!("{case}: {step} missing or not F32"));
        }
        want.push(step);
    }
    want.sort();
    let have: Vec<String> = raw.tensors.keys().cloned().collect();
    if have != want {
        errors.push(format!("{case}: the file has {have:?}, want {want:?}"));
    }
    errors
}

type Grads = fn(u64, usize, u64) -> Vec<f32>;

/// Gradients as a loss-scaled backward pass leaves them (times 1024), with an infinity in
/// iterations 2 and 6, which are skipped.
fn scaled_grads(t: u64, i: usize, len: u64) -> Vec<f32> {
    let mut g: Vec<f32> = grads(t, i, len).iter().map(|x| x * 1024.0).collect();
    if (t == 2 || t == 6) && i == 0 {
        g[0] = f32::INFINITY;
    }
    g
}

/// N steps, save, load into a fresh optimizer whose parameter buffers hold the saved run's
/// bytes, M more steps: the same parameter bytes, state bits (master weights included) and
/// counts as N + M steps without the break. Also checks the file's layout, and that the state
/// loaded is the one saved, bit for bit. With stochastic rounding, a run with another seed
/// must end elsewhere: else the random bits would not show in this comparison.
fn check_resume(case: &str, config: &Config, grads: Grads, dir: &Path) -> Vec<String> {
    let (device, queue) = gpu();
    let (n, m) = (5, 4);
    let sizes = [1027, 1, 8];
    let start = init(&sizes, 20);
    let lr = |t: u64| config.lr * (1.0 + 0.1 * t as f64);
    let run = |c: &Config, steps: u64| {
        let mut model = Model::new(c, &NAMES, &start);
        for t in 1..=steps {
            model.step(&grads, lr(t));
        }
        model
    };
    let mut errors = Vec::new();
    let straight = run(config, n + m);
    let first = run(config, n);
    let path = dir.join(format!("{}.safetensors", case.replace([' ', ','], "_")));
    checkpoint::save(&first.optimizer, device, queue, &path).unwrap();
    errors.extend(check_layout(case, &first, &path));

    // A fresh optimizer, constructed with another lr and other parameters, given the saved
    // run's parameter bytes (the engine's to save) and the checkpoint.
    let mut resumed = Model::new(&config.clone().lr(1.0), &NAMES, &init(&sizes, 21));
    resumed.set_param_words(&first.param_words());
    checkpoint::load(&mut resumed.optimizer, queue, &path).unwrap();
    if resumed.optimizer.step_count() != n {
        errors.push(format!(
            "{case}: {} iterations after loading",
            resumed.optimizer.step_count()
        ));
    }
    for ((name, a), b) in NAMES.iter().zip(resumed.states()).zip(first.states()) {
        if !same_bits(&a, &b) {
            errors.push(format!(
                "{case}: the state of {name} loaded is not the one saved"
            ));
        }
    }
    for t in n + 1..=n + m {
        resumed.step(&grads, lr(t));
    }
    let (params, states) = (resumed.param_words(), resumed.states());
    for (i, name) in NAMES.iter().enumerate() {
        if params[i] != straight.param_words()[i] {
            errors.push(format!("{case}: the bytes of param {name} differ"));
        }
        if !same_bits(&states[i], &straight.states()[i]) {
            errors.push(format!("{case}: the state of {name} differs"));
        }
    }
    let status = |model: &Model| {
        let s = model.optimizer.read_status_blocking(device, queue).unwrap();
        (s.applied_steps, s.loss_scale, s.growth_tracker)
    };
    if status(&resumed) != status(&straight) {
        errors.push(format!(
            "{case}: t, S and the growth tracker are {:?} resumed, {:?} straight",
            status(&resumed),
            status(&straight)
        ));
    }
    if config.rounds_stochastically()
        && run(&config.clone().seed(config.seed ^ 1), n + m).param_words() == params
    {
        errors.push(format!(
            "{case}: another seed ends with the same parameters"
        ));
    }
    errors
}

/// The storage cases of one 16-bit format `h` (mixed with the other, `o`, in one case).
fn storage_cases(h: Storage, o: Storage) -> Vec<(String, Config, Grads)> {
    use Rounding::{Nearest, Stochastic};
    let f = Storage::F32;
    let adam = Config::adam().amsgrad(true).weight_decay(0.02);
    let adamw = Config::adamw().lr(1e-3).weight_decay(0.1);
    let scaled = adamw.clone().loss_scale(Some(
        LossScale::default()
            .init_scale(2f64.powi(20))
            .growth_interval(2),
    ));
    let name = |what: &str| format!("{} {what}", h.name());
    vec![
        (
            name("states, amsgrad"),
            stored(adam.clone(), [f, f, h, h], false, Nearest),
            grads,
        ),
        (
            name("exp_avg, other exp_avg_sq"),
            stored(adamw.clone(), [f, f, h, o], false, Nearest),
            grads,
        ),
        (
            name("params and grads, master weights"),
            stored(adamw.clone(), [h, h, f, f], true, Nearest),
            grads,
        ),
        (
            name("everything, master weights, amsgrad"),
            stored(adam.clone(), [h, h, h, h], true, Nearest),
            grads,
        ),
        (
            name("params, nearest"),
            stored(adamw.clone(), [h, f, f, f], false, Nearest),
            grads,
        ),
        (
            name("params, stochastic rounding"),
            stored(adamw.clone(), [h, f, h, h], false, Stochastic),
            grads,
        ),
        (
            name("params, stochastic rounding, loss scale with skips"),
            stored(scaled.clone(), [h, h, f, h], false, Stochastic),
            scaled_grads,
        ),
        (
            name("params, master weights, loss scale with skips"),
            stored(scaled, [h, o, h, f], true, Nearest),
            scaled_grads,
        ),
    ]
}

#[test]
fn bf16_storage_resumes_bit_exact() {
    // Each state in bf16, bf16 parameters with master weights or stochastic rounding (whose
    // random bits follow t and the element index: resuming must continue them).
    let dir = scratch("resume-bf16");
    let mut errors = Vec::new();
    // The mixed case pairs bf16 with f32 here; bf16 with f16 is in the f16 test.
    for (case, config, grads) in storage_cases(Storage::Bf16, Storage::F32) {
        errors.extend(check_resume(&case, &config, grads, &dir));
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn f16_storage_resumes_bit_exact() {
    // As bf16_storage_resumes_bit_exact, in f16 (and f16 mixed with bf16).
    let dir = scratch("resume-f16");
    let mut errors = Vec::new();
    for (case, config, grads) in storage_cases(Storage::F16, Storage::Bf16) {
        errors.extend(check_resume(&case, &config, grads, &dir));
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
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

/// Gives tensor `name` another dtype (zeros of the right size: the dtype is checked first).
fn retag(raw: &mut Raw, name: &str, dtype: Dtype) {
    let (_, shape, _) = raw.tensors.remove(name).expect(name);
    let bytes = vec![0u8; shape.iter().product::<usize>() * dtype.bitsize() / 8];
    raw.tensors.insert(name.to_string(), (dtype, shape, bytes));
}

/// Sets a key of the file's `config`.
fn set_config(raw: &mut Raw, key: &str, value: serde_json::Value) {
    let mut config: serde_json::Value = serde_json::from_str(&raw.metadata["config"]).unwrap();
    config[key] = value;
    raw.metadata.insert("config".into(), config.to_string());
}

#[test]
fn storage_mismatches_are_refused_and_the_optimizer_is_untouched() {
    // A checkpoint with bf16 parameters, gradients and states, master weights and amsgrad;
    // every tensor of the wrong dtype, a master_param missing or unexpected, and every storage
    // key differing from the optimizer's is refused, naming the tensor or key.
    let (device, queue) = gpu();
    let b = Storage::Bf16;
    let config = stored(
        Config::adamw().amsgrad(true).lr(0.01),
        [b, b, b, b],
        true,
        Rounding::Nearest,
    );
    let names = ["layer.weight", "layer.bias"];
    let sizes = [13, 3];
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

    let corruptions: Vec<Corruption> = vec![
        (
            "exp_avg in F32, the config says bf16",
            |raw| retag(raw, "exp_avg.layer.bias", Dtype::F32),
            |e| matches!(e, Error::DType { tensor, dtype, expected } if tensor == "exp_avg.layer.bias" && dtype == "F32" && expected.contains("BF16") && expected.contains("exp_avg_dtype")),
        ),
        (
            "exp_avg_sq in F16, the config says bf16",
            |raw| retag(raw, "exp_avg_sq.layer.weight", Dtype::F16),
            |e| matches!(e, Error::DType { tensor, dtype, expected } if tensor == "exp_avg_sq.layer.weight" && dtype == "F16" && expected.contains("BF16") && expected.contains("exp_avg_sq_dtype")),
        ),
        (
            "max_exp_avg_sq in F32, the config says bf16",
            |raw| retag(raw, "max_exp_avg_sq.layer.bias", Dtype::F32),
            |e| matches!(e, Error::DType { tensor, expected, .. } if tensor == "max_exp_avg_sq.layer.bias" && expected.contains("exp_avg_sq_dtype")),
        ),
        (
            "master_param in BF16",
            |raw| retag(raw, "master_param.layer.weight", Dtype::BF16),
            |e| matches!(e, Error::DType { tensor, dtype, expected } if tensor == "master_param.layer.weight" && dtype == "BF16" && expected.starts_with("F32")),
        ),
        (
            "states in bf16, the config says f32",
            |raw| set_config(raw, "exp_avg_dtype", "f32".into()),
            |e| matches!(e, Error::DType { tensor, dtype, expected } if tensor == "exp_avg.layer.weight" && dtype == "BF16" && expected.starts_with("F32")),
        ),
        (
            "master_param missing",
            |raw| {
                raw.tensors.remove("master_param.layer.bias");
            },
            |e| matches!(e, Error::MissingTensor { tensor, .. } if tensor == "master_param.layer.bias"),
        ),
        (
            "master_param without master_weights",
            |raw| set_config(raw, "master_weights", false.into()),
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor.starts_with("master_param.")),
        ),
        (
            "master_param with f32 params",
            |raw| set_config(raw, "param_dtype", "f32".into()),
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor.starts_with("master_param.")),
        ),
        (
            "master_param of a parameter not in the file",
            |raw| raw.set_f32("master_param.layer.scale", &[3], &[0.0; 3]),
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "master_param.layer.scale"),
        ),
    ];
    for (what, corrupt, expected) in corruptions {
        let mut raw = Raw::parse(&good);
        corrupt(&mut raw);
        let result = Checkpoint::from_bytes(&raw.bytes(), "ckpt.safetensors")
            .and_then(|c| c.restore(&mut victim.optimizer, queue));
        attempt(what, result, &expected);
    }

    // Valid checkpoints of an optimizer that differs in one storage key.
    let other = |config: Config| {
        let mut m = Model::new(&config, &names, &init(&sizes, 3));
        m.step(&grads, 0.01);
        Checkpoint::capture(&m.optimizer, device, queue).unwrap()
    };
    let f = Storage::F32;
    let cases: Vec<(&str, Config, &str)> = vec![
        ("f32 params", config.clone().param_dtype(f), "param_dtype"),
        ("f32 grads", config.clone().grad_dtype(f), "grad_dtype"),
        (
            "f32 exp_avg",
            config.clone().exp_avg_dtype(f),
            "exp_avg_dtype",
        ),
        (
            "f32 exp_avg_sq",
            config.clone().exp_avg_sq_dtype(f),
            "exp_avg_sq_dtype",
        ),
        (
            "no master weights",
            config.clone().master_weights(false),
            "master_weights",
        ),
        (
            "stochastic rounding",
            config.clone().rounding(Rounding::Stochastic),
            "rounding",
        ),
        ("another seed", config.clone().seed(7), "seed"),
    ];
    for (what, other_config, key) in cases {
        attempt(
            what,
            other(other_config).restore(&mut victim.optimizer, queue),
            &|e| matches!(e, Error::ConfigMismatch { key: k, .. } if *k == key),
        );
    }
    // The error shows both values.
    attempt(
        "f32 exp_avg, both values",
        other(config.clone().exp_avg_dtype(f)).restore(&mut victim.optimizer, queue),
        &|e| {
            matches!(e, Error::ConfigMismatch { key: "exp_avg_dtype", checkpoint, optimizer }
                if checkpoint == "\"f32\"" && optimizer == "\"bf16\"")
        },
    );

    // Optimizer::load_state checks master weights too.
    let mut state = victim.states()[0].clone();
    state.master_param = None;
    attempt(
        "load_state without master_param",
        victim.optimizer.load_state(queue, 0, &state),
        &|e| matches!(e, Error::MissingTensor { tensor, .. } if tensor == "master_param.layer.weight"),
    );
    let mut plain = Model::new(&Config::adamw().amsgrad(true), &names, &init(&sizes, 4));
    attempt(
        "load_state with master_param, f32 params",
        plain.optimizer.load_state(queue, 0, &victim.states()[0]),
        &|e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "master_param.layer.weight"),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing was written: state (master weights included), step and lr as before.
    let after = victim.snapshot();
    assert_eq!((after.1, after.2), (before.1, before.2));
    for (a, b) in after.0.iter().zip(&before.0) {
        assert!(same_bits(a, b));
    }
    // And the good file still loads, bit for bit.
    Checkpoint::from_bytes(&good, "good")
        .unwrap()
        .restore(&mut victim.optimizer, queue)
        .unwrap();
    assert_eq!(victim.optimizer.step_count(), 3);
    for (a, b) in victim.states().iter().zip(source.states()) {
        assert!(same_bits(a, &b));
    }
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

// q8 states (issue 12): saved as their codes and absmax, with the maps' names, and restored as
// they were, so that a resume is bit-exact (quantising the dequantised values again is not).

const STATE_KINDS: [&str; 3] = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"];

/// The states `config` stores as q8.
fn q8_kinds(config: &Config) -> Vec<&'static str> {
    STATE_KINDS
        .into_iter()
        .filter(|&k| k != "max_exp_avg_sq" || config.amsgrad)
        .filter(|&k| {
            let dtype = if k == "exp_avg" {
                config.exp_avg_dtype
            } else {
                config.exp_avg_sq_dtype
            };
            dtype == Storage::Q8
        })
        .collect()
}

/// A q8 state's map, absmax bits and codes: compared bit for bit.
fn q8_bits(q: &Q8State) -> (String, Vec<u32>, Vec<u8>) {
    (q.map.clone(), bits(&q.absmax), q.codes.clone())
}

/// An optimizer for the q8 tests over `init`: separate buffers, or one flat buffer (tensors at
/// even offsets with gaps between them, in two groups, the second without weight decay and at
/// half the learning rate), params and grads in the config's dtypes.
struct Q8Model {
    optimizer: Optimizer,
    params: Vec<wgpu::Buffer>,
    grads: Vec<wgpu::Buffer>,
    /// Each tensor's buffer (index into params and grads) and element offset in it.
    at: Vec<(usize, u64)>,
    sizes: Vec<u64>,
    grad_dtype: Storage,
}

impl Q8Model {
    fn new(config: &Config, flat: bool, init: &[Vec<f32>]) -> Q8Model {
        let device = &gpu().0;
        let (pd, gd) = (config.param_dtype, config.grad_dtype);
        let sizes: Vec<u64> = init.iter().map(|p| p.len() as u64).collect();
        let name = |i: usize| format!("block{i}.weight");
        let (params, grads, at, optimizer) = if flat {
            let (mut offsets, mut end) = (Vec::new(), 2u64);
            for (i, &s) in sizes.iter().enumerate() {
                offsets.push(end);
                end = (end + s + 2 + i as u64).next_multiple_of(2);
            }
            let (param, grad) = (buffer_of(pd, end), buffer_of(gd, end));
            let tensors = (0..sizes.len())
                .map(|i| FlatTensor::new(name(i), offsets[i], sizes[i]).in_group(i % 2))
                .collect();
            let flat = FlatParameters::new(
                BufferView::new(&param, 0, end),
                BufferView::new(&grad, 0, end),
                tensors,
            );
            let second = config.clone().weight_decay(0.0).lr(config.lr / 2.0);
            let groups = [config.clone(), second];
            let optimizer =
                Optimizer::with_groups(device, &groups, &[], &[flat], Default::default()).unwrap();
            let at = offsets.into_iter().map(|o| (0, o)).collect();
            (vec![param], vec![grad], at, optimizer)
        } else {
            let params: Vec<_> = sizes.iter().map(|&s| buffer_of(pd, s)).collect();
            let grads: Vec<_> = sizes.iter().map(|&s| buffer_of(gd, s)).collect();
            let parameters: Vec<Parameter> = (0..sizes.len())
                .map(|i| {
                    Parameter::new(
                        name(i),
                        BufferView::new(&params[i], 0, sizes[i]),
                        BufferView::new(&grads[i], 0, sizes[i]),
                    )
                })
                .collect();
            let optimizer = Optimizer::new(device, config.clone(), &parameters).unwrap();
            let at = (0..sizes.len()).map(|i| (i, 0)).collect();
            (params, grads, at, optimizer)
        };
        let model = Q8Model {
            optimizer,
            params,
            grads,
            at,
            sizes,
            grad_dtype: gd,
        };
        for (i, p) in init.iter().enumerate() {
            let (b, offset) = model.at[i];
            // Even offsets: a 16-bit tensor starts on a word; its padding half lands in a gap.
            let bytes = bytemuck::cast_slice(&encode(pd, p)).to_vec();
            gpu()
                .1
                .write_buffer(&model.params[b], offset * pd.bytes(), &bytes);
        }
        model
    }

    fn step(&mut self, grads: Grads) {
        let t = self.optimizer.step_count() + 1;
        for (i, &len) in self.sizes.iter().enumerate() {
            let (b, offset) = self.at[i];
            let words = encode(self.grad_dtype, &grads(t, i, len));
            let at = offset * self.grad_dtype.bytes();
            gpu()
                .1
                .write_buffer(&self.grads[b], at, bytemuck::cast_slice(&words));
        }
        let (device, queue) = gpu();
        self.optimizer.step_blocking(device, queue).unwrap();
    }

    /// The parameter buffers' words, whole.
    fn param_words(&self) -> Vec<Vec<u32>> {
        self.params
            .iter()
            .map(|b| bits(&read(b, 0, b.size() / 4)))
            .collect()
    }

    fn set_param_words(&self, words: &[Vec<u32>]) {
        for (b, w) in self.params.iter().zip(words) {
            write_words(b, w);
        }
    }

    /// Every tensor's state (q8 dequantised) and its q8 states as stored.
    #[allow(clippy::type_complexity)]
    fn states(&self) -> Vec<(TensorState, Vec<(String, Vec<u32>, Vec<u8>)>)> {
        let (device, queue) = gpu();
        let kinds = q8_kinds(self.optimizer.config());
        (0..self.sizes.len())
            .map(|i| {
                let state = self
                    .optimizer
                    .read_state_blocking(device, queue, i)
                    .unwrap();
                let q8 = kinds
                    .iter()
                    .map(|&k| {
                        let q = self.optimizer.read_q8_state_blocking(device, queue, i, k);
                        q8_bits(&q.unwrap())
                    })
                    .collect();
                (state, q8)
            })
            .collect()
    }
}

/// The file `model` saved to `path`: each q8 state as U8 codes (`[len]`) equal to the
/// optimizer's and F32 absmax (`[blocks]`) with the optimizer's bits, no F32 copy of it, and
/// `q8_maps` naming each q8 state's map.
fn check_q8_layout(case: &str, model: &Q8Model, path: &Path) -> Vec<String> {
    let (device, queue) = gpu();
    let raw = Raw::read(path);
    let config = model.optimizer.config();
    let kinds = q8_kinds(config);
    let mut errors = Vec::new();
    for (i, info) in model.optimizer.tensors().iter().enumerate() {
        let name = &info.name;
        for &kind in &kinds {
            let q = model
                .optimizer
                .read_q8_state_blocking(device, queue, i, kind)
                .unwrap();
            let (codes, absmax) = (format!("{kind}.{name}"), format!("{kind}_absmax.{name}"));
            let want_codes = (Dtype::U8, vec![info.len as usize], q.codes.clone());
            if raw.tensors.get(&codes) != Some(&want_codes) {
                errors.push(format!("{case}: {codes} is not the U8 codes"));
            }
            let absmax_bytes: Vec<u8> = q.absmax.iter().flat_map(|a| a.to_le_bytes()).collect();
            let want_absmax = (Dtype::F32, vec![q.absmax.len()], absmax_bytes);
            if raw.tensors.get(&absmax) != Some(&want_absmax) {
                errors.push(format!("{case}: {absmax} is not the absmax"));
            }
            if q.absmax.len() as u64 != info.len.div_ceil(256) {
                errors.push(format!("{case}: {} blocks for {name}", q.absmax.len()));
            }
        }
    }
    let want: serde_json::Value = kinds
        .iter()
        .map(|&k| {
            let map = if k == "exp_avg" {
                "dynamic_signed"
            } else {
                "dynamic_unsigned"
            };
            (k.to_string(), serde_json::Value::from(map))
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let got = raw
        .metadata
        .get("q8_maps")
        .map(|t| serde_json::from_str(t).unwrap());
    if got != Some(want.clone()) {
        errors.push(format!("{case}: q8_maps is {got:?}, want {want}"));
    }
    // Nothing else: the state tensors, each q8 one's absmax, the steps.
    let mut expected = Vec::new();
    for info in model.optimizer.tensors() {
        let mut states = vec!["exp_avg", "exp_avg_sq"];
        if config.amsgrad {
            states.push("max_exp_avg_sq");
        }
        if config.keeps_master() {
            states.push("master_param");
        }
        for kind in states {
            expected.push(format!("{kind}.{}", info.name));
            if kinds.contains(&kind) {
                expected.push(format!("{kind}_absmax.{}", info.name));
            }
        }
        expected.push(format!("step.{}", info.name));
    }
    expected.sort();
    let have: Vec<String> = raw.tensors.keys().cloned().collect();
    if have != expected {
        errors.push(format!("{case}: the file has {have:?}, want {expected:?}"));
    }
    errors
}

/// N steps, save, load into a fresh optimizer over a copy of the saved run's parameters, M
/// more steps: the same parameter bytes, states (q8 codes and absmax included) and status as
/// N + M steps without the break.
fn check_q8_resume(
    case: &str,
    config: &Config,
    flat: bool,
    grads: Grads,
    dir: &Path,
) -> Vec<String> {
    let (device, queue) = gpu();
    let (n, m) = (5, 4);
    let sizes = [1usize, 255, 257, 65537];
    let start = init(&sizes, 30);
    let run = |steps: u64| {
        let mut model = Q8Model::new(config, flat, &start);
        for _ in 0..steps {
            model.step(grads);
        }
        model
    };
    let case = format!("{case} ({})", if flat { "flat" } else { "separate" });
    let mut errors = Vec::new();
    let straight = run(n + m);
    let first = run(n);
    let path = dir.join(format!(
        "{}.safetensors",
        case.replace([' ', ',', '(', ')'], "_")
    ));
    checkpoint::save(&first.optimizer, device, queue, &path).unwrap();
    errors.extend(check_q8_layout(&case, &first, &path));

    let mut resumed = Q8Model::new(config, flat, &init(&sizes, 31));
    resumed.set_param_words(&first.param_words());
    checkpoint::load(&mut resumed.optimizer, queue, &path).unwrap();
    if resumed.optimizer.step_count() != n {
        errors.push(format!(
            "{case}: step count {}",
            resumed.optimizer.step_count()
        ));
    }
    let saved = first.states();
    for (i, (a, b)) in resumed.states().iter().zip(&saved).enumerate() {
        if !same_bits(&a.0, &b.0) || a.1 != b.1 {
            errors.push(format!(
                "{case}: the state of tensor {i} loaded is not the one saved"
            ));
        }
    }
    for _ in 0..m {
        resumed.step(grads);
    }
    if resumed.param_words() != straight.param_words() {
        errors.push(format!("{case}: the parameters' bytes differ"));
    }
    for (i, (a, b)) in resumed.states().iter().zip(straight.states()).enumerate() {
        if !same_bits(&a.0, &b.0) {
            errors.push(format!("{case}: the state of tensor {i} differs"));
        }
        if a.1 != b.1 {
            errors.push(format!(
                "{case}: the q8 codes or absmax of tensor {i} differ"
            ));
        }
    }
    let status = |model: &Q8Model| {
        let s = model.optimizer.read_status_blocking(device, queue).unwrap();
        (s.applied_steps, s.loss_scale, s.growth_tracker)
    };
    if status(&resumed) != status(&straight) {
        errors.push(format!("{case}: t, S and growth tracker differ"));
    }
    errors
}

#[test]
fn q8_states_resume_bit_exact() {
    // m, v, or both in q8, with amsgrad, beside 16-bit states and parameters with master
    // weights, and with the pass before the step; separate buffers and a flat buffer in two
    // groups; tensors of 1, 255, 257 and 65537 elements (one partial block, a full one and a
    // bit, 257 blocks).
    use Rounding::Nearest;
    let (f, b, q) = (Storage::F32, Storage::Bf16, Storage::Q8);
    let adam = Config::adam().weight_decay(0.02);
    let adamw = Config::adamw().lr(1e-3).weight_decay(0.1);
    let cases: Vec<(&str, Config, Grads)> = vec![
        (
            "m q8",
            stored(adamw.clone(), [f, f, q, f], false, Nearest),
            grads,
        ),
        (
            "v q8",
            stored(adam.clone(), [f, f, f, q], false, Nearest),
            grads,
        ),
        (
            "m and v q8",
            stored(adamw.clone(), [f, f, q, q], false, Nearest),
            grads,
        ),
        (
            "m and v q8, amsgrad",
            stored(adam.clone().amsgrad(true), [f, f, q, q], false, Nearest),
            grads,
        ),
        (
            "v q8, amsgrad, bf16 m, params and grads with master weights",
            stored(adamw.amsgrad(true), [b, b, b, q], true, Nearest),
            grads,
        ),
        (
            "m and v q8 with loss scaling and clipping (t, S on the device)",
            stored(
                adam.clone()
                    .loss_scale(Some(
                        LossScale::default().init_scale(256.0).growth_interval(2),
                    ))
                    .max_grad_norm(Some(0.5)),
                [f, f, q, q],
                false,
                Nearest,
            ),
            grads,
        ),
    ];
    let dir = scratch("resume-q8");
    let mut errors = Vec::new();
    for (case, config, grads) in &cases {
        for flat in [false, true] {
            errors.extend(check_q8_resume(case, config, flat, *grads, &dir));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn q8_state_needs_its_codes_to_resume() {
    // Why the codes and absmax are saved: quantising the dequantised values again moves a
    // block's absmax wherever its largest magnitude is negative (the signed map has no -1, so
    // that value is stored as -0.99.. absmax). load_state does that; load_q8_state does not.
    let (device, queue) = gpu();
    let q = Storage::Q8;
    let config = stored(
        Config::adamw(),
        [Storage::F32, Storage::F32, q, q],
        false,
        Rounding::Nearest,
    );
    let start = init(&[65537], 40);
    let mut model = Q8Model::new(&config, false, &start);
    for _ in 0..3 {
        model.step(grads);
    }
    let state = model
        .optimizer
        .read_state_blocking(device, queue, 0)
        .unwrap();
    let raw = model
        .optimizer
        .read_q8_state_blocking(device, queue, 0, "exp_avg")
        .unwrap();
    let mut fresh = Q8Model::new(&config, false, &start);
    fresh.optimizer.load_state(queue, 0, &state).unwrap();
    let requantised = fresh
        .optimizer
        .read_q8_state_blocking(device, queue, 0, "exp_avg")
        .unwrap();
    let moved = (raw.absmax.iter().zip(&requantised.absmax))
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert!(moved > 10, "only {moved} of 257 blocks moved their absmax");
    fresh
        .optimizer
        .load_q8_state(queue, 0, "exp_avg", &raw)
        .unwrap();
    let back = fresh
        .optimizer
        .read_q8_state_blocking(device, queue, 0, "exp_avg")
        .unwrap();
    assert_eq!(q8_bits(&back), q8_bits(&raw));
    let dequantised = fresh
        .optimizer
        .read_state_blocking(device, queue, 0)
        .unwrap();
    assert_eq!(bits(&dequantised.exp_avg), bits(&state.exp_avg));
}

/// `q8_maps` with q8 v and vmax only.
const V_MAPS: &str = r#"{"exp_avg_sq": "dynamic_unsigned", "max_exp_avg_sq": "dynamic_unsigned"}"#;

/// Sets tensor `name` to U8 bytes of `shape` (codes).
fn set_u8(raw: &mut Raw, name: &str, shape: &[usize], data: &[u8]) {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    raw.tensors
        .insert(name.to_string(), (Dtype::U8, shape.to_vec(), data.to_vec()));
}

#[test]
fn q8_mismatches_are_refused_and_the_optimizer_is_untouched() {
    // A checkpoint with m and v in q8 and amsgrad; wrong maps, codes of the wrong dtype or
    // length, absmax of the wrong dtype, length or sign, q8 tensors where the config has none
    // and f32 ones where it has q8: each refused with its own error, nothing written. Then the
    // state I/O's own checks.
    let (device, queue) = gpu();
    let (f, q) = (Storage::F32, Storage::Q8);
    let config = stored(
        Config::adam().amsgrad(true).lr(0.01),
        [f, f, q, q],
        false,
        Rounding::Nearest,
    );
    let sizes = [300usize, 3];
    let names = ["block0.weight", "block1.weight"];
    let mut source = Q8Model::new(&config, false, &init(&sizes, 1));
    for _ in 0..3 {
        source.step(grads);
    }
    let good = Checkpoint::capture(&source.optimizer, device, queue)
        .unwrap()
        .to_bytes()
        .unwrap();
    let mut victim = Q8Model::new(&config, false, &init(&sizes, 2));
    for _ in 0..2 {
        victim.step(|t, i, len| grads(t + 10, i, len));
    }
    let before = (
        victim.states(),
        victim.optimizer.step_count(),
        victim.optimizer.lr(),
    );
    let mut failures = Vec::new();
    let mut attempt =
        |what: &str, result: Result<(), Error>, expected: &dyn Fn(&Error) -> bool| match result {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(e) if expected(&e) => eprintln!("{what}: {e}"),
            Err(e) => failures.push(format!("{what}: unexpected error {e:?}")),
        };

    let corruptions: Vec<Corruption> = vec![
        (
            "a wrong map name",
            |raw| {
                raw.metadata.insert(
                    "q8_maps".into(),
                    r#"{"exp_avg": "dynamic_unsigned", "exp_avg_sq": "dynamic_unsigned", "max_exp_avg_sq": "dynamic_unsigned"}"#.into(),
                );
            },
            |e| matches!(e, Error::InvalidMetadata { key: "q8_maps", value, .. } if value.contains("\"exp_avg\": \"dynamic_unsigned\"")),
        ),
        (
            "an unknown map",
            |raw| {
                raw.metadata.insert(
                    "q8_maps".into(),
                    r#"{"exp_avg": "linear", "exp_avg_sq": "dynamic_unsigned", "max_exp_avg_sq": "dynamic_unsigned"}"#.into(),
                );
            },
            |e| matches!(e, Error::InvalidMetadata { key: "q8_maps", .. }),
        ),
        (
            "a q8 state's map missing",
            |raw| {
                raw.metadata.insert(
                    "q8_maps".into(),
                    r#"{"exp_avg": "dynamic_signed", "exp_avg_sq": "dynamic_unsigned"}"#.into(),
                );
            },
            |e| matches!(e, Error::InvalidMetadata { key: "q8_maps", .. }),
        ),
        (
            "no q8_maps",
            |raw| {
                raw.metadata.remove("q8_maps");
            },
            |e| matches!(e, Error::MissingMetadata { key: "q8_maps", .. }),
        ),
        (
            "codes in F32",
            |raw| retag(raw, "exp_avg.block0.weight", Dtype::F32),
            |e| matches!(e, Error::DType { tensor, dtype, expected } if tensor == "exp_avg.block0.weight" && dtype == "F32" && expected.contains("U8") && expected.contains("exp_avg_dtype")),
        ),
        (
            "codes in I8",
            |raw| retag(raw, "max_exp_avg_sq.block1.weight", Dtype::I8),
            |e| matches!(e, Error::DType { tensor, dtype, .. } if tensor == "max_exp_avg_sq.block1.weight" && dtype == "I8"),
        ),
        (
            "codes of another length than exp_avg's",
            |raw| set_u8(raw, "exp_avg_sq.block1.weight", &[4], &[0; 4]),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "exp_avg_sq.block1.weight"),
        ),
        (
            "absmax of the wrong length",
            |raw| raw.set_f32("exp_avg_absmax.block0.weight", &[3], &[1.0; 3]),
            |e| matches!(e, Error::Shape { tensor, shape, .. } if tensor == "exp_avg_absmax.block0.weight" && shape == &[3]),
        ),
        (
            "absmax of two dimensions",
            |raw| raw.set_f32("exp_avg_sq_absmax.block0.weight", &[1, 2], &[1.0; 2]),
            |e| matches!(e, Error::Shape { tensor, .. } if tensor == "exp_avg_sq_absmax.block0.weight"),
        ),
        (
            "absmax in BF16",
            |raw| retag(raw, "exp_avg_absmax.block1.weight", Dtype::BF16),
            |e| matches!(e, Error::DType { tensor, dtype, .. } if tensor == "exp_avg_absmax.block1.weight" && dtype == "BF16"),
        ),
        (
            "absmax negative",
            |raw| raw.set_f32("max_exp_avg_sq_absmax.block0.weight", &[2], &[1.0, -2.0]),
            |e| matches!(e, Error::TensorValue { tensor, index: 1, .. } if tensor == "max_exp_avg_sq_absmax.block0.weight"),
        ),
        (
            "absmax missing",
            |raw| {
                raw.tensors.remove("exp_avg_sq_absmax.block1.weight");
            },
            |e| matches!(e, Error::MissingTensor { tensor, .. } if tensor == "exp_avg_sq_absmax.block1.weight"),
        ),
        (
            "q8 tensors, the config says f32",
            |raw| {
                set_config(raw, "exp_avg_dtype", "f32".into());
                raw.metadata.insert("q8_maps".into(), V_MAPS.into());
            },
            |e| matches!(e, Error::DType { tensor, dtype, expected } if tensor == "exp_avg.block0.weight" && dtype == "U8" && expected.starts_with("F32")),
        ),
        (
            "f32 states beside absmax, the config says f32",
            |raw| {
                set_config(raw, "exp_avg_dtype", "f32".into());
                raw.metadata.insert("q8_maps".into(), V_MAPS.into());
                raw.set_f32("exp_avg.block0.weight", &[300], &[0.0; 300]);
                raw.set_f32("exp_avg.block1.weight", &[3], &[0.0; 3]);
            },
            |e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "exp_avg_absmax.block0.weight"),
        ),
        (
            "f32 states without absmax, the config says q8",
            |raw| {
                for kind in STATE_KINDS {
                    raw.tensors.remove(&format!("{kind}_absmax.block1.weight"));
                    raw.set_f32(&format!("{kind}.block1.weight"), &[3], &[0.0; 3]);
                }
            },
            |e| matches!(e, Error::DType { tensor, dtype, .. } if tensor == "exp_avg.block1.weight" && dtype == "F32"),
        ),
    ];
    for (what, corrupt, expected) in corruptions {
        let mut raw = Raw::parse(&good);
        corrupt(&mut raw);
        let result = Checkpoint::from_bytes(&raw.bytes(), "ckpt.safetensors")
            .and_then(|c| c.restore(&mut victim.optimizer, queue));
        attempt(what, result, &expected);
    }

    // Consistent codes of the wrong length for the optimizer (every state of the second
    // tensor, with its absmax): the file is sound, the optimizer refuses it.
    let mut raw = Raw::parse(&good);
    for kind in STATE_KINDS {
        set_u8(&mut raw, &format!("{kind}.block1.weight"), &[4], &[9; 4]);
    }
    let longer = Checkpoint::from_bytes(&raw.bytes(), "ckpt.safetensors").unwrap();
    attempt(
        "codes of another length than the parameter",
        longer.restore(&mut victim.optimizer, queue),
        &|e| matches!(e, Error::Shape { tensor, .. } if tensor == "exp_avg.block1.weight"),
    );

    // Valid checkpoints of an optimizer with other state dtypes.
    let other = |config: Config| {
        let mut m = Q8Model::new(&config, false, &init(&sizes, 3));
        m.step(grads);
        Checkpoint::capture(&m.optimizer, device, queue).unwrap()
    };
    let refusals: Vec<(&str, Config, &str)> = vec![
        (
            "f32 exp_avg",
            config.clone().exp_avg_dtype(f),
            "exp_avg_dtype",
        ),
        (
            "f32 states",
            config.clone().exp_avg_dtype(f).exp_avg_sq_dtype(f),
            "exp_avg_dtype",
        ),
        (
            "bf16 exp_avg_sq",
            config.clone().exp_avg_sq_dtype(Storage::Bf16),
            "exp_avg_sq_dtype",
        ),
    ];
    for (what, other_config, key) in refusals {
        attempt(
            what,
            other(other_config).restore(&mut victim.optimizer, queue),
            &|e| matches!(e, Error::ConfigMismatch { key: k, .. } if *k == key),
        );
    }

    // The state I/O's own checks.
    let saved = source
        .optimizer
        .read_q8_state_blocking(device, queue, 0, "exp_avg")
        .unwrap();
    let load = |victim: &mut Q8Model, index: usize, kind: &str, edit: &dyn Fn(&mut Q8State)| {
        let mut state = saved.clone();
        edit(&mut state);
        victim.optimizer.load_q8_state(queue, index, kind, &state)
    };
    attempt(
        "load_q8_state, another map",
        load(&mut victim, 0, "exp_avg", &|s| {
            s.map = "dynamic_unsigned".into()
        }),
        &|e| matches!(e, Error::Q8Map { tensor, map, expected: "dynamic_signed" } if tensor == "exp_avg.block0.weight" && map == "dynamic_unsigned"),
    );
    attempt(
        "load_q8_state, exp_avg's map for exp_avg_sq",
        load(&mut victim, 0, "exp_avg_sq", &|_| {}),
        &|e| matches!(e, Error::Q8Map { tensor, expected: "dynamic_unsigned", .. } if tensor == "exp_avg_sq.block0.weight"),
    );
    attempt(
        "load_q8_state, a code too many",
        load(&mut victim, 0, "exp_avg", &|s| s.codes.push(0)),
        &|e| matches!(e, Error::Shape { tensor, shape, .. } if tensor == "exp_avg.block0.weight" && shape == &[301]),
    );
    attempt(
        "load_q8_state, another tensor's length",
        load(&mut victim, 1, "exp_avg", &|_| {}),
        &|e| matches!(e, Error::Shape { tensor, .. } if tensor == "exp_avg.block1.weight"),
    );
    attempt(
        "load_q8_state, an absmax too few",
        load(&mut victim, 0, "exp_avg", &|s| {
            s.absmax.pop();
        }),
        &|e| matches!(e, Error::Shape { tensor, shape, .. } if tensor == "exp_avg_absmax.block0.weight" && shape == &[1]),
    );
    attempt(
        "load_q8_state, a negative absmax",
        load(&mut victim, 0, "exp_avg", &|s| s.absmax[0] = -0.0),
        &|e| matches!(e, Error::TensorValue { tensor, index: 0, .. } if tensor == "exp_avg_absmax.block0.weight"),
    );
    attempt(
        "load_q8_state, not a state",
        load(&mut victim, 0, "momentum", &|_| {}),
        &|e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "momentum.block0.weight"),
    );
    attempt(
        "load_q8_state, no such parameter",
        load(&mut victim, 2, "exp_avg", &|_| {}),
        &|e| matches!(e, Error::NoSuchParameter(_)),
    );
    // An optimizer whose m is f32 and that has no amsgrad.
    let mut plain = Q8Model::new(
        &config.clone().exp_avg_dtype(f).amsgrad(false),
        false,
        &init(&sizes, 4),
    );
    attempt(
        "load_q8_state into an f32 state",
        load(&mut plain, 0, "exp_avg", &|_| {}),
        &|e| matches!(e, Error::DType { tensor, dtype, expected } if tensor == "exp_avg.block0.weight" && dtype == "f32" && expected.contains("exp_avg_dtype")),
    );
    attempt(
        "load_q8_state, max_exp_avg_sq without amsgrad",
        load(&mut plain, 0, "max_exp_avg_sq", &|s| {
            s.map = "dynamic_unsigned".into()
        }),
        &|e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "max_exp_avg_sq.block0.weight"),
    );
    attempt(
        "read_q8_state of an f32 state",
        plain
            .optimizer
            .read_q8_state_blocking(device, queue, 0, "exp_avg")
            .map(|_| ()),
        &|e| matches!(e, Error::DType { tensor, .. } if tensor == "exp_avg.block0.weight"),
    );
    attempt(
        "read_q8_state, not a state",
        victim
            .optimizer
            .read_q8_state_blocking(device, queue, 1, "master_param")
            .map(|_| ()),
        &|e| matches!(e, Error::UnexpectedTensor { tensor, .. } if tensor == "master_param.block1.weight"),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing was written: states (codes and absmax included), step and lr as before.
    let after = (
        victim.states(),
        victim.optimizer.step_count(),
        victim.optimizer.lr(),
    );
    assert_eq!((after.1, after.2), (before.1, before.2));
    for (a, b) in after.0.iter().zip(&before.0) {
        assert!(same_bits(&a.0, &b.0));
        assert_eq!(a.1, b.1);
    }
    // And the good file loads: codes and absmax as the source's.
    let loaded = Checkpoint::from_bytes(&good, "good").unwrap();
    assert_eq!(loaded.q8_state(names[0], "exp_avg"), Some(&saved));
    assert_eq!(loaded.q8_state(names[0], "master_param"), None);
    loaded.restore(&mut victim.optimizer, queue).unwrap();
    assert_eq!(victim.optimizer.step_count(), 3);
    for (a, b) in victim.states().iter().zip(source.states()) {
        assert!(same_bits(&a.0, &b.0));
        assert_eq!(a.1, b.1);
    }
}

/// [`grads`], but tensor 3's are around 1e-38: its m holds f32 subnormal values.
fn tiny_grads(t: u64, i: usize, len: u64) -> Vec<f32> {
    let scale = if i == 3 { 1e-38 } else { 1.0 };
    grads(t, i, len).iter().map(|g| g * scale).collect()
}

#[test]
fn q8_states_dequantise_alike_in_python() {
    // scripts/wgpu_optim_q8.py, which scripts/torch_checkpoint.py loads q8 states into torch
    // with, must compute the maps and dequantise a checkpoint's codes and absmax bit for bit as
    // the optimizer does. This writes a checkpoint and the optimizer's own values (and maps),
    // and runs the script's check when python3 is on the PATH (it needs nothing else).
    let (device, queue) = gpu();
    let (f, q) = (Storage::F32, Storage::Q8);
    let config = stored(
        Config::adam().amsgrad(true),
        [f, f, q, q],
        false,
        Rounding::Nearest,
    );
    let mut model = Q8Model::new(&config, false, &init(&[1, 257, 3000, 700], 50));
    for _ in 0..4 {
        model.step(tiny_grads);
    }
    let dir = scratch("q8-python");
    let path = dir.join("q8.safetensors");
    checkpoint::save(&model.optimizer, device, queue, &path).unwrap();
    let mut expected = Raw::default();
    for (i, info) in model.optimizer.tensors().iter().enumerate() {
        let state = model
            .optimizer
            .read_state_blocking(device, queue, i)
            .unwrap();
        let vmax = state.max_exp_avg_sq.unwrap();
        for (kind, values) in [
            ("exp_avg", &state.exp_avg),
            ("exp_avg_sq", &state.exp_avg_sq),
            ("max_exp_avg_sq", &vmax),
        ] {
            expected.set_f32(&format!("{kind}.{}", info.name), &[values.len()], values);
        }
        if i == 3 {
            let subnormal = state.exp_avg.iter().filter(|m| m.is_subnormal()).count();
            assert!(subnormal > 100, "{subnormal} subnormal values in m");
        }
    }
    for signed in [true, false] {
        let map = wgpu_optim::dtype::q8::Map::new(signed);
        expected.set_f32(&format!("map.{}", map.name), &[256], &map.values);
    }
    let expected_path = dir.join("expected.safetensors");
    std::fs::write(&expected_path, expected.bytes()).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/wgpu_optim_q8.py");
    let run = std::process::Command::new("python3")
        .arg(&script)
        .arg("check")
        .arg(&path)
        .arg(&expected_path)
        .output();
    match run {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => eprintln!(
            "python3 is not on the PATH: the Python side did not run (run it by hand: \
             python3 {} check {} {})",
            script.display(),
            path.display(),
            expected_path.display()
        ),
        Err(e) => panic!("running python3: {e}"),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            eprintln!("{text}");
            assert!(out.status.success(), "{text}");
        }
    }
}
