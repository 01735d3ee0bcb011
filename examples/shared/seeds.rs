//! Four claims of the seed articles, each reproduced with the GPU optimizer on a problem of a
//! few scalars ([`super::lab`]), checked step by step against the CPU reference, printed as
//! numbers and drawn as one SVG.

use plotters::prelude::SeriesLabelPosition;
use wgpu_optim::Config;

use super::Result;
use super::gpu::{Gpu, Rng};
use super::lab::{self, Check, Problem, Run};
use super::plot::{self, Axis, Panel, Series};

/// One experiment: its runs, the numbers it prints and the chart it draws.
pub struct Study {
    /// The SVG's file name in `docs/plots/`.
    pub file: &'static str,
    pub runs: Vec<Run>,
    pub lines: Vec<String>,
    pub panels: Vec<Panel>,
    pub panel_size: (u32, u32),
}

impl Study {
    /// Every run replayed with the CPU reference.
    pub fn checks(&self) -> Vec<Check> {
        self.runs.iter().map(Run::check).collect()
    }

    /// Prints the numbers and the reference checks; fails if a check failed.
    pub fn report(&self) -> Result<()> {
        for line in &self.lines {
            println!("{line}");
        }
        let checks = self.checks();
        for check in &checks {
            println!("{}", check.summary());
        }
        checks.iter().try_for_each(Check::result)
    }

    pub fn write_svg(&self, path: &std::path::Path) -> Result<()> {
        plot::write_svg(path, self.panel_size, &self.panels)
    }

    /// Runs the example: prints, checks, and writes `docs/plots/<file>`.
    pub fn main(self) -> Result<()> {
        self.report()?;
        let path = plot::docs_plot(self.file);
        self.write_svg(&path)?;
        println!("wrote {}", path.display());
        Ok(())
    }
}

/// `(t, y)` points from t = 1.
fn from_step_1(values: impl IntoIterator<Item = f64>) -> Vec<(f64, f64)> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, y)| ((i + 1) as f64, y))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Bias correction

pub const BIAS_CORRECTION_LR: f64 = 1e-3;
pub const BIAS_CORRECTION_STEPS: usize = 3000;

/// A constant gradient of 1 from a start of 0, for betas (0.9, 0.999) and (0.9, 0.99), with
/// and without bias correction: how far each step moves, in units of the learning rate.
///
/// With bias correction `m_hat = g` and `v_hat = g^2` from the first step, so every step is
/// `lr`. Without it, step `t` is `lr (1 - b1^t) / sqrt(1 - b2^t)`: at step 1, `0.1 / sqrt(0.001)`
/// = 3.16 lr for (0.9, 0.999), the step BERT's optimizer (which has no bias correction) takes.
pub fn bias_correction(gpu: &Gpu, steps: usize) -> Result<Study> {
    let problem = Problem {
        x0: vec![0.0],
        curvature: vec![0.0],
        offsets: vec![1.0; steps],
        bounds: None,
    };
    let arms = [
        ((0.9, 0.999), false, plot::RED_),
        ((0.9, 0.99), false, plot::ORANGE),
        ((0.9, 0.999), true, plot::BLUE_),
        ((0.9, 0.99), true, plot::GREEN_),
    ];
    let mut runs = Vec::new();
    let mut series = Vec::new();
    let mut lines = vec![format!(
        "Step size / lr for a constant gradient, Adam, lr {BIAS_CORRECTION_LR:e}:"
    )];
    let shown: Vec<usize> = [1, 2, 5, 10, 20, 100, 1000, 3000]
        .into_iter()
        .filter(|&t| t <= steps)
        .collect();
    lines.push(format!(
        "  {:<38} {}",
        "betas, bias correction",
        shown
            .iter()
            .map(|t| format!("{:>7}", format!("t={t}")))
            .collect::<String>()
    ));
    for ((b1, b2), corrected, color) in arms {
        let label = format!(
            "({b1}, {b2}) {} bias correction",
            if corrected { "with" } else { "without" }
        );
        let config = Config::adam()
            .lr(BIAS_CORRECTION_LR)
            .betas(b1, b2)
            .bias_correction(corrected);
        let run = lab::run(gpu, &problem, &label, &config, |_| BIAS_CORRECTION_LR)?;
        let ratio = step_sizes(&run);
        let (peak_t, peak) =
            ratio.iter().enumerate().fold(
                (0, 0.0f64),
                |best, (i, &r)| if r > best.1 { (i + 1, r) } else { best },
            );
        lines.push(format!(
            "  {label:<38} {}   (largest {peak:.2} at t={peak_t})",
            shown
                .iter()
                .map(|&t| format!("{:>7.3}", ratio[t - 1]))
                .collect::<String>()
        ));
        // Both corrected runs sit at exactly 1: the first is drawn wide so that both show.
        let width = if corrected && b2 == 0.999 { 6 } else { 2 };
        series.push(Series::new(label, color, from_step_1(ratio)).width(width));
        runs.push(run);
    }
    lines.push(format!(
        "  BERT's optimizer (no bias correction, betas (0.9, 0.999)) moves its first step {:.2} lr instead of lr.",
        step_sizes(&runs[0])[0]
    ));
    Ok(Study {
        file: "bias_correction.svg",
        runs,
        lines,
        panels: vec![Panel::new(
            "Adam's step for a constant gradient",
            Axis::log("step t").range(1.0, steps as f64),
            Axis::linear("|x_t - x_(t-1)| / lr").range(0.0, 7.5),
            series,
        )],
        panel_size: (760, 460),
    })
}

