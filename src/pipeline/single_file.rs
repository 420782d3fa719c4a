//! Single-file checkpoints in the original CompVis/LDM key layout (the `.safetensors` files model
//! hubs distribute), SD 1.x and SD 2.x.
//!
//! The file holds every component under one prefix each: the UNet under `model.diffusion_model.`,
//! the VAE under `first_stage_model.`, the text encoder under `cond_stage_model.transformer.`
//! (SD 1.x: transformers' CLIP names) or `cond_stage_model.model.` (SD 2.x: OpenCLIP names). This
//! module renames those tensors to the diffusers/transformers names the model code asks for, and
//! infers the diffusers configs from the keys and shapes. Everything here is a pure function of the
//! key names and shapes; [`super::StableDiffusion::load_single_file`] does the I/O.
//!
//! Tensors are moved, never copied, from the checkpoint's map into one map per component, so the
//! checkpoint is held once in memory; only OpenCLIP's fused q/k/v projections are split into new
//! tensors, one layer at a time.
use crate::error::{Error, Result};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// SD 2.x's built-in scheduler: stabilityai/stable-diffusion-2-1's `scheduler_config.json`
/// (its `prediction_type` is replaced by the checkpoint's).
pub const SD2_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "DDIMScheduler",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "v_prediction",
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null
}"#;

/// What the UNet predicts (the scheduler's `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

impl PredictionType {
    /// The scheduler config's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

impl std::str::FromStr for PredictionType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "epsilon" | "eps" => Ok(PredictionType::Epsilon),
            "v_prediction" | "v" => Ok(PredictionType::VPrediction),
            other => Err(Error::InvalidArgument(format!(
                "unknown prediction type `{other}` (epsilon or v_prediction)"
            ))),
        }
    }
}

/// How to load a single-file checkpoint.
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// A diffusers model folder whose `unet/`, `text_encoder/`, `vae/` config.json files and
    /// scheduler replace the inferred ones, and whose `tokenizer/` (when it has one) replaces the
    /// built-in tokenizer (the weights still come from the checkpoint).
    pub model_config: Option<PathBuf>,
    /// A VAE replacing the checkpoint's: a diffusers VAE folder (`config.json` +
    /// `diffusion_pytorch_model.safetensors`) or one `.safetensors` file (diffusers or LDM names).
    pub vae: Option<PathBuf>,
    /// A tokenizer folder (`vocab.json`, `merges.txt`); default: `model_config`'s `tokenizer/`
    /// when it has one, else the built-in CLIP tokenizer (padding with `<|endoftext|>` for SD 1.x,
    /// `!` for SD 2.x, as their diffusers folders do).
    pub tokenizer: Option<PathBuf>,
    /// Overrides the prediction type (else the `.yaml` sidecar, else the architecture's default).
    pub prediction_type: Option<PredictionType>,
}

// ---------------------------------------------------------------------------------------------
// File format.

/// Extensions of PyTorch's pickle-based formats.
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// Refuses anything that is not a safetensors file before a byte of it is interpreted: pickles
/// by extension, anything else by its first bytes (a safetensors file starts with the
/// little-endian length of its JSON header, then `{`). Only those 9 bytes are read.
pub fn ensure_safetensors(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        return Err(Error::NotSafetensors {
            path: path.to_path_buf(),
            detail: format!("`.{ext}` files are PyTorch pickles"),
        });
    }
    if !path.is_file() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
        });
    }
    let mut head = [0u8; 9];
    let read = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let header_len = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if read < 9 || head[8] != b'{' || header_len < 2 || header_len > size.saturating_sub(8) {
        let detail = if head.starts_with(b"PK\x03\x04") || head[0] == 0x80 {
            "this looks like a PyTorch pickle (zip or pickle protocol header), not safetensors"
        } else {
            "not a safetensors file (no safetensors header)"
        };
        return Err(Error::NotSafetensors {
            path: path.to_path_buf(),
            detail: detail.into(),
        });
    }
    Ok(())
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Splitting a checkpoint into components.

/// Which text encoder a checkpoint carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// SD 1.x: OpenAI CLIP ViT-L/14 in transformers' names.
    Clip,
    /// SD 2.x: OpenCLIP ViT-H/14 in OpenCLIP's names.
    OpenClip,
}

/// A checkpoint's tensors, renamed to diffusers/transformers names, one map per component.
pub struct Components {
    pub unet: HashMap<String, Tensor>,
    /// Empty when the checkpoint has no `first_stage_model.` keys.
    pub vae: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
    pub text_kind: TextEncoderKind,
}

