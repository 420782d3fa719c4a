//! The GPU executor: one thread owns the model (libtorch tensors are `Send` but not `Sync`) and
//! runs generation jobs one at a time, in the order they arrive. Async code submits jobs and awaits
//! the result without blocking the runtime.
use crate::batching::{ImageInputs, Mode};
use crate::error::{Error, Result};
use crate::gpu_memory::{CudaMemory, PeakProbe};
use crate::pipeline::clip_score::ClipScorer;
use crate::pipeline::hires::FirstPass;
use crate::pipeline::safety::{SafetyChecker, SafetyResult};
use crate::pipeline::{
    BatchOutput, GenerateParams, GrayImage, ImageRequest, Img2Img, Inpaint, RgbImage,
    StableDiffusion,
};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use tokio::sync::oneshot;

/// The models the thread owns: the pipeline and the optional per-image checks.
pub struct Models {
    pub sd: StableDiffusion,
    pub safety: Option<SafetyChecker>,
    pub clip: Option<ClipScorer>,
}

impl Models {
    pub fn pipeline_only(sd: StableDiffusion) -> Self {
        Self {
            sd,
            safety: None,
            clip: None,
        }
    }
}

/// What a GPU job does besides txt2img: its mode (one per batch) and, per request, its inputs
/// (init images and masks at the output size, or a hires fix's first pass; empty for txt2img).
#[derive(Debug, Clone)]
pub struct GpuWork {
    pub mode: Mode,
    pub inputs: Vec<ImageInputs>,
    /// Set by the session when none of the job's images is wanted any more (their batches were
    /// cancelled): the job stops before it starts or after the UNet step under way, with
    /// [`GpuError::Stopped`].
    pub stop: Option<Arc<AtomicBool>>,
}

impl GpuWork {
    pub fn txt2img() -> Self {
        Self {
            mode: Mode::Txt2Img,
            inputs: Vec::new(),
            stop: None,
        }
    }

    fn stop_requested(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }
}

/// A job's inputs, borrowed for one pipeline call (and split alike when a batch is halved).
#[derive(Clone, Copy)]
enum Work<'a> {
    Txt2Img,
    Img2Img(Img2Img<'a>),
    Inpaint(Inpaint<'a>),
    /// A latent hires fix's first pass: the latents, not decoded.
    Txt2Latents,
    /// A hires fix's second pass from each request's first pass.
    HiresSecond {
        strength: f64,
        first: &'a [&'a FirstPass],
    },
}

impl<'a> Work<'a> {
    /// The inputs of requests `..at` and `at..`.
    fn split_at(self, at: usize) -> (Self, Self) {
        match self {
            Work::Txt2Img | Work::Txt2Latents => (self, self),
            Work::HiresSecond { strength, first } => {
                let (a, b) = first.split_at(at);
                (
                    Work::HiresSecond { strength, first: a },
                    Work::HiresSecond { strength, first: b },
                )
            }
            Work::Img2Img(i) => {
                let (a, b) = i.images.split_at(at);
                (
                    Work::Img2Img(Img2Img { images: a, ..i }),
                    Work::Img2Img(Img2Img { images: b, ..i }),
                )
            }
            Work::Inpaint(i) => {
                let (a, b) = i.images.split_at(at);
                let (ma, mb) = i.masks.split_at(at);
                (
                    Work::Inpaint(Inpaint {
                        images: a,
                        masks: ma,
                        ..i
                    }),
                    Work::Inpaint(Inpaint {
                        images: b,
                        masks: mb,
                        ..i
                    }),
                )
            }
        }
    }

    fn run(
        self,
        model: &StableDiffusion,
        requests: &[ImageRequest],
        params: &GenerateParams,
        on_step: &mut crate::pipeline::StepCallback<'_>,
    ) -> Result<BatchOutput> {
        match self {
            Work::Txt2Img => model.generate_with(requests, params, None, on_step),
            Work::Img2Img(i) => model.generate_with(requests, params, Some(i), on_step),
            Work::Inpaint(i) => model.generate_inpaint(requests, params, i, on_step),
            Work::Txt2Latents => model.generate_latents(requests, params, on_step),
            Work::HiresSecond { strength, first } => {
                model.hires_second_pass(requests, params, strength, first, on_step)
            }
        }
    }
}

