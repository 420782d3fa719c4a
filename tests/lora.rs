//! LoRAs against diffusers' own loading (`load_lora_weights`, `set_adapters`, `fuse_lora`) on the
//! tiny model, with LoRAs made by peft in the three layouts (scripts/fixtures_lora.py).
mod common;

use common::*;
use sdbatch::pipeline::adapters::LoraWeight;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{GenerateParams, ImageRequest, StableDiffusion};

const TOL: f64 = 1e-4;

fn lora_dir() -> std::path::PathBuf {
    fixtures().join("loras")
}

fn with_loras() -> StableDiffusion {
    let model = load_cpu();
    model.set_lora_dir(&lora_dir(), 1 << 30).unwrap();
    model
}

fn set(loras: &[(&str, f64)]) -> Vec<LoraWeight> {
    let list = loras
        .iter()
        .map(|(name, weight)| LoraWeight {
            name: name.to_string(),
            weight: *weight,
        })
        .collect();
    sdbatch::pipeline::adapters::canonical(list).unwrap()
}

fn params(m: &serde_json::Value, loras: Vec<LoraWeight>) -> GenerateParams {
    GenerateParams {
        loras,
        ..meta_params(m, SchedulerKind::Pndm)
    }
}

fn request(m: &serde_json::Value) -> ImageRequest {
    ImageRequest {
        prompt: m["prompt"].as_str().unwrap().to_string(),
        negative_prompt: Some(m["negative_prompt"].as_str().unwrap().to_string()),
        seed: m["seed"].as_u64().unwrap(),
    }
}

