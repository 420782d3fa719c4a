//! LoRA files: which layer each low-rank pair belongs to, and at what scale.
//!
//! A LoRA adds `scale · up · down` to a weight matrix (a convolution's kernel, flattened). The
//! files people have come in three naming families, all read here into one list of
//! [`LoraModule`]s:
//!
//! - **kohya / AUTOMATIC1111** (`sd-scripts`, LyCORIS' LoCon): `lora_unet_<module>` and
//!   `lora_te_<module>` with `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`;
//!   the module is the diffusers module path with `.` written as `_`
//!   (`lora_unet_down_blocks_0_attentions_0_proj_in`). Which `_` was a `.` is only known from the
//!   model, so these names are resolved against the model's layers when fused
//!   ([`ModuleName::Underscored`]). Scale: `alpha / rank` (1 without an alpha).
//! - **diffusers / PEFT** (`save_lora_weights` since diffusers 0.24): `unet.<module>.lora_A.weight`
//!   and `.lora_B.weight`, `text_encoder.<module>…`; the scale `lora_alpha / r` (or `/ √r` with
//!   rsLoRA) is in the file's `lora_adapter_metadata` header, per component, with PEFT's
//!   per-module `alpha_pattern`/`rank_pattern`. Without metadata the scale is 1, as diffusers
//!   assumes.
//! - **diffusers before PEFT**: `unet.<module>.lora.down.weight` / `.lora.up.weight`, the text
//!   encoder's `.lora_linear_layer.down/up`, and the attention-processor names
//!   (`attn1.processor.to_q_lora.down.weight`, `self_attn.to_out_lora.up.weight`). Scale 1, or
//!   `alpha / rank` where a `<module>.alpha` tensor says so.
//!
//! Any other key (LoHa's `hada_*`, LoKr's `lokr_*`, DoRA's magnitudes, SDXL's second text encoder,
//! a typo) is an error naming it: a LoRA that is silently applied in part gives images that look
//! plausible and are wrong.
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Which model a LoRA layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        }
    }
}

/// The layer a pair applies to, as the file names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleName {
    /// A diffusers module path (`down_blocks.0.attentions.0.proj_in`; the text encoder's without
    /// transformers 4's `text_model.` level).
    Dotted(String),
    /// kohya's spelling, `.` replaced by `_` (the text encoder's without `text_model_`).
    Underscored(String),
}

impl ModuleName {
    pub fn as_str(&self) -> &str {
        match self {
            ModuleName::Dotted(s) | ModuleName::Underscored(s) => s,
        }
    }
}

/// The file's layout (reported, and used to explain errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Kohya,
    Peft,
    DiffusersOld,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Kohya => "kohya",
            Layout::Peft => "diffusers-peft",
            Layout::DiffusersOld => "diffusers-old",
        }
    }
}

/// One low-rank pair: `delta = scale · up · down` (flattened to matrices for convolutions).
#[derive(Debug)]
pub struct LoraModule {
    pub component: Component,
    pub module: ModuleName,
    /// `[rank, in]` or `[rank, in, kh, kw]`, in the file's dtype on the CPU.
    pub down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    pub up: Tensor,
    pub scale: f64,
    /// The file's key of `down`, named in errors about this pair.
    pub key: String,
}

/// A LoRA file, read and checked.
#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub layout: Layout,
    pub modules: Vec<LoraModule>,
    /// Size of the tensors in memory (for the library's cache bound).
    pub bytes: u64,
}

fn lora_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Which half of a pair a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// A key, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParsedKey {
    layout: Layout,
    component: Component,
    module: ModuleName,
    part: Part,
}

/// diffusers' attention-processor names (`to_q_lora`) → the layer they adapt, per component.
fn processor_layer(component: Component, name: &str) -> Option<&'static str> {
    Some(match (component, name) {
        (Component::Unet, "to_q_lora") => "to_q",
        (Component::Unet, "to_k_lora") => "to_k",
        (Component::Unet, "to_v_lora") => "to_v",
        (Component::Unet, "to_out_lora") => "to_out.0",
        (Component::TextEncoder, "to_q_lora") => "q_proj",
        (Component::TextEncoder, "to_k_lora") => "k_proj",
        (Component::TextEncoder, "to_v_lora") => "v_proj",
        (Component::TextEncoder, "to_out_lora") => "out_proj",
        _ => return None,
    })
}