struct Job {
    requests: Vec<ImageRequest>,
    params: GenerateParams,
    work: GpuWork,
    /// Run the safety checker on the images.
    safety: bool,
    span: tracing::Span,
    reply: oneshot::Sender<Result<GpuOutput, GpuError>>,
}

/// A finished batch with what the device went through for it.
pub struct GpuOutput {
    pub output: BatchOutput,
    /// Batch sizes that ran out of CUDA memory and were split (largest first).
    pub oom_sizes: Vec<usize>,
    /// Sizes of the sub-batches that actually ran, with the device memory in use at their peak
    /// (CUDA only).
    pub memory: Vec<(usize, u64)>,
    /// The device's total memory (CUDA only).
    pub total_bytes: Option<u64>,
    /// How long the model thread waited for this job after finishing the previous one.
    pub idle_before: std::time::Duration,
    /// The safety checker's verdict per image, when asked for and loaded.
    pub safety: Option<Vec<SafetyResult>>,
    /// CLIP score per image, when a CLIP model is loaded.
    pub clip_scores: Option<Vec<f32>>,
}

/// Why the model thread could not produce a batch. Told apart because the worker treats them
/// differently: a pipeline error about the request cannot succeed on retry, a torch error or a
/// panic might, and a thread that is gone cannot serve anything any more.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// Out of device memory even at batch size 1 (larger batches are split first).
    #[error("out of device memory at batch size 1: {0}")]
    OutOfMemory(String),
    /// The pipeline panicked (a bug, or torch aborting on an unexpected input).
    #[error("generation panicked: {0}")]
    Panicked(String),
    /// The model thread has stopped: nothing can be generated any more.
    #[error("the model thread has stopped")]
    ThreadGone,
    /// The session asked the job to stop ([`GpuWork::stop`]): nobody wants its images.
    #[error("stopped: {0}")]
    Stopped(String),
    #[error(transparent)]
    Pipeline(#[from] Error),
}

impl GpuError {
    /// Whether the same request would fail the same way however often it is retried.
    pub fn is_permanent(&self) -> bool {
        match self {
            GpuError::OutOfMemory(_) => true,
            GpuError::Panicked(_) | GpuError::ThreadGone | GpuError::Stopped(_) => false,
            // Torch errors can be transient device faults; the rest are about the request.
            GpuError::Pipeline(e) => !matches!(e, Error::Torch(_)),
        }
    }
}

/// What the model thread reports once loading finished.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Total device memory (CUDA), for the batch sizer; `None` on the CPU.
    pub total_memory: Option<u64>,
    pub native_size: i64,
    /// The UNet is an inpainting one: every item needs an init image and a mask.
    pub inpainting_model: bool,
    pub has_safety_checker: bool,
    /// The GPU's product name (CUDA), which with the dtype keys stored calibrations.
    pub gpu_name: Option<String>,
    pub dtype: &'static str,
    /// [`StableDiffusion::content_sha256`], recorded in every event and manifest (`None` if a
    /// file could not be read again).
    pub model_sha256: Option<String>,
}

#[derive(Default)]
struct GpuReport {
    oom_sizes: Vec<usize>,
    memory: Vec<(usize, u64)>,
    total_bytes: Option<u64>,
}

pub struct GpuExecutor {
    jobs: mpsc::Sender<Job>,
    info: ModelInfo,
}

/// CUDA's out-of-memory error as libtorch words it.
fn is_oom(e: &Error) -> bool {
    let msg = e.to_string();
    msg.contains("out of memory") || msg.contains("CUDA_ERROR_OUT_OF_MEMORY")
}

