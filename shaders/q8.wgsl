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
// the count of thresholds T with v > f32(T * absmax), by an 8-step binary search; the code
// of 0 when absmax is 0.
fn q8_codes(signed: bool, v: Elem, absmax: f32) -> Index {
    var code = Index(0u);
    for (var step = 128u; step > 0u; step = step / 2u) {
        let k = code + Index(step - 1u);
        let t = Elem(q8_threshold(signed, k.x), q8_threshold(signed, k.y),
                     q8_threshold(signed, k.z), q8_threshold(signed, k.w)) * absmax;
        code = code + select(Index(0u), Index(step), v > t);
    }
    let zero = select(Q8_ZERO_UNSIGNED, Q8_ZERO_SIGNED, signed);
    return select(code, Index(zero), absmax == 0.0);
}
