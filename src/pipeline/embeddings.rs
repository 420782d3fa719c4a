//! Textual-inversion embeddings (Gal et al., "An Image is Worth One Word", 2022): learned vectors
//! that stand for a new word in the CLIP text encoder's token-embedding table. This module reads
//! them from a folder; [`super::StableDiffusion::load_embeddings`] adds them to a model.
//!
//! Only `.safetensors` files are read, in two layouts:
//!
//! - AUTOMATIC1111: one tensor `emb_params`, or `string_to_param.*` (a `.pt` embedding's
//!   `string_to_param["*"]` flattened), `[n, dim]`. The trigger word is the file's stem, as in
//!   A1111: `EasyNegative.safetensors` is written `EasyNegative` in prompts.
//! - diffusers (`learned_embeds.safetensors`): one tensor named after its token, `[dim]` or
//!   `[n, dim]`. The trigger word is that name, e.g. `<cat-toy>`, whatever the file is called.
//!
//! An embedding of `n` vectors takes `n` consecutive new token ids after the vocabulary (diffusers
//! calls them `<tok>`, `<tok>_1`, …; here only the trigger itself is a word in prompts).
//!
//! Pickles (`.pt`, `.bin`, `.ckpt`, `.pth`) are refused with an error naming the file and how to
//! convert one you trust, never read: a pickle can run code, and skipping it would let a prompt
//! naming its trigger produce an image without it. Other files (previews, notes) are ignored.
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// File extensions of PyTorch pickles.
const PICKLE_EXTENSIONS: [&str; 4] = ["pt", "bin", "ckpt", "pth"];
/// Subfolder depth searched (A1111 walks the whole tree; this bounds a symlink loop).
const MAX_DEPTH: usize = 8;
/// An embedding's safetensors header is a few hundred bytes; a larger one is some other file.
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Where an embedding's trigger word comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `emb_params` or `string_to_param.*`: the file's stem.
    A1111,
    /// One tensor named after its token: that name.
    Diffusers,
}

/// One embedding file, read and checked on its own (not yet against a model).
#[derive(Debug)]
pub struct Embedding {
    pub path: PathBuf,
    /// The word that stands for the vectors in prompts.
    pub trigger: String,
    /// `[n, dim]`, float32 on the CPU.
    pub vectors: Tensor,
    pub layout: Layout,
}

impl Embedding {
    /// Number of vectors (token positions the trigger takes).
    pub fn n_vectors(&self) -> i64 {
        self.vectors.size()[0]
    }

    /// Width of each vector: the text encoder's hidden size it was trained for.
    pub fn dim(&self) -> i64 {
        self.vectors.size()[1]
    }
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Embedding {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The refusal of a pickled embedding, with a conversion that keeps its vectors (the trigger is
/// then the new file's stem).
fn pickle_refused(path: &Path) -> Error {
    bad(
        path,
        "a PyTorch pickle, not read: sdbatch never unpickles files (a pickle can run arbitrary \
         code). Convert an embedding you trust to safetensors, e.g.\n  python -c \"import torch; \
         from safetensors.torch import save_file; d = torch.load('NAME.pt', map_location='cpu', \
         weights_only=True); v = d['string_to_param']['*'] if 'string_to_param' in d else \
         next(iter(d.values())); save_file({'emb_params': v.detach().float().contiguous()}, \
         'NAME.safetensors')\"\nand remove the pickle from the folder",
    )
}

fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Every embedding in `dir` and its subfolders, in path order. Any file that cannot be used
/// (a pickle, another layout, a bad tensor) is an error naming it: a folder is loaded whole or
/// not at all.
pub fn read_dir(dir: &Path) -> Result<Vec<Embedding>> {
    if !dir.is_dir() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
        });
    }
    let mut files = Vec::new();
    collect(dir, 0, &mut files)?;
    files.sort();
    files.iter().map(|f| read_file(f)).collect()
}

/// The `.safetensors` files under `dir`; pickles are errors, hidden entries and other files are
/// skipped.
fn collect(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'))
        {
            continue;
        }
        if path.is_dir() {
            if depth < MAX_DEPTH {
                collect(&path, depth + 1, out)?;
            } else {
                tracing::warn!(folder = %path.display(), "embeddings: folder too deep, skipped");
            }
        } else if is_pickle(&path) {
            return Err(pickle_refused(&path));
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        {
            out.push(path);
        } else {
            tracing::debug!(file = %path.display(), "embeddings: not a .safetensors file, ignored");
        }
    }
    Ok(())
}