fn image(model: &StableDiffusion, p: &GenerateParams, r: &ImageRequest) -> Vec<u8> {
    let out = model
        .generate(
            std::slice::from_ref(r),
            p,
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    out.images[0].pixels.clone()
}

/// Text-encoder outputs and a UNet prediction with LoRAs fused, against diffusers' unfused
/// adapters (the fused and unfused forms differ only by float rounding).
#[test]
fn fused_layers_match_diffusers_adapters() {
    let model = with_loras();
    let r = reference("lora.safetensors");
    let u = reference("unet.safetensors");
    let _g = tch::no_grad_guard();
    let te = |model: &StableDiffusion| model.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close("text encoder, no LoRA", &te(&model), &r["te_base"], TOL);
    // style: diffusers/PEFT layout, alpha/r = 2 from the file's metadata.
    model.apply_loras(&set(&[("style", 1.0)])).unwrap();
    assert_close("text encoder, style", &te(&model), &r["te_style"], TOL);
    let unet = |model: &StableDiffusion| {
        model
            .unet
            .forward(&u["sample"], &u["timestep"], &u["encoder_hidden_states"])
            .unwrap()
    };
    assert_close("unet, style", &unet(&model), &r["unet_out_style"], TOL);
    // style 0.7 + locon (kohya layout, LoCon convolutions, alpha 1 on rank 2) at -0.3.
    model
        .apply_loras(&set(&[("style", 0.7), ("locon", -0.3)]))
        .unwrap();
    assert_close("text encoder, two LoRAs", &te(&model), &r["te_two"], TOL);
    assert_close("unet, two LoRAs", &unet(&model), &r["unet_out_two"], TOL);
    // Back to no LoRA: the originals, bit for bit.
    model.apply_loras(&[]).unwrap();
    let base = te(&model);
    assert!(base.equal(&load_cpu().text_encoder.forward(&r["input_ids"]).unwrap()));
}

/// Whole pipeline runs: each layout alone, the two together (against both diffusers' unfused
/// adapters and its fuse_lora), and the older diffusers layout as the same LoRA.
#[test]
fn pipeline_images_match_diffusers() {
    let model = with_loras();
    let meta = meta();
    let m = &meta["lora"];
    let r = reference("lora.safetensors");
    let req = request(m);
    let base = image(&model, &params(m, vec![]), &req);
    assert_images_match("no LoRA", &base, &u8_vec(&r["image_base"]));
    for (what, loras, reference) in [
        (
            "style (diffusers/PEFT)",
            vec![("style", 1.0)],
            "image_style",
        ),
        (
            "style_old (diffusers before PEFT)",
            vec![("style_old", 1.0)],
            "image_style",
        ),
        ("locon (kohya, LoCon)", vec![("locon", 1.0)], "image_locon"),
        (
            "style 0.7 + locon -0.3, unfused in diffusers",
            vec![("style", 0.7), ("locon", -0.3)],
            "image_two",
        ),
        (
            "style 0.7 + locon -0.3, diffusers' fuse_lora",
            vec![("locon", -0.3), ("style", 0.7)],
            "image_two_fused",
        ),
    ] {
        let ours = image(&model, &params(m, set(&loras)), &req);
        assert_images_match(what, &ours, &u8_vec(&r[reference]));
        assert_ne!(ours, base, "{what}: the LoRA changed nothing");
    }
    // Unfusing restores the model exactly: the same image as before any LoRA, bit for bit.
    assert_eq!(image(&model, &params(m, vec![]), &req), base);
}

/// LCM-LoRA with the LCM sampler, 4 steps, guidance 1, against diffusers' LCMScheduler.
#[test]
fn lcm_lora_matches_diffusers() {
    let model = with_loras();
    let meta = meta();
    let m = &meta["lora"];
    let lcm = &m["lcm"];
    let r = reference("lora.safetensors");
    let p = GenerateParams {
        steps: lcm["steps"].as_u64().unwrap() as usize,
        guidance_scale: lcm["guidance_scale"].as_f64().unwrap(),
        scheduler: SchedulerKind::Lcm,
        ..params(m, set(&[(lcm["lora"].as_str().unwrap(), 1.0)]))
    };
    let req = request(m);
    assert_images_match(
        "LCM-LoRA, 4 steps",
        &image(&model, &p, &req),
        &u8_vec(&r["image_lcm"]),
    );
    let plain = GenerateParams { loras: vec![], ..p };
    assert_images_match(
        "LCM without the LoRA",
        &image(&model, &plain, &req),
        &u8_vec(&r["image_lcm_base"]),
    );
}

/// Names that are not in the folder, a model without a folder, and files the model cannot take
/// fail before anything is generated, and leave the model as it was.
#[test]
fn bad_loras_fail_cleanly_and_change_nothing() {
    let meta = meta();
    let m = &meta["lora"];
    let req = request(m);
    let no_dir = load_cpu();
    let e = no_dir
        .validate(
            std::slice::from_ref(&req),
            &params(m, set(&[("style", 1.0)])),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("--lora-dir"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    for f in ["style.safetensors", "locon.safetensors"] {
        std::fs::copy(lora_dir().join(f), dir.path().join(f)).unwrap();
    }
    // A LoRA for another model: the right layout, a layer the tiny UNet lacks.
    tch::Tensor::write_safetensors(
        &[
            (
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight",
                tch::Tensor::ones([2, 4], (tch::Kind::Float, tch::Device::Cpu)),
            ),
            (
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight",
                tch::Tensor::ones([4, 2], (tch::Kind::Float, tch::Device::Cpu)),
            ),
        ],
        dir.path().join("other-model.safetensors"),
    )
    .unwrap();
    std::fs::write(dir.path().join("garbage.safetensors"), b"not a LoRA").unwrap();
    let model = load_cpu();
    model.set_lora_dir(dir.path(), 1 << 30).unwrap();
    let base = image(&model, &params(m, vec![]), &req);

    let e = model
        .validate(
            std::slice::from_ref(&req),
            &params(m, set(&[("missing", 1.0)])),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown LoRA \"missing\""), "{e}");
    model.apply_loras(&set(&[("style", 1.0)])).unwrap();
    for (name, says) in [
        (
            "other-model",
            "has no layer `down_blocks_7_attentions_0_proj_in`",
        ),
        ("garbage", "garbage.safetensors"),
    ] {
        let e = model
            .generate(
                std::slice::from_ref(&req),
                &params(m, set(&[("style", 1.0), (name, 1.0)])),
                &mut |_, _, _| panic!("nothing is generated"),
            )
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(says), "{name}: {e}");
        assert!(
            model.active_loras().is_empty(),
            "{name}: left without LoRAs"
        );
        // The model is the base model again, bit for bit.
        assert_eq!(image(&model, &params(m, vec![]), &req), base, "{name}");
    }
}
