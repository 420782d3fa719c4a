//! LoRAs per batch: fused into the weights before the batch, the originals restored exactly after.
//!
//! Fusing (`W += Σ weight·scale·up·down`) costs one matrix product per adapted layer per switch
//! and nothing per step, which is why a GPU batch holds one LoRA set (the planner's shape key
//! says so) and consecutive batches with the same set fuse once. Restoring copies back the
//! original tensors kept on first touch, so unfusing leaves no drift, however many switches a
//! worker goes through (subtracting the delta again would not give the same bits back).
//!
//! Deltas are summed in float32 and added to the float32 original once, then stored in the
//! model's dtype, so fp16 weights get a single rounding whatever the number of LoRAs.
use super::lora::{self, Component, LoraFile, ModuleName};
use super::weights::Layers;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::SystemTime;
use tch::{Kind, Tensor};

/// Most LoRAs one message may ask for.
pub const MAX_LORAS: usize = 8;
/// Largest LoRA weight magnitude (A1111 users go up to about 2; beyond 10 images are noise).
pub const MAX_LORA_WEIGHT: f64 = 10.0;
/// Longest LoRA name, in bytes.
pub const MAX_LORA_NAME: usize = 128;

/// One LoRA of a request: a name in the worker's LoRA folder and its weight.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraWeight {
    pub name: String,
    pub weight: f64,
}

/// A LoRA name is a file stem in the LoRA folder, never a path: letters, digits, `_`, `-`, `.`,
/// `+`, not starting with `.`.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+');
    if name.is_empty() || name.len() > MAX_LORA_NAME {
        return Err(format!("a LoRA name has 1..={MAX_LORA_NAME} bytes"));
    }
    if name.starts_with('.') || !name.chars().all(ok_char) {
        return Err(
            "a LoRA name is a file stem in the worker's LoRA folder: letters, digits, `_`, `-`, \
             `.`, `+`, not starting with `.`"
                .into(),
        );
    }
    Ok(())
}

/// Checks a request's LoRAs and puts them in canonical order (by name), so that the same set
/// asked for in another order is the same batch shape and fuses to the same bits.
pub fn canonical(mut loras: Vec<LoraWeight>) -> std::result::Result<Vec<LoraWeight>, String> {
    if loras.len() > MAX_LORAS {
        return Err(format!(
            "{} LoRAs, at most {MAX_LORAS} per request",
            loras.len()
        ));
    }
    for l in &loras {
        check_name(&l.name).map_err(|e| format!("LoRA {}: {e}", crate::bounded::quote(&l.name)))?;
        if !l.weight.is_finite() || l.weight.abs() > MAX_LORA_WEIGHT {
            return Err(format!(
                "LoRA {} weight {} must be in -{MAX_LORA_WEIGHT}..={MAX_LORA_WEIGHT}",
                l.name, l.weight
            ));
        }
    }
    loras.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = loras.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(format!("LoRA {} is listed twice", w[0].name));
    }
    Ok(loras)
}

/// `NAME:WEIGHT` (weight 1 when left out), as `--lora` takes it.
pub fn parse_flag(text: &str) -> std::result::Result<LoraWeight, String> {
    let (name, weight) = match text.rsplit_once(':') {
        Some((name, w)) => (
            name,
            w.trim()
                .parse::<f64>()
                .map_err(|_| format!("`{text}`: the weight after `:` must be a number"))?,
        ),
        None => (text, 1.0),
    };
    check_name(name)?;
    Ok(LoraWeight {
        name: name.to_string(),
        weight,
    })
}

/// The file `name` names in `dir`: `dir/name.safetensors`, which must exist.
pub fn lora_path(dir: &Path, name: &str) -> std::result::Result<PathBuf, String> {
    check_name(name)?;
    let path = dir.join(format!("{name}.safetensors"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "unknown LoRA {} (no {name}.safetensors in the worker's LoRA folder)",
            crate::bounded::quote(name)
        ))
    }
}

/// The LoRA folder (`--lora-dir`) with a cache of files already read, bounded in bytes and
/// checked against each file's size and modification time so a replaced file is read again.
pub struct LoraLibrary {
    dir: PathBuf,
    max_bytes: u64,
    /// Least recently used first.
    cache: Vec<Cached>,
}

struct Cached {
    name: String,
    stamp: (u64, Option<SystemTime>),
    file: Rc<LoraFile>,
}

