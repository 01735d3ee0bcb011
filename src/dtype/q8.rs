//! Block-wise 8-bit state (`q8`, `docs/semantics.md`, "Storage dtypes"): the dynamic
//! quantisation maps of bitsandbytes' 8-bit Adam (Dettmers et al. 2022), the rounding of a
//! block to codes exactly as the kernel does it, and the layout of q8 state in a buffer. The
//! CPU reference, the state I/O and the checkpoints use these; `shaders/adam_family.wgsl`
//! (through the prelude of `protocol.rs`) is the device's copy of the rounding.
//!
//! # The rounding
//!
//! A block's `absmax` is the largest magnitude of its values, compared as the bits of
//! `|x|` (so a NaN, whose bits are above infinity's, wins and makes the block NaN). A value
//! `v` of a block with `absmax > 0` gets the code `c` = the count of thresholds `T_k` with
//! `v > f32(T_k * absmax)`, where `T_k = f32((map[k] + map[k + 1]) / 2)` (computed in f64):
//! the nearest map entry to `v / absmax`, the lower one on a tie, up to the rounding of the
//! threshold's product (a value within an ulp of a midpoint may take the other neighbour;
//! [`nearest_code`] is the exact rule, and a test bounds the difference). No division, and
//! only correctly rounded f32 products and comparisons: the kernel and this code agree bit
//! for bit. A block with `absmax == 0` stores the code of 0 everywhere.
//!
//! # In a buffer
//!
//! A span's q8 state is its tensors' blocks one after another (each tensor's from its first
//! element), [`BLOCK_WORDS`] u32 each: the f32 bits of `absmax`, then 64 words of four codes,
//! element `j` of the block in byte `j % 4` (little-endian) of word `1 + j / 4`. Codes past a
//! tensor's last element are the code of 0.
//!
//! Owns: the maps, the rounding and the block layout. May not touch the GPU.

/// Elements per block: each block of a tensor has its own `absmax`.
pub const BLOCK: usize = 256;

/// u32 words per block in a q8 buffer: `absmax`, then 64 words of four codes.
pub const BLOCK_WORDS: usize = 1 + BLOCK / 4;

/// Blocks of a tensor of `len` elements.
pub fn blocks(len: u64) -> u64 {
    len.div_ceil(BLOCK as u64)
}

/// The 256-entry dynamic map, sorted ascending: bitsandbytes' `create_dynamic_map(signed)`
/// with its defaults (7 exponent bits, 8 bits in all). For each exponent `i` in 0..7 the
/// entries are `10^(i - 6)` times the midpoints of `linspace(0.1, 1, n + 1)`, with `n = 2^i`
/// (signed, both signs) or `2^(i + 1)` (unsigned), then 0 and 1. Computed in f64 and rounded
/// once to f32 (torch computes the linspace and the products in f32, so an entry may differ
/// from bitsandbytes' by an ulp; the map is ours, uploaded by the host, and the reference and
/// the kernel share it).
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..7 {
        let n = if signed { 1usize << i } else { 1 << (i + 1) };
        let scale = 10f64.powi(i - 6);
        for k in 0..n {
            // linspace(0.1, 1, n + 1): boundaries k and k + 1, and their midpoint.
            let at = |j: usize| 0.1 + 0.9 * j as f64 / n as f64;
            let mean = (at(k) + at(k + 1)) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), 256, "the map has 256 entries");
    let mut map: Vec<f32> = data.into_iter().map(|x| x as f32).collect();
    map.sort_by(f32::total_cmp);
    map.try_into().expect("256 entries")
}

/// The code of the map entry nearest to `value / absmax` (`absmax > 0`), the lower entry when
/// two are exactly as near. Decided exactly, without dividing: `value / absmax` lies above the
/// midpoint of entries `c` and `c + 1` exactly when `2 value > (map[c] + map[c + 1]) absmax`,
/// which f64 evaluates without rounding (a sum of two f32 has at most 25 significant bits,
/// its product with an f32 at most 49).
pub fn nearest_code(map: &[f32; 256], value: f32, absmax: f32) -> u8 {
    let above = |c: usize| 2.0 * value as f64 > (map[c] as f64 + map[c + 1] as f64) * absmax as f64;
    // The first c whose upper midpoint the value does not pass (binary search: the map is
    // sorted, so `above` is true for a prefix of c).
    let (mut lo, mut hi) = (0usize, 255usize);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if above(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo as u8
}

/// One of the two maps with what rounding needs: its thresholds and the code of 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Map {
    /// `"dynamic_signed"` (m) or `"dynamic_unsigned"` (v and vmax): the checkpoint's name.
    pub name: &'static str,
    pub values: [f32; 256],
    /// `f32((values[k] + values[k + 1]) / 2)`, computed in f64.
    pub thresholds: [f32; 255],
    /// The code whose value is 0.
    pub zero: u8,
}

