//! img2img and inpainting inputs at admission: each item's init image and mask fetched (S3,
//! bounded by [`MAX_INIT_IMAGE_BYTES`] before its body is read) or taken from its `data:` URI,
//! hashed into the batch (its work hash and records name the bytes), and decoded off the async
//! runtime ([`crate::init_image::decode`]: PNG/JPEG/WebP, dimension limits, EXIF orientation,
//! resized to the output size). This runs in the session while the model thread keeps working
//! on the batches already queued.
//!
//! A bad input is the producer's: the message is invalid ([`Invalid`], dead-lettered before any
//! work). A store that fails transiently (after its retries) is a [`StorageError`] and takes the
//! normal transient path (requeue).
use crate::batching::ImageInputs;
use crate::init_image::{InitImageError, decode_sized};
use crate::message::{
    Batch, ImageSource, InputImage, InputRole, Invalid, InvalidReason, MAX_INIT_IMAGE_BYTES,
};
use crate::pipeline::{GrayImage, RgbImage};
use crate::storage::{Limited, Storage, StorageError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

pub(super) enum InputError {
    Invalid(Invalid),
    Storage(StorageError),
}

/// Refuses, before anything is fetched, work the worker's model cannot do: an inpainting model
/// (9-channel UNet) needs an init image and a mask on every item, and cannot run a hires fix.
pub(super) fn check_model(batch: &Batch, inpainting_model: bool) -> Result<(), Invalid> {
    if !inpainting_model {
        return Ok(());
    }
    let invalid = |reason: InvalidReason, message: String| Invalid {
        reason,
        message,
        batch_id: Some(batch.batch_id.clone()),
    };
    if batch.hires.is_some() {
        return Err(invalid(
            InvalidReason::Hires,
            "params.hires: this worker's model is an inpainting model, which only inpaints".into(),
        ));
    }
    match batch.items.iter().position(|i| i.mask_image.is_none()) {
        None => Ok(()),
        Some(at) => Err(invalid(
            InvalidReason::MaskImage,
            format!(
                "items[{at}] has no mask_image: this worker's model is an inpainting model \
                 (its UNet takes a mask), so every item needs an init_image and a mask_image"
            ),
        )),
    }
}

/// Per item of `batch`, its decoded init image and mask (empty inputs for txt2img items); an
/// empty vector when no item has one. Sets each S3 input's `sha256` in `batch`.
pub(super) async fn load(
    storage: &Storage,
    batch: &mut Batch,
) -> Result<Vec<ImageInputs>, InputError> {
    if batch.items.iter().all(|i| i.init_image.is_none()) {
        return Ok(Vec::new());
    }
    let (width, height) = (batch.params.width as u32, batch.params.height as u32);
    let crop = batch.padding_mask_crop.is_some();
    let batch_id = batch.batch_id.clone();
    let invalid = |at: usize, role: InputRole, reason: InvalidReason, message: String| {
        InputError::Invalid(Invalid {
            reason,
            message: crate::bounded::reason(&format!("items[{at}].{}: {message}", role.field())),
            batch_id: Some(batch_id.clone()),
        })
    };
    // Items with the same bytes share one decoded copy.
    let mut images: HashMap<String, (Arc<RgbImage>, (u32, u32))> = HashMap::new();
    let mut masks: HashMap<String, (Arc<GrayImage>, (u32, u32))> = HashMap::new();
    let mut out = Vec::with_capacity(batch.items.len());
    for (at, item) in batch.items.iter_mut().enumerate() {
        let Some(init) = &mut item.init_image else {
            out.push(ImageInputs::default());
            continue;
        };
        let role = InputRole::Init;
        let bytes = fetch(storage, init)
            .await
            .map_err(|e| e.at(at, role, &invalid))?;
        let (image, init_size) = match images.get(&hash(&bytes)) {
            Some(found) => found.clone(),
            None => {
                let decoded = decode_blocking(bytes.clone(), width, height)
                    .await
                    .map_err(|e| Fetch::Decode(e).at(at, role, &invalid))?;
                let decoded = (Arc::new(decoded.0), decoded.1);
                images.insert(hash(&bytes), decoded.clone());
                decoded
            }
        };
        let mask = match &mut item.mask_image {
            None => None,
            Some(mask) => {
                let role = InputRole::Mask;
                let bytes = fetch(storage, mask)
                    .await
                    .map_err(|e| e.at(at, role, &invalid))?;
                let (mask, mask_size) = match masks.get(&hash(&bytes)) {
                    Some(found) => found.clone(),
                    None => {
                        let (rgb, size) = decode_blocking(bytes.clone(), width, height)
                            .await
                            .map_err(|e| Fetch::Decode(e).at(at, role, &invalid))?;
                        // As diffusers' mask processor: grey (PIL's "L"), binarised later.
                        let decoded = (Arc::new(GrayImage::from_rgb(&rgb)), size);
                        masks.insert(hash(&bytes), decoded.clone());
                        decoded
                    }
                };
                // A mask of another size was drawn for another picture: resizing both to the
                // output would silently misalign what is kept.
                if mask_size != init_size {
                    return Err(invalid(
                        at,
                        role,
                        InvalidReason::MaskImageSize,
                        format!(
                            "the mask is {}x{}, its init image {}x{}: they must be the same size",
                            mask_size.0, mask_size.1, init_size.0, init_size.1
                        ),
                    ));
                }
                // padding_mask_crop crops to the mask's non-black area: without one there is
                // nothing to crop to, and the generation could only fail.
                if crop && mask.pixels.iter().all(|&v| v == 0) {
                    return Err(invalid(
                        at,
                        role,
                        InvalidReason::MaskImage,
                        "the mask is all black, so params.padding_mask_crop has no area to crop \
                         to (and there is nothing to inpaint)"
                            .into(),
                    ));
                }
                Some(mask)
            }
        };
        out.push(ImageInputs {
            init: Some(image),
            mask,
            first_pass: None,
        });
    }
    Ok(out)
}

fn hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Why an input could not be used, before it is tied to its item and role.
enum Fetch {
    TooLarge(String),
    Missing(String),
    Unreadable(String),
    Decode(InitImageError),
    Storage(StorageError),
}

impl Fetch {
    fn at(
        self,
        at: usize,
        role: InputRole,
        invalid: &impl Fn(usize, InputRole, InvalidReason, String) -> InputError,
    ) -> InputError {
        match self {
            Fetch::TooLarge(m) | Fetch::Decode(InitImageError::TooLarge(m)) => {
                invalid(at, role, role.too_large(), m)
            }
            Fetch::Missing(m) => invalid(at, role, role.missing(), m),
            Fetch::Unreadable(m) | Fetch::Decode(InitImageError::Unreadable(m)) => {
                invalid(at, role, role.unreadable(), m)
            }
            Fetch::Storage(e) => InputError::Storage(e),
        }
    }
}

/// The bytes of `input` (fetched from S3 or from its `data:` URI); sets its `sha256`.
async fn fetch(storage: &Storage, input: &mut InputImage) -> Result<Arc<[u8]>, Fetch> {
    let bytes: Arc<[u8]> = match &input.source {
        ImageSource::Data { bytes } => bytes.clone(),
        ImageSource::S3 { bucket, key } => {
            match storage
                .get_limited(bucket, key, MAX_INIT_IMAGE_BYTES as u64)
                .await
            {
                Ok(Some(Limited::Bytes(b))) => b.into(),
                Ok(Some(Limited::TooLarge(size))) => {
                    return Err(Fetch::TooLarge(format!(
                        "{} is {size} bytes, limit {MAX_INIT_IMAGE_BYTES}",
                        input.describe()
                    )));
                }
                Ok(None) => {
                    return Err(Fetch::Missing(format!(
                        "{} does not exist",
                        input.describe()
                    )));
                }
                Err(e) if e.is_transient() => return Err(Fetch::Storage(e)),
                // Access denied, no such bucket, an invalid key: the producer named an
                // object this worker cannot read, which no retry changes.
                Err(e) => {
                    return Err(Fetch::Unreadable(format!(
                        "{} cannot be read: {}",
                        input.describe(),
                        e.message()
                    )));
                }
            }
        }
    };
    input.sha256 = Some(hash(&bytes));
    Ok(bytes)
}

/// Decodes and resizes on a blocking thread (tens of milliseconds of CPU: not on the runtime's
/// threads). Returns the image at the output size and its own size (after EXIF orientation).
/// A decoder that panics on these bytes would panic on every delivery: unreadable.
async fn decode_blocking(
    bytes: Arc<[u8]>,
    width: u32,
    height: u32,
) -> Result<(RgbImage, (u32, u32)), InitImageError> {
    tokio::task::spawn_blocking(move || decode_sized(&bytes, width, height))
        .await
        .unwrap_or_else(|e| {
            Err(InitImageError::Unreadable(format!(
                "the decoder failed: {e}"
            )))
        })
}
