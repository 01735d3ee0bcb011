//! The optimizer's configuration: types, defaults, validation and the JSON form of
//! `docs/semantics.md`.
//!
//! Owns: every key's domain and every refusal of a config. May not touch the GPU.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Which update rule to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Algorithm {
    /// Adam with coupled (L2) weight decay: `g += weight_decay * p` (`torch.optim.Adam`).
    Adam,
    /// Adam with decoupled weight decay: `p *= 1 - lr * weight_decay` (`torch.optim.AdamW`).
    #[serde(rename = "adamw")]
    AdamW,
    /// Yogi: additive second-moment update `v -= (1 - b2) * sign(v - g^2) * g^2`.
    Yogi,
}

/// Where `eps` enters the denominator when bias correction is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EpsMode {
    /// `sqrt(v / bc2 + eps_root) + eps`: the paper, PyTorch, optax. The default.
    Torch,
    /// `sqrt(v + eps_root) + eps` with `sqrt(bc2) / bc1` folded into the learning rate:
    /// MXNet, TensorFlow's ApplyAdam, TF-Addons Yogi.
    Folded,
}

/// The configuration of one optimizer, with the key names of `semantics.md`.
///
/// One step `t = 1, 2, ...` for each element, with learning rate `lr_t`:
///
/// ```text
/// g = grad * rescale_grad
/// if clip_gradient = Some(c):  g = clamp(g, -c, c)
/// if maximize:                 g = -g
/// if weight_decay != 0:
///     Adam, Yogi:  g = g + weight_decay * p               (coupled L2)
///     AdamW:       p = p * (1 - lr_t * weight_decay)      (decoupled)
/// m = b1 * m + (1 - b1) * g                                (exp_avg)
/// Adam, AdamW:  v = b2 * v + (1 - b2) * g^2                (exp_avg_sq)
/// Yogi:         v = v - (1 - b2) * sign(v - g^2) * g^2     (sign(0) = 0)
/// if amsgrad:   vmax = max(vmax, v); use vmax for v below  (max_exp_avg_sq)
/// if bias_correction:  bc1 = 1 - b1^t,  bc2 = 1 - b2^t
///     eps_mode Torch:   p = p - (lr_t / bc1) * m / (sqrt(v / bc2 + eps_root) + eps)
///     eps_mode Folded:  p = p - (lr_t * sqrt(bc2) / bc1) * m / (sqrt(v + eps_root) + eps)
/// else:                 p = p - lr_t * m / (sqrt(v + eps_root) + eps)
/// ```
/// Initial state: `m = 0`, `v = initial_accumulator`, `vmax = 0`, `t = 0`.
///
/// | symbol | field | default |
/// | --- | --- | --- |
/// | | `algorithm` | required |
/// | `lr_t` | `lr` (per step: [`crate::Optimizer::set_lr`]) | 1e-3 (Yogi: 1e-2) |
/// | `b1, b2` | `betas` | `[0.9, 0.999]` |
/// | `eps` | `eps` | 1e-8 (Yogi: 1e-3) |
/// | `eps_root` | `eps_root` | 0 |
/// | | `eps_mode` | `Torch` |
/// | | `weight_decay` | 0 (AdamW: 1e-2) |
/// | | `amsgrad`, `maximize` | false |
/// | | `bias_correction` | true |
/// | | `rescale_grad` | 1 |
/// | `c` | `clip_gradient` | `None` |
/// | | `initial_accumulator` | 0 (Yogi: 1e-6) |
///
/// Differences from torch / optax: none for what torch has (Adam and AdamW with `amsgrad`,
/// `maximize`, `weight_decay`, `eps`; torch's `capturable`, `differentiable`, `foreach` and
/// `fused` choose implementations, not results). `eps_root` is optax's. Hyperparameters are f64
/// on the host like Python floats; the state is f32.
///
/// Build one with [`Config::adam`], [`Config::adamw`] or [`Config::yogi`] and the setters, or
/// from JSON with [`Config::from_json`]. [`Config::validate`] checks every field; the
/// optimizer calls it on construction.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Config {
    pub algorithm: Algorithm,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub eps_root: f64,
    pub eps_mode: EpsMode,
    pub weight_decay: f64,
    pub amsgrad: bool,
    pub maximize: bool,
    pub bias_correction: bool,
    pub rescale_grad: f64,
    pub clip_gradient: Option<f64>,
    pub initial_accumulator: f64,
    /// Optimizer-wide (every group must agree): the gradients arrive multiplied by a loss
    /// scale that the optimizer keeps on the device (`GradScaler`).
    pub loss_scale: Option<LossScale>,
    /// Optimizer-wide: skip an iteration whose unscaled gradient holds a NaN or an infinity,
    /// anywhere in the model (always on with `loss_scale`).
    pub skip_nonfinite: bool,
    /// Optimizer-wide: clip the global L2 norm of the gradient to this (`clip_grad_norm_`).
    pub max_grad_norm: Option<f64>,
    /// Optimizer-wide storage dtypes (`docs/semantics.md`, "Storage dtypes"): the engine's
    /// parameter and gradient buffers (f32, bf16 or f16) and the optimizer's m and v (vmax)
    /// (also q8). Arithmetic is f32 whatever they are.
    #[serde(serialize_with = "dtype_name")]
    pub param_dtype: Dtype,
    #[serde(serialize_with = "dtype_name")]
    pub grad_dtype: Dtype,
    #[serde(serialize_with = "dtype_name")]
    pub exp_avg_dtype: Dtype,
    #[serde(serialize_with = "dtype_name")]
    pub exp_avg_sq_dtype: Dtype,
    /// Optimizer-wide: with 16-bit parameters, step an f32 copy kept in the optimizer's state
    /// and store it rounded to nearest into the engine's buffer. No effect with f32 params.
    pub master_weights: bool,
    /// Optimizer-wide: how an updated 16-bit parameter is rounded without master weights.
    pub rounding: Rounding,
    /// Optimizer-wide: the seed of stochastic rounding's random bits.
    pub seed: u64,
}