/// Whether a checkpoint entry belongs to a part [`split_checkpoint`] keeps (UNet, VAE, text
/// encoder): the rest (EMA copies, noise schedules) need not be read at all.
pub fn is_model_key(key: &str) -> bool {
    [UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

/// Moves every tensor of `tensors` to its component under its diffusers name. `model_ema.*` and
/// other keys outside the three components are dropped.
pub fn split_checkpoint(path: &Path, tensors: HashMap<String, Tensor>) -> Result<Components> {
    let mut unet = HashMap::new();
    let mut vae = HashMap::new();
    let mut clip = HashMap::new();
    let mut open_clip = HashMap::new();
    for (key, tensor) in tensors {
        if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
            unet.insert(rest.to_string(), tensor);
        } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
            vae.insert(rest.to_string(), tensor);
        } else if let Some(rest) = key.strip_prefix(CLIP_PREFIX) {
            clip.insert(rest.to_string(), tensor);
        } else if let Some(rest) = key.strip_prefix(OPEN_CLIP_PREFIX) {
            open_clip.insert(rest.to_string(), tensor);
        }
        // Anything else (model_ema.*, lvlb weights, alphas_cumprod, …) is not needed: dropped.
    }
    if unet.is_empty() {
        return Err(bad(
            path,
            format!(
                "not a Stable Diffusion checkpoint in the original (LDM) layout: no \
                 `{UNET_PREFIX}*` keys (diffusers-layout models are folders: pass the folder)"
            ),
        ));
    }
    let unet = rename_unet(path, unet)?;
    let vae = if vae.is_empty() {
        vae
    } else {
        rename_ldm_vae(path, vae)?
    };
    let (text_encoder, text_kind) = match (clip.is_empty(), open_clip.is_empty()) {
        (false, true) => (rename_clip(clip), TextEncoderKind::Clip),
        (true, false) => (
            rename_open_clip(path, open_clip)?,
            TextEncoderKind::OpenClip,
        ),
        (true, true) => {
            return Err(bad(
                path,
                format!(
                    "no text encoder: neither `{CLIP_PREFIX}*` (SD 1.x) nor \
                     `{OPEN_CLIP_PREFIX}*` (SD 2.x) keys"
                ),
            ));
        }
        (false, false) => {
            return Err(bad(
                path,
                format!("both `{CLIP_PREFIX}*` and `{OPEN_CLIP_PREFIX}*` keys: unknown layout"),
            ));
        }
    };
    Ok(Components {
        unet,
        vae,
        text_encoder,
        text_kind,
    })
}

/// Parses `"{section}.{i}.{k}.{rest}"` into `(i, k, rest)`.
fn block_key<'a>(key: &'a str, section: &str) -> Option<(usize, usize, &'a str)> {
    let rest = key.strip_prefix(section)?.strip_prefix('.')?;
    let mut parts = rest.splitn(3, '.');
    let i = parts.next()?.parse().ok()?;
    let k = parts.next()?.parse().ok()?;
    Some((i, k, parts.next()?))
}

/// LDM `ResBlock` names → diffusers `ResnetBlock2D` names.
fn resnet_name(rest: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (old, new) in MAP {
        if let Some(tail) = rest.strip_prefix(old) {
            return format!("{new}{tail}");
        }
    }
    rest.to_string()
}

/// What one `input_blocks.i.k` / `output_blocks.i.k` / `middle_block.k` module becomes.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Resnet(String),
    /// A `SpatialTransformer`: diffusers' `Transformer2DModel` uses the same inner names.
    Attention(String),
    /// LDM's `Downsample.op` conv → `downsamplers.0.conv`.
    Downsample(String),
    /// LDM's `Upsample.conv` → `upsamplers.0.conv`.
    Upsample(String),
}

/// The block structure of an LDM UNet, read from its key names.
#[derive(Debug, Clone, PartialEq)]
pub struct LdmUNetBlocks {
    /// ResNet blocks per down level.
    pub layers_per_block: Vec<usize>,
    /// Whether each down level has cross-attention.
    pub down_attn: Vec<bool>,
    /// Whether each up level (diffusers order: lowest resolution first) has cross-attention.
    pub up_attn: Vec<bool>,
    targets: BTreeMap<(String, usize, usize), Target>,
}

