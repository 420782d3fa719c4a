//! LCM (`LCMScheduler`), the multistep sampler of latent consistency models: each step maps the
//! latents straight to a denoised estimate through the consistency model's boundary-condition
//! scalings, then (except at the last step) re-noises it to the next timestep with fresh noise.
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, ZeroSnrTerminal, check_steps, config_error, left_coeff,
    np_linspace_open, reject_flag, torch_sqrt,
};
use crate::error::{Error, Result};
use tch::Tensor;

/// The consistency models' sigma_data, which diffusers hard-codes.
const SIGMA_DATA_SQ: f32 = 0.25;

pub struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
    prediction: PredictionType,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f64>,
    timestep_scaling: f32,
}

impl LcmScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        reject_flag("thresholding", config.thresholding)?;
        let prediction = config.prediction(&[
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ])?;
        // LCM keeps a terminal alphas_cumprod of 0 (it only takes square roots of it).
        let alphas_cumprod = config.alphas_cumprod_zero_snr(ZeroSnrTerminal::Zero)?;
        // LCM's own default is set_alpha_to_one = true.
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let clip = config
            .clip_sample
            .unwrap_or(false)
            .then(|| config.clip_sample_range.unwrap_or(1.0));

        // The schedule is a subset of the distillation schedule of `original_inference_steps`
        // evenly spaced timesteps (k - 1, 2k - 1, …, n_train - 1). diffusers 0.42.1's
        // LCMScheduler.set_timesteps does not read `timestep_spacing`, so neither does this.
        let n_train = config.num_train_timesteps;
        let original = config.original_inference_steps.unwrap_or(50);
        if original == 0 || original > n_train {
            return Err(config_error(format!(
                "original_inference_steps ({original}) must be between 1 and num_train_timesteps ({n_train})"
            )));
        }
        if steps > original {
            return Err(Error::InvalidArgument(format!(
                "LCM: steps ({steps}) cannot exceed original_inference_steps ({original})"
            )));
        }
        let k = (n_train / original) as i64;
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k - 1).collect();
        let timesteps_int: Vec<i64> = np_linspace_open(0.0, origin.len() as f64, steps)
            .into_iter()
            .map(|x| origin[x.floor() as usize])
            .collect();

        Ok(LcmScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
            prediction,
            clip,
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0) as f32,
        })
    }

    fn alpha_at(&self, timestep: i64) -> Result<f32> {
        if timestep < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(timestep as usize)
            .copied()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("LCM: timestep {timestep} is out of range"))
            })
    }

    /// `(c_skip, c_out)` of the consistency model's boundary condition at `timestep`: they make the
    /// model the identity at t = 0. In float32, as diffusers computes them on the timestep tensor.
    fn boundary_scalings(&self, timestep: i64) -> Result<(f32, f32)> {
        let scaled = timestep as f32 * self.timestep_scaling;
        let denom = scaled * scaled + SIGMA_DATA_SQ;
        Ok((SIGMA_DATA_SQ / denom, scaled / torch_sqrt(denom)?))
    }
}

