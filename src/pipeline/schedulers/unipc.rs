//! UniPC multistep (`UniPCMultistepScheduler` with its defaults: `bh2`, order 2, `predict_x0`,
//! `lower_order_final`, no step without corrector). Each step first corrects the latents it is given
//! with the new model output (UniC), then predicts the next latents (UniP), both on the data
//! prediction x0 in log-SNR time, like DPM-Solver++.
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, Spacing, ZeroSnrTerminal, check_steps, left_coeff, np_arange,
    np_interp_unit_grid, np_linspace, reject_flag, torch_ln, torch_sqrt, train_sigmas, unsupported,
};
use super::sigmas::{karras_sigmas, log_sigmas, sigma_to_t};
use crate::error::{Error, Result};
use tch::Tensor;

pub struct UniPcMultistepScheduler {
    timesteps: Vec<f64>,
    /// One sigma per timestep, then the final sigma (0, or sigma_min).
    sigmas: Vec<f32>,
    prediction: PredictionType,
    solver_order: usize,
    /// `bh2` (default): B(h) = e^h - 1; `bh1`: B(h) = h.
    bh2: bool,
    lower_order_final: bool,
    /// Step indices whose model output is not used to correct the latents they produced.
    disable_corrector: Vec<usize>,
    /// The data predictions of the previous step and of the current one (oldest first).
    model_outputs: Vec<Option<Tensor>>,
    /// The (corrected) latents the previous step started from, and the order it predicted with.
    last: Option<(Tensor, usize)>,
    lower_order_nums: usize,
    step_index: usize,
}

/// `alpha_t`, `sigma_t` and `lambda_t = log(alpha_t) - log(sigma_t)` of a sigma, in float32 as
/// `_sigma_to_alpha_sigma_t` and the updates compute them (libtorch's sqrt and log).
#[derive(Clone, Copy)]
struct Point {
    alpha: f32,
    sigma: f32,
    lambda: f32,
}

fn point(sigma: f32) -> Result<Point> {
    let alpha = 1.0 / torch_sqrt(sigma * sigma + 1.0)?;
    let sigma = sigma * alpha;
    Ok(Point {
        alpha,
        sigma,
        lambda: torch_ln(alpha)? - torch_ln(sigma)?,
    })
}

/// `torch.expm1` of a float32 scalar tensor.
fn torch_expm1(x: f32) -> Result<f32> {
    Ok(Tensor::from(x).f_expm1()?.f_double_value(&[])? as f32)
}

/// The scalars one UniP or UniC update of order 1 or 2 needs, from `t` (the target), `s0` (the
/// latest point) and, for order 2, `s1` (the one before).
struct Coefficients {
    /// `e^{-h} - 1`, the exponential integrator's step for x0.
    h_phi_1: f32,
    b_h: f32,
    /// `rk = (lambda_s1 - lambda_s0) / h` (order 2).
    rk: Option<f32>,
    /// `b_i = h_phi_k(i) * i! / B(h)` for i = 1..=order: the right-hand side of UniC's system.
    b: Vec<f32>,
}

