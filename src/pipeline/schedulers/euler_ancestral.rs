//! Euler ancestral (`EulerAncestralDiscreteScheduler`): an Euler step down to `sigma_down`, then fresh
//! noise of standard deviation `sigma_up` (k-diffusion's `sample_euler_ancestral`).
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, Spacing, ZeroSnrTerminal, check_steps, left_coeff, torch_sqrt,
    train_sigmas,
};
use super::sigmas::{KarrasRange, SigmaSteps, discrete_schedule, karras_option};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

pub struct EulerAncestralScheduler {
    steps: SigmaSteps,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        let prediction =
            config.prediction(&[PredictionType::Epsilon, PredictionType::VPrediction])?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let alphas_cumprod = config.alphas_cumprod_zero_snr(ZeroSnrTerminal::Fp16Subnormal)?;

        // Karras sigmas: diffusers' EulerAncestralDiscreteScheduler has no such option (it ignores
        // the key); this takes EulerDiscreteScheduler's Karras schedule, k-diffusion's
        // `sample_euler_ancestral` on `get_sigmas_karras`.
        let train = train_sigmas(&alphas_cumprod)?;
        let karras = karras_option(config, KarrasRange::default());
        let schedule = discrete_schedule(config, steps, spacing, karras, &train);
        let mut sigmas = schedule.sigmas;
        sigmas.push(0.0);
        Ok(EulerAncestralScheduler {
            steps: SigmaSteps::new(
                schedule.timesteps.iter().map(|&t| f64::from(t)).collect(),
                sigmas,
                spacing,
            )?,
            prediction,
        })
    }

    /// The sigmas (one per timestep, then 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }
}