/// The text encoder's module path without transformers 4's `text_model.` level (transformers 5
/// has none; files of both eras exist).
fn strip_text_model(component: Component, module: &str) -> &str {
    match component {
        Component::TextEncoder => module.strip_prefix("text_model.").unwrap_or(module),
        Component::Unet => module,
    }
}

fn parse_key(key: &str) -> Option<ParsedKey> {
    // kohya: lora_unet_<m>.lora_down.weight | .lora_up.weight | .alpha
    for (prefix, component) in [
        ("lora_unet_", Component::Unet),
        ("lora_te_", Component::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (module, part) = rest.split_once('.')?;
            let part = match part {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                _ => return None,
            };
            if module.is_empty() || module.contains('.') {
                return None;
            }
            let module = match component {
                Component::TextEncoder => module.strip_prefix("text_model_").unwrap_or(module),
                Component::Unet => module,
            };
            return Some(ParsedKey {
                layout: Layout::Kohya,
                component,
                module: ModuleName::Underscored(module.to_string()),
                part,
            });
        }
    }
    // diffusers: unet.<m>.<suffix> | text_encoder.<m>.<suffix>
    let (component, rest) = if let Some(rest) = key.strip_prefix("unet.") {
        (Component::Unet, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, rest)
    } else {
        return None;
    };
    let suffixes: [(&str, Layout, Part); 7] = [
        (".lora_A.weight", Layout::Peft, Part::Down),
        (".lora_B.weight", Layout::Peft, Part::Up),
        (".lora.down.weight", Layout::DiffusersOld, Part::Down),
        (".lora.up.weight", Layout::DiffusersOld, Part::Up),
        (
            ".lora_linear_layer.down.weight",
            Layout::DiffusersOld,
            Part::Down,
        ),
        (
            ".lora_linear_layer.up.weight",
            Layout::DiffusersOld,
            Part::Up,
        ),
        (".alpha", Layout::DiffusersOld, Part::Alpha),
    ];
    let (module, layout, part) = suffixes
        .iter()
        .find_map(|(suffix, layout, part)| {
            Some((rest.strip_suffix(suffix)?.to_string(), *layout, *part))
        })
        .or_else(|| {
            // attn1.processor.to_q_lora.down.weight → attn1.to_q (UNet);
            // self_attn.to_q_lora.down.weight → self_attn.q_proj (text encoder).
            let (layer, part) = if let Some(layer) = rest.strip_suffix(".down.weight") {
                (layer, Part::Down)
            } else {
                (rest.strip_suffix(".up.weight")?, Part::Up)
            };
            let (head, name) = layer.rsplit_once('.')?;
            let head = head.strip_suffix(".processor").unwrap_or(head);
            let layer = processor_layer(component, name)?;
            Some((format!("{head}.{layer}"), Layout::DiffusersOld, part))
        })?;
    let module = strip_text_model(component, &module);
    if module.is_empty() || module.split('.').any(str::is_empty) {
        return None;
    }
    Some(ParsedKey {
        layout,
        component,
        module: ModuleName::Dotted(module.to_string()),
        part,
    })
}

/// PEFT's adapter config, as diffusers writes it into the file's header (`<component>.r`, …).
#[derive(Debug, Clone, Default, PartialEq)]
struct PeftScale {
    r: Option<f64>,
    lora_alpha: Option<f64>,
    rank_pattern: BTreeMap<String, f64>,
    alpha_pattern: BTreeMap<String, f64>,
    use_rslora: bool,
}

/// Whether PEFT's pattern `key` names `module`: the whole path or its tail after a `.`.
fn pattern_matches(key: &str, module: &str) -> bool {
    module == key
        || module
            .strip_suffix(key)
            .is_some_and(|head| head.ends_with('.'))
}