/// How an updated value is rounded into a 16-bit parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rounding {
    /// To the nearest value, ties to even.
    #[default]
    Nearest,
    /// To one of the two neighbours, the upper with probability equal to the distance from the
    /// lower over their spacing; the random bits are a fixed hash of (seed, t, element index).
    Stochastic,
}

fn dtype_name<S: serde::Serializer>(dtype: &Dtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(dtype.name())
}

/// Dynamic loss scaling, as torch's `GradScaler` (`docs/semantics.md`, "Before the
/// per-element step").
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct LossScale {
    /// The scale S before the first iteration (> 0).
    pub init_scale: f64,
    /// S is multiplied by this after `growth_interval` iterations in a row without an
    /// overflow (> 1).
    pub growth_factor: f64,
    /// S is multiplied by this after an overflow (in (0, 1)).
    pub backoff_factor: f64,
    /// Iterations without overflow before S grows (>= 1).
    pub growth_interval: u64,
    /// false: S stays at `init_scale`.
    pub dynamic: bool,
}

impl Default for LossScale {
    /// torch's `GradScaler()` defaults.
    fn default() -> Self {
        LossScale {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            dynamic: true,
        }
    }
}

impl LossScale {
    /// The scale S before the first iteration.
    pub fn init_scale(mut self, init_scale: f64) -> Self {
        self.init_scale = init_scale;
        self
    }
    pub fn growth_factor(mut self, growth_factor: f64) -> Self {
        self.growth_factor = growth_factor;
        self
    }
    pub fn backoff_factor(mut self, backoff_factor: f64) -> Self {
        self.backoff_factor = backoff_factor;
        self
    }
    pub fn growth_interval(mut self, growth_interval: u64) -> Self {
        self.growth_interval = growth_interval;
        self
    }
    pub fn dynamic(mut self, dynamic: bool) -> Self {
        self.dynamic = dynamic;
        self
    }
}

/// The fields of `loss_scale`'s JSON object.
pub const LOSS_SCALE_KEYS: [&str; 5] = [
    "init_scale",
    "growth_factor",
    "backoff_factor",
    "growth_interval",
    "dynamic",
];

/// Every key of the JSON form, in the spec's order.
pub const CONFIG_KEYS: [&str; 23] = [
    "algorithm",
    "lr",
    "betas",
    "eps",
    "eps_root",
    "eps_mode",
    "weight_decay",
    "amsgrad",
    "maximize",
    "bias_correction",
    "rescale_grad",
    "clip_gradient",
    "initial_accumulator",
    "loss_scale",
    "skip_nonfinite",
    "max_grad_norm",
    "param_dtype",
    "grad_dtype",
    "exp_avg_dtype",
    "exp_avg_sq_dtype",
    "master_weights",
    "rounding",
    "seed",
];

