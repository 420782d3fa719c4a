//! PNDM in its PLMS form (`PNDMScheduler` with `skip_prk_steps = true`), the scheduler SD v1-4
//! ships with: a 4th-order linear multistep method on the noise predictions, warmed up by a
//! 2nd-order (Heun-like) step that evaluates the model twice between the first two timesteps.
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, Spacing, check_steps, left_coeff, np_arange, np_linspace,
    torch_sqrt, unsupported,
};
use crate::error::{Error, Result};
use tch::Tensor;

pub struct PndmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps / steps` (integer division), the distance to the previous timestep.
    step_ratio: i64,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
    prediction: PredictionType,
    counter: usize,
    /// The last (up to 4) noise predictions.
    ets: Vec<Tensor>,
    /// The sample of the first step, reused by the second (warm-up) step.
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        if config.skip_prk_steps != Some(true) {
            let value = config
                .skip_prk_steps
                .map_or("missing (false)".to_string(), |v| v.to_string());
            return Err(unsupported(
                "skip_prk_steps",
                &value,
                "only PLMS (skip_prk_steps: true) is implemented for PNDM",
            ));
        }
        let prediction =
            config.prediction(&[PredictionType::Epsilon, PredictionType::VPrediction])?;
        let spacing = config.spacing(Spacing::Leading)?;
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };

        let n_train = config.num_train_timesteps;
        // Ascending inference timesteps (`self._timesteps` in diffusers).
        let ascending: Vec<i64> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = (n_train / steps) as i64;
                (0..steps as i64)
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                let mut t: Vec<i64> = np_arange(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect();
                t.reverse();
                t
            }
        };
        // PLMS timesteps: the second-to-last one repeated, then reversed (n + 1 values).
        let n = ascending.len();
        let mut timesteps_int: Vec<i64> = ascending[..n - 1].to_vec();
        if n >= 2 {
            timesteps_int.push(ascending[n - 2]);
        }
        timesteps_int.push(ascending[n - 1]);
        timesteps_int.reverse();

        Ok(PndmScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (n_train / steps) as i64,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
            prediction,
            counter: 0,
            ets: Vec::with_capacity(4),
            cur_sample: None,
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
                Error::InvalidArgument(format!("PNDM: timestep {timestep} is out of range"))
            })
    }

    /// Formula (9) of the PNDM paper: x_{t-δ} from x_t and the (combined) noise prediction.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_prod_t = self.alpha_at(timestep)?;
        let alpha_prod_t_prev = self.alpha_at(prev_timestep)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;

        let converted;
        let eps = match self.prediction {
            PredictionType::VPrediction => {
                converted = model_output * left_coeff(torch_sqrt(alpha_prod_t)?, model_output)
                    + sample * left_coeff(torch_sqrt(beta_prod_t)?, sample);
                &converted
            }
            _ => model_output,
        };
        let sample_coeff = torch_sqrt(alpha_prod_t_prev / alpha_prod_t)?;
        let model_output_denom_coeff = alpha_prod_t * torch_sqrt(beta_prod_t_prev)?
            + torch_sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)?;
        // Coefficients on the left of a tensor in diffusers go through `left_coeff`.
        Ok(sample * left_coeff(sample_coeff, sample)
            - eps * left_coeff(alpha_prod_t_prev - alpha_prod_t, eps)
                / f64::from(model_output_denom_coeff))
    }
}

impl Scheduler for PndmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        super::drop_front(&mut self.timesteps_int, begin, "PNDM")?;
        super::drop_front(&mut self.timesteps, begin, "PNDM")
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.add_noise_at(original, noise, 0)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = *self.timesteps_int.get(step_index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "PNDM: no step {step_index} to add noise at ({} steps)",
                self.timesteps_int.len()
            ))
        })?;
        super::add_noise_ddpm(&self.alphas_cumprod, t, original, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        super::check_step_order("PNDM", step_index, self.counter, self.timesteps_int.len())?;
        let mut timestep = self.timesteps_int[step_index];
        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                drop(self.ets.remove(0));
            }
            self.ets.push(model_output.shallow_clone());
        } else {
            // The warm-up step goes again from the first timestep, with the averaged prediction.
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }

        let e = &self.ets;
        let k = e.len();
        let mut sample = sample.shallow_clone();
        let eps = match (k, self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            (1, 1) => {
                if let Some(cur) = self.cur_sample.take() {
                    sample = cur;
                }
                (model_output + &e[0]) / 2.0
            }
            (2, _) => (&e[1] * 3.0 - &e[0]) / 2.0,
            (3, _) => (&e[2] * 23.0 - &e[1] * 16.0 + &e[0] * 5.0) / 12.0,
            _ => (&e[3] * 55.0 - &e[2] * 59.0 + &e[1] * 37.0 - &e[0] * 9.0) * (1.0 / 24.0),
        };

        let prev = self.prev_sample(&sample, timestep, prev_timestep, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedulers::test_util::{assert_close, sd14, t};

    #[test]
    fn timesteps_match_diffusers() {
        let s = PndmScheduler::new(&sd14(), 10).unwrap();
        let expected = [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1];
        let expected: Vec<f64> = expected.iter().map(|&t| t as f64).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        assert_eq!(s.init_noise_sigma(), 1.0);

        let s = PndmScheduler::new(&sd14(), 50).unwrap();
        let mut expected: Vec<f64> = vec![981.0, 961.0];
        expected.extend((0..49).map(|i| (961 - 20 * i) as f64));
        assert_eq!(s.timesteps().len(), 51);
        assert_eq!(s.timesteps(), expected.as_slice());
    }

    #[test]
    fn other_spacings_match_diffusers() {
        // PNDMScheduler(**sd14, timestep_spacing=...).set_timesteps(10)
        let mut c = sd14();
        c.timestep_spacing = Some("linspace".into());
        let s = PndmScheduler::new(&c, 10).unwrap();
        let expected = [999, 888, 888, 777, 666, 555, 444, 333, 222, 111, 0];
        let expected: Vec<f64> = expected.iter().map(|&t| t as f64).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        c.timestep_spacing = Some("trailing".into());
        let s = PndmScheduler::new(&c, 3).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 666.0, 666.0, 332.0]);
        let s = PndmScheduler::new(&sd14(), 1).unwrap();
        assert_eq!(s.timesteps(), &[1.0]);
    }

    #[test]
    fn rejects_prk_and_unknown_prediction() {
        let mut c = sd14();
        c.skip_prk_steps = None;
        assert!(matches!(
            PndmScheduler::new(&c, 10),
            Err(Error::Unsupported { ref key, .. }) if key == "skip_prk_steps"
        ));
        let mut c = sd14();
        c.prediction_type = Some("sample".into());
        assert!(matches!(
            PndmScheduler::new(&c, 10),
            Err(Error::Unsupported { ref key, .. }) if key == "prediction_type"
        ));
        let mut c = sd14();
        c.timestep_spacing = Some("karras".into());
        assert!(matches!(
            PndmScheduler::new(&c, 10),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            PndmScheduler::new(&sd14(), 1001),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn steps_match_diffusers() {
        // Reference (diffusers 0.42.1, torch 2.11, float32 CPU):
        //   s = PNDMScheduler(**sd14); s.set_timesteps(10); x = sample
        //   for i in range(6): x = s.step(base * (1 + 0.1 * i) - 0.05 * i, s.timesteps[i], x).prev_sample
        // covering the first step, the warm-up step and the 2nd/3rd/4th-order combinations.
        let mut s = PndmScheduler::new(&sd14(), 10).unwrap();
        let mut sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let base = t(&[0.3, -0.2, 0.1, 0.4]);
        let expected: [[f64; 4]; 6] = EXPECTED_EPS;
        for (i, exp) in expected.iter().enumerate() {
            let eps = &base * (1.0 + 0.1 * i as f64) - 0.05 * i as f64;
            sample = s.step(&eps, i, &sample, None).unwrap();
            assert_close(&sample, exp);
        }
        assert!(s.step(&base, 7, &sample, None).is_err());
    }

    #[test]
    fn v_prediction_step_matches_diffusers() {
        // As above with PNDMScheduler(**sd14, prediction_type="v_prediction"), two steps.
        let mut c = sd14();
        c.prediction_type = Some("v_prediction".into());
        let mut s = PndmScheduler::new(&c, 10).unwrap();
        let mut sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let base = t(&[0.3, -0.2, 0.1, 0.4]);
        for (i, exp) in EXPECTED_V.iter().enumerate() {
            let out = &base * (1.0 + 0.1 * i as f64) - 0.05 * i as f64;
            sample = s.step(&out, i, &sample, None).unwrap();
            assert_close(&sample, exp);
        }
    }

    const EXPECTED_EPS: [[f64; 4]; 6] = [
        [
            0.620954692363739,
            -1.4909104108810425,
            2.3608663082122803,
            0.15485171973705292,
        ],
        [
            0.627179741859436,
            -1.4691228866577148,
            2.3733162879943848,
            0.15796421468257904,
        ],
        [
            0.8162503838539124,
            -1.9898277521133423,
            3.5634207725524902,
            0.047290340065956116,
        ],
        [
            1.039602518081665,
            -2.6039628982543945,
            4.987113952636719,
            -0.08963192999362946,
        ],
        [
            1.2926510572433472,
            -3.2258477210998535,
            6.575240612030029,
            -0.24083314836025238,
        ],
        [
            1.5466923713684082,
            -3.826982021331787,
            8.189257621765137,
            -0.4008350074291229,
        ],
    ];
    const EXPECTED_V: [[f64; 4]; 2] = [
        [
            0.4765408933162689,
            -0.9825491905212402,
            1.4885574579238892,
            0.21985335648059845,
        ],
        [
            0.47727757692337036,
            -0.9799707531929016,
            1.4900307655334473,
            0.22022171318531036,
        ],
    ];
}
