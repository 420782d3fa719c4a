//! Batch planning: which images go into the next GPU batch, and how many fit.
//!
//! - [`Planner`] holds the images of every message in hand, in arrival order. The next batch takes
//!   the oldest waiting image and every later image that can share its UNet batch (same size,
//!   steps, scheduler, guidance, LoRA set, and one [`Mode`]: txt2img, img2img or inpainting at
//!   one strength, or one hires fix's second pass: a [`ShapeKey`]), across message boundaries, up
//!   to the size the [`BatchSizer`] allows. Images keep their order within a message; none is
//!   lost or duplicated. A hires fix is two shapes: its first pass is planned with txt2img at the
//!   first size, and its second pass, queued when the first comes back, ahead of new work at the
//!   larger size ([`Planner::push_second_pass`]).
//! - [`BatchSizer`] picks that size per shape: the configured ceiling (`--max-batch`) on the CPU; on
//!   CUDA the largest batch whose calibrated memory fits the device under a safety margin, and a
//!   per-shape ceiling halved each time the device runs out of memory.
use crate::pipeline::GenerateParams;
use crate::pipeline::hires::{FirstPass, Hires, Upscaler};
use crate::pipeline::schedulers::SchedulerKind;
use crate::pipeline::{GrayImage, ImageRequest, RgbImage};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What images must share to be denoised in one UNet batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShapeKey {
    pub width: i64,
    pub height: i64,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    /// The guidance scale's bits (it is one scalar for the whole batch).
    pub guidance_bits: u64,
    /// The prompts of a batch are encoded in one call, at one clip skip.
    pub clip_skip: usize,
    /// The guidance rescale's bits (one scalar for the batch, as the guidance scale).
    pub guidance_rescale_bits: u64,
    /// One text-encoder call per batch reads all its prompts in one syntax (and chunk count).
    pub prompt_syntax: crate::pipeline::prompt_weights::PromptSyntax,
    /// The LoRA set fused into the weights for the batch (names and weights' bits, canonical
    /// order): one set per GPU batch.
    pub loras: Vec<(String, u64)>,
    /// How the batch's images start: images of different modes never share a batch, even of
    /// one message.
    pub mode: Mode,
}

/// How the images of a GPU batch start, one per batch: the pipeline call differs, and so does
/// what every image brings (an init image, a mask). Floats as bits, so keys hash and compare
/// exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Txt2Img,
    /// From init images, at one strength (one start step for the batch).
    Img2Img {
        strength_bits: u64,
    },
    /// From init images and masks, at one strength, one mask blur and one padding_mask_crop
    /// (the masks are blurred and cropped with the batch's pipeline call).
    Inpaint {
        strength_bits: u64,
        mask_blur_bits: u64,
        padding_mask_crop: Option<u32>,
    },
    /// txt2img that stops before the VAE decode: a `latent` hires fix's first pass (a
    /// `lanczos` one is plain [`Mode::Txt2Img`] and shares its batches).
    Txt2Latents,
    /// A hires fix's second pass (the key's size and steps are the second pass's): img2img at
    /// one strength from each image's first pass, upscaled by one upscaler.
    HiresSecond {
        strength_bits: u64,
        upscaler: Upscaler,
    },
}

impl Mode {
    pub fn img2img(strength: f64) -> Self {
        Mode::Img2Img {
            strength_bits: strength.to_bits(),
        }
    }

    pub fn inpaint(strength: f64, mask_blur: f64, padding_mask_crop: Option<u32>) -> Self {
        Mode::Inpaint {
            strength_bits: strength.to_bits(),
            mask_blur_bits: mask_blur.to_bits(),
            padding_mask_crop,
        }
    }

    /// The mode of a hires fix's first pass: what the second needs (decoded images or latents).
    pub fn hires_first(h: &Hires) -> Self {
        match h.upscaler {
            Upscaler::Lanczos => Mode::Txt2Img,
            Upscaler::Latent => Mode::Txt2Latents,
        }
    }

    /// The mode of a hires fix's second pass.
    pub fn hires_second(h: &Hires) -> Self {
        Mode::HiresSecond {
            strength_bits: h.strength.to_bits(),
            upscaler: h.upscaler,
        }
    }

