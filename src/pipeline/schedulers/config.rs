//! `scheduler/scheduler_config.json`, plus the pieces every scheduler shares: the beta schedule and
//! the few numpy routines diffusers uses to lay out timesteps, reproduced with the same rounding.
//!
//! Scalar coefficients are computed in `f32` wherever diffusers computes them on float32 tensors, so
//! that the values handed to the tensor ops are the very same floats. `+ - * /` are correctly
//! rounded IEEE operations and match bit for bit; `sqrt` (`** 0.5`), `log` and `exp` go through
//! libtorch (`torch_sqrt`, `torch_ln`, `torch_exp`) because its CPU kernels are not correctly rounded
//! (libtorch's float sqrt differs from IEEE sqrt in about 1 value in 150) and depend on the CPU.
use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The path, relative to the model folder, that configuration errors name.
pub(crate) const CONFIG_PATH: &str = "scheduler/scheduler_config.json";

/// The scheduler parameters of a diffusers model folder.
///
/// Keys a scheduler may want that are missing from the file are `None`, and each scheduler applies
/// its own diffusers default (e.g. `timestep_spacing` is "leading" for PNDM and DDIM but "linspace"
/// for Euler ancestral and DPM-Solver++). Unknown keys (`_class_name`, …) are ignored.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// "linear", "scaled_linear" or "squaredcos_cap_v2".
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// Explicit betas; they replace `beta_start`/`beta_end`/`beta_schedule`.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub steps_offset: i64,
    /// PNDM default false, DDIM default true.
    pub set_alpha_to_one: Option<bool>,
    /// PNDM only; diffusers' default is false (PRK warm-up), which is not supported here.
    pub skip_prk_steps: Option<bool>,
    /// DDIM only; diffusers' default is true.
    pub clip_sample: Option<bool>,
    /// DDIM only; default 1.0.
    pub clip_sample_range: Option<f64>,
    /// "epsilon" (default), "v_prediction", or "sample" (DDIM and DPM-Solver++ only).
    pub prediction_type: Option<String>,
    /// "leading", "linspace" or "trailing"; the default depends on the scheduler.
    pub timestep_spacing: Option<String>,
    /// DDIM / DPM-Solver++: dynamic thresholding (not supported).
    pub thresholding: Option<bool>,
    /// Zero terminal SNR rescaling of the betas (DDIM, Euler, Euler ancestral, DPM-Solver++, UniPC,
    /// LCM; ignored, as in diffusers, by PNDM, Heun and LMS, whose classes lack the option).
    pub rescale_betas_zero_snr: Option<bool>,

    // DPMSolverMultistepScheduler.
    /// Only "dpmsolver++" (default; "deis" is mapped to it as diffusers does).
    pub algorithm_type: Option<String>,
    /// 1 or 2 (default 2).
    pub solver_order: Option<usize>,
    /// Only "midpoint" (default; "logrho", "bh1", "bh2" are mapped to it as diffusers does).
    pub solver_type: Option<String>,
    /// Default true.
    pub lower_order_final: Option<bool>,
    /// Default false.
    pub euler_at_final: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    /// "zero" (default) or "sigma_min".
    pub final_sigmas_type: Option<String>,
    /// Default -inf. Python's `-Infinity` (as diffusers writes it) is read as the default.
    pub lambda_min_clipped: Option<f64>,
    /// Only null ("learned" variances are not supported).
    pub variance_type: Option<String>,

    // EulerDiscreteScheduler.
    /// Only "linear" (default).
    pub interpolation_type: Option<String>,
    /// "discrete" (default) or "continuous" (only with epsilon prediction, where it changes nothing).
    pub timestep_type: Option<String>,
    /// Ends of the Karras schedule; by default those of the interpolated sigmas.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,

    // UniPCMultistepScheduler (also `solver_order`, `solver_type` "bh1"/"bh2", `lower_order_final`).
    /// Only true (default): the data-prediction form.
    pub predict_x0: Option<bool>,
    /// Step indices after which no corrector runs (default none).
    pub disable_corrector: Option<Vec<usize>>,

    // LCMScheduler.
    /// The distillation schedule's number of steps (default 50).
    pub original_inference_steps: Option<usize>,
    /// Scale of the timestep in the boundary-condition scalings (default 10).
    pub timestep_scaling: Option<f64>,
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".to_string()
}