/// The tensor names of a safetensors file, from its header alone (so a model checkpoint dropped
/// in the folder by mistake is recognised without reading gigabytes).
fn tensor_names(path: &Path) -> Result<Vec<String>> {
    super::single_file::ensure_safetensors(path).map_err(|e| match e {
        Error::NotSafetensors { path, detail } => bad(&path, detail),
        other => other,
    })?;
    use super::weights::HeaderError;
    let header =
        super::weights::safetensors_header(path, MAX_HEADER_BYTES).map_err(|e| match e {
            HeaderError::TooLarge(len) => bad(
                path,
                format!("a {len}-byte safetensors header: a model or LoRA file, not an embedding"),
            ),
            HeaderError::Io(source) => Error::Io {
                path: path.to_path_buf(),
                source,
            },
            HeaderError::Json(e) => bad(path, format!("unreadable safetensors header: {e}")),
        })?;
    Ok(header
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}

/// Which tensor holds the vectors, and the layout, from the tensor names.
fn choose_tensor(path: &Path, names: &[String]) -> Result<(Layout, String)> {
    let a1111: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("string_to_param."))
        .collect();
    match (a1111.as_slice(), names) {
        ([one], _) => Ok((Layout::A1111, (*one).clone())),
        ([_, _, ..], _) => Err(bad(
            path,
            format!(
                "{} `string_to_param.*` tensors: A1111 embeddings hold one",
                a1111.len()
            ),
        )),
        ([], [one]) if one == "emb_params" => Ok((Layout::A1111, one.clone())),
        ([], [one]) => Ok((Layout::Diffusers, one.clone())),
        ([], []) => Err(bad(path, "no tensors")),
        ([], _) if names.iter().any(|n| n == "clip_l" || n == "clip_g") => Err(bad(
            path,
            "an SDXL embedding (`clip_l`/`clip_g`): not usable with SD 1.x/2.x",
        )),
        ([], _) => {
            let mut shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
            if names.len() > shown.len() {
                shown.push("…");
            }
            Err(bad(
                path,
                format!(
                    "unknown layout ({} tensors: {}); expected one `emb_params` or \
                     `string_to_param.*` tensor (AUTOMATIC1111) or one tensor named after its \
                     token (diffusers)",
                    names.len(),
                    shown.join(", ")
                ),
            ))
        }
    }
}

/// Reads one `.safetensors` embedding file and checks it on its own: a layout above, one float
/// tensor of 1 or 2 dimensions with at least one finite vector, a non-empty trigger.
pub fn read_file(path: &Path) -> Result<Embedding> {
    if is_pickle(path) {
        return Err(pickle_refused(path));
    }
    let names = tensor_names(path)?;
    let (layout, name) = choose_tensor(path, &names)?;
    let trigger = match layout {
        Layout::A1111 => path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| bad(path, "the file name is not UTF-8 (it is the trigger word)"))?,
        Layout::Diffusers => name.as_str(),
    }
    .trim()
    .to_string();
    if trigger.is_empty() {
        return Err(bad(path, "empty trigger word"));
    }
    let tensor = Tensor::read_safetensors(path)
        .map_err(|e| bad(path, format!("not a readable safetensors file: {e}")))?
        .into_iter()
        .find_map(|(n, t)| (n == name).then_some(t))
        .ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            name: name.clone(),
        })?;
    let vectors = to_vectors(path, &name, &tensor)?;
    Ok(Embedding {
        path: path.to_path_buf(),
        trigger,
        vectors,
        layout,
    })
}