/// Runs `requests` as one batch; on CUDA out-of-memory (libtorch's caching allocator has already
/// released its cached blocks and retried before reporting it) splits the batch in halves and runs
/// them one after the other. Images come back in request order.
///
/// The inputs of `work` belong to the requests in order; the halves split both alike.
fn generate_splitting(
    model: &StableDiffusion,
    requests: &[ImageRequest],
    params: &GenerateParams,
    work: Work<'_>,
    stop: Option<&AtomicBool>,
    report: &mut GpuReport,
) -> Result<BatchOutput, GpuError> {
    // Allocator peaks where the bridge has them, else the driver's free memory sampled during the
    // steps and after the decode (crate::gpu_memory).
    let mut probe = match model.device() {
        tch::Device::Cuda(i) => Some(PeakProbe::start(CudaMemory(i))),
        _ => None,
    };
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        work.run(model, requests, params, &mut |_, _, _| {
            // The UNet's activations are live during the steps: sample memory there.
            if let Some(p) = probe.as_mut() {
                p.sample();
            }
            match stop {
                Some(s) if s.load(Ordering::Relaxed) => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        })
        .map_err(|e| {
            if let Error::Stopped { .. } = e {
                GpuError::Stopped(e.to_string())
            } else if is_oom(&e) {
                GpuError::OutOfMemory(e.to_string())
            } else {
                GpuError::Pipeline(e)
            }
        })
    }))
    .unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(GpuError::Panicked(msg))
    });
    // Read after the VAE decode too: at large sizes its peak exceeds the UNet's (the driver
    // fallback sees it because the caching allocator keeps the decoder's blocks reserved).
    if let Some(reading) = probe.and_then(PeakProbe::finish) {
        report.total_bytes = Some(reading.total);
        if attempt.is_ok() {
            tracing::debug!(batch = requests.len(), used = reading.used, source = ?reading.source, "batch memory peak");
            report.memory.push((requests.len(), reading.used));
        }
    }
    match attempt {
        Err(GpuError::OutOfMemory(_)) if requests.len() > 1 => {
            report.oom_sizes.push(requests.len());
            let half = requests.len() / 2;
            tracing::warn!(
                batch = requests.len(),
                half,
                "CUDA out of memory: splitting the batch"
            );
            let (a, b) = work.split_at(half);
            let mut first = generate_splitting(model, &requests[..half], params, a, stop, report)?;
            let second = generate_splitting(model, &requests[half..], params, b, stop, report)?;
            first.images.extend(second.images);
            first.latents.extend(second.latents);
            first.timings.total_ms += second.timings.total_ms;
            first.timings.denoise_ms += second.timings.denoise_ms;
            first.timings.text_encode_ms += second.timings.text_encode_ms;
            first.timings.vae_decode_ms += second.timings.vae_decode_ms;
            Ok(first)
        }
        other => other,
    }
}

