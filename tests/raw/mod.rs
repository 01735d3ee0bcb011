//! Safetensors files as plain maps, for tests that build, inspect and corrupt traces, results
//! and checkpoints tensor by tensor.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// Every tensor (dtype, shape, little-endian bytes) and the metadata of one file.
#[derive(Clone, Debug, Default)]
pub struct Raw {
    pub tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    pub metadata: HashMap<String, String>,
}

impl Raw {
    pub fn parse(bytes: &[u8]) -> Raw {
        let st = SafeTensors::deserialize(bytes).expect("a valid safetensors file");
        let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
        Raw {
            tensors: st
                .tensors()
                .into_iter()
                .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
                .collect(),
            metadata: header.metadata().clone().unwrap_or_default(),
        }
    }

    pub fn read(path: &Path) -> Raw {
        Raw::parse(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    pub fn set_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors
            .insert(name.to_string(), (Dtype::F32, shape.to_vec(), bytes));
    }

    /// The tensor's shape and f32 elements; panics for another dtype.
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (dtype, shape, bytes) = self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        assert_eq!(*dtype, Dtype::F32, "{name}");
        let data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (shape.clone(), data)
    }

    /// Re-encodes the tensor in another dtype: f64 by value, anything else as raw bytes of the
    /// right size (the dtype check comes before anything looks at them).
    pub fn retype(&mut self, name: &str, dtype: Dtype) {
        let (shape, data) = self.f32(name);
        let bytes = match dtype {
            Dtype::F64 => data
                .iter()
                .flat_map(|x| (*x as f64).to_le_bytes())
                .collect(),
            _ => vec![0u8; data.len() * dtype.bitsize() / 8],
        };
        self.tensors.insert(name.to_string(), (dtype, shape, bytes));
    }

    pub fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = self
            .tensors
            .iter()
            .map(|(n, (dtype, shape, bytes))| {
                (
                    n.clone(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, Some(self.metadata.clone())).unwrap()
    }
}