impl Map {
    /// bitsandbytes' map for m (`signed`) or for v and vmax.
    pub fn new(signed: bool) -> Self {
        let values = dynamic_map(signed);
        let mut thresholds = [0f32; 255];
        for (k, t) in thresholds.iter_mut().enumerate() {
            *t = ((values[k] as f64 + values[k + 1] as f64) / 2.0) as f32;
        }
        Map {
            name: if signed {
                "dynamic_signed"
            } else {
                "dynamic_unsigned"
            },
            values,
            thresholds,
            zero: values
                .iter()
                .position(|&x| x == 0.0)
                .expect("0 is an entry") as u8,
        }
    }

    /// The map a state uses: signed for `exp_avg`, unsigned for `exp_avg_sq` and
    /// `max_exp_avg_sq`.
    pub fn for_state(state: &str) -> Self {
        Map::new(state == "exp_avg")
    }

    /// The map named `name` (as [`Map::name`]), if any.
    pub fn named(name: &str) -> Option<Self> {
        [Map::new(true), Map::new(false)]
            .into_iter()
            .find(|m| m.name == name)
    }

    /// The code of `value` in a block whose largest magnitude is `absmax` (module docs): the
    /// count of thresholds `T` with `value > f32(T * absmax)`, by binary search (the products
    /// are non-decreasing in `T`), the code of 0 when `absmax` is 0. The kernel's rule.
    pub fn code(&self, value: f32, absmax: f32) -> u8 {
        if absmax == 0.0 {
            return self.zero;
        }
        let mut code = 0usize;
        for step in [128, 64, 32, 16, 8, 4, 2, 1] {
            if value > self.thresholds[code + step - 1] * absmax {
                code += step;
            }
        }
        code as u8
    }

    /// A stored value: `values[code] * absmax`, rounded once to f32.
    pub fn value(&self, absmax: f32, code: u8) -> f32 {
        self.values[code as usize] * absmax
    }

    /// One block (at most [`BLOCK`] values) as stored: its absmax and codes.
    pub fn quantize(&self, values: &[f32]) -> (f32, Vec<u8>) {
        assert!(
            values.len() <= BLOCK,
            "a block holds at most {BLOCK} values"
        );
        let absmax = absmax(values);
        (
            absmax,
            values.iter().map(|&v| self.code(v, absmax)).collect(),
        )
    }

    /// What storing `values` (one tensor) and reading them back gives, block by block from
    /// its first element: the reference's rounding to q8.
    pub fn round_tensor(&self, values: &mut [f32]) {
        for block in values.chunks_mut(BLOCK) {
            let (absmax, codes) = self.quantize(block);
            for (v, c) in block.iter_mut().zip(codes) {
                *v = self.value(absmax, c);
            }
        }
    }

    /// `values` (one tensor) as q8 buffer words: [`blocks`] blocks of [`BLOCK_WORDS`].
    pub fn encode(&self, values: &[f32]) -> Vec<u32> {
        let mut absmax = Vec::new();
        let mut codes = Vec::new();
        for block in values.chunks(BLOCK) {
            let (a, c) = self.quantize(block);
            absmax.push(a);
            codes.extend(c);
        }
        self.pack(&absmax, &codes)
    }

    /// Raw blocks as buffer words: each block's absmax and its codes (`codes` holds the
    /// tensor's elements; the last block's missing ones get the code of 0).
    pub fn pack(&self, absmax: &[f32], codes: &[u8]) -> Vec<u32> {
        let mut words = Vec::with_capacity(absmax.len() * BLOCK_WORDS);
        for (b, a) in absmax.iter().enumerate() {
            words.push(a.to_bits());
            for w in 0..BLOCK / 4 {
                let mut word = 0u32;
                for j in 0..4 {
                    let code = codes
                        .get(b * BLOCK + 4 * w + j)
                        .copied()
                        .unwrap_or(self.zero);
                    word |= (code as u32) << (8 * j);
                }
                words.push(word);
            }
        }
        words
    }

