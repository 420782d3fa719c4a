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
        (&["--scheduler", "lms"][..], "unknown scheduler"),
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
