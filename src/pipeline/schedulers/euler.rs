//! Euler (`EulerDiscreteScheduler`): one explicit Euler step of the probability-flow ODE in sigma
//! space per UNet evaluation (k-diffusion's `sample_euler`). StableDiffusionPipeline leaves
//! `s_churn` at 0, so no noise is ever added and the sampler is deterministic.
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, Spacing, ZeroSnrTerminal, check_steps, left_coeff,
    reject_flag, torch_sqrt, train_sigmas, unsupported,
};
use super::sigmas::{KarrasRange, SigmaSteps, discrete_schedule, karras_option};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

pub struct EulerScheduler {
    steps: SigmaSteps,
    prediction: PredictionType,
}

impl EulerScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        let prediction =
            config.prediction(&[PredictionType::Epsilon, PredictionType::VPrediction])?;
        match config.interpolation_type.as_deref() {
            None | Some("linear") => {}
            Some(other) => {
                return Err(unsupported(
                    "interpolation_type",
                    other,
                    "only linear is implemented",
                ));
            }
        }
        match config.timestep_type.as_deref() {
            None | Some("discrete") => {}
            // "continuous" only changes the timesteps for v_prediction (to 0.25 * ln(sigma)).
            Some("continuous") if prediction == PredictionType::Epsilon => {}
            Some(other) => {
                return Err(unsupported(
                    "timestep_type",
                    other,
                    "continuous timesteps with v_prediction are not implemented",
                ));
            }
        }
        let final_sigma_zero = match config.final_sigmas_type.as_deref() {
            None | Some("zero") => true,
            Some("sigma_min") => false,
            Some(other) => {
                return Err(unsupported(
                    "final_sigmas_type",
                    other,
                    "expected zero or sigma_min",
                ));
            }
        };
        let spacing = config.spacing(Spacing::Linspace)?;
        let alphas_cumprod = config.alphas_cumprod_zero_snr(ZeroSnrTerminal::Fp16Subnormal)?;
        let train = train_sigmas(&alphas_cumprod)?;
        let karras = karras_option(
            config,
            KarrasRange {
                sigma_min: config.sigma_min,
                sigma_max: config.sigma_max,
            },
        );
        let schedule = discrete_schedule(config, steps, spacing, karras, &train);

        let mut sigmas = schedule.sigmas;
        sigmas.push(if final_sigma_zero {
            0.0
        } else {
            torch_sqrt((1.0 - alphas_cumprod[0]) / alphas_cumprod[0])?
        });
        Ok(EulerScheduler {
            steps: SigmaSteps::new(
                schedule.timesteps.iter().map(|&t| f64::from(t)).collect(),
                sigmas,
                spacing,
            )?,
            prediction,
        })
    }

    /// The sigmas (one per timestep, then the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.steps.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.steps.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Tensor {
        self.steps.scale_model_input(sample, step_index)
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        self.steps.start_at(begin, "Euler")
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.steps.add_noise(original, noise, 0)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.steps.add_noise(original, noise, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if step_index >= self.steps.timesteps.len() {
            return Err(Error::InvalidArgument(format!(
                "Euler: step {step_index} out of range ({} steps)",
                self.steps.timesteps.len()
            )));
        }
        // With s_churn = 0, gamma is 0 and sigma_hat is sigma itself.
        let sigma = self.steps.sigmas[step_index];
        let sample = sample.to_kind(Kind::Float);
        let pred_original_sample = match self.prediction {
            PredictionType::VPrediction => {
                let c_out = -sigma / torch_sqrt(sigma * sigma + 1.0)?;
                model_output * f64::from(c_out) + &sample / f64::from(sigma * sigma + 1.0)
            }
            // `sigma * model_output` is computed in the model output's kind, as in diffusers.
            _ => &sample - model_output * left_coeff(sigma, model_output),
        };
        let derivative = (&sample - pred_original_sample) / f64::from(sigma);
        let dt = self.steps.sigmas[step_index + 1] - sigma;
        let prev_sample = &sample + derivative * f64::from(dt);
        Ok(prev_sample.to_kind(model_output.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedulers::test_layouts;
    use crate::pipeline::schedulers::test_util::{
        assert_close, check_layouts, check_reference_steps, check_sigma_scheduler_refusals, sd14, t,
    };

    #[test]
    fn zero_snr_trailing_matches_diffusers() {
        // c = dict(sd14, rescale_betas_zero_snr=True, timestep_spacing="trailing")
        // s = EulerDiscreteScheduler(**c); s.set_timesteps(10): the terminal alphas_cumprod of 0
        // becomes 2**-24, so the first sigma is about 4096 instead of infinite.
        let mut c = sd14();
        c.rescale_betas_zero_snr = Some(true);
        c.timestep_spacing = Some("trailing".into());
        let s = EulerScheduler::new(&c, 10).unwrap();
        let expected: Vec<f64> = (0..10).map(|i| (999 - 100 * i) as f64).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        assert_eq!(s.sigmas(), &ZERO_SNR_SIGMAS_10);
        assert_eq!(s.init_noise_sigma(), f64::from(4095.9998_f32));
    }

    const ZERO_SNR_SIGMAS_10: [f32; 11] = [
        4095.9998, 18.130056, 7.410707, 4.1141853, 2.604856, 1.7680811, 1.2413752, 0.8747437,
        0.5947521, 0.35498953, 0.0,
    ];

    #[test]
    fn layouts_match_diffusers() {
        check_layouts(test_layouts::EULER, |c, steps| {
            let s = EulerScheduler::new(c, steps).unwrap();
            (
                s.timesteps().to_vec(),
                s.sigmas().to_vec(),
                s.init_noise_sigma(),
            )
        });
    }

    #[test]
    fn karras_scale_model_input_and_options() {
        // s = EulerDiscreteScheduler.from_config(sd14, use_karras_sigmas=True); s.set_timesteps(10);
        // s._step_index = 3; s.scale_model_input(sample, s.timesteps[3])
        let mut c = sd14();
        c.use_karras_sigmas = Some(true);
        let s = EulerScheduler::new(&c, 10).unwrap();
        let sample = t(&[0.5, -1.0, 1.5, 0.25]);
        assert_close(
            &s.scale_model_input(&sample, 3),
            &[
                0.15048165619373322,
                -0.30096331238746643,
                0.45144498348236084,
                0.07524082809686661,
            ],
        );
        // sigma_min/sigma_max pin the Karras range; final_sigmas_type "sigma_min" ends above 0.
        c.sigma_min = Some(0.1);
        c.sigma_max = Some(10.0);
        c.final_sigmas_type = Some("sigma_min".into());
        let s = EulerScheduler::new(&c, 10).unwrap();
        assert_eq!(s.sigmas()[0], 10.0);
        assert!((s.sigmas()[9] - 0.1).abs() < 1e-6);
        assert_eq!(s.sigmas()[10], 0.029167533);
        let mut c = sd14();
        c.interpolation_type = Some("log_linear".into());
        assert!(matches!(
            EulerScheduler::new(&c, 10),
            Err(Error::Unsupported { .. })
        ));
        let mut c = sd14();
        c.timestep_type = Some("continuous".into());
        assert!(EulerScheduler::new(&c, 10).is_ok());
        c.prediction_type = Some("v_prediction".into());
        assert!(matches!(
            EulerScheduler::new(&c, 10),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn steps_match_diffusers() {
        check_reference_steps(
            |c| Box::new(EulerScheduler::new(c, 10).unwrap()),
            &STEP_INDICES,
            [&EXPECTED_EPS, &EXPECTED_V, &EXPECTED_KARRAS_V],
        );
    }

    #[test]
    fn rejects_unsupported_options() {
        check_sigma_scheduler_refusals(|c| EulerScheduler::new(c, 10));
    }

    // Reference steps, from:
    // # Reference steps for the unit tests (diffusers 0.42.1, torch 2.11, float32 CPU).
    // import torch
    // from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler
    // sd14 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    //             set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False)
    // t = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 2, 1, 2)
    // sample, out = t([0.5, -1.0, 1.5, 0.25]), t([0.3, -0.2, 0.1, 0.4])
    // def show(name, x): print(f"{name}: {x.flatten().tolist()}")
    // def run(cls, indices, **kw):
    //     # Steps 0..max(indices) in order, each from the same sample and model output.
    //     s = cls.from_config(sd14, **kw); s.set_timesteps(10)
    //     res = []
    //     for i in range(max(indices) + 1):
    //         if cls is EulerDiscreteScheduler:
    //             s._step_index = i  # Euler keeps no state: jump straight to the step
    //         else:
    //             s._step_index = i
    //         y = s.step(out, s.timesteps[i], sample).prev_sample
    //         if i in indices: res.append(y)
    //     return res
    // for cls, idx in [(EulerDiscreteScheduler, [0, 5, 9]), (HeunDiscreteScheduler, [0, 1, 2, 18]), (LMSDiscreteScheduler, [0, 1, 3, 4, 9])]:
    //     for kw in [dict(), dict(prediction_type="v_prediction"), dict(use_karras_sigmas=True, prediction_type="v_prediction")]:
    //         for i, y in zip(idx, run(cls, idx, **kw)):
    //             show(f"{cls.__name__} {kw} step {i}", y)
    // s = EulerDiscreteScheduler.from_config(sd14, use_karras_sigmas=True); s.set_timesteps(10); s._step_index = 3
    // show("Euler karras scale_model_input 3", s.scale_model_input(sample, s.timesteps[3]))
    const STEP_INDICES: [usize; 3] = [0, 5, 9];
    const EXPECTED_EPS: [[f64; 4]; 3] = [
        [
            -1.532428503036499,
            0.354952335357666,
            0.822523832321167,
            -2.459904670715332,
        ],
        [
            0.376228928565979,
            -0.9174859523773193,
            1.4587429761886597,
            0.08497191965579987,
        ],
        [
            0.4912497401237488,
            -0.9941664934158325,
            1.4970831871032715,
            0.23833298683166504,
        ],
    ];
    const EXPECTED_V: [[f64; 4]; 3] = [
        [
            0.13055676221847534,
            -0.44610482454299927,
            0.761652946472168,
            -0.05034121870994568,
        ],
        [
            0.3273753523826599,
            -0.7532187104225159,
            1.179062008857727,
            0.1021452248096466,
        ],
        [
            0.49082842469215393,
            -0.9933189153671265,
            1.4958094358444214,
            0.23812542855739594,
        ],
    ];
    const EXPECTED_KARRAS_V: [[f64; 4]; 3] = [
        [
            0.199433833360672,
            -0.5493701696395874,
            0.8993065357208252,
            0.0056528449058532715,
        ],
        [
            0.2802377939224243,
            -0.6983996629714966,
            1.1165615320205688,
            0.053916335105895996,
        ],
        [
            0.49082842469215393,
            -0.9933189153671265,
            1.4958094358444214,
            0.23812542855739594,
        ],
    ];
}
