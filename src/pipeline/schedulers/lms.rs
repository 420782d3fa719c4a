//! LMS (`LMSDiscreteScheduler`, order 4 as StableDiffusionPipeline calls it): a linear multistep
//! method in sigma space. Each step integrates, from the current sigma to the next, the polynomial
//! through the last (up to) four ODE slopes, i.e. weights each slope by the integral of its Lagrange
//! basis polynomial.
//!
//! diffusers computes those integrals numerically with `scipy.integrate.quad` on a float32
//! integrand; the integrand is a polynomial of degree at most 3, so here it is expanded and
//! integrated exactly in float64. The two agree to float32 rounding of the coefficient (quad's
//! 21-point Gauss–Kronrod rule is exact for such polynomials, up to the float32 noise of the
//! integrand diffusers evaluates), well inside the tolerance of the reference tests.
use super::Scheduler;
use super::config::{
    PredictionType, SchedulerConfig, Spacing, check_steps, left_coeff, reject_flag, torch_sqrt,
    train_sigmas,
};
use super::sigmas::{KarrasRange, SigmaSteps, discrete_schedule, karras_option};
use crate::error::{Error, Result};
use tch::Tensor;

/// The order the pipeline uses (`step(..., order=4)` is LMSDiscreteScheduler's default).
const ORDER: usize = 4;

pub struct LmsScheduler {
    steps: SigmaSteps,
    prediction: PredictionType,
    /// The ODE slopes of the last `ORDER` steps, oldest first.
    derivatives: Vec<Tensor>,
    step_index: usize,
}

impl LmsScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        check_steps(config, steps)?;
        reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        let prediction =
            config.prediction(&[PredictionType::Epsilon, PredictionType::VPrediction])?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let alphas_cumprod = config.alphas_cumprod()?;
        let train = train_sigmas(&alphas_cumprod)?;
        // LMS's Karras range is always the interpolated one (its config has no sigma_min/max).
        let karras = karras_option(config, KarrasRange::default());
        let schedule = discrete_schedule(config, steps, spacing, karras, &train);
        let mut sigmas = schedule.sigmas;
        sigmas.push(0.0);
        Ok(LmsScheduler {
            steps: SigmaSteps::new(
                schedule.timesteps.iter().map(|&t| f64::from(t)).collect(),
                sigmas,
                spacing,
            )?,
            prediction,
            derivatives: Vec::with_capacity(ORDER + 1),
            step_index: 0,
        })
    }

    /// The sigmas (one per timestep, then 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }

    /// The weight of the slope taken `current` steps ago in the update of step `t` with `order`
    /// slopes: the integral from `sigmas[t]` to `sigmas[t + 1]` of the Lagrange basis polynomial
    /// that is 1 at `sigmas[t - current]` and 0 at the other nodes.
    fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let nodes: Vec<f32> = (0..order).map(|k| self.steps.sigmas[t - k]).collect();
        let a = f64::from(self.steps.sigmas[t]);
        let b = f64::from(self.steps.sigmas[t + 1]);
        lagrange_basis_integral(&nodes, current, a, b)
    }
}

/// `∫_a^b Π_{k≠j} (τ - x_k) / (x_j - x_k) dτ`, exactly.
///
/// The polynomial is expanded in powers of `u = τ - a` (small near the interval, which keeps the
/// float64 sums accurate) and integrated term by term. The node differences `x_j - x_k` are float32
/// subtractions, as in diffusers' integrand.
pub(crate) fn lagrange_basis_integral(nodes: &[f32], j: usize, a: f64, b: f64) -> f64 {
    // Coefficients in ascending powers of u.
    let mut poly = vec![1.0_f64];
    for (k, &xk) in nodes.iter().enumerate() {
        if k == j {
            continue;
        }
        let denom = f64::from(nodes[j] - xk);
        // (τ - x_k) = u + (a - x_k)
        let shift = a - f64::from(xk);
        let mut next = vec![0.0; poly.len() + 1];
        for (p, &c) in poly.iter().enumerate() {
            next[p + 1] += c / denom;
            next[p] += c * shift / denom;
        }
        poly = next;
    }
    // ∫_0^{b-a} Σ c_p u^p du = Σ c_p h^(p+1) / (p+1), by Horner.
    let h = b - a;
    poly.iter()
        .enumerate()
        .rev()
        .fold(0.0, |acc, (p, &c)| acc * h + c / (p + 1) as f64)
        * h
}

impl Scheduler for LmsScheduler {
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
        super::check_step_order("LMS", step_index, self.step_index, n)?;
        let sigma = self.steps.sigmas[step_index];
        // x0, then the ODE slope; diffusers does not upcast in LMS.
        let pred_original_sample = match self.prediction {
            PredictionType::VPrediction => {
                let c_out = -sigma / torch_sqrt(sigma * sigma + 1.0)?;
                model_output * f64::from(c_out) + sample / f64::from(sigma * sigma + 1.0)
            }
            _ => sample - model_output * left_coeff(sigma, model_output),
        };
        let derivative = (sample - pred_original_sample) / f64::from(sigma);
        self.derivatives.push(derivative);
        if self.derivatives.len() > ORDER {
            let _oldest = self.derivatives.remove(0);
        }

