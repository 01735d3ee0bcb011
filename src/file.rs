//! Files, for [`crate::replay`] and [`crate::checkpoint`]: reading, writing atomically, and the
//! safetensors helpers they share (tensors in and out in their storage dtypes, widened to f32 in
//! memory; the `config` metadata).
//!
//! Owns: bytes on disk. May not touch the GPU or the optimizer.

use crate::dtype::Dtype as StorageDtype;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, TensorView};

use crate::config::Config;
use crate::error::{Error, Result};

/// Reads a whole file; the error names it.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| io_error(path, e))
}

/// Writes `bytes` to `path` atomically: into a new temporary file in the same directory, synced,
/// then renamed over `path`. A failure leaves no file behind and an existing `path` untouched.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| Error::Io {
        file: path.display().to_string(),
        reason: "not a file name".into(),
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let temp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = written {
        fs::remove_file(&temp).ok();
        return Err(io_error(path, e));
    }
    // Persist the rename itself; not every platform can open a directory, so best effort.
    if let Ok(dir) = fs::File::open(dir) {
        dir.sync_all().ok();
    }
    Ok(())
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        file: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A parsed safetensors file: its tensors by name and its metadata.
pub(crate) struct Safetensors<'a> {
    pub file: String,
    /// Sorted by name, so that errors come in a reproducible order.
    pub tensors: Vec<(String, TensorView<'a>)>,
    pub metadata: HashMap<String, String>,
}

impl<'a> Safetensors<'a> {
    /// Parses `bytes` (a truncated or foreign file is an error naming `file`).
    pub fn parse(bytes: &'a [u8], file: &str) -> Result<Self> {
        let invalid = |e: safetensors::SafeTensorError| Error::Safetensors {
            file: file.to_string(),
            reason: e.to_string(),
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(invalid)?;
        let parsed = safetensors::SafeTensors::deserialize(bytes).map_err(invalid)?;
        let mut tensors = parsed.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Safetensors {
            file: file.to_string(),
            tensors,
            metadata: header.metadata().clone().unwrap_or_default(),
        })
    }

    /// The `config` metadata, parsed and validated.
    pub fn config(&self) -> Result<Config> {
        let text = self.require_metadata("config", "the configuration as a JSON object")?;
        config_from_json(text)
    }

    pub fn require_metadata(&self, key: &'static str, expected: &'static str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::MissingMetadata {
                file: self.file.clone(),
                key,
                expected,
            })
    }
}

/// Safetensors' U8, the dtype of q8 codes in a checkpoint.
pub(crate) const U8: Dtype = Dtype::U8;

/// The safetensors name of a storage dtype's values (q8 as dequantised F32 values, as replay
/// results write them; a checkpoint writes a q8 state's codes and absmax instead).
pub(crate) fn safetensors_dtype(dtype: StorageDtype) -> Dtype {
    match dtype {
        StorageDtype::Bf16 => Dtype::BF16,
        StorageDtype::F16 => Dtype::F16,
        StorageDtype::F32 | StorageDtype::Q8 => Dtype::F32,
    }
}

/// A tensor's elements widened to f32 (little-endian, as safetensors stores them), when it is
/// stored as `dtype`; any other dtype is an error naming the tensor.
pub(crate) fn tensor_data(name: &str, view: &TensorView, dtype: StorageDtype) -> Result<Vec<f32>> {
    let want = safetensors_dtype(dtype);
    if view.dtype() != want {
        return Err(Error::DType {
            tensor: name.to_string(),
            dtype: format!("{:?}", view.dtype()),
            expected: format!("{want:?}"),
        });
    }
    Ok(crate::dtype::from_bytes(dtype, view.data()))
}

/// Checks that every element is finite.
pub(crate) fn check_finite(name: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::TensorValue {
            tensor: name.to_string(),
            index,
            value: data[index],
            expected: "a finite number".into(),
        }),
    }
}

/// A tensor to serialize: dtype, shape and little-endian bytes.
pub(crate) struct FileTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl FileTensor {
    /// An F32 tensor.
    pub fn new(shape: &[usize], data: &[f32]) -> Self {
        Self::stored(shape, data, StorageDtype::F32)
    }

    /// A U8 tensor: `data` as it is (q8 codes).
    pub fn u8(shape: &[usize], data: &[u8]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        FileTensor {
            dtype: Dtype::U8,
            shape: shape.to_vec(),
            bytes: data.to_vec(),
        }
    }

    /// `data` as `dtype` stores it: 16-bit values rounded to nearest (values a 16-bit buffer
    /// held are exact), q8 states as their dequantised f32.
    pub fn stored(shape: &[usize], data: &[f32], dtype: StorageDtype) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        let bytes = crate::dtype::to_bytes(dtype, data);
        FileTensor {
            dtype: safetensors_dtype(dtype),
            shape: shape.to_vec(),
            bytes,
        }
    }
}

impl safetensors::View for &FileTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.bytes[..]).into()
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Serializes named tensors and metadata into a safetensors file's bytes.
pub(crate) fn serialize(
    tensors: &[(String, FileTensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    safetensors::serialize(tensors.iter().map(|(n, t)| (n, t)), Some(metadata)).map_err(|e| {
        Error::Safetensors {
            file: "(serializing)".into(),
            reason: e.to_string(),
        }
    })
}

/// Reads the file at `path` and parses it with `parse`, which gets the path to name in errors.
pub(crate) fn read_with<T>(path: &Path, parse: impl FnOnce(&[u8], &str) -> Result<T>) -> Result<T> {
    parse(&read(path)?, &path.display().to_string())
}

/// [`Config::from_json`], also showing the value when the text holds Python's non-finite floats
/// (`json.dumps` writes `NaN`, `Infinity` and `-Infinity`, which JSON does not have): they are
/// read as strings, so the error names the key and shows the token as the file had it.
pub(crate) fn config_from_json(text: &str) -> Result<Config> {
    let Some(quoted) = quote_non_finite(text) else {
        return Config::from_json(text);
    };
    Config::from_json(&quoted).map_err(|e| match e {
        Error::InvalidConfig {
            key,
            value,
            expected,
        } => Error::InvalidConfig {
            key,
            value: value.replace('"', ""),
            expected,
        },
        e => e,
    })
}

/// `text` with every bare `NaN`, `Infinity` and `-Infinity` outside strings put in quotes, or
/// `None` when there is none.
fn quote_non_finite(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped, mut found) = (false, false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["NaN", "Infinity", "-Infinity"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            found = true;
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_floats_name_the_key() {
        let e = config_from_json(r#"{"algorithm": "adam", "lr": NaN}"#).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidConfig { key: "lr", value, .. } if value == "NaN"),
            "{e}"
        );
        let e = config_from_json(r#"{"algorithm": "adam", "betas": [0.9, Infinity]}"#).unwrap_err();
        assert!(
            matches!(e, Error::InvalidConfig { key: "betas", .. }),
            "{e}"
        );
        let e = config_from_json(r#"{"algorithm": "adam", "eps": -Infinity}"#).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { key: "eps", .. }), "{e}");
        // Inside a string, NaN is just text.
        let e = config_from_json(r#"{"algorithm": "NaN"}"#).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    key: "algorithm",
                    ..
                }
            ),
            "{e}"
        );
        // Any malformed value names its key (issue 8); only text that is no object at all does not.
        let e = config_from_json(r#"{"algorithm": "adam", "lr": }"#).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { key: "lr", .. }), "{e}");
        let e = config_from_json(r#"[1, 2]"#).unwrap_err();
        assert!(matches!(e, Error::ConfigJson(_)), "{e}");
    }
}
