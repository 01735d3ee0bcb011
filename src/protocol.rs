//! The protocol between the host and `shaders/adam_family.wgsl`, defined once: the structs
//! both sides read (`StepUniforms`, `Chunk`), the constants (group count, hint window, the
//! whole-block flag), the binding table, and the WGSL prelude generated from them, so that the
//! shader cannot disagree with the host on a number or a binding. Also the host's f64 math for
//! the per-step numbers.
//!
//! Owns: everything both sides must agree on. May not touch: wgpu (see `gpu/`, which builds
//! the bind group layout and every bind group from [`BINDINGS`]).

use bytemuck::{Pod, Zeroable};

use crate::config::{Algorithm, Config, EpsMode};
use crate::dtype::{Dtype, q8};

/// Mirrors `StepUniforms` in `shaders/adam_family.wgsl` field for field (a test checks the
/// offsets with naga). Only 4-byte scalars; padded to a multiple of 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub(crate) struct StepUniforms {
    /// `a_t`: the learning rate with the bias correction folded in.
    pub step_size: f32,
    /// eps as it enters `sqrt(..) + eps` after folding (`eps * sqrt(bc2)` in torch mode).
    pub eps: f32,
    /// eps_root as it enters `sqrt(v + eps_root)` after folding (`eps_root * bc2` in torch mode).
    pub eps_root: f32,
    pub beta1: f32,
    /// `1 - b1`, computed in f64: in f32 inside the shader it would cost precision.
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// `1 - b2`, computed in f64 (in f32, `1 - 0.999` is off by ~1e-5 relative).
    pub one_minus_beta2: f32,
    /// Coupled L2 coefficient (Adam, Yogi); 0 turns the decay off for this group.
    pub weight_decay: f32,
    /// Decoupled decay `lr_t * weight_decay` (AdamW), applied as `p - lr_weight_decay * p`:
    /// as its own f32 it keeps full precision, where `f32(1 - lr_t * wd)` would round it to a
    /// multiple of 2^-24 (19% too strong at 1e-7, nothing under 3e-8). 0: no decay.
    pub lr_weight_decay: f32,
    pub rescale_grad: f32,
    /// Clamp bound `c`, read only when `clips` is 1.
    pub clip_gradient: f32,
    /// 1 when this group clips: in a kernel where another group clips, this one must not.
    pub clips: u32,
    /// With skipping (t on the device): where this group's bias factors start in the table
    /// (u32 index), how many steps they cover, and whether eps and eps_root take them.
    pub bias_base: u32,
    pub bias_len: u32,
    pub eps_scaled: u32,
    /// t as the host counts it (without skipping; wrapping at 2^32): the stochastic rounding
    /// bits' counter, and the first step, where master weights start from the parameters.
    pub step: u32,
}

impl StepUniforms {
    /// The numbers for step `t` (1-based) at learning rate `lr`, as in the spec's "Folding the
    /// bias correction into per-step scalars".
    pub fn new(config: &Config, t: u64, lr: f64) -> Self {
        let [b1, b2] = config.betas;
        let (step_size, eps, eps_root) = if config.bias_correction {
            let bc1 = 1.0 - b1.powf(t as f64);
            let bc2 = 1.0 - b2.powf(t as f64);
            let step_size = lr * bc2.sqrt() / bc1;
            match config.eps_mode {
                EpsMode::Torch => (step_size, config.eps * bc2.sqrt(), config.eps_root * bc2),
                EpsMode::Folded => (step_size, config.eps, config.eps_root),
            }
        } else {
            (lr, config.eps, config.eps_root)
        };
        StepUniforms {
            step_size: step_size as f32,
            eps: eps as f32,
            eps_root: eps_root as f32,
            beta1: b1 as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            weight_decay: config.weight_decay as f32,
            lr_weight_decay: decoupled_decay(config, lr) as f32,
            rescale_grad: config.rescale_grad as f32,
            clip_gradient: config.clip_gradient.unwrap_or(0.0) as f32,
            clips: config.clip_gradient.is_some() as u32,
            bias_base: 0,
            bias_len: 0,
            eps_scaled: 0,
            step: t as u32,
        }
    }

