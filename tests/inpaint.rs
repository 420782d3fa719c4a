//! Inpainting against diffusers' `StableDiffusionInpaintPipeline` (scripts/fixtures_inpaint.py),
//! tiny models, CPU: a 9-input-channel inpainting UNet and the ordinary 4-channel one.
mod common;

use common::*;
use sdbatch::pipeline::mask::crop_region;
use sdbatch::pipeline::pil::Image8;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::single_file::SingleFileOptions;
use sdbatch::pipeline::{GrayImage, ImageRequest, Inpaint, LoadOptions, RgbImage, StableDiffusion};
use tch::{Device, Kind};

/// Euler ancestral from pure noise (strength 1) is the strictest case: latents start at
/// init_noise_sigma (14.6) × N(0, 1) and the first step multiplies any difference in the noise
/// prediction by about 10. It once missed this bound by 1.8e-4 because the VAE encoder saw its
/// input in another memory layout than diffusers gives it (channels last), and libtorch's
/// kernels sum in another order for it; see `images_to_tensor`.
const TOL: f64 = 1e-4;

fn rgb(path: &str) -> RgbImage {
    let img = image::open(fixtures().join(path)).unwrap().to_rgb8();
    RgbImage {
        width: img.width(),
        height: img.height(),
        pixels: img.into_raw(),
    }
}

fn load_inpainting_model() -> StableDiffusion {
    StableDiffusion::load(
        &fixtures().join("tiny-sd-inpaint"),
        LoadOptions::new(Device::Cpu, Kind::Float),
    )
    .unwrap()
}