/// Walks `input_blocks` (ResNet [+ attention] blocks, a downsampler closing each level but the
/// last) and `output_blocks` (one more ResNet per level, the last one carrying the upsampler),
/// giving each module its diffusers prefix.
pub fn ldm_unet_blocks(path: &Path, keys: &BTreeSet<String>) -> Result<LdmUNetBlocks> {
    let modules = |section: &str| -> BTreeMap<usize, BTreeMap<usize, BTreeSet<String>>> {
        let mut m: BTreeMap<usize, BTreeMap<usize, BTreeSet<String>>> = BTreeMap::new();
        for key in keys {
            if let Some((i, k, rest)) = block_key(key, section) {
                m.entry(i)
                    .or_default()
                    .entry(k)
                    .or_default()
                    .insert(rest.to_string());
            }
        }
        m
    };
    let input = modules("input_blocks");
    let output = modules("output_blocks");
    let mut targets = BTreeMap::new();
    let is_resnet =
        |m: Option<&BTreeSet<String>>| m.is_some_and(|r| r.contains("in_layers.0.weight"));

    // Down path. input_blocks.0 is conv_in.
    let mut layers_per_block = Vec::new();
    let mut down_attn: Vec<bool> = Vec::new();
    let (mut level, mut resnets, mut attn) = (0usize, 0usize, None::<bool>);
    let last_input = input.keys().next_back().copied().unwrap_or(0);
    for i in 1..=last_input {
        let block = input.get(&i);
        let first = block.and_then(|b| b.get(&0));
        if first.is_some_and(|r| r.contains("op.weight")) {
            targets.insert(
                ("input_blocks".into(), i, 0),
                Target::Downsample(format!("down_blocks.{level}.downsamplers.0.conv")),
            );
            layers_per_block.push(resnets);
            down_attn.push(attn.unwrap_or(false));
            level += 1;
            resnets = 0;
            attn = None;
        } else if is_resnet(first) {
            let has_attn = block.is_some_and(|b| b.contains_key(&1));
            if attn.is_some_and(|a| a != has_attn) {
                return Err(bad(
                    path,
                    format!(
                        "UNet down level {level} mixes blocks with and without attention \
                         (input_blocks.{i}): no known architecture"
                    ),
                ));
            }
            attn = Some(has_attn);
            targets.insert(
                ("input_blocks".into(), i, 0),
                Target::Resnet(format!("down_blocks.{level}.resnets.{resnets}")),
            );
            if has_attn {
                targets.insert(
                    ("input_blocks".into(), i, 1),
                    Target::Attention(format!("down_blocks.{level}.attentions.{resnets}")),
                );
            }
            resnets += 1;
        } else {
            return Err(bad(
                path,
                format!(
                    "`{UNET_PREFIX}input_blocks.{i}` is neither a ResNet block nor a downsampler"
                ),
            ));
        }
    }
    if resnets == 0 {
        return Err(bad(
            path,
            "the UNet's input_blocks hold no ResNet blocks: no known architecture",
        ));
    }
    layers_per_block.push(resnets);
    down_attn.push(attn.unwrap_or(false));
    let n = layers_per_block.len();

    // Up path: level u mirrors down level n-1-u with one more ResNet block.
    let mut up_attn = Vec::with_capacity(n);
    let mut idx = 0usize;
    for u in 0..n {
        let mut has_attn = false;
        for j in 0..=layers_per_block[n - 1 - u] {
            let block = output.get(&idx);
            if !is_resnet(block.and_then(|b| b.get(&0))) {
                return Err(bad(
                    path,
                    format!(
                        "`{UNET_PREFIX}output_blocks.{idx}` is not the ResNet block the down path \
                         implies (up level {u}, block {j}): no known architecture"
                    ),
                ));
            }
            targets.insert(
                ("output_blocks".into(), idx, 0),
                Target::Resnet(format!("up_blocks.{u}.resnets.{j}")),
            );
            for (&k, names) in block.into_iter().flatten().filter(|(k, _)| **k > 0) {
                let target = if names.iter().all(|n| n.starts_with("conv.")) {
                    Target::Upsample(format!("up_blocks.{u}.upsamplers.0"))
                } else {
                    has_attn = true;
                    Target::Attention(format!("up_blocks.{u}.attentions.{j}"))
                };
                targets.insert(("output_blocks".into(), idx, k), target);
            }
            idx += 1;
        }
        up_attn.push(has_attn);
    }
    if output.keys().any(|&i| i >= idx) {
        return Err(bad(
            path,
            format!(
                "the UNet has more output_blocks than its {} input levels imply",
                n
            ),
        ));
    }
    for (k, t) in [
        (0, Target::Resnet("mid_block.resnets.0".into())),
        (1, Target::Attention("mid_block.attentions.0".into())),
        (2, Target::Resnet("mid_block.resnets.1".into())),
    ] {
        targets.insert(("middle_block".into(), 0, k), t);
    }
    Ok(LdmUNetBlocks {
        layers_per_block,
        down_attn,
        up_attn,
        targets,
    })
}

impl LdmUNetBlocks {
    /// The diffusers name of UNet key `key` (without `model.diffusion_model.`), `None` if the key
    /// belongs to no known module.
    pub fn diffusers_name(&self, key: &str) -> Option<String> {
        const PLAIN: [(&str, &str); 5] = [
            ("time_embed.0.", "time_embedding.linear_1."),
            ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."),
            ("out.0.", "conv_norm_out."),
            ("out.2.", "conv_out."),
        ];
        for (old, new) in PLAIN {
            if let Some(tail) = key.strip_prefix(old) {
                return Some(format!("{new}{tail}"));
            }
        }
        let (section, i, k, rest) = if let Some(rest) = key.strip_prefix("middle_block.") {
            let (k, rest) = rest.split_once('.')?;
            ("middle_block", 0, k.parse().ok()?, rest)
        } else {
            let section = key.split('.').next()?;
            let (i, k, rest) = block_key(key, section)?;
            (section, i, k, rest)
        };
        Some(match self.targets.get(&(section.to_string(), i, k))? {
            Target::Resnet(p) => format!("{p}.{}", resnet_name(rest)),
            Target::Attention(p) => format!("{p}.{rest}"),
            Target::Downsample(p) => format!("{p}.{}", rest.strip_prefix("op.")?),
            Target::Upsample(p) => format!("{p}.{rest}"),
        })
    }
}

fn rename_unet(path: &Path, unet: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let keys: BTreeSet<String> = unet.keys().cloned().collect();
    let blocks = ldm_unet_blocks(path, &keys)?;
    let mut out = HashMap::with_capacity(unet.len());
    let mut unknown = Vec::new();
    for (key, tensor) in unet {
        match blocks.diffusers_name(&key) {
            Some(name) => {
                out.insert(name, tensor);
            }
            None => unknown.push(key),
        }
    }
    if let Some(example) = unknown.iter().min() {
        // Not fatal: a missing tensor is, and is named when the model asks for it.
        tracing::warn!(
            file = %path.display(),
            count = unknown.len(),
            example = %format!("{UNET_PREFIX}{example}"),
            "UNet tensors of no known module were ignored"
        );
    }
    Ok(out)
}

