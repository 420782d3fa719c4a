//! The safety checker, the CLIP image preprocessing and the CLIP score against diffusers /
//! transformers 5.23 on the tiny fixtures (`scripts/make_fixtures.py`, last section), with the
//! tolerance stated in each assertion and the measured difference printed.
mod common;

use common::*;
use sdbatch::pipeline::clip_score::{ClipScorer, cosine_scores};
use sdbatch::pipeline::clip_vision::{ClipImageProcessor, ClipImageProcessorConfig};
use sdbatch::pipeline::safety::{SafetyChecker, blank};
use sdbatch::pipeline::{LoadOptions, RgbImage};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Model outputs (embeddings, cosines), float32 on the CPU.
const TOL: f64 = 1e-4;
/// Pixel values: PIL's uint8 resampling is reproduced step for step, so the processed values are
/// the same float32 numbers; the tolerance only allows for the last bit.
const PIXEL_TOL: f64 = 1e-6;
/// CLIP score, in score units (100 × cosine).
const SCORE_TOL: f64 = 1e-3;

fn cpu() -> LoadOptions {
    LoadOptions::new(Device::Cpu, Kind::Float)
}

fn json(name: &str) -> serde_json::Value {
    let path = fixtures().join("reference").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `[n, h, w, 3]` or `[h, w, 3]` uint8 → RGB8 images.
fn to_images(t: &Tensor) -> Vec<RgbImage> {
    let t = if t.dim() == 3 {
        t.unsqueeze(0)
    } else {
        t.shallow_clone()
    };
    let (n, h, w, _) = t.size4().unwrap();
    (0..n)
        .map(|i| RgbImage {
            width: w as u32,
            height: h as u32,
            pixels: u8_vec(&t.get(i)),
        })
        .collect()
}

fn checker() -> SafetyChecker {
    SafetyChecker::load(&model_dir(), &cpu())
        .unwrap()
        .expect("tiny-sd has a safety_checker/ folder")
}

/// A model folder with just the checker's two folders, for breaking them.
fn checker_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    for sub in ["safety_checker", "feature_extractor"] {
        copy_dir(&model_dir().join(sub), &dir.join(sub));
    }
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    match SafetyChecker::load(dir, &cpu()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn preprocessing_matches_transformers_pil_backend() {
    let cases = json("clip_preprocess.json");
    assert_eq!(cases["backend"], "pil");
    let r = reference("clip_preprocess.safetensors");
    let mut worst: f64 = 0.0;
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let config: ClipImageProcessorConfig =
            serde_json::from_value(case["config"].clone()).unwrap();
        let processor =
            ClipImageProcessor::new(&config, Path::new("preprocessor_config.json")).unwrap();
        let image = &to_images(&r[case["image"].as_str().unwrap()])[0];
        let ours = processor.preprocess(std::slice::from_ref(image)).unwrap();
        let theirs = r[case["pixel_values"].as_str().unwrap()].unsqueeze(0);
        let d = assert_close(
            &format!(
                "pixel values, {name} ({}x{} -> {:?})",
                image.height,
                image.width,
                theirs.size()
            ),
            &ours,
            &theirs,
            PIXEL_TOL,
        );
        worst = worst.max(d);
    }
    println!("preprocessing: worst max abs diff {worst:.3e} over all cases");
}

#[test]
fn safety_checker_matches_diffusers() {
    let checker = checker();
    let r = reference("safety.safetensors");
    let info = json("safety.json");
    let images = to_images(&r["images"]);
    assert!(images.len() >= 6);

    let pixel_values = checker.processor().preprocess(&images).unwrap();
    assert_close(
        "safety pixel values (feature_extractor, 64x64 -> 32)",
        &pixel_values,
        &r["pixel_values"],
        PIXEL_TOL,
    );
    let _g = tch::no_grad_guard();
    // The model from diffusers' own pixel values, so a preprocessing error cannot hide here.
    let pooled = checker.vision().forward(&r["pixel_values"]).unwrap();
    assert_close(
        "safety vision tower pooled output",
        &pooled,
        &r["pooled_output"],
        TOL,
    );
    let embeds = checker.image_embeds(&r["pixel_values"]).unwrap();
    assert_close("safety image embeds", &embeds, &r["image_embeds"], TOL);
    let (special, concept) = checker.cosine_distances(&embeds).unwrap();
    assert_close("special_cos_dist", &special, &r["special_cos_dist"], TOL);
    assert_close("cos_dist", &concept, &r["cos_dist"], TOL);

    let results = checker.check(&images).unwrap();
    let flags: Vec<u8> = results.iter().map(|r| r.nsfw as u8).collect();
    let expected = u8_vec(&r["has_nsfw_concepts"]);
    println!("has_nsfw_concepts: ours {flags:?}, diffusers {expected:?}");
    assert_eq!(flags, expected, "NSFW flags differ from diffusers");
    assert!(
        flags.contains(&1) && flags.contains(&0),
        "the batch should be mixed"
    );
    let names = info["images"].as_array().unwrap();
    let idx = |key: &str| {
        names
            .iter()
            .position(|n| n == &info[key])
            .unwrap_or_else(|| panic!("{key}"))
    };
    // The image flagged only through a special-care hit's +0.01, and the one with a special-care
    // hit that stays clean.
    let adjusted = idx("flagged_by_adjustment");
    assert!(results[adjusted].nsfw && results[adjusted].special_care);
    let special_clean = idx("special_care_not_flagged");
    assert!(!results[special_clean].nsfw && results[special_clean].special_care);
    let special_flags: Vec<bool> = info["special_care"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    assert_eq!(
        results.iter().map(|r| r.special_care).collect::<Vec<_>>(),
        special_flags
    );

    // The reported scores are diffusers' rounded ones: equal, or one rounding step (0.001) apart
    // where a score sits on a rounding edge.
    let mut exact = 0;
    let mut total = 0;
    for (key, get) in [
        (
            "concept_scores",
            (|r: &sdbatch::pipeline::safety::SafetyResult| r.concept_scores.clone()) as fn(&_) -> _,
        ),
        ("special_scores", |r| r.special_scores.clone()),
    ] {
        let theirs = Vec::<Vec<f32>>::try_from(&r[key]).unwrap();
        for (res, t) in results.iter().zip(&theirs) {
            for (a, b) in get(res).iter().zip(t) {
                total += 1;
                exact += (a == b) as usize;
                assert!((a - b).abs() <= 1.001e-3, "{key}: {a} vs {b}");
            }
        }
    }
    println!("rounded scores: {exact} of {total} identical, the rest within 0.001");

    // Each image's verdict does not depend on its batch.
    for (i, image) in images.iter().enumerate() {
        let alone = checker.check(std::slice::from_ref(image)).unwrap();
        assert_eq!(alone[0].nsfw, results[i].nsfw, "image {i} alone");
    }
    assert!(checker.check(&[]).unwrap().is_empty());
}

/// The `model.fp16.safetensors` variant loads (fp32 compute) and gives the same verdicts: the
/// fixture keeps every score 0.002 from its threshold, more than fp16 weight rounding moves it.
#[test]
fn safety_checker_fp16_variant_loads() {
    let options = LoadOptions {
        variant: Some("fp16".into()),
        ..cpu()
    };
    let checker = SafetyChecker::load(&model_dir(), &options)
        .unwrap()
        .unwrap();
    let r = reference("safety.safetensors");
    let results = checker.check(&to_images(&r["images"])).unwrap();
    let _g = tch::no_grad_guard();
    let embeds = checker.image_embeds(&r["pixel_values"]).unwrap();
    let (_, concept) = checker.cosine_distances(&embeds).unwrap();
    let d = max_abs_diff(&concept, &r["cos_dist"]);
    println!("fp16-variant weights: cos_dist max abs diff {d:.3e} (informational)");
    let flags: Vec<u8> = results.iter().map(|r| r.nsfw as u8).collect();
    assert_eq!(flags, u8_vec(&r["has_nsfw_concepts"]));
}

/// Checkpoints saved with transformers 4 (SD v1-4's checker) name the tower
/// `vision_model.vision_model.…` and carry a `position_ids` buffer; they load to the same model.
#[test]
fn transformers4_checker_layout_loads() {
    let (_t, dir) = checker_copy();
    let file = dir.join("safety_checker/model.safetensors");
    let renamed: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("vision_model.") {
            Some(rest) => (format!("vision_model.vision_model.{rest}"), v),
            None => (k, v),
        })
        .chain(std::iter::once((
            "vision_model.vision_model.embeddings.position_ids".to_string(),
            Tensor::arange(65, (Kind::Int64, Device::Cpu)).unsqueeze(0),
        )))
        .collect();
    std::fs::remove_file(dir.join("safety_checker/model.fp16.safetensors")).unwrap();
    Tensor::write_safetensors(&renamed, &file).unwrap();
    let checker = SafetyChecker::load(&dir, &cpu()).unwrap().unwrap();
    let r = reference("safety.safetensors");
    let _g = tch::no_grad_guard();
    let embeds = checker.image_embeds(&r["pixel_values"]).unwrap();
    assert_close(
        "image embeds, transformers-4 layout",
        &embeds,
        &r["image_embeds"],
        TOL,
    );
}

/// Half precision on the CPU (the CUDA default is fp16): the checker's verdicts are the same (the
/// fixture keeps every score 0.002 from its threshold); the scores move by float rounding only.
#[test]
fn half_precision_agrees() {
    let r = reference("safety.safetensors");
    let images = to_images(&r["images"]);
    let info = json("clip_score.json");
    let prompts: Vec<&str> = info["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for kind in [Kind::Half, Kind::BFloat16] {
        let options = LoadOptions::new(Device::Cpu, kind);
        let checker = SafetyChecker::load(&model_dir(), &options)
            .unwrap()
            .unwrap();
        let flags: Vec<u8> = checker
            .check(&images)
            .unwrap()
            .iter()
            .map(|r| r.nsfw as u8)
            .collect();
        let _g = tch::no_grad_guard();
        let embeds = checker.image_embeds(&r["pixel_values"]).unwrap();
        assert_eq!(embeds.kind(), kind);
        let (_, cos) = checker.cosine_distances(&embeds).unwrap();
        let d = max_abs_diff(&cos, &r["cos_dist"]);
        let scorer = ClipScorer::load(&fixtures().join("tiny-clip"), &options).unwrap();
        let scores = scorer.scores(&prompts, &images).unwrap();
        let ds = max_abs_diff(
            &Tensor::from_slice(&scores),
            &reference("clip_score.safetensors")["score"],
        );
        println!("{kind:?}: cos_dist max abs diff {d:.3e}, CLIP score max abs diff {ds:.3e}");
        if kind == Kind::Half {
            assert_eq!(flags, u8_vec(&r["has_nsfw_concepts"]), "fp16 flags");
            assert!(d < 2e-3 && ds < 0.5, "fp16 drifts: {d:e}, {ds:e}");
        }
    }
}

#[test]
fn blank_replaces_pixels_with_black() {
    let r = reference("safety.safetensors");
    let image = &to_images(&r["images"])[0];
    let b = blank(image);
    assert_eq!((b.width, b.height), (image.width, image.height));
    assert_eq!(b.pixels.len(), image.pixels.len());
    assert!(b.pixels.iter().all(|&p| p == 0));
}

#[test]
fn missing_safety_checker_folder_is_none() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(SafetyChecker::load(tmp.path(), &cpu()).unwrap().is_none());
}

