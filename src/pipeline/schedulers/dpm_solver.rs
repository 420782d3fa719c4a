//! DPM-Solver++ multistep (`DPMSolverMultistepScheduler` with its defaults: `dpmsolver++`, order 2,
//! midpoint), i.e. "DPM++ 2M". It works on the data prediction x0 and keeps the previous one.
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, Spacing, ZeroSnrTerminal, check_steps, left_coeff, np_arange,
    np_interp_unit_grid, np_linspace, reject_flag, torch_exp, torch_ln, torch_sqrt, train_sigmas,
    unsupported,
};
use super::sigmas::{karras_sigmas, log_sigmas, sigma_to_t};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

pub struct DpmSolverMultistepScheduler {
    timesteps: Vec<f64>,
    /// One sigma per timestep, then the final sigma (0, or sigma_min).
    sigmas: Vec<f32>,
    prediction: PredictionType,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The data predictions of the previous step and of the current one (oldest first).
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: usize,
    /// Steps planned before img2img dropped any: diffusers' "fewer than 15 steps" rule counts
    /// them all.
    planned: usize,
}

/// `(alpha_t, sigma_t)` of a sigma, as `_sigma_to_alpha_sigma_t` computes them in float32.
fn alpha_sigma(sigma: f32) -> Result<(f32, f32)> {
    let alpha_t = 1.0 / torch_sqrt(sigma * sigma + 1.0)?;
    Ok((alpha_t, sigma * alpha_t))
}

