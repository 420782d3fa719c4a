//! Image files read back by readers that share no code with the writer: the `image` crate's
//! decoders for pixels, `png`'s chunk reader for PNG text, kamadak-exif for EXIF, and Pillow
//! (from the project's venv) for everything AUTOMATIC1111 reads (`info['parameters']`, the EXIF
//! UserComment, XMP) and for JPEG quantization tables.
mod common;

use sdbatch::output::{
    AI_MARKING_XMP, Embedded, Encoding, ImageFormat, Infotext, TRAINED_ALGORITHMIC_MEDIA,
    a1111_parameters, encode,
};
use sdbatch::pipeline::adapters::LoraWeight;
use sdbatch::pipeline::prompt_weights::PromptSyntax;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{GenerateParams, RgbImage};
use serde_json::Value;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A photo-like test image: smooth gradients with some texture, so JPEG has work to do.
fn picture(width: u32, height: u32) -> RgbImage {
    let mut pixels = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let t = ((x * 7 + y * 13) % 17) as u8;
            pixels.extend([
                (x * 255 / width) as u8 ^ t,
                (y * 255 / height) as u8,
                ((x + y) * 2) as u8 / 2 + t,
            ]);
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

fn params() -> GenerateParams {
    GenerateParams {
        steps: 30,
        guidance_scale: 7.5,
        width: 96,
        height: 64,
        scheduler: SchedulerKind::EulerAncestral,
        clip_skip: 2,
        guidance_rescale: 0.0,
        prompt_syntax: PromptSyntax::A1111,
        loras: vec![LoraWeight {
            name: "style".into(),
            weight: 0.7,
        }],
    }
}

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} missing: scripts/setup.sh makes the venv (Pillow reads the files back)",
        venv.display()
    );
    venv
}

