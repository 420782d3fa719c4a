//! Named tensors of one safetensors file, handed out by exact name and checked shape.
//!
//! The model code asks for every tensor it needs with the shape its config implies, so a missing
//! tensor or a config/weights mismatch is an error naming the file and the tensor — never a silently
//! random weight (nothing in this crate initialises a weight any other way). A file is read
//! through a memory map ([`super::mapped`]): each tensor is made as it is taken, with one copy from
//! the mapped bytes into the requested dtype and device, so loading a large model neither copies
//! it several times nor holds it twice in host memory.
use super::mapped::MappedSafetensors;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub struct Weights {
    path: PathBuf,
    source: Source,
    /// Names already taken (each tensor is taken once), for [`Weights::finish`].
    taken: RefCell<HashSet<String>>,
    kind: Kind,
    device: Device,
    /// Handles to the weight matrices and kernels handed out (sharing their storage), by module
    /// path: what a LoRA can be fused into ([`super::adapters`]).
    layers: RefCell<HashMap<String, Tensor>>,
}

/// Where the tensors come from.
enum Source {
    /// A safetensors file, mapped: tensors are made as they are taken.
    Mapped(MappedSafetensors),
    /// Tensors already in memory (renamed from a single-file checkpoint).
    Tensors(RefCell<HashMap<String, Tensor>>),
}

/// Weight matrices and convolution kernels of one model by module path (`down_blocks.0.….to_q`),
/// sharing storage with the model's own tensors: writing into them changes the model.
pub type Layers = HashMap<String, Tensor>;

impl Weights {
    /// Reads `path` (a `.safetensors` file). Tensors will be converted to `kind` on `device`.
    pub fn load(path: &Path, kind: Kind, device: Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            source: Source::Mapped(MappedSafetensors::open(path)?),
            taken: RefCell::default(),
            kind,
            device,
            layers: RefCell::default(),
        })
    }

    /// Tensors already in memory (e.g. renamed from a single-file checkpoint); `path` is the file
    /// they came from, named in every error.
    pub fn from_tensors(
        path: &Path,
        tensors: HashMap<String, Tensor>,
        kind: Kind,
        device: Device,
    ) -> Self {
        Self {
            path: path.to_path_buf(),
            source: Source::Tensors(RefCell::new(tensors)),
            taken: RefCell::default(),
            kind,
            device,
            layers: RefCell::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A view whose names are prefixed with `prefix.`.
    pub fn scope(&self, prefix: &str) -> Scope<'_> {
        Scope {
            weights: self,
            prefix: prefix.to_string(),
        }
    }

    /// The root view (no prefix).
    pub fn root(&self) -> Scope<'_> {
        self.scope("")
    }

    fn take(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        };
        let mismatch = |actual: Vec<i64>| Error::ShapeMismatch {
            path: self.path.clone(),
            name: name.to_string(),
            expected: shape.to_vec(),
            actual,
        };
        if !self.taken.borrow_mut().insert(name.to_string()) {
            return Err(missing());
        }
        let tensor = match &self.source {
            Source::Mapped(file) => {
                // The shape is checked on the header, before any byte is copied.
                let entry = file.entry(name).ok_or_else(missing)?;
                if entry.shape != shape {
                    return Err(mismatch(entry.shape.clone()));
                }
                file.tensor(name, self.kind, self.device)?
                    .ok_or_else(missing)?
            }
            Source::Tensors(tensors) => {
                let tensor = tensors.borrow_mut().remove(name).ok_or_else(missing)?;
                let actual = tensor.size();
                if actual != shape {
                    return Err(mismatch(actual));
                }
                let kind = if tensor.is_floating_point() {
                    self.kind
                } else {
                    tensor.kind()
                };
                tensor.f_to_device(self.device)?.f_to_kind(kind)?
            }
        };
        // Linear and convolution weights (not embedding tables) are what LoRAs adapt.
        if let Some(module) = name.strip_suffix(".weight")
            && matches!(tensor.dim(), 2 | 4)
            && tensor.is_floating_point()
            && !module.contains("embeddings.")
        {
            self.layers
                .borrow_mut()
                .insert(module.to_string(), tensor.shallow_clone());
        }
        Ok(tensor)
    }

    fn contains(&self, name: &str) -> bool {
        let present = match &self.source {
            Source::Mapped(file) => file.entry(name).is_some(),
            Source::Tensors(tensors) => tensors.borrow().contains_key(name),
        };
        present && !self.taken.borrow().contains(name)
    }

    /// Ends loading: tensors the model never asked for are reported (they usually mean the config
    /// describes a smaller model than the weights). Known buffers that carry no weights are ignored.
    /// Returns the model's [`Layers`].
    pub fn finish(self) -> Layers {
        let names: Vec<String> = match &self.source {
            Source::Mapped(file) => file.names().cloned().collect(),
            Source::Tensors(tensors) => tensors.borrow().keys().cloned().collect(),
        };
        let taken = self.taken.borrow();
        let left: Vec<String> = names
            .into_iter()
            .filter(|k| !k.ends_with("position_ids") && !taken.contains(k))
            .collect();
        if let Some(example) = left.iter().min() {
            tracing::warn!(
                file = %self.path.display(),
                count = left.len(),
                example = %example,
                "tensors in the weights file were not used by the model"
            );
        }
        self.layers.into_inner()
    }
}

