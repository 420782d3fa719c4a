//! The sigma schedules of the k-diffusion style schedulers (Euler, Euler ancestral, Heun, LMS, and
//! DPM-Solver++ with Karras sigmas): where the timesteps fall, the sigma at each, and the Karras et
//! al. (2022) schedule with the timestep each of its sigmas corresponds to.
//!
//! diffusers computes all of this with numpy in float64 from float32 inputs and stores the results
//! as float32; the functions here keep the same precision at every stage.
use super::config::{SchedulerConfig, Spacing, np_arange, np_interp_unit_grid, np_linspace};
use crate::error::{Error, Result};
use tch::Tensor;

/// Karras et al.'s rho, the value diffusers hard-codes.
const KARRAS_RHO: f64 = 7.0;

/// The float32 timesteps, descending, laid out as EulerDiscrete, EulerAncestralDiscrete, Heun and
/// LMS do (DPM-Solver++ has its own integer layout).
pub(crate) fn spaced_timesteps(
    config: &SchedulerConfig,
    steps: usize,
    spacing: Spacing,
) -> Vec<f32> {
    let n_train = config.num_train_timesteps;
    match spacing {
        // np.linspace(0, n - 1, steps, dtype=float32), reversed.
        Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = (n_train / steps) as i64;
            // `steps_offset` is added to the float32 array.
            (0..steps as i64)
                .rev()
                .map(|i| (i * ratio) as f32 + config.steps_offset as f32)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| t.round_ties_even() as f32 - 1.0)
                .collect()
        }
    }
}

/// Timesteps with one sigma each (the final sigma, 0 or sigma_min, is the caller's to append).
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

/// Where the Karras schedule ends when the config does not pin it (`sigma_min`/`sigma_max` are
/// EulerDiscreteScheduler options; the other schedulers always take the interpolated range).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KarrasRange {
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

/// The schedule of Euler / Euler ancestral / Heun / LMS: sigmas interpolated linearly over the
/// training sigmas at the spaced timesteps, or, with `karras`, the Karras schedule between the first
/// and last of those sigmas (unless `range` pins them) with the timesteps mapped back from it.
pub(crate) fn discrete_schedule(
    config: &SchedulerConfig,
    steps: usize,
    spacing: Spacing,
    karras: Option<KarrasRange>,
    train_sigmas: &[f32],
) -> SigmaSchedule {
    let timesteps = spaced_timesteps(config, steps, spacing);
    // np.interp over the float32 training sigmas, in float64.
    let sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| np_interp_unit_grid(f64::from(t), train_sigmas))
        .collect();
    match karras {
        None => SigmaSchedule {
            timesteps,
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
        },
        Some(range) => {
            let sigma_min = range
                .sigma_min
                .unwrap_or_else(|| sigmas.last().copied().unwrap_or(0.0));
            let sigma_max = range
                .sigma_max
                .unwrap_or_else(|| sigmas.first().copied().unwrap_or(0.0));
            let karras = karras_sigmas(sigma_min, sigma_max, steps);
            let log_sigmas = log_sigmas(train_sigmas);
            SigmaSchedule {
                timesteps: karras
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                    .collect(),
                sigmas: karras.iter().map(|&s| s as f32).collect(),
            }
        }
    }
}

/// Karras et al.'s schedule: `steps` sigmas from `sigma_max` down to `sigma_min`, evenly spaced in
/// `sigma ** (1 / rho)` (float64, as `_convert_to_karras`).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let min_inv_rho = sigma_min.powf(1.0 / KARRAS_RHO);
    let max_inv_rho = sigma_max.powf(1.0 / KARRAS_RHO);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(KARRAS_RHO))
        .collect()
}