    /// A hires fix's second pass: its images come from first passes already run, so planning
    /// them adds no image to those in flight.
    pub fn is_second_pass(&self) -> bool {
        matches!(self, Mode::HiresSecond { .. })
    }

    /// The img2img, inpainting or hires second-pass strength, `None` for txt2img.
    pub fn strength(&self) -> Option<f64> {
        match *self {
            Mode::Img2Img { strength_bits }
            | Mode::Inpaint { strength_bits, .. }
            | Mode::HiresSecond { strength_bits, .. } => Some(f64::from_bits(strength_bits)),
            Mode::Txt2Img | Mode::Txt2Latents => None,
        }
    }
}

/// The parameters of a hires fix's second pass after a first pass with `p`: the larger size
/// (rounded down to multiples of [`SIZE_MULTIPLE`](crate::message::SIZE_MULTIPLE), as the
/// message's output size) and the hires steps. `None` for a scale out of range (refused when the
/// message was read).
pub fn hires_second_params(p: &GenerateParams, h: &Hires) -> Option<GenerateParams> {
    let (width, height) = h
        .size(p.width, p.height, crate::message::SIZE_MULTIPLE)
        .ok()?;
    Some(GenerateParams {
        width,
        height,
        steps: h.steps,
        ..p.clone()
    })
}

/// What one image brings besides its prompt: an init image (img2img, inpainting) and a mask
/// (inpainting), decoded at the output size and shared by the images of one item; or, for a
/// hires fix's second pass, the image's own first pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageInputs {
    pub init: Option<Arc<RgbImage>>,
    pub mask: Option<Arc<GrayImage>>,
    pub first_pass: Option<Arc<FirstPass>>,
}

impl ShapeKey {
    pub fn of(p: &GenerateParams) -> Self {
        Self {
            width: p.width,
            height: p.height,
            steps: p.steps,
            scheduler: p.scheduler,
            guidance_bits: p.guidance_scale.to_bits(),
            clip_skip: p.clip_skip,
            guidance_rescale_bits: p.guidance_rescale.to_bits(),
            prompt_syntax: p.prompt_syntax,
            loras: p
                .loras
                .iter()
                .map(|l| (l.name.clone(), l.weight.to_bits()))
                .collect(),
            mode: Mode::Txt2Img,
        }
    }

    /// The key of an image of `mode`.
    pub fn with_mode(self, mode: Mode) -> Self {
        Self { mode, ..self }
    }
}

/// One image waiting for the GPU. `tag` says where its result goes (message, image index).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedImage<T> {
    pub tag: T,
    pub request: ImageRequest,
    /// What it starts from besides noise (empty for txt2img and a hires fix's first pass).
    pub inputs: ImageInputs,
}

/// A GPU batch: images of one shape, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBatch<T> {
    pub key: ShapeKey,
    pub params: GenerateParams,
    pub images: Vec<PlannedImage<T>>,
}

struct Waiting<T> {
    key: ShapeKey,
    params: GenerateParams,
    image: PlannedImage<T>,
}

/// Images of all messages in hand, in arrival order.
pub struct Planner<T> {
    waiting: VecDeque<Waiting<T>>,
}

impl<T> Default for Planner<T> {
    fn default() -> Self {
        Self {
            waiting: VecDeque::new(),
        }
    }
}

impl<T: Clone + PartialEq> Planner<T> {
    /// Queues the images of one message (in its order).
    pub fn push(
        &mut self,
        params: &GenerateParams,
        images: impl IntoIterator<Item = (T, ImageRequest)>,
    ) {
        self.push_with(
            params,
            images
                .into_iter()
                .map(|(tag, request)| (tag, request, Mode::Txt2Img, ImageInputs::default())),
        );
    }

    /// Queues the images of one message, each with its mode and inputs: images of different
    /// modes are keyed apart, so they never share a batch.
    pub fn push_with(
        &mut self,
        params: &GenerateParams,
        images: impl IntoIterator<Item = (T, ImageRequest, Mode, ImageInputs)>,
    ) {
        let base = ShapeKey::of(params);
        for (tag, request, mode, inputs) in images {
            self.waiting.push_back(Waiting {
                key: base.clone().with_mode(mode),
                params: params.clone(),
                image: PlannedImage {
                    tag,
                    request,
                    inputs,
                },
            });
        }
    }

