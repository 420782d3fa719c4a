//! DDIM (`DDIMScheduler`) with eta = 0: the deterministic sampler.
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, Spacing, ZeroSnrTerminal, check_steps, left_coeff, np_arange,
    np_linspace, reject_flag, torch_sqrt,
};
use crate::error::{Error, Result};
use tch::Tensor;

pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps / steps` (integer division), whatever the spacing (as in diffusers).
    step_ratio: i64,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
    prediction: PredictionType,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f64>,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        reject_flag("thresholding", config.thresholding)?;
        let prediction = config.prediction(&[
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ])?;
        let spacing = config.spacing(Spacing::Leading)?;
        let alphas_cumprod = config.alphas_cumprod_zero_snr(ZeroSnrTerminal::Zero)?;
        // DDIM's own default is set_alpha_to_one = true (PNDM's is false).
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        // DDIM's own default is clip_sample = true.
        let clip = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0));

        let n_train = config.num_train_timesteps;
        let timesteps_int: Vec<i64> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = (n_train / steps) as i64;
                (0..steps as i64)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                np_arange(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        Ok(DdimScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (n_train / steps) as i64,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
            prediction,
            clip,
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
                Error::InvalidArgument(format!("DDIM: timestep {timestep} is out of range"))
            })
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        super::drop_front(&mut self.timesteps_int, begin, "DDIM")?;
        super::drop_front(&mut self.timesteps, begin, "DDIM")
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.add_noise_at(original, noise, 0)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = *self.timesteps_int.get(step_index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "DDIM: no step {step_index} to add noise at ({} steps)",
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
        let timestep = *self.timesteps_int.get(step_index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "DDIM: step {step_index} out of range ({} steps)",
                self.timesteps_int.len()
            ))
        })?;
        let prev_timestep = timestep - self.step_ratio;
        let alpha_prod_t = self.alpha_at(timestep)?;
        let alpha_prod_t_prev = self.alpha_at(prev_timestep)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let sqrt_alpha = torch_sqrt(alpha_prod_t)?;
        let sqrt_beta = torch_sqrt(beta_prod_t)?;
        // Coefficients on the left of a tensor in diffusers go through `left_coeff`.
        let (mo, s) = (model_output, sample);
        let (pred_original_sample, pred_epsilon) = match self.prediction {
            PredictionType::Epsilon => (
                (s - mo * left_coeff(sqrt_beta, mo)) / f64::from(sqrt_alpha),
                mo.shallow_clone(),
            ),
            PredictionType::Sample => (
                mo.shallow_clone(),
                (s - mo * left_coeff(sqrt_alpha, mo)) / f64::from(sqrt_beta),
            ),
            PredictionType::VPrediction => (
                s * left_coeff(sqrt_alpha, s) - mo * left_coeff(sqrt_beta, mo),
                mo * left_coeff(sqrt_alpha, mo) + s * left_coeff(sqrt_beta, s),
            ),
        };
        let pred_original_sample = match self.clip {
            Some(range) => pred_original_sample.clamp(-range, range),
            None => pred_original_sample,
        };

        // eta = 0: std_dev_t = 0 * sqrt(variance), kept in the formula as diffusers does.
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = 0.0_f32 * torch_sqrt(variance)?;
        let direction_coeff = torch_sqrt(1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t)?;
        let pred_sample_direction = &pred_epsilon * left_coeff(direction_coeff, &pred_epsilon);
        let x0_coeff = left_coeff(torch_sqrt(alpha_prod_t_prev)?, &pred_original_sample);
        Ok(pred_original_sample * x0_coeff + pred_sample_direction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedulers::test_util::{assert_close, sd14, t};

    #[test]
    fn timesteps_match_diffusers() {
        let s = DdimScheduler::new(&sd14(), 10).unwrap();
        let expected = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1];
        let expected: Vec<f64> = expected.iter().map(|&t| t as f64).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        assert_eq!(s.init_noise_sigma(), 1.0);

        let s = DdimScheduler::new(&sd14(), 50).unwrap();
        let expected: Vec<f64> = (0..50).map(|i| (981 - 20 * i) as f64).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
    }

    #[test]
    fn other_spacings_match_diffusers() {
        let mut c = sd14();
        c.timestep_spacing = Some("linspace".into());
        let s = DdimScheduler::new(&c, 10).unwrap();
        let expected = [999, 888, 777, 666, 555, 444, 333, 222, 111, 0];
        let expected: Vec<f64> = expected.iter().map(|&t| t as f64).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        c.timestep_spacing = Some("trailing".into());
        let s = DdimScheduler::new(&c, 3).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 666.0, 332.0]);
    }

    #[test]
    fn rejects_unsupported_options() {
        for (key, json) in [
            ("thresholding", r#"{"thresholding": true}"#),
            (
                "prediction_type",
                r#"{"prediction_type": "flow_prediction"}"#,
            ),
            ("timestep_spacing", r#"{"timestep_spacing": "karras"}"#),
        ] {
            let c = SchedulerConfig::from_json(json, "scheduler_config.json").unwrap();
            assert!(
                matches!(DdimScheduler::new(&c, 10), Err(Error::Unsupported { key: ref k, .. }) if k == key),
                "{key}"
            );
        }
    }

    #[test]
    fn zero_snr_trailing_v_prediction_matches_diffusers() {
        // c = dict(sd14, rescale_betas_zero_snr=True, timestep_spacing="trailing",
        //          prediction_type="v_prediction"); s = DDIMScheduler(**c); s.set_timesteps(10)
        // s.timesteps -> [999, 899, ..., 99]; s.step(out, s.timesteps[i], sample) for i = 0, 9.
        // DDIM keeps the terminal alphas_cumprod of exactly 0 (t = 999 predicts x0 = -v).
        let mut c = sd14();
        c.rescale_betas_zero_snr = Some(true);
        c.timestep_spacing = Some("trailing".into());
        c.prediction_type = Some("v_prediction".into());
        let s = DdimScheduler::new(&c, 10).unwrap();
        let expected: Vec<f64> = (0..10).map(|i| (999 - 100 * i) as f64).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        assert_eq!(s.alphas_cumprod[999], 0.0);
        let got = run(&c, &[0.3, -0.2, 0.1, 0.4], &[0, 9]);
        for (g, e) in got.iter().zip(EXPECTED_ZERO_SNR_V.iter()) {
            assert_close(g, e);
        }
    }

    const EXPECTED_ZERO_SNR_V: [[f64; 4]; 2] = [
        [
            0.48271918296813965,
            -0.9874677062034607,
            1.4922162294387817,
            0.22759126126766205,
        ],
        [
            0.38379228115081787,
            -0.8903520107269287,
            1.396911859512329,
            0.11516650766134262,
        ],
    ];

    fn run(config: &SchedulerConfig, out: &[f32], indices: &[usize]) -> Vec<Tensor> {
        let mut s = DdimScheduler::new(config, 10).unwrap();
        let sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let out = t(out);
        indices
            .iter()
            .map(|&i| s.step(&out, i, &sample, None).unwrap())
            .collect()
    }

    #[test]
    fn steps_match_diffusers() {
        // Reference (diffusers 0.42.1, torch 2.11, float32 CPU): s = DDIMScheduler(**sd14);
        // s.set_timesteps(10); s.step(out, s.timesteps[i], sample).prev_sample for i = 0, 5, 9
        // (i = 9 goes past t = 0: final_alpha_cumprod = alphas_cumprod[0] as set_alpha_to_one is false).
        let got = run(&sd14(), &[0.3, -0.2, 0.1, 0.4], &[0, 5, 9]);
        for (g, e) in got.iter().zip(EXPECTED_EPS.iter()) {
            assert_close(g, e);
        }
        let mut c = sd14();
        c.prediction_type = Some("v_prediction".into());
        let got = run(&c, &[0.3, -0.2, 0.1, 0.4], &[0, 9]);
        for (g, e) in got.iter().zip(EXPECTED_V.iter()) {
            assert_close(g, e);
        }
        // DDIMScheduler(prediction_type="sample"): linear betas, set_alpha_to_one and clip_sample on
        // by default; the model output exceeds the clip range.
        let mut c = SchedulerConfig::from_json("{}", "scheduler_config.json").unwrap();
        c.prediction_type = Some("sample".into());
        let got = run(&c, &[1.3, -2.2, 0.1, 0.4], &[0, 9]);
        for (g, e) in got.iter().zip(EXPECTED_SAMPLE_CLIP.iter()) {
            assert_close(g, e);
        }
    }

    const EXPECTED_EPS: [[f64; 4]; 3] = [
        [
            0.6209547519683838,
            -1.490910530090332,
            2.3608665466308594,
            0.15485170483589172,
        ],
        [
            0.5134420394897461,
            -1.128960371017456,
            1.744478702545166,
            0.19292332231998444,
        ],
        [
            0.49657127261161804,
            -0.9979992508888245,
            1.4994271993637085,
            0.2452501803636551,
        ],
    ];
    const EXPECTED_V: [[f64; 4]; 2] = [
        [
            0.4765408933162689,
            -0.9825491309165955,
            1.4885574579238892,
            0.21985337138175964,
        ],
        [
            0.49632376432418823,
            -0.9975001215934753,
            1.4986764192581177,
            0.2451290339231491,
        ],
    ];
    const EXPECTED_SAMPLE_CLIP: [[f64; 4]; 2] = [
        [
            0.517159640789032,
            -1.0020641088485718,
            1.5013113021850586,
            0.25880441069602966,
        ],
        [1.0, -1.0, 0.10000000149011612, 0.4000000059604645],
    ];
}