/// Pillow's view of each `(file, quality)`.
fn pillow(files: &[(PathBuf, Option<u8>)]) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/read_image_metadata.py");
    let mut cmd = Command::new(python());
    cmd.arg(script);
    for (f, q) in files {
        cmd.arg(f).arg(q.map_or("-".to_string(), |q| q.to_string()));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The EXIF UserComment as kamadak-exif reads it, decoded as piexif does.
fn exif_user_comment(bytes: &[u8]) -> String {
    let exif = exif::Reader::new()
        .read_from_container(&mut Cursor::new(bytes))
        .unwrap();
    let field = exif
        .get_field(exif::Tag::UserComment, exif::In::PRIMARY)
        .expect("UserComment");
    let exif::Value::Undefined(raw, _) = &field.value else {
        panic!("UserComment is {:?}", field.value)
    };
    assert_eq!(&raw[..8], b"UNICODE\0", "A1111/piexif's prefix");
    let units: Vec<u16> = raw[8..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).unwrap()
}

/// PNG text chunks (tEXt and iTXt) by keyword, with the kind, as the `png` crate reads them.
fn png_texts(bytes: &[u8]) -> Vec<(String, &'static str, String)> {
    let mut reader = png::Decoder::new(Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();
    // Text after the image data would be read by finish(); the writer puts it before.
    let info = reader.info();
    let mut out: Vec<(String, &'static str, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), "tEXt", t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), "iTXt", t.get_text().unwrap()));
    }
    out
}

fn text<'a>(texts: &'a [(String, &'static str, String)], key: &str) -> Option<(&'a str, &'a str)> {
    texts
        .iter()
        .find(|t| t.0 == key)
        .map(|t| (t.1, t.2.as_str()))
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn every_format_reads_back_with_parameters_and_marking() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(96, 64);
    let p = params();
    // A Latin-1 prompt (tEXt) and one that is not (iTXt), with a line break to flatten.
    let prompts = [
        ("latin1", "a red sneaker, café\nstudio light"),
        ("utf8", "a red sneaker, 日本の庭 ✓"),
    ];
    let mut files = Vec::new();
    let mut expected = Vec::new();
    for (name, prompt) in prompts {
        let info = Infotext {
            prompt,
            negative_prompt: Some("blurry"),
            seed: 4242,
            params: &p,
            model: "/models/sd-v1-5",
            model_sha256: Some(&"ab12".repeat(16)),
            denoising_strength: None,
            hires: None,
            mask_blur: None,
            padding_mask_crop: None,
        };
        let parameters = a1111_parameters(&info);
        let record = serde_json::json!({"prompt": prompt, "seed": 4242}).to_string();
        for format in ImageFormat::ALL {
            for ai_marking in [true, false] {
                let encoding = Encoding::new(format, None).unwrap();
                let meta = Embedded {
                    parameters: &parameters,
                    record: Some(&record),
                    ai_marking,
                };
                let bytes = encode(&img, encoding, &meta).unwrap();
                let path = dir
                    .path()
                    .join(format!("{name}-{ai_marking}.{}", format.extension()));
                std::fs::write(&path, &bytes).unwrap();

                // Pixels, by the image crate's decoders.
                let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
                assert_eq!(decoded.dimensions(), (96, 64));
                match format {
                    ImageFormat::Jpeg => {
                        let d = mean_abs_diff(decoded.as_raw(), &img.pixels);
                        assert!(d < 6.0, "JPEG q90 off by {d} on average");
                    }
                    _ => assert_eq!(decoded.as_raw(), &img.pixels, "{format:?} is lossless"),
                }
                // Metadata, by readers independent of the writer.
                match format {
                    ImageFormat::Png => {
                        let texts = png_texts(&bytes);
                        let kind = if name == "latin1" { "tEXt" } else { "iTXt" };
                        assert_eq!(
                            text(&texts, "parameters"),
                            Some((kind, parameters.as_str()))
                        );
                        assert_eq!(text(&texts, "sdbatch"), Some(("iTXt", record.as_str())));
                        assert_eq!(
                            text(&texts, "XML:com.adobe.xmp").map(|t| t.1),
                            ai_marking.then_some(AI_MARKING_XMP)
                        );
                    }
                    _ => assert_eq!(exif_user_comment(&bytes), parameters, "{format:?}"),
                }
                if format == ImageFormat::Jpeg {
                    // zune-jpeg (the image crate's JPEG decoder) finds the XMP segment.
                    use image::ImageDecoder;
                    let mut dec =
                        image::codecs::jpeg::JpegDecoder::new(Cursor::new(&bytes)).unwrap();
                    let xmp = dec.xmp_metadata().unwrap();
                    assert_eq!(
                        xmp.as_deref(),
                        ai_marking.then_some(AI_MARKING_XMP.as_bytes())
                    );
                }
                files.push((path, None));
                expected.push((format, ai_marking, parameters.clone(), record.clone()));
            }
        }
    }
    // The same files through Pillow, which is what AUTOMATIC1111 reads them with.
    let seen = pillow(&files);
    assert_eq!(seen.len(), expected.len());
    for (got, (format, ai_marking, parameters, record)) in seen.iter().zip(&expected) {
        let pil_format = match format {
            ImageFormat::Png => "PNG",
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Webp => "WEBP",
        };
        assert_eq!(got["format"], pil_format, "{got}");
        assert_eq!(got["size"], serde_json::json!([96, 64]));
        assert_eq!(got["parameters"], parameters.as_str(), "{format:?}");
        if *format == ImageFormat::Png {
            assert_eq!(got["record"], record.as_str());
        }
        let marked = got["xmp"].as_str().is_some_and(|x| {
            x.contains(&format!(
                "DigitalSourceType=\"{TRAINED_ALGORITHMIC_MEDIA}\""
            ))
        });
        assert_eq!(marked, *ai_marking, "{format:?}: {}", got["xmp"]);
    }
    // The infotext as A1111 lays it out (prompt line flattened).
    let (_, _, first, _) = &expected[0];
    assert!(
        first.starts_with(
            "a red sneaker, café studio light <lora:style:0.7>\nNegative prompt: blurry\n\
             Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 4242, Size: 96x64, \
             Model hash: ab12ab12ab, Model: sd-v1-5, Clip skip: 2, "
        ),
        "{first}"
    );
}

#[test]
fn jpeg_quality_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(128, 96);
    let meta = Embedded {
        parameters: "a cat\nSteps: 1",
        record: None,
        ai_marking: true,
    };
    let mut files = Vec::new();
    let mut sizes = Vec::new();
    for q in [30u8, 60, 90, 100] {
        let encoding = Encoding::new(ImageFormat::Jpeg, Some(u32::from(q))).unwrap();
        let bytes = encode(&img, encoding, &meta).unwrap();
        sizes.push(bytes.len());
        let path = dir.path().join(format!("q{q}.jpg"));
        std::fs::write(&path, &bytes).unwrap();
        files.push((path, Some(q)));
    }
    assert!(sizes.windows(2).all(|w| w[0] < w[1]), "sizes {sizes:?}");
    // Pillow (libjpeg) saving the same pixels at the same quality picks the same quantization
    // tables: the IJG quality scale, as the encoder promises.
    for (got, (_, q)) in pillow(&files).iter().zip(&files) {
        assert!(got["quantization"].is_object());
        assert_eq!(
            got["quantization"], got["pillow_quantization"],
            "quality {q:?}"
        );
    }
    // The default is 90.
    let default = encode(&img, Encoding::new(ImageFormat::Jpeg, None).unwrap(), &meta).unwrap();
    assert_eq!(default.len(), sizes[2]);
}

/// `sdbatch generate --format/--quality/--ai-marking`: the files and their sidecars.
#[test]
fn generate_writes_every_format_with_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        serde_json::json!({"id": "a", "prompt": "a kettle", "negative_prompt": "blurry", "seed": 7})
            .to_string(),
    )
    .unwrap();
    let model = common::model_dir();
    let run = |out: &Path, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .args(["generate", "--model", model.to_str().unwrap(), "--prompts"])
            .arg(&prompts)
            .arg("--out")
            .arg(out)
            .args(["--steps", "2", "--scheduler", "dpmpp_2m_karras"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let mut files = Vec::new();
    for (name, extra, file, quality) in [
        ("png", &[][..], "a.png", None),
        (
            "jpeg",
            &["--format", "jpeg", "--quality", "85"][..],
            "a.jpg",
            Some(85),
        ),
        (
            "webp",
            &["--format", "webp", "--ai-marking", "false"][..],
            "a.webp",
            None,
        ),
    ] {
        let out = dir.path().join(name);
        let (ok, stderr) = run(&out, extra);
        assert!(ok, "{name}: {stderr}");
        assert!(out.join("a.json").is_file(), "{name}: the sidecar stays");
        files.push((out.join(file), quality));
    }
    let seen = pillow(&files);
    let sidecar: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("png/a.json")).unwrap())
            .unwrap();
    for (got, (path, _)) in seen.iter().zip(&files) {
        let parameters = got["parameters"].as_str().unwrap_or_default();
        assert!(
            parameters.starts_with(
                "a kettle\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, \
                 Schedule type: Karras, CFG scale: 7.5, Seed: 7, Size: "
            ),
            "{}: {parameters}",
            path.display()
        );
        assert!(parameters.contains(", Model hash: "), "{parameters}");
        let marked = got["xmp"]
            .as_str()
            .is_some_and(|x| x.contains(TRAINED_ALGORITHMIC_MEDIA));
        assert_eq!(marked, !path.ends_with("a.webp"), "{}", path.display());
    }
    // The PNG embeds the sidecar, without what describes the run rather than the image.
    let record: Value = serde_json::from_str(seen[0]["record"].as_str().unwrap()).unwrap();
    let mut want = sidecar.clone();
    let obj = want.as_object_mut().unwrap();
    assert!(obj.remove("timings").is_some() && obj.remove("batch_size").is_some());
    assert_eq!(record, want);
    assert_eq!(seen[1]["quantization"], seen[1]["pillow_quantization"]);
    // Bad combinations are refused before the model loads.
    for extra in [
        &["--format", "webp", "--quality", "80"][..],
        &["--format", "jpeg", "--quality", "0"][..],
        &["--format", "gif"][..],
    ] {
        let (ok, stderr) = run(&dir.path().join("bad"), extra);
        assert!(!ok, "{extra:?} accepted");
        assert!(
            stderr.contains("quality") || stderr.contains("gif"),
            "{stderr}"
        );
    }
}
