//! Storage dtypes and the rounding between f32 and the 16-bit formats (`docs/semantics.md`,
//! "Storage dtypes"): pure functions on bits, written once here and once, line for line, in
//! `shaders/storage.wgsl`, and held bit-identical by `tests/storage_wgsl.rs`.
//!
//! # Formats
//!
//! | dtype | bits | sign / exponent / mantissa | largest finite | smallest positive |
//! | --- | --- | --- | --- | --- |
//! | `f32` | 32 | 1 / 8 / 23 | 3.4e38 | 2^-149 |
//! | `bf16` | 16 | 1 / 8 / 7 (the upper half of an f32) | 3.39e38 | 2^-133 |
//! | `f16` | 16 | 1 / 5 / 10 (IEEE binary16) | 65504 | 2^-24 (subnormal) |
//!
//! Widening (16 bits to f32) is exact. Narrowing (f32 to 16 bits) is done on the integer bits
//! only, never by float arithmetic or a hardware conversion, so that every device and the CPU
//! agree bit for bit (WGSL leaves the rounding of its f32-to-f16 conversions to the driver, and
//! some drivers flush subnormals).
//!
//! # Round to nearest ([`narrow_bf16`], [`narrow_f16`])
//!
//! Ties go to the even neighbour (IEEE's default). `f16`: `|x| >= 65520` (half-way between
//! 65504 and the next power of two, 65536) becomes infinity; below `2^-14` the result is an f16
//! subnormal, a multiple of `2^-24`, rounded the same way (so `2^-25` becomes 0). A NaN becomes
//! the quiet NaN with x's sign and no payload: `0x7fc0 | sign` (bf16), `0x7e00 | sign` (f16).
//!
//! # Stochastic rounding ([`stochastic_bf16`], [`stochastic_f16`])
//!
//! Let `a = bits(x) & 0x7fffffff` be the magnitude's bits and `k` the number of low f32 bits
//! the target format has no room for at x's magnitude: 16 for bf16; 13 for f16 normals; for
//! f16 subnormals (`|x| < 2^-14`, where the f16 unit is `2^-24`) `k = 126 - max(e, 1)`, e the
//! biased f32 exponent, counting the implicit leading 1 among the dropped bits. Write the
//! dropped bits as the integer `d` (`0 <= d < 2^k`) and take the random word's low `k` bits as
//! `u`. The magnitude rounds **away from zero exactly when `d + u >= 2^k`** (the carry out of
//! the dropped bits), toward zero otherwise; the sign is kept.
//!
//! With `u` uniform, the upper-magnitude neighbour is chosen with probability `d / 2^k`, which
//! is x's distance from the lower-magnitude neighbour divided by their spacing: the expected
//! result is exactly x. Enumerating all `2^k` values of `u`, exactly `d` of them round up.
//! Consequences: a value the format holds exactly (`d = 0`) never moves; infinity stays
//! infinity; a NaN becomes the same NaN as with [`narrow_bf16`] / [`narrow_f16`]; bf16 values
//! above the largest finite bf16 round up to infinity with their probability (as if infinity
//! were the next power of two); f16 `|x| >= 65536` becomes infinity and `65504 < |x| < 65536`
//! rounds up to infinity with its probability.
//!
//! The random word has 32 bits, so `k > 32` (only f16, `|x| < 2^-33`, which rounds to 0 or
//! `2^-24`) uses the top 32 of the dropped bits: up exactly when `(d >> (k - 32)) + u >= 2^32`.
//! The probability of rounding up is then `floor(d / 2^(k-32)) / 2^32`, short of `d / 2^k` by
//! less than `2^-32`: the expectation is off by less than `2^-56`.
//!
//! # The random bits ([`rounding_bits`])
//!
//! A counter-based hash of `(seed, t, index)`, fixed forever (changing it changes every
//! stochastically rounded result): with `mix` the 32-bit "lowbias32" finaliser (`mix32` in the
//! code: WGSL has a builtin `mix`):
//!
//! ```text
//! mix(x): x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
//!         (multiplications wrap modulo 2^32)
//! rounding_bits(seed, t, index) =
//!     mix(mix(mix(mix(seed_lo) ^ seed_hi) ^ t) ^ index)
//! ```
//!
//! `seed_lo` and `seed_hi` are the low and high 32 bits of the 64-bit seed. Each `mix` is a
//! bijection of `u32`, so with the other arguments fixed the result is a bijection of any one
//! argument: changing one argument always changes the bits.
//!
//! Owns: the dtype names and the rounding functions, on the host and (in
//! `shaders/storage.wgsl`) on the device. May not touch the optimizer or the GPU.

