//! Single-file checkpoints in the original CompVis/LDM layout (`single-file/tiny-sd*.safetensors`,
//! written by `scripts/make_fixtures.py` and checked there to load back identically with
//! diffusers' `from_single_file`) must give exactly the same model as the diffusers folders they
//! were made from; loader errors name the file.
mod common;

use common::*;
use sdbatch::Error;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::single_file::{PredictionType, SingleFileOptions};
use sdbatch::pipeline::{
    GenerateParams, GrayImage, ImageRequest, Inpaint, LoadOptions, RgbImage, StableDiffusion,
};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn opts() -> LoadOptions {
    LoadOptions::new(Device::Cpu, Kind::Float)
}

fn checkpoint(name: &str) -> PathBuf {
    fixtures()
        .join("single-file")
        .join(format!("{name}.safetensors"))
}

fn with_config(name: &str) -> SingleFileOptions {
    SingleFileOptions {
        model_config: Some(fixtures().join(name)),
        ..Default::default()
    }
}

fn load_single(name: &str, single: SingleFileOptions) -> Result<StableDiffusion, Error> {
    StableDiffusion::load_single_file(&checkpoint(name), opts(), single)
}

fn message(result: Result<StableDiffusion, Error>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Asserts two tensors are bit-for-bit equal, printing the max difference.
fn assert_identical(what: &str, a: &Tensor, b: &Tensor) {
    let d = max_abs_diff(a, b);
    println!("{what}: max abs diff {d:e}");
    assert!(a.equal(b), "{what}: not identical (max abs diff {d:e})");
}

fn rgb(path: &str) -> RgbImage {
    let img = image::open(fixtures().join(path)).unwrap().to_rgb8();
    RgbImage {
        width: img.width(),
        height: img.height(),
        pixels: img.into_raw(),
    }
}

/// Text embeddings, a UNet forward, a VAE decode and a short generate (inpainting for an
/// inpainting model, which cannot do text-to-image): identical.
fn same_model(folder: &StableDiffusion, single: &StableDiffusion, what: &str) {
    let _g = tch::no_grad_guard();
    assert_eq!(folder.native_size(), single.native_size());
    assert_eq!(folder.is_inpainting_model(), single.is_inpainting_model());
    let prompts = ["a photo of a cat", ""];
    let a = folder.encode_prompts(&prompts).unwrap();
    let b = single.encode_prompts(&prompts).unwrap();
    assert_identical(&format!("{what} text embeddings"), &a, &b);

    tch::manual_seed(7);
    let size = folder.native_size() / 8;
    // An inpainting UNet takes latents + mask + masked-image latents (9 channels).
    let channels = folder.unet.in_channels();
    assert_eq!(channels, single.unet.in_channels());
    let sample = Tensor::randn([2, channels, size, size], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[999f32, 1.0]);
    let ua = folder.unet.forward(&sample, &t, &a).unwrap();
    let ub = single.unet.forward(&sample, &t, &b).unwrap();
    assert_identical(&format!("{what} UNet forward"), &ua, &ub);
    let latents = sample.narrow(1, 0, folder.vae.latent_channels());
    let da = folder.vae.decode(&latents).unwrap();
    let db = single.vae.decode(&latents).unwrap();
    assert_identical(&format!("{what} VAE decode"), &da, &db);

    let params = GenerateParams {
        steps: 3,
        guidance_scale: 7.5,
        width: folder.native_size(),
        height: folder.native_size(),
        scheduler: SchedulerKind::Ddim,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let request = ImageRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: Some("blurry".into()),
        seed: 42,
    };
    let init = rgb("img2img/init.png");
    let mask = GrayImage::from_rgb(&rgb("inpaint/mask.png"));
    let run = |model: &StableDiffusion| {
        let requests = std::slice::from_ref(&request);
        if model.is_inpainting_model() {
            let inpaint = Inpaint {
                images: std::slice::from_ref(&init),
                masks: std::slice::from_ref(&mask),
                strength: 1.0,
                mask_blur: 0.0,
                padding_mask_crop: None,
            };
            model.generate_inpaint(
                requests,
                &params,
                inpaint,
                &mut sdbatch::pipeline::ignore_steps,
            )
        } else {
            model.generate(requests, &params, &mut sdbatch::pipeline::ignore_steps)
        }
        .unwrap()
    };
    let (ia, ib) = (run(folder), run(single));
    let (frac, max) = pixel_agreement(&ia.images[0].pixels, &ib.images[0].pixels);
    println!(
        "{what} generate: {:.2} % equal-ish, max pixel diff {max}",
        frac * 100.0
    );
    assert_eq!(ia.images, ib.images, "{what}: images differ");
}

#[test]
fn sd1_single_file_equals_the_folder() {
    let folder = StableDiffusion::load(&fixtures().join("tiny-sd"), opts()).unwrap();
    let single = load_single("tiny-sd", with_config("tiny-sd")).unwrap();
    assert_eq!(
        single.scheduler_config.prediction_type,
        folder.scheduler_config.prediction_type
    );
    same_model(&folder, &single, "sd1");
}

#[test]
fn sd2_single_file_equals_the_folder() {
    // OpenCLIP layout: fused q/k/v split, the extra final resblock dropped.
    let folder = StableDiffusion::load(&fixtures().join("tiny-sd2"), opts()).unwrap();
    let single = load_single("tiny-sd2", with_config("tiny-sd2")).unwrap();
    assert_eq!(single.text_encoder.num_layers(), 3);
    assert_eq!(single.native_size(), 96);
    assert_eq!(
        single.scheduler_config.prediction_type.as_deref(),
        Some("v_prediction")
    );
    same_model(&folder, &single, "sd2");
}

#[test]
fn inpainting_single_file_equals_the_folder() {
    // The stable-diffusion-inpainting layout: a 9-channel conv_in, otherwise SD 1.x names.
    let folder = StableDiffusion::load(&fixtures().join("tiny-sd-inpaint"), opts()).unwrap();
    let single = load_single("tiny-sd-inpaint", with_config("tiny-sd-inpaint")).unwrap();
    assert!(single.is_inpainting_model());
    assert_eq!(single.unet.in_channels(), 9);
    assert_eq!(
        single.scheduler_config.prediction_type,
        folder.scheduler_config.prediction_type
    );
    same_model(&folder, &single, "inpainting");
}

#[test]
fn load_any_picks_by_file_or_folder() {
    let single = StableDiffusion::load_any(&checkpoint("tiny-sd"), opts(), with_config("tiny-sd"));
    assert!(single.is_ok());
    let folder = StableDiffusion::load_any(&fixtures().join("tiny-sd"), opts(), Default::default());
    assert!(folder.is_ok());
}

#[test]
fn prediction_type_flag_and_yaml_sidecar_override_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    std::fs::copy(checkpoint("tiny-sd"), &file).unwrap();
    let load = |single| StableDiffusion::load_single_file(&file, opts(), single).unwrap();
    let plain = load(with_config("tiny-sd"));
    assert_eq!(
        plain.scheduler_config.prediction_type, None,
        "the folder's config as it is"
    );
    std::fs::write(
        dir.path().join("m.yaml"),
        "model:\n  params:\n    parameterization: \"v\"\n",
    )
    .unwrap();
    let yaml = load(with_config("tiny-sd"));
    assert_eq!(
        yaml.scheduler_config.prediction_type.as_deref(),
        Some("v_prediction")
    );
    let flag = load(SingleFileOptions {
        prediction_type: Some(PredictionType::Epsilon),
        ..with_config("tiny-sd")
    });
    assert_eq!(
        flag.scheduler_config.prediction_type.as_deref(),
        Some("epsilon")
    );
}