impl Scheduler for LcmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        super::drop_front(&mut self.timesteps_int, begin, "LCM")?;
        super::drop_front(&mut self.timesteps, begin, "LCM")
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.add_noise_at(original, noise, 0)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = *self.timesteps_int.get(step_index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "LCM: no step {step_index} to add noise at ({} steps)",
                self.timesteps_int.len()
            ))
        })?;
        super::add_noise_ddpm(&self.alphas_cumprod, t, original, noise)
    }

    /// Fresh noise re-enters at every step but the last.
    fn needs_noise(&self) -> bool {
        true
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n = self.timesteps_int.len();
        let timestep = *self.timesteps_int.get(step_index).ok_or_else(|| {
            Error::InvalidArgument(format!("LCM: step {step_index} out of range ({n} steps)"))
        })?;
        let last = step_index + 1 == n;
        // At the last step diffusers looks up the current timestep again (the value is unused).
        let prev_timestep = if last {
            timestep
        } else {
            self.timesteps_int[step_index + 1]
        };
        let alpha_prod_t = self.alpha_at(timestep)?;
        let alpha_prod_t_prev = self.alpha_at(prev_timestep)?;
        let sqrt_alpha = torch_sqrt(alpha_prod_t)?;
        let sqrt_beta = torch_sqrt(1.0 - alpha_prod_t)?;
        let (c_skip, c_out) = self.boundary_scalings(timestep)?;

        // Coefficients on the left of a tensor in diffusers go through `left_coeff`.
        let (mo, s) = (model_output, sample);
        let pred_original_sample = match self.prediction {
            PredictionType::Epsilon => (s - mo * left_coeff(sqrt_beta, mo)) / f64::from(sqrt_alpha),
            PredictionType::Sample => mo.shallow_clone(),
            PredictionType::VPrediction => {
                s * left_coeff(sqrt_alpha, s) - mo * left_coeff(sqrt_beta, mo)
            }
        };
        let pred_original_sample = match self.clip {
            Some(range) => pred_original_sample.clamp(-range, range),
            None => pred_original_sample,
        };
        let denoised = &pred_original_sample * left_coeff(c_out, &pred_original_sample)
            + s * left_coeff(c_skip, s);
        if last {
            return Ok(denoised);
        }
        let noise =
            noise.ok_or_else(|| Error::InvalidArgument("LCM: step needs a noise tensor".into()))?;
        let noise_coeff = torch_sqrt(1.0 - alpha_prod_t_prev)?;
        Ok(
            &denoised * left_coeff(torch_sqrt(alpha_prod_t_prev)?, &denoised)
                + noise * left_coeff(noise_coeff, noise),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedulers::test_util::{assert_close, sd14, t};

    #[test]
    fn timesteps_match_diffusers() {
        // s = LCMScheduler(**sd14, **kw); s.set_timesteps(n); s.timesteps
        for (steps, original, expected) in [
            (4, None, &[999, 759, 499, 259][..]),
            (
                10,
                None,
                &[999, 899, 799, 699, 599, 499, 399, 299, 199, 99][..],
            ),
            (1, None, &[999][..]),
            (7, None, &[999, 859, 719, 579, 439, 299, 159][..]),
            (3, Some(20), &[999, 699, 349][..]),
        ] {
            let mut c = sd14();
            c.original_inference_steps = original;
            let s = LcmScheduler::new(&c, steps).unwrap();
            let expected: Vec<f64> = expected.iter().map(|&t| t as f64).collect();
            assert_eq!(s.timesteps(), expected.as_slice(), "{steps} steps");
            assert_eq!(s.init_noise_sigma(), 1.0);
        }
        assert!(matches!(
            LcmScheduler::new(&sd14(), 51),
            Err(Error::InvalidArgument(_))
        ));
        let mut c = sd14();
        c.original_inference_steps = Some(2000);
        assert!(matches!(
            LcmScheduler::new(&c, 4),
            Err(Error::Config { .. })
        ));
        c.original_inference_steps = None;
        c.thresholding = Some(true);
        assert!(matches!(
            LcmScheduler::new(&c, 4),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn steps_match_diffusers() {
        // Reference (diffusers 0.42.1, torch 2.11, float32 CPU): s = LCMScheduler(**sd14, **kw);
        // s.set_timesteps(4); s._step_index = i; s.step(out, s.timesteps[i], sample) with
        // randn_tensor patched to return `noise`, for i = 0, 2, 3 (3: the last step, no noise).
        let sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let out = t(&[0.3, -0.2, 0.1, 0.4]);
        let noise = t(&[0.7, -0.1, -1.2, 0.05]);
        for (prediction, expected) in [("epsilon", &EXPECTED_EPS), ("v_prediction", &EXPECTED_V)] {
            let mut c = sd14();
            c.prediction_type = Some(prediction.into());
            let mut s = LcmScheduler::new(&c, 4).unwrap();
            assert!(s.needs_noise());
            assert!(matches!(
                s.step(&out, 0, &sample, None),
                Err(Error::InvalidArgument(_))
            ));
            for (&i, e) in [0usize, 2, 3].iter().zip(expected.iter()) {
                let noise = (i != 3).then_some(&noise);
                assert_close(&s.step(&out, i, &sample, noise).unwrap(), e);
            }
        }
    }

    const EXPECTED_EPS: [[f64; 4]; 3] = [
        [
            1.3532781600952148,
            -2.7767367362976074,
            3.518714427947998,
            -0.45029082894325256,
        ],
        [
            0.7862574458122253,
            -1.3370689153671265,
            1.479099154472351,
            -0.10938772559165955,
        ],
        [
            0.4001218378543854,
            -1.0879956483840942,
            1.7758694887161255,
            0.020215895026922226,
        ],
    ];
    const EXPECTED_V: [[f64; 4]; 3] = [
        [
            0.6208893060684204,
            -0.0673593133687973,
            -1.1676512956619263,
            -0.03861050680279732,
        ],
        [
            0.41568267345428467,
            -0.34817057847976685,
            -0.1281227469444275,
            -0.13983213901519775,
        ],
        [
            0.2306944876909256,
            -0.6949782967567444,
            1.1592620611190796,
            -0.030646061524748802,
        ],
    ];
}