    /// The numbers when t lives on the device (skipping is on): `lr`, `eps` and `eps_root` as
    /// they are, and where the group's bias factors ([`bias_table`]) start in the table and
    /// how many steps they cover; the kernel multiplies them in by the device's t.
    pub fn with_device_step(config: &Config, lr: f64, bias_base: u32, bias_len: u32) -> Self {
        StepUniforms {
            step_size: lr as f32,
            eps: config.eps as f32,
            eps_root: config.eps_root as f32,
            bias_base,
            bias_len,
            eps_scaled: (config.bias_correction && config.eps_mode == EpsMode::Torch) as u32,
            // The rest does not depend on t.
            ..StepUniforms::new(config, 1, lr)
        }
    }
}

/// u32 per step in a group's bias table: the f32 bits of (sqrt(bc2) / bc1, sqrt(bc2), bc2, 0).
pub(crate) const BIAS_ROW: usize = 4;

/// The most steps a bias table covers; past it, the factors are taken as 1 (only b2 above
/// ~0.99998 has factors that still differ from 1 in f32 after 2^20 steps).
pub(crate) const MAX_BIAS_STEPS: u64 = 1 << 20;

/// The bias factors of `config` for t = 1, 2, ... as u32 rows (the f32 bits of
/// `(sqrt(bc2) / bc1, sqrt(bc2), bc2, 0)`, computed in f64 like [`StepUniforms::new`]), up to
/// the first t where all three round to 1 in f32 (from there on they stay 1), at most
/// [`MAX_BIAS_STEPS`]. Empty without bias correction.
pub(crate) fn bias_table(config: &Config) -> Vec<u32> {
    let mut rows = Vec::new();
    if !config.bias_correction {
        return rows;
    }
    let [b1, b2] = config.betas;
    for t in 1..=MAX_BIAS_STEPS {
        let bc1 = 1.0 - b1.powf(t as f64);
        let bc2 = 1.0 - b2.powf(t as f64);
        let row = [(bc2.sqrt() / bc1) as f32, bc2.sqrt() as f32, bc2 as f32];
        if row == [1.0; 3] {
            break;
        }
        rows.extend(row.map(f32::to_bits));
        rows.push(0);
    }
    rows
}

/// Mirrors `DeviceScalars` in the shader: the numbers of an iteration that live on the device
/// (loss scale, clip factor, found_inf, t). `loss_scale` comes first, at offset 0 of the
/// optimizer's device buffer, so that an engine can bind it alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub(crate) struct DeviceScalars {
    pub loss_scale: f32,
    pub inv_scale: f32,
    pub step_inv_scale: f32,
    pub clip_coef: f32,
    pub global_norm: f32,
    pub step: u32,
    pub found_inf: u32,
    pub growth_tracker: u32,
}

/// Bytes of the shader's `Iteration` (and the start of `DeviceState`): the scalars, then each
/// group's bias factors as a vec4.
pub(crate) const ITERATION_BYTES: u64 = (size_of::<DeviceScalars>() + 16 * MAX_GROUPS) as u64;

/// Step workgroups (blocks) one `grad_norm` workgroup covers.
pub(crate) const NORM_BLOCKS: u32 = 16;

/// The largest workgroup the reductions' scratch array holds.
pub(crate) const MAX_WORKGROUP_SIZE: u32 = 1024;

/// AdamW's `lr_t * weight_decay` (0 for Adam and Yogi, whose decay is coupled). The kernel and
/// the CPU reference both take it rounded to f32, as PyTorch's fused kernel does.
pub(crate) fn decoupled_decay(config: &Config, lr: f64) -> f64 {
    match config.algorithm {
        Algorithm::AdamW => lr * config.weight_decay,
        Algorithm::Adam | Algorithm::Yogi => 0.0,
    }
}

/// Parameter groups one optimizer can hold: the shader's `groups` uniform array has this many.
pub const MAX_GROUPS: usize = 16;

/// Mirrors `Chunk` in the shader: which slice of the bound ranges one dispatch updates (in
/// units of the kernel's element type, vec4 or scalar) and where its segment table is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub(crate) struct Chunk {
    pub count: u32,
    pub param_base: u32,
    pub grad_base: u32,
    pub state_base: u32,
    /// The f32 element of the first unit, relative to the segments' origin.
    pub first_element: u32,
    /// Index in the table of this dispatch's first segment (4 u32 each).
    pub segments: u32,
    pub segment_count: u32,
    /// The group of an unsegmented dispatch (one tensor).
    pub group: u32,
    /// `grad_norm`: this dispatch's first entry in the device's partial sums.
    pub partials_base: u32,
    /// An unsegmented dispatch: the index within its tensor of the chunk's element 0
    /// (wrapping), for the stochastic rounding bits.
    pub tensor_element: u32,
    /// Blockwise (q8) dispatches: the q8 binding's block of the dispatch's first block.
    pub block_base: u32,
    pub _pad3: u32,
}