fn stamp(path: &Path) -> Result<(u64, Option<SystemTime>)> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((meta.len(), meta.modified().ok()))
}

impl LoraLibrary {
    pub fn new(dir: &Path, max_cache_bytes: u64) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes: max_cache_bytes,
            cache: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file `name` names, read (or taken from the cache).
    pub fn get(&mut self, name: &str) -> Result<Rc<LoraFile>> {
        let path = lora_path(&self.dir, name).map_err(|message| Error::Lora {
            path: self.dir.clone(),
            message,
        })?;
        let now = stamp(&path)?;
        if let Some(i) = self.cache.iter().position(|c| c.name == name) {
            let cached = self.cache.remove(i);
            if cached.stamp == now {
                let file = cached.file.clone();
                self.cache.push(cached);
                return Ok(file);
            }
        }
        let file = Rc::new(lora::read(&path)?);
        tracing::info!(
            lora = name,
            layout = file.layout.as_str(),
            layers = file.modules.len(),
            "LoRA read"
        );
        self.cache.push(Cached {
            name: name.to_string(),
            stamp: now,
            file: file.clone(),
        });
        let mut total: u64 = self.cache.iter().map(|c| c.file.bytes).sum();
        while total > self.max_bytes && self.cache.len() > 1 {
            total -= self.cache.remove(0).file.bytes;
        }
        Ok(file)
    }
}

/// A layer a LoRA adapts, by component and module path.
type LayerKey = (Component, String);

/// The model's adaptable layers and the LoRA set fused into them.
pub struct Adapters {
    layers: HashMap<LayerKey, Tensor>,
    /// kohya's underscored spelling → the module path.
    underscored: HashMap<(Component, String), String>,
    /// Originals of the layers the fused set changed.
    originals: HashMap<LayerKey, Tensor>,
    active: Vec<LoraWeight>,
    library: Option<LoraLibrary>,
}

impl Adapters {
    /// `unet` and `text_encoder` as [`super::weights::Weights::finish`] returns them (the text
    /// encoder's without transformers 4's `text_model.` level, as LoRA names are matched).
    pub fn new(unet: Layers, text_encoder: Layers) -> Self {
        let mut layers = HashMap::new();
        for (component, map) in [
            (Component::Unet, unet),
            (Component::TextEncoder, text_encoder),
        ] {
            for (module, tensor) in map {
                let module = match component {
                    Component::TextEncoder => module
                        .strip_prefix("text_model.")
                        .map(str::to_string)
                        .unwrap_or(module),
                    Component::Unet => module,
                };
                layers.insert((component, module), tensor);
            }
        }
        let underscored = layers
            .keys()
            .map(|(c, m)| ((*c, m.replace('.', "_")), m.clone()))
            .collect();
        Self {
            layers,
            underscored,
            originals: HashMap::new(),
            active: Vec::new(),
            library: None,
        }
    }

    pub fn set_library(&mut self, library: LoraLibrary) {
        self.library = Some(library);
    }

    pub fn library(&self) -> Option<&LoraLibrary> {
        self.library.as_ref()
    }

    /// The set fused now (canonical order).
    pub fn active(&self) -> &[LoraWeight] {
        &self.active
    }

    /// Checks that every LoRA of `set` exists in the library (cheap: no file is read).
    pub fn check_names(&self, set: &[LoraWeight]) -> Result<()> {
        if set.is_empty() {
            return Ok(());
        }
        let Some(library) = &self.library else {
            return Err(Error::InvalidArgument(
                "LoRAs were asked for, but no LoRA folder is configured (--lora-dir)".into(),
            ));
        };
        for l in set {
            lora_path(library.dir(), &l.name).map_err(|message| Error::Lora {
                path: library.dir().to_path_buf(),
                message,
            })?;
        }
        Ok(())
    }

    /// Makes `set` (canonical order) the fused set; `Ok(false)` when it already was. On an
    /// error (unreadable file, unknown layer, shape mismatch) the model is left without LoRAs.
    pub fn activate(&mut self, set: &[LoraWeight]) -> Result<bool> {
        if set == self.active.as_slice() {
            return Ok(false);
        }
        self.restore()?;
        if set.is_empty() {
            return Ok(true);
        }
        let files: Vec<(f64, Rc<LoraFile>)> = {
            let Some(library) = self.library.as_mut() else {
                return Err(Error::InvalidArgument(
                    "LoRAs were asked for, but no LoRA folder is configured (--lora-dir)".into(),
                ));
            };
            set.iter()
                .map(|l| Ok((l.weight, library.get(&l.name)?)))
                .collect::<Result<_>>()?
        };
        let pairs: Vec<(f64, &LoraFile)> = files.iter().map(|(w, f)| (*w, f.as_ref())).collect();
        self.fuse(&pairs)?;
        self.active = set.to_vec();
        Ok(true)
    }