/// How a buffer's elements are stored. `Q8` is block-wise 8-bit quantisation (semantics.md);
/// its coding is not this module's business yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// IEEE single precision.
    #[default]
    F32,
    /// bfloat16: the upper 16 bits of an f32.
    Bf16,
    /// IEEE half precision (binary16).
    F16,
    /// One byte per element, plus one f32 `absmax` per block of 256 elements (which
    /// [`bytes`](Dtype::bytes) does not count).
    Q8,
}

/// Every dtype, in declaration order.
const ALL: [Dtype; 4] = [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Q8];

impl Dtype {
    /// The configuration's name: `"f32"`, `"bf16"`, `"f16"` or `"q8"`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::Q8 => "q8",
        }
    }

    /// The dtype of exactly one of the names of [`name`](Dtype::name), else `None`.
    pub fn parse(name: &str) -> Option<Dtype> {
        ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element (q8's per-block `absmax` not counted).
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::Q8 => 1,
        }
    }

    /// `bf16` or `f16`.
    pub fn is_16bit(self) -> bool {
        matches!(self, Dtype::Bf16 | Dtype::F16)
    }
}

/// Magnitude bits of +infinity in f32.
const F32_INF: u32 = 0x7f80_0000;
/// f32 bits of 2^-14, the smallest normal f16.
const F16_MIN_NORMAL: u32 = 0x3880_0000;
/// f32 bits of 65520, half-way between 65504 (the largest finite f16) and 65536.
const F16_ROUNDS_TO_INF: u32 = 0x477f_f000;
/// f32 bits of 65536 = 2^16, where f16's exponent runs out.
const F16_OVERFLOW: u32 = 0x4780_0000;
/// f32 exponent bias minus f16 exponent bias, in f16's exponent field.
const F16_REBIAS: u32 = (127 - 15) << 10;