impl UniPcMultistepScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=2).contains(&solver_order) {
            return Err(unsupported(
                "solver_order",
                &solver_order.to_string(),
                "only orders 1 and 2 are implemented",
            ));
        }
        // diffusers maps the DPM-Solver names onto bh2.
        let bh2 = match config.solver_type.as_deref() {
            None | Some("bh2") | Some("midpoint") | Some("heun") | Some("logrho") => true,
            Some("bh1") => false,
            Some(other) => {
                return Err(unsupported("solver_type", other, "expected bh1 or bh2"));
            }
        };
        if config.predict_x0 == Some(false) {
            return Err(unsupported(
                "predict_x0",
                "false",
                "only the data-prediction (x0) form is implemented",
            ));
        }
        reject_flag("thresholding", config.thresholding)?;
        reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        reject_flag("use_flow_sigmas", config.use_flow_sigmas)?;
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

        // The same integer layouts as DPM-Solver++ (without lambda_min_clipped).
        let timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<i64> = np_linspace(0.0, (n_train - 1) as f64, steps + 1)
                    .into_iter()
                    .rev()
                    .map(|t| t.round_ties_even() as i64)
                    .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = (n_train / (steps + 1)) as i64;
                (1..=steps as i64)
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
        let train = train_sigmas(&alphas_cumprod)?;
        let (timesteps, mut sigmas, final_sigma): (Vec<i64>, Vec<f32>, f32) =
            if config.use_karras_sigmas == Some(true) {
                // Karras sigmas over the training range (or the config's sigma_min/sigma_max),
                // each mapped back to its timestep and rounded; "sigma_min" repeats the last one.
                let karras = karras_sigmas(
                    config.sigma_min.unwrap_or(f64::from(train[0])),
                    config.sigma_max.unwrap_or(f64::from(train[n_train - 1])),
                    steps,
                );
                let log_sigmas = log_sigmas(&train);
                let timesteps = karras
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even() as i64)
                    .collect();
                let sigmas: Vec<f32> = karras.iter().map(|&s| s as f32).collect();
                let last = sigmas.last().copied().unwrap_or(0.0);
                (timesteps, sigmas, last)
            } else {
                let sigmas = timesteps
                    .iter()
                    .map(|&t| np_interp_unit_grid(t as f64, &train) as f32)
                    .collect();
                let sigma_min = torch_sqrt((1.0 - alphas_cumprod[0]) / alphas_cumprod[0])?;
                (timesteps, sigmas, sigma_min)
            };
        if timesteps.is_empty() {
            return Err(Error::InvalidArgument(
                "UniPC: the schedule has no timesteps".into(),
            ));
        }
        sigmas.push(if final_sigma_zero { 0.0 } else { final_sigma });

        Ok(UniPcMultistepScheduler {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas,
            prediction,
            solver_order,
            bh2,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            model_outputs: (0..solver_order).map(|_| None).collect(),
            last: None,
            lower_order_nums: 0,
            step_index: 0,
        })
    }

    /// The sigmas (one per timestep, then the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The data prediction x0 (`convert_model_output` with `predict_x0`), in the inputs' kind.
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let p = point(self.sigmas[self.step_index])?;
        Ok(match self.prediction {
            PredictionType::Epsilon => {
                (sample - model_output * left_coeff(p.sigma, model_output)) / f64::from(p.alpha)
            }
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => {
                sample * left_coeff(p.alpha, sample)
                    - model_output * left_coeff(p.sigma, model_output)
            }
        })
    }

    /// The scalars of an update from `s0` to `t`, as diffusers computes them on float32 0-d tensors
    /// (the phi functions by the recurrence `h_phi_{k+1} = h_phi_k / hh - 1 / (k + 1)!`).
    fn coefficients(&self, t: Point, s0: Point, s1: Option<Point>) -> Result<Coefficients> {
        let h = t.lambda - s0.lambda;
        let rk = s1.map(|s1| (s1.lambda - s0.lambda) / h);
        let order = if rk.is_some() { 2 } else { 1 };
        // predict_x0: the integrator runs on -h.
        let hh = -h;
        let h_phi_1 = torch_expm1(hh)?;
        let b_h = if self.bh2 { torch_expm1(hh)? } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial: u32 = 1;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order as u32 {
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i + 1;
            // `1 / factorial` is a Python float, rounded to float32 by the tensor op.
            h_phi_k = h_phi_k / hh - (1.0 / f64::from(factorial)) as f32;
        }
        Ok(Coefficients {
            h_phi_1,
            b_h,
            rk,
            b,
        })
    }

    /// UniP: the latents at `sigmas[i + 1]` from the (corrected) latents `x` at `sigmas[i]`.
    fn predict(&self, x: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let t = point(self.sigmas[i + 1])?;
        let s0 = point(self.sigmas[i])?;
        let s1 = if order == 2 {
            Some(point(self.sigmas[i - 1])?)
        } else {
            None
        };
        let c = self.coefficients(t, s0, s1)?;
        let (m0, m1) = self.history(order)?;
        let x_t = self.base_update(x, m0, t, s0, c.h_phi_1)?;
        let alpha_b_h = t.alpha * c.b_h;
        Ok(match (m1, c.rk) {
            // Order 2 fixes rho_p = 0.5 instead of solving the 1x1 system.
            (Some(m1), Some(rk)) => {
                let d1 = (m1 - m0) / f64::from(rk);
                let pred_res = d1 * 0.5;
                x_t - &pred_res * left_coeff(alpha_b_h, &pred_res)
            }
            // diffusers subtracts `alpha_t * B_h * 0`, which is NaN when B_h is infinite (bh1
            // into sigma 0); kept so the result is diffusers' in that case too.
            _ => x_t - f64::from(alpha_b_h * 0.0),
        })
    }

    /// UniC: corrects the latents `this_sample` the previous step predicted at `sigmas[i]` from
    /// `last_sample` at `sigmas[i - 1]`, with `this_x0`, the data prediction of the new model output.
    fn correct(&self, this_x0: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let t = point(self.sigmas[i])?;
        let s0 = point(self.sigmas[i - 1])?;
        let s1 = if order == 2 {
            Some(point(self.sigmas[i - 2])?)
        } else {
            None
        };
        let c = self.coefficients(t, s0, s1)?;
        let (m0, m1) = self.history(order)?;
        let x_t = self.base_update(last_sample, m0, t, s0, c.h_phi_1)?;
        let d1_t = this_x0 - m0;
        let alpha_b_h = t.alpha * c.b_h;
        let res = match (m1, c.rk) {
            (Some(m1), Some(rk)) => {
                // rho_c solves R rho = b with R = [[1, 1], [rk, 1]]: through libtorch's
                // linalg.solve on the same float32 values, so the LU rounding is diffusers'.
                let r = Tensor::from_slice(&[1.0_f32, 1.0, rk, 1.0]).f_view([2, 2])?;
                let rhs = Tensor::from_slice(&c.b);
                let rhos = Vec::<f32>::try_from(&Tensor::f_linalg_solve(&r, &rhs, true)?)?;
                let d1 = (m1 - m0) / f64::from(rk);
                let corr_res = &d1 * f64::from(rhos[0]);
                corr_res + &d1_t * left_coeff(rhos[1], &d1_t)
            }
            _ => &d1_t * left_coeff(0.5, &d1_t),
        };
        Ok(x_t - &res * left_coeff(alpha_b_h, &res))
    }

    /// `sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0`, the first-order part of both updates.
    fn base_update(
        &self,
        x: &Tensor,
        m0: &Tensor,
        t: Point,
        s0: Point,
        h_phi_1: f32,
    ) -> Result<Tensor> {
        Ok(x * left_coeff(t.sigma / s0.sigma, x) - m0 * left_coeff(t.alpha * h_phi_1, m0))
    }

    /// The latest data prediction and, for order 2, the one before.
    fn history(&self, order: usize) -> Result<(&Tensor, Option<&Tensor>)> {
        let missing = || Error::InvalidArgument("UniPC: missing previous model output".into());
        let n = self.model_outputs.len();
        let m0 = self.model_outputs[n - 1].as_ref().ok_or_else(missing)?;
        let m1 = if order == 2 {
            Some(self.model_outputs[n - 2].as_ref().ok_or_else(missing)?)
        } else {
            None
        };
        Ok((m0, m1))
    }
}

