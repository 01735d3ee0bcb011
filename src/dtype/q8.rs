//! Block-wise 8-bit state (`q8`, `docs/semantics.md`, "Storage dtypes"), on the host: the
//! dynamic quantisation maps of bitsandbytes' 8-bit Adam (Dettmers et al. 2022) and the exact
//! quantisation rule. The building block the q8 kernel and the CPU reference will share; the
//! kernel path itself is not built yet (issue 12), so no optimizer stores q8 today.
//!
//! Owns: the maps and the rounding of a block to codes. May not touch the GPU.

/// Elements per block: each block of a tensor has its own `absmax`.
pub const BLOCK: usize = 256;

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

/// One block's values as q8 stores them: its `absmax` (the largest magnitude, 0 for a block of
/// zeros) and a code per value.
pub fn quantize_block(map: &[f32; 256], values: &[f32]) -> (f32, Vec<u8>) {
    assert!(
        values.len() <= BLOCK,
        "a block holds at most {BLOCK} values"
    );
    let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let zero = nearest_code(map, 0.0, 1.0);
    let codes = values
        .iter()
        .map(|&v| {
            if absmax == 0.0 {
                zero
            } else {
                nearest_code(map, v, absmax)
            }
        })
        .collect();
    (absmax, codes)
}

/// A stored value: `map[code] * absmax`, rounded once to f32.
pub fn dequantize(map: &[f32; 256], absmax: f32, code: u8) -> f32 {
    map[code as usize] * absmax
}

/// What storing `values` (one tensor) as q8 and reading them back gives, block by block from
/// its first element: the reference's rounding to q8.
pub fn round_tensor(map: &[f32; 256], values: &mut [f32]) {
    for block in values.chunks_mut(BLOCK) {
        let (absmax, codes) = quantize_block(map, block);
        for (v, c) in block.iter_mut().zip(codes) {
            *v = dequantize(map, absmax, c);
        }
    }
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

    #[test]
    fn nearest_code_is_the_nearest_entry_lower_on_ties() {
        let mut rng = Rng::new(8);
        for signed in [true, false] {
            let map = dynamic_map(signed);
            // Random values, values on entries, and exact midpoints (ties).
            let mut cases: Vec<(f32, f32)> = (0..20_000)
                .map(|_| {
                    let absmax = (rng.uniform() * 10.0) as f32 + 1e-3;
                    let r = if signed {
                        2.0 * rng.uniform() - 1.0
                    } else {
                        rng.uniform()
                    };
                    ((r * absmax as f64) as f32, absmax)
                })
                .collect();
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
            let map = dynamic_map(signed);
            let gap = map.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
            let mut values: Vec<f32> = rng.normals(1000, 1e-3);
            if !signed {
                values.iter_mut().for_each(|v| *v = v.abs());
            }
            values[300..556].fill(0.0); // one block (256..512) nearly, and a zero run
            let mut stored = values.clone();
            round_tensor(&map, &mut stored);
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
            round_tensor(&map, &mut zeros);
            assert!(zeros.iter().all(|z| *z == 0.0));
        }
    }
}
