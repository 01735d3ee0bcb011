// q8 state (docs/semantics.md, "Storage dtypes"): the device's copy of src/dtype/q8.rs's
// dequantisation and rounding, bit-identical to it (only correctly rounded f32 products and
// comparisons). Blockwise kernels only (four lanes): placed after the generated prelude, whose
// q8 loads and stores call these, and which declares the `q8_maps` uniform.

// Four codes' values from the signed or unsigned map (bytes of `word`, low first).
fn q8_values(signed: bool, word: u32) -> Elem {
    let c = (Index(word) >> Index(0u, 8u, 16u, 24u)) & Index(0xffu);
    if signed {
        return Elem(q8_maps.signed_values[c.x / 4u][c.x % 4u],
                    q8_maps.signed_values[c.y / 4u][c.y % 4u],
                    q8_maps.signed_values[c.z / 4u][c.z % 4u],
                    q8_maps.signed_values[c.w / 4u][c.w % 4u]);
    }
    return Elem(q8_maps.unsigned_values[c.x / 4u][c.x % 4u],
                q8_maps.unsigned_values[c.y / 4u][c.y % 4u],
                q8_maps.unsigned_values[c.z / 4u][c.z % 4u],
                q8_maps.unsigned_values[c.w / 4u][c.w % 4u]);
}

fn q8_threshold(signed: bool, k: u32) -> f32 {
    if signed {
        return q8_maps.signed_thresholds[k / 4u][k % 4u];
    }
    return q8_maps.unsigned_thresholds[k / 4u][k % 4u];
}

// The codes of `v` in a block of largest magnitude `absmax` (src/dtype/q8.rs, `Map::code`):
// the count of thresholds T with v > f32(T * absmax); the code of 0 when absmax is 0.
fn q8_codes(signed: bool, v: Elem, absmax: f32) -> Index {
    let code = Index(q8_code(signed, v.x, absmax), q8_code(signed, v.y, absmax),
                     q8_code(signed, v.z, absmax), q8_code(signed, v.w, absmax));
    let zero = select(Q8_ZERO_UNSIGNED, Q8_ZERO_SIGNED, signed);
    return select(code, Index(zero), absmax == 0.0);
}

// One value's code: from a guess, a walk to where the thresholds pass v. The count of
// thresholds below v is the same from any start (T * absmax does not decrease along the
// map), so the guess costs only steps, never exactness; it is usually the code itself, so
// that two threshold loads decide, where a binary search takes eight.
fn q8_code(signed: bool, v: f32, absmax: f32) -> u32 {
    var c = q8_guess(signed, v, absmax);
    while c < 255u && v > q8_threshold(signed, c) * absmax {
        c += 1u;
    }
    // `!(v > T)` rather than `v <= T`: a NaN walks down to 0, as the count says.
    while c > 0u && !(v > q8_threshold(signed, c - 1u) * absmax) {
        c -= 1u;
    }
    return c;
}

// The code of the entry whose interval holds |v| / absmax, from the map's structure: decade d
// (0..6) holds 2^d (signed) or 2^(d+1) (unsigned) entries, the midpoints of
// linspace(0.1, 1, n + 1) times 10^(d - 6). Approximate arithmetic is fine (see q8_code).
fn q8_guess(signed: bool, v: f32, absmax: f32) -> u32 {
    let x = abs(v) / max(absmax, 1e-38);
    let d = u32(clamp(floor(log2(max(x, 1e-9)) * 0.30103) + 7.0, 0.0, 6.0));
    let bits = select(d + 1u, d, signed);
    let n = f32(1u << bits);
    let scale = exp2((f32(d) - 6.0) * 3.3219281);
    let k = u32(clamp(floor((x / scale - 0.1) / 0.9 * n), 0.0, n - 1.0));
    if signed {
        // Positives from 128 (0 at 127), decade d from 128 + 2^d - 1; -e mirrors e at 254 - p.
        let p = 127u + (1u << d) + k;
        return select(p, 254u - p, v < 0.0);
    }
    // 0 first, decade d from 1 + 2^(d+1) - 2.
    return (1u << (d + 1u)) - 1u + k;
}