/// Per-workgroup hints one segmented dispatch can have: the shader's `hints` uniform array
/// (64 KiB, wgpu's default `max_uniform_buffer_binding_size`).
pub(crate) const MAX_HINTS: u64 = 16384;

/// In a workgroup's hint: all its elements lie inside one segment, whose index sits above
/// [`GROUP_BITS`] and whose group in them. Otherwise the hint is the index of the first segment
/// that ends past its first element.
pub(crate) const WHOLE_BLOCK: u32 = 1 << 31;

/// Low bits of a whole-block hint that hold the group (`MAX_GROUPS` fits).
pub(crate) const GROUP_BITS: u32 = 4;
const _: () = assert!(MAX_GROUPS <= 1 << GROUP_BITS);

/// Bytes of one dispatch's window of workgroup hints.
pub(crate) const HINTS_BYTES: u64 = MAX_HINTS * 4;

/// Bytes of one step's uniforms: every group's `StepUniforms`.
pub(crate) const GROUPS_BYTES: u64 = (MAX_GROUPS * size_of::<StepUniforms>()) as u64;

/// `u32` per row of the segment table: (start, end, group, index within the tensor of start).
pub(crate) const SEGMENT_ROW: usize = 4;

/// How a binding is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BindingKind {
    /// A uniform buffer of exactly this many bytes.
    Uniform {
        size: u64,
    },
    Storage {
        read_only: bool,
    },
}

/// One binding of `@group(0)`: its number is its index in [`BINDINGS`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Binding {
    pub name: &'static str,
    pub kind: BindingKind,
    /// The WGSL type of the variable (`Elem` comes from the prelude).
    pub wgsl_type: &'static str,
}

/// The bindings of the step, in binding order. [`Slot`] names the indices.
pub(crate) const BINDINGS: [Binding; 13] = {
    const fn uniform(name: &'static str, size: u64, wgsl_type: &'static str) -> Binding {
        Binding {
            name,
            kind: BindingKind::Uniform { size },
            wgsl_type,
        }
    }
    const fn storage(name: &'static str, read_only: bool, wgsl_type: &'static str) -> Binding {
        Binding {
            name,
            kind: BindingKind::Storage { read_only },
            wgsl_type,
        }
    }
    [
        // Every group's numbers for this step.
        uniform("groups", GROUPS_BYTES, "array<StepUniforms, MAX_GROUPS>"),
        // What this dispatch covers.
        uniform("chunk", size_of::<Chunk>() as u64, "Chunk"),
        // The per-element buffers: `array<Elem>` in f32, words of two 16-bit values otherwise
        // (the prelude declares each as its dtype asks, with load and store functions).
        storage("param", false, "array<Elem>"),
        storage("grad", true, "array<Elem>"),
        storage("exp_avg", false, "array<Elem>"),
        storage("exp_avg_sq", false, "array<Elem>"),
        // Bound (to a dummy) even without amsgrad.
        storage("max_exp_avg_sq", false, "array<Elem>"),
        // Master weights (f32); bound to a dummy without them.
        storage("master_param", false, "array<Elem>"),
        // Segmented dispatches: the segment rows, sorted and disjoint.
        storage("table", true, "array<u32>"),
        // Segmented dispatches: one hint per workgroup. A uniform, not storage, buffer: read at
        // a workgroup-uniform address it costs one load, not one per lane (llvmpipe).
        uniform("hints", HINTS_BYTES, "array<vec4<u32>, HINT_VEC4S>"),
        // The iteration's scalars and the norm pass's partial sums (see `DeviceScalars`).
        storage("device", false, "DeviceState"),
        // A copy of `device`'s first ITERATION_BYTES, made between the passes (see `Iteration`).
        uniform("iteration", ITERATION_BYTES, "Iteration"),
        // q8 state: both dynamic maps and their thresholds ([`q8_maps_bytes`]).
        uniform("q8_maps", Q8_MAPS_BYTES, "Q8Maps"),
    ]
};