impl Config {
    /// The spec's defaults for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        let yogi = algorithm == Algorithm::Yogi;
        Config {
            algorithm,
            lr: if yogi { 1e-2 } else { 1e-3 },
            betas: [0.9, 0.999],
            eps: if yogi { 1e-3 } else { 1e-8 },
            eps_root: 0.0,
            eps_mode: EpsMode::Torch,
            weight_decay: if algorithm == Algorithm::AdamW {
                1e-2
            } else {
                0.0
            },
            amsgrad: false,
            maximize: false,
            bias_correction: true,
            rescale_grad: 1.0,
            clip_gradient: None,
            initial_accumulator: if yogi { 1e-6 } else { 0.0 },
            loss_scale: None,
            skip_nonfinite: false,
            max_grad_norm: None,
            param_dtype: Dtype::F32,
            grad_dtype: Dtype::F32,
            exp_avg_dtype: Dtype::F32,
            exp_avg_sq_dtype: Dtype::F32,
            master_weights: false,
            rounding: Rounding::Nearest,
            seed: 0,
        }
    }

    /// `torch.optim.Adam`'s defaults.
    pub fn adam() -> Self {
        Self::new(Algorithm::Adam)
    }

    /// `torch.optim.AdamW`'s defaults.
    pub fn adamw() -> Self {
        Self::new(Algorithm::AdamW)
    }

    /// Yogi's defaults (lr 1e-2, eps 1e-3, initial accumulator 1e-6).
    pub fn yogi() -> Self {
        Self::new(Algorithm::Yogi)
    }

    pub fn lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }
    pub fn betas(mut self, b1: f64, b2: f64) -> Self {
        self.betas = [b1, b2];
        self
    }
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    pub fn eps_root(mut self, eps_root: f64) -> Self {
        self.eps_root = eps_root;
        self
    }
    pub fn eps_mode(mut self, eps_mode: EpsMode) -> Self {
        self.eps_mode = eps_mode;
        self
    }
    pub fn weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }
    pub fn amsgrad(mut self, amsgrad: bool) -> Self {
        self.amsgrad = amsgrad;
        self
    }
    pub fn maximize(mut self, maximize: bool) -> Self {
        self.maximize = maximize;
        self
    }
    pub fn bias_correction(mut self, bias_correction: bool) -> Self {
        self.bias_correction = bias_correction;
        self
    }
    pub fn rescale_grad(mut self, rescale_grad: f64) -> Self {
        self.rescale_grad = rescale_grad;
        self
    }
    pub fn clip_gradient(mut self, clip_gradient: Option<f64>) -> Self {
        self.clip_gradient = clip_gradient;
        self
    }
    pub fn initial_accumulator(mut self, initial_accumulator: f64) -> Self {
        self.initial_accumulator = initial_accumulator;
        self
    }
    pub fn loss_scale(mut self, loss_scale: Option<LossScale>) -> Self {
        self.loss_scale = loss_scale;
        self
    }
    pub fn skip_nonfinite(mut self, skip_nonfinite: bool) -> Self {
        self.skip_nonfinite = skip_nonfinite;
        self
    }
    pub fn max_grad_norm(mut self, max_grad_norm: Option<f64>) -> Self {
        self.max_grad_norm = max_grad_norm;
        self
    }

    pub fn param_dtype(mut self, dtype: Dtype) -> Self {
        self.param_dtype = dtype;
        self
    }
    pub fn grad_dtype(mut self, dtype: Dtype) -> Self {
        self.grad_dtype = dtype;
        self
    }
    pub fn exp_avg_dtype(mut self, dtype: Dtype) -> Self {
        self.exp_avg_dtype = dtype;
        self
    }
    pub fn exp_avg_sq_dtype(mut self, dtype: Dtype) -> Self {
        self.exp_avg_sq_dtype = dtype;
        self
    }
    pub fn master_weights(mut self, master_weights: bool) -> Self {
        self.master_weights = master_weights;
        self
    }
    pub fn rounding(mut self, rounding: Rounding) -> Self {
        self.rounding = rounding;
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Whether the parameters are 16-bit and kept as an f32 copy in the optimizer's state.
    pub fn keeps_master(&self) -> bool {
        self.master_weights && self.param_dtype != Dtype::F32
    }

    /// Whether updated parameters are rounded stochastically (16-bit, no master weights).
    pub fn rounds_stochastically(&self) -> bool {
        self.rounding == Rounding::Stochastic
            && self.param_dtype != Dtype::F32
            && !self.keeps_master()
    }

    /// Whether an iteration can be skipped on the device (`loss_scale` or `skip_nonfinite`):
    /// then the step count lives on the device.
    pub fn skips(&self) -> bool {
        self.loss_scale.is_some() || self.skip_nonfinite
    }

    /// Whether an iteration needs the pass over every gradient before the step (found_inf,
    /// the global norm).
    pub fn has_pre_step(&self) -> bool {
        self.skips() || self.max_grad_norm.is_some()
    }

    /// Checks every field against its domain; the error names the first bad key.
    pub fn validate(&self) -> Result<()> {
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        let positive = |x: f64| x.is_finite() && x > 0.0;
        check_lr(self.lr)?;
        for b in self.betas {
            check("betas", b, |b| (0.0..1.0).contains(&b))?;
        }
        check("eps", self.eps, non_negative)?;
        check("eps_root", self.eps_root, non_negative)?;
        check("weight_decay", self.weight_decay, non_negative)?;
        check("rescale_grad", self.rescale_grad, positive)?;
        if let Some(c) = self.clip_gradient {
            check("clip_gradient", c, positive)?;
        }
        check(
            "initial_accumulator",
            self.initial_accumulator,
            non_negative,
        )?;
        if let Some(c) = self.max_grad_norm {
            check("max_grad_norm", c, positive)?;
        }
        // q8 is block-wise optimizer state: the engine's buffers cannot be stored so.
        for (key, dtype) in [
            ("param_dtype", self.param_dtype),
            ("grad_dtype", self.grad_dtype),
        ] {
            if dtype == Dtype::Q8 {
                return Err(Error::InvalidConfig {
                    key,
                    value: "\"q8\"".into(),
                    expected: expected(key),
                });
            }
        }
        if let Some(ls) = &self.loss_scale {
            // The device keeps S and 1/S in f32: both must be finite and > 0 there.
            check("loss_scale.init_scale", ls.init_scale, |x| {
                let s = x as f32;
                x.is_finite() && s.is_finite() && s > 0.0 && (1.0 / s).is_finite()
            })?;
            check("loss_scale.growth_factor", ls.growth_factor, |x| {
                x.is_finite() && x > 1.0
            })?;
            check("loss_scale.backoff_factor", ls.backoff_factor, |x| {
                x > 0.0 && x < 1.0
            })?;
            check(
                "loss_scale.growth_interval",
                ls.growth_interval as f64,
                |x| x >= 1.0,
            )?;
        }
        Ok(())
    }

    /// Parses the JSON form (an object with the spec's keys; missing keys take the defaults of
    /// the algorithm) and validates it. A value that is not valid JSON, or a number too large
    /// for f64 (`1e999`), is refused naming its key, as is a key given twice.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_json_map(&parse_object(text, "")?)
    }

    /// As [`Config::from_json`], from an already parsed object.
    pub fn from_json_map(map: &Map<String, Value>) -> Result<Self> {
        if let Some(key) = map.keys().find(|k| !CONFIG_KEYS.contains(&k.as_str())) {
            return Err(unknown_key(key));
        }
        let algorithm = match map.get("algorithm") {
            None => return Err(Error::MissingAlgorithm),
            Some(v) => parse::<Algorithm>("algorithm", v)?,
        };
        let mut c = Config::new(algorithm);
        for (key, v) in map {
            match key.as_str() {
                "lr" => c.lr = parse("lr", v)?,
                "betas" => c.betas = parse("betas", v)?,
                "eps" => c.eps = parse("eps", v)?,
                "eps_root" => c.eps_root = parse("eps_root", v)?,
                "eps_mode" => c.eps_mode = parse("eps_mode", v)?,
                "weight_decay" => c.weight_decay = parse("weight_decay", v)?,
                "amsgrad" => c.amsgrad = parse("amsgrad", v)?,
                "maximize" => c.maximize = parse("maximize", v)?,
                "bias_correction" => c.bias_correction = parse("bias_correction", v)?,
                "rescale_grad" => c.rescale_grad = parse("rescale_grad", v)?,
                "clip_gradient" => c.clip_gradient = parse("clip_gradient", v)?,
                "initial_accumulator" => c.initial_accumulator = parse("initial_accumulator", v)?,
                "loss_scale" => c.loss_scale = parse_loss_scale(v)?,
                "skip_nonfinite" => c.skip_nonfinite = parse("skip_nonfinite", v)?,
                "max_grad_norm" => c.max_grad_norm = parse("max_grad_norm", v)?,
                "param_dtype" => c.param_dtype = parse_dtype("param_dtype", v)?,
                "grad_dtype" => c.grad_dtype = parse_dtype("grad_dtype", v)?,
                "exp_avg_dtype" => c.exp_avg_dtype = parse_dtype("exp_avg_dtype", v)?,
                "exp_avg_sq_dtype" => c.exp_avg_sq_dtype = parse_dtype("exp_avg_sq_dtype", v)?,
                "master_weights" => c.master_weights = parse("master_weights", v)?,
                "rounding" => c.rounding = parse("rounding", v)?,
                "seed" => c.seed = parse("seed", v)?,
                _ => {} // "algorithm", read above
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The JSON form with every key present (the effective configuration).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Config always serializes")
    }
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(deserializer)?;
        Config::from_json_map(&map).map_err(serde::de::Error::custom)
    }
}

