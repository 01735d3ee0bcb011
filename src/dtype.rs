//! Storage dtypes (placeholder until the rounding module lands).

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
    Q8,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::Q8 => "q8",
        }
    }
    pub fn parse(name: &str) -> Option<Dtype> {
        [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Q8]
            .into_iter()
            .find(|d| d.name() == name)
    }
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::Q8 => 1,
        }
    }
    pub fn is_16bit(self) -> bool {
        matches!(self, Dtype::Bf16 | Dtype::F16)
    }
}

pub fn widen_bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}
pub fn narrow_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16 & 0x8000) | 0x7fc0;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}
pub fn widen_f16(_bits: u16) -> f32 {
    todo!()
}
pub fn narrow_f16(_x: f32) -> u16 {
    todo!()
}
pub fn stochastic_bf16(x: f32, random: u32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16 & 0x8000) | 0x7fc0;
    }
    let a = b & 0x7fff_ffff;
    (((b >> 16) & 0x8000) | ((a + (random & 0xffff)) >> 16)) as u16
}
pub fn stochastic_f16(_x: f32, _random: u32) -> u16 {
    todo!()
}
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846ca68b);
    x ^= x >> 16;
    x
}
pub fn rounding_bits(seed: u64, t: u32, index: u32) -> u32 {
    mix(mix(mix(mix(seed as u32) ^ (seed >> 32) as u32) ^ t) ^ index)
}
pub fn round_to(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::Bf16 => widen_bf16(narrow_bf16(x)),
        Dtype::F16 => widen_f16(narrow_f16(x)),
        Dtype::F32 | Dtype::Q8 => x,
    }
}