/// Bytes of the shader's `Q8Maps`: the signed and unsigned maps' 256 values, then their 255
/// thresholds (and a 0), each as 64 vec4.
pub(crate) const Q8_MAPS_BYTES: u64 = 4 * 256 * 4;

/// The `q8_maps` uniform's contents: the maps and thresholds of `dtype::q8`, in that order.
pub(crate) fn q8_maps_bytes() -> Vec<u8> {
    let (signed, unsigned) = (q8::Map::new(true), q8::Map::new(false));
    let mut words: Vec<f32> = Vec::with_capacity(1024);
    words.extend(signed.values);
    words.extend(unsigned.values);
    for map in [&signed, &unsigned] {
        words.extend(map.thresholds);
        words.push(0.0);
    }
    let bytes = bytemuck::cast_slice(&words).to_vec();
    debug_assert_eq!(bytes.len() as u64, Q8_MAPS_BYTES);
    bytes
}

/// The index of each binding in [`BINDINGS`] (and its binding number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Groups,
    Chunk,
    Param,
    Grad,
    ExpAvg,
    ExpAvgSq,
    MaxExpAvgSq,
    MasterParam,
    Table,
    Hints,
    Device,
    Iteration,
    Q8Maps,
}

impl Slot {
    /// Every slot, in binding order.
    pub const ALL: [Slot; 13] = [
        Slot::Groups,
        Slot::Chunk,
        Slot::Param,
        Slot::Grad,
        Slot::ExpAvg,
        Slot::ExpAvgSq,
        Slot::MaxExpAvgSq,
        Slot::MasterParam,
        Slot::Table,
        Slot::Hints,
        Slot::Device,
        Slot::Iteration,
        Slot::Q8Maps,
    ];
}

/// The element type one pipeline loads and stores: four lanes at a time, two, or one; or,
/// with q8 state, whole 256-element blocks (`step_blocks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Width {
    Vec4,
    /// With 16-bit storage only: one word of two 16-bit values per invocation.
    Vec2,
    Scalar,
    /// With q8 state only: a workgroup per block, four consecutive elements (any alignment)
    /// per invocation, loaded by element index.
    Blocks,
}

impl Width {
    /// The element-wise widths (q8 state uses [`Width::Blocks`] alone).
    pub const ALL: [Width; 3] = [Width::Vec4, Width::Vec2, Width::Scalar];

    /// f32 lanes per element.
    pub fn lanes(self) -> u64 {
        match self {
            Width::Vec4 | Width::Blocks => 4,
            Width::Vec2 => 2,
            Width::Scalar => 1,
        }
    }
}

/// Invocations of a blockwise workgroup: four elements each, a q8 block in all.
pub(crate) const BLOCK_INVOCATIONS: u32 = (crate::dtype::q8::BLOCK / 4) as u32;

/// How the per-element buffers are stored (optimizer-wide keys of `docs/semantics.md`,
/// "Storage dtypes"), and how a 16-bit parameter is rounded: what the prelude's load and store
/// functions do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Storage {
    pub param: Dtype,
    pub grad: Dtype,
    pub exp_avg: Dtype,
    pub exp_avg_sq: Dtype,
    /// An f32 copy of 16-bit parameters in the state (`master_param`).
    pub master: bool,
    /// 16-bit parameters without master weights rounded stochastically.
    pub stochastic: bool,
    pub seed: u64,
}

impl Storage {
    pub fn new(config: &Config) -> Self {
        Storage {
            param: config.param_dtype,
            grad: config.grad_dtype,
            exp_avg: config.exp_avg_dtype,
            exp_avg_sq: config.exp_avg_sq_dtype,
            master: config.keeps_master(),
            stochastic: config.rounds_stochastically(),
            seed: config.seed,
        }
    }

    /// The dtype of the buffer bound at `slot` (f32 for the rest).
    pub fn dtype(&self, slot: Slot) -> Dtype {
        match slot {
            Slot::Param => self.param,
            Slot::Grad => self.grad,
            Slot::ExpAvg => self.exp_avg,
            Slot::ExpAvgSq | Slot::MaxExpAvgSq => self.exp_avg_sq,
            _ => Dtype::F32,
        }
    }

    /// Some state is q8: the step goes block by block ([`Width::Blocks`]).
    pub fn blockwise(&self) -> bool {
        self.exp_avg == Dtype::Q8 || self.exp_avg_sq == Dtype::Q8
    }