impl PeftScale {
    /// From the `lora_adapter_metadata` JSON; `None` when it says nothing about `component`.
    fn from_metadata(
        path: &Path,
        meta: &serde_json::Value,
        component: Component,
    ) -> Result<Option<Self>> {
        let field = |name: &str| meta.get(format!("{}.{name}", component.as_str()));
        if field("lora_alpha").is_none() && field("r").is_none() {
            return Ok(None);
        }
        if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(lora_err(
                path,
                format!(
                    "{}: DoRA adapters (use_dora) are not supported",
                    component.as_str()
                ),
            ));
        }
        let number = |name: &str| field(name).and_then(|v| v.as_f64());
        let pattern = |name: &str| -> BTreeMap<String, f64> {
            field(name)
                .and_then(|v| v.as_object())
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Some(Self {
            r: number("r"),
            lora_alpha: number("lora_alpha"),
            rank_pattern: pattern("rank_pattern"),
            alpha_pattern: pattern("alpha_pattern"),
            use_rslora: field("use_rslora").and_then(|v| v.as_bool()) == Some(true),
        }))
    }

    /// `alpha / r` for `module` (`alpha / √r` with rsLoRA), `rank` being the pair's actual rank.
    fn scale(&self, module: &str, rank: i64) -> f64 {
        let find = |patterns: &BTreeMap<String, f64>| {
            patterns
                .iter()
                .find(|(k, _)| pattern_matches(k, module))
                .map(|(_, v)| *v)
        };
        let r = find(&self.rank_pattern).or(self.r).unwrap_or(rank as f64);
        let alpha = find(&self.alpha_pattern).or(self.lora_alpha).unwrap_or(r);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// The JSON header's `__metadata__` of a safetensors file (string values), read without the
/// tensors. The header is bounded as the format bounds it (100 MB).
fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use super::weights::HeaderError;
    // The format's own bound on the header.
    let header = super::weights::safetensors_header(path, 100_000_000).map_err(|e| match e {
        HeaderError::TooLarge(len) => lora_err(path, format!("safetensors header of {len} bytes")),
        HeaderError::Io(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        HeaderError::Json(source) => Error::Json {
            path: path.to_path_buf(),
            source,
        },
    })?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Reads a LoRA `.safetensors` file (pickled `.pt`/`.ckpt`/`.bin` files are refused unread).
pub fn read(path: &Path) -> Result<LoraFile> {
    super::single_file::ensure_safetensors(path)?;
    let metadata = safetensors_metadata(path)?;
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| lora_err(path, format!("not a readable safetensors file: {e}")))?;
    let peft_meta = match metadata.get("lora_adapter_metadata") {
        Some(text) => Some(
            serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| lora_err(path, format!("lora_adapter_metadata is not JSON: {e}")))?,
        ),
        None => None,
    };
    from_tensors(path, tensors, peft_meta.as_ref())
}

