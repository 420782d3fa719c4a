//! The AOTInductor-compiled UNet and VAE decoder (opt in: `--compiled DIR`, made by
//! `sdbatch compile`, i.e. `scripts/compile_unet.py`).
//!
//! A compiled folder holds `unet.pt2`, optionally `vae_decoder.pt2`, and [`META_FILE`], which says
//! what they were compiled for: torch version, device kind, GPU name, dtype, the hash of the model
//! files, the latent size, context shape and batch range. A package compiled for another model,
//! dtype, device, GPU or torch would run wrong or crash, so any mismatch refuses the folder at load
//! with every difference named ([`CompiledMeta::mismatches`]). Shapes outside what was compiled
//! (another image size, a longer prompt, a larger batch) run eagerly, logged once per shape
//! ([`CompiledMeta::unet_covers`]).
use crate::bridge::AotiPackage;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

pub const META_FILE: &str = "sdbatch-compiled.json";
/// The metadata layout this sdbatch reads.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetEntry {
    pub file: String,
    /// UNet batch range (images, ×2 with guidance).
    pub min_batch: i64,
    pub max_batch: i64,
    pub in_channels: i64,
    pub context_tokens: i64,
    pub context_dim: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeEntry {
    pub file: String,
    pub min_batch: i64,
    pub max_batch: i64,
    pub latent_channels: i64,
}

/// `sdbatch-compiled.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompiledMeta {
    pub format: u32,
    /// `major.minor.patch` of the torch that compiled it.
    pub torch_version: String,
    /// `cpu` or `cuda`.
    pub device: String,
    pub gpu_name: Option<String>,
    /// `fp32`, `fp16`, `bf16`.
    pub dtype: String,
    /// [`super::StableDiffusion::compiled_model_sha256`] of the model it was compiled from.
    pub model_sha256: String,
    pub latent_height: i64,
    pub latent_width: i64,
    pub unet: UNetEntry,
    pub vae_decoder: Option<VaeEntry>,
    /// Seconds per package, as the compile script measured them.
    #[serde(default)]
    pub compile_seconds: serde_json::Map<String, serde_json::Value>,
}

/// What a compiled folder must match: this sdbatch, its device and its model.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub torch_version: String,
    pub device: String,
    pub gpu_name: Option<String>,
    pub dtype: String,
    pub model_sha256: String,
}

impl Target {
    /// This process on `device` running `dtype`, for a model whose compile inputs hash to
    /// `model_sha256`.
    pub fn of(device: Device, dtype: tch::Kind, model_sha256: String) -> Self {
        Self {
            torch_version: crate::bridge::torch_version().unwrap_or_default(),
            device: if device.is_cuda() { "cuda" } else { "cpu" }.into(),
            gpu_name: match device {
                Device::Cuda(i) => crate::device::cuda_device_name(i),
                _ => None,
            },
            dtype: crate::device::dtype_name(dtype).into(),
            model_sha256,
        }
    }
}

impl CompiledMeta {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
    }

    /// Every way this package does not fit `target`, one sentence each (empty: it fits).
    pub fn mismatches(&self, target: &Target) -> Vec<String> {
        let mut out = Vec::new();
        if self.format != FORMAT {
            out.push(format!(
                "metadata format {} (this sdbatch reads {FORMAT})",
                self.format
            ));
        }
        let mut differ = |what: &str, compiled: &str, here: &str| {
            if compiled != here {
                out.push(format!("compiled for {what} {compiled}, running {here}"));
            }
        };
        differ("torch", &self.torch_version, &target.torch_version);
        differ("device", &self.device, &target.device);
        differ("dtype", &self.dtype, &target.dtype);
        // A GPU model matters between CUDA packages; another device kind is named above.
        if self.device == "cuda" && target.device == "cuda" {
            differ(
                "GPU",
                self.gpu_name.as_deref().unwrap_or("(unknown)"),
                target.gpu_name.as_deref().unwrap_or("(unknown)"),
            );
        }
        if self.model_sha256 != target.model_sha256 {
            out.push(format!(
                "compiled from another model (sha256 {}, this model's UNet and VAE files hash to {})",
                short(&self.model_sha256),
                short(&target.model_sha256)
            ));
        }
        out
    }

    /// Whether the UNet package runs `sample` (`[batch, channels, h, w]`) with `context`
    /// (`[batch, tokens, dim]`).
    pub fn unet_covers(&self, sample: &[i64], context: &[i64]) -> bool {
        let u = &self.unet;
        matches!(sample, &[b, c, h, w]
            if (u.min_batch..=u.max_batch).contains(&b)
                && c == u.in_channels
                && h == self.latent_height
                && w == self.latent_width)
            && matches!(context, &[b, t, d]
                if b == sample[0] && t == u.context_tokens && d == u.context_dim)
    }

    /// Whether the VAE decoder package decodes latents of shape `z`.
    pub fn vae_covers(&self, z: &[i64]) -> bool {
        self.vae_decoder.as_ref().is_some_and(|v| {
            matches!(z, &[b, c, h, w]
                if (v.min_batch..=v.max_batch).contains(&b)
                    && c == v.latent_channels
                    && h == self.latent_height
                    && w == self.latent_width)
        })
    }
}