/// The diffusers name of an LDM VAE key (`encoder.*` / `decoder.*`, no `first_stage_model.`);
/// `levels` is the number of decoder levels (LDM numbers `decoder.up` from the highest
/// resolution, diffusers numbers `up_blocks` from the lowest). Returns the name and whether the
/// tensor is a mid-block attention 1×1 conv that diffusers stores as a linear weight.
pub fn vae_name(key: &str, levels: usize) -> Option<(String, bool)> {
    let (half, rest) = key.split_once('.')?;
    if half != "encoder" && half != "decoder" {
        return Some((key.to_string(), false)); // quant_conv, post_quant_conv
    }
    let resnet = |r: &str| r.replacen("nin_shortcut.", "conv_shortcut.", 1);
    let name = if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (module, param) = r.split_once('.')?;
        let module = match module {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        let is_linear = module != "group_norm" && param == "weight";
        return Some((
            format!("{half}.mid_block.attentions.0.{module}.{param}"),
            is_linear,
        ));
    } else if let Some(r) = rest.strip_prefix("down.").filter(|_| half == "encoder") {
        let (level, r) = r.split_once('.')?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = r.split_once('.')?;
            format!("down_blocks.{level}.resnets.{j}.{}", resnet(r))
        } else {
            format!(
                "down_blocks.{level}.downsamplers.0.conv.{}",
                r.strip_prefix("downsample.conv.")?
            )
        }
    } else if let Some(r) = rest.strip_prefix("up.").filter(|_| half == "decoder") {
        let (level, r) = r.split_once('.')?;
        let u = levels.checked_sub(1 + level.parse::<usize>().ok()?)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = r.split_once('.')?;
            format!("up_blocks.{u}.resnets.{j}.{}", resnet(r))
        } else {
            format!(
                "up_blocks.{u}.upsamplers.0.conv.{}",
                r.strip_prefix("upsample.conv.")?
            )
        }
    } else {
        rest.to_string() // conv_in, conv_out
    };
    Some((format!("{half}.{name}"), false))
}