    /// Queues the second passes of hires fixes (`second` is their parameters, see
    /// [`hires_second_params`]) ahead of every first pass and every new image, behind the second
    /// passes already waiting: the GPU finishes the images it started before it starts new ones,
    /// so first passes waiting for their second stay few (at most the GPU batches in flight).
    pub fn push_second_pass(
        &mut self,
        second: &GenerateParams,
        hires: &Hires,
        images: impl IntoIterator<Item = (T, ImageRequest, Arc<FirstPass>)>,
    ) {
        let key = ShapeKey::of(second).with_mode(Mode::hires_second(hires));
        let behind = self.second_passes_waiting();
        for (at, (tag, request, first)) in (behind..).zip(images) {
            self.waiting.insert(
                at,
                Waiting {
                    key: key.clone(),
                    params: second.clone(),
                    image: PlannedImage {
                        tag,
                        request,
                        inputs: ImageInputs {
                            first_pass: Some(first),
                            ..ImageInputs::default()
                        },
                    },
                },
            );
        }
    }

    /// Second passes waiting: first passes done, held until their second pass runs. They are
    /// always the front of the queue ([`Self::push_second_pass`] puts them there, and taking
    /// or dropping images keeps the order of the rest), so counting stops at the first other.
    pub fn second_passes_waiting(&self) -> usize {
        self.waiting
            .iter()
            .take_while(|w| w.key.mode.is_second_pass())
            .count()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The shape of the next batch (the oldest waiting image's).
    pub fn next_key(&self) -> Option<&ShapeKey> {
        self.waiting.front().map(|w| &w.key)
    }

    /// Takes the next batch of at most `max` images: the oldest image and the following ones of
    /// the same shape, keeping their relative order.
    pub fn next_batch(&mut self, max: usize) -> Option<PlannedBatch<T>> {
        let first = self.waiting.front()?;
        let key = first.key.clone();
        let params = first.params.clone();
        let max = max.max(1);
        let mut images = Vec::with_capacity(max);
        let mut rest = VecDeque::with_capacity(self.waiting.len());
        while let Some(w) = self.waiting.pop_front() {
            if images.len() < max && w.key == key {
                images.push(w.image);
            } else {
                rest.push_back(w);
            }
        }
        self.waiting = rest;
        Some(PlannedBatch {
            key,
            params,
            images,
        })
    }

    /// Drops every waiting image whose tag matches (its message failed or was abandoned).
    pub fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> usize {
        let before = self.waiting.len();
        self.waiting.retain(|w| !pred(&w.image.tag));
        before - self.waiting.len()
    }
}

/// What a batch's device memory depends on: the image size and whether guidance doubles the UNet
/// batch. Steps, scheduler and the guidance value do not change it, so one calibration serves
/// every shape of the same size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MemoryKey {
    pub width: i64,
    pub height: i64,
    pub guided: bool,
}

impl MemoryKey {
    /// A hires fix's two passes are two shapes, each sized at its own size.
    pub fn of(key: &ShapeKey) -> Self {
        Self {
            width: key.width,
            height: key.height,
            // As the pipeline: guidance only above 1.
            guided: f64::from_bits(key.guidance_bits) > 1.0,
        }
    }
}

/// Memory measured for one batch: how many images, and the device memory in use at its peak.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemorySample {
    pub batch: usize,
    pub peak_used_bytes: u64,
}

#[derive(Debug, Clone, Default)]
struct ShapeStats {
    /// Largest batch allowed for this shape (lowered on out-of-memory).
    ceiling: Option<usize>,
    /// Peak device memory in use by batch size (smallest peak per size).
    samples: Vec<MemorySample>,
    ooms: u64,
}

/// Chooses the batch size per shape.
#[derive(Debug, Clone)]
pub struct BatchSizer {
    max_batch: usize,
    /// Fraction of the device kept free (fragmentation, other processes, cuDNN workspaces).
    margin: f64,
    shapes: HashMap<MemoryKey, ShapeStats>,
}