/// A JSON object as a map, with every failure after the opening brace pinned to its key: the
/// values are first taken as raw text (so a syntax error is caught while the key is known),
/// then parsed one by one (so `1e999`, out of f64's range, is refused naming its key).
/// `prefix` is `""` for the config, `"loss_scale."` for the object inside it (whose fields'
/// errors are named `loss_scale.<field>`).
fn parse_object(text: &str, prefix: &str) -> Result<Map<String, Value>> {
    let current = std::cell::RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = serde::de::DeserializeSeed::deserialize(RawEntries(&current), &mut de)
        .and_then(|entries| de.end().map(|()| entries));
    let entries = entries.map_err(|e| match current.take() {
        Some(key) => invalid_value(&format!("{prefix}{key}"), format!("malformed JSON ({e})")),
        None if prefix.is_empty() => Error::ConfigJson(e.to_string()),
        None => invalid_value(
            prefix.trim_end_matches('.'),
            format!("malformed JSON ({e})"),
        ),
    })?;
    let mut map = Map::new();
    for (key, raw) in entries {
        let full = format!("{prefix}{key}");
        let value = if full == "loss_scale" && raw.get().trim_start().starts_with('{') {
            Value::Object(parse_object(raw.get(), "loss_scale.")?)
        } else {
            serde_json::from_str(raw.get())
                .map_err(|e| invalid_value(&full, format!("{} ({e})", raw.get())))?
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(invalid_value(
                &full,
                "a second value for the same key".into(),
            ));
        }
    }
    Ok(map)
}

