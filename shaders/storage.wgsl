// Rounding between f32 and the 16-bit storage formats (docs/semantics.md, "Storage dtypes"):
// the device's copy of src/dtype.rs, line for line, bit-identical to it (tests/storage_wgsl.rs).
// A 16-bit value travels in the low half of a u32, the high half zero.
//
// Integer bit manipulation only: no pack2x16float / unpack2x16float and no float arithmetic,
// because WGSL leaves the rounding of f32 -> f16 to the driver and some drivers flush
// subnormals. Self-contained: no bindings, no overrides; it is placed after the generated
// prelude and before the kernel family, so every helper's name starts with `storage_`.

const STORAGE_F32_INF: u32 = 0x7f800000u;        // +infinity's bits
const STORAGE_F16_MIN_NORMAL: u32 = 0x38800000u; // 2^-14, the smallest normal f16
const STORAGE_F16_ROUNDS_TO_INF: u32 = 0x477ff000u; // 65520, half-way from 65504 to 65536
const STORAGE_F16_OVERFLOW: u32 = 0x47800000u;   // 65536 = 2^16
const STORAGE_F16_REBIAS: u32 = 0x1c000u;        // (127 - 15) << 10

// The bf16 `h` as an f32: exact.
fn widen_bf16(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// x rounded to the nearest bf16, ties to even; a NaN becomes 0x7fc0 | sign.
fn narrow_bf16(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    if ((bits & 0x7fffffffu) > STORAGE_F32_INF) {
        return ((bits >> 16u) & 0x8000u) | 0x7fc0u;
    }
    let odd = (bits >> 16u) & 1u;
    return (bits + 0x7fffu + odd) >> 16u;
}

// The f16 `h` as an f32: exact, subnormals included; a NaN keeps sign and payload, made quiet.
fn widen_f16(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let exponent = (h >> 10u) & 0x1fu;
    let mantissa = h & 0x3ffu;
    var magnitude: u32;
    if (exponent == 0x1fu) {
        if (mantissa == 0u) {
            magnitude = STORAGE_F32_INF;
        } else {
            magnitude = STORAGE_F32_INF | 0x400000u | (mantissa << 13u);
        }
    } else if (exponent != 0u) {
        magnitude = ((exponent << 10u) + STORAGE_F16_REBIAS + mantissa) << 13u;
    } else if (mantissa == 0u) {
        magnitude = 0u;
    } else {
        // mantissa * 2^-24 with the leading 1 at bit p: 2^(p - 24) * (mantissa / 2^p).
        let p = firstLeadingBit(mantissa);
        magnitude = ((p + 103u) << 23u) | ((mantissa << (23u - p)) & 0x7fffffu);
    }
    return bitcast<f32>(sign | magnitude);
}

// Below 2^-14: the significand with its implicit bit, and the number k of its bits below the
// f16 unit 2^-24 (the value is m * 2^-(24 + k)).
fn storage_f16_subnormal_parts(a: u32) -> vec2<u32> {
    let exponent = a >> 23u;
    let implicit = select(0x800000u, 0u, exponent == 0u);
    return vec2<u32>(implicit | (a & 0x7fffffu), 126u - max(exponent, 1u));
}

// x rounded to the nearest f16, ties to even: |x| >= 65520 becomes infinity, subnormals are
// rounded correctly (2^-25 becomes 0); a NaN becomes 0x7e00 | sign.
fn narrow_f16(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    let sign = (bits >> 16u) & 0x8000u;
    let a = bits & 0x7fffffffu;
    var magnitude: u32;
    if (a > STORAGE_F32_INF) {
        magnitude = 0x7e00u;
    } else if (a >= STORAGE_F16_ROUNDS_TO_INF) {
        magnitude = 0x7c00u;
    } else if (a >= STORAGE_F16_MIN_NORMAL) {
        let odd = (a >> 13u) & 1u;
        magnitude = ((a + 0xfffu + odd) >> 13u) - STORAGE_F16_REBIAS;
    } else {
        let parts = storage_f16_subnormal_parts(a);
        let m = parts.x;
        let k = parts.y;
        if (k > 24u) {
            // Below 2^-25: nearer to 0 than to 2^-24.
            magnitude = 0u;
        } else {
            let kept = m >> k;
            let dropped = m & ((1u << k) - 1u);
            let tie = 1u << (k - 1u);
            let up = dropped > tie || (dropped == tie && (kept & 1u) == 1u);
            magnitude = kept + select(0u, 1u, up);
        }
    }
    return sign | magnitude;
}

// x rounded to one of its two neighbouring bf16 values, away from zero when the low 16 bits
// of r carry the dropped bits over; a NaN as narrow_bf16.
fn stochastic_bf16(x: f32, r: u32) -> u32 {
    let bits = bitcast<u32>(x);
    let a = bits & 0x7fffffffu;
    if (a > STORAGE_F32_INF) {
        return narrow_bf16(x);
    }
    let sign = (bits >> 16u) & 0x8000u;
    return sign | ((a + (r & 0xffffu)) >> 16u);
}

// x rounded to one of its two neighbouring f16 values, away from zero when the low k bits of
// r carry the k dropped bits over; |x| >= 65536 becomes infinity, a NaN as narrow_f16.
fn stochastic_f16(x: f32, r: u32) -> u32 {
    let bits = bitcast<u32>(x);
    let sign = (bits >> 16u) & 0x8000u;
    let a = bits & 0x7fffffffu;
    var magnitude: u32;
    if (a > STORAGE_F32_INF) {
        magnitude = 0x7e00u;
    } else if (a >= STORAGE_F16_OVERFLOW) {
        magnitude = 0x7c00u;
    } else if (a >= STORAGE_F16_MIN_NORMAL) {
        magnitude = ((a + (r & 0x1fffu)) >> 13u) - STORAGE_F16_REBIAS;
    } else {
        let parts = storage_f16_subnormal_parts(a);
        let m = parts.x;
        let k = parts.y;
        // At most 32 random bits, aligned with the top of the k dropped ones.
        let width = min(k, 32u);
        let mask = 0xffffffffu >> (32u - width);
        var kept = 0u;
        if (k < 32u) {
            kept = m >> k;
        }
        var dropped = 0u;
        if (k <= 32u) {
            dropped = m & mask;
        } else if (k - 32u < 32u) {
            dropped = m >> (k - 32u);
        }
        // dropped + (r & mask) >= 2^width, without overflow (dropped <= mask).
        let up = (r & mask) > mask - dropped;
        magnitude = kept + select(0u, 1u, up);
    }
    return sign | magnitude;
}

// The "lowbias32" integer finaliser: a bijection of u32 (multiplications wrap).
fn mix32(x: u32) -> u32 {
    var h = x;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

// The random word for stochastic rounding of element `index` (its position in its tensor) at
// applied step `t` with the optimizer's 64-bit seed (seed_lo, seed_hi). Fixed forever.
fn rounding_bits(seed_lo: u32, seed_hi: u32, t: u32, index: u32) -> u32 {
    return mix32(mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ t) ^ index);
}
