//! The AOTInductor-compiled UNet and VAE decoder (`sdbatch compile`, `--compiled`) against the
//! eager model on the tiny fixture, on the CPU in fp32: the UNet within 1e-4, images within one
//! level for at least 99.9 % of their values; uncovered shapes run eagerly; a package made for
//! anything else is refused.
//!
//! Compiling the tiny model takes minutes on a small CPU, so its output is cached under
//! `$SDBATCH_CACHE` (default `~/.cache/sdbatch`) in `compiled/<key>`, the key hashing everything
//! the output depends on: the compile script, the model files, torch's version and the flags.
mod common;

use common::*;
use sdbatch::pipeline::compiled::{CompiledMeta, CompiledModels, META_FILE, Target};
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{ImageRequest, StableDiffusion};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Images per batch the fixture package is compiled for (UNet batch up to twice that).
const MAX_IMAGES: u32 = 4;
const SCRIPT: &str = include_str!("../scripts/compile_unet.py");

fn cache_root() -> PathBuf {
    std::env::var_os("SDBATCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/sdbatch")
        })
}

/// The tiny model compiled for the CPU in fp32, made once per inputs.
fn compiled_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let model = model_dir();
        let files = sdbatch::pipeline::compile_inputs(&model, Kind::Float, None).unwrap();
        let mut key = Sha256::new();
        key.update(SCRIPT.as_bytes());
        key.update(sdbatch::pipeline::hash_files(&files).unwrap().as_bytes());
        key.update(
            sdbatch::bridge::torch_version()
                .unwrap_or_default()
                .as_bytes(),
        );
        key.update(format!("cpu fp32 native {MAX_IMAGES}").as_bytes());
        let key = hex::encode(key.finalize());
        let dir = cache_root().join("compiled").join(&key[..16]);
        if dir.join(META_FILE).is_file() {
            return dir;
        }
        let partial = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        let started = std::time::Instant::now();
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .args(["compile", "--device", "cpu", "--dtype", "fp32"])
            .args(["--batch-sizes", &MAX_IMAGES.to_string()])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&partial)
            .status()
            .expect("run sdbatch compile");
        assert!(status.success(), "sdbatch compile failed");
        println!(
            "compiled the tiny model in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        std::fs::rename(&partial, &dir).unwrap();
        dir
    })
}