impl Default for SchedulerConfig {
    /// The scheduler config of CompVis/stable-diffusion-v1-4.
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".to_string(),
            trained_betas: None,
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            skip_prk_steps: Some(true),
            clip_sample: Some(false),
            clip_sample_range: None,
            prediction_type: None,
            timestep_spacing: None,
            thresholding: None,
            rescale_betas_zero_snr: None,
            algorithm_type: None,
            solver_order: None,
            solver_type: None,
            lower_order_final: None,
            euler_at_final: None,
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            use_lu_lambdas: None,
            use_flow_sigmas: None,
            final_sigmas_type: None,
            lambda_min_clipped: None,
            variance_type: None,
            interpolation_type: None,
            timestep_type: None,
            sigma_min: None,
            sigma_max: None,
            predict_x0: None,
            disable_corrector: None,
            original_inference_steps: None,
            timestep_scaling: None,
        }
    }
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a `scheduler_config.json`; `path` only names it in errors.
    pub fn from_json(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let text = replace_non_finite(text);
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.as_ref().to_path_buf(),
            source,
        })
    }

    /// `alphas_cumprod` exactly as diffusers computes it (float32 torch ops on the CPU), for the
    /// scheduler classes without a `rescale_betas_zero_snr` option (PNDM, Heun, LMS): diffusers
    /// ignores that key for them, and so does this.
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        let cumprod = cumprod_of(&self.betas()?)?;
        let out = Vec::<f32>::try_from(&cumprod)?;
        check_alphas_cumprod(&out, false)?;
        Ok(out)
    }

    /// `alphas_cumprod` for a scheduler class that has the `rescale_betas_zero_snr` option: with it
    /// on, the betas are rescaled to zero terminal SNR (Lin et al. 2023, diffusers'
    /// `rescale_zero_terminal_snr`), which makes the last value exactly 0, and `terminal` says what
    /// the class then does with that 0.
    pub(crate) fn alphas_cumprod_zero_snr(&self, terminal: ZeroSnrTerminal) -> Result<Vec<f32>> {
        if self.rescale_betas_zero_snr != Some(true) {
            return self.alphas_cumprod();
        }
        let betas = rescale_zero_terminal_snr(&self.betas()?)?;
        let mut out = Vec::<f32>::try_from(&cumprod_of(&betas)?)?;
        if let (ZeroSnrTerminal::Fp16Subnormal, Some(last)) = (terminal, out.last_mut()) {
            *last = 2f32.powi(-24);
        }
        check_alphas_cumprod(&out, terminal == ZeroSnrTerminal::Zero)?;
        Ok(out)
    }

    /// The betas of the schedule, float32, as diffusers builds them.
    fn betas(&self) -> Result<Tensor> {
        let n = self.num_train_timesteps;
        if n < 2 {
            return Err(config_error(format!(
                "num_train_timesteps must be at least 2, got {n}"
            )));
        }
        let opts = (Kind::Float, Device::Cpu);
        Ok(if let Some(betas) = &self.trained_betas {
            if betas.len() != n {
                return Err(config_error(format!(
                    "trained_betas has {} values but num_train_timesteps is {n}",
                    betas.len()
                )));
            }
            Tensor::from_slice(betas).to_kind(Kind::Float)
        } else {
            match self.beta_schedule.as_str() {
                "linear" => Tensor::f_linspace(self.beta_start, self.beta_end, n as i64, opts)?,
                "scaled_linear" => Tensor::f_linspace(
                    self.beta_start.sqrt(),
                    self.beta_end.sqrt(),
                    n as i64,
                    opts,
                )?
                .f_pow_tensor_scalar(2)?,
                "squaredcos_cap_v2" => {
                    Tensor::from_slice(&betas_for_alpha_bar_cosine(n)).to_kind(Kind::Float)
                }
                other => {
                    return Err(unsupported(
                        "beta_schedule",
                        other,
                        "expected linear, scaled_linear or squaredcos_cap_v2",
                    ));
                }
            }
        })
    }

    /// The prediction type, restricted to those a scheduler supports (default epsilon).
    pub(crate) fn prediction(&self, allowed: &[PredictionType]) -> Result<PredictionType> {
        let value = self.prediction_type.as_deref().unwrap_or("epsilon");
        let parsed = match value {
            "epsilon" => Some(PredictionType::Epsilon),
            "v_prediction" => Some(PredictionType::VPrediction),
            "sample" => Some(PredictionType::Sample),
            _ => None,
        };
        match parsed {
            Some(p) if allowed.contains(&p) => Ok(p),
            _ => {
                let names: Vec<&str> = allowed.iter().map(|p| p.name()).collect();
                Err(unsupported(
                    "prediction_type",
                    value,
                    &format!("this scheduler supports {}", names.join(", ")),
                ))
            }
        }
    }

    /// The timestep spacing, with the building scheduler's default.
    pub(crate) fn spacing(&self, default: Spacing) -> Result<Spacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("leading") => Ok(Spacing::Leading),
            Some("linspace") => Ok(Spacing::Linspace),
            Some("trailing") => Ok(Spacing::Trailing),
            Some(other) => Err(unsupported(
                "timestep_spacing",
                other,
                "expected leading, linspace or trailing",
            )),
        }
    }
}