/// The fields of `loss_scale` by their full names, as errors name them.
const LOSS_SCALE_FIELDS: [&str; 5] = [
    "loss_scale.init_scale",
    "loss_scale.growth_factor",
    "loss_scale.backoff_factor",
    "loss_scale.growth_interval",
    "loss_scale.dynamic",
];

/// The error for a value of `key` (a full name) that does not parse: an unknown key is
/// reported as such.
fn invalid_value(key: &str, value: String) -> Error {
    match CONFIG_KEYS
        .iter()
        .chain(&LOSS_SCALE_FIELDS)
        .find(|&&k| k == key)
    {
        Some(&key) => Error::InvalidConfig {
            key,
            value,
            expected: expected(key),
        },
        None => unknown_key(key),
    }
}

fn unknown_key(key: &str) -> Error {
    let known = match key.strip_prefix("loss_scale.") {
        Some(_) => LOSS_SCALE_FIELDS.join(", "),
        None => CONFIG_KEYS.join(", "),
    };
    Error::UnknownConfigKey {
        key: key.to_string(),
        known,
    }
}

/// Deserializes a JSON object into its entries with raw values, recording in `.0` the key
/// whose value is being read, so that an error can name it.
struct RawEntries<'a>(&'a std::cell::RefCell<Option<String>>);

type Entries = Vec<(String, Box<serde_json::value::RawValue>)>;

