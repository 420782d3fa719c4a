//! Writing generated images: PNG, JPEG or WebP with the generation parameters embedded, and (for
//! `sdbatch generate`) a JSON sidecar with everything needed to reproduce it.
//!
//! Every file carries:
//! - AUTOMATIC1111's "infotext" ([`a1111_parameters`]), which A1111's PNG Info tab, ComfyUI
//!   loaders, Civitai and most image browsers read: a PNG `tEXt` chunk `parameters` (`iTXt` when
//!   the text is not Latin-1, as Pillow writes it for A1111), in JPEG and WebP an EXIF
//!   `UserComment` written as A1111 does through `piexif` (`UNICODE\0` + UTF-16BE, big-endian
//!   TIFF);
//! - in PNG, the JSON record (sidecar or event record) as an `iTXt` chunk `sdbatch`;
//! - unless turned off, the AI marking of the EU AI Act (Art. 50(2)): XMP with IPTC
//!   `Iptc4xmpExt:DigitalSourceType` = `trainedAlgorithmicMedia` (PNG `iTXt`
//!   `XML:com.adobe.xmp`, JPEG APP1, WebP `XMP ` chunk).
use crate::error::{Error, Result};
use crate::pipeline::prompt_weights::PromptSyntax;
use crate::pipeline::schedulers::SchedulerKind;
use crate::pipeline::{GenerateParams, RgbImage, Timings};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// The file formats images are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub const ALL: [ImageFormat; 3] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp];

    /// The name messages and flags use (`output.format`, `--format`).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }

    /// File extension of object keys and files, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// Whether `key` (or a file name) ends in one of the formats' extensions.
    pub fn is_image_key(key: &str) -> bool {
        Self::ALL.iter().any(|f| {
            key.strip_suffix(f.extension())
                .is_some_and(|k| k.ends_with('.'))
        })
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = ();

    /// Exact, lowercase names only: `output.format` is as strict as every other field.
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|f| f.name() == s).ok_or(())
    }
}

/// JPEG quality when none is given: the usual default of libjpeg-based tools is 75; 90 keeps
/// the fine texture of generated images without visible blocking at about a third of the PNG.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// Format and quality of a batch's or a run's images.
///
/// `quality` (1..=100) applies to JPEG only. WebP is written lossless: the `image` crate's WebP
/// encoder (pure Rust, image-webp) has no lossy mode, and a lossy WebP would need libwebp, a C
/// library with a record of memory-safety bugs (CVE-2023-4863) built into every worker. A
/// `quality` with `png` or `webp` is refused rather than ignored, so a later lossy WebP can give
/// it a meaning without changing what existing messages do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Encoding {
    pub format: ImageFormat,
    /// `Some` for JPEG only (the default filled in), `None` for the lossless formats.
    pub quality: Option<u8>,
}

impl Encoding {
    pub const PNG: Encoding = Encoding {
        format: ImageFormat::Png,
        quality: None,
    };

    /// Checks a format and an optional quality; the error says what is wrong, for people.
    pub fn new(format: ImageFormat, quality: Option<u32>) -> Result<Self, String> {
        match (format, quality) {
            (ImageFormat::Jpeg, q) => {
                let q = q.unwrap_or(u32::from(DEFAULT_JPEG_QUALITY));
                match u8::try_from(q) {
                    Ok(q @ 1..=100) => Ok(Self {
                        format,
                        quality: Some(q),
                    }),
                    _ => Err(format!("quality {q} must be in 1..=100")),
                }
            }
            (_, None) => Ok(Self {
                format,
                quality: None,
            }),
            (_, Some(q)) => Err(format!(
                "quality {q} applies to jpeg only: {} is written lossless",
                format.name()
            )),
        }
    }

    /// `{stem}.{extension}`.
    pub fn file_name(self, stem: &str) -> String {
        format!("{stem}.{}", self.format.extension())
    }
}