/// Renames an LDM VAE (`encoder.down.*`, `decoder.up.*`, `mid.attn_1.q` …) to diffusers names,
/// reshaping the mid attention's 1×1 convs to linear weights.
pub fn rename_ldm_vae(
    path: &Path,
    vae: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let levels = vae
        .keys()
        .filter_map(|k| {
            k.strip_prefix("decoder.up.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    let mut out = HashMap::with_capacity(vae.len());
    for (key, tensor) in vae {
        let Some((name, linear)) = vae_name(&key, levels) else {
            tracing::warn!(file = %path.display(), key, "VAE tensor of no known module ignored");
            continue;
        };
        let tensor = if linear && tensor.dim() == 4 {
            let size = tensor.size();
            tensor.f_reshape([size[0], size[1]])?
        } else {
            tensor
        };
        out.insert(name, tensor);
    }
    Ok(out)
}

/// SD 1.x: transformers' CLIP names already; only the prefix goes (`position_ids` buffers stay
/// and are ignored by the loader).
fn rename_clip(clip: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    clip
}

/// The transformers name of an OpenCLIP text-tower key, or `None` for keys diffusers does not use
/// (text_projection, logit_scale). `in_proj_*` keys are returned as the layer's `self_attn`
/// prefix; the caller splits them.
pub fn open_clip_name(key: &str) -> Option<String> {
    match key {
        "token_embedding.weight" => return Some("embeddings.token_embedding.weight".into()),
        "positional_embedding" => return Some("embeddings.position_embedding.weight".into()),
        _ => {}
    }
    if let Some(r) = key.strip_prefix("ln_final.") {
        return Some(format!("final_layer_norm.{r}"));
    }
    let r = key.strip_prefix("transformer.resblocks.")?;
    let (layer, r) = r.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    const MAP: [(&str, &str); 6] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.in_proj_", "self_attn.in_proj_"),
    ];
    MAP.iter().find_map(|(old, new)| {
        r.strip_prefix(old)
            .map(|tail| format!("encoder.layers.{layer}.{new}{tail}"))
    })
}

/// SD 2.x's OpenCLIP text tower → transformers `CLIPTextModel` names. SD 2.x conditions on the
/// penultimate layer's output (then the final layer norm), so, as diffusers does, the last
/// resblock is dropped and the encoder keeps `resblocks - 1` layers.
fn rename_open_clip(
    path: &Path,
    tower: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let resblocks = tower
        .keys()
        .filter_map(|k| {
            k.strip_prefix("transformer.resblocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    if resblocks < 2 {
        return Err(bad(
            path,
            format!(
                "the OpenCLIP text encoder has {resblocks} resblocks; SD 2.x uses all but the \
                 last, so at least 2 are needed"
            ),
        ));
    }
    let dropped = format!("transformer.resblocks.{}.", resblocks - 1);
    let mut out = HashMap::with_capacity(tower.len());
    for (key, tensor) in tower {
        if key.starts_with(&dropped) {
            continue;
        }
        let Some(name) = open_clip_name(&key) else {
            continue;
        };
        if let Some(prefix) = name
            .strip_suffix(".in_proj_weight")
            .or_else(|| name.strip_suffix(".in_proj_bias"))
        {
            let param = if name.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            // q, k, v stacked along the output dimension.
            if tensor.size().first().is_none_or(|&rows| rows % 3 != 0) {
                return Err(bad(
                    path,
                    format!(
                        "`{OPEN_CLIP_PREFIX}{key}` has shape {:?}: not three stacked projections",
                        tensor.size()
                    ),
                ));
            }
            for (part, proj) in tensor.f_chunk(3, 0)?.into_iter().zip(["q", "k", "v"]) {
                out.insert(
                    format!("{prefix}.{proj}_proj.{param}"),
                    part.f_contiguous()?,
                );
            }
        } else {
            out.insert(name, tensor);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Configs from shapes.

fn shape(path: &Path, t: &HashMap<String, Tensor>, name: &str, what: &str) -> Result<Vec<i64>> {
    t.get(name).map(Tensor::size).ok_or_else(|| {
        bad(
            path,
            format!("missing {what} tensor `{name}` (diffusers name): no known architecture"),
        )
    })
}

/// Counts `{prefix}{i}.` indices present among `keys` (consecutive from 0).
fn count(t: &HashMap<String, Tensor>, prefix: &str, suffix: &str) -> usize {
    (0..)
        .take_while(|i| t.contains_key(&format!("{prefix}{i}{suffix}")))
        .count()
}

/// The text encoder's `config.json`, inferred: sizes from the shapes, heads of 64 dimensions
/// (every released CLIP/OpenCLIP text tower), quick_gelu for OpenAI CLIP, gelu for OpenCLIP.
pub fn infer_text_config(
    path: &Path,
    te: &HashMap<String, Tensor>,
    kind: TextEncoderKind,
) -> Result<Value> {
    let base = if te.contains_key("text_model.embeddings.token_embedding.weight") {
        "text_model."
    } else {
        ""
    };
    let tok = shape(
        path,
        te,
        &format!("{base}embeddings.token_embedding.weight"),
        "text encoder",
    )?;
    let pos = shape(
        path,
        te,
        &format!("{base}embeddings.position_embedding.weight"),
        "text encoder",
    )?;
    let fc1 = shape(
        path,
        te,
        &format!("{base}encoder.layers.0.mlp.fc1.weight"),
        "text encoder",
    )?;
    let (vocab, hidden) = (tok[0], tok[1]);
    if hidden % 64 != 0 {
        return Err(bad(
            path,
            format!("text encoder width {hidden} is not a multiple of 64 (CLIP's head size)"),
        ));
    }
    let layers = count(te, &format!("{base}encoder.layers."), ".mlp.fc1.weight");
    Ok(json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": fc1[0],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden / 64,
        "max_position_embeddings": pos[0],
        "hidden_act": match kind { TextEncoderKind::Clip => "quick_gelu", TextEncoderKind::OpenClip => "gelu" },
        "layer_norm_eps": 1e-5,
    }))
}

/// A UNet's input channels in the stable-diffusion-inpainting layout: latents (4), the mask (1)
/// and the masked image's latents (4).
pub const INPAINTING_IN_CHANNELS: i64 = 9;

/// Whether a (diffusers-named) UNet is an inpainting one: its `conv_in` takes
/// [`INPAINTING_IN_CHANNELS`] channels (what diffusers' `infer_diffusers_model_type` checks).
pub fn is_inpainting_unet(unet: &HashMap<String, Tensor>) -> bool {
    unet.get("conv_in.weight")
        .is_some_and(|t| t.size().get(1) == Some(&INPAINTING_IN_CHANNELS))
}

/// The UNet's `config.json`, inferred from its (diffusers-named) tensors. Heads: SD 1.x has 8 per
/// block, SD 2.x heads of 64 dimensions. `sd2` also turns on upcast attention for the 768 px
/// v-prediction models (as stabilityai/stable-diffusion-2-1's config).
pub fn infer_unet_config(
    path: &Path,
    unet: &HashMap<String, Tensor>,
    sd2: bool,
    prediction: PredictionType,
) -> Result<Value> {
    let conv_in = shape(path, unet, "conv_in.weight", "UNet")?;
    let conv_out = shape(path, unet, "conv_out.weight", "UNet")?;
    let [_, in_channels, _, _] = conv_in[..] else {
        return Err(bad(
            path,
            format!("`conv_in.weight` has shape {conv_in:?}: not a 2-D convolution's"),
        ));
    };
    // 4: text-to-image; 9: the stable-diffusion-inpainting layout (latents 4 + mask 1 +
    // masked-image latents 4), which the model code runs as an inpainting UNet. Anything else
    // (e.g. 8 for instruct-pix2pix, 7 for the x4 upscaler) needs pipelines sdbatch lacks.
    if in_channels != 4 && in_channels != INPAINTING_IN_CHANNELS {
        return Err(bad(
            path,
            format!(
                "the UNet takes {in_channels} input channels: no known architecture (4 for \
                 text-to-image, {INPAINTING_IN_CHANNELS} for inpainting)"
            ),
        ));
    }
    let n = count(unet, "down_blocks.", ".resnets.0.conv1.weight");
    let mut channels = Vec::with_capacity(n);
    let mut layers = Vec::with_capacity(n);
    let mut down_types = Vec::with_capacity(n);
    let mut up_types = Vec::with_capacity(n);
    let mut cross = None;
    let mut linear = None;
    let mut transformer_layers = Vec::with_capacity(n);
    for i in 0..n {
        channels.push(
            shape(
                path,
                unet,
                &format!("down_blocks.{i}.resnets.0.conv2.weight"),
                "UNet",
            )?[0],
        );
        layers.push(count(
            unet,
            &format!("down_blocks.{i}.resnets."),
            ".conv1.weight",
        ));
        let attn = format!("down_blocks.{i}.attentions.0.");
        down_types.push(if unet.contains_key(&format!("{attn}proj_in.weight")) {
            let k = shape(
                path,
                unet,
                &format!("{attn}transformer_blocks.0.attn2.to_k.weight"),
                "UNet",
            )?;
            cross = Some(k[1]);
            linear = Some(shape(path, unet, &format!("{attn}proj_in.weight"), "UNet")?.len() == 2);
            transformer_layers.push(count(
                unet,
                &format!("{attn}transformer_blocks."),
                ".attn1.to_q.weight",
            ));
            "CrossAttnDownBlock2D"
        } else {
            transformer_layers.push(1);
            "DownBlock2D"
        });
        let up = format!("up_blocks.{i}.attentions.0.proj_in.weight");
        up_types.push(if unet.contains_key(&up) {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        });
    }
    let Some(cross) = cross else {
        return Err(bad(
            path,
            "the UNet has no cross-attention blocks: no known architecture",
        ));
    };
    let heads: Vec<i64> = if sd2 {
        channels.iter().map(|c| c / 64).collect()
    } else {
        vec![8; n]
    };
    let v = prediction == PredictionType::VPrediction;
    Ok(json!({
        "in_channels": in_channels,
        "out_channels": conv_out[0],
        "sample_size": if sd2 && v { 96 } else { 64 },
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "attention_head_dim": heads,
        "cross_attention_dim": cross,
        "transformer_layers_per_block": transformer_layers,
        "use_linear_projection": linear.unwrap_or(false),
        "upcast_attention": sd2 && v,
    }))
}

/// The VAE's `config.json`, inferred from its (diffusers-named) decoder tensors.
pub fn infer_vae_config(path: &Path, vae: &HashMap<String, Tensor>) -> Result<Value> {
    let conv_in = shape(path, vae, "decoder.conv_in.weight", "VAE")?;
    let conv_out = shape(path, vae, "decoder.conv_out.weight", "VAE")?;
    let n = count(vae, "decoder.up_blocks.", ".resnets.0.conv1.weight");
    if n == 0 {
        return Err(bad(
            path,
            "the VAE decoder has no up blocks: no known architecture",
        ));
    }
    // up_blocks run from the lowest resolution (block_out_channels reversed).
    let mut channels = vec![0; n];
    for u in 0..n {
        channels[n - 1 - u] = shape(
            path,
            vae,
            &format!("decoder.up_blocks.{u}.resnets.0.conv2.weight"),
            "VAE",
        )?[0];
    }
    let layers = count(vae, "decoder.up_blocks.0.resnets.", ".conv1.weight") as i64 - 1;
    Ok(json!({
        "out_channels": conv_out[0],
        "latent_channels": conv_in[1],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "scaling_factor": 0.18215,
        "use_post_quant_conv": vae.contains_key("post_quant_conv.weight"),
    }))
}

/// `parameterization: "v"` in an LDM config (the `.yaml` sidecar) means v-prediction; `"eps"` or no
/// such key, epsilon. Only that one key is read, as text (no YAML parser needed).
pub fn yaml_prediction_type(text: &str) -> Option<PredictionType> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("parameterization:")?;
        let value = value
            .split('#')
            .next()?
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        match value {
            "v" => Some(PredictionType::VPrediction),
            "eps" => Some(PredictionType::Epsilon),
            _ => None,
        }
    })
}

/// The sidecar LDM config of `file`: `model.yaml` or `model.safetensors.yaml` next to it.
pub fn sidecar_yaml(file: &Path) -> Option<PathBuf> {
    let mut long = file.as_os_str().to_owned();
    long.push(".yaml");
    [file.with_extension("yaml"), PathBuf::from(long)]
        .into_iter()
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t(shape: &[i64]) -> Tensor {
        Tensor::zeros(shape, (Kind::Float, Device::Cpu))
    }

    /// The key names of a small LDM UNet: 2 levels, 1 ResNet per level, attention on level 0.
    fn small_unet_keys() -> BTreeSet<String> {
        [
            "time_embed.0.weight",
            "input_blocks.0.0.weight",
            "input_blocks.1.0.in_layers.0.weight",
            "input_blocks.1.1.proj_in.weight",
            "input_blocks.2.0.op.weight",
            "input_blocks.3.0.in_layers.0.weight",
            "input_blocks.3.0.skip_connection.weight",
            "middle_block.0.in_layers.0.weight",
            "middle_block.1.proj_in.weight",
            "output_blocks.0.0.in_layers.0.weight",
            "output_blocks.1.0.in_layers.0.weight",
            "output_blocks.1.1.conv.weight",
            "output_blocks.2.0.in_layers.0.weight",
            "output_blocks.2.1.proj_in.weight",
            "output_blocks.3.0.in_layers.0.weight",
            "output_blocks.3.1.proj_in.weight",
            "out.2.weight",
        ]
        .into_iter()
        .map(String::from)
        .collect()
    }

    #[test]
    fn unet_blocks_and_names() {
        let b = ldm_unet_blocks(Path::new("m.safetensors"), &small_unet_keys()).unwrap();
        assert_eq!(b.layers_per_block, vec![1, 1]);
        assert_eq!(b.down_attn, vec![true, false]);
        assert_eq!(b.up_attn, vec![false, true]);
        let name = |k: &str| b.diffusers_name(k).unwrap();
        assert_eq!(name("time_embed.2.bias"), "time_embedding.linear_2.bias");
        assert_eq!(name("input_blocks.0.0.weight"), "conv_in.weight");
        assert_eq!(
            name("input_blocks.1.0.in_layers.2.weight"),
            "down_blocks.0.resnets.0.conv1.weight"
        );
        assert_eq!(
            name("input_blocks.1.0.emb_layers.1.bias"),
            "down_blocks.0.resnets.0.time_emb_proj.bias"
        );
        assert_eq!(
            name("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(
            name("input_blocks.2.0.op.bias"),
            "down_blocks.0.downsamplers.0.conv.bias"
        );
        assert_eq!(
            name("input_blocks.3.0.skip_connection.weight"),
            "down_blocks.1.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            name("middle_block.2.out_layers.3.weight"),
            "mid_block.resnets.1.conv2.weight"
        );
        assert_eq!(
            name("middle_block.1.norm.bias"),
            "mid_block.attentions.0.norm.bias"
        );
        assert_eq!(
            name("output_blocks.1.0.out_layers.0.weight"),
            "up_blocks.0.resnets.1.norm2.weight"
        );
        assert_eq!(
            name("output_blocks.1.1.conv.weight"),
            "up_blocks.0.upsamplers.0.conv.weight"
        );
        assert_eq!(
            name("output_blocks.3.1.proj_out.weight"),
            "up_blocks.1.attentions.1.proj_out.weight"
        );
        assert_eq!(name("out.0.weight"), "conv_norm_out.weight");
        assert_eq!(b.diffusers_name("label_emb.0.weight"), None);
    }

    #[test]
    fn unet_layouts_that_fit_nothing_are_refused() {
        let mut keys = small_unet_keys();
        keys.remove("input_blocks.3.0.in_layers.0.weight");
        keys.remove("input_blocks.3.0.skip_connection.weight");
        keys.insert("input_blocks.3.0.something.weight".into());
        let err = ldm_unet_blocks(Path::new("m.safetensors"), &keys)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("input_blocks.3"),
            "{err}"
        );

        let mut keys = small_unet_keys();
        keys.insert("output_blocks.4.0.in_layers.0.weight".into());
        let err = ldm_unet_blocks(Path::new("m.safetensors"), &keys)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more output_blocks"), "{err}");
    }

    #[test]
    fn vae_names() {
        let n = |k: &str| vae_name(k, 4).unwrap();
        assert_eq!(
            n("decoder.up.0.block.2.nin_shortcut.weight").0,
            "decoder.up_blocks.3.resnets.2.conv_shortcut.weight"
        );
        assert_eq!(
            n("decoder.up.3.upsample.conv.bias").0,
            "decoder.up_blocks.0.upsamplers.0.conv.bias"
        );
        assert_eq!(
            n("encoder.down.1.downsample.conv.weight").0,
            "encoder.down_blocks.1.downsamplers.0.conv.weight"
        );
        assert_eq!(
            n("encoder.down.1.block.0.norm1.bias").0,
            "encoder.down_blocks.1.resnets.0.norm1.bias"
        );
        assert_eq!(
            n("decoder.mid.block_1.conv2.weight").0,
            "decoder.mid_block.resnets.0.conv2.weight"
        );
        assert_eq!(
            n("decoder.mid.attn_1.norm.weight"),
            (
                "decoder.mid_block.attentions.0.group_norm.weight".into(),
                false
            )
        );
        assert_eq!(
            n("decoder.mid.attn_1.proj_out.weight"),
            (
                "decoder.mid_block.attentions.0.to_out.0.weight".into(),
                true
            )
        );
        assert_eq!(
            n("decoder.mid.attn_1.q.bias"),
            ("decoder.mid_block.attentions.0.to_q.bias".into(), false)
        );
        assert_eq!(
            n("decoder.norm_out.weight").0,
            "decoder.conv_norm_out.weight"
        );
        assert_eq!(n("decoder.conv_in.weight").0, "decoder.conv_in.weight");
        assert_eq!(n("post_quant_conv.weight").0, "post_quant_conv.weight");
    }

    #[test]
    fn vae_attention_convs_become_linear() {
        let mut m = HashMap::new();
        m.insert(
            "decoder.up.0.block.0.conv1.weight".to_string(),
            t(&[4, 4, 3, 3]),
        );
        m.insert("decoder.mid.attn_1.k.weight".to_string(), t(&[8, 8, 1, 1]));
        let out = rename_ldm_vae(Path::new("v"), m).unwrap();
        assert_eq!(
            out["decoder.mid_block.attentions.0.to_k.weight"].size(),
            vec![8, 8]
        );
        assert_eq!(
            out["decoder.up_blocks.0.resnets.0.conv1.weight"].size(),
            vec![4, 4, 3, 3]
        );
    }

    #[test]
    fn open_clip_splits_qkv_and_drops_the_last_layer() {
        let mut m = HashMap::new();
        let fused = Tensor::arange(6 * 2, (Kind::Float, Device::Cpu)).view([6, 2]);
        for layer in 0..3 {
            let p = format!("transformer.resblocks.{layer}.");
            m.insert(format!("{p}attn.in_proj_weight"), fused.copy());
            m.insert(
                format!("{p}attn.in_proj_bias"),
                Tensor::arange(6, (Kind::Float, Device::Cpu)),
            );
            m.insert(format!("{p}mlp.c_fc.weight"), t(&[3, 2]));
        }
        m.insert("ln_final.bias".into(), t(&[2]));
        m.insert("text_projection".into(), t(&[2, 2]));
        m.insert("positional_embedding".into(), t(&[77, 2]));
        let out = rename_open_clip(Path::new("m"), m).unwrap();
        assert!(out.contains_key("encoder.layers.1.mlp.fc1.weight"));
        assert!(
            !out.keys().any(|k| k.contains("layers.2")),
            "the last resblock is dropped"
        );
        assert!(!out.keys().any(|k| k.contains("projection")));
        assert!(out.contains_key("final_layer_norm.bias"));
        assert!(out.contains_key("embeddings.position_embedding.weight"));
        let k = &out["encoder.layers.0.self_attn.k_proj.weight"];
        assert_eq!(k.size(), vec![2, 2]);
        assert_eq!(k.double_value(&[0, 0]), 4.0, "rows 2..4 of in_proj_weight");
        assert_eq!(
            out["encoder.layers.0.self_attn.v_proj.bias"].double_value(&[1]),
            5.0
        );
    }

    #[test]
    fn split_drops_ema_and_names_unknown_layouts() {
        let mut m = HashMap::new();
        m.insert("model_ema.decay".to_string(), t(&[1]));
        m.insert(
            "cond_stage_model.transformer.text_model.x".to_string(),
            t(&[1]),
        );
        let err = split_checkpoint(Path::new("x.safetensors"), m)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("x.safetensors") && err.contains("model.diffusion_model."),
            "{err}"
        );
    }

    #[test]
    fn pickles_are_refused_unread() {
        // The file does not exist: the extension alone decides, nothing is opened.
        for name in ["m.ckpt", "m.pt", "m.PTH", "pytorch_model.bin"] {
            let err = ensure_safetensors(Path::new(name)).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains("never unpickles") && err.contains("save_file"),
                "{err}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let zip = dir.path().join("model.safetensors");
        std::fs::write(&zip, b"PK\x03\x04 a zip of pickles").unwrap();
        let err = ensure_safetensors(&zip).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("pickle"),
            "{err}"
        );
    }

    #[test]
    fn prediction_type_from_yaml() {
        let v = "model:\n  params:\n    parameterization: \"v\"  # v-objective\n";
        assert_eq!(yaml_prediction_type(v), Some(PredictionType::VPrediction));
        assert_eq!(
            yaml_prediction_type("  parameterization: eps\n"),
            Some(PredictionType::Epsilon)
        );
        assert_eq!(yaml_prediction_type("model:\n  target: x\n"), None);
        assert_eq!(
            "v_prediction".parse::<PredictionType>().unwrap(),
            PredictionType::VPrediction
        );
        assert!("x".parse::<PredictionType>().is_err());
    }

    #[test]
    fn unet_config_from_shapes() {
        let mut m = HashMap::new();
        m.insert("conv_in.weight".to_string(), t(&[320, 4, 3, 3]));
        m.insert("conv_out.weight".to_string(), t(&[4, 320, 3, 3]));
        for (i, ch) in [320i64, 640].into_iter().enumerate() {
            for j in 0..2 {
                m.insert(format!("down_blocks.{i}.resnets.{j}.conv1.weight"), t(&[1]));
                m.insert(
                    format!("down_blocks.{i}.resnets.{j}.conv2.weight"),
                    t(&[ch, 1, 1, 1]),
                );
            }
        }
        m.insert(
            "down_blocks.0.attentions.0.proj_in.weight".into(),
            t(&[320, 320]),
        );
        m.insert(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight".into(),
            t(&[1]),
        );
        m.insert(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight".into(),
            t(&[320, 1024]),
        );
        m.insert("up_blocks.1.attentions.0.proj_in.weight".into(), t(&[1]));
        let c = infer_unet_config(Path::new("m"), &m, true, PredictionType::VPrediction).unwrap();
        assert_eq!(c["cross_attention_dim"], 1024);
        assert_eq!(c["use_linear_projection"], true);
        assert_eq!(c["attention_head_dim"], json!([5, 10]));
        assert_eq!(c["layers_per_block"], json!([2, 2]));
        assert_eq!(
            c["down_block_types"],
            json!(["CrossAttnDownBlock2D", "DownBlock2D"])
        );
        assert_eq!(
            c["up_block_types"],
            json!(["UpBlock2D", "CrossAttnUpBlock2D"])
        );
        assert_eq!(c["sample_size"], 96);
        let c = infer_unet_config(Path::new("m"), &m, false, PredictionType::Epsilon).unwrap();
        assert_eq!(c["attention_head_dim"], json!([8, 8]));
        assert_eq!(c["sample_size"], 64);

        // The stable-diffusion-inpainting layout (latents + mask + masked-image latents) loads
        // as a 9-channel UNet, everything else as for text-to-image.
        assert!(!is_inpainting_unet(&m));
        m.insert("conv_in.weight".to_string(), t(&[320, 9, 3, 3]));
        assert!(is_inpainting_unet(&m));
        let c = infer_unet_config(Path::new("m"), &m, false, PredictionType::Epsilon).unwrap();
        assert_eq!(c["in_channels"], 9);
        assert_eq!(c["out_channels"], 4);
        assert_eq!(c["attention_head_dim"], json!([8, 8]));
        // SD 2's inpainting model is 512 px epsilon: no 768-v size or upcast attention.
        let c = infer_unet_config(Path::new("m"), &m, true, PredictionType::Epsilon).unwrap();
        assert_eq!(c["in_channels"], 9);
        assert_eq!(c["sample_size"], 64);
        assert_eq!(c["upcast_attention"], false);

        // Other layouts (instruct-pix2pix's 8 channels, ...) are still refused, by name.
        for (channels, shape) in [(8, vec![320, 8, 3, 3]), (1, vec![320, 1])] {
            m.insert("conv_in.weight".to_string(), t(&shape));
            let err = infer_unet_config(
                Path::new("other.safetensors"),
                &m,
                false,
                PredictionType::Epsilon,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("other.safetensors"), "{channels}: {err}");
            assert!(!is_inpainting_unet(&m), "{channels}");
            if shape.len() == 4 {
                assert!(
                    err.contains("takes 8 input channels") && err.contains("9 for inpainting"),
                    "{err}"
                );
            } else {
                assert!(err.contains("conv_in.weight"), "{err}");
            }
        }
    }
}