    /// Fuses `files` with their weights. Every pair is resolved and shape-checked before any
    /// weight changes.
    pub fn fuse(&mut self, files: &[(f64, &LoraFile)]) -> Result<()> {
        // Resolve first: a bad file changes nothing.
        let mut targets: BTreeMap<LayerKey, Vec<(f64, &lora::LoraModule)>> = BTreeMap::new();
        for (weight, file) in files {
            for m in &file.modules {
                let key = self.resolve(file, m)?;
                let target = &self.layers[&key];
                let (ts, ds, us) = (target.size(), m.down.size(), m.up.size());
                let (out, inner) = (us[0], ds[1..].iter().product::<i64>());
                let target_inner: i64 = ts[1..].iter().product();
                // A linear pair fits a 1x1 convolution (and the reverse): same matrix.
                if ts[0] != out
                    || target_inner != inner
                    || (ds.len() == 4 && ts.len() == 4 && ds[2..] != ts[2..])
                {
                    return Err(Error::Lora {
                        path: file.path.clone(),
                        message: format!(
                            "`{}` ({ds:?} × {us:?}) does not fit {} `{}` of shape {ts:?}",
                            m.key,
                            key.0.as_str(),
                            key.1
                        ),
                    });
                }
                targets.entry(key).or_default().push((*weight, m));
            }
        }
        for (key, pairs) in targets {
            let target = self.layers[&key].shallow_clone();
            let device = target.device();
            let mut delta = Tensor::f_zeros(target.size(), (Kind::Float, device))?;
            for (weight, m) in pairs {
                let rank = m.down.size()[0];
                let down = m
                    .down
                    .f_to_device(device)?
                    .f_to_kind(Kind::Float)?
                    .f_reshape([rank, -1])?;
                let up =
                    m.up.f_to_device(device)?
                        .f_to_kind(Kind::Float)?
                        .f_reshape([-1, rank])?;
                let product = up.f_matmul(&down)?.f_reshape(target.size())?;
                delta = delta.f_add(&product.f_mul_scalar(weight * m.scale)?)?;
            }
            let original = match self.originals.get(&key) {
                Some(o) => o.shallow_clone(),
                None => {
                    let mut copy = target.f_empty_like()?;
                    copy.f_copy_(&target)?;
                    self.originals.insert(key.clone(), copy.shallow_clone());
                    copy
                }
            };
            let fused = original
                .f_to_kind(Kind::Float)?
                .f_add(&delta)?
                .f_to_kind(target.kind())?;
            let mut target = target;
            target.f_copy_(&fused)?;
        }
        Ok(())
    }

    /// Puts back every original the fused set changed (bit for bit).
    pub fn restore(&mut self) -> Result<()> {
        for (key, original) in self.originals.drain() {
            let mut target = self.layers[&key].shallow_clone();
            target.f_copy_(&original)?;
        }
        self.active.clear();
        Ok(())
    }