/// What the sidecar records for one image.
#[derive(Debug, Clone, Serialize)]
pub struct Sidecar<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: i64,
    pub height: i64,
    pub scheduler: &'a str,
    /// A hires fix's second pass (width and height above are the final size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hires: Option<crate::pipeline::hires::Hires>,
    /// img2img: the init image file and the strength.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_image: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Inpainting: the mask's Gaussian blur radius, when not 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<f64>,
    /// Inpainting: diffusers' `padding_mask_crop`, when used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub padding_mask_crop: Option<u32>,
    /// Clip skip when other than 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<usize>,
    /// Guidance rescale when used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance_rescale: Option<f64>,
    /// The prompt syntax when not `plain`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_syntax: Option<&'a str>,
    /// The LoRAs fused, when any.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub loras: &'a [crate::pipeline::adapters::LoraWeight],
    pub model: &'a str,
    pub device: &'a str,
    pub dtype: &'a str,
    /// Timings of the batch the image was made in.
    pub batch_size: usize,
    pub timings: &'a Timings,
    /// Safety checker verdict (absent when it did not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nsfw: Option<bool>,
    /// flag, blank or drop: what was done with a flagged image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safety_action: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_clip_score: Option<bool>,
}

/// What goes into an image file besides its pixels.
#[derive(Debug, Clone, Copy)]
pub struct Embedded<'a> {
    /// A1111's infotext ([`a1111_parameters`]).
    pub parameters: &'a str,
    /// The JSON record (PNG only: an `iTXt` chunk `sdbatch`).
    pub record: Option<&'a str>,
    /// Write the XMP AI marking (`DigitalSourceType` = `trainedAlgorithmicMedia`).
    pub ai_marking: bool,
}

/// The IPTC digital source type of media made by a generative model.
pub const TRAINED_ALGORITHMIC_MEDIA: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// The XMP packet marking an image as AI-generated (IPTC Photo Metadata, Digital Source Type). A
/// constant: no producer text goes into it, so nothing needs XML escaping.
pub const AI_MARKING_XMP: &str = concat!(
    "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n",
    "<x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n",
    " <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n",
    "  <rdf:Description rdf:about=\"\"\n",
    "    xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\"\n",
    "    Iptc4xmpExt:DigitalSourceType=",
    "\"http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia\"/>\n",
    " </rdf:RDF>\n",
    "</x:xmpmeta>\n",
    "<?xpacket end=\"r\"?>"
);

/// Header of a JPEG APP1 segment holding XMP (XMP Specification Part 3, 1.1.3).
const JPEG_XMP_HEADER: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// Longest prompt or negative prompt copied into the infotext, in bytes. Prompts are producer
/// text and JPEG holds the EXIF in one 64 KiB APP1 segment, UTF-16 at that: two prompts of
/// this size stay well inside it. The worker's own prompt limit (2 KiB by default) is lower.
pub const MAX_INFOTEXT_PROMPT_BYTES: usize = 8 * 1024;

/// The parameters of one image, as AUTOMATIC1111's infotext describes them.
#[derive(Debug, Clone, Copy)]
pub struct Infotext<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub seed: u64,
    pub params: &'a GenerateParams,
    /// The model as configured (a folder or a file); the infotext names its file stem.
    pub model: &'a str,
    /// SHA-256 (hex) of the model's files (`StableDiffusion::content_sha256`), when known.
    pub model_sha256: Option<&'a str>,
    /// img2img: the strength (A1111's `Denoising strength`).
    pub denoising_strength: Option<f64>,
    /// A hires fix's second pass (`params` is the first pass).
    pub hires: Option<crate::pipeline::hires::Hires>,
    /// Inpainting: the mask's Gaussian blur radius (A1111's `Mask blur`); written when not 0.
    pub mask_blur: Option<f64>,
    /// Inpainting: the crop's padding (`padding_mask_crop`; A1111's "Only masked" inpaint area
    /// and its `Masked area padding`).
    pub padding_mask_crop: Option<u32>,
}