/// Writes `name`'s checkpoint filtered/renamed by `f` to a temporary file.
fn edited(name: &str, f: impl Fn(String) -> Option<String>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}-edited.safetensors"));
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(checkpoint(name))
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| f(k).map(|k| (k, v)))
        .collect();
    Tensor::write_safetensors(&tensors, &path).unwrap();
    (dir, path)
}

#[test]
fn missing_vae_asks_for_vae_and_vae_overrides_work() {
    let (_dir, path) = edited("tiny-sd", |k| {
        (!k.starts_with("first_stage_model.")).then_some(k)
    });
    let err = message(StableDiffusion::load_single_file(
        &path,
        opts(),
        with_config("tiny-sd"),
    ));
    assert!(
        err.contains(&path.display().to_string()) && err.contains("--vae"),
        "{err}"
    );

    let folder = StableDiffusion::load(&fixtures().join("tiny-sd"), opts()).unwrap();
    let _g = tch::no_grad_guard();
    tch::manual_seed(3);
    let z = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let want = folder.vae.decode(&z).unwrap();

    // A diffusers VAE folder.
    let with_folder = StableDiffusion::load_single_file(
        &path,
        opts(),
        SingleFileOptions {
            vae: Some(fixtures().join("tiny-sd/vae")),
            ..with_config("tiny-sd")
        },
    )
    .unwrap();
    assert_identical(
        "--vae folder decode",
        &with_folder.vae.decode(&z).unwrap(),
        &want,
    );

    // One .safetensors file in LDM names without the first_stage_model. prefix; it replaces
    // the checkpoint's own VAE (here the full checkpoint's).
    let (_vdir, vae_file) = edited("tiny-sd", |k| {
        k.strip_prefix("first_stage_model.").map(str::to_string)
    });
    let with_file = load_single(
        "tiny-sd",
        SingleFileOptions {
            vae: Some(vae_file),
            ..with_config("tiny-sd")
        },
    )
    .unwrap();
    assert_identical(
        "--vae LDM file decode",
        &with_file.vae.decode(&z).unwrap(),
        &want,
    );
}

