//! img2img against diffusers' `StableDiffusionImg2ImgPipeline` and the VAE encoder
//! (scripts/fixtures_img2img.py), tiny model, CPU.
mod common;

use common::*;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{GenerateParams, ImageRequest, Img2Img, RgbImage, img2img_begin};

const TOL: f64 = 1e-4;

fn init_image() -> RgbImage {
    let img = image::open(fixtures().join("img2img/init.png"))
        .unwrap()
        .to_rgb8();
    RgbImage {
        width: img.width(),
        height: img.height(),
        pixels: img.into_raw(),
    }
}

#[test]
fn vae_encoder_matches_diffusers() {
    let model = load_cpu();
    let r = reference("img2img.safetensors");
    let _g = tch::no_grad_guard();
    let img = init_image();
    assert_eq!(
        u8_vec(&r["init"]),
        img.pixels,
        "the PNG holds the reference's pixels"
    );
    let pixels = tch::Tensor::from_slice(&img.pixels)
        .view([64, 64, 3])
        .permute([2, 0, 1])
        .to_kind(tch::Kind::Float)
        / 255.0
        * 2.0
        - 1.0;
    let dist = model
        .vae_encoder
        .as_ref()
        .expect("the tiny VAE has an encoder")
        .encode(&pixels.unsqueeze(0))
        .unwrap();
    assert_close("encoder mean", &dist.mean, &r["encoder_mean"], TOL);
    assert_close("encoder std", &dist.std, &r["encoder_std"], TOL);
}