/// |x_t - x_(t-1)| / lr for each step of a one-scalar run.
pub fn step_sizes(run: &Run) -> Vec<f64> {
    let x = run.param_path(0);
    x.windows(2)
        .zip(&run.lrs)
        .map(|(w, lr)| (w[1] as f64 - w[0] as f64).abs() / lr)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Adam + L2 is not AdamW

pub const DECAY_LR: f64 = 1e-2;
pub const DECAY_STEPS: usize = 300;
pub const DECAY: f64 = 1.0;
/// The two weights' gradient scales: large and small variance.
pub const GRADIENT_SCALES: [f32; 2] = [10.0, 0.01];

/// Two weights starting at 1 whose loss gradient is pure noise, one of standard deviation 10
/// and one of 0.01 (a sign that flips every step: mean 0, no drift), so only the weight decay
/// pulls them towards 0, with the same coefficient for Adam + L2 (coupled: the decay term goes
/// through the adaptive normalisation) and AdamW (decoupled: `x *= 1 - lr wd`).
pub fn adamw_vs_l2(gpu: &Gpu, steps: usize) -> Result<Study> {
    let offsets: Vec<f32> = (0..steps)
        .flat_map(|t| {
            let sign = if t % 2 == 0 { 1.0 } else { -1.0 };
            GRADIENT_SCALES.map(|s| sign * s)
        })
        .collect();
    let problem = Problem {
        x0: vec![1.0, 1.0],
        curvature: vec![0.0, 0.0],
        offsets,
        bounds: None,
    };
    let arms = [
        ("Adam + L2", Config::adam(), [plot::RED_, plot::ORANGE]),
        ("AdamW", Config::adamw(), [plot::BLUE_, plot::GREEN_]),
    ];
    let mut runs = Vec::new();
    let mut series = Vec::new();
    let mut lines = vec![format!(
        "Weight magnitude after {steps} steps, lr {DECAY_LR}, weight decay {DECAY}, gradients pure noise:"
    )];
    for (name, config, colors) in arms {
        let config = config.lr(DECAY_LR).weight_decay(DECAY);
        let run = lab::run(gpu, &problem, name, &config, |_| DECAY_LR)?;
        for (i, scale) in GRADIENT_SCALES.iter().enumerate() {
            let path = run.param_path(i);
            let label = format!("{name}, gradient std {scale}");
            lines.push(format!(
                "  {label:<32} |x| = {:.4}   (after {} steps: {:.4})",
                path[steps].abs(),
                steps / 3,
                path[steps / 3].abs()
            ));
            let points = path
                .iter()
                .enumerate()
                .map(|(t, x)| (t as f64, x.abs() as f64));
            // AdamW's two curves coincide: the first is drawn wide so that both show.
            let width = if name == "AdamW" && i == 0 { 6 } else { 2 };
            series.push(Series::new(label, colors[i], points.collect()).width(width));
        }
        runs.push(run);
    }
    lines.push(format!(
        "  decoupled decay alone would leave (1 - lr wd)^{steps} = {:.4}",
        (1.0 - DECAY_LR * DECAY).powi(steps as i32)
    ));
    Ok(Study {
        file: "adamw_vs_l2.svg",
        runs,
        lines,
        panels: vec![
            Panel::new(
                "Same weight decay, coupled (L2) or decoupled (AdamW)",
                Axis::linear("step t"),
                Axis::log("|x_t|").range(1e-3, 1.5),
                series,
            )
            .legend(SeriesLabelPosition::LowerLeft),
        ],
        panel_size: (760, 460),
    })
}

// ---------------------------------------------------------------------------------------------
// AMSGrad on Reddi, Kale and Kumar's online problem

/// `f_t(x) = C x` for `t mod 3 = 1`, `-x` otherwise, on `[-1, 1]`.
pub const REDDI_C: f32 = 3.0;
pub const REDDI_ALPHA: f64 = 0.5;
pub const REDDI_STEPS: usize = 2000;

/// Reddi, Kale and Kumar (2018), Theorem 1: over each three steps the loss is `(C - 2) x`, so
/// for `C > 2` the best point of `[-1, 1]` is -1. With `b1 = 0`, `b2 = 1 / (1 + C^2)` and
/// `lr_t = alpha / sqrt(t)`, Adam's second moment forgets the rare large gradient so fast that
/// the two small ones move `x` further up than the large one moves it down: it goes to +1, the
/// worst point. AMSGrad divides by the largest second moment seen and goes to -1. The
/// projection onto `[-1, 1]` is the engine's kernel, after each step.
pub fn amsgrad(gpu: &Gpu, steps: usize) -> Result<Study> {
    let offsets: Vec<f32> = (1..=steps)
        .map(|t| if t % 3 == 1 { REDDI_C } else { -1.0 })
        .collect();
    let problem = Problem {
        x0: vec![0.0],
        curvature: vec![0.0],
        offsets,
        bounds: Some((-1.0, 1.0)),
    };
    let b2 = 1.0 / (1.0 + (REDDI_C as f64).powi(2));
    let lr = |t: u64| REDDI_ALPHA / (t as f64).sqrt();
    let arms = [
        ("Adam", Config::adam(), plot::RED_),
        ("AMSGrad", Config::adam().amsgrad(true), plot::BLUE_),
    ];
    let mut runs = Vec::new();
    let mut series = Vec::new();
    let mut lines = vec![format!(
        "Reddi et al.'s problem, C = {REDDI_C}, betas (0, {b2:.3}), lr {REDDI_ALPHA}/sqrt(t), x in [-1, 1]; the best x is -1:"
    )];
    for (name, config, color) in arms {
        let config = config.betas(0.0, b2);
        let run = lab::run(gpu, &problem, name, &config, lr)?;
        let x = run.param_path(0);
        let shown: String = [10, 100, 1000, steps]
            .iter()
            .filter(|&&t| t <= steps)
            .map(|&t| format!("  x_{t} = {:+.3}", x[t]))
            .collect();
        lines.push(format!(
            "  {name:<8}{shown}   average regret {:.3}",
            average_regret(&run)
        ));
        series.push(Series::new(
            name,
            color,
            x.iter()
                .enumerate()
                .map(|(t, &x)| (t as f64, x as f64))
                .collect(),
        ));
        runs.push(run);
    }
    Ok(Study {
        file: "amsgrad.svg",
        runs,
        lines,
        panels: vec![
            Panel::new(
                "Reddi et al.'s online problem: x_t",
                Axis::log("step t").range(1.0, steps as f64),
                Axis::linear("x_t").range(-1.1, 1.1),
                series,
            )
            .legend(SeriesLabelPosition::MiddleRight),
        ],
        panel_size: (760, 460),
    })
}

/// `(1/T) sum_t f_t(x_(t-1)) - min_x (1/T) sum_t f_t(x)` for the linear losses
/// `f_t(x) = g_t x` on [-1, 1] (each `f_t` is paid at the point chosen before seeing it).
pub fn average_regret(run: &Run) -> f64 {
    let total: f64 = run.grads.iter().map(|g| g[0] as f64).sum();
    let best = -total.abs();
    let paid: f64 = run
        .grads
        .iter()
        .zip(&run.params)
        .map(|(g, x)| g[0] as f64 * x[0] as f64)
        .sum();
    (paid - best) / run.steps() as f64
}

// ---------------------------------------------------------------------------------------------
// Yogi vs Adam on bursty gradients

pub const BURSTY_LR: f64 = 1e-2;
pub const BURSTY_STEPS: usize = 3000;
pub const BURSTY_BETAS: (f64, f64) = (0.9, 0.99);
pub const BURSTY_SCALARS: usize = 32;
/// A burst of `BURST_LEN` steps of gradient noise with standard deviation `BURST_STD` starts
/// every `BURST_EVERY` steps (from step `BURST_EVERY` on); the noise is `CALM_STD` otherwise.
pub const BURST_EVERY: usize = 500;
pub const BURST_LEN: usize = 10;
pub const BURST_STD: f64 = 10.0;
pub const CALM_STD: f64 = 0.1;

/// Whether step `t` is in a burst.
pub fn in_burst(t: usize) -> bool {
    t >= BURST_EVERY && t % BURST_EVERY < BURST_LEN
}

/// `0.5 x^2` on 32 scalars from `x = 1`, with gradient noise that is small except for rare
/// bursts of large noise: d2l's motivation for Yogi. Adam's `v += (1 - b2) (g^2 - v)` forgets
/// a burst at the rate `b2`, so its step size has grown back by the next burst, which then
/// throws the parameters far; Yogi's `v -= (1 - b2) sign(v - g^2) g^2` shrinks `v` by at most
/// `(1 - b2) g^2` per step, so it remembers the bursts and keeps its steps smaller. Same lr,
/// betas, eps and initial `v` for both.
pub fn yogi_vs_adam(gpu: &Gpu, steps: usize) -> Result<Study> {
    let n = BURSTY_SCALARS;
    let mut rng = Rng::new(2018);
    let offsets: Vec<f32> = (1..=steps)
        .flat_map(|t| {
            let std = if in_burst(t) { BURST_STD } else { CALM_STD };
            (0..n)
                .map(|_| (rng.normal() * std) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let problem = Problem {
        x0: vec![1.0; n],
        curvature: vec![1.0; n],
        offsets,
        bounds: None,
    };
    let (b1, b2) = BURSTY_BETAS;
    let yogi = Config::yogi().lr(BURSTY_LR).betas(b1, b2);
    let adam = Config::adam()
        .lr(BURSTY_LR)
        .betas(b1, b2)
        .eps(yogi.eps)
        .initial_accumulator(yogi.initial_accumulator);
    let arms = [("Adam", adam, plot::RED_), ("Yogi", yogi, plot::BLUE_)];
    let mut runs = Vec::new();
    let (mut losses, mut lrs) = (Vec::new(), Vec::new());
    let mut lines = vec![format!(
        "0.5 x^2 on {n} scalars, noise std {CALM_STD}, bursts of std {BURST_STD} for {BURST_LEN} steps every {BURST_EVERY}; lr {BURSTY_LR}, betas ({b1}, {b2}):"
    )];
    for (name, config, color) in arms {
        let run = lab::run(gpu, &problem, name, &config, |_| BURSTY_LR)?;
        let loss = losses_of(&run);
        let eff = effective_lrs(&run);
        let peaks = burst_peaks(&loss);
        let mean_peak = peaks.iter().sum::<f64>() / peaks.len().max(1) as f64;
        let calm: Vec<f64> = eff[BURST_EVERY..].to_vec();
        let (lo, hi) = calm.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
        lines.push(format!(
            "  {name:<5} mean loss peak after a burst {mean_peak:.2e}, final loss {:.2e}, effective lr from step {BURST_EVERY} in [{lo:.1e}, {hi:.1e}]",
            loss[steps]
        ));
        losses.push(Series::new(
            name,
            color,
            loss.iter()
                .enumerate()
                .map(|(t, &l)| (t as f64, l))
                .collect(),
        ));
        lrs.push(Series::new(name, color, from_step_1(eff)));
        runs.push(run);
    }
    Ok(Study {
        file: "yogi_vs_adam.svg",
        runs,
        lines,
        panels: vec![
            Panel::new(
                "Loss 0.5 mean(x^2), bursts every 500 steps",
                Axis::linear("step t"),
                Axis::log("loss"),
                losses,
            ),
            Panel::new(
                "Effective learning rate lr / (sqrt(v_hat) + eps)",
                Axis::linear("step t"),
                Axis::log("mean over the scalars"),
                lrs,
            )
            .legend(SeriesLabelPosition::LowerRight),
        ],
        panel_size: (620, 440),
    })
}

/// `0.5 mean(x^2)` after each step, `t = 0..=steps`.
pub fn losses_of(run: &Run) -> Vec<f64> {
    run.params
        .iter()
        .map(|x| 0.5 * x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64)
        .collect()
}

/// The mean over the scalars of `lr_t / (sqrt(v_t / bc2) + eps)`, the factor step `t` applies
/// to the bias-corrected first moment.
pub fn effective_lrs(run: &Run) -> Vec<f64> {
    let c = &run.config;
    (1..=run.steps())
        .map(|t| {
            let bc2 = 1.0 - c.betas[1].powi(t as i32);
            let v = &run.states[t].exp_avg_sq;
            v.iter()
                .map(|&v| run.lrs[t - 1] / ((v as f64 / bc2).sqrt() + c.eps))
                .sum::<f64>()
                / v.len() as f64
        })
        .collect()
}

/// The highest loss within `BURST_EVERY / 5` steps of each burst's start.
pub fn burst_peaks(loss: &[f64]) -> Vec<f64> {
    (1..)
        .map(|k| k * BURST_EVERY)
        .take_while(|&start| start < loss.len())
        .map(|start| {
            let end = (start + BURST_EVERY / 5).min(loss.len());
            loss[start..end].iter().cloned().fold(0.0, f64::max)
        })
        .collect()
}
