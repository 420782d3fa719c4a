//! The `sdbatch` binary end to end on the tiny model: outputs, sidecars, and clear errors for bad
//! input before any model is loaded.
mod common;

use std::path::Path;
use std::process::{Command, Output};

fn sdbatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sdbatch")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn generate(prompts: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = common::model_dir();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "3",
    ];
    args.extend_from_slice(extra);
    sdbatch(&args)
}

#[test]
fn generate_writes_pngs_and_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"bag\", \"prompt\": \"a leather handbag\", \"seed\": 5}\n\n{\"prompt\": \"a red sneaker\", \"negative_prompt\": \"blurry\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = generate(
        &prompts,
        &out,
        &[
            "--batch-size",
            "2",
            "--seed",
            "100",
            "--images-per-prompt",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    for stem in ["bag_0", "bag_1", "1_0", "1_1"] {
        let png = out.join(format!("{stem}.png"));
        let img = image::open(&png)
            .unwrap_or_else(|e| panic!("{}: {e}", png.display()))
            .to_rgb8();
        assert_eq!(img.dimensions(), (64, 64), "native size of the tiny model");
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("{stem}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(meta["steps"], 3);
        assert_eq!(meta["scheduler"], "pndm");
        assert_eq!(meta["dtype"], "fp32");
        assert!(meta["timings"]["total_ms"].as_f64().unwrap() > 0.0);
    }
    let seed = |stem: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("{stem}.json"))).unwrap(),
        )
        .unwrap();
        v["seed"].as_u64().unwrap()
    };
    // Explicit seed 5 (+n per image); entry 1 without a seed: 100 + 1 * 2 (+n).
    assert_eq!(
        [seed("bag_0"), seed("bag_1"), seed("1_0"), seed("1_1")],
        [5, 6, 102, 103]
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("1_0.json")).unwrap()).unwrap();
    assert_eq!(meta["negative_prompt"], "blurry");
}

#[test]
fn same_seed_same_png_across_runs_and_batch_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a small house\na tall tree\n").unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    assert!(
        generate(&prompts, &a, &["--seed", "9", "--batch-size", "1"])
            .status
            .success()
    );
    assert!(
        generate(&prompts, &b, &["--seed", "9", "--batch-size", "1"])
            .status
            .success()
    );
    assert_eq!(
        std::fs::read(a.join("1.png")).unwrap(),
        std::fs::read(b.join("1.png")).unwrap()
    );
}

#[test]
fn bad_prompt_files_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"ok\"}\n{\"prompt\": \"x\", \"seed\": \"abc\"}\n",
    )
    .unwrap();
    let o = generate(&prompts, &dir.path().join("out"), &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("p.jsonl:2:"), "{err}");

    let missing = dir.path().join("missing.txt");
    let o = generate(&missing, &dir.path().join("out"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.txt"), "{}", stderr(&o));
}

#[test]
fn bad_flags_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    let out = dir.path().join("out");
    for (flags, needle) in [
        (&["--width", "100"][..], "multiples of 8"),
        (&["--guidance=-1"][..], "--guidance"),
        (&["--scheduler", "dpm_adaptive"][..], "unknown scheduler"),
        (&["--steps", "0"][..], "steps"),
        (
            &["--dtype", "fp16", "--device", "cpu"][..],
            "needs a CUDA device",
        ),
        (&["--device", "tpu"][..], "unknown device"),
    ] {
        let o = generate(&prompts, &out, flags);
        assert!(!o.status.success(), "{flags:?} accepted");
        assert!(stderr(&o).contains(needle), "{flags:?}: {}", stderr(&o));
    }
    assert!(!out.join("0.png").exists());
}

#[test]
fn bench_prints_a_table() {
    let model = common::model_dir();
    let o = sdbatch(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--batch-sizes",
        "1,2",
        "--steps",
        "2",
        "--warmup",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    println!("{table}");
    assert!(
        table.contains("images/s") && table.contains("ms/UNet step"),
        "{table}"
    );
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.trim_start().starts_with(['1', '2']))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
}

