//! Shared helpers for the integration tests: the fixtures made by `scripts/make_fixtures.py` with
//! the real diffusers/transformers, and tensor comparisons.
#![allow(dead_code)]
use sdbatch::pipeline::{LoadOptions, StableDiffusion};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// `tests/fixtures/generated`, made by `scripts/setup.sh`. Missing fixtures fail the test loudly:
/// they are the ground truth, never optional.
pub fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generated");
    assert!(
        dir.join("reference/meta.json").is_file(),
        "fixtures missing in {}: run scripts/setup.sh",
        dir.display()
    );
    dir
}

pub fn model_dir() -> PathBuf {
    fixtures().join("tiny-sd")
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("reference").join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn meta() -> serde_json::Value {
    let path = fixtures().join("reference/meta.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn load_cpu() -> StableDiffusion {
    StableDiffusion::load(&model_dir(), LoadOptions::new(Device::Cpu, Kind::Float)).unwrap()
}

/// The parameters of a reference run: square `size`, every option at its default.
pub fn params(
    steps: usize,
    guidance_scale: f64,
    size: i64,
    scheduler: sdbatch::pipeline::schedulers::SchedulerKind,
) -> sdbatch::pipeline::GenerateParams {
    sdbatch::pipeline::GenerateParams {
        steps,
        guidance_scale,
        width: size,
        height: size,
        scheduler,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    }
}

/// [`params`] of a reference's meta section (`num_inference_steps`, `guidance_scale`, `size`).
pub fn meta_params(
    m: &serde_json::Value,
    scheduler: sdbatch::pipeline::schedulers::SchedulerKind,
) -> sdbatch::pipeline::GenerateParams {
    params(
        m["num_inference_steps"].as_u64().unwrap() as usize,
        m["guidance_scale"].as_f64().unwrap(),
        m["size"].as_i64().unwrap(),
        scheduler,
    )
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Asserts `a` and `b` agree within `tol` (max abs), printing the measured difference.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> f64 {
    let d = max_abs_diff(a, b);
    println!("{what}: max abs diff {d:.3e} (tolerance {tol:.0e})");
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
    d
}

/// Compares uint8 images: returns (fraction of channel values within 1 level, max difference).
pub fn pixel_agreement(ours: &[u8], theirs: &[u8]) -> (f64, u8) {
    assert_eq!(ours.len(), theirs.len());
    let within = ours
        .iter()
        .zip(theirs)
        .filter(|(a, b)| a.abs_diff(**b) <= 1)
        .count();
    let max = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    (within as f64 / ours.len() as f64, max)
}

pub fn u8_vec(t: &Tensor) -> Vec<u8> {
    let t = t.to_kind(Kind::Uint8).contiguous();
    let n = t.numel();
    let mut v = vec![0u8; n];
    t.copy_data_u8(&mut v, n);
    v
}

/// Asserts ≥ 99.9 % of pixel channels within 1 level of the reference.
pub fn assert_images_match(what: &str, ours: &[u8], theirs: &[u8]) {
    let (frac, max) = pixel_agreement(ours, theirs);
    println!(
        "{what}: {:.4} % of values within 1 level, max diff {max}",
        frac * 100.0
    );
    assert!(
        frac >= 0.999,
        "{what}: only {:.4} % within 1 level",
        frac * 100.0
    );
}
pub mod amqp_proxy;
pub mod broker;
pub mod private_broker;
/// Copies a folder tree (a model folder, to break one of its files in a test).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub mod s3;
pub mod slow_proxy;
pub mod stack;
pub mod webhook_receiver;