    /// The widths the step of this storage dispatches.
    pub fn widths(&self) -> &'static [Width] {
        if self.blockwise() {
            &[Width::Blocks]
        } else if self.pairs() {
            &Width::ALL
        } else {
            &[Width::Vec4, Width::Scalar]
        }
    }

    /// Some buffer holds two values per word: invocations must take whole words.
    pub fn pairs(&self) -> bool {
        ELEMENT_SLOTS.iter().any(|&s| self.dtype(s).is_16bit())
    }

    /// Bytes per element of the narrowest buffer.
    pub fn min_bytes(&self) -> u64 {
        ELEMENT_SLOTS
            .iter()
            .map(|&s| self.dtype(s).bytes())
            .min()
            .unwrap_or(4)
    }
}

/// The bindings that hold one value per element.
pub(crate) const ELEMENT_SLOTS: [Slot; 6] = [
    Slot::Param,
    Slot::Grad,
    Slot::ExpAvg,
    Slot::ExpAvgSq,
    Slot::MaxExpAvgSq,
    Slot::MasterParam,
];

/// The value of the shader's `ALGORITHM` override for each update rule.
pub(crate) fn algorithm_code(algorithm: Algorithm) -> u32 {
    match algorithm {
        Algorithm::Adam => 0,
        Algorithm::AdamW => 1,
        Algorithm::Yogi => 2,
    }
}

