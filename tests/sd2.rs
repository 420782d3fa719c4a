//! SD 2.x end to end on a tiny SD 2.x-style model made by the real diffusers/transformers
//! (`tiny-sd2`, see `scripts/make_fixtures.py`): an OpenCLIP-style text encoder (gelu, `!` as the
//! pad token), a UNet with linear projections, upcast attention and per-block head counts, a
//! v-prediction DDIM scheduler config and a native size of 96 (as SD 2.1's 768). Every step's
//! latents and the final images against diffusers, CPU, float32.
mod common;

use common::*;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{GenerateParams, ImageRequest, LoadOptions, StableDiffusion};
use tch::{Device, Kind};

const TOL: f64 = 1e-4;

fn load() -> StableDiffusion {
    StableDiffusion::load(
        &fixtures().join("tiny-sd2"),
        LoadOptions::new(Device::Cpu, Kind::Float),
    )
    .unwrap()
}

#[test]
fn text_encoder_pads_with_the_folders_pad_token() {
    let model = load();
    let m = &meta()["sd2"];
    let r = reference("sd2.safetensors");
    let prompts = [
        m["prompt"].as_str().unwrap(),
        m["negative_prompt"].as_str().unwrap(),
    ];
    let ids = model.tokenize(&prompts).unwrap();
    assert!(ids.equal(&r["input_ids"]), "token ids differ");
    // "!" is id 0: the padding after EOS is zeros, not EOS.
    assert_eq!(r["input_ids"].int64_value(&[0, 76]), 0);
    let _g = tch::no_grad_guard();
    let out = model.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close("sd2 text embeddings (gelu)", &out, &r["text_embeds"], TOL);
}

fn run(name: &str, scheduler: SchedulerKind) {
    let model = load();
    assert_eq!(model.native_size(), 96, "sample_size 12 x VAE factor 8");
    let meta = meta();
    let m = &meta["sd2"];
    let run = &m["runs"][name];
    let r = reference("sd2.safetensors");
    let params = GenerateParams {
        steps: m["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: m["guidance_scale"].as_f64().unwrap(),
        width: model.native_size(),
        height: model.native_size(),
        scheduler,
        clip_skip: 1,
        guidance_rescale: run["guidance_rescale"].as_f64().unwrap(),
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let request = ImageRequest {
        prompt: m["prompt"].as_str().unwrap().to_string(),
        negative_prompt: Some(m["negative_prompt"].as_str().unwrap().to_string()),
        seed: m["seed"].as_u64().unwrap(),
    };
    let mut worst: f64 = 0.0;
    let mut steps = 0;
    let out = model
        .generate(&[request], &params, &mut |i, _, latents| {
            let d = max_abs_diff(latents, &r[&format!("{name}_latents_{i:03}")]);
            assert!(
                d <= TOL,
                "sd2 {name}: latents after step {i} differ by {d:e}"
            );
            worst = worst.max(d);
            steps += 1;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(steps as u64, run["steps"].as_u64().unwrap());
    println!("sd2 {name}: {steps} steps, worst per-step latent max abs diff {worst:.3e}");
    assert_eq!((out.images[0].width, out.images[0].height), (96, 96));
    assert_images_match(
        &format!("sd2 {name} image"),
        &out.images[0].pixels,
        &u8_vec(&r[&format!("{name}_image")]),
    );
}

#[test]
fn ddim_v_prediction_matches_diffusers() {
    run("ddim", SchedulerKind::Ddim);
}

#[test]
fn ddim_v_prediction_with_guidance_rescale_matches_diffusers() {
    run("ddim_rescaled", SchedulerKind::Ddim);
}

#[test]
fn dpmpp_2m_v_prediction_matches_diffusers() {
    run("dpmpp_2m", SchedulerKind::DpmSolverPp2m);
}

#[test]
fn euler_v_prediction_matches_diffusers() {
    run("euler", SchedulerKind::Euler);
}
