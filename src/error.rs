//! The one error type of the public API.
//!
//! Owns: how every refusal is worded. Every variant names the key, tensor or limit at fault.

/// Everything the public API can refuse. Each variant names the key, tensor or limit at fault,
/// the value it got and what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration key has a value outside its domain (NaN, out of range, wrong type).
    #[error("config key `{key}`: got {value}, expected {expected}")]
    InvalidConfig {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A configuration key that the spec does not define.
    #[error("unknown config key `{key}` (known keys: {known})")]
    UnknownConfigKey { key: String, known: String },
    /// The configuration has no `algorithm`.
    #[error("config key `algorithm` is missing (expected \"adam\", \"adamw\" or \"yogi\")")]
    MissingAlgorithm,
    /// The configuration text is not a JSON object.
    #[error("config is not a JSON object: {0}")]
    ConfigJson(String),
    /// An [`crate::OptimizerOptions`] field or a per-step argument is out of range.
    #[error("option `{name}`: got {value}, expected {expected}")]
    InvalidOption {
        name: &'static str,
        value: String,
        expected: String,
    },
    /// A parameter's `param` and `grad` views differ in length.
    #[error("parameter `{tensor}`: param has {param} elements but grad has {grad}")]
    LengthMismatch {
        tensor: String,
        param: u64,
        grad: u64,
    },
    /// A user buffer was created without a usage the optimizer needs.
    #[error("parameter `{tensor}`: the {which} buffer lacks {needed} usage (it has {has})")]
    MissingUsage {
        tensor: String,
        which: &'static str,
        needed: &'static str,
        has: String,
    },
    /// A view runs past the end of its buffer.
    #[error(
        "parameter `{tensor}`: the {which} view (offset {offset}, {len} elements) ends past its buffer of {buffer_bytes} bytes"
    )]
    OutOfBounds {
        tensor: String,
        which: &'static str,
        offset: u64,
        len: u64,
        buffer_bytes: u64,
    },
    /// With 16-bit storage, a tensor or view that does not start on a 32-bit word (an even
    /// element offset), where two invocations would write one word.
    #[error(
        "parameter `{tensor}`: the {which} starts at element {offset}, but with 16-bit storage ({dtypes}) every view and tensor must start at an even element (a 32-bit word); an Arena places them so"
    )]
    Misaligned {
        tensor: String,
        which: &'static str,
        offset: u64,
        dtypes: String,
    },
    /// `param` and `grad` live in the same buffer, which one dispatch cannot bind both
    /// read-write and read-only.
    #[error(
        "parameter `{tensor}`: param and grad are in the same buffer; give the gradient its own buffer"
    )]
    AliasedBuffers { tensor: String },
    /// The device lacks a limit the optimizer needs. See the README's "Device limits".
    #[error("device limit `{limit}` is {have}, but {need} is needed{context}")]
    DeviceLimit {
        limit: &'static str,
        have: u64,
        need: u64,
        context: String,
    },
    /// Two tensors of a flat buffer share elements.
    #[error("tensors `{first}` and `{second}` of a flat buffer overlap")]
    OverlappingTensors { first: String, second: String },
    /// Parameter groups differ in a key that one kernel must share.
    #[error("parameter group {group} differs from group 0 in `{key}`, which all groups must share")]
    GroupMismatch { group: usize, key: &'static str },
    /// A tensor index or name that the optimizer does not hold.
    #[error("no parameter {0} in this optimizer")]
    NoSuchParameter(String),
    /// Copying a buffer back to the host failed.
    #[error("reading a buffer back from the GPU failed: {0}")]
    Readback(String),
    /// No adapter, or the adapter refused a device (only from [`crate::util`]).
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),
    /// A [`crate::Schedule`] field (its path inside `Sequential`, e.g. `schedules[1].t_max`)
    /// or a schedule constructor's argument is out of range.
    #[error("schedule field `{field}`: got {value}, expected {expected}")]
    InvalidSchedule {
        field: String,
        value: String,
        expected: String,
    },
    /// A file could not be read or written (replay traces and results, checkpoints).
    #[error("{file}: {reason}")]
    Io { file: String, reason: String },
    /// A file is not a safetensors file, or is truncated.
    #[error("{file}: not a valid safetensors file ({reason})")]
    Safetensors { file: String, reason: String },
    /// A metadata key that the file format requires is absent.
    #[error("{file}: metadata key `{key}` is missing (expected {expected})")]
    MissingMetadata {
        file: String,
        key: &'static str,
        expected: &'static str,
    },
    /// A metadata value that does not parse or is out of range.
    #[error("{file}: metadata key `{key}`: got {value}, expected {expected}")]
    InvalidMetadata {
        file: String,
        key: &'static str,
        value: String,
        expected: String,
    },
    /// A tensor that the file format requires is absent.
    #[error("tensor `{tensor}` is missing (expected {expected})")]
    MissingTensor { tensor: String, expected: String },
    /// A tensor that the file format does not define, or that belongs to no parameter.
    #[error("unexpected tensor `{tensor}` (expected {expected})")]
    UnexpectedTensor { tensor: String, expected: String },
    /// A tensor of another dtype than the config gives it (F32 unless `param_dtype`,
    /// `grad_dtype` or a state's dtype say otherwise).
    #[error("tensor `{tensor}` has dtype {dtype}, expected {expected}")]
    DType {
        tensor: String,
        dtype: String,
        expected: String,
    },
    /// A tensor whose shape (or element count) does not fit.
    #[error("tensor `{tensor}` has shape {shape:?}, expected {expected}")]
    Shape {
        tensor: String,
        shape: Vec<usize>,
        expected: String,
    },
    /// A tensor element outside its domain (a NaN gradient, a negative learning rate, a step
    /// that disagrees with the metadata).
    #[error("tensor `{tensor}` element {index} is {value}, expected {expected}")]
    TensorValue {
        tensor: String,
        index: usize,
        value: f32,
        expected: String,
    },
    /// A q8 state given with another quantisation map than the one its state uses
    /// (`"dynamic_signed"` for `exp_avg`, `"dynamic_unsigned"` for `exp_avg_sq` and
    /// `max_exp_avg_sq`).
    #[error("tensor `{tensor}` is quantised with map {map:?}, expected {expected:?}")]
    Q8Map {
        tensor: String,
        map: String,
        expected: &'static str,
    },
    /// A checkpoint's configuration differs from the optimizer's in a key other than `lr`.
    #[error(
        "config key `{key}` differs: the checkpoint has {checkpoint}, the optimizer {optimizer}"
    )]
    ConfigMismatch {
        key: &'static str,
        checkpoint: String,
        optimizer: String,
    },
    /// A checkpoint holds another set of parameters than the optimizer.
    #[error(
        "parameter names differ: the checkpoint has {checkpoint:?}, the optimizer {optimizer:?}"
    )]
    ParameterNames {
        checkpoint: Vec<String>,
        optimizer: Vec<String>,
    },
    /// A check of the library's own work failed (a bug in wgpu-optim, not in the input): please
    /// report it with the message.
    #[error("internal error in wgpu-optim (please report): {0}")]
    Internal(String),
    /// The device refused to create a buffer, pipeline or bind group (out of memory, or a
    /// validation error such as a destroyed user buffer); `what` names the object.
    #[error("creating {what} failed: {reason}")]
    Creation { what: String, reason: String },
    /// Two parameters share a name, which a file keyed by name cannot hold.
    #[error("parameter name `{0}` appears more than once (names must be unique)")]
    DuplicateName(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