/// A1111's display name of a scheduler (`modules/sd_samplers_*.py`) and, for the Karras
/// variants, its schedule type (A1111 1.9+ writes `Sampler: DPM++ 2M, Schedule type: Karras`;
/// older readers split the legacy `DPM++ 2M Karras` the same way). PNDM has no A1111 sampler
/// (its PLMS is a different implementation), so it keeps diffusers' name.
pub fn a1111_sampler(kind: SchedulerKind) -> (&'static str, Option<&'static str>) {
    use SchedulerKind as K;
    match kind {
        K::Pndm => ("PNDM", None),
        K::Ddim => ("DDIM", None),
        K::Euler => ("Euler", None),
        K::EulerKarras => ("Euler", Some("Karras")),
        K::EulerAncestral => ("Euler a", None),
        K::EulerAncestralKarras => ("Euler a", Some("Karras")),
        K::Heun => ("Heun", None),
        K::HeunKarras => ("Heun", Some("Karras")),
        K::Lms => ("LMS", None),
        K::LmsKarras => ("LMS", Some("Karras")),
        K::DpmSolverPp2m => ("DPM++ 2M", None),
        K::DpmSolverPp2mKarras => ("DPM++ 2M", Some("Karras")),
        K::UniPc => ("UniPC", None),
        K::UniPcKarras => ("UniPC", Some("Karras")),
        K::Lcm => ("LCM", None),
    }
}

/// A prompt as one infotext line: line breaks and other control characters become spaces (the
/// CLIP tokenizer reads any whitespace run as one space, so the prompt means the same; a line
/// break would let a prompt line such as `Negative prompt: …` be read as a field), cut to
/// [`MAX_INFOTEXT_PROMPT_BYTES`] on a character boundary.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_INFOTEXT_PROMPT_BYTES));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_INFOTEXT_PROMPT_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// A1111's `quote`: a value with `,`, `:` or a line break is written as a JSON string.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::Value::from(value).to_string()
    } else {
        value.to_string()
    }
}

/// AUTOMATIC1111's infotext (`processing.create_infotext`): the prompt (with the LoRAs as
/// `<lora:name:weight>` tags, which is how A1111 states them), `Negative prompt: …` when there
/// is one, and one line of `Key: value` pairs in A1111's order.
pub fn a1111_parameters(info: &Infotext) -> String {
    let p = info.params;
    let mut out = one_line(info.prompt);
    for lora in &p.loras {
        let _ = write!(out, " <lora:{}:{}>", lora.name, lora.weight);
    }
    if let Some(neg) = info
        .negative_prompt
        .map(one_line)
        .filter(|n| !n.trim().is_empty())
    {
        let _ = write!(out, "\nNegative prompt: {neg}");
    }
    let (sampler, schedule) = a1111_sampler(p.scheduler);
    let _ = write!(out, "\nSteps: {}, Sampler: {sampler}", p.steps);
    if let Some(schedule) = schedule {
        let _ = write!(out, ", Schedule type: {schedule}");
    }
    let _ = write!(
        out,
        ", CFG scale: {}, Seed: {}, Size: {}x{}",
        p.guidance_scale, info.seed, p.width, p.height
    );
    if let Some(hash) = info.model_sha256.and_then(|h| h.get(..10)) {
        let _ = write!(out, ", Model hash: {hash}");
    }
    let model = Path::new(info.model)
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    if !model.is_empty() {
        let _ = write!(out, ", Model: {}", quote(&one_line(&model)));
    }
    if let Some(strength) = info.denoising_strength {
        let _ = write!(out, ", Denoising strength: {strength}");
    }
    if let Some(h) = info.hires {
        // A1111's keys for its "Hires. fix" (Size stays the first pass's, as A1111 writes it).
        let _ = write!(
            out,
            ", Denoising strength: {}, Hires upscale: {}, Hires steps: {}, Hires upscaler: {}",
            h.strength,
            h.scale,
            h.steps,
            h.upscaler.a1111_name()
        );
    }
    if p.clip_skip > 1 {
        let _ = write!(out, ", Clip skip: {}", p.clip_skip);
    }
    // A1111 puts it in its extra generation parameters, which follow Clip skip; the
    // extension's CFG Rescale is added later, during processing.
    if let Some(blur) = info.mask_blur.filter(|&b| b != 0.0) {
        let _ = write!(out, ", Mask blur: {blur}");
    }
    if let Some(pad) = info.padding_mask_crop {
        let _ = write!(
            out,
            ", Inpaint area: Only masked, Masked area padding: {pad}"
        );
    }
    if p.guidance_rescale != 0.0 {
        // The name the sd-webui-cfg-rescale extension writes.
        let _ = write!(out, ", CFG Rescale φ: {}", p.guidance_rescale);
    }
    let bracketed = |t: &str| t.contains(['(', '[']);
    if p.prompt_syntax == PromptSyntax::Plain
        && (bracketed(info.prompt) || info.negative_prompt.is_some_and(bracketed))
    {
        // A1111 would read brackets as weights; this prompt was read as plain text.
        let _ = write!(out, ", Prompt syntax: plain");
    }
    let _ = write!(out, ", Version: sdbatch {}", env!("CARGO_PKG_VERSION"));
    out
}

