//! `shaders/storage.wgsl` on the device is `wgpu_optim::dtype` on the host, bit for bit: every
//! function applied to about a million inputs (every 16-bit value, f32 patterns at every
//! rounding boundary, random ones, random words and hash arguments) by a small compute shader
//! appended to the file, and compared with the Rust functions.

mod common;

use common::{Rng, gpu};
use wgpu_optim::dtype::{
    narrow_bf16, narrow_f16, rounding_bits, stochastic_bf16, stochastic_f16, widen_bf16, widen_f16,
};
use wgpu_optim::testing::{auxiliary_pipeline, workgroup_grid};

const STORAGE_WGSL: &str = include_str!("../shaders/storage.wgsl");

/// Applies each function to one input. `words[i]` = (x's bits, a random word r, two 16-bit
/// values h, a word w); `values[i]` holds the same x as an f32 (the way the kernel will get
/// it, through an f32 load), and one extra element 1.0, read at run time.
const HARNESS: &str = r#"
@group(0) @binding(0) var<storage, read> words: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> values: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@group(0) @binding(3) var<storage, read_write> widened: array<f32>;

const OUTPUTS: u32 = 11u;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = id.x + id.y * groups.x * 64u;
    if (i >= arrayLength(&words)) {
        return;
    }
    let w = words[i];
    let x = bitcast<f32>(w.x);
    let loaded = values[i];
    let one = values[arrayLength(&values) - 1u];
    let o = i * OUTPUTS;
    out[o] = narrow_bf16(x);
    out[o + 1u] = narrow_f16(x);
    out[o + 2u] = stochastic_bf16(x, w.y);
    out[o + 3u] = stochastic_f16(x, w.y);
    out[o + 4u] = bitcast<u32>(widen_bf16(w.z & 0xffffu));
    out[o + 5u] = bitcast<u32>(widen_f16(w.z & 0xffffu));
    out[o + 6u] = bitcast<u32>(widen_f16(w.z >> 16u));
    out[o + 7u] = rounding_bits(w.y, w.z, w.x, w.w);
    out[o + 8u] = narrow_bf16(loaded) | (narrow_f16(loaded) << 16u);
    out[o + 9u] = stochastic_bf16(loaded, w.w) | (stochastic_f16(loaded, w.w) << 16u);
    // Not a function of storage.wgsl: whether the driver keeps f32 subnormals in arithmetic.
    out[o + 10u] = bitcast<u32>(loaded * one);
    // Widened values stored as f32, as the kernel will.
    widened[2u * i] = widen_f16(w.z & 0xffffu);
    widened[2u * i + 1u] = widen_bf16(w.z >> 16u);
}
"#;
const OUTPUTS: usize = 11;

/// f32 bit patterns at every rounding boundary (the unit tests' set, in short): every
/// exponent, both signs, with the dropped bits of every width k (13: f16 normals, 14..=24:
/// f16 subnormals, 16: bf16) at 0, 1, a tie - 1, a tie, a tie + 1 and all ones, under kept
/// parts both even and odd; then thresholds.
fn structured_patterns(rng: &mut Rng) -> Vec<u32> {
    let mut mantissas = vec![0u32, 1, 0x7f_ffff, 0x40_0000];
    for k in 13..=24u32 {
        let (unit, tie) = (1u32 << k, 1u32 << (k - 1));
        for high in [0u32, 1, rng.next_u64() as u32, rng.next_u64() as u32] {
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
            patterns.extend(mantissas.iter().map(|m| sign | (exponent << 23) | m));
        }
        for specific in [
            0x477f_e000u32, // 65504
            0x477f_efff,
            0x477f_f000, // 65520
            0x477f_f001,
            0x477f_ffff,
            0x4780_0000, // 65536
            0x7f7f_ffff,
            0x7f7f_8000,
            0x3380_0000, // 2^-24
            0x3300_0000, // 2^-25
            0x3300_0001,
            0x33c0_0000,
            0x387f_ffff,
            0x7fc0_0000,
            0x7f80_0001,
            0x7f80_2000,
        ] {
            patterns.push(sign | specific);
        }
    }
    patterns
}

