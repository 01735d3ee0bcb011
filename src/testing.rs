//! Test support shared by the unit tests, the integration tests and the benchmark (hidden from
//! the docs: not part of the API). One seeded generator, so that every test's data can be
//! reproduced from its seed; one tolerance derivation; one compare.
//!
//! Owns: what tests and the benchmark share. Not part of the API: it may change at any time.

use crate::dtype::q8::{BLOCK, Map};

/// splitmix64: small, seeded, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`; the bias is negligible for small `n`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller); never exactly zero in practice.
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

/// How far a GPU result may be from the CPU reference (or from PyTorch), element-wise:
/// `|got - want| <= abs + rel * |want|`. The constructors are the one derivation, from float32
/// rounding (u = 2^-24, about 6e-8, per operation), that every test and the benchmark use:
///
/// - **Moments** (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`) are weighted sums of the gradient
///   history. Each step adds a few roundings and old errors decay by b1 (b2), so the error stays
///   within ~30u (b = 0.9) to ~100u of the largest gradient G (G^2 for v). `1e-5` of
///   `max(max |want|, G)` covers that, while a skipped or doubled step moves a moment by
///   `(1 - b)`, about 10% of it.
/// - **Parameters**: each step rounds p (the two paths at most 2u |p| apart: `f32::EPSILON`
///   is 2u) and the update `lr * m / (sqrt(v) + eps)` inherits the moments' ~1e-5 relative
///   error (m / sqrt(v) is at most ~10 early on), so the error grows by at most
///   `2u |p|max + 1e-4 lr` per step. A skipped step moves p by about `lr * |m / sqrt(v)|`
///   (0.1 lr to lr), far above that.
/// - **Yogi** resolves `sign(v - g^2)` near a tie differently in f32 and f64 about once in 1e7
///   element-steps, flipping that element's v by `2 (1 - b2) g^2`: [`yogi_ties`] elements of a
///   tensor may be off, none of a small one.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub abs: f32,
    pub rel: f32,
}

impl Tolerance {
    /// A parameter after `steps` steps whose largest value is `max_param`, at learning rates
    /// up to `max_lr`.
    pub fn param(steps: u64, max_param: f32, max_lr: f64) -> Self {
        Tolerance {
            abs: steps as f32 * (f32::EPSILON * max_param + 1e-4 * max_lr as f32),
            rel: 0.0,
        }
    }

    /// `exp_avg` whose largest value is `max_want`, from gradients up to `g_max` (with Adam's
    /// coupled decay `weight_decay * p` added).
    pub fn exp_avg(max_want: f32, g_max: f32) -> Self {
        Self::moment(max_want, g_max)
    }

    /// `exp_avg_sq` or `max_exp_avg_sq` whose largest value is `max_want`, from gradients up to
    /// `g_max`.
    pub fn exp_avg_sq(max_want: f32, g_max: f32) -> Self {
        Self::moment(max_want, g_max * g_max)
    }

    fn moment(max_want: f32, scale: f32) -> Self {
        Tolerance {
            abs: 1e-5 * max_want.max(scale),
            rel: 1e-5,
        }
    }
}

/// Elements of a Yogi tensor of `len` elements that may differ by a resolved tie (see
/// [`Tolerance`]); 0 for small tensors.
pub fn yogi_ties(len: u64) -> usize {
    len as usize / 10_000
}

/// Compares element-wise (NaN equals NaN) and returns every mismatch (at most 5 shown) as one
/// message naming `what`, the index, got and want. `allowed` mismatches pass.
pub fn compare(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: Tolerance,
    allowed: usize,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: got {} elements, want {}",
            got.len(),
            want.len()
        ));
    }
    let bad: Vec<(usize, f32, f32)> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| {
            let close = approx::relative_eq!(**g, **w, epsilon = tol.abs, max_relative = tol.rel);
            !(close || g.is_nan() && w.is_nan())
        })
        .map(|(i, (g, w))| (i, *g, *w))
        .collect();
    if bad.len() <= allowed {
        return Ok(());
    }
    let shown: Vec<String> = bad
        .iter()
        .take(5)
        .map(|(i, g, w)| format!("[{i}] got {g:e} want {w:e} (diff {:e})", (g - w).abs()))
        .collect();
    Err(format!(
        "{what}: {} of {} elements differ beyond {tol:?}: {}",
        bad.len(),
        got.len(),
        shown.join(", ")
    ))
}

/// The spacing of `dtype`'s values at `x`: one rounding of a value stored in it, the slack a
/// 16-bit stored value gets beyond the f32 tolerance (0 for f32: no rounding beyond f32's;
/// for q8 it depends on the block: [`q8_spacing`]).
pub fn spacing(dtype: crate::Dtype, x: f32) -> f32 {
    let exponent = |x: f32| ((x.abs().to_bits() >> 23) as i32 - 127).max(-126);
    match dtype {
        crate::Dtype::Bf16 => 2f32.powi(exponent(x) - 7),
        crate::Dtype::F16 => 2f32.powi(exponent(x).max(-14) - 10),
        crate::Dtype::F32 | crate::Dtype::Q8 => 0.0,
    }
}

/// One rounding of each q8 value of a tensor (blocks of 256 from its first element): the
/// larger gap between the map entry of `want[i]` and its neighbours, times the block's absmax
/// (estimated from the larger magnitude of `got` and `want` in the block: the stored maximum
/// is at least 0.99 of it, the map's most negative entry being -0.993). The slack a q8 stored
/// value gets beyond the f32 tolerance; `map` is the state's ([`Map::for_state`]).
pub fn q8_spacing(map: &Map, got: &[f32], want: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(want.len());
    for (g, w) in got.chunks(BLOCK).zip(want.chunks(BLOCK)) {
        let absmax = max_abs(g).max(max_abs(w)) / 0.99;
        for &x in w {
            let code = map.code(x, absmax) as usize;
            let entry = |c: usize| map.values[c.min(255)];
            let gap =
                (entry(code + 1) - entry(code)).max(entry(code) - entry(code.saturating_sub(1)));
            out.push(gap * absmax);
        }
    }
    out
}

/// The largest absolute value (0 for an empty slice).
pub fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// The library's own wgpu code (`gpu/`) for the benchmark's ceiling kernels: a compute
/// pipeline with the layout taken from the shader, and the 2-D workgroup grid.
pub use crate::gpu::{auxiliary_pipeline, workgroup_grid};