/// [`read`]'s work on tensors in memory: groups the keys into pairs and computes each scale.
pub fn from_tensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    peft_meta: Option<&serde_json::Value>,
) -> Result<LoraFile> {
    if tensors.is_empty() {
        return Err(lora_err(path, "no tensors: not a LoRA"));
    }
    let mut unknown: Vec<&str> = Vec::new();
    let mut layouts: Vec<Layout> = Vec::new();
    // (component, module) → (down key, down, up, alpha)
    #[derive(Default)]
    struct Pair {
        down: Option<(String, Tensor)>,
        up: Option<(String, Tensor)>,
        alpha: Option<(String, f64)>,
    }
    let mut pairs: BTreeMap<(Component, ModuleName), Pair> = BTreeMap::new();
    let mut bytes = 0u64;
    for (key, tensor) in &tensors {
        let Some(parsed) = parse_key(key) else {
            unknown.push(key);
            continue;
        };
        if !layouts.contains(&parsed.layout) {
            layouts.push(parsed.layout);
        }
        let pair = pairs
            .entry((parsed.component, parsed.module.clone()))
            .or_default();
        match parsed.part {
            Part::Down | Part::Up => {
                let dims = tensor.dim();
                if dims != 2 && dims != 4 {
                    return Err(lora_err(
                        path,
                        format!(
                            "`{key}` has shape {:?}: a LoRA matrix has 2 or 4 dimensions",
                            tensor.size()
                        ),
                    ));
                }
                bytes += (tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64;
                let slot = if parsed.part == Part::Down {
                    &mut pair.down
                } else {
                    &mut pair.up
                };
                *slot = Some((key.clone(), tensor.shallow_clone()));
            }
            Part::Alpha => {
                let value = if tensor.numel() == 1 {
                    tensor
                        .f_double_value(&[])
                        .or_else(|_| tensor.f_view([1])?.f_double_value(&[0]))
                        .map_err(|e| lora_err(path, format!("`{key}`: {e}")))?
                } else {
                    return Err(lora_err(
                        path,
                        format!(
                            "`{key}` has shape {:?}: an alpha is one number",
                            tensor.size()
                        ),
                    ));
                };
                pair.alpha = Some((key.clone(), value));
            }
        }
    }
    if !unknown.is_empty() {
        unknown.sort_unstable();
        let shown: Vec<String> = unknown.iter().take(5).map(|k| format!("`{k}`")).collect();
        let hint = if unknown
            .iter()
            .any(|k| k.contains("hada_") || k.contains("lokr_"))
        {
            " (LoHa/LoKr adapters are not supported, only LoRA and LoCon)"
        } else if unknown
            .iter()
            .any(|k| k.contains("dora_scale") || k.contains("magnitude"))
        {
            " (DoRA adapters are not supported)"
        } else if unknown
            .iter()
            .any(|k| k.starts_with("lora_te2_") || k.starts_with("text_encoder_2."))
        {
            " (a second text encoder: an SDXL LoRA?)"
        } else {
            ""
        };
        return Err(lora_err(
            path,
            format!(
                "{} unknown key(s){hint}: {}{}",
                unknown.len(),
                shown.join(", "),
                if unknown.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ),
        ));
    }
    let layout = match layouts.as_slice() {
        [one] => *one,
        // PEFT files may carry `.alpha` keys (parsed as the old layout's): PEFT wins.
        [_, _] if layouts.contains(&Layout::Peft) && !layouts.contains(&Layout::Kohya) => {
            Layout::Peft
        }
        _ => {
            return Err(lora_err(
                path,
                format!(
                    "mixes key layouts ({}): not one LoRA",
                    layouts
                        .iter()
                        .map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    let peft: HashMap<Component, PeftScale> = match (layout, peft_meta) {
        (Layout::Peft, Some(meta)) => [Component::Unet, Component::TextEncoder]
            .into_iter()
            .filter_map(|c| {
                PeftScale::from_metadata(path, meta, c)
                    .transpose()
                    .map(|s| s.map(|s| (c, s)))
            })
            .collect::<Result<_>>()?,
        _ => HashMap::new(),
    };

    let mut modules = Vec::with_capacity(pairs.len());
    for ((component, module), pair) in pairs {
        let name = module.as_str().to_string();
        let (down_key, down) = pair.down.ok_or_else(|| {
            lora_err(
                path,
                format!("{} `{name}` has no down (A) matrix", component.as_str()),
            )
        })?;
        let (up_key, up) = pair
            .up
            .ok_or_else(|| lora_err(path, format!("`{down_key}` has no up (B) matrix")))?;
        let (ds, us) = (down.size(), up.size());
        let rank = ds[0];
        let fits =
            us.len() == ds.len() && us[1] == rank && (us.len() == 2 || (us[2] == 1 && us[3] == 1));
        if !fits || rank == 0 {
            return Err(lora_err(
                path,
                format!("`{down_key}` {ds:?} and `{up_key}` {us:?} are not a LoRA pair"),
            ));
        }
        let scale = match (&pair.alpha, peft.get(&component)) {
            (Some((_, alpha)), _) => alpha / rank as f64,
            (None, Some(p)) => p.scale(&name, rank),
            (None, None) => 1.0,
        };
        if !scale.is_finite() {
            return Err(lora_err(
                path,
                format!("`{down_key}`: scale {scale} is not finite"),
            ));
        }
        modules.push(LoraModule {
            component,
            module,
            down,
            up,
            scale,
            key: down_key,
        });
    }
    Ok(LoraFile {
        path: path.to_path_buf(),
        layout,
        modules,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t(shape: &[i64]) -> Tensor {
        Tensor::ones(shape, (Kind::Float, Device::Cpu))
    }

    fn key(k: &str) -> Option<(Layout, Component, String, Part)> {
        parse_key(k).map(|p| (p.layout, p.component, p.module.as_str().to_string(), p.part))
    }

    #[test]
    fn keys_of_every_layout() {
        use Component::*;
        use Part::*;
        let cases = [
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                Some((
                    Layout::Kohya,
                    Unet,
                    "down_blocks_0_attentions_0_proj_in",
                    Down,
                )),
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                Some((
                    Layout::Kohya,
                    TextEncoder,
                    "encoder_layers_0_self_attn_q_proj",
                    Alpha,
                )),
            ),
            (
                "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight",
                Some((
                    Layout::Peft,
                    Unet,
                    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
                    Up,
                )),
            ),
            (
                "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.weight",
                Some((Layout::Peft, TextEncoder, "encoder.layers.1.mlp.fc1", Down)),
            ),
            (
                "text_encoder.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight",
                Some((
                    Layout::DiffusersOld,
                    TextEncoder,
                    "encoder.layers.1.mlp.fc1",
                    Up,
                )),
            ),
            (
                "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight",
                Some((
                    Layout::DiffusersOld,
                    Unet,
                    "down_blocks.0.attentions.0.proj_in",
                    Down,
                )),
            ),
            (
                "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
                Some((
                    Layout::DiffusersOld,
                    Unet,
                    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
                    Up,
                )),
            ),
            (
                // The text encoder's processor names map to its own layer names.
                "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight",
                Some((
                    Layout::DiffusersOld,
                    TextEncoder,
                    "encoder.layers.0.self_attn.k_proj",
                    Down,
                )),
            ),
            ("lora_unet_x.hada_w1_a", None),
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                None,
            ),
            ("unet.x.lora_magnitude_vector", None),
            ("vae.decoder.lora_A.weight", None),
            ("unet..lora_A.weight", None),
        ];
        for (k, want) in cases {
            let want = want.map(|(l, c, m, p)| (l, c, m.to_string(), p));
            assert_eq!(key(k), want, "{k}");
        }
    }

    #[test]
    fn kohya_scale_is_alpha_over_rank() {
        let f = from_tensors(
            Path::new("k.safetensors"),
            vec![
                ("lora_unet_a_b.lora_down.weight".into(), t(&[4, 8])),
                ("lora_unet_a_b.lora_up.weight".into(), t(&[6, 4])),
                ("lora_unet_a_b.alpha".into(), Tensor::from(2.0f32)),
                (
                    "lora_te_text_model_c.lora_down.weight".into(),
                    t(&[2, 3, 3, 3]),
                ),
                (
                    "lora_te_text_model_c.lora_up.weight".into(),
                    t(&[5, 2, 1, 1]),
                ),
            ],
            None,
        )
        .unwrap();
        assert_eq!(f.layout, Layout::Kohya);
        let scales: Vec<(Component, &str, f64)> = f
            .modules
            .iter()
            .map(|m| (m.component, m.module.as_str(), m.scale))
            .collect();
        assert_eq!(
            scales,
            [
                (Component::Unet, "a_b", 0.5),
                (Component::TextEncoder, "c", 1.0)
            ]
        );
    }

    #[test]
    fn peft_scale_comes_from_the_metadata_with_patterns() {
        let meta = serde_json::json!({
            "unet.r": 4, "unet.lora_alpha": 8,
            "unet.rank_pattern": {"to_k": 2}, "unet.alpha_pattern": {"attn1.to_k": 1},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": true,
        });
        let f = from_tensors(
            Path::new("p.safetensors"),
            vec![
                ("unet.b.attn1.to_q.lora_A.weight".into(), t(&[4, 8])),
                ("unet.b.attn1.to_q.lora_B.weight".into(), t(&[8, 4])),
                ("unet.b.attn1.to_k.lora_A.weight".into(), t(&[2, 8])),
                ("unet.b.attn1.to_k.lora_B.weight".into(), t(&[8, 2])),
                ("text_encoder.q_proj.lora_A.weight".into(), t(&[4, 8])),
                ("text_encoder.q_proj.lora_B.weight".into(), t(&[8, 4])),
            ],
            Some(&meta),
        )
        .unwrap();
        let scales: Vec<f64> = f.modules.iter().map(|m| m.scale).collect();
        // to_k: alpha_pattern 1 over rank_pattern 2; to_q: 8/4; text encoder rsLoRA: 4/√4.
        assert_eq!(scales, [0.5, 2.0, 2.0]);
        // Without metadata diffusers assumes alpha = rank.
        let f = from_tensors(
            Path::new("p.safetensors"),
            vec![
                ("unet.x.lora_A.weight".into(), t(&[4, 8])),
                ("unet.x.lora_B.weight".into(), t(&[8, 4])),
            ],
            None,
        )
        .unwrap();
        assert_eq!(f.modules[0].scale, 1.0);
        let dora = serde_json::json!({"unet.r": 4, "unet.lora_alpha": 4, "unet.use_dora": true});
        let err = from_tensors(
            Path::new("p.safetensors"),
            vec![
                ("unet.x.lora_A.weight".into(), t(&[4, 8])),
                ("unet.x.lora_B.weight".into(), t(&[8, 4])),
            ],
            Some(&dora),
        )
        .unwrap_err();
        assert!(err.to_string().contains("DoRA"), "{err}");
    }

    #[test]
    fn unknown_keys_and_broken_pairs_are_errors_naming_them() {
        let err = |tensors: Vec<(&str, Tensor)>| {
            from_tensors(
                Path::new("bad.safetensors"),
                tensors
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                None,
            )
            .unwrap_err()
            .to_string()
        };
        let e = err(vec![
            ("lora_unet_a.lora_down.weight", t(&[2, 4])),
            ("lora_unet_a.lora_up.weight", t(&[4, 2])),
            ("lora_unet_a.hada_w1_a", t(&[2, 4])),
        ]);
        assert!(
            e.contains("bad.safetensors")
                && e.contains("`lora_unet_a.hada_w1_a`")
                && e.contains("LoHa"),
            "{e}"
        );
        let e = err(vec![("lora_unet_a.lora_down.weight", t(&[2, 4]))]);
        assert!(e.contains("no up"), "{e}");
        let e = err(vec![
            ("lora_unet_a.lora_down.weight", t(&[2, 4])),
            ("lora_unet_a.lora_up.weight", t(&[4, 3])),
        ]);
        assert!(e.contains("not a LoRA pair"), "{e}");
        let e = err(vec![
            ("lora_unet_a.lora_down.weight", t(&[2, 4])),
            ("lora_unet_a.lora_up.weight", t(&[4, 2])),
            ("unet.b.lora_A.weight", t(&[2, 4])),
            ("unet.b.lora_B.weight", t(&[4, 2])),
        ]);
        assert!(e.contains("mixes key layouts"), "{e}");
        let e = err(vec![]);
        assert!(e.contains("no tensors"), "{e}");
        let e = err(vec![
            ("lora_unet_a.lora_down.weight", t(&[2, 4])),
            ("lora_unet_a.lora_up.weight", t(&[4, 2])),
            ("lora_unet_a.alpha", t(&[2])),
        ]);
        assert!(e.contains("one number"), "{e}");
    }

    #[test]
    fn pickles_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pt");
        std::fs::write(&path, b"\x80\x04 not read").unwrap();
        let err = read(&path).unwrap_err();
        assert!(matches!(err, Error::NotSafetensors { .. }), "{err}");
    }

    #[test]
    fn metadata_is_read_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        Tensor::write_safetensors(
            &[
                ("unet.x.lora_A.weight", t(&[2, 3])),
                ("unet.x.lora_B.weight", t(&[3, 2])),
            ],
            &path,
        )
        .unwrap();
        assert!(safetensors_metadata(&path).unwrap().is_empty());
        let f = read(&path).unwrap();
        assert_eq!((f.layout, f.modules.len(), f.bytes), (Layout::Peft, 1, 48));
    }
}