/// The bf16 `bits` as an f32: exact.
pub fn widen_bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` rounded to the nearest bf16, ties to even; a NaN becomes `0x7fc0 | sign`.
pub fn narrow_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > F32_INF {
        return (((bits >> 16) & 0x8000) | 0x7fc0) as u16;
    }
    // Add just under half a unit, plus one more when the kept part is odd: the carry happens
    // above half, and at half only toward even. No overflow: at most 0xff80_0000 + 0x8000.
    let odd = (bits >> 16) & 1;
    ((bits + 0x7fff + odd) >> 16) as u16
}

/// The f16 `bits` as an f32: exact, subnormals included; a NaN keeps its sign and payload
/// (shifted up by 13) and is made quiet.
pub fn widen_f16(bits: u16) -> f32 {
    let h = bits as u32;
    let sign = (h & 0x8000) << 16;
    let exponent = (h >> 10) & 0x1f;
    let mantissa = h & 0x3ff;
    let magnitude = if exponent == 0x1f {
        if mantissa == 0 {
            F32_INF
        } else {
            F32_INF | 0x40_0000 | (mantissa << 13)
        }
    } else if exponent != 0 {
        ((exponent << 10) + F16_REBIAS + mantissa) << 13
    } else if mantissa == 0 {
        0
    } else {
        // mantissa * 2^-24 with the leading 1 at bit p: 2^(p - 24) * (mantissa / 2^p).
        let p = 31 - mantissa.leading_zeros();
        ((p + 103) << 23) | ((mantissa << (23 - p)) & 0x7f_ffff)
    };
    f32::from_bits(sign | magnitude)
}

/// The f16 subnormal range (`a` below 2^-14): the significand `m` with its implicit bit, and
/// the number `k` of its bits below the f16 unit 2^-24 (the value is `m * 2^-(24 + k)`).
fn f16_subnormal_parts(a: u32) -> (u32, u32) {
    let exponent = a >> 23;
    let implicit = if exponent == 0 { 0 } else { 0x80_0000 };
    (implicit | (a & 0x7f_ffff), 126 - exponent.max(1))
}

/// `x` rounded to the nearest f16, ties to even: `|x| >= 65520` becomes infinity, f16
/// subnormals are rounded correctly (`2^-25` becomes 0); a NaN becomes `0x7e00 | sign`.
pub fn narrow_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let a = bits & 0x7fff_ffff;
    let magnitude = if a > F32_INF {
        0x7e00
    } else if a >= F16_ROUNDS_TO_INF {
        0x7c00
    } else if a >= F16_MIN_NORMAL {
        let odd = (a >> 13) & 1;
        ((a + 0xfff + odd) >> 13) - F16_REBIAS
    } else {
        let (m, k) = f16_subnormal_parts(a);
        if k > 24 {
            // Below 2^-25: nearer to 0 than to 2^-24.
            0
        } else {
            let kept = m >> k;
            let dropped = m & ((1 << k) - 1);
            let tie = 1 << (k - 1);
            let up = dropped > tie || (dropped == tie && kept & 1 == 1);
            kept + up as u32
        }
    };
    (sign | magnitude) as u16
}

/// `x` rounded to one of its two neighbouring bf16 values, away from zero when the low 16
/// bits of `random` carry the dropped bits over (module docs); a NaN as [`narrow_bf16`].
pub fn stochastic_bf16(x: f32, random: u32) -> u16 {
    let bits = x.to_bits();
    let a = bits & 0x7fff_ffff;
    if a > F32_INF {
        return narrow_bf16(x);
    }
    let sign = (bits >> 16) & 0x8000;
    (sign | ((a + (random & 0xffff)) >> 16)) as u16
}

/// `x` rounded to one of its two neighbouring f16 values, away from zero when the low `k`
/// bits of `random` carry the `k` dropped bits over (module docs); `|x| >= 65536` becomes
/// infinity, a NaN as [`narrow_f16`].
pub fn stochastic_f16(x: f32, random: u32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let a = bits & 0x7fff_ffff;
    let magnitude = if a > F32_INF {
        0x7e00
    } else if a >= F16_OVERFLOW {
        0x7c00
    } else if a >= F16_MIN_NORMAL {
        ((a + (random & 0x1fff)) >> 13) - F16_REBIAS
    } else {
        let (m, k) = f16_subnormal_parts(a);
        // At most 32 random bits, aligned with the top of the k dropped ones.
        let width = k.min(32);
        let mask = u32::MAX >> (32 - width);
        let kept = if k < 32 { m >> k } else { 0 };
        let dropped = if k <= 32 {
            m & mask
        } else if k - 32 < 32 {
            m >> (k - 32)
        } else {
            0
        };
        // dropped + (random & mask) >= 2^width, without overflow (dropped <= mask).
        let up = random & mask > mask - dropped;
        kept + up as u32
    };
    (sign | magnitude) as u16
}

/// The "lowbias32" integer finaliser (module docs): a bijection of `u32`.
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The random word for stochastic rounding of element `index` (its position in its tensor)
/// at applied step `t` with the optimizer's `seed` (module docs; fixed forever).
pub fn rounding_bits(seed: u64, t: u32, index: u32) -> u32 {
    mix32(mix32(mix32(mix32(seed as u32) ^ (seed >> 32) as u32) ^ t) ^ index)
}

/// `x` as stored in `dtype` and loaded back: widen(narrow(x)) for bf16 and f16 (nearest),
/// `x` itself for f32 and q8 (q8 is not this module's business yet).
pub fn round_to(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::Bf16 => widen_bf16(narrow_bf16(x)),
        Dtype::F16 => widen_f16(narrow_f16(x)),
        Dtype::F32 | Dtype::Q8 => x,
    }
}

/// `data` as a buffer or file of `dtype` holds it: little-endian, 16-bit values rounded to
/// nearest two bytes each (unpadded), f32 (and q8, written dequantised) as they are.
pub fn to_bytes(dtype: Dtype, data: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::Bf16 => data
            .iter()
            .flat_map(|&x| narrow_bf16(x).to_le_bytes())
            .collect(),
        Dtype::F16 => data
            .iter()
            .flat_map(|&x| narrow_f16(x).to_le_bytes())
            .collect(),
        Dtype::F32 | Dtype::Q8 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// The values of `dtype` in `bytes` (as [`to_bytes`] writes them), widened to f32 (exact); a
/// trailing partial value is ignored.
pub fn from_bytes(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    let halves = || {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    match dtype {
        Dtype::Bf16 => halves().map(widen_bf16).collect(),
        Dtype::F16 => halves().map(widen_f16).collect(),
        Dtype::F32 | Dtype::Q8 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

pub mod q8;

#[cfg(test)]
mod tests;