impl<'de> serde::de::DeserializeSeed<'de> for RawEntries<'_> {
    type Value = Entries;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Entries, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RawEntries<'_> {
    type Value = Entries;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
        let mut entries = Vec::new();
        // The key stays recorded until the next one: an error just after a value (`0.1.2`, a
        // missing comma) is still about that value.
        while let Some(key) = map.next_key::<String>()? {
            *self.0.borrow_mut() = Some(key.clone());
            let value = map.next_value()?;
            entries.push((key, value));
        }
        *self.0.borrow_mut() = None;
        Ok(entries)
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &'static str, v: &Value) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|_| Error::InvalidConfig {
        key,
        value: v.to_string(),
        expected: expected(key),
    })
}

/// A dtype key: one of the names of [`Dtype`] (the domain check, q8 for buffers the engine
/// owns, is [`Config::validate`]'s).
fn parse_dtype(key: &'static str, v: &Value) -> Result<Dtype> {
    v.as_str()
        .and_then(Dtype::parse)
        .ok_or_else(|| Error::InvalidConfig {
            key,
            value: v.to_string(),
            expected: expected(key),
        })
}

/// `loss_scale`: null, or an object of [`LOSS_SCALE_KEYS`] (missing ones take torch's
/// defaults); each bad field is named `loss_scale.<field>`.
fn parse_loss_scale(v: &Value) -> Result<Option<LossScale>> {
    let map = match v {
        Value::Null => return Ok(None),
        Value::Object(map) => map,
        _ => return Err(invalid_value("loss_scale", v.to_string())),
    };
    if let Some(key) = map.keys().find(|k| !LOSS_SCALE_KEYS.contains(&k.as_str())) {
        return Err(unknown_key(&format!("loss_scale.{key}")));
    }
    let mut ls = LossScale::default();
    for (key, v) in map {
        match key.as_str() {
            "init_scale" => ls.init_scale = parse("loss_scale.init_scale", v)?,
            "growth_factor" => ls.growth_factor = parse("loss_scale.growth_factor", v)?,
            "backoff_factor" => ls.backoff_factor = parse("loss_scale.backoff_factor", v)?,
            // serde refuses `2000.0` and `-1` for a u64: an integer without fraction.
            "growth_interval" => ls.growth_interval = parse("loss_scale.growth_interval", v)?,
            _ => ls.dynamic = parse("loss_scale.dynamic", v)?,
        }
    }
    Ok(Some(ls))
}

/// Each key's domain, in words: the `expected` of every error about it.
fn expected(key: &str) -> &'static str {
    match key {
        "loss_scale" => {
            "null or an object with init_scale, growth_factor, backoff_factor, growth_interval, dynamic"
        }
        "loss_scale.init_scale" => "a finite number > 0 whose f32 and reciprocal are finite",
        "loss_scale.growth_factor" => "a finite number > 1",
        "loss_scale.backoff_factor" => "a number in (0, 1)",
        "loss_scale.growth_interval" => "an integer >= 1 (a JSON number without fraction)",
        "skip_nonfinite" | "loss_scale.dynamic" => "true or false",
        "max_grad_norm" => "null or a finite number > 0",
        "param_dtype" | "grad_dtype" => "one of \"f32\", \"bf16\", \"f16\"",
        "exp_avg_dtype" | "exp_avg_sq_dtype" => "one of \"f32\", \"bf16\", \"f16\", \"q8\"",
        "master_weights" => "true or false",
        "rounding" => "\"nearest\" or \"stochastic\"",
        "seed" => "an integer in [0, 2^64) (a JSON number without fraction)",
        "algorithm" => "one of \"adam\", \"adamw\", \"yogi\"",
        "lr" => LR_DOMAIN,
        "betas" => "[b1, b2], each in [0, 1)",
        "eps_mode" => "\"torch\" or \"folded\"",
        "amsgrad" | "maximize" | "bias_correction" => "true or false",
        "rescale_grad" => "a finite number > 0",
        "clip_gradient" => "null or a finite number > 0",
        _ => "a finite number >= 0", // eps, eps_root, weight_decay, initial_accumulator
    }
}

fn check(key: &'static str, x: f64, ok: impl Fn(f64) -> bool) -> Result<()> {
    if ok(x) {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            key,
            value: x.to_string(),
            expected: expected(key),
        })
    }
}

/// The one domain of a learning rate, in the config and per step: finite and >= 0 (torch
/// allows 0, and schedules end there).
pub(crate) fn check_lr(lr: f64) -> Result<()> {
    check("lr", lr, |x| x.is_finite() && x >= 0.0)
}

/// What [`check_lr`] accepts, in words, for every message about a learning rate.
pub(crate) const LR_DOMAIN: &str = "a finite number >= 0";