/// `[dim]` or `[n, dim]` float → `[n, dim]` float32, checked.
fn to_vectors(path: &Path, name: &str, tensor: &Tensor) -> Result<Tensor> {
    let shape = tensor.size();
    if !matches!(
        tensor.kind(),
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
    ) {
        return Err(bad(
            path,
            format!("`{name}` is {:?}, not floating point", tensor.kind()),
        ));
    }
    let vectors = match shape.as_slice() {
        [d] if *d > 0 => tensor.f_view([1, *d])?,
        [n, d] if *n > 0 && *d > 0 => tensor.shallow_clone(),
        _ => {
            return Err(bad(
                path,
                format!("`{name}` has shape {shape:?}; expected [dim] or [vectors, dim]"),
            ));
        }
    };
    let vectors = vectors.f_to_kind(Kind::Float)?.f_contiguous()?;
    if !bool::try_from(vectors.f_isfinite()?.f_all()?)? {
        return Err(bad(path, format!("`{name}` holds NaN or infinite values")));
    }
    Ok(vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(path: &Path, tensors: &[(&str, Tensor)]) {
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        Tensor::write_safetensors(&refs, path).unwrap();
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, tch::Device::Cpu))
    }

    fn err(path: &Path) -> String {
        read_file(path).unwrap_err().to_string()
    }

    #[test]
    fn a1111_files_are_triggered_by_their_stem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("EasyNegative.safetensors");
        let vectors = randn(&[2, 8]);
        save(&path, &[("emb_params", vectors.shallow_clone())]);
        let e = read_file(&path).unwrap();
        assert_eq!(
            (e.trigger.as_str(), e.layout),
            ("EasyNegative", Layout::A1111)
        );
        assert_eq!((e.n_vectors(), e.dim()), (2, 8));
        assert!(e.vectors.equal(&vectors));

        // A `.pt` flattened to safetensors: `string_to_param.*`, beside other tensors.
        let path = dir.path().join("bad hands.safetensors");
        save(
            &path,
            &[
                ("string_to_param.*", randn(&[3, 8]).to_kind(Kind::Half)),
                ("string_to_token.*", Tensor::from_slice(&[265i64])),
            ],
        );
        let e = read_file(&path).unwrap();
        assert_eq!((e.trigger.as_str(), e.n_vectors()), ("bad hands", 3));
        assert_eq!(e.vectors.kind(), Kind::Float, "read as float32");
    }

    #[test]
    fn diffusers_files_are_triggered_by_their_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("learned_embeds.safetensors");
        save(&path, &[("<cat-toy>", randn(&[8]))]);
        let e = read_file(&path).unwrap();
        assert_eq!(
            (e.trigger.as_str(), e.layout),
            ("<cat-toy>", Layout::Diffusers)
        );
        assert_eq!(
            (e.n_vectors(), e.dim()),
            (1, 8),
            "one vector, [dim] read as [1, dim]"
        );
        save(&path, &[("<multi>", randn(&[4, 8]))]);
        assert_eq!(read_file(&path).unwrap().n_vectors(), 4);
    }

    #[test]
    fn unusable_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let cases: Vec<(Vec<(&str, Tensor)>, &str)> = vec![
            (
                vec![("a", randn(&[8])), ("b", randn(&[8]))],
                "unknown layout",
            ),
            (
                vec![("clip_l", randn(&[1, 8])), ("clip_g", randn(&[1, 8]))],
                "SDXL",
            ),
            (
                vec![
                    ("string_to_param.*", randn(&[1, 8])),
                    ("string_to_param.x", randn(&[1, 8])),
                ],
                "hold one",
            ),
            (vec![("emb_params", randn(&[2, 2, 8]))], "shape [2, 2, 8]"),
            (vec![("emb_params", randn(&[0, 8]))], "shape [0, 8]"),
            (
                vec![("emb_params", Tensor::from_slice(&[1i64, 2]))],
                "floating",
            ),
            (
                vec![("emb_params", Tensor::from_slice(&[1.0f32, f32::NAN]))],
                "NaN",
            ),
            (vec![("   ", randn(&[8]))], "empty trigger"),
        ];
        for (tensors, expected) in cases {
            save(&path, &tensors);
            let e = err(&path);
            assert!(e.contains(expected) && e.contains("x.safetensors"), "{e}");
        }
        std::fs::write(&path, b"definitely not safetensors").unwrap();
        assert!(
            err(&path).contains("not a safetensors file"),
            "{}",
            err(&path)
        );
        assert!(err(&dir.path().join("missing.safetensors")).contains("missing"));
    }

    #[test]
    fn pickles_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let pt = dir.path().join("EasyNegative.pt");
        // Not even a valid pickle: the refusal must come from the name, before any byte is read.
        std::fs::write(&pt, b"\x80\x02garbage").unwrap();
        let e = err(&pt);
        assert!(
            e.contains("EasyNegative.pt") && e.contains("never unpickles"),
            "{e}"
        );
        assert!(e.contains("save_file"), "says how to convert: {e}");
        // In a folder: the whole folder is refused, naming the file.
        save(
            &dir.path().join("good.safetensors"),
            &[("emb_params", randn(&[1, 8]))],
        );
        let e = read_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("EasyNegative.pt"), "{e}");
    }

    #[test]
    fn a_folder_is_read_recursively_in_path_order_skipping_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("negatives");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::create_dir_all(dir.path().join(".cache")).unwrap();
        save(
            &dir.path().join("b.safetensors"),
            &[("emb_params", randn(&[1, 8]))],
        );
        save(
            &sub.join("a.SAFETENSORS"),
            &[("emb_params", randn(&[2, 8]))],
        );
        save(
            &dir.path().join(".cache/hidden.safetensors"),
            &[("x", Tensor::from_slice(&[1i64]))],
        );
        std::fs::write(dir.path().join("b.preview.png"), b"png").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"hi").unwrap();
        let found = read_dir(dir.path()).unwrap();
        let triggers: Vec<&str> = found.iter().map(|e| e.trigger.as_str()).collect();
        assert_eq!(
            triggers,
            ["b", "a"],
            "path order: b.safetensors < negatives/"
        );
        assert!(read_dir(&dir.path().join("nope")).is_err());
        assert!(
            read_dir(tempfile::tempdir().unwrap().path())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_model_checkpoint_is_recognised_from_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let many: Vec<(String, Tensor)> = (0..6)
            .map(|i| (format!("model.diffusion_model.w{i}"), randn(&[2])))
            .collect();
        let refs: Vec<(&str, Tensor)> = many
            .iter()
            .map(|(n, t)| (n.as_str(), t.shallow_clone()))
            .collect();
        save(&path, &refs);
        let e = err(&path);
        assert!(e.contains("6 tensors") && e.contains("…"), "{e}");
    }
}