impl Scheduler for EulerAncestralScheduler {
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
        self.steps.start_at(begin, "Euler ancestral")
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.steps.add_noise(original, noise, 0)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.steps.add_noise(original, noise, step_index)
    }

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
        if step_index >= self.steps.timesteps.len() {
            return Err(Error::InvalidArgument(format!(
                "Euler ancestral: step {step_index} out of range ({} steps)",
                self.steps.timesteps.len()
            )));
        }
        let noise = noise.ok_or_else(|| {
            Error::InvalidArgument("Euler ancestral: step needs a noise tensor".into())
        })?;
        let sigma = self.steps.sigmas[step_index];
        let sample = sample.to_kind(Kind::Float);
        // `sigma * model_output` is computed in the model output's kind, as in diffusers.
        let pred_original_sample = match self.prediction {
            PredictionType::VPrediction => {
                let c_out = -sigma / torch_sqrt(sigma * sigma + 1.0)?;
                model_output * f64::from(c_out) + &sample / f64::from(sigma * sigma + 1.0)
            }
            _ => &sample - model_output * left_coeff(sigma, model_output),
        };

        let sigma_from = sigma;
        let sigma_to = self.steps.sigmas[step_index + 1];
        let sigma_up = torch_sqrt(
            sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
                / (sigma_from * sigma_from),
        )?;
        let sigma_down = torch_sqrt(sigma_to * sigma_to - sigma_up * sigma_up)?;

        let derivative = (&sample - pred_original_sample) / f64::from(sigma);
        let dt = sigma_down - sigma;
        let prev_sample = &sample + derivative * f64::from(dt);
        let prev_sample = prev_sample + noise * f64::from(sigma_up);
        Ok(prev_sample.to_kind(model_output.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedulers::test_layouts;
    use crate::pipeline::schedulers::test_util::{assert_close, check_layouts, sd14, t};

    // EulerAncestralDiscreteScheduler lays out plain sigmas as EulerDiscreteScheduler does, and the
    // Karras ones are EulerDiscreteScheduler's (see `new`).
    #[test]
    fn layouts_match_euler_discrete() {
        check_layouts(test_layouts::EULER, |c, steps| {
            let s = EulerAncestralScheduler::new(c, steps).unwrap();
            (
                s.timesteps().to_vec(),
                s.sigmas().to_vec(),
                s.init_noise_sigma(),
            )
        });
    }

    #[test]
    fn timesteps_and_sigmas_match_diffusers() {
        let s = EulerAncestralScheduler::new(&sd14(), 10).unwrap();
        let expected = [
            999.0, 888.0, 777.0, 666.0, 555.0, 444.0, 333.0, 222.0, 111.0, 0.0,
        ];
        assert_eq!(s.timesteps(), &expected);
        assert_eq!(s.sigmas(), &SIGMAS_10);
        assert_eq!(s.init_noise_sigma(), f64::from(14.614647_f32));

        let s = EulerAncestralScheduler::new(&sd14(), 50).unwrap();
        let expected: Vec<f64> = TIMESTEPS_50.iter().map(|&t| f64::from(t)).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        assert_eq!(s.sigmas(), &SIGMAS_50);
        assert_eq!(s.init_noise_sigma(), f64::from(14.614647_f32));
    }

    #[test]
    fn leading_spacing_init_noise_sigma() {
        let mut c = sd14();
        c.timestep_spacing = Some("leading".into());
        let s = EulerAncestralScheduler::new(&c, 10).unwrap();
        let expected = [
            901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0,
        ];
        assert_eq!(s.timesteps(), &expected);
        assert_eq!(s.init_noise_sigma(), LEADING_INIT_SIGMA);
        c.timestep_spacing = Some("trailing".into());
        let s = EulerAncestralScheduler::new(&c, 3).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 666.0, 332.0]);
    }

    #[test]
    fn rejects_unsupported_options() {
        let mut c = sd14();
        c.prediction_type = Some("sample".into());
        assert!(matches!(
            EulerAncestralScheduler::new(&c, 10),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn steps_match_diffusers() {
        // Reference (diffusers 0.42.1, torch 2.11, float32 CPU): s = EulerAncestralDiscreteScheduler(
        // **sd14); s.set_timesteps(10); s._step_index = i; s.step(out, s.timesteps[i], sample) with
        // randn_tensor patched to return `noise`, for i = 0, 5, 9; scale_model_input at i = 3.
        let sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let out = t(&[0.3, -0.2, 0.1, 0.4]);
        let noise = t(&[0.7, -0.1, -1.2, 0.05]);
        let mut s = EulerAncestralScheduler::new(&sd14(), 10).unwrap();
        assert!(matches!(
            s.step(&out, 0, &sample, None),
            Err(Error::InvalidArgument(_))
        ));
        assert_close(&s.scale_model_input(&sample, 3), &EXPECTED_SCALED_3);
        for (&i, e) in [0usize, 5, 9].iter().zip(EXPECTED_EPS.iter()) {
            let got = s.step(&out, i, &sample, Some(&noise)).unwrap();
            assert_close(&got, e);
        }
        let mut c = sd14();
        c.prediction_type = Some("v_prediction".into());
        let mut s = EulerAncestralScheduler::new(&c, 10).unwrap();
        for (&i, e) in [0usize, 9].iter().zip(EXPECTED_V.iter()) {
            let got = s.step(&out, i, &sample, Some(&noise)).unwrap();
            assert_close(&got, e);
        }
    }

    const SIGMAS_10: [f32; 11] = [
        14.614647,
        7.839885,
        4.609176,
        2.9183085,
        1.9501624,
        1.3449285,
        0.9323583,
        0.6249773,
        0.3686585,
        0.029167533,
        0.0,
    ];
    const TIMESTEPS_50: [f32; 50] = [
        999.0, 978.61224, 958.2245, 937.83673, 917.449, 897.0612, 876.67346, 856.2857, 835.89795,
        815.5102, 795.12244, 774.7347, 754.3469, 733.95917, 713.5714, 693.18365, 672.7959,
        652.40814, 632.0204, 611.6326, 591.2449, 570.8571, 550.46936, 530.0816, 509.69388,
        489.30612, 468.91837, 448.5306, 428.14285, 407.7551, 387.36734, 366.97958, 346.59183,
        326.20407, 305.8163, 285.42856, 265.0408, 244.65306, 224.2653, 203.87755, 183.48979,
        163.10204, 142.71428, 122.32653, 101.938774, 81.55102, 61.163265, 40.77551, 20.387754, 0.0,
    ];
    const SIGMAS_50: [f32; 51] = [
        14.614647,
        12.936777,
        11.49165,
        10.242914,
        9.160355,
        8.2187395,
        7.3971767,
        6.678018,
        6.0465283,
        5.49032,
        4.998859,
        4.5633073,
        4.176109,
        3.8308442,
        3.522065,
        3.2450604,
        2.99583,
        2.770918,
        2.5673409,
        2.3825438,
        2.214287,
        2.0606437,
        1.9199367,
        1.7906942,
        1.6716443,
        1.5616596,
        1.459756,
        1.3650707,
        1.2768338,
        1.1943717,
        1.1170816,
        1.0444264,
        0.97592986,
        0.9111574,
        0.8497199,
        0.79126155,
        0.7354525,
        0.6819885,
        0.6305759,
        0.58093166,
        0.53277034,
        0.4857924,
        0.4396675,
        0.39400446,
        0.34830308,
        0.3018552,
        0.25353044,
        0.20117965,
        0.13933751,
        0.029167533,
        0.0,
    ];
    const LEADING_INIT_SIGMA: f64 = 8.450067_f32 as f64;
    const EXPECTED_SCALED_3: [f64; 4] = [
        0.16208051145076752,
        -0.32416102290153503,
        0.48624154925346375,
        0.08104025572538376,
    ];
    const EXPECTED_EPS: [[f64; 4]; 3] = [
        [
            2.008760452270508,
            0.4201655983924866,
            -7.480557441711426,
            -3.5827882289886475,
        ],
        [
            0.7607957124710083,
            -0.92747962474823,
            0.6237936019897461,
            0.00416569784283638,
        ],
        [
            0.4912497401237488,
            -0.9941664934158325,
            1.4970831871032715,
            0.23833298683166504,
        ],
    ];
    const EXPECTED_V: [[f64; 4]; 2] = [
        [
            4.563838481903076,
            -0.8106110692024231,
            -7.574081897735596,
            0.11936259269714355,
        ],
        [
            0.49082842469215393,
            -0.9933189153671265,
            1.4958094358444214,
            0.23812542855739594,
        ],
    ];
}
