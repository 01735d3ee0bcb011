//! The WGSL family without a GPU: the structs shared with Rust have Rust's layout, the
//! emitted constants and bindings are the host's, and every variant (every override
//! combination, both element widths) validates and compiles to SPIR-V.

use std::mem::offset_of;

use naga::valid::{Capabilities, ValidationFlags, Validator};

use super::*;
use crate::dtype::Dtype;
use crate::gpu::{Variant, wgsl_source};

fn parse(width: Width) -> naga::Module {
    parse_with(width, &Storage::default())
}

fn parse_with(width: Width, storage: &Storage) -> naga::Module {
    let source = wgsl_source(width, storage);
    naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{width:?} {storage:?}: {}", e.emit_to_string(&source)))
}

/// Every storage the prelude can be generated for: each buffer f32, bf16 or f16 (states also
/// q8), and with 16-bit params master weights or stochastic rounding (or neither).
fn every_storage() -> Vec<Storage> {
    let dtypes = [Dtype::F32, Dtype::Bf16, Dtype::F16];
    let states = [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Q8];
    let mut out = Vec::new();
    for param in dtypes {
        for grad in dtypes {
            for exp_avg in states {
                for exp_avg_sq in states {
                    let rounding: &[(bool, bool)] = if param == Dtype::F32 {
                        &[(false, false)]
                    } else {
                        &[(false, false), (true, false), (false, true)]
                    };
                    for &(master, stochastic) in rounding {
                        out.push(Storage {
                            param,
                            grad,
                            exp_avg,
                            exp_avg_sq,
                            master,
                            stochastic,
                            seed: 0x0123_4567_89ab_cdef,
                        });
                    }
                }
            }
        }
    }
    out
}

/// (member name, offset) of the WGSL struct `name`, and its size.
fn wgsl_layout(module: &naga::Module, name: &str) -> (Vec<(String, u32)>, u32) {
    let (_, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no struct {name}"));
    match &ty.inner {
        naga::TypeInner::Struct { members, span } => (
            members
                .iter()
                .map(|m| (m.name.clone().unwrap(), m.offset))
                .collect(),
            *span,
        ),
        other => panic!("{name} is {other:?}"),
    }
}

macro_rules! rust_layout {
    ($ty:ty { $($field:ident),* }) => {
        (vec![$((stringify!($field).to_string(), offset_of!($ty, $field) as u32)),*], size_of::<$ty>() as u32)
    };
}

#[test]
fn shared_structs_have_the_same_layout_in_rust_and_wgsl() {
    for width in [Width::Vec4, Width::Scalar] {
        let module = parse(width);
        assert_eq!(
            wgsl_layout(&module, "StepUniforms"),
            rust_layout!(StepUniforms {
                step_size,
                eps,
                eps_root,
                beta1,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                weight_decay,
                lr_weight_decay,
                rescale_grad,
                clip_gradient,
                clips,
                bias_base,
                bias_len,
                eps_scaled,
                step
            })
        );
        assert_eq!(
            wgsl_layout(&module, "Chunk"),
            rust_layout!(Chunk {
                count,
                param_base,
                grad_base,
                state_base,
                first_element,
                segments,
                segment_count,
                group,
                partials_base,
                tensor_element,
                block_base,
                _pad3
            })
        );
        assert_eq!(
            wgsl_layout(&module, "DeviceScalars"),
            rust_layout!(DeviceScalars {
                loss_scale,
                inv_scale,
                step_inv_scale,
                clip_coef,
                global_norm,
                step,
                found_inf,
                growth_tracker
            })
        );
        assert_eq!(
            size_of::<StepUniforms>() % 16,
            0,
            "uniform array elements need a 16-byte stride"
        );
        // The uniform array of groups has MAX_GROUPS elements on both sides.
        let (_, groups) = module
            .global_variables
            .iter()
            .find(|(_, v)| v.name.as_deref() == Some("groups"))
            .expect("a `groups` uniform");
        match module.types[groups.ty].inner {
            naga::TypeInner::Array {
                size: naga::ArraySize::Constant(n),
                stride,
                ..
            } => {
                assert_eq!(n.get() as usize, MAX_GROUPS);
                assert_eq!(stride as usize, size_of::<StepUniforms>());
            }
            ref other => panic!("groups is {other:?}"),
        }
    }
}

/// Resolves `constants` for `entry`, validates the result and writes it as SPIR-V: what a
/// driver would be handed for one pipeline. Panics naming `what`.
fn compile(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
    constants: &naga::back::PipelineConstants,
    what: &str,
) {
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        module,
        info,
        Some((naga::ShaderStage::Compute, entry)),
        constants,
    )
    .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    naga::back::spv::write_vec(&module, &info, &Default::default(), None)
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
}