#[test]
fn img2img_matches_diffusers_for_each_scheduler() {
    let model = load_cpu();
    let meta = meta();
    let m = &meta["img2img"];
    let r = reference("img2img.safetensors");
    let init = init_image();
    let request = ImageRequest {
        prompt: m["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(m["negative_prompt"].as_str().unwrap().into()),
        seed: m["seed"].as_u64().unwrap(),
    };
    let runs = m["runs"].as_object().unwrap();
    assert_eq!(runs.len(), 6);
    for (name, run) in runs {
        let steps = run["steps"].as_u64().unwrap() as usize;
        let strength = run["strength"].as_f64().unwrap();
        let params = params(
            steps,
            m["guidance_scale"].as_f64().unwrap(),
            64,
            name.parse::<SchedulerKind>().unwrap(),
        );
        let mut latents = Vec::new();
        let out = model
            .generate_with(
                std::slice::from_ref(&request),
                &params,
                Some(Img2Img {
                    images: std::slice::from_ref(&init),
                    strength,
                }),
                &mut |_, _, l| {
                    latents.push(l.copy());
                    std::ops::ControlFlow::Continue(())
                },
            )
            .unwrap();
        assert_eq!(
            latents.len() as u64,
            run["steps_run"].as_u64().unwrap(),
            "{name}: steps run"
        );
        for (i, l) in latents.iter().enumerate() {
            assert_close(
                &format!("{name} latents after step {i}"),
                l,
                &r[&format!("{name}_latents_{i:03}")],
                TOL,
            );
        }
        assert_images_match(
            &format!("{name} img2img image"),
            &out.images[0].pixels,
            &u8_vec(&r[&format!("{name}_image")]),
        );
    }
}

#[test]
fn img2img_inputs_are_checked() {
    // diffusers' get_timesteps: steps − ⌊steps · strength⌋.
    assert_eq!(img2img_begin(10, 0.6).unwrap(), 4);
    assert_eq!(img2img_begin(10, 1.0).unwrap(), 0);
    assert_eq!(img2img_begin(7, 0.3).unwrap(), 5);
    for bad in [0.0, -0.1, 1.01, f64::NAN] {
        assert!(img2img_begin(10, bad).is_err(), "{bad}");
    }
    assert!(
        img2img_begin(4, 0.2)
            .unwrap_err()
            .to_string()
            .contains("runs no step")
    );

    let model = load_cpu();
    let init = init_image();
    let request = ImageRequest {
        prompt: "a cat".into(),
        negative_prompt: None,
        seed: 1,
    };
    let params = |scheduler: SchedulerKind, width: i64| GenerateParams {
        width,
        ..params(4, 7.5, 64, scheduler)
    };
    let run = |p: GenerateParams, images: &[RgbImage]| {
        model
            .generate_with(
                std::slice::from_ref(&request),
                &p,
                Some(Img2Img {
                    images,
                    strength: 0.5,
                }),
                &mut |_, _, _| panic!("nothing runs"),
            )
            .err()
            .unwrap()
            .to_string()
    };
    let e = run(
        params(SchedulerKind::Pndm, 128),
        std::slice::from_ref(&init),
    );
    assert!(
        e.contains("init image 0 is 64x64, the output 128x64"),
        "{e}"
    );
    let e = run(params(SchedulerKind::Pndm, 64), &[]);
    assert!(e.contains("0 init images for 1 requests"), "{e}");
    let e = run(params(SchedulerKind::Heun, 64), std::slice::from_ref(&init));
    assert!(e.contains("does not support img2img"), "{e}");
}

/// `sdbatch generate --init-image` gives diffusers' img2img image, and refuses unusable inputs
/// before any image is written.
#[test]
fn generate_cli_runs_img2img() {
    let meta = meta();
    let m = &meta["img2img"];
    let r = reference("img2img.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        serde_json::json!({
            "id": "x",
            "prompt": m["prompt"],
            "negative_prompt": m["negative_prompt"],
            "seed": m["seed"],
        })
        .to_string(),
    )
    .unwrap();
    let model = model_dir();
    let init = fixtures().join("img2img/init.png");
    let run = |out: &std::path::Path, init: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--init-image",
            init.to_str().unwrap(),
            "--scheduler",
            "pndm",
            "--guidance",
            "7.5",
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = dir.path().join("out");
    let o = run(&out, &init, &["--steps", "10", "--strength", "0.6"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(out.join("x.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (64, 64), "the init image's size");
    assert_images_match(
        "generate --init-image",
        png.as_raw(),
        &u8_vec(&r["pndm_image"]),
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("x.json")).unwrap()).unwrap();
    assert_eq!(sidecar["strength"], 0.6);

    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, b"not an image").unwrap();
    for (init, extra, says) in [
        (&not_an_image, vec!["--steps", "10"], "notes.png"),
        (
            &init,
            vec!["--steps", "4", "--strength", "0.2"],
            "runs no step",
        ),
        (&init, vec!["--steps", "4", "--strength", "1.5"], "strength"),
    ] {
        let out = dir.path().join("refused");
        let o = run(&out, init, &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{says}: {err}");
        let written = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
        assert_eq!(written, 0, "{says}: nothing written");
    }
}

/// Hires fix against diffusers written as two calls (txt2img, PIL Lanczos resize, img2img): each
/// pass exactly, and the whole with sdbatch's own Lanczos resize.
#[test]
fn hires_fix_matches_the_two_call_reference() {
    use sdbatch::pipeline::hires::{Hires, Upscaler, upscale_lanczos};
    let model = load_cpu();
    let meta = meta();
    let m = &meta["hires"];
    let r = reference("hires.safetensors");
    let request = ImageRequest {
        prompt: m["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(m["negative_prompt"].as_str().unwrap().into()),
        seed: m["seed"].as_u64().unwrap(),
    };
    let size = m["size"].as_i64().unwrap();
    let guidance = m["guidance_scale"].as_f64().unwrap();
    let first = params(
        m["first_steps"].as_u64().unwrap() as usize,
        guidance,
        size,
        SchedulerKind::Pndm,
    );
    let hires = Hires {
        scale: m["scale"].as_f64().unwrap(),
        steps: m["steps"].as_u64().unwrap() as usize,
        strength: m["strength"].as_f64().unwrap(),
        upscaler: Upscaler::Lanczos,
    };
    let one = |p: &GenerateParams, init: Option<Img2Img<'_>>| {
        model
            .generate_with(
                std::slice::from_ref(&request),
                p,
                init,
                &mut sdbatch::pipeline::ignore_steps,
            )
            .unwrap()
            .images
            .remove(0)
    };
    // The first pass is plain txt2img.
    let first_image = one(&first, None);
    assert_images_match(
        "hires first pass",
        &first_image.pixels,
        &u8_vec(&r["first"]),
    );
    // The second pass from diffusers' own upscaled image: img2img at 128x128.
    let big = (size as f64 * hires.scale) as i64;
    let pil = RgbImage {
        width: big as u32,
        height: big as u32,
        pixels: u8_vec(&r["upscaled"]),
    };
    let second = GenerateParams {
        width: big,
        height: big,
        ..params(hires.steps, guidance, size, SchedulerKind::Pndm)
    };
    let from_pil = one(
        &second,
        Some(Img2Img {
            images: std::slice::from_ref(&pil),
            strength: hires.strength,
        }),
    );
    assert_images_match("hires second pass", &from_pil.pixels, &u8_vec(&r["image"]));
    // Our Lanczos3 and PIL's LANCZOS are different resamplers of the same filter.
    let ours = upscale_lanczos(&first_image, big as u32, big as u32).unwrap();
    let (within, max) = pixel_agreement(&ours.pixels, &pil.pixels);
    println!(
        "Lanczos3 vs PIL LANCZOS: {:.2} % within 1 level, max {max}",
        within * 100.0
    );
    assert!(within >= 0.95, "the resamplers disagree: {within}");
    // The whole hires fix, with our resize: the second pass on our upscaled image.
    let out = model
        .generate_hires(
            std::slice::from_ref(&request),
            &first,
            hires,
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    let expected = one(
        &second,
        Some(Img2Img {
            images: std::slice::from_ref(&ours),
            strength: hires.strength,
        }),
    );
    assert_eq!(out.images[0].width, 128);
    assert!(
        out.images[0] == expected,
        "generate_hires is its two passes"
    );
    assert_images_match(
        "hires fix end to end (our Lanczos3) vs diffusers (PIL's)",
        &out.images[0].pixels,
        &u8_vec(&r["image"]),
    );

    // And from the command line.
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        serde_json::json!({"id": "h", "prompt": m["prompt"], "negative_prompt": m["negative_prompt"], "seed": m["seed"]})
            .to_string(),
    )
    .unwrap();
    let model_path = model_dir();
    let steps = m["first_steps"].to_string();
    let hires_steps = m["steps"].to_string();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(["generate", "--model", model_path.to_str().unwrap()])
        .args(["--prompts", prompts.to_str().unwrap()])
        .args(["--out", dir.path().join("out").to_str().unwrap()])
        .args([
            "--steps",
            &steps,
            "--scheduler",
            "pndm",
            "--guidance",
            "7.5",
        ])
        .args([
            "--hires-scale",
            "2",
            "--hires-steps",
            &hires_steps,
            "--hires-strength",
            "0.5",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(dir.path().join("out/h.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (128, 128));
    assert!(
        png.as_raw() == &out.images[0].pixels,
        "generate --hires-* is generate_hires"
    );
}

/// The latent hires fix (A1111's "Latent" upscaler) against diffusers written as two calls:
/// txt2img returning latents, `F.interpolate(bilinear)`, img2img from those latents. Euler
/// ancestral in both passes, two seeds: the first pass's latents, the interpolation and the
/// final images all match, so every draw of each image's generator is in diffusers' order (no
/// VAE-sample draw when img2img starts from latents).
#[test]
fn latent_hires_fix_matches_the_two_call_reference() {
    use sdbatch::pipeline::hires::{Hires, Upscaler};
    let model = load_cpu();
    let meta = meta();
    let m = &meta["hires_latent"];
    let r = reference("hires_latent.safetensors");
    let seeds: Vec<u64> = m["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    let requests: Vec<ImageRequest> = seeds
        .iter()
        .map(|&seed| ImageRequest {
            prompt: m["prompt"].as_str().unwrap().into(),
            negative_prompt: Some(m["negative_prompt"].as_str().unwrap().into()),
            seed,
        })
        .collect();
    let size = m["size"].as_i64().unwrap();
    let first_steps = m["first_steps"].as_u64().unwrap() as usize;
    let first = params(
        first_steps,
        m["guidance_scale"].as_f64().unwrap(),
        size,
        SchedulerKind::EulerAncestral,
    );
    let hires = Hires {
        scale: m["scale"].as_f64().unwrap(),
        steps: m["steps"].as_u64().unwrap() as usize,
        strength: m["strength"].as_f64().unwrap(),
        upscaler: Upscaler::Latent,
    };
    let mut calls = 0;
    let mut first_latents = None;
    let out = model
        .generate_hires(&requests, &first, hires, &mut |_, _, latents| {
            if calls + 1 == first_steps {
                first_latents = Some(latents.copy());
            }
            calls += 1;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    let begin = img2img_begin(hires.steps, hires.strength).unwrap();
    assert_eq!(
        calls,
        first_steps + hires.steps - begin,
        "both passes' steps"
    );
    let first_latents = first_latents.unwrap();
    assert_close(
        "latent hires: first pass latents",
        &first_latents,
        &r["first_latents"],
        1e-4,
    );
    let big = (size as f64 * hires.scale) as i64;
    let upscaled = first_latents.upsample_bilinear2d([big / 8, big / 8], false, None, None);
    assert_close(
        "latent hires: bilinear upscale",
        &upscaled,
        &r["upscaled"],
        1e-4,
    );
    let expected = u8_vec(&r["image"]);
    let per_image = (big * big * 3) as usize;
    assert_eq!(out.images.len(), 2);
    for (i, img) in out.images.iter().enumerate() {
        assert_eq!((img.width, img.height), (big as u32, big as u32));
        assert_images_match(
            &format!("latent hires image {i} vs diffusers"),
            &img.pixels,
            &expected[i * per_image..(i + 1) * per_image],
        );
    }

    // The passes as the worker plans them, two shapes in separate GPU batches: each image's
    // first pass alone, then both second passes together. Not the same bytes (CPU kernels
    // block a batch of 1 and of 2 differently), but the same images.
    let mut firsts = Vec::new();
    for request in &requests {
        let one = model
            .hires_first_pass(
                std::slice::from_ref(request),
                &first,
                Upscaler::Latent,
                &mut sdbatch::pipeline::ignore_steps,
            )
            .unwrap();
        assert_eq!(one.timings.vae_decode_ms, 0.0, "latents are not decoded");
        firsts.extend(one.first);
    }
    let second = model.hires_params(&first, &hires).unwrap();
    let split = model
        .hires_second_pass(
            &requests,
            &second,
            hires.strength,
            &firsts.iter().collect::<Vec<_>>(),
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    for (i, (got, want)) in split.images.iter().zip(&out.images).enumerate() {
        assert_images_match(
            &format!("latent hires image {i}, passes batched apart"),
            &got.pixels,
            &want.pixels,
        );
    }

    // And from the command line, the same two images in one batch.
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let lines: Vec<String> = seeds
        .iter()
        .enumerate()
        .map(|(i, seed)| {
            serde_json::json!({"id": format!("h{i}"), "prompt": m["prompt"], "negative_prompt": m["negative_prompt"], "seed": seed})
                .to_string()
        })
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let model_path = model_dir();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(["generate", "--model", model_path.to_str().unwrap()])
        .args(["--prompts", prompts.to_str().unwrap()])
        .args(["--out", dir.path().join("out").to_str().unwrap()])
        .args(["--steps", &first_steps.to_string(), "--batch-size", "2"])
        .args(["--scheduler", "euler_ancestral", "--guidance", "7.5"])
        .args([
            "--hires-scale",
            "2",
            "--hires-steps",
            &hires.steps.to_string(),
        ])
        .args(["--hires-strength", &hires.strength.to_string()])
        .args(["--hires-upscaler", "latent"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (i, img) in out.images.iter().enumerate() {
        let png = image::open(dir.path().join(format!("out/h{i}.png")))
            .unwrap()
            .to_rgb8();
        assert!(
            png.as_raw() == &img.pixels,
            "generate --hires-upscaler latent is generate_hires"
        );
    }
}