/// The generated WGSL prelude for one element width and storage: the element types, the
/// shared constants, every binding's declaration (each per-element buffer in its dtype), and
/// `load_<name>(at)` / `store_<name>(at, v, random, keep, absmax)` for each per-element
/// buffer, all from the definitions above. `shaders/storage.wgsl` (the 16-bit conversions)
/// follows it.
pub(crate) fn wgsl_prelude(width: Width, storage: &Storage) -> String {
    let elem = match width {
        Width::Vec4 | Width::Blocks => {
            "alias Elem = vec4<f32>;\nalias Index = vec4<u32>;\nalias Mask = vec4<bool>;\n\
             const LANES: u32 = 4u;\nconst LANE = vec4<u32>(0u, 1u, 2u, 3u);\n\
             fn lane_sum(x: Elem) -> f32 { return dot(x, vec4<f32>(1.0)); }\n\
             fn lane_max(x: Index) -> u32 { return max(max(x.x, x.y), max(x.z, x.w)); }\n"
        }
        Width::Vec2 => {
            "alias Elem = vec2<f32>;\nalias Index = vec2<u32>;\nalias Mask = vec2<bool>;\n\
             const LANES: u32 = 2u;\nconst LANE = vec2<u32>(0u, 1u);\n\
             fn lane_sum(x: Elem) -> f32 { return dot(x, vec2<f32>(1.0)); }\n\
             fn lane_max(x: Index) -> u32 { return max(x.x, x.y); }\n"
        }
        Width::Scalar => {
            "alias Elem = f32;\nalias Index = u32;\nalias Mask = bool;\nconst LANES: u32 = 1u;\n\
             const LANE = 0u;\nfn lane_sum(x: Elem) -> f32 { return x; }\n\
             fn lane_max(x: Index) -> u32 { return x; }\n"
        }
    };
    let mut out = format!(
        "// Generated by src/protocol.rs: the element type, the constants and the bindings.\n\
         {elem}const MAX_GROUPS: u32 = {MAX_GROUPS}u;\nconst WHOLE_BLOCK: u32 = {WHOLE_BLOCK:#x}u;\n\
         const GROUP_BITS: u32 = {GROUP_BITS}u;\n\
         const HINT_VEC4S: u32 = {}u;\nconst SEGMENT_ROW: u32 = {SEGMENT_ROW}u;\n\
         const ADAM: u32 = {}u;\nconst ADAMW: u32 = {}u;\nconst YOGI: u32 = {}u;\n\
         const BIAS_ROW: u32 = {BIAS_ROW}u;\nconst MAX_WORKGROUP_SIZE: u32 = {MAX_WORKGROUP_SIZE}u;\n\
         const NORM_BLOCKS: u32 = {NORM_BLOCKS}u;\n\
         const MASTER: bool = {};\nconst STOCHASTIC: bool = {};\n\
         const SEED_LO: u32 = {}u;\nconst SEED_HI: u32 = {}u;\n\
         const BLOCKS: bool = {};\nconst BLOCK_WORDS: u32 = {}u;\n\
         const Q8_EXP_AVG: bool = {};\nconst Q8_EXP_AVG_SQ: bool = {};\n\
         const Q8_ZERO_SIGNED: u32 = {}u;\nconst Q8_ZERO_UNSIGNED: u32 = {}u;\n",
        MAX_HINTS / 4,
        algorithm_code(Algorithm::Adam),
        algorithm_code(Algorithm::AdamW),
        algorithm_code(Algorithm::Yogi),
        storage.master,
        storage.stochastic,
        storage.seed as u32,
        (storage.seed >> 32) as u32,
        width == Width::Blocks,
        q8::BLOCK_WORDS,
        storage.exp_avg == Dtype::Q8,
        storage.exp_avg_sq == Dtype::Q8,
        q8::Map::new(true).zero,
        q8::Map::new(false).zero,
    );
    // A 16-bit buffer's word type at this width (scalar: one element of a word).
    let word = match width {
        Width::Vec4 => "vec2<u32>",
        Width::Vec2 | Width::Scalar | Width::Blocks => "u32",
    };
    for (number, b) in BINDINGS.iter().enumerate() {
        let space = match b.kind {
            BindingKind::Uniform { .. } => "uniform",
            BindingKind::Storage { read_only: true } => "storage, read",
            BindingKind::Storage { read_only: false } => "storage, read_write",
        };
        let slot = Slot::ALL[number];
        let dtype = storage.dtype(slot);
        let ty = if !ELEMENT_SLOTS.contains(&slot) {
            b.wgsl_type.to_string()
        } else if dtype == Dtype::Q8 {
            "array<u32>".to_string()
        } else if dtype.is_16bit() {
            format!("array<{word}>")
        } else if width == Width::Blocks {
            "array<f32>".to_string()
        } else {
            b.wgsl_type.to_string()
        };
        out += &format!(
            "@group(0) @binding({number}) var<{space}> {}: {ty};\n",
            b.name
        );
    }
    // Every buffer has a load; those written have a store, which keeps the stored value of
    // the lanes in `keep` (bit for bit) and rounds the rest (`random`: stochastic bits).
    for slot in ELEMENT_SLOTS {
        let b = &BINDINGS[slot as usize];
        let buffer = Buffer {
            name: b.name,
            dtype: storage.dtype(slot),
            index: match slot {
                Slot::Param => "param",
                Slot::Grad => "grad",
                _ => "state",
            },
            stored: slot != Slot::Grad,
            stochastic: slot == Slot::Param && storage.stochastic,
            signed: slot == Slot::ExpAvg,
        };
        out += &match width {
            Width::Blocks => blockwise_load_store(&buffer),
            _ => load_store(&buffer, width),
        };
    }
    // Stochastic rounding's bits for each lane, from (seed, t, index within the tensor).
    let lanes: Vec<String> = match width {
        Width::Vec4 | Width::Blocks => ["x", "y", "z", "w"].map(|c| format!("index.{c}")).to_vec(),
        Width::Vec2 => ["x", "y"].map(|c| format!("index.{c}")).to_vec(),
        Width::Scalar => vec!["index".into()],
    };
    let bits: Vec<String> = lanes
        .iter()
        .map(|l| format!("rounding_bits(SEED_LO, SEED_HI, t, {l})"))
        .collect();
    out += &format!(
        "fn random_bits(t: u32, index: Index) -> Index {{ return Index({}); }}\n",
        bits.join(", ")
    );
    out
}

/// One per-element buffer as the prelude declares it.
struct Buffer {
    name: &'static str,
    dtype: Dtype,
    /// The field of the kernel's `At` that indexes it: `param`, `grad` or `state`.
    index: &'static str,
    /// Written by the step (all but the gradient).
    stored: bool,
    /// Rounded stochastically (a 16-bit parameter without master weights).
    stochastic: bool,
    /// q8 with the signed map (m); else the unsigned one.
    signed: bool,
}

impl Buffer {
    /// The 16-bit conversions' suffix, and the narrowing of `x` with random word `r`.
    fn kind(&self) -> &'static str {
        if self.dtype == Dtype::Bf16 {
            "bf16"
        } else {
            "f16"
        }
    }

    fn narrow(&self, x: &str, r: &str) -> String {
        let kind = self.kind();
        if self.stochastic {
            format!("stochastic_{kind}({x}, {r})")
        } else {
            format!("narrow_{kind}({x})")
        }
    }
}

