// PLACEHOLDER (bf16 only) until the rounding module lands.
fn widen_bf16(h: u32) -> f32 { return bitcast<f32>(h << 16u); }
fn narrow_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u { return ((b >> 16u) & 0x8000u) | 0x7fc0u; }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}
fn widen_f16(h: u32) -> f32 { return 0.0; }
fn narrow_f16(x: f32) -> u32 { return 0u; }
fn stochastic_bf16(x: f32, r: u32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u { return ((b >> 16u) & 0x8000u) | 0x7fc0u; }
    let a = b & 0x7fffffffu;
    return ((b >> 16u) & 0x8000u) | ((a + (r & 0xffffu)) >> 16u);
}
fn stochastic_f16(x: f32, r: u32) -> u32 { return 0u; }
fn mix32(x0: u32) -> u32 {
    var x = x0;
    x ^= x >> 16u; x *= 0x7feb352du; x ^= x >> 15u; x *= 0x846ca68bu; x ^= x >> 16u;
    return x;
}
fn rounding_bits(seed_lo: u32, seed_hi: u32, t: u32, index: u32) -> u32 {
    return mix32(mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ t) ^ index);
}
