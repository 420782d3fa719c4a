//! Textual-inversion embeddings against diffusers' `load_textual_inversion` on the tiny model
//! (`scripts/make_fixtures.py`, `ref_textual_inversion`): an A1111-layout file (`tinyneg`, two
//! vectors) and a diffusers-layout file (`<tiny-style>`, one vector) in `embeddings/`.
mod common;

use common::*;
use sdbatch::pipeline::embeddings::Layout;
use sdbatch::pipeline::prompt_weights::PromptSyntax;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{GenerateParams, ImageRequest, StableDiffusion};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

const TOL: f64 = 1e-4;

fn embeddings_dir() -> PathBuf {
    fixtures().join("embeddings")
}

fn load_with_embeddings() -> StableDiffusion {
    let mut model = load_cpu();
    model.load_embeddings(&embeddings_dir()).unwrap();
    model
}

fn ti_meta() -> serde_json::Value {
    meta()["textual_inversion"].clone()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn save(path: &Path, name: &str, t: &Tensor) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    Tensor::write_safetensors(&[(name, t)], path).unwrap();
}

#[test]
fn both_layouts_load_with_their_triggers_in_path_order() {
    let mut model = load_cpu();
    let plain_hash = model.content_sha256().unwrap();
    let vocab = model.text_encoder.vocab_size();
    let loaded = model.load_embeddings(&embeddings_dir()).unwrap();
    let got: Vec<(&str, i64, Layout)> = loaded
        .iter()
        .map(|e| (e.trigger.as_str(), e.n_vectors(), e.layout))
        .collect();
    // style/learned_embeds.safetensors sorts before tinyneg.safetensors.
    assert_eq!(
        got,
        [
            ("<tiny-style>", 1, Layout::Diffusers),
            ("tinyneg", 2, Layout::A1111)
        ]
    );
    assert_eq!(model.text_encoder.vocab_size(), vocab + 3);
    // The files are part of the model's identity: they change its output.
    for e in &loaded {
        assert!(model.source_files().contains(&e.path), "{:?}", e.path);
    }
    let hash = model.content_sha256().unwrap();
    assert_ne!(hash, plain_hash);
    assert_eq!(hash, load_with_embeddings().content_sha256().unwrap());
}

#[test]
fn plain_prompts_match_diffusers() {
    let model = load_with_embeddings();
    let m = ti_meta();
    let r = reference("textual_inversion.safetensors");
    let prompts = strings(&m["prompts"]);
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    // Ids too: the new ids are assigned in the same order as diffusers assigned them.
    let ids = model.tokenize(&prompts).unwrap();
    assert!(
        ids.equal(&r["input_ids"]),
        "token ids differ from diffusers'"
    );
    let ours = model.encode_prompts(&prompts).unwrap();
    let d = assert_close("text embeddings with triggers", &ours, &r["embeds"], TOL);
    println!("plain prompts with textual inversion: max abs diff {d:.3e}");

    // Triggers ignore case (A1111's rule; diffusers expands a multi-vector trigger only as
    // written, so this one is checked against ourselves).
    let shouted = model
        .encode_prompts(&["TinyNeg, blurry", "tinyneg, blurry"])
        .unwrap();
    assert!(shouted.get(0).equal(&shouted.get(1)));
    // A model without the embeddings reads the triggers as text.
    let plain = load_cpu().tokenize(&prompts[..1]).unwrap();
    assert!(!plain.equal(&r["input_ids"].narrow(0, 0, 1)));
}

#[test]
fn a1111_prompts_match_the_python_transcription() {
    let model = load_with_embeddings();
    let m = ti_meta();
    let r = reference("textual_inversion.safetensors");
    let prompt = m["a1111_prompt"].as_str().unwrap();
    let negative = m["a1111_negative_prompt"].as_str().unwrap();
    let ours = model.encode_prompts_a1111(&[negative, prompt], 1).unwrap();
    let chunks = m["a1111_chunks"].as_i64().unwrap();
    assert_eq!(ours.size()[1], 77 * chunks);
    // The reference moves tinyneg's two vectors whole to the second chunk (checked there).
    let d = assert_close(
        "a1111 conditioning with triggers",
        &ours,
        &r["a1111_embeds"],
        TOL,
    );
    println!("a1111 prompts with textual inversion: max abs diff {d:.3e}");
}

