//! The Rust pipeline against diffusers/transformers on the tiny random model: every component and
//! every scheduler, with the tolerances stated in each assertion.
mod common;

use common::*;
use sdbatch::pipeline::schedulers::{SchedulerConfig, SchedulerKind};
use sdbatch::pipeline::tokenizer::{BuiltinPad, ClipTokenizer, clip_vocab_and_merges};
use sdbatch::pipeline::{GenerateParams, ImageRequest, LoadOptions, StableDiffusion};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

/// `reference/tokens.json`: the prompts and the ids transformers' CLIPTokenizer gives them with
/// the SD 1.x tokenizer (EOS padding).
fn token_corpus() -> Vec<(String, Vec<i64>)> {
    let path = fixtures().join("reference/tokens.json");
    let tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let prompts = tokens["prompts"].as_array().unwrap();
    let ids = tokens["ids"].as_array().unwrap();
    assert!(
        prompts.len() >= 200,
        "corpus has only {} prompts",
        prompts.len()
    );
    prompts
        .iter()
        .zip(ids)
        .map(|(p, ids)| {
            let ids = ids.as_array().unwrap();
            let ids = ids.iter().map(|v| v.as_i64().unwrap()).collect();
            (p.as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// Asserts `ours` gives `expected(prompt, transformers' SD 1.x ids)` for every corpus prompt.
fn assert_corpus(what: &str, ours: &ClipTokenizer, expected: impl Fn(&str, &[i64]) -> Vec<i64>) {
    let corpus = token_corpus();
    let mut mismatches = Vec::new();
    for (p, theirs) in &corpus {
        let theirs = expected(p, theirs);
        let ours = ours.encode(p).unwrap().ids;
        if ours != theirs {
            mismatches.push(format!("{p:?}\n  ours:   {ours:?}\n  theirs: {theirs:?}"));
        }
    }
    println!(
        "{what}: {} prompts, {} mismatches",
        corpus.len(),
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{what}\n{}", mismatches.join("\n"));
}

#[test]
fn tokenizer_matches_transformers_on_corpus() {
    let model = load_cpu();
    assert_corpus("folder tokenizer", &model.tokenizer, |_, ids| ids.to_vec());
}

#[test]
fn builtin_vocabulary_and_merges_equal_the_tokenizer_folder() {
    let (vocab, merges) = clip_vocab_and_merges().unwrap();
    let dir = fixtures().join("tiny-sd/tokenizer");
    let text = std::fs::read_to_string(dir.join("vocab.json")).unwrap();
    let folder: std::collections::HashMap<String, u32> = serde_json::from_str(&text).unwrap();
    assert_eq!(vocab.len(), folder.len());
    let differing: Vec<_> = folder
        .iter()
        .filter(|&(token, id)| vocab.get(token) != Some(id))
        .take(10)
        .collect();
    assert!(differing.is_empty(), "tokens with other ids: {differing:?}");

    let text = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    let folder: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.starts_with("#version"))
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    assert_eq!(merges.len(), folder.len());
    let first = merges.iter().zip(&folder).position(|(a, b)| a != b);
    assert_eq!(first, None, "merges differ from line {first:?} on");
    println!(
        "built-in: {} tokens, {} merges, equal to the folder",
        vocab.len(),
        merges.len()
    );
}

#[test]
fn builtin_tokenizer_matches_transformers_on_corpus() {
    let builtin = ClipTokenizer::builtin(77, BuiltinPad::Eos).unwrap();
    assert_corpus("built-in tokenizer, EOS pad", &builtin, |_, ids| {
        ids.to_vec()
    });
}

#[test]
fn builtin_bang_pad_equals_the_sd2_tokenizer_folder() {
    let builtin = ClipTokenizer::builtin(77, BuiltinPad::Bang).unwrap();
    let folder = ClipTokenizer::load(&fixtures().join("tiny-sd2/tokenizer"), 77).unwrap();
    assert_eq!((builtin.pad_id(), folder.pad_id()), (0, 0));
    assert_corpus("built-in tokenizer, \"!\" pad", &builtin, |p, _| {
        folder.encode(p).unwrap().ids
    });
    // And transformers' own ids for tiny-sd2's prompt and negative prompt.
    let m = &meta()["sd2"];
    let r = reference("sd2.safetensors");
    for (row, key) in ["prompt", "negative_prompt"].into_iter().enumerate() {
        let ids = builtin.encode(m[key].as_str().unwrap()).unwrap().ids;
        assert!(
            Tensor::from_slice(&ids).equal(&r["input_ids"].get(row as i64)),
            "{key}: ids differ from transformers'"
        );
    }
}

/// transformers (5.23) makes the pad token special: with SD 2.x's "!" pad, every "!" in a prompt
/// is the pad id 0; with SD 1.x's EOS pad it stays BPE's "!</w>" (256) or a merge of it.
#[test]
fn a_bang_pad_token_is_special_in_prompts_as_in_transformers() {
    // CLIPTokenizer(prompt, padding="max_length", max_length=10) on tiny-sd2/ and tiny-sd/tokenizer.
    let cases: [(&str, [i64; 10], [i64; 10]); 5] = [
        (
            "Hello!",
            [49406, 3306, 0, 49407, 0, 0, 0, 0, 0, 0],
            [
                49406, 3306, 256, 49407, 49407, 49407, 49407, 49407, 49407, 49407,
            ],
        ),
        (
            "wow !!! great",
            [49406, 2781, 0, 0, 0, 830, 49407, 0, 0, 0],
            [
                49406, 2781, 995, 830, 49407, 49407, 49407, 49407, 49407, 49407,
            ],
        ),
        (
            "a!b",
            [49406, 320, 0, 321, 49407, 0, 0, 0, 0, 0],
            [
                49406, 320, 256, 321, 49407, 49407, 49407, 49407, 49407, 49407,
            ],
        ),
        (
            "what?! no",
            [49406, 768, 286, 0, 871, 49407, 0, 0, 0, 0],
            [
                49406, 768, 2835, 871, 49407, 49407, 49407, 49407, 49407, 49407,
            ],
        ),
        (
            "hi!<|endoftext|>x",
            [49406, 1883, 0, 49407, 343, 49407, 0, 0, 0, 0],
            [
                49406, 1883, 256, 49407, 343, 49407, 49407, 49407, 49407, 49407,
            ],
        ),
    ];
    let sd2 = [
        ClipTokenizer::load(&fixtures().join("tiny-sd2/tokenizer"), 10).unwrap(),
        ClipTokenizer::builtin(10, BuiltinPad::Bang).unwrap(),
    ];
    let sd1 = [
        ClipTokenizer::load(&fixtures().join("tiny-sd/tokenizer"), 10).unwrap(),
        ClipTokenizer::builtin(10, BuiltinPad::Eos).unwrap(),
    ];
    for (prompt, bang, eos) in cases {
        for (i, t) in sd2.iter().enumerate() {
            assert_eq!(t.encode(prompt).unwrap().ids, bang, "{prompt:?}, sd2 #{i}");
        }
        for (i, t) in sd1.iter().enumerate() {
            assert_eq!(t.encode(prompt).unwrap().ids, eos, "{prompt:?}, sd1 #{i}");
        }
    }
}

#[test]
fn text_encoder_matches_transformers() {
    let model = load_cpu();
    let r = reference("text_encoder.safetensors");
    let out = model.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close(
        "text encoder last_hidden_state",
        &out,
        &r["last_hidden_state"],
        TOL,
    );
}

#[test]
fn unet_matches_diffusers() {
    let model = load_cpu();
    let r = reference("unet.safetensors");
    let _g = tch::no_grad_guard();
    let out = model
        .unet
        .forward(&r["sample"], &r["timestep"], &r["encoder_hidden_states"])
        .unwrap();
    assert_close("unet 64x64, t=[999, 480.5]", &out, &r["out"], TOL);
    let out = model
        .unet
        .forward(
            &r["sample_b"],
            &r["timestep_b"],
            &r["encoder_hidden_states_b"],
        )
        .unwrap();
    assert_close("unet 128x64 (non-square), t=1", &out, &r["out_b"], TOL);
}

#[test]
fn fp16_variant_weights_load_and_match() {
    let options = LoadOptions {
        variant: Some("fp16".into()),
        ..LoadOptions::new(Device::Cpu, Kind::Float)
    };
    let model = StableDiffusion::load(&model_dir(), options).unwrap();
    let r = reference("unet_fp16_weights.safetensors");
    let _g = tch::no_grad_guard();
    let out = model
        .unet
        .forward(&r["sample"], &r["timestep"], &r["encoder_hidden_states"])
        .unwrap();
    assert_close(
        "unet with fp16-variant weights (fp32 compute)",
        &out,
        &r["out"],
        TOL,
    );
}

#[test]
fn vae_decoder_matches_diffusers() {
    let model = load_cpu();
    let r = reference("vae.safetensors");
    let _g = tch::no_grad_guard();
    let out = model.vae.decode(&r["latents"]).unwrap();
    assert_close("vae decode", &out, &r["decoded"], TOL);
}

fn scheduler_run(name: &str, kind: SchedulerKind) {
    scheduler_run_with(name, kind, |_| {});
}

/// `scheduler_run` on the model's scheduler config as `edit` changes it: the options a model's
/// scheduler_config.json may carry (the fixture passes the same ones to `Cls.from_pretrained`), run
/// through a user-facing scheduler name. The number of steps is the run's own when the fixture
/// records one (LCM), else the shared one.
fn scheduler_run_with(name: &str, kind: SchedulerKind, edit: impl FnOnce(&mut SchedulerConfig)) {
    let mut model = load_cpu();
    edit(&mut model.scheduler_config);
    let meta = meta();
    let m = &meta["schedulers"];
    let r = reference(&format!("scheduler_{name}.safetensors"));
    let steps = meta["scheduler_runs"][name]["num_inference_steps"]
        .as_u64()
        .or_else(|| m["num_inference_steps"].as_u64())
        .unwrap() as usize;
    let params = GenerateParams {
        steps,
        guidance_scale: m["guidance_scale"].as_f64().unwrap(),
        width: m["width"].as_i64().unwrap(),
        height: m["height"].as_i64().unwrap(),
        scheduler: kind,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let request = ImageRequest {
        prompt: m["prompt"].as_str().unwrap().to_string(),
        negative_prompt: None,
        seed: m["seeds"][0].as_u64().unwrap(),
    };

    // Timesteps.
    let sched = kind.build(&model.scheduler_config, params.steps).unwrap();
    let ours_t = Tensor::from_slice(sched.timesteps()).to_kind(Kind::Float);
    assert_close(
        &format!("{name} timesteps"),
        &ours_t,
        &r["timesteps"].to_kind(Kind::Float),
        1e-3,
    );

    // Initial latents: the per-image generator, times init_noise_sigma.
    let shape = r["init_latents"].size();
    let noise = sdbatch::pipeline::noise::image_noise(
        request.seed,
        [shape[0], shape[1], shape[2], shape[3]],
        Kind::Float,
        1,
    )
    .unwrap();
    let init = &noise[0] * sched.init_noise_sigma();
    assert_close(
        &format!("{name} initial latents"),
        &init,
        &r["init_latents"],
        TOL,
    );

    // Latents after every step, then the image.
    let mut worst: f64 = 0.0;
    let mut count = 0;
    let out = model
        .generate(&[request], &params, &mut |i, _, latents| {
            let expected = &r[&format!("latents_{i:03}")];
            let d = max_abs_diff(latents, expected);
            assert!(d <= TOL, "{name}: latents after step {i} differ by {d:e}");
            worst = worst.max(d);
            count += 1;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    let expected_steps = r.keys().filter(|k| k.starts_with("latents_")).count();
    assert_eq!(count, expected_steps, "{name}: number of steps");
    println!(
        "{name}: {count} steps, worst per-step latent max abs diff {worst:.3e} (tolerance {TOL:.0e})"
    );
    assert_images_match(
        &format!("{name} final image"),
        &out.images[0].pixels,
        &u8_vec(&r["image"]),
    );
}

#[test]
fn pndm_matches_diffusers() {
    scheduler_run("pndm", SchedulerKind::Pndm);
}

#[test]
fn ddim_matches_diffusers() {
    scheduler_run("ddim", SchedulerKind::Ddim);
}

#[test]
fn euler_ancestral_matches_diffusers() {
    scheduler_run("euler_ancestral", SchedulerKind::EulerAncestral);
}

#[test]
fn dpmpp_2m_matches_diffusers() {
    scheduler_run("dpmpp_2m", SchedulerKind::DpmSolverPp2m);
}

#[test]
fn euler_matches_diffusers() {
    scheduler_run("euler", SchedulerKind::Euler);
}

#[test]
fn euler_karras_matches_diffusers() {
    scheduler_run("euler_karras", SchedulerKind::EulerKarras);
}

#[test]
fn euler_ancestral_karras_matches_diffusers() {
    scheduler_run(
        "euler_ancestral_karras",
        SchedulerKind::EulerAncestralKarras,
    );
}

#[test]
fn heun_matches_diffusers() {
    scheduler_run("heun", SchedulerKind::Heun);
}

#[test]
fn heun_karras_matches_diffusers() {
    scheduler_run("heun_karras", SchedulerKind::HeunKarras);
}

#[test]
fn lms_matches_diffusers() {
    scheduler_run("lms", SchedulerKind::Lms);
}

#[test]
fn lms_karras_matches_diffusers() {
    scheduler_run("lms_karras", SchedulerKind::LmsKarras);
}

#[test]
fn dpmpp_2m_karras_matches_diffusers() {
    scheduler_run("dpmpp_2m_karras", SchedulerKind::DpmSolverPp2mKarras);
}

/// The options of an SD 2.x-style zero-terminal-SNR model's scheduler_config.json.
fn zero_snr(c: &mut SchedulerConfig) {
    c.rescale_betas_zero_snr = Some(true);
    c.timestep_spacing = Some("trailing".into());
    c.prediction_type = Some("v_prediction".into());
}

#[test]
fn ddim_zero_snr_matches_diffusers() {
    scheduler_run_with("ddim_zero_snr", SchedulerKind::Ddim, zero_snr);
}

#[test]
fn euler_zero_snr_matches_diffusers() {
    scheduler_run_with("euler_zero_snr", SchedulerKind::Euler, zero_snr);
}

#[test]
fn unipc_matches_diffusers() {
    scheduler_run("unipc", SchedulerKind::UniPc);
}

#[test]
fn unipc_karras_matches_diffusers() {
    scheduler_run("unipc_karras", SchedulerKind::UniPcKarras);
}

#[test]
fn unipc_zero_snr_matches_diffusers() {
    scheduler_run_with("unipc_zero_snr", SchedulerKind::UniPc, zero_snr);
}

#[test]
fn lcm_matches_diffusers() {
    scheduler_run("lcm", SchedulerKind::Lcm);
}

#[test]
fn three_prompt_batch_matches_diffusers() {
    let model = load_cpu();
    let meta = meta();
    let b = &meta["batch"];
    let prompts = b["prompts"].as_array().unwrap();
    let negatives = b["negative_prompts"].as_array().unwrap();
    let seeds = b["seeds"].as_array().unwrap();
    let requests: Vec<ImageRequest> = (0..prompts.len())
        .map(|i| ImageRequest {
            prompt: prompts[i].as_str().unwrap().into(),
            negative_prompt: Some(negatives[i].as_str().unwrap().into()),
            seed: seeds[i].as_u64().unwrap(),
        })
        .collect();
    let params = GenerateParams {
        steps: b["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: b["guidance_scale"].as_f64().unwrap(),
        width: b["width"].as_i64().unwrap(),
        height: b["height"].as_i64().unwrap(),
        scheduler: SchedulerKind::Pndm,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let out = model
        .generate(&requests, &params, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    let r = reference("batch.safetensors");
    let ours: Vec<u8> = out.images.iter().flat_map(|i| i.pixels.clone()).collect();
    assert_images_match("3-prompt batch", &ours, &u8_vec(&r["images"]));
}

/// An image's pixels depend only on its own prompt, negative prompt, seed and parameters: generated
/// alone or as the third image of a batch of 5 (other prompts, other seeds) it is the same image.
/// Batched kernels (oneDNN convolutions on the CPU, cuDNN/cuBLAS on CUDA) choose their algorithm by
/// batch size, so the arithmetic is not bit-identical across batch sizes: the latents may differ
/// in the last bits, which can move a pixel by one level. The test pins that down: the same noise
/// and text embedding per image (exact), latents equal to float rounding, images within one level.
#[test]
fn image_is_independent_of_its_batch() {
    let model = load_cpu();
    let target = ImageRequest {
        prompt: "a lighthouse at dusk, oil painting".into(),
        negative_prompt: Some("blurry".into()),
        seed: 31337,
    };
    let mut batch: Vec<ImageRequest> = (0..4)
        .map(|i| ImageRequest {
            prompt: format!("filler prompt number {i} with different words"),
            negative_prompt: None,
            seed: i,
        })
        .collect();
    batch.insert(2, target.clone());
    for kind in SchedulerKind::ALL {
        let params = GenerateParams {
            steps: 6,
            guidance_scale: 7.5,
            width: 64,
            height: 64,
            scheduler: kind,
            clip_skip: 1,
            guidance_rescale: 0.0,
            prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
            loras: Vec::new(),
        };
        let mut alone_latents = Tensor::new();
        let alone = model
            .generate(std::slice::from_ref(&target), &params, &mut |_, _, l| {
                alone_latents = l.copy();
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        let mut batch_latents = Tensor::new();
        let together = model
            .generate(&batch, &params, &mut |_, _, l| {
                batch_latents = l.narrow(0, 2, 1).copy();
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(together.images.len(), 5);
        assert_ne!(together.images[1], together.images[2]);
        let d = max_abs_diff(&alone_latents, &batch_latents);
        let scale = alone_latents.abs().max().double_value(&[]);
        let (frac, max) = pixel_agreement(&alone.images[0].pixels, &together.images[2].pixels);
        println!(
            "{kind}: alone vs in a batch of 5: final latents max abs diff {d:.3e} (max |latent| {scale:.1}), identical image: {}, {:.4} % within 1 level, max diff {max}",
            alone.images[0] == together.images[2],
            frac * 100.0
        );
        // Float32 rounding, relative to the latents' magnitude (this random UNet drives them to
        // |x| ~ 50): a real dependence on the batch would show at 1e-2 and above.
        assert!(
            d <= 1e-5 * scale,
            "{kind}: latents differ by {d:e} (max |x| {scale}) inside a batch"
        );
        assert!(
            frac >= 0.999 && max <= 1,
            "{kind}: image differs inside a batch by up to {max} levels"
        );
    }
}

/// Attention slicing and VAE slicing only change how much runs at once, not the result.
#[test]
fn slicing_options_do_not_change_images() {
    let requests: Vec<ImageRequest> = (0..3)
        .map(|i| ImageRequest {
            prompt: format!("a bowl of fruit, still life number {i}"),
            negative_prompt: None,
            seed: 100 + i,
        })
        .collect();
    let params = GenerateParams {
        steps: 4,
        guidance_scale: 7.5,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Pndm,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let plain = load_cpu()
        .generate(&requests, &params, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    let sliced_model = StableDiffusion::load(
        &model_dir(),
        LoadOptions {
            attention_slice: Some(1),
            vae_slicing: true,
            ..LoadOptions::new(Device::Cpu, Kind::Float)
        },
    )
    .unwrap();
    let sliced = sliced_model
        .generate(&requests, &params, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    for (a, b) in plain.images.iter().zip(&sliced.images) {
        assert_images_match("sliced vs unsliced", &a.pixels, &b.pixels);
    }
}

/// Clip skip in AUTOMATIC1111's numbering, against the text encoder's hidden states (made by
/// transformers), and a pipeline run at clip skip 2 with both prompts skipped.
#[test]
fn clip_skip_matches_the_hidden_states_and_the_pipeline() {
    let model = load_cpu();
    let meta = meta();
    let m = &meta["clip_skip"];
    let r = reference("clip_skip.safetensors");
    let layers = model.text_encoder.num_layers();
    assert_eq!(layers as u64, m["layers"].as_u64().unwrap());
    let _g = tch::no_grad_guard();
    for c in 1..=layers {
        let out = model
            .text_encoder
            .forward_skipping(&r["input_ids"], c)
            .unwrap();
        assert_close(
            &format!("clip skip {c} embeddings"),
            &out,
            &r[&format!("embeds_{c}")],
            TOL,
        );
    }
    for bad in [0, layers + 1] {
        let e = model
            .text_encoder
            .forward_skipping(&r["input_ids"], bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("clip skip"), "{e}");
    }

    let params = GenerateParams {
        steps: m["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: m["guidance_scale"].as_f64().unwrap(),
        width: m["size"].as_i64().unwrap(),
        height: m["size"].as_i64().unwrap(),
        scheduler: SchedulerKind::Pndm,
        clip_skip: 2,
        guidance_rescale: 0.0,
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let request = ImageRequest {
        prompt: m["prompt"].as_str().unwrap().to_string(),
        negative_prompt: Some(m["negative_prompt"].as_str().unwrap().to_string()),
        seed: m["seed"].as_u64().unwrap(),
    };
    let out = model
        .generate(
            std::slice::from_ref(&request),
            &params,
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    assert_images_match(
        "clip skip 2 image",
        &out.images[0].pixels,
        &u8_vec(&r["image_2"]),
    );
    let too_many = GenerateParams {
        clip_skip: layers + 1,
        ..params
    };
    let e = model
        .validate(&[request], &too_many)
        .unwrap_err()
        .to_string();
    assert!(e.contains("clip skip"), "{e}");
}

/// diffusers' guidance_rescale (0.7), step by step.
#[test]
fn guidance_rescale_matches_diffusers() {
    let model = load_cpu();
    let meta = meta();
    let m = &meta["guidance_rescale"];
    let r = reference("guidance_rescale.safetensors");
    let params = GenerateParams {
        steps: m["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: m["guidance_scale"].as_f64().unwrap(),
        width: m["size"].as_i64().unwrap(),
        height: m["size"].as_i64().unwrap(),
        scheduler: SchedulerKind::Pndm,
        clip_skip: 1,
        guidance_rescale: m["guidance_rescale"].as_f64().unwrap(),
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let request = ImageRequest {
        prompt: m["prompt"].as_str().unwrap().to_string(),
        negative_prompt: None,
        seed: m["seed"].as_u64().unwrap(),
    };
    let mut worst: f64 = 0.0;
    let out = model
        .generate(
            std::slice::from_ref(&request),
            &params,
            &mut |i, _, latents| {
                let d = max_abs_diff(latents, &r[&format!("latents_{i:03}")]);
                assert!(
                    d <= TOL,
                    "guidance rescale: latents after step {i} differ by {d:e}"
                );
                worst = worst.max(d);
                std::ops::ControlFlow::Continue(())
            },
        )
        .unwrap();
    println!("guidance rescale 0.7: worst per-step latent max abs diff {worst:.3e}");
    assert_images_match(
        "guidance rescale image",
        &out.images[0].pixels,
        &u8_vec(&r["image"]),
    );
    for bad in [-0.1, 1.5, f64::NAN] {
        let p = GenerateParams {
            guidance_rescale: bad,
            prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
            loras: Vec::new(),
            ..params.clone()
        };
        assert!(model.validate(std::slice::from_ref(&request), &p).is_err());
    }
}

/// The model's content hash (in every event and manifest) names its files and its scheduler.
#[test]
fn the_model_hash_covers_weights_configs_tokenizer_and_scheduler() {
    let a = load_cpu();
    let h = a.content_sha256().unwrap();
    assert_eq!(h.len(), 64);
    assert_eq!(load_cpu().content_sha256().unwrap(), h, "stable");
    let names: Vec<String> = a
        .source_files()
        .iter()
        .map(|p| p.strip_prefix(model_dir()).unwrap().display().to_string())
        .collect();
    for f in [
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ] {
        assert!(names.contains(&f.to_string()), "{f} not in {names:?}");
    }
    // Another scheduler configuration is another model as served.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&model_dir(), tmp.path());
    let cfg = tmp.path().join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"steps_offset\": 1", "\"steps_offset\": 0"),
    )
    .unwrap();
    let b = StableDiffusion::load(tmp.path(), LoadOptions::new(Device::Cpu, Kind::Float)).unwrap();
    assert_ne!(b.content_sha256().unwrap(), h);
}

/// AUTOMATIC1111's weighted, chunked conditioning (three chunks, BREAK, a comma backtrack, clip
/// skip 2; the negative padded with empty chunks) equals the Python transcription of A1111's
/// arithmetic on the real transformers CLIPTextModel.
#[test]
fn a1111_weighted_long_prompts_match_the_python_transcription() {
    let model = load_cpu();
    let meta = meta();
    let m = &meta["weighted_prompts"];
    let r = reference("weighted_prompts.safetensors");
    let (prompt, negative) = (
        m["prompt"].as_str().unwrap(),
        m["negative_prompt"].as_str().unwrap(),
    );
    let clip_skip = m["clip_skip"].as_u64().unwrap() as usize;
    let ours = model
        .encode_prompts_a1111(&[negative, prompt], clip_skip)
        .unwrap();
    let chunks = m["chunks"].as_i64().unwrap();
    assert_eq!(ours.size()[1], 77 * chunks);
    let diff = max_abs_diff(&ours, &r["embeds"]);
    println!(
        "a1111 conditioning [2, {}]: max |diff| {diff:.3e}",
        77 * chunks
    );
    assert!(diff <= 1e-4, "max |diff| {diff}");

    // Without weights and within 75 tokens, the A1111 path is exactly the plain one.
    let plain_text = "an astronaut riding a horse on the moon";
    let plain = model.encode_prompts_skipping(&[plain_text], 1).unwrap();
    let a1111 = model.encode_prompts_a1111(&[plain_text], 1).unwrap();
    assert!(plain.equal(&a1111), "unweighted a1111 differs from plain");
}