/// Written in a `--compiled` or `--out` path, replaced by the GPU's model ([`gpu_slug`]): one
/// volume serves pods on several GPU types, each reading the packages made for its own.
pub const GPU_PLACEHOLDER: &str = "{gpu}";

/// A GPU name as a path component: `NVIDIA H200` → `nvidia-h200`; `cpu` without a GPU.
pub fn gpu_slug(gpu_name: Option<&str>) -> String {
    let Some(name) = gpu_name else {
        return "cpu".into();
    };
    let mut slug = String::new();
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        "gpu".into()
    } else {
        slug.into()
    }
}

/// `path` with [`GPU_PLACEHOLDER`] replaced by the GPU's slug.
pub fn expand_gpu(path: &Path, gpu_name: Option<&str>) -> PathBuf {
    let text = path.to_string_lossy();
    if text.contains(GPU_PLACEHOLDER) {
        PathBuf::from(text.replace(GPU_PLACEHOLDER, &gpu_slug(gpu_name)))
    } else {
        path.to_path_buf()
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The loaded packages of a compiled folder.
pub struct CompiledModels {
    meta: CompiledMeta,
    dir: PathBuf,
    unet: AotiPackage,
    vae: Option<AotiPackage>,
    /// Shapes already reported as running eagerly (logged once each).
    reported: RefCell<HashSet<String>>,
}

impl CompiledModels {
    /// Reads `dir`, refuses it unless it matches `target`, loads its packages on `device`.
    pub fn load(dir: &Path, target: &Target, device: Device) -> Result<Self> {
        let meta = CompiledMeta::read(dir)?;
        let problems = meta.mismatches(target);
        if !problems.is_empty() {
            return Err(Error::Compiled {
                path: dir.to_path_buf(),
                message: format!(
                    "does not fit this model and machine: {}; compile again with `sdbatch compile`",
                    problems.join("; ")
                ),
            });
        }
        let package = |file: &str| {
            AotiPackage::load(&dir.join(file), device).map_err(|e| Error::Compiled {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })
        };
        let unet = package(&meta.unet.file)?;
        let vae = meta
            .vae_decoder
            .as_ref()
            .map(|v| package(&v.file))
            .transpose()?;
        Ok(Self {
            meta,
            dir: dir.to_path_buf(),
            unet,
            vae,
            reported: RefCell::default(),
        })
    }

    pub fn meta(&self) -> &CompiledMeta {
        &self.meta
    }

    /// Logs once per `what` that it runs eagerly, and why.
    pub fn report_eager(&self, what: String, why: &str) {
        if self.reported.borrow_mut().insert(what.clone()) {
            tracing::info!(dir = %self.dir.display(), shape = %what, reason = why, "running eagerly: the compiled package does not cover this");
        }
    }

    /// The compiled UNet's prediction, or `None` where the package does not cover the shapes.
    pub fn unet(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<Option<Tensor>> {
        let (s, c) = (sample.size(), context.size());
        if !self.meta.unet_covers(&s, &c) {
            self.report_eager(format!("UNet sample {s:?} context {c:?}"), "shape");
            return Ok(None);
        }
        // The package was traced with contiguous inputs and float32 timesteps.
        let timesteps = timesteps.f_to_kind(tch::Kind::Float)?.f_contiguous()?;
        let sample = sample.f_contiguous()?;
        let context = context.f_contiguous()?;
        self.run(&self.unet, &[&sample, &timesteps, &context])
            .map(Some)
    }

    /// The compiled VAE decoder's image, or `None` where not compiled or not covered.
    pub fn decode(&self, z: &Tensor) -> Result<Option<Tensor>> {
        let Some(vae) = &self.vae else {
            return Ok(None);
        };
        let shape = z.size();
        if !self.meta.vae_covers(&shape) {
            self.report_eager(format!("VAE decoder latents {shape:?}"), "shape");
            return Ok(None);
        }
        self.run(vae, &[&z.f_contiguous()?]).map(Some)
    }

    fn run(&self, package: &AotiPackage, inputs: &[&Tensor]) -> Result<Tensor> {
        let mut out = package.run(inputs).map_err(|e| Error::Compiled {
            path: package.path().to_path_buf(),
            message: e.to_string(),
        })?;
        match (out.pop(), out.is_empty()) {
            (Some(t), true) => Ok(t),
            _ => Err(Error::Compiled {
                path: package.path().to_path_buf(),
                message: "expected exactly one output".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> CompiledMeta {
        CompiledMeta {
            format: FORMAT,
            torch_version: "2.11.0".into(),
            device: "cuda".into(),
            gpu_name: Some("NVIDIA H200".into()),
            dtype: "fp16".into(),
            model_sha256: "a".repeat(64),
            latent_height: 64,
            latent_width: 64,
            unet: UNetEntry {
                file: "unet.pt2".into(),
                min_batch: 1,
                max_batch: 64,
                in_channels: 4,
                context_tokens: 77,
                context_dim: 768,
            },
            vae_decoder: Some(VaeEntry {
                file: "vae_decoder.pt2".into(),
                min_batch: 1,
                max_batch: 32,
                latent_channels: 4,
            }),
            compile_seconds: Default::default(),
        }
    }

    fn target() -> Target {
        Target {
            torch_version: "2.11.0".into(),
            device: "cuda".into(),
            gpu_name: Some("NVIDIA H200".into()),
            dtype: "fp16".into(),
            model_sha256: "a".repeat(64),
        }
    }

    #[test]
    fn a_matching_package_fits() {
        assert!(meta().mismatches(&target()).is_empty());
    }

    #[test]
    fn every_mismatch_is_named() {
        let here = Target {
            torch_version: "2.12.0".into(),
            device: "cuda".into(),
            gpu_name: Some("NVIDIA A100-SXM4-80GB".into()),
            dtype: "bf16".into(),
            model_sha256: "b".repeat(64),
        };
        let problems = meta().mismatches(&here);
        assert_eq!(problems.len(), 4, "{problems:?}");
        let all = problems.join("\n");
        for needle in [
            "torch 2.11.0, running 2.12.0",
            "dtype fp16, running bf16",
            "GPU NVIDIA H200, running NVIDIA A100-SXM4-80GB",
            "another model (sha256 aaaaaaaaaaaa",
        ] {
            assert!(all.contains(needle), "{needle} in {all}");
        }
        let cpu = Target {
            device: "cpu".into(),
            gpu_name: None,
            ..target()
        };
        assert_eq!(
            meta().mismatches(&cpu),
            ["compiled for device cuda, running cpu"]
        );
    }

    #[test]
    fn coverage_is_the_compiled_shapes_only() {
        let m = meta();
        assert!(m.unet_covers(&[2, 4, 64, 64], &[2, 77, 768]));
        assert!(m.unet_covers(&[64, 4, 64, 64], &[64, 77, 768]));
        assert!(!m.unet_covers(&[65, 4, 64, 64], &[65, 77, 768]), "batch");
        assert!(!m.unet_covers(&[2, 4, 96, 64], &[2, 77, 768]), "size");
        assert!(
            !m.unet_covers(&[2, 4, 64, 64], &[2, 154, 768]),
            "long prompt"
        );
        assert!(!m.unet_covers(&[2, 9, 64, 64], &[2, 77, 768]), "inpainting");
        assert!(
            !m.unet_covers(&[2, 4, 64, 64], &[3, 77, 768]),
            "batches differ"
        );
        assert!(m.vae_covers(&[32, 4, 64, 64]));
        assert!(!m.vae_covers(&[33, 4, 64, 64]));
        assert!(!m.vae_covers(&[1, 4, 32, 32]));
        let unet_only = CompiledMeta {
            vae_decoder: None,
            ..m
        };
        assert!(!unet_only.vae_covers(&[1, 4, 64, 64]));
    }

    #[test]
    fn the_gpu_placeholder_names_one_folder_per_gpu_model() {
        assert_eq!(gpu_slug(Some("NVIDIA H200")), "nvidia-h200");
        assert_eq!(
            gpu_slug(Some("NVIDIA A100-SXM4-80GB ")),
            "nvidia-a100-sxm4-80gb"
        );
        assert_eq!(gpu_slug(Some("../..")), "gpu", "never a path escape");
        assert_eq!(gpu_slug(None), "cpu");
        assert_eq!(
            expand_gpu(Path::new("/cache/{gpu}-fp16"), Some("NVIDIA L4")),
            Path::new("/cache/nvidia-l4-fp16")
        );
        assert_eq!(
            expand_gpu(Path::new("/cache/x"), None),
            Path::new("/cache/x")
        );
    }

    #[test]
    fn metadata_round_trips_as_the_script_writes_it() {
        let text = r#"{"format": 1, "torch_version": "2.11.0", "device": "cpu", "gpu_name": null,
            "dtype": "fp32", "model_sha256": "abc", "latent_height": 8, "latent_width": 8,
            "unet": {"file": "unet.pt2", "min_batch": 1, "max_batch": 8, "in_channels": 4,
                     "context_tokens": 77, "context_dim": 32},
            "vae_decoder": null, "compile_seconds": {"unet_s": 120.5}}"#;
        let m: CompiledMeta = serde_json::from_str(text).unwrap();
        assert_eq!(m.unet.max_batch, 8);
        assert!(m.vae_decoder.is_none());
    }
}