/// What a scheduler class does with the terminal `alphas_cumprod` of 0 that zero-SNR rescaling
/// produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroSnrTerminal {
    /// Keeps it (DDIM, LCM: they only take square roots of it).
    Zero,
    /// Replaces it by 2**-24, the smallest positive float16 subnormal, so that the first sigma
    /// `((1 - a) / a) ** 0.5` stays finite (Euler, Euler ancestral, DPM-Solver++, UniPC).
    Fp16Subnormal,
}

/// `torch.cumprod(1.0 - betas, dim=0)` in float32 (libtorch accumulates it in double on the CPU).
fn cumprod_of(betas: &Tensor) -> Result<Tensor> {
    let alphas = betas.f_neg()?.f_add_scalar(1.0)?;
    Ok(alphas.f_cumprod(0, Kind::Float)?)
}

/// Every value must be in (0, 1]; the last may be exactly 0 where zero-SNR rescaling keeps it.
fn check_alphas_cumprod(values: &[f32], last_may_be_zero: bool) -> Result<()> {
    let n = values.len();
    let bad = values.iter().enumerate().any(|(i, &a)| {
        let low_ok = a > 0.0 || (last_may_be_zero && i + 1 == n && a == 0.0);
        !a.is_finite() || !low_ok || a > 1.0
    });
    if bad {
        return Err(config_error(
            "the beta schedule gives alphas_cumprod outside (0, 1]".to_string(),
        ));
    }
    Ok(())
}

/// Lin et al. 2023 (Algorithm 1), in float32 torch ops as diffusers' `rescale_zero_terminal_snr`:
/// shift `sqrt(alphas_cumprod)` so its last value is 0, scale it so its first value is unchanged,
/// and turn it back into betas (the last beta becomes 1).
fn rescale_zero_terminal_snr(betas: &Tensor) -> Result<Tensor> {
    let sqrt_bar = cumprod_of(betas)?.f_sqrt()?;
    let n = sqrt_bar.size()[0];
    let first = sqrt_bar.f_get(0)?;
    let last = sqrt_bar.f_get(n - 1)?;
    // The scale is a float32 0-d tensor in diffusers, computed before it multiplies.
    let scale = first.f_div(&first.f_sub(&last)?)?;
    let sqrt_bar = sqrt_bar.f_sub(&last)?.f_mul(&scale)?;
    let bar = sqrt_bar.f_pow_tensor_scalar(2)?;
    let ratios = bar
        .f_narrow(0, 1, n - 1)?
        .f_div(&bar.f_narrow(0, 0, n - 1)?)?;
    let alphas = Tensor::f_cat(&[bar.f_narrow(0, 0, 1)?, ratios], 0)?;
    Ok(alphas.f_neg()?.f_add_scalar(1.0)?)
}