/// The safety checker and CLIP score through `generate`: the 3-prompt reference batch (whose second
/// image the tiny checker flags in diffusers) with each policy. Flagged images are kept (flag),
/// black (blank) or not written (drop); the others are the same bytes in every run; every sidecar
/// has its verdict and CLIP score.
#[test]
fn generate_safety_policies_and_clip_scores() {
    let dir = tempfile::tempdir().unwrap();
    let meta_json = common::meta();
    let b = &meta_json["batch"];
    let prompts = dir.path().join("p.jsonl");
    let lines: Vec<String> = (0..3)
        .map(|i| {
            serde_json::json!({
                "prompt": b["prompts"][i], "negative_prompt": b["negative_prompts"][i], "seed": b["seeds"][i],
            })
            .to_string()
        })
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let model = common::model_dir();
    let clip = common::fixtures().join("tiny-clip");
    let steps = b["num_inference_steps"].to_string();
    let run = |policy: &str| {
        let out = dir.path().join(policy);
        let o = sdbatch(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            &steps,
            "--batch-size",
            "3",
            "--safety-checker",
            "--safety-policy",
            policy,
            "--clip-model",
            clip.to_str().unwrap(),
            "--min-clip-score",
            "0.5",
        ]);
        assert!(o.status.success(), "{policy}: {}", stderr(&o));
        out
    };
    let (flag, blank, drop) = (run("flag"), run("blank"), run("drop"));
    let meta = |dir: &Path, i: usize| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{i}.json"))).unwrap())
            .unwrap()
    };
    let mut flagged = Vec::new();
    for i in 0..3 {
        let m = meta(&flag, i);
        let nsfw = m["nsfw"].as_bool().expect("verdict in the sidecar");
        let score = m["clip_score"].as_f64().expect("clip score in the sidecar");
        assert!((0.0..=100.0).contains(&score));
        assert_eq!(m["low_clip_score"].as_bool(), Some(score < 0.5));
        let png = format!("{i}.png");
        if nsfw {
            flagged.push(i);
            assert_eq!(m["safety_action"], "flag");
            assert!(flag.join(&png).exists());
            assert_eq!(meta(&blank, i)["safety_action"], "blank");
            let black = image::open(blank.join(&png)).unwrap().to_rgb8();
            assert!(
                black.pixels().all(|p| p.0 == [0, 0, 0]),
                "blanked image {i} is not black"
            );
            assert!(!drop.join(&png).exists(), "dropped image {i} was written");
            assert_eq!(meta(&drop, i)["safety_action"], "drop");
        } else {
            assert!(m.get("safety_action").is_none());
            let bytes = std::fs::read(flag.join(&png)).unwrap();
            assert_eq!(bytes, std::fs::read(blank.join(&png)).unwrap());
            assert_eq!(bytes, std::fs::read(drop.join(&png)).unwrap());
        }
    }
    println!("safety checker: flagged {flagged:?} of the 3 reference images");
    assert_eq!(
        flagged,
        vec![1],
        "diffusers flags exactly the second image of this batch"
    );
}

#[test]
fn generate_takes_a1111_weighted_prompts_and_names_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"w\", \"prompt\": \"a (red:1.3) [leather] handbag, BREAK studio light\", \"seed\": 5}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = generate(&prompts, &out, &["--prompt-syntax", "a1111"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("w.json")).unwrap()).unwrap();
    assert_eq!(sidecar["prompt_syntax"], "a1111");
    assert!(out.join("w.png").is_file());

    std::fs::write(
        &prompts,
        "{\"id\": \"u\", \"prompt\": \"a (red handbag\"}\n",
    )
    .unwrap();
    let o = generate(
        &prompts,
        &dir.path().join("out2"),
        &["--prompt-syntax", "a1111"],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("character"), "{err}");
    assert!(!dir.path().join("out2/u.png").exists());
}