    /// The absmax of each block and the first `len` codes in `words` (whole blocks).
    pub fn unpack(words: &[u32], len: usize) -> (Vec<f32>, Vec<u8>) {
        let absmax = words
            .chunks(BLOCK_WORDS)
            .map(|b| f32::from_bits(b[0]))
            .collect();
        let mut codes: Vec<u8> = words
            .chunks(BLOCK_WORDS)
            .flat_map(|b| b[1..].iter().flat_map(|w| w.to_le_bytes()))
            .collect();
        codes.truncate(len);
        (absmax, codes)
    }

    /// The `len` values stored in `words` (whole blocks), dequantised.
    pub fn decode(&self, words: &[u32], len: usize) -> Vec<f32> {
        let (absmax, codes) = Map::unpack(words, len);
        codes
            .iter()
            .enumerate()
            .map(|(i, &c)| self.value(absmax[i / BLOCK], c))
            .collect()
    }
}

/// The largest magnitude of `values` by the bits of `|x|` (0 for none; a NaN wins).
pub fn absmax(values: &[f32]) -> f32 {
    let bits = values.iter().map(|v| v.to_bits() & 0x7fff_ffff).max();
    f32::from_bits(bits.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    #[test]
    fn the_maps_have_bitsandbytes_shape() {
        for signed in [true, false] {
            let map = dynamic_map(signed);
            assert!(
                map.windows(2).all(|w| w[0] < w[1]),
                "sorted, distinct ({signed})"
            );
            assert_eq!(map[255], 1.0);
            assert!(map.contains(&0.0));
            // The smallest non-zero magnitude: 1e-6 times the first midpoint of 0.1..1.
            let smallest = map
                .iter()
                .filter(|x| **x != 0.0)
                .fold(1f32, |m, x| m.min(x.abs()));
            let want = if signed { 0.55e-6 } else { 0.325e-6 };
            assert!((smallest as f64 - want).abs() < 1e-12, "{smallest}");
            if signed {
                // 127 negative entries, 0, 128 positive (1 among them).
                assert_eq!(map.iter().filter(|x| **x < 0.0).count(), 127);
                assert_eq!(map[127], 0.0);
                // Every negative entry mirrors a positive one.
                assert!(map[..127].iter().all(|x| map.contains(&-x)));
            } else {
                assert_eq!(map[0], 0.0);
            }
        }
    }

    /// `n` random (value, absmax) pairs: absmax in [min_absmax, 10 + min_absmax), the value
    /// uniform in [-absmax, absmax] (`signed`) or [0, absmax].
    fn random_cases(rng: &mut Rng, signed: bool, n: usize, min_absmax: f32) -> Vec<(f32, f32)> {
        (0..n)
            .map(|_| {
                let absmax = (rng.uniform() * 10.0) as f32 + min_absmax;
                let r = if signed {
                    2.0 * rng.uniform() - 1.0
                } else {
                    rng.uniform()
                };
                ((r * absmax as f64) as f32, absmax)
            })
            .collect()
    }

    #[test]
    fn nearest_code_is_the_nearest_entry_lower_on_ties() {
        let mut rng = Rng::new(8);
        for signed in [true, false] {
            let map = dynamic_map(signed);
            // Random values, values on entries, and exact midpoints (ties).
            let mut cases = random_cases(&mut rng, signed, 20_000, 1e-3);
            for c in 0..255 {
                cases.push((map[c], 1.0));
                // An exact midpoint where f32 holds it (absmax 2 doubles exactly).
                let mid = (map[c] as f64 + map[c + 1] as f64) / 2.0;
                if mid as f32 as f64 == mid {
                    cases.push((mid as f32, 1.0));
                }
                cases.push(((map[c] as f64 + map[c + 1] as f64) as f32, 2.0));
            }
            for (value, absmax) in cases {
                let code = nearest_code(&map, value, absmax) as usize;
                let x = value as f64 / absmax as f64;
                let distance = |c: usize| (x - map[c] as f64).abs();
                let best = (0..256)
                    .min_by(|&a, &b| distance(a).total_cmp(&distance(b)).then(a.cmp(&b)))
                    .unwrap();
                // The division above rounds; where it decides, the exact rule may pick the
                // neighbour at an exact tie only.
                assert!(
                    code == best || (distance(code) - distance(best)).abs() <= 1e-15,
                    "{value} / {absmax}: code {code} ({}), nearest {best} ({})",
                    map[code],
                    map[best]
                );
                if code != best {
                    assert!(code < best, "a tie goes to the lower entry");
                }
            }
        }
    }

    #[test]
    fn blocks_round_trip_within_half_the_largest_gap() {
        let mut rng = Rng::new(9);
        for signed in [true, false] {
            let map = Map::new(signed);
            let gap = map
                .values
                .windows(2)
                .map(|w| w[1] - w[0])
                .fold(0f32, f32::max);
            let mut values: Vec<f32> = rng.normals(1000, 1e-3);
            if !signed {
                values.iter_mut().for_each(|v| *v = v.abs());
            }
            values[300..556].fill(0.0); // one block (256..512) nearly, and a zero run
            let mut stored = values.clone();
            map.round_tensor(&mut stored);
            for (b, (chunk, got)) in values.chunks(BLOCK).zip(stored.chunks(BLOCK)).enumerate() {
                let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (v, g) in chunk.iter().zip(got) {
                    assert!(
                        (v - g).abs() <= absmax * gap / 2.0 * (1.0 + 1e-6),
                        "block {b}: {v} -> {g}"
                    );
                }
                // The largest magnitude is stored exactly (map entry ±1, when present).
                if absmax > 0.0 && chunk.contains(&absmax) {
                    assert!(got.contains(&absmax), "block {b}");
                }
            }
            // A block of zeros stays zero.
            let mut zeros = vec![0f32; BLOCK];
            map.round_tensor(&mut zeros);
            assert!(zeros.iter().all(|z| *z == 0.0));
        }
    }

    #[test]
    fn the_kernel_rule_is_the_nearest_entry_but_within_an_ulp_of_a_midpoint() {
        let mut rng = Rng::new(10);
        for signed in [true, false] {
            let map = Map::new(signed);
            let mut differ = 0;
            let mut cases = random_cases(&mut rng, signed, 200_000, 1e-30);
            // Values next to every threshold, at a few scales.
            for k in 0..255 {
                for absmax in [1.0f32, 3.7, 1e-3, 6e4] {
                    let at = map.thresholds[k] * absmax;
                    for v in [
                        at,
                        f32::from_bits(at.to_bits() + 1),
                        f32::from_bits(at.to_bits() - 1),
                    ] {
                        cases.push((v, absmax));
                    }
                }
            }
            for (value, absmax) in cases {
                let exact = nearest_code(&map.values, value, absmax);
                let code = map.code(value, absmax);
                if code != exact {
                    differ += 1;
                    // Neighbours, and the value within two ulps of their midpoint's product.
                    assert_eq!(code.abs_diff(exact), 1, "{value} / {absmax}");
                    let k = code.min(exact) as usize;
                    let mid = map.thresholds[k] * absmax;
                    let ulps = (value.to_bits() as i64 - mid.to_bits() as i64).abs();
                    assert!(
                        ulps <= 2,
                        "{value} / {absmax}: {ulps} ulps from the midpoint"
                    );
                }
            }
            assert!(differ < 2000, "{differ} codes differ ({signed})");
            // The entries themselves, and the extremes, code exactly.
            for (c, &x) in map.values.iter().enumerate() {
                assert_eq!(map.code(x, 1.0) as usize, c);
            }
            assert_eq!(map.code(0.0, 0.0), map.zero);
            assert_eq!(map.value(0.0, map.zero), 0.0);
        }
    }

    #[test]
    fn blocks_pack_and_unpack() {
        let mut rng = Rng::new(11);
        for len in [1usize, 3, 255, 256, 257, 1000] {
            for signed in [true, false] {
                let map = Map::new(signed);
                let values: Vec<f32> = rng.normals(len, 0.1);
                let words = map.encode(&values);
                assert_eq!(words.len(), blocks(len as u64) as usize * BLOCK_WORDS);
                let mut want = values.clone();
                map.round_tensor(&mut want);
                assert_eq!(map.decode(&words, len), want);
                let (absmax, codes) = Map::unpack(&words, len);
                assert_eq!(map.pack(&absmax, &codes), words);
                // Codes past the tensor hold the code of 0.
                let last = words.len() - 1;
                if len % BLOCK != 0 && len % BLOCK <= BLOCK - 4 {
                    assert_eq!(words[last], u32::from_ne_bytes([map.zero; 4]));
                }
            }
        }
        // A NaN makes its block's absmax NaN; a block of zeros stays 0.
        assert!(absmax(&[1.0, f32::NAN, -3.0]).is_nan());
        assert_eq!(absmax(&[1.0, -3.0, 2.0]), 3.0);
        assert_eq!(absmax(&[0.0, -0.0]), 0.0);
        assert_eq!(Map::named("dynamic_signed"), Some(Map::new(true)));
        assert_eq!(Map::named("other"), None);
    }
}