/// `np.log` of the float32 training sigmas, kept in float32.
///
/// numpy's float32 log is a SIMD approximation chosen at run time (AVX512F, AVX2 or scalar code),
/// which differs from the correctly rounded log in the last bit for about one value in five on an
/// AVX512 CPU. No fixed choice reproduces it on every CPU, so this is the correctly rounded value;
/// the timesteps mapped back from Karras sigmas can differ from diffusers' in their last float32 bit
/// or two (about 1e-4 at t ~ 900), which moves the UNet output far below the test tolerances.
pub(crate) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas
        .iter()
        .map(|&s| f64::from(s).ln() as f32)
        .collect()
}

/// The fractional training timestep of a sigma (`_sigma_to_t`): linear interpolation in log sigma
/// between the two training steps that bracket it.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // diffusers takes the argmax of the cumulative count of training log sigmas <= log_sigma: the
    // last such index, or 0 when there is none; clipped so that a step above it exists.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0)
        .min(n.saturating_sub(2));
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx.min(n - 1)];
    // `low - high` is a float32 difference in numpy; the numerator is float64.
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// What the sigma-space schedulers (Euler, Euler ancestral, Heun, LMS) share: the timesteps the
/// UNet is evaluated at, their sigmas (then the final one), and what `init_noise_sigma` and
/// `scale_model_input` derive from them.
pub(crate) struct SigmaSteps {
    /// float32 values (fractional for "linspace" spacing and Karras sigmas), widened to f64.
    pub timesteps: Vec<f64>,
    /// One sigma per timestep, then the final sigma (0, or sigma_min).
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
    /// `(sigma ** 2 + 1) ** 0.5` per timestep: `scale_model_input` divides by it.
    input_scales: Vec<f32>,
}

impl SigmaSteps {
    /// `sigmas` has one entry per timestep, then the final sigma.
    pub fn new(timesteps: Vec<f64>, sigmas: Vec<f32>, spacing: Spacing) -> Result<Self> {
        Ok(Self {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing)?,
            input_scales: input_scales(&sigmas)?,
            timesteps,
            sigmas,
        })
    }

    /// img2img: the schedule from step `begin` on (see `Scheduler::start_at`).
    pub fn start_at(&mut self, begin: usize, what: &str) -> Result<()> {
        super::drop_front(&mut self.timesteps, begin, what)?;
        self.sigmas.drain(..begin);
        self.input_scales.drain(..begin);
        Ok(())
    }

    /// `original + noise · sigma` at step `step_index`: the k-diffusion schedulers' `add_noise`
    /// (diffusers takes the sigma of the begin index before the first step, of the current step
    /// index after it).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let sigma = self.sigmas.get(step_index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no step {step_index} to add noise at ({} sigmas)",
                self.sigmas.len()
            ))
        })?;
        Ok(original.f_add(&noise.f_mul_scalar(f64::from(*sigma))?)?)
    }

    /// The sample divided by `(sigma ** 2 + 1) ** 0.5` of step `step_index`.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Tensor {
        let scale = self.input_scales[step_index.min(self.input_scales.len() - 1)];
        sample / f64::from(scale)
    }
}

/// `init_noise_sigma` of the sigma-space schedulers: the largest sigma, or for "leading" spacing
/// `(max ** 2 + 1) ** 0.5` (in float32, with libtorch's sqrt).
fn init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> Result<f32> {
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Ok(match spacing {
        Spacing::Linspace | Spacing::Trailing => max_sigma,
        Spacing::Leading => super::config::torch_sqrt(max_sigma * max_sigma + 1.0)?,
    })
}

/// `1 / (sigma ** 2 + 1) ** 0.5` is what `scale_model_input` applies: these are the divisors, one
/// per sigma, in float32 with libtorch's sqrt.
fn input_scales(sigmas: &[f32]) -> Result<Vec<f32>> {
    sigmas
        .iter()
        .map(|&s| super::config::torch_sqrt(s * s + 1.0))
        .collect()
}

/// The Karras options of a config, for the schedulers that support `use_karras_sigmas`.
pub(crate) fn karras_option(config: &SchedulerConfig, range: KarrasRange) -> Option<KarrasRange> {
    (config.use_karras_sigmas == Some(true)).then_some(range)
}
