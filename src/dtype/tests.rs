//! The rounding functions against the `half` crate (hardware F16C where the CPU has it, and its
//! software path), against values computed in f64, and against the definitions in the module
//! docs; the random bits by their properties; `shaders/storage.wgsl` through naga.

use half::{bf16, f16};

use super::*;
use crate::testing::Rng;

/// The f32 bit patterns that exercise every rounding path, both signs: every exponent (f32
/// subnormals, f16 subnormals, overflow, infinity and NaN included) with the mantissas at
/// the boundaries of every dropped width k (13 for f16 normals, 14 to 24 for f16 subnormals,
/// 16 for bf16): exact ties with an even and an odd kept part, one below and one above them,
/// all-ones and all-zeros dropped bits; the specific thresholds besides.
fn structured_patterns() -> Vec<u32> {
    let mut rng = Rng::new(0x5eed_0001);
    let mut mantissas = vec![
        0u32, 1, 2, 3, 0x7f_ffff, 0x7f_fffe, 0x40_0000, 0x40_0001, 0x3f_ffff,
    ];
    for k in 13..=24u32 {
        let unit = 1u32 << k;
        let tie = unit >> 1;
        let mut highs = vec![0u32, 1, 2, 3];
        highs.extend((0..4).map(|_| rng.next_u64() as u32));
        for high in highs {
            for low in [0, 1, tie - 1, tie, tie + 1, unit - 1] {
                mantissas.push(((high << k) | low) & 0x7f_ffff);
            }
        }
    }
    mantissas.sort_unstable();
    mantissas.dedup();
    let mut patterns = Vec::new();
    for sign in [0u32, 0x8000_0000] {
        for exponent in 0..=255u32 {
            for &m in &mantissas {
                patterns.push(sign | (exponent << 23) | m);
            }
        }
        for specific in [
            65504.0f32.to_bits(),
            0x477f_efff, // just below 65520
            F16_ROUNDS_TO_INF,
            F16_ROUNDS_TO_INF + 1,
            F16_OVERFLOW - 1,
            F16_OVERFLOW,
            f32::MAX.to_bits(),
            0x7f7f_7fff, // just below the bf16 tie above its largest finite value
            0x7f7f_8000,
            0x7f7f_8001,
            0x3380_0000, // 2^-24, the smallest f16 subnormal
            0x3300_0000, // 2^-25, half of it: rounds to 0
            0x3300_0001,
            0x32ff_ffff,
            0x33c0_0000, // 1.5 * 2^-24: a tie to 2 * 2^-24
            0x3840_0000, // 0.75 * 2^-14 (the top f16 subnormal binade)
            0x387f_ffff, // just below the smallest normal f16
            0x7fc0_0000,
            0x7f80_0001,
            0x7fbf_ffff,
            0x7f80_2000,
            0x7f80_1fff,
        ] {
            patterns.push(sign | specific);
        }
    }
    patterns
}

/// Uniformly random f32 bits, then random values in and around the f16 range.
fn random_patterns(seed: u64, uniform: usize, f16_range: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let mut patterns: Vec<u32> = (0..uniform).map(|_| rng.next_u64() as u32).collect();
    patterns.extend((0..f16_range).map(|_| {
        let r = rng.next_u64();
        let exponent = 95 + (r >> 40) % 52; // 2^-32 .. 2^19
        ((r as u32) & 0x807f_ffff) | ((exponent as u32) << 23)
    }));
    patterns
}

fn all_patterns() -> Vec<u32> {
    let mut patterns = structured_patterns();
    patterns.extend(random_patterns(0x5eed_0002, 3_000_000, 1_000_000));
    patterns
}

fn is_nan_bits(bits: u32) -> bool {
    bits & 0x7fff_ffff > F32_INF
}

