//! Named tensors of one safetensors file, handed out by exact name and checked shape.
//!
//! The model code asks for every tensor it needs with the shape its config implies, so a missing
//! tensor or a config/weights mismatch is an error naming the file and the tensor — never a silently
//! random weight (nothing in this crate initialises a weight any other way). Tensors are converted to
//! the requested dtype and device as they are taken, and dropped from the host copy at once, so
//! loading a large model does not hold it twice in host memory.
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub struct Weights {
    path: PathBuf,
    tensors: RefCell<HashMap<String, Tensor>>,
    kind: Kind,
    device: Device,
    /// Handles to the weight matrices and kernels handed out (sharing their storage), by module
    /// path: what a LoRA can be fused into ([`super::adapters`]).
    layers: RefCell<HashMap<String, Tensor>>,
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
        let tensors = Tensor::read_safetensors(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("not a readable safetensors file: {e}"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors: RefCell::new(tensors.into_iter().collect()),
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
            tensors: RefCell::new(tensors),
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
        let tensor =
            self.tensors
                .borrow_mut()
                .remove(name)
                .ok_or_else(|| Error::MissingTensor {
                    path: self.path.clone(),
                    name: name.to_string(),
                })?;
        let actual = tensor.size();
        if actual != shape {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                actual,
            });
        }
        let kind = if matches!(
            tensor.kind(),
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            self.kind
        } else {
            tensor.kind()
        };
        let tensor = tensor.f_to_device(self.device)?.f_to_kind(kind)?;
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
        self.tensors.borrow().contains_key(name)
    }

    /// Ends loading: tensors the model never asked for are reported (they usually mean the config
    /// describes a smaller model than the weights). Known buffers that carry no weights are ignored.
    /// Returns the model's [`Layers`].
    pub fn finish(self) -> Layers {
        let left: Vec<String> = self
            .tensors
            .borrow()
            .keys()
            .filter(|k| !k.ends_with("position_ids"))
            .cloned()
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