impl BatchSizer {
    pub fn new(max_batch: usize, margin: f64) -> Self {
        Self {
            max_batch: max_batch.max(1),
            margin: margin.clamp(0.0, 0.9),
            shapes: HashMap::new(),
        }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn ceiling(&self, key: &ShapeKey) -> usize {
        self.shapes
            .get(&MemoryKey::of(key))
            .and_then(|s| s.ceiling)
            .unwrap_or(self.max_batch)
            .min(self.max_batch)
    }

    /// Linear memory model `used(n) = base + n * per_image` from the two most distant batch
    /// sizes measured, if the fit is meaningful.
    pub fn model(&self, key: &ShapeKey) -> Option<(f64, f64)> {
        let s = self.shapes.get(&MemoryKey::of(key))?;
        let lo = s.samples.iter().min_by_key(|m| m.batch)?;
        let hi = s.samples.iter().max_by_key(|m| m.batch)?;
        if hi.batch == lo.batch || hi.peak_used_bytes <= lo.peak_used_bytes {
            return None;
        }
        let per_image =
            (hi.peak_used_bytes - lo.peak_used_bytes) as f64 / (hi.batch - lo.batch) as f64;
        let base = lo.peak_used_bytes as f64 - per_image * lo.batch as f64;
        Some((base, per_image))
    }

    /// The batch size for the next batch of `key`. `total_bytes` is the device's memory (`None` on
    /// the CPU, where the ceiling is the configured batch size).
    ///
    /// On CUDA the first two batches of a shape calibrate: sizes 1 and 2 (memory grows from a small
    /// batch to a larger one, so each peak reflects that batch's need). After that, the largest
    /// size whose modelled memory stays under `(1 - margin) * total`.
    pub fn choose(&self, key: &ShapeKey, total_bytes: Option<u64>) -> usize {
        let ceiling = self.ceiling(key);
        let Some(total) = total_bytes else {
            return ceiling;
        };
        let samples = self
            .shapes
            .get(&MemoryKey::of(key))
            .map_or(0, |s| s.samples.len());
        if samples < 2 {
            return (samples + 1).min(ceiling);
        }
        match self.model(key) {
            Some((base, per_image)) => {
                let budget = total as f64 * (1.0 - self.margin) - base;
                let fits = (budget / per_image).floor();
                if fits < 1.0 {
                    1
                } else {
                    (fits as usize).min(ceiling)
                }
            }
            // Memory did not grow with the batch (already cached): the ceiling decides, and an
            // out-of-memory error lowers it.
            None => ceiling,
        }
    }

    /// Records the peak memory of a batch that ran.
    pub fn record(&mut self, key: &ShapeKey, sample: MemorySample) {
        self.record_memory(MemoryKey::of(key), sample);
    }

    /// Records a sample by memory key (calibrations loaded from a file, warm-up batches).
    pub fn record_memory(&mut self, key: MemoryKey, sample: MemorySample) {
        let s = self.shapes.entry(key).or_default();
        match s.samples.iter_mut().find(|m| m.batch == sample.batch) {
            Some(m) => m.peak_used_bytes = m.peak_used_bytes.min(sample.peak_used_bytes),
            None => s.samples.push(sample),
        }
    }

    /// A batch of `batch` images of `key` ran out of memory: halve this shape's ceiling.
    /// The samples measured for a memory key (what a calibration file keeps).
    pub fn samples(&self, key: &MemoryKey) -> &[MemorySample] {
        self.shapes.get(key).map_or(&[], |s| &s.samples)
    }

    pub fn record_oom(&mut self, key: &ShapeKey, batch: usize) {
        let s = self.shapes.entry(MemoryKey::of(key)).or_default();
        s.ooms += 1;
        let lowered = (batch / 2).max(1);
        s.ceiling = Some(s.ceiling.map_or(lowered, |c| c.min(lowered)));
    }

    pub fn ooms(&self, key: &ShapeKey) -> u64 {
        self.shapes.get(&MemoryKey::of(key)).map_or(0, |s| s.ooms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(width: i64, steps: usize) -> GenerateParams {
        GenerateParams {
            steps,
            guidance_scale: 7.5,
            width,
            height: 512,
            scheduler: SchedulerKind::Pndm,
            clip_skip: 1,
            guidance_rescale: 0.0,
            prompt_syntax: crate::pipeline::prompt_weights::PromptSyntax::Plain,
            loras: Vec::new(),
        }
    }

    fn req(seed: u64) -> ImageRequest {
        ImageRequest {
            prompt: format!("p{seed}"),
            negative_prompt: None,
            seed,
        }
    }

    /// (message, image) tags.
    type Tag = (u32, u32);

    fn tags(b: &PlannedBatch<Tag>) -> Vec<Tag> {
        b.images.iter().map(|i| i.tag).collect()
    }

    #[test]
    fn modes_are_batched_apart_and_by_strength() {
        let init = Arc::new(RgbImage {
            width: 512,
            height: 512,
            pixels: vec![0; 512 * 512 * 3],
        });
        let mask = Arc::new(GrayImage {
            width: 512,
            height: 512,
            pixels: vec![255; 512 * 512],
        });
        let i2i = ImageInputs {
            init: Some(init.clone()),
            ..ImageInputs::default()
        };
        let inp = ImageInputs {
            init: Some(init.clone()),
            mask: Some(mask.clone()),
            ..ImageInputs::default()
        };
        let none = ImageInputs::default;
        let mut p: Planner<Tag> = Planner::default();
        // One message mixing txt2img (0, 2), img2img (1, 3) and inpainting (4) items, then
        // another message's img2img image at another strength and one at the same, then a
        // txt2img message and a hires one.
        p.push_with(
            &params(512, 50),
            [
                ((0, 0), req(0), Mode::Txt2Img, none()),
                ((0, 1), req(1), Mode::img2img(0.8), i2i.clone()),
                ((0, 2), req(2), Mode::Txt2Img, none()),
                ((0, 3), req(3), Mode::img2img(0.8), i2i.clone()),
                ((0, 4), req(4), Mode::inpaint(1.0, 0.0, None), inp.clone()),
            ],
        );
        p.push_with(
            &params(512, 50),
            [((1, 0), req(5), Mode::img2img(0.5), i2i.clone())],
        );
        p.push_with(
            &params(512, 50),
            [((2, 0), req(6), Mode::img2img(0.8), i2i.clone())],
        );
        p.push(&params(512, 50), [((3, 0), req(7))]);
        let hires = Hires {
            scale: 1.5,
            steps: 20,
            strength: 0.5,
            upscaler: Upscaler::Latent,
        };
        p.push_with(
            &params(512, 50),
            [((4, 0), req(8), Mode::hires_first(&hires), none())],
        );
        let b = p.next_batch(8).unwrap();
        assert_eq!(tags(&b), [(0, 0), (0, 2), (3, 0)]);
        assert_eq!(b.key.mode, Mode::Txt2Img);
        assert!(b.images.iter().all(|i| i.inputs == none()));
        let b = p.next_batch(8).unwrap();
        assert_eq!(tags(&b), [(0, 1), (0, 3), (2, 0)]);
        assert_eq!(b.key.mode.strength(), Some(0.8));
        assert!(b.images.iter().all(|i| i.inputs == i2i));
        let b = p.next_batch(8).unwrap();
        assert_eq!(tags(&b), [(0, 4)]);
        assert_eq!(b.key.mode, Mode::inpaint(1.0, 0.0, None));
        assert!(b.images.iter().all(|i| i.inputs == inp));
        let b = p.next_batch(8).unwrap();
        assert_eq!(tags(&b), [(1, 0)]);
        assert_eq!(b.key.mode.strength(), Some(0.5));
        let b = p.next_batch(8).unwrap();
        assert_eq!(tags(&b), [(4, 0)]);
        assert_eq!(b.key.mode, Mode::Txt2Latents);
        assert!(p.is_empty());
        // Memory does not depend on img2img or inpainting: one calibration serves them all; a
        // hires fix's second pass is sized at its own size (768x768).
        let base = ShapeKey::of(&params(512, 50));
        assert_eq!(
            MemoryKey::of(&base.clone().with_mode(Mode::img2img(0.8))),
            MemoryKey::of(&base)
        );
        assert_eq!(
            MemoryKey::of(&base.clone().with_mode(Mode::inpaint(0.8, 0.0, None))),
            MemoryKey::of(&base)
        );
        let second = hires_second_params(&params(512, 50), &hires).unwrap();
        assert_eq!((second.width, second.height, second.steps), (768, 768, 20));
        let big = MemoryKey::of(&ShapeKey::of(&second).with_mode(Mode::hires_second(&hires)));
        assert_eq!((big.width, big.height), (768, 768));
    }

    #[test]
    fn hires_second_passes_go_ahead_of_new_images_and_keep_their_order() {
        let hires = Hires {
            scale: 2.0,
            steps: 10,
            strength: 0.5,
            upscaler: Upscaler::Lanczos,
        };
        let first = |seed: u64| {
            Arc::new(FirstPass::Image(RgbImage {
                width: 8,
                height: 8,
                pixels: vec![seed as u8; 8 * 8 * 3],
            }))
        };
        let base = params(512, 50);
        let second = hires_second_params(&base, &hires).unwrap();
        let mut p: Planner<Tag> = Planner::default();
        // A lanczos hires fix's first pass is txt2img: it shares a batch with plain images.
        p.push_with(
            &base,
            [
                (
                    (0, 0),
                    req(0),
                    Mode::hires_first(&hires),
                    ImageInputs::default(),
                ),
                (
                    (0, 1),
                    req(1),
                    Mode::hires_first(&hires),
                    ImageInputs::default(),
                ),
            ],
        );
        p.push(&base, [((1, 0), req(2)), ((1, 1), req(3))]);
        let b = p.next_batch(3).unwrap();
        assert_eq!(tags(&b), [(0, 0), (0, 1), (1, 0)]);
        assert_eq!(b.key.mode, Mode::Txt2Img);
        // Their second passes jump the queue, in the order they came back.
        p.push_second_pass(&second, &hires, [((0, 0), req(0), first(0))]);
        p.push_second_pass(&second, &hires, [((0, 1), req(1), first(1))]);
        assert_eq!(p.second_passes_waiting(), 2);
        let b = p.next_batch(8).unwrap();
        assert_eq!(tags(&b), [(0, 0), (0, 1)]);
        assert_eq!((b.key.width, b.key.height, b.key.steps), (1024, 1024, 10));
        assert_eq!(b.key.mode, Mode::hires_second(&hires));
        assert_eq!(b.key.mode.strength(), Some(0.5));
        assert_eq!(b.params, second);
        assert_eq!(b.images[1].inputs.first_pass, Some(first(1)));
        assert_eq!(p.second_passes_waiting(), 0);
        assert_eq!(tags(&p.next_batch(8).unwrap()), [(1, 1)]);
        // Latent upscaling needs the first pass's latents: a shape of its own.
        let latent = Hires {
            upscaler: Upscaler::Latent,
            ..hires
        };
        assert_eq!(Mode::hires_first(&latent), Mode::Txt2Latents);
        assert_ne!(Mode::hires_second(&latent), Mode::hires_second(&hires));
    }

    #[test]
    fn batches_cross_message_boundaries_in_order() {
        let mut p: Planner<Tag> = Planner::default();
        for m in 0..3 {
            p.push(
                &params(512, 50),
                (0..2).map(|i| ((m, i), req(u64::from(m * 10 + i)))),
            );
        }
        assert_eq!(
            tags(&p.next_batch(4).unwrap()),
            vec![(0, 0), (0, 1), (1, 0), (1, 1)]
        );
        assert_eq!(tags(&p.next_batch(4).unwrap()), vec![(2, 0), (2, 1)]);
        assert!(p.next_batch(4).is_none());
    }

    #[test]
    fn incompatible_shapes_wait_their_turn_and_keep_order() {
        let mut p: Planner<Tag> = Planner::default();
        p.push(&params(512, 50), [((0, 0), req(0)), ((0, 1), req(1))]);
        p.push(&params(768, 50), [((1, 0), req(2))]);
        p.push(&params(512, 50), [((2, 0), req(3))]);
        p.push(&params(512, 25), [((3, 0), req(4))]);
        let b = p.next_batch(8).unwrap();
        assert_eq!(b.key.width, 512);
        assert_eq!(tags(&b), vec![(0, 0), (0, 1), (2, 0)]);
        assert_eq!(tags(&p.next_batch(8).unwrap()), vec![(1, 0)]);
        assert_eq!(tags(&p.next_batch(8).unwrap()), vec![(3, 0)]);
    }

    #[test]
    fn lora_sets_are_never_mixed_in_one_batch() {
        use crate::pipeline::adapters::LoraWeight;
        let with = |loras: &[(&str, f64)]| GenerateParams {
            loras: loras
                .iter()
                .map(|(n, w)| LoraWeight {
                    name: n.to_string(),
                    weight: *w,
                })
                .collect(),
            ..params(512, 50)
        };
        let mut p: Planner<Tag> = Planner::default();
        p.push(&with(&[("style", 0.7)]), [((0, 0), req(0))]);
        p.push(&with(&[]), [((1, 0), req(1))]);
        p.push(&with(&[("style", 0.8)]), [((2, 0), req(2))]);
        p.push(&with(&[("style", 0.7)]), [((3, 0), req(3))]);
        p.push(&with(&[("locon", 1.0), ("style", 0.7)]), [((4, 0), req(4))]);
        let batches: Vec<(Vec<Tag>, usize)> = std::iter::from_fn(|| p.next_batch(8))
            .map(|b| (tags(&b), b.params.loras.len()))
            .collect();
        // Same set (names and weights) together, across messages; every other set alone.
        assert_eq!(
            batches,
            vec![
                (vec![(0, 0), (3, 0)], 1),
                (vec![(1, 0)], 0),
                (vec![(2, 0)], 1),
                (vec![(4, 0)], 2)
            ]
        );
    }

    #[test]
    fn large_messages_are_split() {
        let mut p: Planner<Tag> = Planner::default();
        p.push(
            &params(512, 50),
            (0..10).map(|i| ((0, i), req(u64::from(i)))),
        );
        let sizes: Vec<usize> = std::iter::from_fn(|| p.next_batch(4))
            .map(|b| b.images.len())
            .collect();
        assert_eq!(sizes, vec![4, 4, 2]);
    }

    #[test]
    fn removing_a_failed_message() {
        let mut p: Planner<Tag> = Planner::default();
        p.push(&params(512, 50), (0..3).map(|i| ((0, i), req(0))));
        p.push(&params(512, 50), (0..2).map(|i| ((1, i), req(0))));
        assert_eq!(p.remove_where(|t| t.0 == 0), 3);
        assert_eq!(tags(&p.next_batch(8).unwrap()), vec![(1, 0), (1, 1)]);
    }

    const GIB: u64 = 1 << 30;

    /// A fake device: `base` bytes for weights and context plus `per_image` per image of a batch;
    /// running a batch that does not fit is an out-of-memory error.
    struct FakeDevice {
        total: u64,
        base: u64,
        per_image: u64,
    }

    impl FakeDevice {
        fn run(&self, n: usize) -> Result<MemorySample, ()> {
            let used = self.base + self.per_image * n as u64;
            if used > self.total {
                Err(())
            } else {
                Ok(MemorySample {
                    batch: n,
                    peak_used_bytes: used,
                })
            }
        }
    }

    /// Drives planner + sizer + fake device the way the worker does: on out-of-memory the batch is
    /// halved and retried (the executor's split) and the shape's ceiling lowered. Returns the batch
    /// sizes that ran and every tag in the order it completed.
    fn simulate(dev: &FakeDevice, sizer: &mut BatchSizer, images: usize) -> (Vec<usize>, Vec<Tag>) {
        let mut p: Planner<Tag> = Planner::default();
        // 3 images per message, like prefetched producer messages.
        for m in 0..images.div_ceil(3) {
            let n = (images - m * 3).min(3);
            p.push(
                &params(512, 50),
                (0..n).map(|i| ((m as u32, i as u32), req(0))),
            );
        }
        let mut ran = Vec::new();
        let mut done = Vec::new();
        while let Some(key) = p.next_key().cloned() {
            let n = sizer.choose(&key, Some(dev.total));
            let batch = p.next_batch(n).unwrap();
            let mut pending: VecDeque<Vec<PlannedImage<Tag>>> = VecDeque::from([batch.images]);
            while let Some(chunk) = pending.pop_front() {
                match dev.run(chunk.len()) {
                    Ok(sample) => {
                        sizer.record(&key, sample);
                        ran.push(chunk.len());
                        done.extend(chunk.iter().map(|i| i.tag));
                    }
                    Err(()) => {
                        assert!(chunk.len() > 1, "a single image must fit");
                        sizer.record_oom(&key, chunk.len());
                        let mut first = chunk;
                        let second = first.split_off(first.len() / 2);
                        pending.push_front(second);
                        pending.push_front(first);
                    }
                }
            }
        }
        (ran, done)
    }

    fn expected_tags(images: usize) -> Vec<Tag> {
        (0..images)
            .map(|k| ((k / 3) as u32, (k % 3) as u32))
            .collect()
    }

    #[test]
    fn sizer_calibrates_then_fills_memory_under_the_margin() {
        // 80 GiB device, 6 GiB of weights, 2 GiB per image: (0.9 * 80 - 6) / 2 = 33 images fit.
        let dev = FakeDevice {
            total: 80 * GIB,
            base: 6 * GIB,
            per_image: 2 * GIB,
        };
        let mut sizer = BatchSizer::new(64, 0.10);
        let (ran, done) = simulate(&dev, &mut sizer, 200);
        assert_eq!(&ran[..2], &[1, 2], "calibration runs");
        assert!(ran[2..ran.len() - 1].iter().all(|&n| n == 33), "{ran:?}");
        assert_eq!(
            done,
            expected_tags(200),
            "no image lost, duplicated or reordered"
        );
    }

    #[test]
    fn out_of_memory_halves_and_converges() {
        // The model underestimates (memory grows faster for large batches than the linear fit
        // says): the ceiling drops on the first failure and the size converges.
        let dev = FakeDevice {
            total: 24 * GIB,
            base: 4 * GIB,
            per_image: 3 * GIB,
        };
        let mut sizer = BatchSizer::new(16, 0.0);
        // Pretend calibration measured a cheaper image than reality.
        let key = ShapeKey::of(&params(512, 50));
        sizer.record(
            &key,
            MemorySample {
                batch: 1,
                peak_used_bytes: 5 * GIB,
            },
        );
        sizer.record(
            &key,
            MemorySample {
                batch: 2,
                peak_used_bytes: 6 * GIB,
            },
        );
        assert_eq!(sizer.choose(&key, Some(dev.total)), 16);
        let (ran, done) = simulate(&dev, &mut sizer, 60);
        assert_eq!(
            done,
            expected_tags(60),
            "no image lost, duplicated or reordered"
        );
        assert!(sizer.ooms(&key) >= 1);
        // Real capacity: (24 - 4) / 3 = 6 images. After the failures every batch fits.
        let settled = sizer.choose(&key, Some(dev.total));
        assert!((4..=6).contains(&settled), "settled at {settled}");
        assert!(ran.iter().all(|&n| n <= 8), "{ran:?}");
        assert!(ran.iter().rev().take(3).all(|&n| n == settled), "{ran:?}");
    }

    #[test]
    fn cpu_uses_the_configured_size() {
        let sizer = BatchSizer::new(4, 0.1);
        let key = ShapeKey::of(&params(512, 50));
        assert_eq!(sizer.choose(&key, None), 4);
    }

    #[test]
    fn one_image_always_runs() {
        let mut sizer = BatchSizer::new(8, 0.1);
        let key = ShapeKey::of(&params(512, 50));
        sizer.record(
            &key,
            MemorySample {
                batch: 1,
                peak_used_bytes: 70 * GIB,
            },
        );
        sizer.record(
            &key,
            MemorySample {
                batch: 2,
                peak_used_bytes: 79 * GIB,
            },
        );
        assert_eq!(sizer.choose(&key, Some(80 * GIB)), 1);
        sizer.record_oom(&key, 1);
        assert_eq!(sizer.choose(&key, Some(80 * GIB)), 1);
    }

    #[test]
    fn memory_is_shared_by_shapes_of_one_size() {
        // A calibration at one step (the warm-up) sizes 50-step batches of another scheduler.
        let mut sizer = BatchSizer::new(64, 0.1);
        let warm = ShapeKey::of(&params(512, 1));
        let real = ShapeKey {
            scheduler: SchedulerKind::EulerAncestral,
            ..ShapeKey::of(&params(512, 50))
        };
        for (batch, gib) in [(1, 4), (2, 5)] {
            sizer.record(
                &warm,
                MemorySample {
                    batch,
                    peak_used_bytes: gib << 30,
                },
            );
        }
        let total = Some(20u64 << 30);
        assert_eq!(sizer.choose(&real, total), 15, "(18 GiB - 3) / 1 GiB");
        // Another size, or no guidance, is another memory key: calibrated on its own.
        assert_eq!(sizer.choose(&ShapeKey::of(&params(768, 50)), total), 1);
        let unguided = ShapeKey {
            guidance_bits: 1.0f64.to_bits(),
            ..real.clone()
        };
        assert_eq!(sizer.choose(&unguided, total), 1);
    }
}