#[test]
fn corrupt_safety_checker_files_are_named() {
    // Unparsable config.
    let (_t, dir) = checker_copy();
    std::fs::write(dir.join("safety_checker/config.json"), "{ not json").unwrap();
    let err = load_err(&dir);
    assert!(err.contains("safety_checker/config.json"), "{err}");

    // A config value that is not implemented: the file and the key.
    let (_t, dir) = checker_copy();
    let path = dir.join("safety_checker/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["vision_config"]["hidden_act"] = serde_json::json!("relu");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("safety_checker/config.json") && err.contains("hidden_act"),
        "{err}"
    );

    // A config that does not describe the weights: the file and the tensor.
    let (_t, dir) = checker_copy();
    let path = dir.join("safety_checker/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["projection_dim"] = serde_json::json!(8);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("visual_projection.weight"),
        "{err}"
    );

    // No weights at all.
    let (_t, dir) = checker_copy();
    std::fs::remove_file(dir.join("safety_checker/model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("safety_checker/model.fp16.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("safety_checker/model.safetensors"), "{err}");

    // The checker needs its feature extractor.
    let (_t, dir) = checker_copy();
    std::fs::remove_dir_all(dir.join("feature_extractor")).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("feature_extractor/preprocessor_config.json"),
        "{err}"
    );

    // A processor whose crop does not fit the tower.
    let (_t, dir) = checker_copy();
    let path = dir.join("feature_extractor/preprocessor_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["crop_size"] = serde_json::json!(48);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("preprocessor_config.json"), "{err}");
}

#[test]
fn clip_score_matches_transformers() {
    let scorer = ClipScorer::load(&fixtures().join("tiny-clip"), &cpu()).unwrap();
    let r = reference("clip_score.safetensors");
    let info = json("clip_score.json");
    let prompts: Vec<&str> = info["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let images = to_images(&reference("safety.safetensors")["images"]);
    assert_eq!(prompts.len(), images.len());

    let ids = scorer.tokenize(&prompts).unwrap();
    assert_eq!(
        Vec::<Vec<i64>>::try_from(&ids).unwrap(),
        Vec::<Vec<i64>>::try_from(&r["input_ids"]).unwrap(),
        "token ids"
    );
    let _g = tch::no_grad_guard();
    let text = scorer.text_embeds(&prompts).unwrap();
    assert_close(
        "CLIP text embeds (get_text_features)",
        &text,
        &r["text_embeds"],
        TOL,
    );
    let image = scorer.image_embeds(&images).unwrap();
    assert_close(
        "CLIP image embeds (get_image_features, gelu tower)",
        &image,
        &r["image_embeds"],
        TOL,
    );

    let raw = Tensor::from_slice(&cosine_scores(&text, &image).unwrap());
    assert_close("100 x cosine", &raw, &r["score_raw"], SCORE_TOL);
    let scores = scorer.scores(&prompts, &images).unwrap();
    assert_close(
        "CLIP score max(100 x cosine, 0)",
        &Tensor::from_slice(&scores),
        &r["score"],
        SCORE_TOL,
    );
    assert!(scores.iter().all(|&s| s >= 0.0));
    let theirs_raw = Vec::<f32>::try_from(&r["score_raw"]).unwrap();
    assert!(
        theirs_raw.iter().any(|&s| s < 0.0) && theirs_raw.iter().any(|&s| s > 0.0),
        "the fixture should have scores of both signs, to check the clamp"
    );
    assert_eq!(scorer.logit_scale(), info["logit_scale"].as_f64().unwrap());

    assert!(scorer.scores(&prompts[..2], &images[..3]).is_err());
    assert!(scorer.scores(&[], &[]).unwrap().is_empty());
}

#[test]
fn clip_model_errors_are_named() {
    let err = ClipScorer::load(Path::new("/nonexistent/clip"), &cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/clip"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("clip");
    copy_dir(&fixtures().join("tiny-clip"), &dir);
    std::fs::write(dir.join("config.json"), "{ \"projection_dim\": ").unwrap();
    let err = ClipScorer::load(&dir, &cpu()).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");

    copy_dir(&fixtures().join("tiny-clip"), &dir);
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    let err = ClipScorer::load(&dir, &cpu()).err().unwrap().to_string();
    assert!(err.contains("vocab.json"), "{err}");
}