/// `log(alpha_t) - log(sigma_t)`, with libtorch's float32 log.
fn lambda(alpha_t: f32, sigma_t: f32) -> Result<f32> {
    Ok(torch_ln(alpha_t)? - torch_ln(sigma_t)?)
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        match config.algorithm_type.as_deref() {
            None | Some("dpmsolver++") | Some("deis") => {}
            Some(other) => {
                return Err(unsupported(
                    "algorithm_type",
                    other,
                    "only dpmsolver++ is implemented",
                ));
            }
        }
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=2).contains(&solver_order) {
            return Err(unsupported(
                "solver_order",
                &solver_order.to_string(),
                "only orders 1 and 2 are implemented",
            ));
        }
        match config.solver_type.as_deref() {
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {}
            Some(other) => {
                return Err(unsupported(
                    "solver_type",
                    other,
                    "only midpoint is implemented",
                ));
            }
        }
        reject_flag("thresholding", config.thresholding)?;
        reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        reject_flag("use_lu_lambdas", config.use_lu_lambdas)?;
        reject_flag("use_flow_sigmas", config.use_flow_sigmas)?;
        if let Some(v) = &config.variance_type {
            return Err(unsupported(
                "variance_type",
                v,
                "learned variances are not supported",
            ));
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
        let prediction = config.prediction(&[
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ])?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let alphas_cumprod = config.alphas_cumprod_zero_snr(ZeroSnrTerminal::Fp16Subnormal)?;
        let n_train = config.num_train_timesteps;

        // Timesteps whose lambda(t) is below lambda_min_clipped are cut off the end of the schedule.
        let last_timestep = match config.lambda_min_clipped {
            Some(clip) if clip > f64::NEG_INFINITY => {
                let ac = Tensor::from_slice(&alphas_cumprod);
                let lambda_t =
                    ac.f_sqrt()?.f_log()? - ac.f_neg()?.f_add_scalar(1.0)?.f_sqrt()?.f_log()?;
                let lambda_t = Vec::<f32>::try_from(&lambda_t)?;
                // searchsorted (left) in the ascending flip of lambda_t.
                let clipped_idx = lambda_t
                    .iter()
                    .rev()
                    .position(|&l| f64::from(l) >= clip)
                    .unwrap_or(n_train);
                (n_train - clipped_idx) as i64
            }
            _ => n_train as i64,
        };

        let timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<i64> = np_linspace(0.0, (last_timestep - 1) as f64, steps + 1)
                    .into_iter()
                    .rev()
                    .map(|t| t.round_ties_even() as i64)
                    .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = last_timestep / (steps as i64 + 1);
                (1..=steps as i64)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                np_arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        let train = train_sigmas(&alphas_cumprod)?;
        let (timesteps, mut sigmas): (Vec<i64>, Vec<f32>) = if config.use_karras_sigmas
            == Some(true)
        {
            // Karras sigmas over the whole training range (whatever the spacing), then each mapped
            // back to its timestep, rounded to an integer except for the cosine schedule (where
            // diffusers truncates when it casts to int64).
            let karras = karras_sigmas(f64::from(train[0]), f64::from(train[n_train - 1]), steps);
            let log_sigmas = log_sigmas(&train);
            let round = config.beta_schedule != "squaredcos_cap_v2";
            let timesteps = karras
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if round {
                        t.round_ties_even() as i64
                    } else {
                        t as i64
                    }
                })
                .collect();
            (timesteps, karras.iter().map(|&s| s as f32).collect())
        } else {
            let sigmas = timesteps
                .iter()
                .map(|&t| np_interp_unit_grid(t as f64, &train) as f32)
                .collect();
            (timesteps, sigmas)
        };
        if timesteps.is_empty() {
            return Err(Error::InvalidArgument(
                "DPM-Solver++: the schedule has no timesteps".into(),
            ));
        }
        sigmas.push(if final_sigma_zero {
            0.0
        } else {
            torch_sqrt((1.0 - alphas_cumprod[0]) / alphas_cumprod[0])?
        });

        Ok(DpmSolverMultistepScheduler {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas,
            prediction,
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_zero,
            model_outputs: (0..solver_order).map(|_| None).collect(),
            lower_order_nums: 0,
            step_index: 0,
            planned: timesteps.len(),
        })
    }

    /// The sigmas (one per timestep, then the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The data prediction x0 (`convert_model_output`), in the inputs' kind.
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[self.step_index])?;
        Ok(match self.prediction {
            PredictionType::Epsilon => {
                (sample - model_output * left_coeff(sigma_t, model_output)) / f64::from(alpha_t)
            }
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => {
                sample * left_coeff(alpha_t, sample)
                    - model_output * left_coeff(sigma_t, model_output)
            }
        })
    }

    fn first_order_update(&self, x0: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[self.step_index + 1])?;
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[self.step_index])?;
        let h = lambda(alpha_t, sigma_t)? - lambda(alpha_s, sigma_s)?;
        let x0_coeff = alpha_t * (torch_exp(-h)? - 1.0);
        // Coefficients on the left of a tensor in diffusers go through `left_coeff`.
        Ok(sample * left_coeff(sigma_t / sigma_s, sample) - x0 * left_coeff(x0_coeff, x0))
    }

    fn second_order_update(&self, m0: &Tensor, m1: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1])?;
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i])?;
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1])?;
        let lambda_t = lambda(alpha_t, sigma_t)?;
        let lambda_s0 = lambda(alpha_s0, sigma_s0)?;
        let lambda_s1 = lambda(alpha_s1, sigma_s1)?;
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let diff = m0 - m1;
        let d1 = &diff * left_coeff(1.0 / r0, &diff);
        let x0_coeff = alpha_t * (torch_exp(-h)? - 1.0);
        Ok(sample * left_coeff(sigma_t / sigma_s0, sample)
            - m0 * left_coeff(x0_coeff, m0)
            - &d1 * left_coeff(0.5 * x0_coeff, &d1))
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        super::check_step_order("DPM-Solver++", 0, self.step_index, self.timesteps.len())?;
        super::drop_front(&mut self.timesteps, begin, "DPM-Solver++")?;
        self.sigmas.drain(..begin);
        Ok(())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.add_noise_at(original, noise, 0)
    }

    /// `alpha_t · x + sigma_t · noise` at step `step_index`'s sigma.
    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = *self.sigmas.get(step_index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "DPM-Solver++: no step {step_index} to add noise at ({} sigmas)",
                self.sigmas.len()
            ))
        })?;
        let (alpha_t, sigma_t) = alpha_sigma(sigma)?;
        Ok(original
            .f_mul_scalar(f64::from(alpha_t))?
            .f_add(&noise.f_mul_scalar(f64::from(sigma_t))?)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        super::check_step_order("DPM-Solver++", step_index, self.step_index, n)?;
        let lower_order_final = step_index == n - 1
            && (self.euler_at_final
                || (self.lower_order_final && self.planned < 15)
                || self.final_sigma_zero);

        let x0 = self.convert_model_output(model_output, sample)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.shallow_clone()));

        // Upcast to avoid precision issues, as diffusers does.
        let sample = sample.to_kind(Kind::Float);
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(&x0, &sample)?
        } else {
            match &self.model_outputs[..] {
                [Some(m1), Some(m0)] => self.second_order_update(m0, m1, &sample)?,
                _ => {
                    return Err(Error::InvalidArgument(
                        "DPM-Solver++: missing previous model output".into(),
                    ));
                }
            }
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev.to_kind(x0.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedulers::test_layouts;
    use crate::pipeline::schedulers::test_util::{assert_close, check_layouts, sd14, t};

    #[test]
    fn karras_and_plain_layouts_match_diffusers() {
        check_layouts(test_layouts::DPM, |c, steps| {
            let s = DpmSolverMultistepScheduler::new(c, steps).unwrap();
            (
                s.timesteps().to_vec(),
                s.sigmas().to_vec(),
                s.init_noise_sigma(),
            )
        });
    }

    #[test]
    fn timesteps_and_sigmas_match_diffusers() {
        let s = DpmSolverMultistepScheduler::new(&sd14(), 10).unwrap();
        let expected = [
            999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0,
        ];
        assert_eq!(s.timesteps(), &expected);
        assert_eq!(s.sigmas(), &SIGMAS_10);
        assert_eq!(s.init_noise_sigma(), 1.0);

        let s = DpmSolverMultistepScheduler::new(&sd14(), 50).unwrap();
        let expected: Vec<f64> = TIMESTEPS_50.iter().map(|&t| t as f64).collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        assert_eq!(s.sigmas(), &SIGMAS_50);
    }

    #[test]
    fn other_spacings_match_diffusers() {
        let mut c = sd14();
        c.timestep_spacing = Some("leading".into());
        let s = DpmSolverMultistepScheduler::new(&c, 10).unwrap();
        assert_eq!(s.timesteps(), &LEADING_10);
        c.timestep_spacing = Some("trailing".into());
        let s = DpmSolverMultistepScheduler::new(&c, 10).unwrap();
        assert_eq!(s.timesteps(), &TRAILING_10);
        let mut c = sd14();
        c.lambda_min_clipped = Some(-2.0);
        let s = DpmSolverMultistepScheduler::new(&c, 10).unwrap();
        assert_eq!(s.timesteps(), &CLIPPED_10);
    }

    #[test]
    fn rejects_unsupported_options() {
        for (key, json) in [
            ("algorithm_type", r#"{"algorithm_type": "sde-dpmsolver++"}"#),
            ("solver_order", r#"{"solver_order": 3}"#),
            ("solver_type", r#"{"solver_type": "heun"}"#),
            ("thresholding", r#"{"thresholding": true}"#),
            (
                "use_exponential_sigmas",
                r#"{"use_exponential_sigmas": true}"#,
            ),
            ("final_sigmas_type", r#"{"final_sigmas_type": "max"}"#),
            ("variance_type", r#"{"variance_type": "learned_range"}"#),
            (
                "prediction_type",
                r#"{"prediction_type": "flow_prediction"}"#,
            ),
        ] {
            let c = SchedulerConfig::from_json(json, "scheduler_config.json").unwrap();
            assert!(
                matches!(DpmSolverMultistepScheduler::new(&c, 10), Err(Error::Unsupported { key: ref k, .. }) if k == key),
                "{key}"
            );
        }
    }

    /// All steps at 10 inference steps. Reference (diffusers 0.42.1, torch 2.11, float32 CPU):
    /// `s = DPMSolverMultistepScheduler(**sd14, ...); s.set_timesteps(10); x = sample;`
    /// `for i, t in enumerate(s.timesteps): x = s.step(base * (1 + 0.1 * i) - 0.05 * i, t, x).prev_sample`
    /// (first order, second order, then first order to sigma 0 at the last step).
    fn run_all(config: &SchedulerConfig, expected: &[[f64; 4]]) {
        let mut s = DpmSolverMultistepScheduler::new(config, 10).unwrap();
        let mut sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let base = t(&[0.3, -0.2, 0.1, 0.4]);
        assert_eq!(expected.len(), s.timesteps().len());
        for (i, e) in expected.iter().enumerate() {
            let out = &base * (1.0 + 0.1 * i as f64) - 0.05 * i as f64;
            sample = s.step(&out, i, &sample, None).unwrap();
            assert_close(&sample, e);
        }
    }

    #[test]
    fn steps_match_diffusers() {
        run_all(&sd14(), &EXPECTED_EPS);
        let mut c = sd14();
        c.prediction_type = Some("v_prediction".into());
        run_all(&c, &EXPECTED_V);
        let mut c = sd14();
        c.solver_order = Some(1);
        run_all(&c, &EXPECTED_ORDER1);
        let mut s = DpmSolverMultistepScheduler::new(&sd14(), 10).unwrap();
        let x = t(&[0.0; 4]);
        assert!(s.step(&x, 1, &x, None).is_err());
    }

    const SIGMAS_10: [f32; 11] = [
        14.614647, 8.302806, 5.087765, 3.3210845, 2.276464, 1.6182797, 1.1643916, 0.8327532,
        0.57166636, 0.34393182, 0.0,
    ];
    const TIMESTEPS_50: [i64; 50] = [
        999, 979, 959, 939, 919, 899, 879, 859, 839, 819, 799, 779, 759, 739, 719, 699, 679, 659,
        639, 619, 599, 579, 559, 539, 519, 500, 480, 460, 440, 420, 400, 380, 360, 340, 320, 300,
        280, 260, 240, 220, 200, 180, 160, 140, 120, 100, 80, 60, 40, 20,
    ];
    const SIGMAS_50: [f32; 51] = [
        14.614647, 12.966325, 11.542775, 10.309405, 9.237426, 8.302806, 7.485424, 6.7683845,
        6.137463, 5.5806465, 5.087765, 4.650185, 4.2605586, 3.9126148, 3.60099, 3.3210845,
        3.0689445, 2.8411624, 2.6347969, 2.4473007, 2.276464, 2.1203666, 1.9773333, 1.8459027,
        1.724795, 1.6182797, 1.5141956, 1.4174953, 1.3274052, 1.2432402, 1.1643916, 1.0903172,
        1.0205314, 0.9545986, 0.8921251, 0.8327532, 0.77615494, 0.7220267, 0.6700837, 0.62005264,
        0.57166636, 0.52465343, 0.4787281, 0.433571, 0.3888021, 0.34393182, 0.29826403, 0.2506812,
        0.1990589, 0.13799095, 0.0,
    ];
    const LEADING_10: [f64; 10] = [
        901.0, 811.0, 721.0, 631.0, 541.0, 451.0, 361.0, 271.0, 181.0, 91.0,
    ];
    const TRAILING_10: [f64; 10] = [
        999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0,
    ];
    const CLIPPED_10: [f64; 10] = [
        876.0, 788.0, 701.0, 613.0, 526.0, 438.0, 350.0, 263.0, 175.0, 88.0,
    ];
    const EXPECTED_EPS: [[f64; 4]; 10] = [
        [
            0.6494058966636658,
            -1.6007124185562134,
            2.552018880844116,
            0.13601508736610413,
        ],
        [
            0.879150927066803,
            -2.3954994678497314,
            4.089564323425293,
            -0.019763126969337463,
        ],
        [
            1.1875180006027222,
            -3.3882360458374023,
            6.1148858070373535,
            -0.2202802449464798,
        ],
        [
            1.5604851245880127,
            -4.537221908569336,
            8.547846794128418,
            -0.46031394600868225,
        ],
        [
            1.967455506324768,
            -5.750457286834717,
            11.201079368591309,
            -0.724233090877533,
        ],
        [
            2.38284969329834,
            -6.952214241027832,
            13.919301986694336,
            -0.9993643164634705,
        ],
        [
            2.7677805423736572,
            -8.030610084533691,
            16.459217071533203,
            -1.2637509107589722,
        ],
        [
            3.093843460083008,
            -8.905146598815918,
            18.64214324951172,
            -1.5009461641311646,
        ],
        [
            3.3436484336853027,
            -9.522788047790527,
            20.360944747924805,
            -1.7018929719924927,
        ],
        [
            3.4946093559265137,
            -9.784807205200195,
            21.620956420898438,
            -1.9063568115234375,
        ],
    ];
    const EXPECTED_V: [[f64; 4]; 10] = [
        [
            0.483879029750824,
            -0.9883672595024109,
            1.4928555488586426,
            0.22905875742435455,
        ],
        [
            0.46324342489242554,
            -0.9650260210037231,
            1.4880595207214355,
            0.20022974908351898,
        ],
        [
            0.4378308355808258,
            -0.9270613193511963,
            1.4853678941726685,
            0.16304568946361542,
        ],
        [
            0.4090189039707184,
            -0.8718142509460449,
            1.486936330795288,
            0.1185368150472641,
        ],
        [
            0.3790028989315033,
            -0.7990431785583496,
            1.4949333667755127,
            0.06902969628572464,
        ],
        [
            0.3491232991218567,
            -0.7074443697929382,
            1.5115141868591309,
            0.015586934983730316,
        ],
        [
            0.32127946615219116,
            -0.5989620685577393,
            1.5383055210113525,
            -0.03955807909369469,
        ],
        [
            0.296684205532074,
            -0.47392380237579346,
            1.5776482820510864,
            -0.09548412263393402,
        ],
        [
            0.2763683497905731,
            -0.3274298310279846,
            1.6371492147445679,
            -0.1536625772714615,
        ],
        [
            0.2223152220249176,
            -0.03968489170074463,
            1.632704257965088,
            -0.24613089859485626,
        ],
    ];
    const EXPECTED_ORDER1: [[f64; 4]; 10] = [
        [
            0.6494058966636658,
            -1.6007124185562134,
            2.552018880844116,
            0.13601508736610413,
        ],
        [
            0.8737802505493164,
            -2.4142966270446777,
            4.078823089599609,
            -0.022448450326919556,
        ],
        [
            1.1738386154174805,
            -3.4361133575439453,
            6.087527275085449,
            -0.22711987793445587,
        ],
        [
            1.536586046218872,
            -4.620868682861328,
            8.500049591064453,
            -0.4722634553909302,
        ],
        [
            1.93226957321167,
            -5.873608589172363,
            11.130708694458008,
            -0.741826057434082,
        ],
        [
            2.3357255458831787,
            -7.1171488761901855,
            13.825055122375488,
            -1.0229263305664062,
        ],
        [
            2.7090036869049072,
            -8.236330032348633,
            16.341663360595703,
            -1.2931394577026367,
        ],
        [
            3.0242605209350586,
            -9.148687362670898,
            18.502975463867188,
            -1.5357376337051392,
        ],
        [
            3.2640151977539062,
            -9.801505088806152,
            20.201675415039062,
            -1.741709589958191,
        ],
        [
            3.410398006439209,
            -10.079548835754395,
            21.452529907226562,
            -1.9484626054763794,
        ],
    ];
}