/// The EXIF (a TIFF structure, as the JPEG APP1 segment and the WebP `EXIF` chunk hold it) with
/// one tag, `UserComment`, holding `text` the way A1111 writes it through piexif: big-endian
/// TIFF, `UNICODE\0` then UTF-16BE. Written here rather than with a crate: it is two fixed IFD
/// entries, and the tests read it back with kamadak-exif and Pillow, which share no code with it.
pub fn exif_user_comment(text: &str) -> Vec<u8> {
    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    // Header (8) | IFD0: 1 entry (2 + 12 + 4) | Exif IFD: 1 entry (2 + 12 + 4) | comment.
    const EXIF_IFD: u32 = 8 + 18;
    const COMMENT: u32 = EXIF_IFD + 18;
    let mut out = Vec::with_capacity(COMMENT as usize + comment.len());
    out.extend_from_slice(b"MM\0\x2a");
    out.extend_from_slice(&8u32.to_be_bytes());
    let mut ifd = |tag: u16, kind: u16, count: u32, value: u32| {
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&tag.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    };
    // ExifIFDPointer (LONG), then UserComment (UNDEFINED) pointing at the comment. The comment
    // is bounded by MAX_INFOTEXT_PROMPT_BYTES, far from u32::MAX.
    ifd(0x8769, 4, 1, EXIF_IFD);
    ifd(0x9286, 7, comment.len() as u32, COMMENT);
    out.extend_from_slice(&comment);
    out
}

fn encode_error(format: ImageFormat) -> impl Fn(String) -> Error {
    move |message| Error::Encode {
        format: format.name(),
        message,
    }
}

/// Encodes `image` in `encoding` with `meta` embedded.
pub fn encode(image: &RgbImage, encoding: Encoding, meta: &Embedded) -> Result<Vec<u8>> {
    let fail = encode_error(encoding.format);
    let expected = image.width as usize * image.height as usize * 3;
    if image.pixels.len() != expected {
        return Err(fail(format!(
            "{} bytes of pixels for {}x{} RGB",
            image.pixels.len(),
            image.width,
            image.height
        )));
    }
    match encoding.format {
        ImageFormat::Png => encode_png_with(image, meta).map_err(|e| fail(e.to_string())),
        ImageFormat::Jpeg => {
            let quality = encoding.quality.unwrap_or(DEFAULT_JPEG_QUALITY);
            encode_jpeg(image, quality, meta).map_err(fail)
        }
        ImageFormat::Webp => encode_webp(image, meta).map_err(|e| fail(e.to_string())),
    }
}

fn encode_png_with(
    image: &RgbImage,
    meta: &Embedded,
) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // What image's PngEncoder uses by default, so files keep their size.
    encoder.set_compression(png::Compression::Balanced);
    encoder.set_filter(png::Filter::Adaptive);
    // tEXt is Latin-1: Pillow (so A1111) writes `parameters` as tEXt when it can and iTXt
    // (UTF-8) otherwise; readers take either.
    if !meta.parameters.is_empty() {
        if meta.parameters.chars().all(|c| u32::from(c) <= 0xff) {
            encoder.add_text_chunk("parameters".into(), meta.parameters.into())?;
        } else {
            encoder.add_itxt_chunk("parameters".into(), meta.parameters.into())?;
        }
    }
    if let Some(record) = meta.record {
        encoder.add_itxt_chunk("sdbatch".into(), record.into())?;
    }
    if meta.ai_marking {
        encoder.add_itxt_chunk("XML:com.adobe.xmp".into(), AI_MARKING_XMP.into())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&image.pixels)?;
    writer.finish()?;
    Ok(out)
}

