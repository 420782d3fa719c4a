//! A broken model folder is an error naming the file and the tensor or key: never a panic, never a
//! silently random weight. Each test copies the tiny fixture model and breaks one thing.
mod common;

use common::copy_dir;

use common::model_dir;
use sdbatch::Error;
use sdbatch::pipeline::{LoadOptions, StableDiffusion};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn broken_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&model_dir(), &dir);
    (tmp, dir)
}

fn load(dir: &Path) -> Result<StableDiffusion, Error> {
    StableDiffusion::load(dir, LoadOptions::new(Device::Cpu, Kind::Float))
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites a safetensors file through `f` (which may drop or replace tensors).
fn edit_weights(path: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut tensors = Tensor::read_safetensors(path).unwrap();
    f(&mut tensors);
    Tensor::write_safetensors(&tensors, path).unwrap();
}

fn message(result: Result<StableDiffusion, Error>) -> (Error, String) {
    let err = result.err().expect("loading a broken model must fail");
    let msg = err.to_string();
    println!("{msg}");
    (err, msg)
}

#[test]
fn missing_folder_and_files() {
    let (_tmp, dir) = broken_copy();
    let (err, msg) = message(load(&dir.join("nope")));
    assert!(matches!(err, Error::MissingFile { .. }) && msg.contains("nope"));

    for file in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ] {
        let (_tmp, dir) = broken_copy();
        std::fs::remove_file(dir.join(file)).unwrap();
        let (err, msg) = message(load(&dir));
        assert!(matches!(err, Error::MissingFile { .. }), "{file}: {err:?}");
        assert!(msg.contains(file), "{file}: {msg}");
    }
}

#[test]
fn missing_weights_file_in_both_variants() {
    let (_tmp, dir) = broken_copy();
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    // The fp16 variant is used as a fallback (upcast) ...
    load(&dir).unwrap();
    // ... and when it is gone too, the error names the file.
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let (err, msg) = message(load(&dir));
    assert!(matches!(err, Error::MissingFile { .. }));
    assert!(
        msg.contains("unet/diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
}

#[test]
fn requested_variant_must_exist() {
    let (_tmp, dir) = broken_copy();
    let options = LoadOptions {
        variant: Some("bf16".into()),
        ..LoadOptions::new(Device::Cpu, Kind::Float)
    };
    let (_, msg) = message(StableDiffusion::load(&dir, options));
    assert!(msg.contains("model.bf16.safetensors"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = broken_copy();
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let victim = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight";
    edit_weights(&file, |t| t.retain(|(name, _)| name != victim));
    let (err, msg) = message(load(&dir));
    assert!(matches!(err, Error::MissingTensor { .. }));
    assert!(
        msg.contains(victim) && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let (_tmp, dir) = broken_copy();
    let file = dir.join("vae/diffusion_pytorch_model.safetensors");
    let victim = "decoder.conv_in.weight";
    edit_weights(&file, |t| {
        for (name, tensor) in t.iter_mut() {
            if name == victim {
                *tensor = Tensor::zeros([32, 4, 1, 1], (Kind::Float, Device::Cpu));
            }
        }
    });
    let (err, msg) = message(load(&dir));
    assert!(matches!(err, Error::ShapeMismatch { .. }));
    assert!(
        msg.contains(victim) && msg.contains("[32, 4, 1, 1]") && msg.contains("[32, 4, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn config_that_disagrees_with_weights_is_a_shape_error() {
    let (_tmp, dir) = broken_copy();
    edit_json(&dir.join("unet/config.json"), |v| {
        v["block_out_channels"] = serde_json::json!([32, 64, 128])
    });
    let (err, msg) = message(load(&dir));
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{msg}");
}

#[test]
fn unsupported_config_values_are_named() {
    let cases: [(&str, &str, serde_json::Value); 4] = [
        (
            "unet/config.json",
            "center_input_sample",
            serde_json::json!(true),
        ),
        (
            "unet/config.json",
            "class_embed_type",
            serde_json::json!("timestep"),
        ),
        (
            "text_encoder/config.json",
            "hidden_act",
            serde_json::json!("relu"),
        ),
        ("vae/config.json", "act_fn", serde_json::json!("gelu")),
    ];
    for (file, key, value) in cases {
        let (_tmp, dir) = broken_copy();
        edit_json(&dir.join(file), |v| v[key] = value.clone());
        let (err, msg) = message(load(&dir));
        assert!(
            matches!(err, Error::Unsupported { .. }),
            "{file} {key}: {err:?}"
        );
        assert!(msg.contains(file) && msg.contains(key), "{msg}");
    }
}

#[test]
fn malformed_json_is_named() {
    let (_tmp, dir) = broken_copy();
    std::fs::write(dir.join("vae/config.json"), "{ not json").unwrap();
    let (err, msg) = message(load(&dir));
    assert!(matches!(err, Error::Json { .. }));
    assert!(msg.contains("vae/config.json"), "{msg}");
}

#[test]
fn unknown_scheduler_class_values_are_rejected() {
    let (_tmp, dir) = broken_copy();
    edit_json(&dir.join("scheduler/scheduler_config.json"), |v| {
        v["beta_schedule"] = serde_json::json!("exponential")
    });
    let (_, msg) = message(load(&dir));
    assert!(
        msg.contains("scheduler_config.json") && msg.contains("beta_schedule"),
        "{msg}"
    );
}