fn target(model: &StableDiffusion) -> Target {
    Target {
        torch_version: sdbatch::bridge::torch_version().unwrap(),
        device: "cpu".into(),
        gpu_name: None,
        dtype: "fp32".into(),
        model_sha256: model.compiled_model_sha256().unwrap(),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn compiled_unet_and_decoder_equal_eager_within_1e_4() {
    let _no_grad = tch::no_grad_guard();
    let model = load_cpu();
    let compiled = CompiledModels::load(compiled_dir(), &target(&model), Device::Cpu).unwrap();
    let meta = compiled.meta();
    println!(
        "compile seconds: {:?}",
        serde_json::Value::Object(meta.compile_seconds.clone())
    );
    tch::manual_seed(7);
    let (h, w) = (meta.latent_height, meta.latent_width);
    let mut worst: f64 = 0.0;
    for batch in [1, 3, 8] {
        let sample = Tensor::randn([batch, 4, h, w], (Kind::Float, Device::Cpu));
        let ts = Tensor::from_slice(&[981.0f32]).expand([batch], false);
        let context = Tensor::randn([batch, 77, 32], (Kind::Float, Device::Cpu));
        let eager = model.unet.forward(&sample, &ts, &context).unwrap();
        let ours = compiled
            .unet(&sample, &ts, &context)
            .unwrap()
            .expect("covered");
        let d = max_abs_diff(&eager, &ours);
        println!("UNet batch {batch}: max |compiled - eager| = {d:.3e}");
        worst = worst.max(d);
    }
    assert!(worst <= 1e-4, "UNet max abs diff {worst:.3e} > 1e-4");
    for batch in [1, 4] {
        let z = Tensor::randn([batch, 4, h, w], (Kind::Float, Device::Cpu));
        let eager = model.vae.decode(&z).unwrap();
        let ours = compiled.decode(&z).unwrap().expect("covered");
        let d = max_abs_diff(&eager, &ours);
        println!("VAE decoder batch {batch}: max |compiled - eager| = {d:.3e}");
        assert!(d <= 1e-4, "VAE decoder max abs diff {d:.3e} > 1e-4");
    }
}

fn requests(n: u64) -> Vec<ImageRequest> {
    (0..n)
        .map(|i| ImageRequest {
            prompt: format!("a photo of an astronaut riding a horse, take {i}"),
            negative_prompt: None,
            seed: 100 + i,
        })
        .collect()
}

/// Share of values (pixels × channels) that differ by at most one level, and the largest gap.
fn within_one_level(a: &StableDiffusion, b: &StableDiffusion, n: u64, size: i64) -> (f64, u8) {
    let p = params(8, 7.5, size, SchedulerKind::Pndm);
    let reqs = requests(n);
    let x = a
        .generate(&reqs, &p, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    b.set_compiled_enabled(true);
    let y = b
        .generate(&reqs, &p, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    let (mut close, mut total, mut worst) = (0usize, 0usize, 0u8);
    for (i, j) in x.images.iter().zip(&y.images) {
        for (&u, &v) in i.pixels.iter().zip(&j.pixels) {
            let d = u.abs_diff(v);
            worst = worst.max(d);
            close += usize::from(d <= 1);
            total += 1;
        }
    }
    (close as f64 / total as f64, worst)
}

#[test]
fn compiled_images_are_within_one_level_of_eager() {
    let eager = load_cpu();
    let mut compiled = load_cpu();
    compiled.load_compiled(compiled_dir()).unwrap();
    let size = eager.native_size();
    let (share, worst) = within_one_level(&eager, &compiled, u64::from(MAX_IMAGES), size);
    println!(
        "{MAX_IMAGES} images {size}x{size}, 8 PNDM steps: {:.4} % within 1 level, largest gap {worst}",
        share * 100.0
    );
    assert!(
        share >= 0.999,
        "only {:.4} % within one level",
        share * 100.0
    );
}

#[test]
fn uncovered_shapes_run_eagerly() {
    let eager = load_cpu();
    let mut compiled = load_cpu();
    compiled.load_compiled(compiled_dir()).unwrap();
    // One image more than compiled for (a UNet batch of 10 > 8), and another image size: both
    // are eager on both sides, so the images are identical.
    let size = eager.native_size();
    let p = params(2, 7.5, size, SchedulerKind::Pndm);
    let reqs = requests(u64::from(MAX_IMAGES) + 1);
    let x = eager
        .generate(&reqs, &p, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    let y = compiled
        .generate(&reqs, &p, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    assert_eq!(x.images, y.images, "a batch beyond the package");
    let p = params(2, 7.5, size * 2, SchedulerKind::Pndm);
    let x = eager
        .generate(&reqs[..1], &p, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    let y = compiled
        .generate(&reqs[..1], &p, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    assert_eq!(x.images, y.images, "another image size");
}

/// A copy of the compiled folder's metadata with `change` applied (the packages are not needed:
/// a mismatch is refused before they are loaded).
fn altered(change: impl FnOnce(&mut CompiledMeta)) -> tempfile::TempDir {
    let mut meta = CompiledMeta::read(compiled_dir()).unwrap();
    change(&mut meta);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(META_FILE),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn a_package_for_anything_else_is_refused_with_the_reason() {
    type Change = Box<dyn FnOnce(&mut CompiledMeta)>;
    let cases: [(Change, &str); 4] = [
        (
            Box::new(|m| m.dtype = "fp16".into()),
            "compiled for dtype fp16, running fp32",
        ),
        (
            Box::new(|m| m.torch_version = "2.10.0".into()),
            "compiled for torch 2.10.0, running",
        ),
        (
            Box::new(|m| m.device = "cuda".into()),
            "compiled for device cuda, running cpu",
        ),
        (
            Box::new(|m| m.model_sha256 = "0".repeat(64)),
            "compiled from another model",
        ),
    ];
    for (change, expected) in cases {
        let dir = altered(change);
        let mut model = load_cpu();
        let err = model.load_compiled(dir.path()).unwrap_err().to_string();
        assert!(err.contains(expected), "{expected:?} in {err}");
        assert!(err.contains("sdbatch compile"), "{err}");
    }
}