#[test]
fn storage_wgsl_is_the_rust_functions_bit_for_bit() {
    const N: usize = 1 << 20;
    let mut rng = Rng::new(0x5eed_1001);
    let mut xs = structured_patterns(&mut rng);
    let structured = xs.len();
    while xs.len() < N {
        let r = rng.next_u64();
        xs.push(if xs.len().is_multiple_of(2) {
            r as u32
        } else {
            // In and around the f16 range: 2^-32 .. 2^19.
            ((r as u32) & 0x807f_ffff) | (((95 + (r >> 40) % 52) as u32) << 23)
        });
    }
    let edge_words = [
        0u32,
        1,
        0xfff,
        0x1000,
        0x1fff,
        0xffff,
        0x7fff_ffff,
        u32::MAX,
    ];
    let words: Vec<[u32; 4]> = xs
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let r = if i < edge_words.len() * 1024 {
                edge_words[i % edge_words.len()]
            } else {
                rng.next_u64() as u32
            };
            // Every 16-bit value, in both halves, in the first 2^16 elements.
            let h = if i < 1 << 16 {
                (i as u32) | ((i as u32 ^ 0x8000) << 16)
            } else {
                rng.next_u64() as u32
            };
            [x, r, h, rng.next_u64() as u32]
        })
        .collect();
    let mut values: Vec<f32> = xs.iter().map(|&x| f32::from_bits(x)).collect();
    values.push(1.0);

    let (device, queue) = gpu();
    let input = |label: &str, bytes: &[u8]| {
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.len() as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        queue.write_buffer(&buffer, 0, bytes);
        buffer
    };
    let words_buffer = input("storage_wgsl words", bytemuck::cast_slice(&words));
    let values_buffer = input("storage_wgsl values", bytemuck::cast_slice(&values));
    let out = common::buffer((N * OUTPUTS) as u64, common::STORAGE);
    let widened = common::buffer((N * 2) as u64, common::STORAGE);

    let source = format!("{STORAGE_WGSL}\n{HARNESS}");
    let pipeline = auxiliary_pipeline(device, "storage_wgsl harness", &source, "main", &[]);
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("storage_wgsl harness"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[&words_buffer, &values_buffer, &out, &widened]
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect::<Vec<_>>(),
    });
    let [x, y] = workgroup_grid(
        N as u64,
        64,
        device.limits().max_compute_workgroups_per_dimension,
    );
    let mut encoder = device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
    }
    queue.submit([encoder.finish()]);
    let got: Vec<u32> = common::read(&out, 0, (N * OUTPUTS) as u64)
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let got_widened: Vec<u32> = common::read(&widened, 0, (N * 2) as u64)
        .iter()
        .map(|v| v.to_bits())
        .collect();

    let names = [
        "narrow_bf16",
        "narrow_f16",
        "stochastic_bf16",
        "stochastic_f16",
        "widen_bf16",
        "widen_f16 (low)",
        "widen_f16 (high)",
        "rounding_bits",
        "narrow_bf16 | narrow_f16 << 16 of an f32 load",
        "stochastic_bf16 | stochastic_f16 << 16 of an f32 load",
        "widen_f16 stored as f32",
        "widen_bf16 stored as f32",
    ];
    let mut mismatches = vec![0usize; names.len()];
    let mut first = Vec::new();
    let (mut subnormals, mut flushed) = (0, 0);
    for (i, &[x, r, h, w]) in words.iter().enumerate() {
        let xf = f32::from_bits(x);
        let (lo, hi) = (h as u16, (h >> 16) as u16);
        let want = [
            narrow_bf16(xf) as u32,
            narrow_f16(xf) as u32,
            stochastic_bf16(xf, r) as u32,
            stochastic_f16(xf, r) as u32,
            widen_bf16(lo).to_bits(),
            widen_f16(lo).to_bits(),
            widen_f16(hi).to_bits(),
            rounding_bits((h as u64) << 32 | r as u64, x, w),
            narrow_bf16(xf) as u32 | (narrow_f16(xf) as u32) << 16,
            stochastic_bf16(xf, w) as u32 | (stochastic_f16(xf, w) as u32) << 16,
            widen_f16(lo).to_bits(),
            widen_bf16(hi).to_bits(),
        ];
        let got_here = got[i * OUTPUTS..i * OUTPUTS + 10]
            .iter()
            .chain(&got_widened[2 * i..2 * i + 2]);
        for (f, (&g, &want)) in got_here.zip(&want).enumerate() {
            if g != want {
                mismatches[f] += 1;
                if first.len() < 20 {
                    first.push(format!(
                        "{} at {i}: x {x:#010x} r {r:#010x} h {h:#010x} w {w:#010x}: \
                         got {g:#x}, want {want:#x}",
                        names[f]
                    ));
                }
            }
        }
        if x & 0x7f80_0000 == 0 && x & 0x7f_ffff != 0 {
            subnormals += 1;
            flushed += (got[i * OUTPUTS + 10] != x) as usize;
        }
    }
    eprintln!(
        "f32 subnormals times 1.0 on this device: {flushed} of {subnormals} flushed \
         (storage.wgsl does no float arithmetic; this is the driver's behaviour for the kernel \
         around it)"
    );
    let total: usize = mismatches.iter().sum();
    assert!(
        total == 0,
        "{total} mismatches over {N} inputs ({structured} structured); per function: {:?}; \
         first: {first:#?}",
        names
            .iter()
            .zip(&mismatches)
            .filter(|(_, m)| **m > 0)
            .collect::<Vec<_>>()
    );
}