fn encode_jpeg(
    image: &RgbImage,
    quality: u8,
    meta: &Embedded,
) -> std::result::Result<Vec<u8>, String> {
    use image::ImageEncoder as _;
    use img_parts::jpeg::{Jpeg, JpegSegment, markers};
    let mut plain = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, quality);
    if !meta.parameters.is_empty() {
        encoder
            .set_exif_metadata(exif_user_comment(meta.parameters))
            .map_err(|e| e.to_string())?;
    }
    encoder
        .write_image(
            &image.pixels,
            image.width,
            image.height,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| e.to_string())?;
    if !meta.ai_marking {
        return Ok(plain);
    }
    // image's encoder has no XMP setter: add the APP1 segment after its APPn header segments
    // (JFIF first, then EXIF, as readers expect).
    let mut jpeg = Jpeg::from_bytes(plain.into()).map_err(|e| e.to_string())?;
    let mut xmp = JPEG_XMP_HEADER.to_vec();
    xmp.extend_from_slice(AI_MARKING_XMP.as_bytes());
    let segments = jpeg.segments_mut();
    let at = segments
        .iter()
        .position(|s| !(markers::APP0..=markers::APP15).contains(&s.marker()))
        .unwrap_or(segments.len());
    segments.insert(
        at,
        JpegSegment::new_with_contents(markers::APP1, xmp.into()),
    );
    let mut out = Vec::new();
    jpeg.encoder()
        .write_to(&mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn encode_webp(
    image: &RgbImage,
    meta: &Embedded,
) -> std::result::Result<Vec<u8>, image_webp::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = image_webp::WebPEncoder::new(&mut out);
    if !meta.parameters.is_empty() {
        encoder.set_exif_metadata(exif_user_comment(meta.parameters));
    }
    if meta.ai_marking {
        encoder.set_xmp_metadata(AI_MARKING_XMP.as_bytes().to_vec());
    }
    encoder.encode(
        &image.pixels,
        image.width,
        image.height,
        image_webp::ColorType::Rgb8,
    )?;
    Ok(out)
}

/// Encodes `image` as PNG bytes without metadata.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    encode(
        image,
        Encoding::PNG,
        &Embedded {
            parameters: "",
            record: None,
            ai_marking: false,
        },
    )
}