/// Fails on a boolean option that is set but not implemented.
pub(crate) fn reject_flag(key: &str, value: Option<bool>) -> Result<()> {
    if value == Some(true) {
        return Err(unsupported(key, "true", "not implemented"));
    }
    Ok(())
}

/// Checks the number of inference steps against the training schedule.
pub(crate) fn check_steps(config: &SchedulerConfig, steps: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::InvalidArgument("steps must be at least 1".into()));
    }
    if steps > config.num_train_timesteps {
        return Err(Error::InvalidArgument(format!(
            "steps ({steps}) cannot exceed num_train_timesteps ({})",
            config.num_train_timesteps
        )));
    }
    Ok(())
}

pub(crate) fn unsupported(key: &str, value: &str, reason: &str) -> Error {
    Error::Unsupported {
        path: PathBuf::from(CONFIG_PATH),
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

pub(crate) fn config_error(message: String) -> Error {
    Error::Config {
        path: PathBuf::from(CONFIG_PATH),
        message,
    }
}

/// What the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    fn name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

/// How inference timesteps are laid out over the training schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

/// Glide's cosine schedule (`betas_for_alpha_bar`, computed in double like diffusers, then float32).
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, computed with libtorch on the whole float32
/// array as diffusers does.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Result<Vec<f32>> {
    let ac = Tensor::from_slice(alphas_cumprod);
    let sigmas = ac.f_neg()?.f_add_scalar(1.0)?.f_div(&ac)?.f_sqrt()?;
    Ok(Vec::<f32>::try_from(&sigmas)?)
}

/// `tensor ** 0.5` (= `torch.sqrt`) of a float32 scalar tensor.
pub(crate) fn torch_sqrt(x: f32) -> Result<f32> {
    Ok(Tensor::from(x).f_sqrt()?.f_double_value(&[])? as f32)
}

/// The factor libtorch really applies in diffusers' `coeff * tensor`, where `coeff` is a float32
/// scalar tensor on the left. On the CPU, libtorch first casts a left-hand scalar to the tensor's
/// kind, which rounds it for half/bfloat16 tensors; CUDA kernels (and any right-hand scalar, as in
/// `tensor * coeff` / `tensor / coeff`) keep it in float32. Multiply by the returned value on the
/// right to get the same result.
pub(crate) fn left_coeff(coeff: f32, tensor: &Tensor) -> f64 {
    match tensor.kind() {
        Kind::Half | Kind::BFloat16 if tensor.device() == Device::Cpu => {
            Tensor::from(coeff).to_kind(tensor.kind()).double_value(&[])
        }
        _ => f64::from(coeff),
    }
}

/// `torch.log` of a float32 scalar tensor.
pub(crate) fn torch_ln(x: f32) -> Result<f32> {
    Ok(Tensor::from(x).f_log()?.f_double_value(&[])? as f32)
}

/// `torch.exp` of a float32 scalar tensor.
pub(crate) fn torch_exp(x: f32) -> Result<f32> {
    Ok(Tensor::from(x).f_exp()?.f_double_value(&[])? as f32)
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let delta = stop - start;
    let div = num as f64 - 1.0;
    let mut y: Vec<f64> = if num > 1 {
        let step = delta / div;
        if step == 0.0 {
            (0..num).map(|i| i as f64 / div * delta + start).collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        vec![0.0 * delta + start]
    };
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.linspace(start, stop, num, endpoint=False)` (float64).
pub(crate) fn np_linspace_open(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / num as f64;
    (0..num)
        .map(|i| {
            if step == 0.0 {
                i as f64 / num as f64 * (stop - start) + start
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// `np.arange(start, stop, step)` for float64 arguments, including numpy's way of filling the
/// values (`start + i * ((start + step) - start)`).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let second = start + step;
        let delta = second - start;
        out.push(second);
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// `np.interp(x, np.arange(len(fp)), fp)` in float64, as numpy computes it.
pub(crate) fn np_interp_unit_grid(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    let last = n - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    if xj == x {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / ((j + 1) as f64 - xj);
    let res = slope * (x - xj) + y0;
    if res.is_nan() {
        let res = slope * (x - (j + 1) as f64) + y1;
        if res.is_nan() && y0 == y1 {
            return y0;
        }
        return res;
    }
    res
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` tokens Python's json module writes (not
/// valid JSON) by `null`, outside strings.
fn replace_non_finite(text: &str) -> Cow<'_, str> {
    if !text.contains("Infinity") && !text.contains("NaN") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(token) = token {
                out.push_str("null");
                rest = &rest[token.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD14: &str = r#"{
      "_class_name": "PNDMScheduler",
      "_diffusers_version": "0.7.0.dev0",
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "num_train_timesteps": 1000,
      "set_alpha_to_one": false,
      "skip_prk_steps": true,
      "steps_offset": 1,
      "trained_betas": null,
      "clip_sample": false
    }"#;

    #[test]
    fn parses_sd14_config_like_default() {
        let c = SchedulerConfig::from_json(SD14, CONFIG_PATH).unwrap();
        let d = SchedulerConfig::default();
        assert_eq!(c.num_train_timesteps, d.num_train_timesteps);
        assert_eq!(c.beta_start, d.beta_start);
        assert_eq!(c.beta_end, d.beta_end);
        assert_eq!(c.beta_schedule, d.beta_schedule);
        assert_eq!(c.trained_betas, None);
        assert_eq!(c.steps_offset, 1);
        assert_eq!(c.set_alpha_to_one, Some(false));
        assert_eq!(c.skip_prk_steps, Some(true));
        assert_eq!(c.clip_sample, Some(false));
        assert_eq!(c.prediction_type, None);
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.alphas_cumprod().unwrap(), d.alphas_cumprod().unwrap());
    }

    #[test]
    fn missing_keys_take_diffusers_defaults() {
        let c = SchedulerConfig::from_json("{}", CONFIG_PATH).unwrap();
        assert_eq!(c.num_train_timesteps, 1000);
        assert_eq!(c.beta_start, 0.0001);
        assert_eq!(c.beta_end, 0.02);
        assert_eq!(c.beta_schedule, "linear");
        assert_eq!(c.steps_offset, 0);
        assert_eq!(c.spacing(Spacing::Leading).unwrap(), Spacing::Leading);
        assert_eq!(c.spacing(Spacing::Linspace).unwrap(), Spacing::Linspace);
        assert_eq!(
            c.prediction(&[PredictionType::Epsilon]).unwrap(),
            PredictionType::Epsilon
        );
    }

    #[test]
    fn python_infinity_is_read_as_default() {
        let text = r#"{"lambda_min_clipped": -Infinity, "timestep_spacing": "NaN-Infinity"}"#;
        let c = SchedulerConfig::from_json(text, CONFIG_PATH).unwrap();
        assert_eq!(c.lambda_min_clipped, None);
        assert_eq!(c.timestep_spacing.as_deref(), Some("NaN-Infinity"));
    }

    #[test]
    fn bad_json_and_missing_file_name_the_path() {
        let err = SchedulerConfig::from_json("{", "x/scheduler_config.json").unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");
        assert!(err.to_string().contains("x/scheduler_config.json"));
        let err = SchedulerConfig::from_file("/nonexistent/scheduler_config.json").unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    }

    #[test]
    fn from_file_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler_config.json");
        std::fs::write(&path, SD14).unwrap();
        let c = SchedulerConfig::from_file(&path).unwrap();
        assert_eq!(c.beta_schedule, "scaled_linear");
    }

    #[test]
    fn alphas_cumprod_matches_torch() {
        // torch: PNDMScheduler(**sd14).alphas_cumprod[[0, 1, 500, 998, 999]]
        let ac = SchedulerConfig::default().alphas_cumprod().unwrap();
        assert_eq!(ac.len(), 1000);
        assert_eq!(ac[0], 0.99915_f32);
        assert_eq!(ac[1], 0.998296_f32);
        assert_eq!(ac[500], 0.27633247_f32);
        assert_eq!(ac[998], 0.0047166958_f32);
        assert_eq!(ac[999], 0.004660095_f32);
    }

    #[test]
    fn other_beta_schedules() {
        let c = SchedulerConfig::from_json("{}", CONFIG_PATH).unwrap();
        let ac = c.alphas_cumprod().unwrap();
        // torch: DDIMScheduler().alphas_cumprod[[0, 999]]
        assert_eq!(ac[0], 0.9999_f32);
        assert_eq!(ac[999], 4.0358304e-05_f32);
        let c = SchedulerConfig::from_json(r#"{"beta_schedule":"squaredcos_cap_v2"}"#, CONFIG_PATH)
            .unwrap();
        let ac = c.alphas_cumprod().unwrap();
        // torch: DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod[[0, 500, 999]]
        assert_eq!(ac[0], 0.9999587_f32);
        assert_eq!(ac[500], 0.49228504_f32);
        assert_eq!(ac[999], 2.428735e-09_f32);
        let c = SchedulerConfig::from_json(
            r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3]}"#,
            CONFIG_PATH,
        )
        .unwrap();
        let ac = c.alphas_cumprod().unwrap();
        // torch: DDIMScheduler(num_train_timesteps=3, trained_betas=[0.1, 0.2, 0.3]).alphas_cumprod
        assert_eq!(ac, vec![0.9_f32, 0.71999997, 0.504]);
    }

    #[test]
    fn zero_snr_rescaling_matches_diffusers() {
        // DDIMScheduler(**sd14, rescale_betas_zero_snr=True).alphas_cumprod[[0, 1, 500, 998, 999]];
        // EulerDiscreteScheduler's is the same but for its last value, 2**-24.
        let mut c = SchedulerConfig {
            rescale_betas_zero_snr: Some(true),
            ..SchedulerConfig::default()
        };
        let ac = c.alphas_cumprod_zero_snr(ZeroSnrTerminal::Zero).unwrap();
        assert_eq!(
            [ac[0], ac[1], ac[500], ac[998], ac[999]],
            [0.99915_f32, 0.9982335, 0.24101855, 1.967963e-07, 0.0]
        );
        let ac = c
            .alphas_cumprod_zero_snr(ZeroSnrTerminal::Fp16Subnormal)
            .unwrap();
        assert_eq!(ac[998], 1.967963e-07_f32);
        assert_eq!(ac[999], 5.9604645e-08_f32);
        // Classes without the option ignore it.
        assert_eq!(
            c.alphas_cumprod().unwrap(),
            SchedulerConfig::default().alphas_cumprod().unwrap()
        );
        c.rescale_betas_zero_snr = Some(false);
        assert_eq!(
            c.alphas_cumprod_zero_snr(ZeroSnrTerminal::Zero).unwrap(),
            c.alphas_cumprod().unwrap()
        );
    }

    #[test]
    fn unsupported_beta_schedule() {
        let c = SchedulerConfig::from_json(r#"{"beta_schedule":"sigmoid"}"#, CONFIG_PATH).unwrap();
        let err = c.alphas_cumprod().unwrap_err();
        assert!(matches!(err, Error::Unsupported { ref key, .. } if key == "beta_schedule"));
        assert!(err.to_string().contains(CONFIG_PATH));
        let c = SchedulerConfig::from_json(
            r#"{"num_train_timesteps": 4, "trained_betas": [0.1]}"#,
            CONFIG_PATH,
        )
        .unwrap();
        assert!(matches!(c.alphas_cumprod(), Err(Error::Config { .. })));
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 4.0, 5), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(np_arange(10.0, 0.0, -2.5), vec![10.0, 7.5, 5.0, 2.5]);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
        let fp = [1.0_f32, 3.0, 7.0];
        assert_eq!(np_interp_unit_grid(0.5, &fp), 2.0);
        assert_eq!(np_interp_unit_grid(1.25, &fp), 4.0);
        assert_eq!(np_interp_unit_grid(2.0, &fp), 7.0);
        assert_eq!(np_interp_unit_grid(5.0, &fp), 7.0);
        assert_eq!(np_interp_unit_grid(-1.0, &fp), 1.0);
    }
}
