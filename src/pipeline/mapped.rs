//! A safetensors file read through a memory map, each tensor made with one copy: from the mapped
//! bytes straight into a tensor of the target dtype on the target device.
//!
//! Reading the file into memory first (what `Tensor::read_safetensors` does), making a tensor of
//! every entry, then converting each to the model's dtype copies every weight three times and
//! holds the file twice in host memory; on full-size SD that was most of a 5–6 s start.
//! Here the header is parsed once, and [`MappedSafetensors::tensor`] converts one entry on demand.
//! The two unsafe operations (mapping the file, viewing mapped bytes as a tensor) are in this
//! module only.
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// One entry of the header: dtype, shape, and its bytes' range in the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub kind: Kind,
    pub shape: Vec<i64>,
    pub start: usize,
    pub end: usize,
}

pub struct MappedSafetensors {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Where the data section starts in the file (after the length and the JSON header).
    data_start: usize,
    entries: HashMap<String, Entry>,
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

/// Parses a safetensors header (the JSON after the 8-byte length) into entries, checking each
/// range against the data section's length `data_len` and its shape and dtype.
pub fn parse_header(
    header: &[u8],
    data_len: usize,
) -> std::result::Result<HashMap<String, Entry>, String> {
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    let mut entries = HashMap::with_capacity(json.len());
    for (name, value) in json {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor `{name}`: {what}");
        let dtype = value["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let kind = kind_of(dtype).ok_or_else(|| bad(&format!("unsupported dtype {dtype}")))?;
        let shape = value["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_i64().filter(|&d| d >= 0))
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| bad("bad shape"))?;
        let offsets = value["data_offsets"]
            .as_array()
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("bad data_offsets"))?;
        let (start, end) = (
            usize::try_from(offsets.0).map_err(|_| bad("offset"))?,
            usize::try_from(offsets.1).map_err(|_| bad("offset"))?,
        );
        let elements = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
            .ok_or_else(|| bad("shape too large"))?;
        let bytes = elements
            .checked_mul(kind.elt_size_in_bytes())
            .ok_or_else(|| bad("shape too large"))?;
        if start > end || end > data_len || end - start != bytes {
            return Err(bad(&format!(
                "data_offsets [{start}, {end}) do not hold {dtype} {shape:?} in {data_len} bytes"
            )));
        }
        entries.insert(
            name,
            Entry {
                kind,
                shape,
                start,
                end,
            },
        );
    }
    Ok(entries)
}

impl MappedSafetensors {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |message: String| Error::Config {
            path: path.to_path_buf(),
            message: format!("not a readable safetensors file: {message}"),
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read only and private to this process. Like every reader of a model
        // file, it assumes the file is not truncated or rewritten while the model loads (a
        // shrinking file would fault, not corrupt memory silently).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let len_bytes: [u8; 8] = map
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| invalid("shorter than its header length".into()))?;
        let header_len = usize::try_from(u64::from_le_bytes(len_bytes))
            .map_err(|_| invalid("header length".into()))?;
        let data_start = 8usize
            .checked_add(header_len)
            .filter(|&s| s <= map.len())
            .ok_or_else(|| invalid("header longer than the file".into()))?;
        let entries = parse_header(&map[8..data_start], map.len() - data_start).map_err(invalid)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            data_start,
            entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// Tensor `name` as a new tensor of `kind` (floating-point entries; others keep theirs) on
    /// `device`: one copy from the mapped bytes. `None` if there is no such entry.
    pub fn tensor(&self, name: &str, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        let bytes = &self.map[self.data_start + e.start..self.data_start + e.end];
        let target = if is_float(e.kind) { kind } else { e.kind };
        Ok(Some(copy_from_bytes(
            bytes, &e.shape, e.kind, target, device,
        )?))
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
    )
}

/// A new tensor of `kind` on `device` holding `bytes`, which are `shape` elements of
/// `source` in little-endian order.
pub fn copy_from_bytes(
    bytes: &[u8],
    shape: &[i64],
    source: Kind,
    kind: Kind,
    device: Device,
) -> Result<Tensor> {
    // ATen's kernels may assume elements aligned to their size; a misaligned entry (files are
    // normally aligned) goes through an aligned buffer first.
    if !(bytes.as_ptr() as usize).is_multiple_of(source.elt_size_in_bytes().max(1)) {
        let owned = Tensor::f_from_data_size(bytes, shape, source)?;
        return Ok(owned.f_to_dtype_layout((kind, device), false, false)?);
    }
    // SAFETY: `view` aliases `bytes`, which are borrowed for this whole function, hold exactly
    // `shape` elements of `source` (the caller's header check) and are aligned (above). The view
    // is only read, and `to_dtype_layout` with copy = true returns a tensor with storage of its
    // own, so nothing refers to `bytes` once this function returns (the view is dropped here).
    let view = unsafe { Tensor::f_from_blob(bytes.as_ptr(), shape, &[], source, Device::Cpu)? };
    Ok(view.f_to_dtype_layout((kind, device), false, true)?)
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
    fn reads_what_tch_writes_in_every_dtype_once_converted() {
        let dir = tempfile::tempdir().unwrap();
        let half = Tensor::randn([3, 5], (Kind::Float, Device::Cpu)).to_kind(Kind::Half);
        let ints = Tensor::arange(7, (Kind::Int64, Device::Cpu));
        let path = write(
            dir.path(),
            &[("h", half.shallow_clone()), ("i", ints.shallow_clone())],
        );
        let m = MappedSafetensors::open(&path).unwrap();
        let h = m.tensor("h", Kind::Float, Device::Cpu).unwrap().unwrap();
        assert_eq!(h.kind(), Kind::Float);
        assert!(h.equal(&half.to_kind(Kind::Float)));
        let i = m.tensor("i", Kind::Float, Device::Cpu).unwrap().unwrap();
        assert_eq!(i.kind(), Kind::Int64, "integer tensors keep their kind");
        assert!(i.equal(&ints));
        assert!(
            m.tensor("missing", Kind::Float, Device::Cpu)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_same_dtype_tensor_is_a_copy_not_the_mapped_file() {
        // In-place writes (LoRA fusion) must change the tensor, never the file's read-only pages.
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &[("x", Tensor::zeros([4], (Kind::Float, Device::Cpu)))],
        );
        let m = MappedSafetensors::open(&path).unwrap();
        let mut x = m.tensor("x", Kind::Float, Device::Cpu).unwrap().unwrap();
        let _ = x.fill_(1.0);
        let again = m.tensor("x", Kind::Float, Device::Cpu).unwrap().unwrap();
        assert_eq!(again.sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn headers_with_impossible_ranges_are_refused() {
        let ok = br#"{"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}"#;
        assert!(parse_header(ok, 8).is_ok());
        let short = parse_header(ok, 4).unwrap_err();
        assert!(short.contains("tensor `a`"), "{short}");
        let wrong = br#"{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}"#;
        assert!(parse_header(wrong, 8).is_err(), "F32 [2,2] needs 16 bytes");
        let dtype = br#"{"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}"#;
        assert!(
            parse_header(dtype, 1)
                .unwrap_err()
                .contains("unsupported dtype")
        );
        let meta = br#"{"__metadata__": {"format": "pt"}}"#;
        assert!(parse_header(meta, 0).unwrap().is_empty());
    }

    #[test]
    fn misaligned_bytes_are_read_right() {
        let values: Vec<f32> = vec![1.5, -2.0, 3.25];
        let mut buf = vec![0u8];
        for v in &values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let t = copy_from_bytes(&buf[1..], &[3], Kind::Float, Kind::Float, Device::Cpu).unwrap();
        assert!(t.equal(&Tensor::from_slice(&values)));
    }
}