    fn resolve(&self, file: &LoraFile, m: &lora::LoraModule) -> Result<LayerKey> {
        let found = match &m.module {
            ModuleName::Dotted(path) => {
                let key = (m.component, path.clone());
                self.layers.contains_key(&key).then_some(key)
            }
            ModuleName::Underscored(name) => self
                .underscored
                .get(&(m.component, name.clone()))
                .map(|path| (m.component, path.clone())),
        };
        found.ok_or_else(|| Error::Lora {
            path: file.path.clone(),
            message: format!(
                "`{}`: the model's {} has no layer `{}` (a LoRA for another model family?)",
                m.key,
                m.component.as_str(),
                m.module.as_str()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn layers() -> (Layers, Layers) {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let unet = [
            (
                "down_blocks.0.attn1.to_q".to_string(),
                Tensor::randn([6, 4], opts),
            ),
            (
                "down_blocks.0.conv1".to_string(),
                Tensor::randn([5, 3, 3, 3], opts),
            ),
            (
                "down_blocks.0.proj_in".to_string(),
                Tensor::randn([4, 4, 1, 1], opts),
            ),
        ]
        .into_iter()
        .collect();
        let te = [(
            "text_model.encoder.layers.0.self_attn.q_proj".to_string(),
            Tensor::randn([4, 4], opts),
        )]
        .into_iter()
        .collect();
        (unet, te)
    }

    fn file(name: &str, tensors: Vec<(&str, Tensor)>) -> LoraFile {
        lora::from_tensors(
            Path::new(name),
            tensors
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            None,
        )
        .unwrap()
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn fuses_linear_conv_and_underscored_names_then_restores_bit_for_bit() {
        let (unet, te) = layers();
        let q = unet["down_blocks.0.attn1.to_q"].shallow_clone();
        let conv = unet["down_blocks.0.conv1"].shallow_clone();
        let proj = unet["down_blocks.0.proj_in"].shallow_clone();
        let teq = te["text_model.encoder.layers.0.self_attn.q_proj"].shallow_clone();
        let before: Vec<Tensor> = [&q, &conv, &proj, &teq].iter().map(|t| t.copy()).collect();
        let mut a = Adapters::new(unet, te);
        let (qd, qu) = (randn(&[2, 4]), randn(&[6, 2]));
        let (cd, cu) = (randn(&[2, 3, 3, 3]), randn(&[5, 2, 1, 1]));
        let (pd, pu) = (randn(&[2, 4]), randn(&[4, 2]));
        let (td, tu) = (randn(&[2, 4]), randn(&[4, 2]));
        let kohya = file(
            "k.safetensors",
            vec![
                (
                    "lora_unet_down_blocks_0_attn1_to_q.lora_down.weight",
                    qd.copy(),
                ),
                (
                    "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight",
                    qu.copy(),
                ),
                (
                    "lora_unet_down_blocks_0_attn1_to_q.alpha",
                    Tensor::from(1.0f32),
                ),
                ("lora_unet_down_blocks_0_conv1.lora_down.weight", cd.copy()),
                ("lora_unet_down_blocks_0_conv1.lora_up.weight", cu.copy()),
                // A linear pair on a 1x1 convolution.
                (
                    "lora_unet_down_blocks_0_proj_in.lora_down.weight",
                    pd.copy(),
                ),
                ("lora_unet_down_blocks_0_proj_in.lora_up.weight", pu.copy()),
                (
                    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                    td.copy(),
                ),
                (
                    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                    tu.copy(),
                ),
            ],
        );
        a.fuse(&[(0.8, &kohya)]).unwrap();
        let expect_q = &before[0] + qu.matmul(&qd) * (0.8 * 0.5);
        assert!(q.allclose(&expect_q, 1e-6, 1e-6, false));
        let expect_conv = &before[1]
            + cu.reshape([5, 2])
                .matmul(&cd.reshape([2, 27]))
                .reshape([5, 3, 3, 3])
                * 0.8;
        assert!(conv.allclose(&expect_conv, 1e-6, 1e-6, false));
        let expect_proj = &before[2] + pu.matmul(&pd).reshape([4, 4, 1, 1]) * 0.8;
        assert!(proj.allclose(&expect_proj, 1e-6, 1e-6, false));
        let expect_te = &before[3] + tu.matmul(&td) * 0.8;
        assert!(teq.allclose(&expect_te, 1e-6, 1e-6, false));
        a.restore().unwrap();
        for (now, was) in [&q, &conv, &proj, &teq].iter().zip(&before) {
            assert!(now.equal(was), "restored bit for bit");
        }
    }

    #[test]
    fn a_hundred_switches_leave_no_drift_in_half_precision() {
        let (unet, te) = layers();
        let unet: Layers = unet
            .into_iter()
            .map(|(k, v)| (k, v.to_kind(Kind::Half)))
            .collect();
        let q = unet["down_blocks.0.attn1.to_q"].shallow_clone();
        let before = q.copy();
        let mut a = Adapters::new(unet, te);
        let one = file(
            "a.safetensors",
            vec![
                (
                    "unet.down_blocks.0.attn1.to_q.lora_A.weight",
                    randn(&[2, 4]),
                ),
                (
                    "unet.down_blocks.0.attn1.to_q.lora_B.weight",
                    randn(&[6, 2]),
                ),
            ],
        );
        let two = file(
            "b.safetensors",
            vec![
                (
                    "unet.down_blocks.0.attn1.to_q.lora.down.weight",
                    randn(&[3, 4]),
                ),
                (
                    "unet.down_blocks.0.attn1.to_q.lora.up.weight",
                    randn(&[6, 3]),
                ),
            ],
        );
        let mut fused_once = None;
        for i in 0..100 {
            a.fuse(&[(0.7, &one), (-0.3, &two)]).unwrap();
            assert!(!q.equal(&before));
            // Fusing is deterministic: every cycle gives the same fused bits.
            match &fused_once {
                None => fused_once = Some(q.copy()),
                Some(f) => assert!(q.equal(f), "cycle {i} fused differently"),
            }
            a.restore().unwrap();
            assert!(q.equal(&before), "cycle {i} drifted");
        }
    }

    #[test]
    fn a_bad_file_changes_nothing() {
        let (unet, te) = layers();
        let q = unet["down_blocks.0.attn1.to_q"].shallow_clone();
        let before = q.copy();
        let mut a = Adapters::new(unet, te);
        // The first pair fits, the second names a layer the model lacks.
        let bad = file(
            "bad.safetensors",
            vec![
                (
                    "unet.down_blocks.0.attn1.to_q.lora_A.weight",
                    randn(&[2, 4]),
                ),
                (
                    "unet.down_blocks.0.attn1.to_q.lora_B.weight",
                    randn(&[6, 2]),
                ),
                ("unet.mid_block.attn1.to_k.lora_A.weight", randn(&[2, 4])),
                ("unet.mid_block.attn1.to_k.lora_B.weight", randn(&[6, 2])),
            ],
        );
        let err = a.fuse(&[(1.0, &bad)]).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("mid_block.attn1.to_k"),
            "{err}"
        );
        assert!(q.equal(&before));
        let misshapen = file(
            "shape.safetensors",
            vec![
                (
                    "unet.down_blocks.0.attn1.to_q.lora_A.weight",
                    randn(&[2, 5]),
                ),
                (
                    "unet.down_blocks.0.attn1.to_q.lora_B.weight",
                    randn(&[6, 2]),
                ),
            ],
        );
        let err = a.fuse(&[(1.0, &misshapen)]).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        assert!(q.equal(&before));
    }

    #[test]
    fn requests_are_checked_and_put_in_canonical_order() {
        let l = |name: &str, weight: f64| LoraWeight {
            name: name.into(),
            weight,
        };
        assert_eq!(
            canonical(vec![l("b", -0.3), l("a", 0.7)]).unwrap(),
            vec![l("a", 0.7), l("b", -0.3)]
        );
        assert!(
            canonical(vec![l("a", 1.0), l("a", 0.5)])
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            canonical(vec![l("a", 10.5)])
                .unwrap_err()
                .contains("weight")
        );
        assert!(canonical(vec![l("a", f64::NAN)]).is_err());
        assert!(canonical(vec![l("../etc/passwd", 1.0)]).is_err());
        assert!(canonical(vec![l(".hidden", 1.0)]).is_err());
        assert!(canonical(vec![l("a/b", 1.0)]).is_err());
        assert!(canonical((0..9).map(|i| l(&format!("l{i}"), 1.0)).collect()).is_err());
        assert_eq!(parse_flag("style:0.8").unwrap(), l("style", 0.8));
        assert_eq!(
            parse_flag("lcm-lora-sdv1-5").unwrap(),
            l("lcm-lora-sdv1-5", 1.0)
        );
        assert!(parse_flag("style:x").is_err());
    }

    #[test]
    fn the_library_reads_once_and_again_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let write = |rank: i64| {
            Tensor::write_safetensors(
                &[
                    ("unet.x.lora_A.weight", randn(&[rank, 4])),
                    ("unet.x.lora_B.weight", randn(&[4, rank])),
                ],
                &path,
            )
            .unwrap()
        };
        write(2);
        let mut lib = LoraLibrary::new(dir.path(), 1 << 20).unwrap();
        let a = lib.get("s").unwrap();
        assert!(Rc::ptr_eq(&a, &lib.get("s").unwrap()));
        write(3); // another size: the stamp changes
        let b = lib.get("s").unwrap();
        assert_eq!(b.modules[0].down.size(), [3, 4]);
        let err = lib.get("missing").unwrap_err().to_string();
        assert!(err.contains("unknown LoRA"), "{err}");
    }
}