fn request(m: &serde_json::Value) -> ImageRequest {
    ImageRequest {
        prompt: m["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(m["negative_prompt"].as_str().unwrap().into()),
        seed: m["seed"].as_u64().unwrap(),
    }
}

/// Every reference run of `model` ("unet9" or "unet4"), through `generate_inpaint`.
fn check_runs(model: &StableDiffusion, which: &str) {
    check_runs_of("inpaint", model, which);
}

/// [`check_runs`] of the meta.json section `section`, whose tensors are in
/// `reference/<section>.safetensors`; a run's `mask_blur` (default 0) goes to the request.
fn check_runs_of(section: &str, model: &StableDiffusion, which: &str) {
    let meta = meta();
    let m = &meta[section];
    let r = reference(&format!("{section}.safetensors"));
    let inpaint_mask = reference("inpaint.safetensors").remove("mask").unwrap();
    let init = rgb("img2img/init.png");
    assert_eq!(
        u8_vec(&inpaint_mask),
        rgb("inpaint/mask.png").pixels,
        "the PNG is the reference's mask"
    );
    // A section's own mask, else the inpainting one.
    let mask_rgb = rgb(m["mask"].as_str().unwrap_or("inpaint/mask.png"));
    let mask = GrayImage::from_rgb(&mask_rgb);
    let request = request(m);
    let mut checked = 0;
    for (run, info) in m["runs"].as_object().unwrap() {
        if info["model"] != which {
            continue;
        }
        let name = info["scheduler"].as_str().unwrap();
        let params = params(
            info["steps"].as_u64().unwrap() as usize,
            m["guidance_scale"].as_f64().unwrap(),
            m["size"].as_i64().unwrap(),
            name.parse::<SchedulerKind>().unwrap(),
        );
        let mut latents = Vec::new();
        let out = model
            .generate_inpaint(
                std::slice::from_ref(&request),
                &params,
                Inpaint {
                    images: std::slice::from_ref(&init),
                    masks: std::slice::from_ref(&mask),
                    strength: info["strength"].as_f64().unwrap(),
                    mask_blur: info["mask_blur"].as_f64().unwrap_or(0.0),
                    padding_mask_crop: info["padding_mask_crop"].as_u64().map(|p| p as u32),
                },
                &mut |_, _, l| {
                    latents.push(l.copy());
                    std::ops::ControlFlow::Continue(())
                },
            )
            .unwrap();
        assert_eq!(
            latents.len() as u64,
            info["steps_run"].as_u64().unwrap(),
            "{run}: steps run"
        );
        let mut worst = 0f64;
        for (i, l) in latents.iter().enumerate() {
            worst = worst.max(assert_close(
                &format!("{run} latents after step {i}"),
                l,
                &r[&format!("{run}_latents_{i:03}")],
                TOL,
            ));
        }
        assert_images_match(
            &format!("{run} image"),
            &out.images[0].pixels,
            &u8_vec(&r[&format!("{run}_image")]),
        );
        println!("{run}: max latent difference {worst:.2e}");
        checked += 1;
    }
    assert!(checked >= 1, "{which}: no run in the fixtures");
}

#[test]
fn inpainting_unet_matches_diffusers() {
    let model = load_inpainting_model();
    assert!(model.is_inpainting_model());
    check_runs(&model, "unet9");
}

/// The same inpainting model as a single-file checkpoint (LDM names, 9-channel conv_in; written
/// by make_fixtures.py and checked there with `StableDiffusionInpaintPipeline.from_single_file`)
/// matches diffusers' references as the folder does.
#[test]
fn single_file_inpainting_unet_matches_diffusers() {
    let model = StableDiffusion::load_single_file(
        &fixtures().join("single-file/tiny-sd-inpaint.safetensors"),
        LoadOptions::new(Device::Cpu, Kind::Float),
        SingleFileOptions {
            model_config: Some(fixtures().join("tiny-sd-inpaint")),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(model.is_inpainting_model());
    check_runs(&model, "unet9");
}

#[test]
fn ordinary_unet_blend_matches_diffusers() {
    let model = load_cpu();
    assert!(!model.is_inpainting_model());
    check_runs(&model, "unet4");
}

/// PIL's `GaussianBlur` (diffusers' `mask_processor.blur`) on an 8-bit grey image: a 72x40
/// test image (edges, a one-pixel line, a ramp, noise) and the inpainting mask, at radii from
/// 0.5 to 64 (wider than the image: BoxBlur.c's other edge branch), against Pillow's bytes.
#[test]
fn mask_blur_is_pils_gaussian_blur() {
    let meta = meta();
    let m = &meta["mask_blur"];
    let r = reference("mask_blur.safetensors");
    let test = &r["test_image"];
    let (h, w) = (test.size()[0], test.size()[1]);
    assert_ne!(h, w, "a non-square image");
    let test = GrayImage {
        width: w as u32,
        height: h as u32,
        pixels: u8_vec(test),
    };
    let mask = GrayImage::from_rgb(&rgb("inpaint/mask.png"));
    let mut checked = 0;
    for (tag, radius) in m["radius_tags"].as_object().unwrap() {
        let radius = radius.as_f64().unwrap();
        for (name, img) in [("test", &test), ("mask", &mask)] {
            let want = u8_vec(&r[&format!("blur_{name}_{tag}")]);
            let got = img.blurred(radius).unwrap();
            let exact = got.pixels.iter().zip(&want).filter(|(a, b)| a == b).count();
            let (frac, max) = pixel_agreement(&got.pixels, &want);
            println!(
                "blur {name} r={radius}: {exact}/{} bytes equal, {:.4} % within 1 level, max diff {max}",
                want.len(),
                frac * 100.0
            );
            assert!(frac >= 0.999, "blur {name} r={radius}: {frac}");
            // A port of PIL's fixed-point code: the same bytes, not merely close ones.
            assert_eq!(got.pixels, want, "blur {name} r={radius}: not PIL's bytes");
            checked += 1;
        }
    }
    assert!(checked >= 14, "{checked}");
}

/// diffusers' `StableDiffusionInpaintPipeline` with `mask_image =
/// pipe.mask_processor.blur(mask, blur_factor)`: the same latents and image from `mask_blur`,
/// on the 9-channel UNet (blur 4) and the 4-channel blend (blur 7.3).
#[test]
fn mask_blur_matches_diffusers() {
    check_runs_of("mask_blur", &load_inpainting_model(), "unet9");
    check_runs_of("mask_blur", &load_cpu(), "unet4");
}

/// PIL's Lanczos `Image.resize` (what diffusers' crop resizes with), RGB and L, up and down,
/// with source boxes (the fill strips resize a zero-height box): Pillow's bytes.
#[test]
fn pil_lanczos_resize_is_pils() {
    let meta = meta();
    let r = reference("mask_crop.safetensors");
    let src = |name: &str, channels: usize| {
        let t = &r[name];
        Image8::new(
            t.size()[1] as usize,
            t.size()[0] as usize,
            channels,
            u8_vec(t),
        )
        .unwrap()
    };
    let (rgb_src, l_src) = (src("resize_src_rgb", 3), src("resize_src_l", 1));
    let resizes = meta["mask_crop"]["resizes"].as_array().unwrap();
    for (i, case) in resizes.iter().enumerate() {
        let img = if case["mode"] == "RGB" {
            &rgb_src
        } else {
            &l_src
        };
        let size = &case["size"];
        let source = case["box"].as_array().map(|b| {
            let v: Vec<f32> = b.iter().map(|x| x.as_f64().unwrap() as f32).collect();
            [v[0], v[1], v[2], v[3]]
        });
        let out = img
            .resize(
                size[0].as_u64().unwrap() as usize,
                size[1].as_u64().unwrap() as usize,
                source,
            )
            .unwrap();
        let want = u8_vec(&r[&format!("resize_{i}")]);
        let (frac, max) = pixel_agreement(&out.pixels, &want);
        println!(
            "resize {case}: {:.4} % within 1 level, max diff {max}",
            frac * 100.0
        );
        assert_eq!(out.pixels, want, "resize {case}: not PIL's bytes");
    }
}

/// diffusers' `get_crop_region` on masks of several shapes, pads and processing aspects.
#[test]
fn crop_region_is_diffusers() {
    let meta = meta();
    let r = reference("mask_crop.safetensors");
    let regions = meta["mask_crop"]["regions"].as_array().unwrap();
    for (i, case) in regions.iter().enumerate() {
        let mask = &r[&format!("region_mask_{i}")];
        let (h, w) = (mask.size()[0] as usize, mask.size()[1] as usize);
        let got = crop_region(
            &u8_vec(mask),
            w,
            h,
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
            case["pad"].as_u64().unwrap() as u32,
        )
        .unwrap();
        let want: Vec<usize> = case["region"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got.to_vec(), want, "case {i}: {case}");
    }
    assert!(regions.len() >= 10);
    // An all-black mask has no region (diffusers divides by zero).
    let err = crop_region(&[0; 16], 4, 4, 64, 64, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("all black"), "{err}");
}

/// diffusers' `StableDiffusionInpaintPipeline(padding_mask_crop=N)` on a small off-centre mask
/// with a grey edge: the latents of the cropped generation and the pasted-back image, on the
/// 9-channel UNet (pad 4) and the 4-channel blend (pad 8).
#[test]
fn padding_mask_crop_matches_diffusers() {
    check_runs_of("mask_crop", &load_inpainting_model(), "unet9");
    check_runs_of("mask_crop", &load_cpu(), "unet4");
}

#[test]
fn inpainting_inputs_are_checked() {
    let model = load_inpainting_model();
    let m = &meta()["inpaint"];
    let request = request(m);
    let init = rgb("img2img/init.png");
    let mask = GrayImage::from_rgb(&rgb("inpaint/mask.png"));
    let p = params(4, 7.5, 64, SchedulerKind::Pndm);
    let run = |p: &sdbatch::pipeline::GenerateParams, masks: &[GrayImage], strength: f64| {
        model
            .generate_inpaint(
                std::slice::from_ref(&request),
                p,
                Inpaint {
                    images: std::slice::from_ref(&init),
                    masks,
                    strength,
                    mask_blur: 0.0,
                    padding_mask_crop: None,
                },
                &mut sdbatch::pipeline::ignore_steps,
            )
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let small = GrayImage {
        width: 32,
        height: 32,
        pixels: vec![255; 32 * 32],
    };
    assert!(run(&p, &[small], 1.0).contains("mask 0 is 32x32"));
    assert!(run(&p, &[], 1.0).contains("0 masks for 1 requests"));
    assert!(run(&p, std::slice::from_ref(&mask), 0.0).contains("strength"));
    for blur in [-1.0, 64.5, f64::NAN] {
        let err = model
            .generate_inpaint(
                std::slice::from_ref(&request),
                &p,
                Inpaint {
                    images: std::slice::from_ref(&init),
                    masks: std::slice::from_ref(&mask),
                    strength: 1.0,
                    mask_blur: blur,
                    padding_mask_crop: None,
                },
                &mut sdbatch::pipeline::ignore_steps,
            )
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("mask blur") && err.contains("0..=64"), "{err}");
    }
    // padding_mask_crop: bounded, and a mask with nothing to repaint has no region.
    let black = GrayImage {
        width: 64,
        height: 64,
        pixels: vec![0; 64 * 64],
    };
    for (masks, pad, says) in [
        (std::slice::from_ref(&mask), 5000, "padding_mask_crop 5000"),
        (std::slice::from_ref(&black), 8, "all black"),
    ] {
        let err = model
            .generate_inpaint(
                std::slice::from_ref(&request),
                &p,
                Inpaint {
                    images: std::slice::from_ref(&init),
                    masks,
                    strength: 1.0,
                    mask_blur: 0.0,
                    padding_mask_crop: Some(pad),
                },
                &mut sdbatch::pipeline::ignore_steps,
            )
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{err}");
    }
    let heun = params(4, 7.5, 64, SchedulerKind::Heun);
    let err = run(&heun, std::slice::from_ref(&mask), 1.0);
    assert!(err.contains("does not support inpainting"), "{err}");
    // Plain text-to-image cannot drive an inpainting UNet.
    let err = model
        .generate(
            std::slice::from_ref(&request),
            &p,
            &mut sdbatch::pipeline::ignore_steps,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("inpainting model"), "{err}");
}

/// `sdbatch generate --init-image --mask` gives diffusers' inpainting image (strength 1 by
/// default, as diffusers), resizes a mask of another size, and refuses unusable masks before
/// any image is written.
#[test]
fn generate_cli_inpaints() {
    let meta = meta();
    let m = &meta["inpaint"];
    let r = reference("inpaint.safetensors");
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
    let model = fixtures().join("tiny-sd-inpaint");
    let init = fixtures().join("img2img/init.png");
    let run = |out: &std::path::Path, extra: &[&str]| {
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
            "--guidance",
            "7.5",
            "--steps",
            "10",
        ];
        args.extend_from_slice(extra);
        if !extra.contains(&"--scheduler") {
            args.extend_from_slice(&["--scheduler", "pndm"]);
        }
        std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let mask = fixtures().join("inpaint/mask.png");
    let out = dir.path().join("out");
    let o = run(&out, &["--mask", mask.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(out.join("x.png")).unwrap().to_rgb8();
    assert_images_match(
        "generate --mask",
        png.as_raw(),
        &u8_vec(&r["unet9_pndm_100_image"]),
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("x.json")).unwrap()).unwrap();
    assert_eq!(sidecar["strength"], 1.0, "inpainting's default strength");

    // A mask of another size is resized to the output's, as the init image is.
    let small = dir.path().join("small.png");
    image::RgbImage::from_pixel(16, 16, image::Rgb([255, 255, 255]))
        .save(&small)
        .unwrap();
    let o = run(
        &dir.path().join("resized"),
        &["--mask", small.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, b"not an image").unwrap();
    for (extra, says) in [
        (vec!["--mask", not_an_image.to_str().unwrap()], "--mask"),
        (
            vec!["--mask", mask.to_str().unwrap(), "--scheduler", "heun"],
            "does not support inpainting",
        ),
    ] {
        let out = dir.path().join("refused");
        let o = run(&out, &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{says}: {err}");
        let written = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
        assert_eq!(written, 0, "{says}: nothing written");
    }
    // Without a mask, an inpainting model cannot run img2img.
    let o = run(&dir.path().join("nomask"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("inpainting model"),
        "{err}"
    );
}

/// `sdbatch generate --mask-blur R` gives diffusers' image with a blurred mask, records the
/// blur in the sidecar and the A1111 parameters, and refuses a radius out of range before
/// anything is written.
#[test]
fn generate_cli_blurs_the_mask() {
    let meta = meta();
    let m = &meta["mask_blur"];
    let r = reference("mask_blur.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let entry = serde_json::json!({
        "id": "x",
        "prompt": m["prompt"],
        "negative_prompt": m["negative_prompt"],
        "seed": m["seed"],
    });
    std::fs::write(&prompts, entry.to_string()).unwrap();
    let model = fixtures().join("tiny-sd-inpaint");
    let init = fixtures().join("img2img/init.png");
    let mask = fixtures().join("inpaint/mask.png");
    let run = |out: &std::path::Path, blur: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .args(["generate", "--model"])
            .arg(&model)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(out)
            .arg("--init-image")
            .arg(&init)
            .arg("--mask")
            .arg(&mask)
            // `=`: clap would read a separate "-1" as a flag.
            .arg(format!("--mask-blur={blur}"))
            .args(["--guidance", "7.5", "--steps", "10", "--scheduler", "pndm"])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = dir.path().join("out");
    let o = run(&out, "4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(out.join("x.png")).unwrap().to_rgb8();
    assert_images_match(
        "generate --mask-blur 4",
        png.as_raw(),
        &u8_vec(&r["unet9_pndm_100_blur4_image"]),
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("x.json")).unwrap()).unwrap();
    assert_eq!(sidecar["mask_blur"], 4.0);
    let bytes = std::fs::read(out.join("x.png")).unwrap();
    assert!(
        bytes.windows(14).any(|w| w == b", Mask blur: 4"),
        "the PNG's parameters record the blur"
    );

    for bad in ["65", "-1", "nan"] {
        let refused = dir.path().join(format!("refused{bad}"));
        let o = run(&refused, bad);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--mask-blur"),
            "{bad}: {err}"
        );
        let written = std::fs::read_dir(&refused).map(|d| d.count()).unwrap_or(0);
        assert_eq!(written, 0, "{bad}: nothing written");
    }
}

/// `sdbatch generate --padding-mask-crop N` gives diffusers' image (the crop inpainted at the
/// output size and pasted back) and records it in the sidecar and the A1111 parameters.
#[test]
fn generate_cli_crops_to_the_mask() {
    let meta = meta();
    let m = &meta["mask_crop"];
    let r = reference("mask_crop.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let entry = serde_json::json!({
        "id": "x",
        "prompt": m["prompt"],
        "negative_prompt": m["negative_prompt"],
        "seed": m["seed"],
    });
    std::fs::write(&prompts, entry.to_string()).unwrap();
    let out = dir.path().join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-sd-inpaint"))
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&out)
        .arg("--init-image")
        .arg(fixtures().join("img2img/init.png"))
        .arg("--mask")
        .arg(fixtures().join(m["mask"].as_str().unwrap()))
        .args(["--padding-mask-crop", "4"])
        .args(["--guidance", "7.5", "--steps", "10", "--scheduler", "pndm"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(out.join("x.png")).unwrap().to_rgb8();
    assert_images_match(
        "generate --padding-mask-crop 4",
        png.as_raw(),
        &u8_vec(&r["unet9_pndm_100_crop4_image"]),
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("x.json")).unwrap()).unwrap();
    assert_eq!(sidecar["padding_mask_crop"], 4);
    let bytes = std::fs::read(out.join("x.png")).unwrap();
    let needle = b"Masked area padding: 4";
    assert!(bytes.windows(needle.len()).any(|w| w == needle));
}