#[test]
fn pipeline_with_embeddings_in_prompt_and_negative_matches_diffusers() {
    let model = load_with_embeddings();
    let m = ti_meta();
    let r = reference("textual_inversion.safetensors");
    assert_eq!(m["scheduler"], "pndm");
    let params = meta_params(&m, SchedulerKind::Pndm);
    let request = ImageRequest {
        prompt: m["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(m["negative_prompt"].as_str().unwrap().into()),
        seed: m["seed"].as_u64().unwrap(),
    };
    let mut worst: f64 = 0.0;
    let out = model
        .generate(
            std::slice::from_ref(&request),
            &params,
            &mut |i, _, latents| {
                let d = max_abs_diff(latents, &r[&format!("latents_{i:03}")]);
                assert!(d <= TOL, "latents after step {i} differ by {d:e}");
                worst = worst.max(d);
                std::ops::ControlFlow::Continue(())
            },
        )
        .unwrap();
    println!("textual inversion run: worst per-step latent max abs diff {worst:.3e}");
    assert_images_match(
        "textual inversion image",
        &out.images[0].pixels,
        &u8_vec(&r["image"]),
    );
    // The same request through the A1111 syntax (no weights, under 75 tokens) is the same image.
    let a1111 = GenerateParams {
        prompt_syntax: PromptSyntax::A1111,
        ..params
    };
    let again = model
        .generate(&[request], &a1111, &mut sdbatch::pipeline::ignore_steps)
        .unwrap();
    assert_eq!(again.images[0], out.images[0]);
}

#[test]
fn unusable_folders_fail_whole_and_leave_the_model_unchanged() {
    let mut model = load_cpu();
    let vocab = model.text_encoder.vocab_size();
    let hidden = model.text_encoder.hidden_size();
    let vectors = |n: i64, d: i64| Tensor::randn([n, d], (Kind::Float, tch::Device::Cpu));
    let mut check = |files: &[(&str, &str, Tensor)], expected: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        // A good file beside the bad one: nothing of the folder may be loaded.
        save(
            &dir.path().join("good.safetensors"),
            "emb_params",
            &vectors(1, hidden),
        );
        for (file, key, t) in files {
            save(&dir.path().join(file), key, t);
        }
        let e = model.load_embeddings(dir.path()).unwrap_err().to_string();
        for part in expected {
            assert!(e.contains(part), "{part:?} not in: {e}");
        }
        assert_eq!(model.text_encoder.vocab_size(), vocab, "model changed");
        assert!(!model.tokenizer.has_trigger("good").unwrap());
    };
    // An SD 2.x embedding on this SD 1.x-style model, and another width.
    check(
        &[("sd2-style.safetensors", "emb_params", vectors(1, 1024))],
        &["sd2-style.safetensors", "width 1024", "SD 2.x", "32 wide"],
    );
    check(
        &[("wide.safetensors", "<wide>", vectors(2, hidden * 2))],
        &["wide.safetensors", "width 64"],
    );
    // Longer than a prompt can hold.
    check(
        &[("long.safetensors", "emb_params", vectors(76, hidden))],
        &["long.safetensors", "76 vectors"],
    );
    // One trigger for two files, whatever the case.
    check(
        &[("other.safetensors", "GOOD", vectors(1, hidden))],
        &["good.safetensors", "other.safetensors", "`GOOD`"],
    );
    // A pickle is refused, not skipped.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("EasyNegative.pt"), b"\x80\x02").unwrap();
    let e = model.load_embeddings(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("EasyNegative.pt") && e.contains("never unpickles"),
        "{e}"
    );
    assert!(
        model
            .load_embeddings(Path::new("/nonexistent/embeddings"))
            .is_err()
    );

    // Loading the same folder twice: its triggers are taken.
    model.load_embeddings(&embeddings_dir()).unwrap();
    let e = model
        .load_embeddings(&embeddings_dir())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already loaded"), "{e}");
    assert_eq!(model.text_encoder.vocab_size(), vocab + 3);
}

/// `sdbatch generate --embeddings-dir`: the reference image through the command line, and an
/// unusable folder refused before any image is made.
#[test]
fn generate_cli_takes_an_embeddings_folder() {
    let m = ti_meta();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let entry = serde_json::json!({
        "id": "ti",
        "prompt": m["prompt"],
        "negative_prompt": m["negative_prompt"],
        "seed": m["seed"],
    });
    std::fs::write(&prompts, format!("{entry}\n")).unwrap();
    let out = dir.path().join("out");
    let run = |embeddings: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .args(["generate", "--model"])
            .arg(model_dir())
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(&out)
            .arg("--embeddings-dir")
            .arg(embeddings)
            .args(["--steps", &m["num_inference_steps"].to_string()])
            .args(["--guidance", &m["guidance_scale"].to_string()])
            .args(["--scheduler", "pndm", "--device", "cpu"])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let o = run(&embeddings_dir());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let png = image::open(out.join("ti.png")).unwrap().to_rgb8();
    assert_images_match(
        "generate --embeddings-dir",
        png.as_raw(),
        &u8_vec(&reference("textual_inversion.safetensors")["image"]),
    );

    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("EasyNegative.pt"), b"\x80\x02").unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    let o = run(&bad);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("EasyNegative.pt") && stderr.contains("never unpickles"),
        "{stderr}"
    );
    assert!(!out.join("ti.png").exists());
}