        // Fewer slopes exist during the first steps.
        let order = (step_index + 1).min(ORDER);
        // Summed newest first, from 0, as Python's `sum` does.
        let mut update: Option<Tensor> = None;
        for (current, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            let term = derivative * self.lms_coefficient(order, step_index, current);
            update = Some(match update {
                None => term,
                Some(acc) => acc + term,
            });
        }
        let update = update
            .ok_or_else(|| Error::InvalidArgument("LMS: no derivative to integrate".to_string()))?;
        self.step_index += 1;
        Ok(sample + update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::schedulers::test_layouts;
    use crate::pipeline::schedulers::test_util::{
        check_layouts, check_reference_steps, check_sigma_scheduler_refusals,
    };

    #[test]
    fn layouts_match_diffusers() {
        // LMSDiscreteScheduler lays out timesteps and sigmas exactly as EulerDiscreteScheduler.
        check_layouts(test_layouts::EULER, |c, steps| {
            let s = LmsScheduler::new(c, steps).unwrap();
            (
                s.timesteps().to_vec(),
                s.sigmas().to_vec(),
                s.init_noise_sigma(),
            )
        });
    }

    #[test]
    fn lagrange_integrals_are_exact() {
        // One node: the constant 1 integrates to b - a.
        assert_eq!(lagrange_basis_integral(&[3.0], 0, 3.0, 2.5), -0.5);
        // Two nodes x0 = 2, x1 = 1: L0(τ) = τ - 1 and L1(τ) = 2 - τ both integrate to -1/2 from 2
        // to 1; from 2 to 0 (extrapolating), to 0 and -2.
        let l0 = lagrange_basis_integral(&[2.0, 1.0], 0, 2.0, 1.0);
        let l1 = lagrange_basis_integral(&[2.0, 1.0], 1, 2.0, 1.0);
        assert!((l0 + 0.5).abs() < 1e-15, "{l0}");
        assert!((l1 + 0.5).abs() < 1e-15, "{l1}");
        assert!(lagrange_basis_integral(&[2.0, 1.0], 0, 2.0, 0.0).abs() < 1e-15);
        assert!((lagrange_basis_integral(&[2.0, 1.0], 1, 2.0, 0.0) + 2.0).abs() < 1e-15);
        // The basis sums to 1, so the weights sum to b - a.
        let nodes = [4.0_f32, 3.0, 2.5, 1.0];
        let sum: f64 = (0..4)
            .map(|j| lagrange_basis_integral(&nodes, j, 4.0, 0.5))
            .sum();
        assert!((sum + 3.5).abs() < 1e-12, "{sum}");
    }

    #[test]
    fn steps_match_diffusers() {
        check_reference_steps(
            |c| Box::new(LmsScheduler::new(c, 10).unwrap()),
            &STEP_INDICES,
            [&EXPECTED_EPS, &EXPECTED_V, &EXPECTED_KARRAS_V],
        );
    }

    #[test]
    fn rejects_unsupported_options() {
        check_sigma_scheduler_refusals(|c| LmsScheduler::new(c, 10));
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
    const STEP_INDICES: [usize; 5] = [0, 1, 3, 4, 9];
    const EXPECTED_EPS: [[f64; 4]; 5] = [
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
            0.20955616235733032,
            -0.806370735168457,
            1.4031853675842285,
            -0.13725847005844116,
        ],
        [
            0.3184298276901245,
            -0.878953218460083,
            1.4394766092300415,
            0.007906466722488403,
        ],
        [
            0.4912497401237488,
            -0.9941664934158325,
            1.4970831871032715,
            0.23833298683166504,
        ],
    ];
    const EXPECTED_V: [[f64; 4]; 5] = [
        [
            0.13055676221847534,
            -0.44610482454299927,
            0.761652946472168,
            -0.05034121870994568,
        ],
        [
            0.13904860615730286,
            -0.4595593810081482,
            0.7800701856613159,
            -0.04388958215713501,
        ],
        [
            0.22557535767555237,
            -0.5939846038818359,
            0.9623937606811523,
            0.023516520857810974,
        ],
        [
            0.27197396755218506,
            -0.668021559715271,
            1.0640690326690674,
            0.05844101309776306,
        ],
        [
            0.4910634756088257,
            -0.9937921762466431,
            1.4965208768844604,
            0.23824097216129303,
        ],
    ];
    const EXPECTED_KARRAS_V: [[f64; 4]; 5] = [
        [
            0.199433833360672,
            -0.5493701696395874,
            0.8993065357208252,
            0.0056528449058532715,
        ],
        [
            0.14581909775733948,
            -0.4694674611091614,
            0.7931159138679504,
            -0.03823369741439819,
        ],
        [
            0.10862874984741211,
            -0.4199877977371216,
            0.7313469648361206,
            -0.07239207625389099,
        ],
        [
            0.14992979168891907,
            -0.4939572811126709,
            0.8379846215248108,
            -0.04634612798690796,
        ],
        [
            0.49103933572769165,
            -0.9937437772750854,
            1.496448278427124,
            0.23822899162769318,
        ],
    ];
}
