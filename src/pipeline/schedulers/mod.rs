//! Noise schedulers, all behind one trait so the pipeline loop does not care which one runs.
//!
//! Each scheduler mirrors its diffusers namesake (same timesteps, same update formulas), with its
//! parameters read from the model's `scheduler/scheduler_config.json`. Values missing from that
//! file take the defaults of the scheduler being built (as `Cls.from_pretrained(…, subfolder="scheduler")`
//! does in diffusers), so a PNDM config can drive an Euler ancestral run.
mod config;
mod ddim;
mod dpm_solver;
mod euler_ancestral;
mod pndm;

pub use config::SchedulerConfig;
pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use pndm::PndmScheduler;

use crate::error::{Error, Result};
use tch::Tensor;

/// One denoising schedule, created for a fixed number of inference steps.
///
/// The pipeline calls, for `i` in `0..timesteps().len()`:
/// `model_in = scale_model_input(latents, i)`, runs the UNet at `timesteps()[i]`, then
/// `latents = step(&eps, i, &latents, noise)`. Steps are addressed by index, not by timestep value,
/// because PNDM repeats a timestep.
pub trait Scheduler: Send {
    /// The timesteps the UNet is evaluated at, in order (fractional for some spacings).
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise: the pipeline multiplies the N(0, 1) latents by it.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the denoising model input for step `step_index` (identity for most schedulers).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Tensor {
        sample.shallow_clone()
    }

    /// Whether `step` consumes fresh N(0, 1) noise (ancestral samplers). The pipeline then draws one
    /// noise tensor of the latents' shape per step from each image's own generator and passes it in.
    fn needs_noise(&self) -> bool {
        false
    }

    /// Computes the latents after step `step_index` from the (guided) model output.
    /// Must be called exactly once per index, in order: multistep schedulers keep history.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;
}

/// The schedulers a user can pick by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    EulerAncestral,
    #[serde(rename = "dpmpp_2m")]
    DpmSolverPp2m,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverPp2m,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::EulerAncestral => "euler_ancestral",
            SchedulerKind::DpmSolverPp2m => "dpmpp_2m",
        }
    }

    /// Builds the scheduler for `steps` inference steps.
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        if steps == 0 {
            return Err(Error::InvalidArgument("steps must be at least 1".into()));
        }
        Ok(match self {
            SchedulerKind::Pndm => Box::new(PndmScheduler::new(config, steps)?),
            SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, steps)?),
            SchedulerKind::EulerAncestral => Box::new(EulerAncestralScheduler::new(config, steps)?),
            SchedulerKind::DpmSolverPp2m => {
                Box::new(DpmSolverMultistepScheduler::new(config, steps)?)
            }
        })
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Ok(match norm.as_str() {
            "pndm" | "plms" => SchedulerKind::Pndm,
            "ddim" => SchedulerKind::Ddim,
            "euler_ancestral" | "euler_a" => SchedulerKind::EulerAncestral,
            "dpmpp_2m" | "dpm++_2m" | "dpm_solver_multistep" | "dpmsolver++" => {
                SchedulerKind::DpmSolverPp2m
            }
            _ => return Err(Error::UnknownScheduler(s.to_string())),
        })
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Helpers shared by the schedulers' unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::SchedulerConfig;
    use tch::{Device, Kind, Tensor};

    /// SD v1-4's scheduler_config.json (`sd14` in the Python references of the tests).
    pub fn sd14() -> SchedulerConfig {
        SchedulerConfig::default()
    }

    /// A `[1, 2, 1, 2]` float tensor.
    pub fn t(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
            .view([1, 2, 1, 2])
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
    }

    /// Element-wise closeness with a relative tolerance of 1e-5.
    pub fn assert_close(actual: &Tensor, expected: &[f64]) {
        let actual = Vec::<f64>::try_from(&actual.flatten(0, -1)).unwrap();
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "{actual:?} vs {expected:?}"
            );
        }
    }
}