/// `load_<name>(at) -> Elem` and (when stored) `store_<name>(at, v, random, keep, absmax)` for
/// one buffer of an element-wise width: `at.<index>` counts elements of the width (words of
/// 16-bit pairs at vec2, pairs of words at vec4, single 16-bit halves at scalar).
fn load_store(b: &Buffer, width: Width) -> String {
    let Buffer { name, index, .. } = *b;
    let signature = format!(
        "fn store_{name}(at: At, v: Elem, random: Index, keep: Mask, absmax: f32) {{\n\
         \x20   let i = at.{index};\n"
    );
    if !b.dtype.is_16bit() {
        let mut out = format!("fn load_{name}(at: At) -> Elem {{ return {name}[at.{index}]; }}\n");
        if b.stored {
            out += &format!(
                "{signature}\x20   var x = v;\n    if any(keep) {{ x = select(v, {name}[i], keep); }}\n\
                 \x20   {name}[i] = x;\n}}\n"
            );
        }
        return out;
    }
    let kind = b.kind();
    match width {
        Width::Vec4 => {
            let mut out = format!(
                "fn halves_{name}(w: vec2<u32>) -> vec4<u32> {{\n\
                 \x20   return vec4<u32>(w.x & 0xffffu, w.x >> 16u, w.y & 0xffffu, w.y >> 16u);\n}}\n\
                 fn load_{name}(at: At) -> Elem {{\n    let h = halves_{name}({name}[at.{index}]);\n\
                 \x20   return vec4<f32>(widen_{kind}(h.x), widen_{kind}(h.y), widen_{kind}(h.z), widen_{kind}(h.w));\n}}\n"
            );
            if b.stored {
                out += &format!(
                    "{signature}\x20   var h = vec4<u32>({}, {}, {}, {});\n\
                     \x20   if any(keep) {{ h = select(h, halves_{name}({name}[i]), keep); }}\n\
                     \x20   {name}[i] = vec2<u32>(h.x | (h.y << 16u), h.z | (h.w << 16u));\n}}\n",
                    b.narrow("v.x", "random.x"),
                    b.narrow("v.y", "random.y"),
                    b.narrow("v.z", "random.z"),
                    b.narrow("v.w", "random.w"),
                );
            }
            out
        }
        Width::Vec2 => {
            let mut out = format!(
                "fn halves_{name}(w: u32) -> vec2<u32> {{ return vec2<u32>(w & 0xffffu, w >> 16u); }}\n\
                 fn load_{name}(at: At) -> Elem {{\n    let h = halves_{name}({name}[at.{index}]);\n\
                 \x20   return vec2<f32>(widen_{kind}(h.x), widen_{kind}(h.y));\n}}\n"
            );
            if b.stored {
                out += &format!(
                    "{signature}\x20   var h = vec2<u32>({}, {});\n\
                     \x20   if any(keep) {{ h = select(h, halves_{name}({name}[i]), keep); }}\n\
                     \x20   {name}[i] = h.x | (h.y << 16u);\n}}\n",
                    b.narrow("v.x", "random.x"),
                    b.narrow("v.y", "random.y"),
                );
            }
            out
        }
        Width::Scalar => {
            // The planner gives a scalar 16-bit dispatch one element, alone in its word.
            let mut out = format!(
                "fn load_{name}(at: At) -> Elem {{\n    let i = at.{index};\n\
                 \x20   return widen_{kind}(({name}[i / 2u] >> (16u * (i % 2u))) & 0xffffu);\n}}\n"
            );
            if b.stored {
                out += &format!(
                    "{signature}\x20   if keep {{ return; }}\n\
                     \x20   let shift = 16u * (i % 2u);\n\
                     \x20   let w = {name}[i / 2u] & ~(0xffffu << shift);\n\
                     \x20   {name}[i / 2u] = w | ({} << shift);\n}}\n",
                    b.narrow("v", "random"),
                );
            }
            out
        }
        Width::Blocks => unreachable!("blockwise buffers have their own loads"),
    }
}