/// Collects mismatches and fails with their count and the first few.
struct Mismatches(&'static str, usize, Vec<String>);

impl Mismatches {
    fn new(what: &'static str) -> Self {
        Mismatches(what, 0, Vec::new())
    }
    fn check(&mut self, ok: bool, describe: impl FnOnce() -> String) {
        if !ok {
            self.1 += 1;
            if self.2.len() < 10 {
                self.2.push(describe());
            }
        }
    }
    fn assert_none(self) {
        assert!(
            self.1 == 0,
            "{}: {} mismatches, first: {:#?}",
            self.0,
            self.1,
            self.2
        );
    }
}

/// The two 16-bit formats, described for the tests.
#[derive(Clone, Copy, Debug)]
enum Format {
    Bf16,
    F16,
}

impl Format {
    fn narrow(self, x: f32) -> u16 {
        match self {
            Format::Bf16 => narrow_bf16(x),
            Format::F16 => narrow_f16(x),
        }
    }
    fn stochastic(self, x: f32, r: u32) -> u16 {
        match self {
            Format::Bf16 => stochastic_bf16(x, r),
            Format::F16 => stochastic_f16(x, r),
        }
    }
    fn widen(self, h: u16) -> f32 {
        match self {
            Format::Bf16 => widen_bf16(h),
            Format::F16 => widen_f16(h),
        }
    }
    /// The magnitude bits of infinity.
    fn inf(self) -> u16 {
        match self {
            Format::Bf16 => 0x7f80,
            Format::F16 => 0x7c00,
        }
    }
    /// The value of magnitude bits `m` (up to infinity's) in f64, computed from the format's
    /// definition rather than through `widen`; infinity's bits count as the next power of two
    /// past the largest finite value, as IEEE rounds "with an unbounded exponent".
    fn value(self, m: u16) -> f64 {
        let (mantissa_bits, bias) = match self {
            Format::Bf16 => (7, 127),
            Format::F16 => (10, 15),
        };
        let exponent = (m >> mantissa_bits) as i32;
        let mantissa = (m & ((1 << mantissa_bits) - 1)) as f64;
        let unit = 2f64.powi(1 - bias - mantissa_bits);
        if exponent == 0 {
            mantissa * unit
        } else {
            (mantissa + (1 << mantissa_bits) as f64) * unit * 2f64.powi(exponent - 1)
        }
    }
    /// The magnitude bits of the neighbours of finite `|x|` below 2^16 (f16) or any finite
    /// `|x|` (bf16): the largest value <= |x| and the smallest >= |x| (equal when exact).
    fn neighbours(self, x: f32) -> (u16, u16) {
        let ax = x.abs() as f64;
        // Bisection over the ordered magnitude bits 0..=inf.
        let (mut lo, mut hi) = (0u16, self.inf());
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.value(mid) <= ax {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if self.value(lo) == ax {
            (lo, lo)
        } else {
            (lo, hi)
        }
    }
}

#[test]
fn names_parse_back_and_nothing_else_does() {
    assert_eq!(Dtype::default(), Dtype::F32);
    for (d, name, bytes, is_16bit) in [
        (Dtype::F32, "f32", 4, false),
        (Dtype::Bf16, "bf16", 2, true),
        (Dtype::F16, "f16", 2, true),
        (Dtype::Q8, "q8", 1, false),
    ] {
        assert_eq!(d.name(), name);
        assert_eq!(Dtype::parse(name), Some(d));
        assert_eq!(d.bytes(), bytes, "{d:?}");
        assert_eq!(d.is_16bit(), is_16bit, "{d:?}");
        for wrong in [
            name.to_uppercase(),
            format!(" {name}"),
            format!("{name} "),
            format!("{name}x"),
        ] {
            assert_eq!(Dtype::parse(&wrong), None, "{wrong:?}");
        }
    }
    for wrong in [
        "", "float32", "bfloat16", "half", "float16", "fp16", "int8", "u8",
    ] {
        assert_eq!(Dtype::parse(wrong), None, "{wrong:?}");
    }
}

#[test]
fn round_to_is_widen_of_narrow_or_the_value() {
    for bits in random_patterns(0x5eed_0003, 100_000, 100_000) {
        let x = f32::from_bits(bits);
        let want_bf16 = widen_bf16(narrow_bf16(x));
        let want_f16 = widen_f16(narrow_f16(x));
        assert_eq!(
            round_to(Dtype::Bf16, x).to_bits(),
            want_bf16.to_bits(),
            "{bits:#x}"
        );
        assert_eq!(
            round_to(Dtype::F16, x).to_bits(),
            want_f16.to_bits(),
            "{bits:#x}"
        );
        assert_eq!(round_to(Dtype::F32, x).to_bits(), bits);
        assert_eq!(round_to(Dtype::Q8, x).to_bits(), bits);
    }
    // Rounding does something: 1 + 2^-10 is an f16 but not a bf16; 1 + 2^-12 neither.
    assert_eq!(
        round_to(Dtype::F16, 1.0 + 2f32.powi(-10)),
        1.0 + 2f32.powi(-10)
    );
    assert_eq!(round_to(Dtype::Bf16, 1.0 + 2f32.powi(-10)), 1.0);
    assert_eq!(round_to(Dtype::F16, 1.0 + 2f32.powi(-12)), 1.0);
}

#[test]
fn widening_is_exact_for_every_16_bit_value() {
    let mut bad = Mismatches::new("widen");
    for h in 0..=u16::MAX {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        // bf16: the upper half of an f32, a NaN's payload and signalling bit included (half
        // makes a NaN quiet, so it is the oracle only for numbers).
        let got = widen_bf16(h);
        if is_nan_bits((h as u32) << 16) {
            bad.check(got.to_bits() == (h as u32) << 16, || {
                format!("bf16 NaN {h:#06x}")
            });
        } else {
            let want = bf16::from_bits(h).to_f32();
            bad.check(got.to_bits() == want.to_bits(), || {
                format!("bf16 {h:#06x}: {got} vs half {want}")
            });
            let value = sign * Format::Bf16.value(h & 0x7fff);
            if h & 0x7fff != 0x7f80 {
                bad.check(got as f64 == value, || {
                    format!("bf16 {h:#06x}: {got} vs {value}")
                });
            }
        }
        // f16: numbers exact, a NaN quiet with sign and payload.
        let got = widen_f16(h);
        let (exponent, mantissa) = ((h >> 10) & 0x1f, (h & 0x3ff) as u32);
        if exponent == 0x1f && mantissa != 0 {
            let want = ((h as u32 & 0x8000) << 16) | 0x7fc0_0000 | (mantissa << 13);
            bad.check(got.to_bits() == want, || {
                format!("f16 NaN {h:#06x}: {:#x}", got.to_bits())
            });
        } else if exponent == 0x1f {
            bad.check(got == sign as f32 * f32::INFINITY, || {
                format!("f16 inf {h:#06x}")
            });
        } else {
            let value = sign * Format::F16.value(h & 0x7fff);
            bad.check(
                got as f64 == value && got.is_sign_negative() == (sign < 0.0),
                || format!("f16 {h:#06x}: {got} vs {value}"),
            );
        }
        let want = f16::from_bits(h).to_f32();
        bad.check(got.to_bits() == want.to_bits(), || {
            format!("f16 {h:#06x}: {got:e} vs half {want:e}")
        });
        let want = f16::from_bits(h).to_f32_const();
        bad.check(got.to_bits() == want.to_bits(), || {
            format!("f16 {h:#06x}: {got:e} vs half's software {want:e}")
        });
    }
    bad.assert_none();
}

#[test]
fn narrowing_a_widened_value_gives_it_back() {
    let mut bad = Mismatches::new("round trip");
    for h in 0..=u16::MAX {
        let sign = h & 0x8000;
        for (format, canonical_nan) in [(Format::Bf16, 0x7fc0), (Format::F16, 0x7e00)] {
            let x = format.widen(h);
            let back = format.narrow(x);
            let want = if x.is_nan() { sign | canonical_nan } else { h };
            bad.check(back == want, || {
                format!("{format:?} {h:#06x} -> {x:e} -> {back:#06x}")
            });
        }
    }
    bad.assert_none();
}

#[test]
fn nearest_is_halfs_and_the_nearest_value() {
    let mut bad = Mismatches::new("nearest");
    let structured = structured_patterns().len();
    for (i, bits) in all_patterns().into_iter().enumerate() {
        let x = f32::from_bits(bits);
        let sign = ((bits >> 16) & 0x8000) as u16;
        let (got_bf16, got_f16) = (narrow_bf16(x), narrow_f16(x));
        if x.is_nan() {
            bad.check(got_bf16 == sign | 0x7fc0, || {
                format!("bf16 NaN {bits:#x}: {got_bf16:#x}")
            });
            bad.check(got_f16 == sign | 0x7e00, || {
                format!("f16 NaN {bits:#x}: {got_f16:#x}")
            });
            continue;
        }
        let want = bf16::from_f32(x).to_bits();
        bad.check(got_bf16 == want, || {
            format!("bf16 {bits:#x}: {got_bf16:#x} vs half {want:#x}")
        });
        let want = f16::from_f32(x).to_bits();
        bad.check(got_f16 == want, || {
            format!("f16 {bits:#x}: {got_f16:#x} vs half {want:#x}")
        });
        let want = f16::from_f32_const(x).to_bits();
        bad.check(got_f16 == want, || {
            format!("f16 {bits:#x}: {got_f16:#x} vs half's software {want:#x}")
        });
        // Independently of half, on the structured patterns: no 16-bit value is nearer, and of
        // two as near the even one was taken.
        if i < structured && x.is_finite() {
            for (format, got) in [(Format::Bf16, got_bf16), (Format::F16, got_f16)] {
                let m = got & 0x7fff;
                let ax = x.abs() as f64;
                let distance = (format.value(m) - ax).abs();
                let mut others = vec![];
                if m > 0 {
                    others.push(m - 1);
                }
                if m < format.inf() {
                    others.push(m + 1);
                }
                for other in others {
                    let d = (format.value(other) - ax).abs();
                    bad.check(
                        (got & 0x8000) == sign && (distance < d || (distance == d && m % 2 == 0)),
                        || format!("{format:?} {bits:#x}: {got:#x} is not the nearest"),
                    );
                }
            }
        }
    }
    bad.assert_none();
}

/// Random words for the stochastic tests: edge values, then random ones.
fn random_words(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut words = vec![
        0,
        1,
        0x1fff,
        0x2000,
        0xffff,
        0x1_0000,
        0x7fff_ffff,
        0x8000_0000,
        u32::MAX,
    ];
    words.extend((0..n).map(|_| rng.next_u64() as u32));
    words
}

#[test]
fn stochastic_never_moves_a_representable_value() {
    let mut rng = Rng::new(0x5eed_0004);
    let words = random_words(&mut rng, 8);
    let mut bad = Mismatches::new("stochastic, representable");
    for h in 0..=u16::MAX {
        for format in [Format::Bf16, Format::F16] {
            let x = format.widen(h);
            let want = format.narrow(x);
            for &r in &words {
                let got = format.stochastic(x, r);
                bad.check(got == want, || {
                    format!("{format:?} {h:#06x} with {r:#x}: {got:#06x}")
                });
            }
        }
    }
    bad.assert_none();
}

#[test]
fn stochastic_picks_one_of_the_two_neighbours() {
    let mut rng = Rng::new(0x5eed_0005);
    let mut bad = Mismatches::new("stochastic, neighbours");
    let mut moved = [0u64; 2];
    let patterns = all_patterns();
    for &bits in &patterns {
        let x = f32::from_bits(bits);
        let r = rng.next_u64() as u32;
        for (f, format) in [Format::Bf16, Format::F16].into_iter().enumerate() {
            let got = format.stochastic(x, r);
            let sign = ((bits >> 16) & 0x8000) as u16;
            // Sign symmetry: -x rounds to the negated result with the same random word.
            let negated = format.stochastic(-x, r);
            bad.check(negated == got ^ 0x8000, || {
                format!("{format:?} {bits:#x}: -x gives {negated:#x}")
            });
            if x.is_nan() {
                let want = format.narrow(x);
                bad.check(got == want, || {
                    format!("{format:?} NaN {bits:#x}: {got:#x}")
                });
                continue;
            }
            if x.is_infinite() || (matches!(format, Format::F16) && x.abs() >= 65536.0) {
                let want = sign | format.inf();
                bad.check(got == want, || {
                    format!("{format:?} {bits:#x}: {got:#x}, not infinity")
                });
                continue;
            }
            let (down, up) = format.neighbours(x);
            bad.check(
                (got & 0x8000) == sign && (got & 0x7fff == down || got & 0x7fff == up),
                || {
                    format!(
                        "{format:?} {bits:#x} ({x:e}) with {r:#x}: {got:#x}, not {down:#x}/{up:#x}"
                    )
                },
            );
            moved[f] += (got & 0x7fff == up && up != down) as u64;
        }
    }
    bad.assert_none();
    // Both directions happen (a function that always truncated would pass the check above).
    let n = patterns.len() as u64;
    assert!(
        moved.iter().all(|&m| m > n / 10),
        "rounded up: {moved:?} of {n}"
    );
}

/// For x whose dropped width is `k <= 24`: over every value of the random word's low k bits
/// (the bits above random), the result is the upper-magnitude neighbour exactly
/// `2^k (|x| - down) / (up - down)` times, and the results average to exactly x.
fn check_every_random_value(format: Format, x: f32, k: u32, rng: &mut Rng) {
    let (down, up) = format.neighbours(x);
    let ax = x.abs() as f64;
    let spacing = format.value(up) - format.value(down);
    let want_up = if up == down {
        0.0
    } else {
        (ax - format.value(down)) / spacing * 2f64.powi(k as i32)
    };
    assert_eq!(
        want_up,
        want_up.trunc(),
        "{format:?} {x:e}: k = {k} is not the dropped width"
    );
    let (mut ups, mut sum) = (0u64, 0f64);
    for low in 0..1u32 << k {
        let high = if k < 32 {
            (rng.next_u64() as u32) << k
        } else {
            0
        };
        let got = format.stochastic(x, high | low);
        assert_eq!(got & 0x8000, if x < 0.0 { 0x8000 } else { 0 }, "{x:e}");
        let m = got & 0x7fff;
        assert!(
            m == down || m == up,
            "{format:?} {x:e} with {low:#x}: {got:#x}"
        );
        ups += (m == up && up != down) as u64;
        sum += format.value(m); // exact: every value is a multiple of the smallest one's unit
    }
    assert_eq!(
        ups as f64,
        want_up,
        "{format:?} {x:e} ({:#x}): up {ups} times of 2^{k}",
        x.to_bits()
    );
    assert_eq!(
        sum / 2f64.powi(k as i32),
        ax,
        "{format:?} {x:e}: the mean is not x"
    );
}

#[test]
fn stochastic_rounds_up_with_exactly_the_distance_over_the_spacing() {
    let mut rng = Rng::new(0x5eed_0006);
    // bf16: k = 16, normals, f32 subnormals, ties, near the top, above the largest bf16.
    for bits in [
        0x3f80_0001u32,
        0x3f80_8000,
        0x3f80_ffff,
        0x4049_0fdb,
        0x0000_1234,
        0x0001_8000,
        0x7f7f_8000,
        0x7f7f_ffff,
    ] {
        for sign in [0, 0x8000_0000] {
            check_every_random_value(Format::Bf16, f32::from_bits(sign | bits), 16, &mut rng);
        }
    }
    // A few random normals.
    for _ in 0..4 {
        let bits = (rng.next_u64() as u32 & 0x807f_ffff) | (((rng.below(200) + 20) as u32) << 23);
        check_every_random_value(Format::Bf16, f32::from_bits(bits), 16, &mut rng);
    }
    // f16 normals: k = 13, including above the largest finite f16 (rounds up to infinity).
    for x in [
        1.0f32 + 2f32.powi(-20),
        std::f32::consts::PI,
        -1000.1,
        6.2e-5,
        65505.0,
        65520.0,
        65535.99,
    ] {
        check_every_random_value(Format::F16, x, 13, &mut rng);
    }
    // f16 subnormals: k = 126 - biased exponent, 14 (just under 2^-14) to 24 (2^-25 and up).
    // (Several mantissas and both signs where 2^k is small; one random one above.)
    for k in 14..=24u32 {
        let exponent = 126 - k;
        let random = rng.next_u64() as u32 & 0x7f_ffff;
        let mantissas = if k <= 18 {
            vec![1u32, 0x40_0000, 0x7f_ffff, random]
        } else {
            vec![random]
        };
        for mantissa in mantissas {
            for sign in [0, 0x8000_0000]
                .into_iter()
                .take(if k <= 18 { 2 } else { 1 })
            {
                let x = f32::from_bits(sign | (exponent << 23) | mantissa);
                check_every_random_value(Format::F16, x, k, &mut rng);
            }
        }
    }
}

#[test]
fn stochastic_below_the_f16_subnormals_uses_the_top_32_dropped_bits() {
    // k from 25 to 125: too many random values to enumerate. The definition: up exactly when
    // (d >> (k - 32)) + u >= 2^32 for k > 32, d + u >= 2^k otherwise, with d the significand
    // (implicit bit included), which lies wholly below 2^-24. Check both sides of the
    // threshold against the value computed in f64: d / 2^k = |x| / 2^-24.
    let mut rng = Rng::new(0x5eed_0007);
    for exponent in 0..=101u32 {
        let k = 126 - exponent.max(1);
        for _ in 0..20 {
            let bits = (rng.next_u64() as u32 & 0x807f_ffff) | (exponent << 23);
            let x = f32::from_bits(bits);
            let sign = ((bits >> 16) & 0x8000) as u16;
            let fraction = x.abs() as f64 / 2f64.powi(-24); // d / 2^k, in (0, 1)
            let top = (fraction * 2f64.powi(k.min(32) as i32)).floor(); // d's top <= 32 bits
            assert!(top < 2f64.powi(32), "{x:e}");
            if top == 0.0 {
                for r in [0, u32::MAX, rng.next_u64() as u32] {
                    assert_eq!(stochastic_f16(x, r), sign, "{x:e} with {r:#x}");
                }
                continue;
            }
            let mask = (2f64.powi(k.min(32) as i32) - 1.0) as u32;
            // The smallest u that carries.
            let threshold = (2f64.powi(k.min(32) as i32) - top) as u32;
            let high = if k < 32 {
                (rng.next_u64() as u32) & !mask
            } else {
                0
            };
            assert_eq!(
                stochastic_f16(x, high | threshold),
                sign | 1,
                "{x:e}: u = {threshold:#x}"
            );
            assert_eq!(
                stochastic_f16(x, high | (threshold - 1)),
                sign,
                "{x:e}: u = {threshold:#x} - 1"
            );
            assert_eq!(stochastic_f16(x, high | mask), sign | 1, "{x:e}");
            assert_eq!(stochastic_f16(x, high), sign, "{x:e}");
        }
    }
}

#[test]
fn stochastic_keeps_infinity_and_nan() {
    let mut rng = Rng::new(0x5eed_0008);
    for r in random_words(&mut rng, 100) {
        for sign in [0u32, 0x8000_0000] {
            let s = (sign >> 16) as u16;
            let inf = f32::from_bits(sign | F32_INF);
            assert_eq!(stochastic_bf16(inf, r), s | 0x7f80);
            assert_eq!(stochastic_f16(inf, r), s | 0x7c00);
            assert_eq!(
                stochastic_f16(f32::from_bits(sign | F16_OVERFLOW), r),
                s | 0x7c00
            );
            assert_eq!(
                stochastic_f16(f32::from_bits(sign | f32::MAX.to_bits()), r),
                s | 0x7c00
            );
            for nan in [0x7fc0_0000u32, 0x7f80_0001, 0x7fff_ffff, 0x7fa0_2000] {
                let x = f32::from_bits(sign | nan);
                assert_eq!(stochastic_bf16(x, r), s | 0x7fc0, "{nan:#x}");
                assert_eq!(stochastic_f16(x, r), s | 0x7e00, "{nan:#x}");
            }
        }
    }
}

/// The inverse of `mix32`, built from the documented steps: proves it is those steps, and a
/// bijection.
fn unmix32(mut x: u32) -> u32 {
    // The inverse of an odd multiplier modulo 2^32, by Newton's iteration (each step doubles
    // the correct low bits: 3 -> 6 -> 12 -> 24 -> 48).
    let inverse = |c: u32| {
        let mut i = c;
        for _ in 0..4 {
            i = i.wrapping_mul(2u32.wrapping_sub(c.wrapping_mul(i)));
        }
        assert_eq!(c.wrapping_mul(i), 1);
        i
    };
    // y = x ^ (x >> s) is undone by xoring in y >> s, y >> 2s, ... while the shift is < 32.
    let unshift = |y: u32, s: u32| {
        let mut x = y;
        let mut shift = s;
        while shift < 32 {
            x ^= y >> shift;
            shift += s;
        }
        x
    };
    x = unshift(x, 16);
    x = x.wrapping_mul(inverse(0x846c_a68b));
    x = unshift(x, 15);
    x = x.wrapping_mul(inverse(0x7feb_352d));
    unshift(x, 16)
}

#[test]
fn the_mix_is_the_documented_bijection() {
    let mut rng = Rng::new(0x5eed_0009);
    for x in (0..100_000u32).chain((0..1_000_000).map(|_| rng.next_u64() as u32)) {
        assert_eq!(unmix32(mix32(x)), x, "{x:#x}");
    }
    let mut seen = std::collections::HashSet::new();
    assert!(
        (0..100_000u32).all(|x| seen.insert(mix32(x))),
        "two inputs share an output"
    );
    // Not the identity or a plain permutation of bits: it mixes.
    assert_ne!(mix32(1).count_ones(), 1);
}

#[test]
fn rounding_bits_depend_on_every_argument() {
    // With the others fixed, rounding_bits is a bijection of each argument (a chain of
    // bijections), so any change of one argument changes the result: check that no argument
    // is dropped or cancelled.
    let mut rng = Rng::new(0x5eed_000a);
    for _ in 0..100_000 {
        let (seed, t, index) = (rng.next_u64(), rng.next_u64() as u32, rng.next_u64() as u32);
        let base = rounding_bits(seed, t, index);
        let delta = (rng.next_u64() as u32).max(1);
        assert_ne!(base, rounding_bits(seed ^ delta as u64, t, index));
        assert_ne!(base, rounding_bits(seed ^ ((delta as u64) << 32), t, index));
        assert_ne!(base, rounding_bits(seed, t ^ delta, index));
        assert_ne!(base, rounding_bits(seed, t, index ^ delta));
        assert_ne!(base, rounding_bits(seed, t.wrapping_add(1), index));
        assert_ne!(base, rounding_bits(seed, t, index.wrapping_add(1)));
    }
}

/// Pearson's chi-square statistic of `counts` against equal expected counts.
fn chi_square(counts: &[u64]) -> f64 {
    let n: u64 = counts.iter().sum();
    let expected = n as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

/// Fails unless `counts` (over `bins` equally likely bins) look uniform: for a good hash the
/// statistic has mean `df = bins - 1` and standard deviation `sqrt(2 df)`, and is close to
/// normal at these sizes; 6 standard deviations either side leave a false failure below 1e-6
/// (the data are fixed, so the test passes or fails for good). The upper side catches biases
/// of about 1% in a bin, the lower side a sequence too regular to be random (the identity map
/// of consecutive indices gives 0).
fn assert_uniform(what: &str, counts: &[u64]) {
    let df = (counts.len() - 1) as f64;
    let bound = 6.0 * (2.0 * df).sqrt();
    let chi2 = chi_square(counts);
    assert!(
        (chi2 - df).abs() <= bound,
        "{what}: chi-square {chi2:.1}, want {df} +- {bound:.1}"
    );
}

/// Each of the 32 bits is set in half the words, within 6 standard deviations (sqrt(n) / 2).
fn assert_bits_balanced(what: &str, words: &[u32]) {
    let n = words.len() as f64;
    for bit in 0..32 {
        let ones = words.iter().filter(|&&w| w >> bit & 1 == 1).count() as f64;
        assert!(
            (ones - n / 2.0).abs() <= 3.0 * n.sqrt(),
            "{what}: bit {bit} set {ones} times of {n}"
        );
    }
}

#[test]
fn rounding_bits_look_uniform_over_indices_steps_and_seeds() {
    const N: u32 = 1_000_000;
    for (seed, t) in [
        (0u64, 1u32),
        (0x0123_4567_89ab_cdef, 1000),
        (u64::MAX, u32::MAX),
    ] {
        let words: Vec<u32> = (0..N).map(|i| rounding_bits(seed, t, i)).collect();
        let what = format!("seed {seed:#x}, t {t}, indices 0..{N}");
        // Low 8 bits (256 bins, ~3900 per bin) and low 16 (the bits bf16 uses, ~15 per bin).
        let mut low8 = vec![0u64; 256];
        let mut low16 = vec![0u64; 65536];
        // Neighbouring elements: the pair of their low 4 bits (256 bins).
        let mut pairs = vec![0u64; 256];
        for (i, &w) in words.iter().enumerate() {
            low8[(w & 0xff) as usize] += 1;
            low16[(w & 0xffff) as usize] += 1;
            if i > 0 {
                pairs[((words[i - 1] & 0xf) << 4 | (w & 0xf)) as usize] += 1;
            }
        }
        assert_uniform(&format!("{what}, low 8 bits"), &low8);
        assert_uniform(&format!("{what}, low 16 bits"), &low16);
        assert_uniform(&format!("{what}, neighbours' low 4 bits"), &pairs);
        assert_bits_balanced(&what, &words);
    }
    // Over steps t for one element, and the same element at consecutive steps.
    let words: Vec<u32> = (0..N).map(|t| rounding_bits(7, t, 12345)).collect();
    let mut low8 = vec![0u64; 256];
    let mut pairs = vec![0u64; 256];
    for (t, &w) in words.iter().enumerate() {
        low8[(w & 0xff) as usize] += 1;
        if t > 0 {
            pairs[((words[t - 1] & 0xf) << 4 | (w & 0xf)) as usize] += 1;
        }
    }
    assert_uniform("steps 0..N, low 8 bits", &low8);
    assert_uniform("consecutive steps, low 4 bits", &pairs);
    assert_bits_balanced("steps", &words);
    // Over seeds: consecutive low halves, and consecutive high halves.
    for shift in [0, 32] {
        let words: Vec<u32> = (0..N as u64)
            .map(|s| rounding_bits(s << shift, 1, 0))
            .collect();
        let mut low8 = vec![0u64; 256];
        for &w in &words {
            low8[(w & 0xff) as usize] += 1;
        }
        assert_uniform(&format!("seeds << {shift}, low 8 bits"), &low8);
        assert_bits_balanced(&format!("seeds << {shift}"), &words);
    }
}

const STORAGE_WGSL: &str = include_str!("../../shaders/storage.wgsl");

fn validate(source: &str) -> naga::Module {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string(source)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{e:?}"));
    module
}

#[test]
fn storage_wgsl_is_self_contained_and_fits_between_the_prelude_and_the_family() {
    let module = validate(STORAGE_WGSL);
    assert!(
        module.global_variables.is_empty(),
        "storage.wgsl declares bindings"
    );
    assert!(
        module.overrides.is_empty(),
        "storage.wgsl declares overrides"
    );
    assert!(
        module.entry_points.is_empty(),
        "storage.wgsl declares entry points"
    );
    for (name, arguments) in [
        ("widen_bf16", 1),
        ("narrow_bf16", 1),
        ("widen_f16", 1),
        ("narrow_f16", 1),
        ("stochastic_bf16", 2),
        ("stochastic_f16", 2),
        ("rounding_bits", 4),
        ("mix32", 1),
    ] {
        let function = module
            .functions
            .iter()
            .map(|(_, f)| f)
            .find(|f| f.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("storage.wgsl has no {name}"));
        assert_eq!(function.arguments.len(), arguments, "{name}");
    }
    // No conversion or float arithmetic decides a rounding: a float is only ever bitcast (this
    // also rules out pack2x16float, unpack2x16float and quantizeToF16, which are `Math`).
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .expect("validated above");
    for (handle, function) in module.functions.iter() {
        let is_float = |e: naga::Handle<naga::Expression>| {
            info[handle][e].ty.inner_with(&module.types).scalar_kind()
                == Some(naga::ScalarKind::Float)
        };
        for (e, expression) in function.expressions.iter() {
            let float_operation = match *expression {
                naga::Expression::Binary { left, right, .. } => is_float(left) || is_float(right),
                naga::Expression::Unary { expr, .. } => is_float(expr),
                naga::Expression::Math { arg, .. } => is_float(arg) || is_float(e),
                naga::Expression::Select { accept, .. } => is_float(accept),
                naga::Expression::As {
                    expr,
                    kind,
                    convert,
                } => convert.is_some() && (is_float(expr) || kind == naga::ScalarKind::Float),
                _ => false,
            };
            assert!(
                !float_operation,
                "{:?}: float arithmetic or conversion {expression:?} ({e:?})",
                function.name
            );
        }
    }
    for width in crate::protocol::Width::ALL {
        validate(&crate::gpu::wgsl_source(
            width,
            &crate::protocol::Storage::default(),
        ));
    }
}