#[test]
fn pickles_are_refused_by_name_unread() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["model.ckpt", "model.pt", "model.pth", "pytorch_model.bin"] {
        let path = dir.path().join(name);
        // A pickle that would run code if it were ever unpickled.
        std::fs::write(&path, b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.").unwrap();
        let err = message(StableDiffusion::load_any(
            &path,
            opts(),
            with_config("tiny-sd"),
        ));
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains("never unpickles") && err.contains("safetensors"),
            "{err}"
        );
    }
    // A pickle under a .safetensors name is recognised by its first bytes.
    let disguised = dir.path().join("model.safetensors");
    std::fs::write(&disguised, b"\x80\x02}q\x00.").unwrap();
    let err = message(StableDiffusion::load_any(
        &disguised,
        opts(),
        with_config("tiny-sd"),
    ));
    assert!(
        err.contains("model.safetensors") && err.contains("pickle"),
        "{err}"
    );
}

#[test]
fn unknown_layouts_are_named() {
    let (_dir, path) = edited("tiny-sd", |k| {
        k.strip_prefix("model.diffusion_model.")
            .map(|r| format!("unet.{r}"))
    });
    let err = message(StableDiffusion::load_single_file(
        &path,
        opts(),
        with_config("tiny-sd"),
    ));
    assert!(
        err.contains(&path.display().to_string()) && err.contains("model.diffusion_model."),
        "{err}"
    );

    let (_dir, path) = edited("tiny-sd", |k| {
        (!k.starts_with("cond_stage_model.")).then_some(k)
    });
    let err = message(StableDiffusion::load_single_file(
        &path,
        opts(),
        with_config("tiny-sd"),
    ));
    assert!(
        err.contains("edited.safetensors") && err.contains("no text encoder"),
        "{err}"
    );
}

#[test]
fn shapes_that_fit_no_architecture_are_named() {
    // Without --model-config the configs are inferred: the tiny model's 32-wide text encoder
    // fits no CLIP (heads of 64).
    let err = message(load_single("tiny-sd", SingleFileOptions::default()));
    assert!(
        err.contains("tiny-sd.safetensors") && err.contains("multiple of 64"),
        "{err}"
    );

    // A UNet block missing from the middle of the down path.
    let (_dir, path) = edited("tiny-sd", |k| {
        (!k.starts_with("model.diffusion_model.input_blocks.2.")).then_some(k)
    });
    let err = message(StableDiffusion::load_single_file(
        &path,
        opts(),
        with_config("tiny-sd"),
    ));
    assert!(
        err.contains("edited.safetensors") && err.contains("input_blocks.2"),
        "{err}"
    );
}

/// A copy of a fixture model folder's configs and scheduler without its `tokenizer/`: a
/// `--model-config` that leaves the tokenizer to the built-in one. (The tiny models' configs cannot
/// be inferred from their shapes, see `shapes_that_fit_no_architecture_are_named`.)
fn configs_only(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
    ] {
        let to = dir.path().join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixtures().join(name).join(file), to).unwrap();
    }
    dir
}