#[test]
fn every_variant_validates_and_compiles_to_spirv() {
    let mut compiled = 0;
    for width in [Width::Vec4, Width::Scalar] {
        let module = parse(width);
        let info = Validator::new(ValidationFlags::all(), Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{width:?}: {e:?}"));
        for algorithm in [Algorithm::Adam, Algorithm::AdamW, Algorithm::Yogi] {
            // Bits: amsgrad, maximize, clip, weight decay, segmented, then the pass before
            // the step: scale, skip, norm clip.
            for flags in 0..256u32 {
                let pre_step = flags >= 32;
                let sizes: &[u32] = if pre_step { &[64] } else { &[1, 64, 256] };
                for &workgroup_size in sizes {
                    let variant = Variant {
                        algorithm,
                        amsgrad: flags & 1 != 0,
                        maximize: flags & 2 != 0,
                        clip: flags & 4 != 0,
                        weight_decay: flags & 8 != 0,
                        workgroup_size,
                        segmented: flags & 16 != 0,
                        scale: flags & 32 != 0,
                        skip: flags & 64 != 0,
                        norm_clip: flags & 128 != 0,
                        storage: Storage::default(),
                    };
                    let entries: &[&str] = if pre_step {
                        &["step", "grad_norm", "finish"]
                    } else {
                        &["step"]
                    };
                    for &entry in entries {
                        let mut constants = naga::back::PipelineConstants::default();
                        for (name, value) in variant.constants() {
                            constants.insert(name.to_string(), value);
                        }
                        if entry == "finish" {
                            let config = Config::adam()
                                .max_grad_norm(Some(1.0))
                                .loss_scale(Some(Default::default()));
                            for (name, value) in crate::gpu::Finish::new(&config, 77).constants() {
                                constants.insert(name.to_string(), value);
                            }
                        }
                        let what = format!("{width:?} {entry} {variant:?}");
                        compile(&module, &info, entry, &constants, &what);
                        compiled += 1;
                    }
                }
            }
        }
    }
    assert_eq!(compiled, 2 * 3 * (32 * 3 + 224 * 3));
}

#[test]
fn every_storage_validates_and_compiles_to_spirv_at_every_width() {
    // Each storage at each width, its step (one tensor and segmented) and norm pass, with the
    // other options drawn from a fixed sequence so that all of them meet 16-bit storage.
    let mut compiled = 0;
    let mut flags = 0x5au32;
    for storage in every_storage() {
        for &width in storage.widths() {
            let module = parse_with(width, &storage);
            let info = Validator::new(ValidationFlags::all(), Capabilities::all())
                .validate(&module)
                .unwrap_or_else(|e| panic!("{width:?} {storage:?}: {e:?}"));
            let entries: &[(&str, bool)] = if width == Width::Blocks {
                &[("step_blocks", false), ("grad_norm", false)]
            } else {
                &[("step", false), ("step", true), ("grad_norm", true)]
            };
            for &(entry, segmented) in entries {
                flags = flags.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let f = flags >> 16;
                let variant = Variant {
                    algorithm: [Algorithm::Adam, Algorithm::AdamW, Algorithm::Yogi]
                        [(f % 3) as usize],
                    amsgrad: f & 8 != 0,
                    maximize: f & 16 != 0,
                    clip: f & 32 != 0,
                    weight_decay: f & 64 != 0,
                    workgroup_size: 64,
                    segmented,
                    scale: f & 128 != 0,
                    skip: f & 256 != 0 || entry == "grad_norm",
                    norm_clip: f & 512 != 0,
                    storage,
                };
                let mut constants = naga::back::PipelineConstants::default();
                for (name, value) in variant.constants() {
                    constants.insert(name.to_string(), value);
                }
                let what = format!("{width:?} {entry} {variant:?}");
                compile(&module, &info, entry, &constants, &what);
                compiled += 1;
            }
        }
    }
    let want: usize = every_storage()
        .iter()
        .map(|s| {
            if s.blockwise() {
                2
            } else {
                s.widths().len() * 3
            }
        })
        .sum();
    assert_eq!(compiled, want);
    assert!(every_storage().iter().any(Storage::blockwise));
}

#[test]
fn the_emitted_constants_and_bindings_are_the_hosts() {
    // The prelude is generated from this file's definitions; check what naga reads back, so
    // that a hand-written duplicate in the family (or a typo in the generator) fails here.
    for width in [Width::Vec4, Width::Scalar] {
        let module = parse(width);
        let constant = |name: &str| -> u32 {
            let (_, c) = module
                .constants
                .iter()
                .find(|(_, c)| c.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no constant {name}"));
            match module.global_expressions[c.init] {
                naga::Expression::Literal(naga::Literal::U32(v)) => v,
                ref other => panic!("{name} is {other:?}"),
            }
        };
        assert_eq!(constant("MAX_GROUPS") as usize, MAX_GROUPS);
        assert_eq!(constant("WHOLE_BLOCK"), WHOLE_BLOCK);
        assert_eq!(constant("HINT_VEC4S") as u64 * 4, MAX_HINTS);
        assert_eq!(constant("SEGMENT_ROW") as usize, SEGMENT_ROW);
        assert_eq!(constant("BIAS_ROW") as usize, BIAS_ROW);
        assert_eq!(constant("MAX_WORKGROUP_SIZE"), MAX_WORKGROUP_SIZE);
        assert_eq!(constant("NORM_BLOCKS"), NORM_BLOCKS);
        for algorithm in [Algorithm::Adam, Algorithm::AdamW, Algorithm::Yogi] {
            let name = format!("{algorithm:?}").to_uppercase();
            assert_eq!(constant(&name), algorithm_code(algorithm), "{name}");
        }
        // Every binding of the table, at its number, with its address space and access; none
        // declared by hand beside them.
        let mut declared: Vec<(u32, String, String)> = module
            .global_variables
            .iter()
            .filter_map(|(_, v)| {
                let binding = v.binding.as_ref()?;
                assert_eq!(binding.group, 0);
                Some((
                    binding.binding,
                    v.name.clone().unwrap(),
                    format!("{:?}", v.space),
                ))
            })
            .collect();
        declared.sort();
        let expected: Vec<(u32, String, String)> = BINDINGS
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let space = match b.kind {
                    BindingKind::Uniform { .. } => "Uniform".to_string(),
                    BindingKind::Storage { read_only: true } => {
                        "Storage { access: StorageAccess(LOAD) }".to_string()
                    }
                    BindingKind::Storage { read_only: false } => {
                        "Storage { access: StorageAccess(LOAD | STORE) }".to_string()
                    }
                };
                (i as u32, b.name.to_string(), space)
            })
            .collect();
        assert_eq!(declared, expected);
        // The uniform bindings' sizes are what the layout asks of the buffers.
        for (i, b) in BINDINGS.iter().enumerate() {
            if let BindingKind::Uniform { size } = b.kind {
                let (_, v) = module
                    .global_variables
                    .iter()
                    .find(|(_, v)| v.binding.as_ref().map(|r| r.binding) == Some(i as u32))
                    .unwrap();
                let layouter = {
                    let mut l = naga::proc::Layouter::default();
                    l.update(module.to_ctx()).unwrap();
                    l
                };
                assert_eq!(layouter[v.ty].size as u64, size, "{}", b.name);
            }
        }
    }
    // Slot names the table's order.
    for (slot, b) in Slot::ALL.iter().zip(&BINDINGS) {
        assert_eq!(
            format!("{slot:?}").to_lowercase(),
            b.name.replace('_', ""),
            "{slot:?}"
        );
    }
}
