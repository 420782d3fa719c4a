//! img2img inputs at admission: each item's init image fetched (S3, bounded by
//! [`MAX_INIT_IMAGE_BYTES`] before its body is read) or taken from its `data:` URI, hashed into
//! the batch (its work hash and records name the bytes), and decoded off the async runtime
//! ([`crate::init_image::decode`]: PNG/JPEG/WebP, dimension limits, EXIF orientation, resized to
//! the output size). This runs in the session while the model thread keeps working on the
//! batches already queued.
//!
//! A bad input is the producer's: the message is invalid ([`Invalid`], dead-lettered before any
//! work). A store that fails transiently (after its retries) is a [`StorageError`] and takes the
//! normal transient path (requeue).
use crate::init_image::{InitImageError, decode};
use crate::message::{Batch, InitSource, Invalid, InvalidReason, MAX_INIT_IMAGE_BYTES};
use crate::pipeline::RgbImage;
use crate::storage::{Limited, Storage, StorageError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

pub(super) enum InputError {
    Invalid(Invalid),
    Storage(StorageError),
}

/// Per item of `batch`, its decoded init image (`None` for txt2img items); an empty vector when
/// no item has one. Sets each S3 init image's `sha256` in `batch`.
pub(super) async fn load(
    storage: &Storage,
    batch: &mut Batch,
) -> Result<Vec<Option<Arc<RgbImage>>>, InputError> {
    if batch.items.iter().all(|i| i.init_image.is_none()) {
        return Ok(Vec::new());
    }
    let (width, height) = (batch.params.width as u32, batch.params.height as u32);
    let batch_id = batch.batch_id.clone();
    let invalid = |at: usize, reason: InvalidReason, message: String| {
        InputError::Invalid(Invalid {
            reason,
            message: crate::bounded::reason(&format!("items[{at}].init_image: {message}")),
            batch_id: Some(batch_id.clone()),
        })
    };
    // Items with the same bytes share one decoded copy.
    let mut decoded: HashMap<String, Arc<RgbImage>> = HashMap::new();
    let mut out = Vec::with_capacity(batch.items.len());
    for (at, item) in batch.items.iter_mut().enumerate() {
        let Some(init) = &mut item.init_image else {
            out.push(None);
            continue;
        };
        let bytes: Arc<[u8]> = match &init.source {
            InitSource::Data { bytes } => bytes.clone(),
            InitSource::S3 { bucket, key } => {
                match storage
                    .get_limited(bucket, key, MAX_INIT_IMAGE_BYTES as u64)
                    .await
                {
                    Ok(Some(Limited::Bytes(b))) => b.into(),
                    Ok(Some(Limited::TooLarge(size))) => {
                        return Err(invalid(
                            at,
                            InvalidReason::InitImageTooLarge,
                            format!(
                                "{} is {size} bytes, limit {MAX_INIT_IMAGE_BYTES}",
                                init.describe()
                            ),
                        ));
                    }
                    Ok(None) => {
                        return Err(invalid(
                            at,
                            InvalidReason::InitImageMissing,
                            format!("{} does not exist", init.describe()),
                        ));
                    }
                    Err(e) if e.is_transient() => return Err(InputError::Storage(e)),
                    // Access denied, no such bucket, an invalid key: the producer named an
                    // object this worker cannot read, which no retry changes.
                    Err(e) => {
                        return Err(invalid(
                            at,
                            InvalidReason::InitImageUnreadable,
                            format!("{} cannot be read: {}", init.describe(), e.message()),
                        ));
                    }
                }
            }
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        init.sha256 = Some(sha256.clone());
        if let Some(image) = decoded.get(&sha256) {
            out.push(Some(image.clone()));
            continue;
        }
        // Decoding and resizing take a CPU for tens of milliseconds: not on the runtime's threads.
        // A decoder that panics on these bytes would panic on every delivery: unreadable.
        let result = tokio::task::spawn_blocking(move || decode(&bytes, width, height))
            .await
            .unwrap_or_else(|e| {
                Err(InitImageError::Unreadable(format!(
                    "the decoder failed: {e}"
                )))
            });
        let image = match result {
            Ok(image) => Arc::new(image),
            Err(InitImageError::TooLarge(m)) => {
                return Err(invalid(at, InvalidReason::InitImageTooLarge, m));
            }
            Err(InitImageError::Unreadable(m)) => {
                return Err(invalid(at, InvalidReason::InitImageUnreadable, m));
            }
        };
        decoded.insert(sha256, image.clone());
        out.push(Some(image));
    }
    Ok(out)
}