impl GpuExecutor {
    /// Starts the model thread and loads the model on it; returns once loading finished.
    pub async fn start<F>(load: F) -> Result<Self>
    where
        F: FnOnce() -> Result<Models> + Send + 'static,
    {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<ModelInfo>>();
        std::thread::Builder::new()
            .name("sdbatch-model".into())
            .spawn(move || {
                let models = match load() {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let model = &models.sd;
                let info = ModelInfo {
                    has_safety_checker: models.safety.is_some(),
                    total_memory: if model.device().is_cuda() {
                        crate::device::cuda_memory().map(|(_, total)| total)
                    } else {
                        None
                    },
                    native_size: model.native_size(),
                    inpainting_model: model.is_inpainting_model(),
                    gpu_name: match model.device() {
                        tch::Device::Cuda(i) => crate::device::cuda_device_name(i),
                        _ => None,
                    },
                    dtype: crate::device::dtype_name(model.dtype()),
                    model_sha256: match model.content_sha256() {
                        Ok(hash) => Some(hash),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot hash the model's files");
                            None
                        }
                    },
                };
                if ready_tx.send(Ok(info)).is_err() {
                    return;
                }
                // Ends when every sender (the executor) is dropped.
                let mut finished = std::time::Instant::now();
                while let Ok(job) = rx.recv() {
                    let idle_before = finished.elapsed();
                    let _enter = job.span.enter();
                    // Stopped while it waited behind another job: nothing to do.
                    if job.work.stop_requested() {
                        let _ = job
                            .reply
                            .send(Err(GpuError::Stopped("stopped before it started".into())));
                        continue;
                    }
                    let mut report = GpuReport::default();
                    // The pipeline takes slices of images: copied once per job from the shared
                    // decoded inputs (a few MB at most, next to seconds of denoising).
                    let inputs = &job.work.inputs;
                    let init_images: Vec<RgbImage> = inputs
                        .iter()
                        .filter_map(|i| i.init.as_deref().cloned())
                        .collect();
                    let masks: Vec<GrayImage> = inputs
                        .iter()
                        .filter_map(|i| i.mask.as_deref().cloned())
                        .collect();
                    // Borrowed: a first pass is only read, and may be a batch's worth of images.
                    let first_passes: Vec<&FirstPass> = inputs
                        .iter()
                        .filter_map(|i| i.first_pass.as_deref())
                        .collect();
                    let work = match job.work.mode {
                        Mode::Txt2Img => Work::Txt2Img,
                        Mode::Txt2Latents => Work::Txt2Latents,
                        Mode::HiresSecond { strength_bits, .. } => Work::HiresSecond {
                            strength: f64::from_bits(strength_bits),
                            first: &first_passes,
                        },
                        Mode::Img2Img { strength_bits } => Work::Img2Img(Img2Img {
                            images: &init_images,
                            strength: f64::from_bits(strength_bits),
                        }),
                        Mode::Inpaint {
                            strength_bits,
                            mask_blur_bits,
                            padding_mask_crop,
                        } => Work::Inpaint(Inpaint {
                            images: &init_images,
                            masks: &masks,
                            strength: f64::from_bits(strength_bits),
                            mask_blur: f64::from_bits(mask_blur_bits),
                            padding_mask_crop,
                        }),
                    };
                    let stop = job.work.stop.as_deref();
                    let result = generate_splitting(
                        model,
                        &job.requests,
                        &job.params,
                        work,
                        stop,
                        &mut report,
                    )
                    .and_then(|output| {
                        // The checks run here, batched, on the device that holds their weights.
                        // A first pass without images (latents) has nothing to check.
                        let images = !output.images.is_empty();
                        let safety = match (&models.safety, job.safety && images) {
                            (Some(checker), true) => {
                                Some(checker.check(&output.images).map_err(GpuError::from)?)
                            }
                            _ => None,
                        };
                        let clip_scores = match &models.clip {
                            Some(scorer) if images => {
                                let prompts: Vec<&str> =
                                    job.requests.iter().map(|r| r.prompt.as_str()).collect();
                                Some(
                                    scorer
                                        .scores(&prompts, &output.images)
                                        .map_err(GpuError::from)?,
                                )
                            }
                            _ => None,
                        };
                        Ok(GpuOutput {
                            output,
                            oom_sizes: report.oom_sizes,
                            memory: report.memory,
                            total_bytes: report.total_bytes,
                            idle_before,
                            safety,
                            clip_scores,
                        })
                    });
                    finished = std::time::Instant::now();
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| Error::InvalidArgument(format!("cannot start the model thread: {e}")))?;
        let info = ready_rx.await.map_err(|_| {
            Error::InvalidArgument("the model thread stopped while loading".into())
        })??;
        Ok(Self { jobs, info })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Generates one batch on the model thread (and runs the safety checker if `safety`).
    pub async fn generate(
        &self,
        requests: Vec<ImageRequest>,
        params: GenerateParams,
        safety: bool,
    ) -> Result<GpuOutput, GpuError> {
        self.generate_with(requests, params, GpuWork::txt2img(), safety)
            .await
    }

    /// [`generate`](Self::generate) in `work`'s mode, from its inputs (one per request).
    pub async fn generate_with(
        &self,
        requests: Vec<ImageRequest>,
        params: GenerateParams,
        work: GpuWork,
        safety: bool,
    ) -> Result<GpuOutput, GpuError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                requests,
                params,
                work,
                safety,
                span: tracing::Span::current(),
                reply,
            })
            .map_err(|_| GpuError::ThreadGone)?;
        rx.await.map_err(|_| GpuError::ThreadGone)?
    }
}