/// No `--tokenizer` and no `tokenizer/` in `--model-config`: the built-in CLIP tokenizer, padded
/// as the family's folder pads (EOS for SD 1.x, "!" for SD 2.x), gives the folder's model exactly.
fn builtin_tokenizer_equals_the_folder(name: &str, pad_id: u32) {
    let configs = configs_only(name);
    let single = SingleFileOptions {
        model_config: Some(configs.path().to_path_buf()),
        ..Default::default()
    };
    let builtin = load_single(name, single).unwrap();
    assert_eq!(builtin.tokenizer.pad_id(), pad_id);
    assert!(builtin.tokenizer.builtin_label().is_some());
    let folder = StableDiffusion::load(&fixtures().join(name), opts()).unwrap();
    same_model(&folder, &builtin, &format!("{name} built-in tokenizer"));

    // The hash covers the built-in tokenizer by label, not by files it does not have.
    assert!(
        builtin
            .source_files()
            .iter()
            .all(|p| !p.to_string_lossy().contains("tokenizer")),
        "{:?}",
        builtin.source_files()
    );
    let with_folder = load_single(
        name,
        SingleFileOptions {
            model_config: Some(configs.path().to_path_buf()),
            tokenizer: Some(fixtures().join(name).join("tokenizer")),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(with_folder.tokenizer.builtin_label().is_none());
    let hash = builtin.content_sha256().unwrap();
    assert_ne!(hash, with_folder.content_sha256().unwrap());
    assert_eq!(hash, builtin.content_sha256().unwrap());
}

#[test]
fn a_missing_tokenizer_folder_is_named() {
    let err = message(load_single(
        "tiny-sd",
        SingleFileOptions {
            tokenizer: Some("/nonexistent/tokenizer".into()),
            ..with_config("tiny-sd")
        },
    ));
    assert!(err.contains("/nonexistent/tokenizer/vocab.json"), "{err}");
}

#[test]
fn sd1_without_a_tokenizer_uses_the_builtin_padding_with_eos() {
    builtin_tokenizer_equals_the_folder("tiny-sd", 49407);
}

#[test]
fn sd2_without_a_tokenizer_uses_the_builtin_padding_with_bang() {
    builtin_tokenizer_equals_the_folder("tiny-sd2", 0);
}

#[test]
fn missing_file_is_named() {
    let err = message(StableDiffusion::load_any(
        Path::new("/nonexistent/m.safetensors"),
        opts(),
        SingleFileOptions::default(),
    ));
    assert!(err.contains("/nonexistent/m.safetensors"), "{err}");
}

/// `sdbatch generate --model FILE.safetensors --model-config DIR` writes the same PNG as the
/// folder; `--model x.ckpt` fails naming the file.
#[test]
fn cli_generate_from_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a red sneaker\n").unwrap();
    let run = |model: &Path, out: &Path, extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"));
        cmd.args(["generate", "--model"])
            .arg(model)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(out)
            .args(["--steps", "2", "--seed", "9", "--device", "cpu"])
            .args(extra)
            .env("RUST_LOG", "warn,sdbatch::pipeline=info");
        cmd.output().unwrap()
    };
    let folder_out = dir.path().join("folder");
    let o = run(&fixtures().join("tiny-sd"), &folder_out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let single_out = dir.path().join("single");
    let config = fixtures().join("tiny-sd");
    let o = run(
        &checkpoint("tiny-sd"),
        &single_out,
        &["--model-config", config.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same pixels (the files differ in their embedded parameters: model name and hash).
    let png = |d: &Path| image::open(d.join("0.png")).unwrap().to_rgb8().into_raw();
    assert!(png(&folder_out) == png(&single_out), "same pixels");

    // No tokenizer anywhere: the built-in one, said so in the log.
    let configs = configs_only("tiny-sd");
    let builtin_out = dir.path().join("builtin");
    let o = run(
        &checkpoint("tiny-sd"),
        &builtin_out,
        &["--model-config", configs.path().to_str().unwrap()],
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("built-in CLIP tokenizer"), "{log}");
    assert!(png(&folder_out) == png(&builtin_out), "same pixels");

    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x04.").unwrap();
    let o = run(&ckpt, &dir.path().join("x"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("model.ckpt") && err.contains("never unpickles"),
        "{err}"
    );
}

/// `sdbatch generate --model FILE.safetensors --init-image --mask` with the inpainting checkpoint
/// runs the 9-channel UNet: diffusers' inpainting image (the reference made with the folder,
/// which `from_single_file` loads identically), and the folder's pixels exactly.
#[test]
fn cli_inpaints_from_a_single_file() {
    let meta = meta();
    let m = &meta["inpaint"];
    let r = reference("inpaint.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let entry = serde_json::json!({
        "id": "x",
        "prompt": m["prompt"],
        "negative_prompt": m["negative_prompt"],
        "seed": m["seed"],
    });
    std::fs::write(&prompts, entry.to_string()).unwrap();
    let init = fixtures().join("img2img/init.png");
    let mask = fixtures().join("inpaint/mask.png");
    let run = |model: &Path, out: &Path, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .args(["generate", "--model"])
            .arg(model)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(out)
            .arg("--init-image")
            .arg(&init)
            .arg("--mask")
            .arg(&mask)
            .args(["--guidance", "7.5", "--steps", "10", "--scheduler", "pndm"])
            .args(["--device", "cpu"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let folder = fixtures().join("tiny-sd-inpaint");
    let single_out = dir.path().join("single");
    let o = run(
        &checkpoint("tiny-sd-inpaint"),
        &single_out,
        &["--model-config", folder.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let folder_out = dir.path().join("folder");
    let o = run(&folder, &folder_out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = |d: &Path| image::open(d.join("x.png")).unwrap().to_rgb8().into_raw();
    assert_images_match(
        "single-file generate --mask",
        &png(&single_out),
        &u8_vec(&r["unet9_pndm_100_image"]),
    );
    assert!(png(&folder_out) == png(&single_out), "same pixels");
}