/// `load_<name>(at)` and `store_<name>(at, v, random, keep, absmax)` for one buffer of a
/// blockwise dispatch. f32 and 16-bit buffers: four consecutive elements from element
/// `at.<index>` (any alignment for f32; even for 16-bit, whose blocks start on words), only
/// the lanes in `at.valid` read and those outside `keep` written (a 16-bit word half past a
/// tensor's end is padding: kept as it was). q8 buffers: the invocation's word of four codes
/// in block `at.block`, dequantised; a store writes the codes of `v` at `absmax` (the code of
/// 0 outside the block) and, from lane 0, the absmax.
fn blockwise_load_store(b: &Buffer) -> String {
    let Buffer { name, index, .. } = *b;
    let signature =
        format!("fn store_{name}(at: At, v: Elem, random: Index, keep: Mask, absmax: f32) {{\n");
    if b.dtype == Dtype::Q8 {
        let map = if b.signed { "true" } else { "false" };
        let zero = if b.signed {
            "Q8_ZERO_SIGNED"
        } else {
            "Q8_ZERO_UNSIGNED"
        };
        let mut out = format!(
            "fn load_{name}(at: At) -> Elem {{\n\
             \x20   if !at.live {{ return Elem(0.0); }}\n\
             \x20   let b = at.block * BLOCK_WORDS;\n\
             \x20   return q8_values({map}, {name}[b + 1u + at.lane]) * bitcast<f32>({name}[b]);\n}}\n"
        );
        if b.stored {
            out += &format!(
                "{signature}\x20   if !at.live {{ return; }}\n\
                 \x20   let b = at.block * BLOCK_WORDS;\n\
                 \x20   if at.lane == 0u {{ {name}[b] = bitcast<u32>(absmax); }}\n\
                 \x20   let c = select(q8_codes({map}, v, absmax), Index({zero}), keep);\n\
                 \x20   {name}[b + 1u + at.lane] = c.x | (c.y << 8u) | (c.z << 16u) | (c.w << 24u);\n}}\n"
            );
        }
        return out;
    }
    if !b.dtype.is_16bit() {
        let mut out = format!(
            "fn load_{name}(at: At) -> Elem {{\n    let i = at.{index};\n    var x = Elem(0.0);\n\
             \x20   if at.valid.x {{ x.x = {name}[i]; }}\n    if at.valid.y {{ x.y = {name}[i + 1u]; }}\n\
             \x20   if at.valid.z {{ x.z = {name}[i + 2u]; }}\n    if at.valid.w {{ x.w = {name}[i + 3u]; }}\n\
             \x20   return x;\n}}\n"
        );
        if b.stored {
            out += &format!(
                "{signature}\x20   let i = at.{index};\n\
                 \x20   if !keep.x {{ {name}[i] = v.x; }}\n    if !keep.y {{ {name}[i + 1u] = v.y; }}\n\
                 \x20   if !keep.z {{ {name}[i + 2u] = v.z; }}\n    if !keep.w {{ {name}[i + 3u] = v.w; }}\n}}\n"
            );
        }
        return out;
    }
    let kind = b.kind();
    let mut out = format!(
        "fn load_{name}(at: At) -> Elem {{\n    let w = at.{index} / 2u;\n    var h = vec4<u32>(0u);\n\
         \x20   if at.valid.x {{ let a = {name}[w]; h.x = a & 0xffffu; h.y = a >> 16u; }}\n\
         \x20   if at.valid.z {{ let a = {name}[w + 1u]; h.z = a & 0xffffu; h.w = a >> 16u; }}\n\
         \x20   return select(vec4<f32>(0.0), vec4<f32>(widen_{kind}(h.x), widen_{kind}(h.y), widen_{kind}(h.z), widen_{kind}(h.w)), at.valid);\n}}\n"
    );
    if b.stored {
        out += &format!(
            "{signature}\x20   let w = at.{index} / 2u;\n\
             \x20   var h = vec4<u32>({}, {}, {}, {});\n\
             \x20   if !keep.x {{\n        if keep.y {{ h.y = {name}[w] >> 16u; }}\n\
             \x20       {name}[w] = h.x | (h.y << 16u);\n    }}\n\
             \x20   if !keep.z {{\n        if keep.w {{ h.w = {name}[w + 1u] >> 16u; }}\n\
             \x20       {name}[w + 1u] = h.z | (h.w << 16u);\n    }}\n}}\n",
            b.narrow("v.x", "random.x"),
            b.narrow("v.y", "random.y"),
            b.narrow("v.z", "random.z"),
            b.narrow("v.w", "random.w"),
        );
    }
    out
}

#[cfg(test)]
mod tests;
