//! Heun (`HeunDiscreteScheduler`): the second-order (trapezoidal) method of Karras et al., Algorithm
//! 1 without churn. Every step between two sigmas evaluates the UNet twice: an Euler predictor at the
//! current sigma, then a corrector at the next sigma that averages the two slopes. The last step,
//! down to sigma 0, is a plain Euler step.
//!
//! As in diffusers, the timesteps list every evaluation: `[t0, t1, t1, t2, t2, …, t(n-1), t(n-1)]`
//! (2n - 1 entries for n steps), and `step` is called once per entry. Even entries are predictors,
//! odd entries correctors.
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, Spacing, check_steps, left_coeff, reject_flag, torch_sqrt,
    train_sigmas,
};
use super::sigmas::{KarrasRange, SigmaSteps, discrete_schedule, karras_option};
use crate::error::Result;
use tch::Tensor;

pub struct HeunScheduler {
    steps: SigmaSteps,
    prediction: PredictionType,
    /// `clip_sample_range` when `clip_sample` is on: x0 is clamped to ±range.
    clip_range: Option<f64>,
    /// What the predictor left for its corrector: its slope, its step size and its input sample.
    pending: Option<Predictor>,
    step_index: usize,
}

struct Predictor {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

impl HeunScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        let prediction =
            config.prediction(&[PredictionType::Epsilon, PredictionType::VPrediction])?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let alphas_cumprod = config.alphas_cumprod()?;
        let train = train_sigmas(&alphas_cumprod)?;
        // Heun's config has no sigma_min/sigma_max: the Karras range is the interpolated one.
        let karras = karras_option(config, KarrasRange::default());
        let schedule = discrete_schedule(config, steps, spacing, karras, &train);

        let mut timesteps = Vec::with_capacity(2 * steps - 1);
        let mut sigmas = Vec::with_capacity(2 * steps);
        for (i, (&t, &s)) in schedule.timesteps.iter().zip(&schedule.sigmas).enumerate() {
            let repeats = if i == 0 { 1 } else { 2 };
            for _ in 0..repeats {
                timesteps.push(f64::from(t));
                sigmas.push(s);
            }
        }
        sigmas.push(0.0);

        let clip_range = if config.clip_sample == Some(true) {
            Some(config.clip_sample_range.unwrap_or(1.0))
        } else {
            None
        };
        Ok(HeunScheduler {
            steps: SigmaSteps::new(timesteps, sigmas, spacing)?,
            prediction,
            clip_range,
            pending: None,
            step_index: 0,
        })
    }

    /// The sigmas (one per entry of `timesteps`, then 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }

    /// x0 predicted from the model output at `sigma`, in the inputs' kind (diffusers does not
    /// upcast in Heun).
    fn pred_original_sample(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        let x0 = match self.prediction {
            PredictionType::VPrediction => {
                let c_out = -sigma / torch_sqrt(sigma * sigma + 1.0)?;
                model_output * f64::from(c_out) + sample / f64::from(sigma * sigma + 1.0)
            }
            _ => sample - model_output * left_coeff(sigma, model_output),
        };
        Ok(match self.clip_range {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        })
    }
}

impl Scheduler for HeunScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.steps.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.steps.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Tensor {
        self.steps.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n = self.steps.timesteps.len();
        super::check_step_order("Heun", step_index, self.step_index, n)?;
        let prev_sample = match self.pending.take() {
            // Predictor: an Euler step from this sigma to the next, remembered for the corrector.
            None => {
                let sigma = self.steps.sigmas[step_index];
                let sigma_next = self.steps.sigmas[step_index + 1];
                let x0 = self.pred_original_sample(model_output, sample, sigma)?;
                let derivative = (sample - x0) / f64::from(sigma);
                let dt = sigma_next - sigma;
                let prev = sample + &derivative * f64::from(dt);
                self.pending = Some(Predictor {
                    derivative,
                    dt,
                    sample: sample.shallow_clone(),
                });
                prev
            }
            // Corrector: the slope at the predicted point (the UNet ran at the next sigma), averaged
            // with the predictor's, applied from the predictor's input sample.
            Some(p) => {
                let sigma_next = self.steps.sigmas[step_index];
                let x0 = self.pred_original_sample(model_output, sample, sigma_next)?;
                let derivative = (sample - x0) / f64::from(sigma_next);
                let derivative = (p.derivative + derivative) / 2.0;
                p.sample + derivative * f64::from(p.dt)
            }
        };
        self.step_index += 1;
        Ok(prev_sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::pipeline::schedulers::test_layouts;
    use crate::pipeline::schedulers::test_util::{
        check_layouts, check_reference_steps, check_sigma_scheduler_refusals, sd14, t,
    };

    #[test]
    fn layouts_match_diffusers() {
        check_layouts(test_layouts::HEUN, |c, steps| {
            let s = HeunScheduler::new(c, steps).unwrap();
            assert_eq!(s.timesteps().len(), 2 * steps - 1);
            (
                s.timesteps().to_vec(),
                s.sigmas().to_vec(),
                s.init_noise_sigma(),
            )
        });
    }

    #[test]
    fn steps_must_come_in_order() {
        let sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let mut s = HeunScheduler::new(&sd14(), 10).unwrap();
        assert!(matches!(
            s.step(&sample, 1, &sample, None),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn steps_match_diffusers() {
        check_reference_steps(
            |c| Box::new(HeunScheduler::new(c, 10).unwrap()),
            &STEP_INDICES,
            [&EXPECTED_EPS, &EXPECTED_V, &EXPECTED_KARRAS_V],
        );
    }

    #[test]
    fn rejects_unsupported_options() {
        check_sigma_scheduler_refusals(|c| HeunScheduler::new(c, 10));
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
    const STEP_INDICES: [usize; 4] = [0, 1, 2, 18];
    const EXPECTED_EPS: [[f64; 4]; 4] = [
        [
            -1.532428503036499,
            0.354952335357666,
            0.822523832321167,
            -2.459904670715332,
        ],
        [
            -1.532428503036499,
            0.354952335357666,
            0.822523832321167,
            -2.459904670715332,
        ],
        [
            -0.46921277046203613,
            -0.35385817289352417,
            1.1769291162490845,
            -1.0422836542129517,
        ],
        [
            0.4912497401237488,
            -0.9941664934158325,
            1.4970831871032715,
            0.23833298683166504,
        ],
    ];
    const EXPECTED_V: [[f64; 4]; 4] = [
        [
            0.13055676221847534,
            -0.44610482454299927,
            0.761652946472168,
            -0.05034121870994568,
        ],
        [
            -0.025877416133880615,
            -0.2121797800064087,
            0.4502371549606323,
            -0.17789795994758606,
        ],
        [
            0.17462316155433655,
            -0.5127560496330261,
            0.8508889675140381,
            -0.014882028102874756,
        ],
        [
            0.49082842469215393,
            -0.9933189153671265,
            1.4958094358444214,
            0.23812542855739594,
        ],
    ];
    const EXPECTED_KARRAS_V: [[f64; 4]; 4] = [
        [
            0.199433833360672,
            -0.5493701696395874,
            0.8993065357208252,
            0.0056528449058532715,
        ],
        [
            0.10987019538879395,
            -0.41536492109298706,
            0.7208596467971802,
            -0.06733018159866333,
        ],
        [
            0.18455052375793457,
            -0.5274175405502319,
            0.8702845573425293,
            -0.006672471761703491,
        ],
        [
            0.49082842469215393,
            -0.9933189153671265,
            1.4958094358444214,
            0.23812542855739594,
        ],
    ];
}