/// Writes `dir/{stem}.{ext}` (unless `image` is `None`: a dropped image) and `dir/{stem}.json`.
/// The image embeds the infotext, the sidecar without `timings` and `batch_size` (PNG) and, with
/// `ai_marking`, the XMP marking.
pub fn write_image(
    dir: &Path,
    stem: &str,
    image: Option<&RgbImage>,
    sidecar: &Sidecar,
    encoding: Encoding,
    infotext: &Infotext,
    ai_marking: bool,
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let json = dir.join(format!("{stem}.json"));
    let json_error = |source| Error::Json {
        path: json.clone(),
        source,
    };
    if let Some(image) = image {
        // The sidecar without what describes the run rather than the image (timings, batch
        // size), so the same image gives the same bytes however it was batched.
        let mut record = serde_json::to_value(sidecar).map_err(json_error)?;
        if let Some(obj) = record.as_object_mut() {
            obj.remove("timings");
            obj.remove("batch_size");
        }
        let record = record.to_string();
        let parameters = a1111_parameters(infotext);
        let bytes = encode(
            image,
            encoding,
            &Embedded {
                parameters: &parameters,
                record: Some(&record),
                ai_marking,
            },
        )?;
        let path = dir.join(encoding.file_name(stem));
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    let text = serde_json::to_string_pretty(sidecar).map_err(json_error)?;
    std::fs::write(&json, text).map_err(io(&json))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::adapters::LoraWeight;

    fn params() -> GenerateParams {
        GenerateParams {
            steps: 50,
            guidance_scale: 7.5,
            width: 512,
            height: 768,
            scheduler: SchedulerKind::Pndm,
            clip_skip: 1,
            guidance_rescale: 0.0,
            prompt_syntax: PromptSyntax::Plain,
            loras: Vec::new(),
        }
    }

    fn info<'a>(p: &'a GenerateParams, prompt: &'a str, neg: Option<&'a str>) -> Infotext<'a> {
        Infotext {
            prompt,
            negative_prompt: neg,
            seed: 123,
            params: p,
            model: "/models/sd-v1-5.safetensors",
            model_sha256: Some("6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
            denoising_strength: None,
            hires: None,
            mask_blur: None,
            padding_mask_crop: None,
        }
    }

    fn version() -> String {
        format!("Version: sdbatch {}", env!("CARGO_PKG_VERSION"))
    }

    #[test]
    fn infotext_is_a1111s_format() {
        let p = params();
        assert_eq!(
            a1111_parameters(&info(&p, "a red sneaker, studio light", Some("blurry"))),
            format!(
                "a red sneaker, studio light\nNegative prompt: blurry\nSteps: 50, Sampler: PNDM, \
                 CFG scale: 7.5, Seed: 123, Size: 512x768, Model hash: 6ce0161689, \
                 Model: sd-v1-5, {}",
                version()
            )
        );
        // Everything optional: Karras schedule, clip skip, rescale, LoRAs as prompt tags.
        let p = GenerateParams {
            steps: 25,
            guidance_scale: 7.0,
            scheduler: SchedulerKind::DpmSolverPp2mKarras,
            clip_skip: 2,
            guidance_rescale: 0.7,
            prompt_syntax: PromptSyntax::A1111,
            loras: vec![
                LoraWeight {
                    name: "locon".into(),
                    weight: -0.3,
                },
                LoraWeight {
                    name: "style".into(),
                    weight: 1.0,
                },
            ],
            ..params()
        };
        let mut i = info(&p, "a (cat:1.2)", None);
        i.model = "/models/my, model:v2/";
        i.model_sha256 = None;
        assert_eq!(
            a1111_parameters(&i),
            format!(
                "a (cat:1.2) <lora:locon:-0.3> <lora:style:1>\nSteps: 25, Sampler: DPM++ 2M, \
                 Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, \
                 Model: \"my, model:v2\", Clip skip: 2, CFG Rescale φ: 0.7, {}",
                version()
            )
        );

        // Inpainting: the strength, then the mask blur after Clip skip (A1111's extra
        // generation parameters); a zero blur is not written.
        let mut i = info(&p, "a cat", None);
        i.model_sha256 = None;
        i.denoising_strength = Some(1.0);
        i.mask_blur = Some(4.5);
        let text = a1111_parameters(&i);
        assert!(
            text.contains(
                ", Denoising strength: 1, Clip skip: 2, Mask blur: 4.5, CFG Rescale φ: 0.7"
            ),
            "{text}"
        );
        i.mask_blur = Some(0.0);
        assert!(!a1111_parameters(&i).contains("Mask blur"));
        i.padding_mask_crop = Some(32);
        let text = a1111_parameters(&i);
        assert!(
            text.contains("Clip skip: 2, Inpaint area: Only masked, Masked area padding: 32, CFG"),
            "{text}"
        );
    }

    #[test]
    fn infotext_keeps_prompts_on_one_line() {
        let p = params();
        // A prompt line break would let the next line pass for a field.
        let text = a1111_parameters(&info(
            &p,
            "a cat\nNegative prompt: evil\r\nSteps: 1\tx",
            Some("ugly\n\nbad"),
        ));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "a cat Negative prompt: evil  Steps: 1 x");
        assert_eq!(lines[1], "Negative prompt: ugly  bad");
        assert!(lines[2].starts_with("Steps: 50, Sampler: PNDM, "));
        // No negative prompt, or an empty one: no line (as A1111).
        for neg in [None, Some(""), Some("\n")] {
            let text = a1111_parameters(&info(&p, "a cat", neg));
            assert!(!text.contains("Negative prompt"), "{text}");
            assert_eq!(text.lines().count(), 2);
        }
        // Plain prompts with brackets say how they were read.
        assert!(a1111_parameters(&info(&p, "a (cat)", None)).contains(", Prompt syntax: plain"));
        // Bounded: a huge prompt is cut on a character boundary.
        let huge = "é".repeat(MAX_INFOTEXT_PROMPT_BYTES);
        let text = a1111_parameters(&info(&p, &huge, Some(&huge)));
        assert!(
            text.len() < 2 * MAX_INFOTEXT_PROMPT_BYTES + 512,
            "{}",
            text.len()
        );
    }

    #[test]
    fn samplers_have_a1111_names() {
        let names: Vec<String> = SchedulerKind::ALL
            .iter()
            .map(|&k| match a1111_sampler(k) {
                (s, Some(t)) => format!("{s}/{t}"),
                (s, None) => s.to_string(),
            })
            .collect();
        assert_eq!(
            names,
            [
                "PNDM",
                "DDIM",
                "Euler",
                "Euler/Karras",
                "Euler a",
                "Euler a/Karras",
                "Heun",
                "Heun/Karras",
                "LMS",
                "LMS/Karras",
                "DPM++ 2M",
                "DPM++ 2M/Karras",
                "UniPC",
                "UniPC/Karras",
                "LCM"
            ]
        );
    }

    #[test]
    fn exif_user_comment_layout() {
        let exif = exif_user_comment("hé");
        let mut want = b"MM\0\x2a\0\0\0\x08".to_vec();
        want.extend([0, 1, 0x87, 0x69, 0, 4, 0, 0, 0, 1, 0, 0, 0, 26, 0, 0, 0, 0]);
        want.extend([0, 1, 0x92, 0x86, 0, 7, 0, 0, 0, 12, 0, 0, 0, 44, 0, 0, 0, 0]);
        want.extend(b"UNICODE\0\0h\0\xe9");
        assert_eq!(exif, want);
    }

    #[test]
    fn formats_and_quality() {
        assert_eq!(Encoding::default(), Encoding::PNG);
        assert_eq!(
            Encoding::new(ImageFormat::Jpeg, None).unwrap().quality,
            Some(90)
        );
        assert!(Encoding::new(ImageFormat::Jpeg, Some(0)).is_err());
        assert!(Encoding::new(ImageFormat::Jpeg, Some(101)).is_err());
        assert!(Encoding::new(ImageFormat::Webp, Some(80)).is_err());
        assert!(Encoding::new(ImageFormat::Png, Some(80)).is_err());
        for f in ImageFormat::ALL {
            assert_eq!(f.name().parse::<ImageFormat>(), Ok(f));
            assert!(ImageFormat::is_image_key(&format!(
                "a/b/0.{}",
                f.extension()
            )));
        }
        assert_eq!(
            Encoding::new(ImageFormat::Jpeg, None)
                .unwrap()
                .file_name("0"),
            "0.jpg"
        );
        assert!(!ImageFormat::is_image_key("a/manifest.json"));
        assert!(!ImageFormat::is_image_key("a/png"));
        assert!("jpg".parse::<ImageFormat>().is_err());
    }

    #[test]
    fn png_round_trips() {
        let img = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![255, 0, 0, 0, 255, 0],
        };
        let bytes = encode_png(&img).unwrap();
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back.as_raw(), &img.pixels);
        let short = RgbImage {
            pixels: vec![0; 5],
            ..img
        };
        for f in ImageFormat::ALL {
            let e = encode(
                &short,
                Encoding {
                    format: f,
                    quality: None,
                },
                &Embedded {
                    parameters: "",
                    record: None,
                    ai_marking: false,
                },
            )
            .unwrap_err();
            assert!(e.to_string().contains("5 bytes of pixels"), "{e}");
        }
    }
}
