//! Noise schedulers, all behind one trait so the pipeline loop does not care which one runs.
//!
//! Each scheduler mirrors its diffusers namesake (same timesteps, same update formulas), with its
//! parameters read from the model's `scheduler/scheduler_config.json`. Values missing from that
//! file take the defaults of the scheduler being built (as `Cls.from_pretrained(…, subfolder="scheduler")`
//! does in diffusers), so a PNDM config can drive an Euler ancestral run.
mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod heun;
mod lcm;
mod lms;
mod pndm;
mod sigmas;
#[cfg(test)]
mod test_layouts;
mod unipc;

pub use config::SchedulerConfig;
pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use heun::HeunScheduler;
pub use lcm::LcmScheduler;
pub use lms::LmsScheduler;
pub use pndm::PndmScheduler;
pub use unipc::UniPcMultistepScheduler;

use crate::error::{Error, Result};
use tch::Tensor;

/// One denoising schedule, created for a fixed number of inference steps.
///
/// The pipeline calls, for `i` in `0..timesteps().len()`:
/// `model_in = scale_model_input(latents, i)`, runs the UNet at `timesteps()[i]`, then
/// `latents = step(&eps, i, &latents, noise)`. Steps are addressed by index, not by timestep value,
/// because PNDM and Heun repeat timesteps.
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

    /// img2img: drops the first `begin` steps, so the schedule runs from `timesteps()[begin]` on
    /// with fresh state, as diffusers' img2img pipeline slices `scheduler.timesteps[begin:]` (and
    /// sets the begin index). Step indices then count from 0 again. Schedulers without support
    /// say so.
    fn start_at(&mut self, _begin: usize) -> Result<()> {
        Err(Error::InvalidArgument(
            "this scheduler does not support img2img yet (use pndm, ddim, euler, \
             euler_ancestral, dpmpp_2m or lcm, with or without _karras where it exists)"
                .into(),
        ))
    }

    /// img2img: `original` (clean latents) noised to the level of the first step, with `noise`
    /// N(0, 1) of its shape: diffusers' `scheduler.add_noise(original, noise, timesteps[:1])`.
    fn add_noise(&self, _original: &Tensor, _noise: &Tensor) -> Result<Tensor> {
        Err(Error::InvalidArgument(
            "this scheduler does not support img2img yet".into(),
        ))
    }

    /// Inpainting with an ordinary UNet: `original` noised to the level of step `step_index`
    /// (after `start_at`, counted from the new start), as diffusers' inpaint pipeline calls
    /// `scheduler.add_noise(image_latents, noise, [timesteps[step_index]])` to blend the kept
    /// area back in after each step. `add_noise_at(…, 0)` is [`add_noise`](Self::add_noise).
    fn add_noise_at(
        &self,
        _original: &Tensor,
        _noise: &Tensor,
        _step_index: usize,
    ) -> Result<Tensor> {
        Err(Error::InvalidArgument(
            "this scheduler does not support inpainting yet".into(),
        ))
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

/// The first `begin` entries of `v` dropped; `begin` must leave at least one.
pub(crate) fn drop_front<T>(v: &mut Vec<T>, begin: usize, what: &str) -> Result<()> {
    if begin >= v.len() {
        return Err(Error::InvalidArgument(format!(
            "{what}: cannot start at step {begin} of {}",
            v.len()
        )));
    }
    v.drain(..begin);
    Ok(())
}

/// DDPM's forward process at integer timestep `t`: `sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·noise`, with
/// the square roots of float32 values taken in float32 as torch does (diffusers' DDPM-family
/// `add_noise`).
pub(crate) fn add_noise_ddpm(
    alphas_cumprod: &[f32],
    t: i64,
    original: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let alpha = *usize::try_from(t)
        .ok()
        .and_then(|t| alphas_cumprod.get(t))
        .ok_or_else(|| Error::InvalidArgument(format!("timestep {t} is out of range")))?;
    let a = config::torch_sqrt(alpha)?;
    let b = config::torch_sqrt(1.0 - alpha)?;
    Ok(original
        .f_mul_scalar(f64::from(a))?
        .f_add(&noise.f_mul_scalar(f64::from(b))?)?)
}

/// Multistep schedulers keep history, so `step` must come once per index, in order: anything else
/// is a caller bug that would silently give wrong images.
pub(crate) fn check_step_order(
    scheduler: &str,
    step_index: usize,
    expected: usize,
    steps: usize,
) -> Result<()> {
    if step_index != expected || step_index >= steps {
        return Err(Error::InvalidArgument(format!(
            "{scheduler}: step {step_index} called out of order (expected step {expected} of {steps})"
        )));
    }
    Ok(())
}

/// The schedulers a user can pick by name. The `…Karras` kinds are their base scheduler with
/// `use_karras_sigmas` turned on over the model's scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    Euler,
    EulerKarras,
    EulerAncestral,
    EulerAncestralKarras,
    Heun,
    HeunKarras,
    Lms,
    LmsKarras,
    #[serde(rename = "dpmpp_2m")]
    DpmSolverPp2m,
    #[serde(rename = "dpmpp_2m_karras")]
    DpmSolverPp2mKarras,
    #[serde(rename = "unipc")]
    UniPc,
    #[serde(rename = "unipc_karras")]
    UniPcKarras,
    Lcm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 15] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerKarras,
        SchedulerKind::EulerAncestral,
        SchedulerKind::EulerAncestralKarras,
        SchedulerKind::Heun,
        SchedulerKind::HeunKarras,
        SchedulerKind::Lms,
        SchedulerKind::LmsKarras,
        SchedulerKind::DpmSolverPp2m,
        SchedulerKind::DpmSolverPp2mKarras,
        SchedulerKind::UniPc,
        SchedulerKind::UniPcKarras,
        SchedulerKind::Lcm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerKarras => "euler_karras",
            SchedulerKind::EulerAncestral => "euler_ancestral",
            SchedulerKind::EulerAncestralKarras => "euler_ancestral_karras",
            SchedulerKind::Heun => "heun",
            SchedulerKind::HeunKarras => "heun_karras",
            SchedulerKind::Lms => "lms",
            SchedulerKind::LmsKarras => "lms_karras",
            SchedulerKind::DpmSolverPp2m => "dpmpp_2m",
            SchedulerKind::DpmSolverPp2mKarras => "dpmpp_2m_karras",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::UniPcKarras => "unipc_karras",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// Whether this kind forces Karras sigmas on.
    fn karras(self) -> bool {
        matches!(
            self,
            SchedulerKind::EulerKarras
                | SchedulerKind::EulerAncestralKarras
                | SchedulerKind::HeunKarras
                | SchedulerKind::LmsKarras
                | SchedulerKind::DpmSolverPp2mKarras
                | SchedulerKind::UniPcKarras
        )
    }

    /// Builds the scheduler for `steps` inference steps.
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        if steps == 0 {
            return Err(Error::InvalidArgument("steps must be at least 1".into()));
        }
        let karras_config;
        let config = if self.karras() {
            karras_config = SchedulerConfig {
                use_karras_sigmas: Some(true),
                ..config.clone()
            };
            &karras_config
        } else {
            config
        };
        Ok(match self {
            SchedulerKind::Pndm => Box::new(PndmScheduler::new(config, steps)?),
            SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, steps)?),
            SchedulerKind::Euler | SchedulerKind::EulerKarras => {
                Box::new(EulerScheduler::new(config, steps)?)
            }
            SchedulerKind::EulerAncestral | SchedulerKind::EulerAncestralKarras => {
                Box::new(EulerAncestralScheduler::new(config, steps)?)
            }
            SchedulerKind::Heun | SchedulerKind::HeunKarras => {
                Box::new(HeunScheduler::new(config, steps)?)
            }
            SchedulerKind::Lms | SchedulerKind::LmsKarras => {
                Box::new(LmsScheduler::new(config, steps)?)
            }
            SchedulerKind::DpmSolverPp2m | SchedulerKind::DpmSolverPp2mKarras => {
                Box::new(DpmSolverMultistepScheduler::new(config, steps)?)
            }
            SchedulerKind::UniPc | SchedulerKind::UniPcKarras => {
                Box::new(UniPcMultistepScheduler::new(config, steps)?)
            }
            SchedulerKind::Lcm => Box::new(LcmScheduler::new(config, steps)?),
        })
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    /// Canonical names and the names users know from other tools (A1111's "Euler a", "DPM++ 2M
    /// Karras", k-diffusion's `k_lms`, …), ignoring case and punctuation: "DPM++ 2M" and "dpmpp_2m"
    /// are the same name ("++" reads as "pp"), as are "Euler a" and "euler_a".
    fn from_str(s: &str) -> Result<Self> {
        let norm: String = s
            .to_ascii_lowercase()
            .replace("++", "pp")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        // k-diffusion's sampler names carry a `k_` prefix.
        let base = match norm.strip_prefix('k') {
            Some(rest)
                if rest.starts_with("euler")
                    || rest.starts_with("lms")
                    || rest.starts_with("heun")
                    || rest.starts_with("dpm") =>
            {
                rest
            }
            _ => norm.as_str(),
        };
        Ok(match base {
            "pndm" | "plms" => SchedulerKind::Pndm,
            "ddim" => SchedulerKind::Ddim,
            "euler" => SchedulerKind::Euler,
            "eulerkarras" => SchedulerKind::EulerKarras,
            "eulerancestral" | "eulera" => SchedulerKind::EulerAncestral,
            "eulerancestralkarras" | "eulerakarras" => SchedulerKind::EulerAncestralKarras,
            "heun" => SchedulerKind::Heun,
            "heunkarras" => SchedulerKind::HeunKarras,
            "lms" => SchedulerKind::Lms,
            "lmskarras" => SchedulerKind::LmsKarras,
            "dpmpp2m" | "dpmsolvermultistep" | "dpmsolverpp" => SchedulerKind::DpmSolverPp2m,
            "dpmpp2mkarras" | "dpmsolvermultistepkarras" => SchedulerKind::DpmSolverPp2mKarras,
            "unipc" | "unipcmultistep" => SchedulerKind::UniPc,
            "unipckarras" | "unipcmultistepkarras" => SchedulerKind::UniPcKarras,
            "lcm" => SchedulerKind::Lcm,
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

    /// Builds, for each layout, the scheduler on SD v1-4's config with that spacing and Karras flag,
    /// and compares what `parts` returns (timesteps, sigmas, init_noise_sigma) with diffusers'.
    /// Karras timesteps go through numpy's float32 log (see `sigmas::log_sigmas`), so they are
    /// compared to within 2e-4 (a few float32 ulps near t = 1000); everything else is exact.
    pub fn check_layouts(
        layouts: &[super::test_layouts::Layout],
        parts: impl Fn(&SchedulerConfig, usize) -> (Vec<f64>, Vec<f32>, f64),
    ) {
        for l in layouts {
            let mut c = sd14();
            c.timestep_spacing = Some(l.spacing.to_string());
            c.use_karras_sigmas = Some(l.karras);
            let (timesteps, sigmas, init) = parts(&c, l.steps);
            let what = format!("{} karras={} steps={}", l.spacing, l.karras, l.steps);
            assert_eq!(sigmas, l.sigmas, "sigmas, {what}");
            assert_eq!(
                init,
                f64::from(l.init_noise_sigma),
                "init_noise_sigma, {what}"
            );
            assert_eq!(timesteps.len(), l.timesteps.len(), "timesteps, {what}");
            for (ours, theirs) in timesteps.iter().zip(l.timesteps) {
                let theirs = f64::from(*theirs);
                if l.karras {
                    assert!(
                        (ours - theirs).abs() <= 2e-4,
                        "timesteps, {what}: {timesteps:?} vs {:?}",
                        l.timesteps
                    );
                } else {
                    assert_eq!(*ours, theirs, "timesteps, {what}: {timesteps:?}");
                }
            }
        }
    }

    /// Runs `make(config)` over steps `0..=max(indices)` from one sample and model output (as
    /// the Python references of the tests do) and compares the results at `indices` with
    /// diffusers': epsilon, then v-prediction, then v-prediction on Karras sigmas.
    pub fn check_reference_steps(
        make: impl Fn(&SchedulerConfig) -> Box<dyn super::Scheduler>,
        indices: &[usize],
        expected: [&[[f64; 4]]; 3],
    ) {
        let sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let out = t(&[0.3, -0.2, 0.1, 0.4]);
        let last = indices.iter().copied().max().unwrap_or(0);
        let mut c = sd14();
        for (variant, expected) in expected.iter().enumerate() {
            match variant {
                1 => c.prediction_type = Some("v_prediction".into()),
                2 => c.use_karras_sigmas = Some(true),
                _ => {}
            }
            let mut s = make(&c);
            let kept: Vec<Tensor> = (0..=last)
                .map(|i| s.step(&out, i, &sample, None).unwrap())
                .enumerate()
                .filter(|(i, _)| indices.contains(i))
                .map(|(_, y)| y)
                .collect();
            assert_eq!(kept.len(), expected.len());
            for (got, e) in kept.iter().zip(expected.iter()) {
                assert_close(got, e);
            }
        }
    }

    /// The options the sigma-space schedulers (Euler, Heun, LMS) refuse, each with the key it must
    /// name: `make` builds the scheduler for a config.
    pub fn check_sigma_scheduler_refusals<T>(
        make: impl Fn(&SchedulerConfig) -> crate::error::Result<T>,
    ) {
        for (key, json) in [
            ("prediction_type", r#"{"prediction_type": "sample"}"#),
            (
                "use_exponential_sigmas",
                r#"{"use_exponential_sigmas": true}"#,
            ),
            ("use_beta_sigmas", r#"{"use_beta_sigmas": true}"#),
            ("timestep_spacing", r#"{"timestep_spacing": "uniform"}"#),
        ] {
            let c = SchedulerConfig::from_json(json, "scheduler_config.json").unwrap();
            assert!(
                matches!(make(&c), Err(crate::error::Error::Unsupported { key: ref k, .. }) if k == key),
                "{key}"
            );
        }
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

#[cfg(test)]
mod tests {
    use super::SchedulerKind::{self, *};
    use crate::error::Error;

    #[test]
    fn names_and_aliases_parse() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(
                k.to_string()
                    .to_uppercase()
                    .parse::<SchedulerKind>()
                    .unwrap(),
                k
            );
        }
        for (alias, kind) in [
            ("PLMS", Pndm),
            ("Euler", Euler),
            ("k_euler", Euler),
            ("Euler Karras", EulerKarras),
            ("Euler a", EulerAncestral),
            ("euler-a", EulerAncestral),
            ("k_euler_ancestral", EulerAncestral),
            ("euler_a_karras", EulerAncestralKarras),
            ("Euler a Karras", EulerAncestralKarras),
            ("Heun", Heun),
            ("k_heun", Heun),
            ("Heun Karras", HeunKarras),
            ("LMS", Lms),
            ("k_lms", Lms),
            ("LMS Karras", LmsKarras),
            ("DPM++ 2M", DpmSolverPp2m),
            ("dpm++_2m", DpmSolverPp2m),
            ("dpmsolver++", DpmSolverPp2m),
            ("k_dpmpp_2m", DpmSolverPp2m),
            ("DPM++ 2M Karras", DpmSolverPp2mKarras),
            ("dpmpp_2m_karras", DpmSolverPp2mKarras),
            ("UniPC", UniPc),
            ("uni_pc", UniPc),
            ("UniPCMultistep", UniPc),
            ("unipc karras", UniPcKarras),
            ("UniPC Karras", UniPcKarras),
            ("LCM", Lcm),
        ] {
            assert_eq!(alias.parse::<SchedulerKind>().unwrap(), kind, "{alias}");
        }
        for unknown in ["DPM++ SDE", "lcm_karras", "karras", "k", "", "euler_b"] {
            assert!(
                matches!(unknown.parse::<SchedulerKind>(), Err(Error::UnknownScheduler(ref s)) if s == unknown),
                "{unknown}"
            );
        }
    }

    #[test]
    fn karras_kinds_build_with_karras_sigmas() {
        let config = super::test_util::sd14();
        let plain = Euler.build(&config, 10).unwrap();
        let karras = EulerKarras.build(&config, 10).unwrap();
        assert_eq!(plain.timesteps()[1], 888.0);
        assert!((karras.timesteps()[1] - 916.28406).abs() < 2e-4);
        assert_eq!(HeunKarras.build(&config, 10).unwrap().timesteps().len(), 19);
        assert!(DpmSolverPp2mKarras.build(&config, 10).is_ok());
    }
}