impl Scheduler for UniPcMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        super::check_step_order("UniPC", step_index, self.step_index, n)?;
        // x0 from the latents as given, before they are corrected.
        let x0 = self.convert_model_output(model_output, sample)?;
        let sample = match self.last.take() {
            Some((last_sample, last_order))
                if !self.disable_corrector.contains(&(step_index - 1)) =>
            {
                // The history still ends with the previous step's x0 here.
                self.correct(&x0, &last_sample, last_order)?
                    .to_kind(last_sample.kind())
            }
            _ => sample.shallow_clone(),
        };
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0));

        let order = if self.lower_order_final {
            self.solver_order.min(n - step_index)
        } else {
            self.solver_order
        };
        // Warm-up: never more previous outputs than there are.
        let order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, order)?.to_kind(sample.kind());
        self.last = Some((sample, order));
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedulers::test_layouts;
    use crate::pipeline::schedulers::test_util::{assert_close, check_layouts, sd14, t};

    #[test]
    fn karras_and_plain_layouts_match_diffusers() {
        check_layouts(test_layouts::UNIPC, |c, steps| {
            let s = UniPcMultistepScheduler::new(c, steps).unwrap();
            (
                s.timesteps().to_vec(),
                s.sigmas().to_vec(),
                s.init_noise_sigma(),
            )
        });
    }

    #[test]
    fn rejects_unsupported_options() {
        for (key, json) in [
            ("solver_order", r#"{"solver_order": 3}"#),
            ("solver_type", r#"{"solver_type": "dpmsolver"}"#),
            ("predict_x0", r#"{"predict_x0": false}"#),
            ("thresholding", r#"{"thresholding": true}"#),
            ("use_flow_sigmas", r#"{"use_flow_sigmas": true}"#),
            ("final_sigmas_type", r#"{"final_sigmas_type": "max"}"#),
            (
                "prediction_type",
                r#"{"prediction_type": "flow_prediction"}"#,
            ),
        ] {
            let c = SchedulerConfig::from_json(json, "scheduler_config.json").unwrap();
            assert!(
                matches!(UniPcMultistepScheduler::new(&c, 10), Err(Error::Unsupported { key: ref k, .. }) if k == key),
                "{key}"
            );
        }
    }

    /// All steps at 10 inference steps. Reference (diffusers 0.42.1, torch 2.11, float32 CPU):
    /// ```python
    /// sd14 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    ///             num_train_timesteps=1000, steps_offset=1, trained_betas=None)
    /// s = UniPCMultistepScheduler(**sd14, **kw); s.set_timesteps(10)
    /// x = torch.tensor([0.5, -1.0, 1.5, 0.25]).view(1, 2, 1, 2)
    /// base = torch.tensor([0.3, -0.2, 0.1, 0.4]).view(1, 2, 1, 2)
    /// for i, t in enumerate(s.timesteps): x = s.step(base * (1 + 0.1 * i) - 0.05 * i, t, x).prev_sample
    /// ```
    /// (predictor order 1, then corrector and predictor order 2, order 1 again at the last step).
    fn run_all(config: &SchedulerConfig, expected: &[[f64; 4]]) {
        let mut s = UniPcMultistepScheduler::new(config, 10).unwrap();
        let mut sample = t(&[0.5, -1.0, 1.5, 0.25]);
        let base = t(&[0.3, -0.2, 0.1, 0.4]);
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
        // bh1 (diffusers' last step is NaN there: B(h) = h is infinite into sigma 0).
        let mut c = sd14();
        c.solver_type = Some("bh1".into());
        run_all(&c, &EXPECTED_BH1);
        let mut s = UniPcMultistepScheduler::new(&sd14(), 10).unwrap();
        let x = t(&[0.0; 4]);
        assert!(s.step(&x, 1, &x, None).is_err());
    }

    const EXPECTED_EPS: [[f64; 4]; 10] = [
        [
            0.6494058966636658,
            -1.6007124185562134,
            2.552018880844116,
            0.13601508736610413,
        ],
        [
            0.8833886981010437,
            -2.3806674480438232,
            4.0980401039123535,
            -0.017644256353378296,
        ],
        [
            1.195499062538147,
            -3.360302209854126,
            6.130847930908203,
            -0.216289684176445,
        ],
        [
            1.5706191062927246,
            -4.501752853393555,
            8.568114280700684,
            -0.4552469551563263,
        ],
        [
            1.9794347286224365,
            -5.708530902862549,
            11.225037574768066,
            -0.7182435989379883,
        ],
        [
            2.3969297409057617,
            -6.9029364585876465,
            13.947463035583496,
            -0.9923244714736938,
        ],
        [
            2.783815383911133,
            -7.974490642547607,
            16.49128532409668,
            -1.2557337284088135,
        ],
        [
            3.111379623413086,
            -8.84377384185791,
            18.677209854125977,
            -1.4921783208847046,
        ],
        [
            3.3620657920837402,
            -9.458333015441895,
            20.39777183532715,
            -1.6926846504211426,
        ],
        [
            3.5140857696533203,
            -9.716647148132324,
            21.659900665283203,
            -1.896619200706482,
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
            0.4643928110599518,
            -0.9645511507987976,
            1.49102783203125,
            0.20079602301120758,
        ],
        [
            0.43962571024894714,
            -0.9271586537361145,
            1.490275502204895,
            0.16388888657093048,
        ],
        [
            0.4116348326206207,
            -0.8728159070014954,
            1.4945372343063354,
            0.11966532468795776,
        ],
        [
            0.38246557116508484,
            -0.8010433912277222,
            1.5056695938110352,
            0.07033351063728333,
        ],
        [
            0.3532152473926544,
            -0.7101147770881653,
            1.5250985622406006,
            0.016838470473885536,
        ],
        [
            0.3255600035190582,
            -0.6017680764198303,
            1.5536816120147705,
            -0.0386488176882267,
        ],
        [
            0.3005730211734772,
            -0.47609156370162964,
            1.5929515361785889,
            -0.09514053165912628,
        ],
        [
            0.27919304370880127,
            -0.32833972573280334,
            1.6497695446014404,
            -0.15397174656391144,
        ],
        [
            0.22498634457588196,
            -0.04054531455039978,
            1.6446384191513062,
            -0.24642325937747955,
        ],
    ];
    const EXPECTED_BH1: [[f64; 4]; 9] = [
        [
            0.6494058966636658,
            -1.6007124185562134,
            2.552018880844116,
            0.13601508736610413,
        ],
        [
            0.8861212134361267,
            -2.371103525161743,
            4.103505611419678,
            -0.016278015449643135,
        ],
        [
            1.200943112373352,
            -3.341248035430908,
            6.141737461090088,
            -0.21356773376464844,
        ],
        [
            1.5776903629302979,
            -4.477003574371338,
            8.582259178161621,
            -0.4517113268375397,
        ],
        [
            1.9879697561264038,
            -5.678658962249756,
            11.242110252380371,
            -0.7139760255813599,
        ],
        [
            2.407334089279175,
            -6.866521835327148,
            13.968274116516113,
            -0.9871223568916321,
        ],
        [
            2.7961933612823486,
            -7.931169033050537,
            16.51604461669922,
            -1.2495448589324951,
        ],
        [
            3.125614643096924,
            -8.793951034545898,
            18.705684661865234,
            -1.4850609302520752,
        ],
        [
            3.3782830238342285,
            -9.401570320129395,
            20.430212020874023,
            -1.684576153755188,
        ],
    ];
}
