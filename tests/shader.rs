//! The WGSL family without a GPU: the structs shared with Rust have Rust's layout, and every
//! variant (every override combination, both element widths) validates and compiles to SPIR-V.

use std::mem::offset_of;

use naga::valid::{Capabilities, ValidationFlags, Validator};
use wgpu_optim::kernels::{Variant, Width, wgsl_source};
use wgpu_optim::{Algorithm, Chunk, MAX_GROUPS, StepUniforms};

fn parse(width: Width) -> naga::Module {
    naga::front::wgsl::parse_str(&wgsl_source(width))
        .unwrap_or_else(|e| panic!("{width:?}: {}", e.emit_to_string(&wgsl_source(width))))
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
                clips
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
                _pad0,
                _pad1,
                _pad2,
                _pad3
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

#[test]
fn every_variant_validates_and_compiles_to_spirv() {
    let mut compiled = 0;
    for width in [Width::Vec4, Width::Scalar] {
        let module = parse(width);
        let info = Validator::new(ValidationFlags::all(), Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{width:?}: {e:?}"));
        for algorithm in [Algorithm::Adam, Algorithm::AdamW, Algorithm::Yogi] {
            for flags in 0..32u32 {
                for workgroup_size in [1, 64, 256] {
                    let variant = Variant {
                        algorithm,
                        amsgrad: flags & 1 != 0,
                        maximize: flags & 2 != 0,
                        clip: flags & 4 != 0,
                        weight_decay: flags & 8 != 0,
                        workgroup_size,
                    };
                    let mut constants = naga::back::PipelineConstants::default();
                    for (name, value) in variant.constants() {
                        constants.insert(name.to_string(), value);
                    }
                    let segmented = if flags & 16 != 0 { 1.0 } else { 0.0 };
                    constants.insert("SEGMENTED".to_string(), segmented);
                    let (module, info) = naga::back::pipeline_constants::process_overrides(
                        &module,
                        &info,
                        Some((naga::ShaderStage::Compute, "step")),
                        &constants,
                    )
                    .unwrap_or_else(|e| panic!("{width:?} {variant:?}: {e:?}"));
                    Validator::new(ValidationFlags::all(), Capabilities::all())
                        .validate(&module)
                        .unwrap_or_else(|e| panic!("{width:?} {variant:?}: {e:?}"));
                    naga::back::spv::write_vec(&module, &info, &Default::default(), None)
                        .unwrap_or_else(|e| panic!("{width:?} {variant:?}: {e:?}"));
                    compiled += 1;
                }
            }
        }
    }
    assert_eq!(compiled, 2 * 3 * 32 * 3);
}