/// Why a safetensors header was not read.
#[derive(Debug)]
pub enum HeaderError {
    /// Larger than the caller's bound (its size in bytes): usually a file of another kind.
    TooLarge(u64),
    Io(std::io::Error),
    Json(serde_json::Error),
}

/// The JSON header of a safetensors file (tensor names → dtype/shape/offsets, and
/// `__metadata__`), read without the tensors and only up to `max_bytes`.
pub fn safetensors_header(
    path: &Path,
    max_bytes: u64,
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, HeaderError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(HeaderError::Io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(HeaderError::Io)?;
    let len = u64::from_le_bytes(len);
    if len > max_bytes {
        return Err(HeaderError::TooLarge(len));
    }
    let mut header = Vec::new();
    file.take(len)
        .read_to_end(&mut header)
        .map_err(HeaderError::Io)?;
    serde_json::from_slice(&header).map_err(HeaderError::Json)
}

/// A prefixed view into [`Weights`], mirroring the module tree of the Python model.
#[derive(Clone)]
pub struct Scope<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> Scope<'a> {
    pub fn sub(&self, name: impl std::fmt::Display) -> Scope<'a> {
        Scope {
            weights: self.weights,
            prefix: self.full(&name.to_string()),
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Takes tensor `name` (relative to this scope), which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.weights.take(&self.full(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.full(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join("w.safetensors");
        Tensor::write_safetensors(tensors, &path).unwrap();
        path
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Weights::load(
            Path::new("/nonexistent/x.safetensors"),
            Kind::Float,
            Device::Cpu,
        )
        .err()
        .unwrap();
        assert!(matches!(err, Error::MissingFile { .. }));
        assert!(err.to_string().contains("/nonexistent/x.safetensors"));
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &[(
                "a.weight",
                Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
            )],
        );
        let w = Weights::load(&path, Kind::Float, Device::Cpu).unwrap();
        let err = w.scope("a").get("bias", &[2]).err().unwrap();
        assert!(err.to_string().contains("missing tensor `a.bias`"), "{err}");
        let err = w.scope("a").get("weight", &[3, 2]).err().unwrap();
        assert!(
            err.to_string()
                .contains("`a.weight` has shape [2, 3], expected [3, 2]"),
            "{err}"
        );
    }

    #[test]
    fn converts_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &[("x", Tensor::ones([4], (Kind::Half, Device::Cpu)))],
        );
        let w = Weights::load(&path, Kind::Float, Device::Cpu).unwrap();
        let t = w.root().get("x", &[4]).unwrap();
        assert_eq!(t.kind(), Kind::Float);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = Weights::load(&path, Kind::Float, Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("bad.safetensors"), "{err}");
    }
}
