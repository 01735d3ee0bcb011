//! Learning-rate schedules on the host: one learning rate per parameter group per step, the
//! closed forms of `torch.optim.lr_scheduler`.
//!
//! # Which step gets which value
//!
//! Optimizer steps count `t = 1, 2, ...` as in `semantics.md`. Step `t` uses
//! [`Schedule::lr`]`(base_lr, t)`, which is the learning rate torch gives the same step in its
//! documented loop (`optimizer.step()` then `scheduler.step()`): the value after `t - 1` calls
//! of `scheduler.step()`, i.e. torch's `last_epoch = e = t - 1`. All the formulas below are in
//! `e`. So `lr(base_lr, 1)` is the value of a freshly built torch scheduler, and a schedule
//! that changes "after `total_iters` epochs" changes at step `t = total_iters + 1`.
//! `t = 0` is taken as `t = 1`.
//!
//! `base_lr` is the group's learning rate before any scheduling (torch's `initial_lr`); call
//! `lr` once per group with that group's base. `eta_min` and `end_lr` are absolute learning
//! rates, shared by every group, as in torch and HuggingFace.
//!
//! Owns: the schedules' formulas (their tests and torch's golden values are in
//! `tests/schedule.rs`). May not touch the optimizer or the GPU.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A learning-rate schedule: the learning rate of step `t` as a function of the base one.
///
/// With `e = t - 1` (see the [module docs](self)) and `base = base_lr`:
///
/// ```text
/// Constant    { factor, total_iters }:  base * (factor + (e >= total_iters ? 1 - factor : 0))
/// Linear      { start_factor, end_factor, total_iters }:
///             base * (start_factor + (end_factor - start_factor) * min(e, total_iters) / total_iters)
/// Cosine      { t_max, eta_min }:       eta_min + (base - eta_min) * (1 + cos(pi * e / t_max)) / 2
/// Polynomial  { total_iters, power, end_lr }:
///             end_lr + (base - end_lr) * (1 - min(e, total_iters) / total_iters)^power
/// Step        { step_size, gamma }:     base * gamma^floor(e / step_size)
/// Sequential  { schedules, milestones }:
///             i = number of milestones <= e  (bisect_right)
///             schedules[i] at epoch e - milestones[i - 1]  (e itself for i = 0)
/// ```
///
/// | variant | torch (`torch.optim.lr_scheduler`) | torch's defaults |
/// | --- | --- | --- |
/// | `Constant` | `ConstantLR(factor, total_iters)`; [`Schedule::constant`] is factor 1 | 1/3, 5 |
/// | `Linear` | `LinearLR(start_factor, end_factor, total_iters)`: warmup if start < end, decay if start > end | 1/3, 1, 5 |
/// | `Cosine` | `CosineAnnealingLR(T_max, eta_min)` | -, 0 |
/// | `Polynomial` | `PolynomialLR(total_iters, power)` when `end_lr = 0` | 5, 1 |
/// | `Step` | `StepLR(step_size, gamma)` | -, 0.1 |
/// | `Sequential` | `SequentialLR(schedulers, milestones)` | |
///
/// Every formula is torch's `_get_closed_form_lr`, operation for operation. Torch's `step()`
/// computes the same values recursively (each from the previous one), so a torch run can differ
/// from these in the last bits (`scripts/torch_schedules.py` records such runs for the tests).
///
/// `Sequential` is torch's `SequentialLR`: schedule `i` runs from milestone `i - 1` (the first
/// from step 1), and each schedule after the first starts over at its own epoch 0 at its
/// milestone, from the same base learning rate, whatever the previous one had reached. So
/// "linear warmup, then cosine" is
/// `Sequential { schedules: [Linear warmup, Cosine], milestones: [warmup_epochs] }`;
/// [`Schedule::warmup_cosine`] and [`Schedule::warmup_polynomial`] build the usual ones.
///
/// Differences from torch:
/// - `Polynomial` has `end_lr` (default 0, which is torch's `PolynomialLR`): the decay goes from
///   `base` to `end_lr` and stays there, as in HuggingFace's
///   `get_polynomial_decay_schedule_with_warmup` and BERT's `polynomial_decay`.
/// - Factors may be any finite number >= 0: torch refuses `start_factor = 0` and factors above 1
///   because its recursive form divides by them; the closed form needs no such limit.
/// - `Sequential` may contain `Sequential` (torch's `SequentialLR` cannot restart a nested
///   `SequentialLR` at its milestone: it has no closed form to restart from).
/// - Milestones must increase strictly (torch accepts equal ones, which skip a schedule).
/// - Past `t_max`, `Cosine` follows the closed form, as torch does: it rises again towards
///   `base`, with period `2 * t_max`. Size `t_max` to the run.
///
/// The JSON form is internally tagged by `kind`, with the field names above
/// (`{"kind": "cosine", "t_max": 1000, "eta_min": 1e-5}`; `T_max` is accepted too);
/// deserializing validates. [`Schedule::validate`] checks every field; [`Schedule::lr`] never
/// panics, but gives meaningless values (NaN where a formula divides by zero) for a schedule
/// that does not validate.
///
/// Schedules can reach 0 (`eta_min = 0`, `end_lr = 0`, a factor 0), which is a valid
/// learning rate everywhere (`Config::lr`, [`crate::Optimizer::set_lr`], traces, checkpoints).
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `base * factor` for the first `total_iters` steps, then `base`.
    Constant { factor: f64, total_iters: u64 },
    /// From `base * start_factor` at step 1 to `base * end_factor` at step `total_iters + 1`,
    /// linearly, then constant.
    Linear {
        start_factor: f64,
        end_factor: f64,
        total_iters: u64,
    },
    /// Half a cosine from `base` at step 1 to `eta_min` at step `t_max + 1`.
    Cosine { t_max: u64, eta_min: f64 },
    /// From `base` at step 1 to `end_lr` at step `total_iters + 1` along
    /// `(1 - e / total_iters)^power`, then `end_lr`.
    Polynomial {
        total_iters: u64,
        power: f64,
        end_lr: f64,
    },
    /// `base` times `gamma` once more every `step_size` steps.
    Step { step_size: u64, gamma: f64 },
    /// `schedules[i]` from epoch `milestones[i - 1]` on, restarted at its own epoch 0 there.
    /// `milestones` has one entry fewer than `schedules` and increases strictly.
    Sequential {
        schedules: Vec<Schedule>,
        milestones: Vec<u64>,
    },
}

impl Schedule {
    /// The learning rate `base` at every step (torch's `ConstantLR` with factor 1).
    pub fn constant() -> Self {
        Schedule::Constant {
            factor: 1.0,
            total_iters: 0,
        }
    }

    /// Linear warmup over `warmup_steps`, then half a cosine down to `floor` (an absolute
    /// learning rate, torch's `eta_min`) at step `total_steps`:
    ///
    /// ```text
    /// t <= W:      base * t / W
    /// W <= t:      floor + (base - floor) * (1 + cos(pi * (t - W) / (N - W))) / 2
    /// ```
    /// with `W = max(warmup_steps, 1)` and `N = total_steps`, so step 1 already trains (at
    /// `base / W`), step `W` is at `base` and step `N` at `floor`. Past `N` the cosine rises
    /// again, as torch's does.
    ///
    /// For `W >= 2` this is torch's
    /// `SequentialLR([LinearLR(start_factor=1/W, end_factor=1, total_iters=W-1),
    /// CosineAnnealingLR(T_max=N-W, eta_min=floor)], milestones=[W-1])` (for `W = 1` the
    /// `CosineAnnealingLR` alone), and with `floor = 0`
    /// it is HuggingFace's `get_cosine_schedule_with_warmup(W, N)` one step ahead: that gives
    /// step `t` its `lr_lambda(t - 1)`, so its first step has learning rate 0; this gives step
    /// `t` the value `lr_lambda(t)`.
    ///
    /// Refuses `total_steps <= max(warmup_steps, 1)` and a `floor` that is not a finite
    /// number >= 0 (the error names `total_steps` or `floor`).
    pub fn warmup_cosine(warmup_steps: u64, total_steps: u64, floor: f64) -> Result<Self> {
        let decay = decay_steps(warmup_steps, total_steps)?;
        non_negative("", "floor", floor)?;
        Ok(with_warmup(
            warmup_steps,
            Schedule::Cosine {
                t_max: decay,
                eta_min: floor,
            },
        ))
    }

    /// Linear warmup over `warmup_steps`, then polynomial decay to `end_lr` at step
    /// `total_steps`, held after it: BERT's schedule as HuggingFace writes it (`power = 1`,
    /// `end_lr = 0`), one step ahead of HuggingFace's
    /// `get_polynomial_decay_schedule_with_warmup` (see [`Schedule::warmup_cosine`] for the
    /// shift).
    ///
    /// ```text
    /// t <= W:      base * t / W
    /// W <= t <= N: end_lr + (base - end_lr) * (1 - (t - W) / (N - W))^power
    /// N <= t:      end_lr
    /// ```
    /// with `W = max(warmup_steps, 1)` and `N = total_steps`. For `W >= 2` and `end_lr = 0` this
    /// is torch's `SequentialLR([LinearLR(1/W, 1, W-1), PolynomialLR(N-W, power)], [W-1])`;
    /// for `W = 1` the `PolynomialLR` alone. Refuses `total_steps <= max(warmup_steps, 1)`, and a `power` or `end_lr`
    /// that is not a finite number >= 0.
    ///
    /// BERT's original TensorFlow code differs twice: its first step has learning rate 0
    /// (`base * g / W` at `global_step g = t - 1`), and its decay `base * (1 - g / N)` runs
    /// from step 1, so it has already fallen to `base * (1 - W / N)` when the warmup ends. That
    /// one is, exactly,
    /// `Sequential { schedules: [Linear { start_factor: 0, end_factor: 1, total_iters: W },
    /// Linear { start_factor: 1 - W / N, end_factor: 0, total_iters: N - W }], milestones: [W] }`.
    pub fn warmup_polynomial(
        warmup_steps: u64,
        total_steps: u64,
        power: f64,
        end_lr: f64,
    ) -> Result<Self> {
        let decay = decay_steps(warmup_steps, total_steps)?;
        non_negative("", "power", power)?;
        non_negative("", "end_lr", end_lr)?;
        Ok(with_warmup(
            warmup_steps,
            Schedule::Polynomial {
                total_iters: decay,
                power,
                end_lr,
            },
        ))
    }

    /// [`Schedule::warmup_polynomial`] with `power = 1`: HuggingFace's
    /// `get_linear_schedule_with_warmup` (`end_lr = 0`) one step ahead.
    pub fn warmup_linear_decay(warmup_steps: u64, total_steps: u64, end_lr: f64) -> Result<Self> {
        Self::warmup_polynomial(warmup_steps, total_steps, 1.0, end_lr)
    }

    /// The learning rate of step `t` (1-based; 0 counts as 1) for a group whose base learning
    /// rate is `base_lr`.
    pub fn lr(&self, base_lr: f64, t: u64) -> f64 {
        self.at_epoch(base_lr, t.saturating_sub(1))
    }

    /// Torch's `_get_closed_form_lr` at `last_epoch = e`.
    fn at_epoch(&self, base: f64, e: u64) -> f64 {
        match self {
            &Schedule::Constant {
                factor,
                total_iters,
            } => base * (factor + if e >= total_iters { 1.0 - factor } else { 0.0 }),
            &Schedule::Linear {
                start_factor,
                end_factor,
                total_iters,
            } => {
                base * (start_factor
                    + (end_factor - start_factor) * e.min(total_iters) as f64 / total_iters as f64)
            }
            &Schedule::Cosine { t_max, eta_min } => {
                eta_min
                    + (base - eta_min)
                        * (1.0 + (std::f64::consts::PI * e as f64 / t_max as f64).cos())
                        / 2.0
            }
            &Schedule::Polynomial {
                total_iters,
                power,
                end_lr,
            } => {
                let remaining = 1.0 - e.min(total_iters) as f64 / total_iters as f64;
                end_lr + (base - end_lr) * remaining.powf(power)
            }
            &Schedule::Step { step_size, gamma } => match e.checked_div(step_size) {
                Some(k) => base * gamma.powf(k as f64),
                None => f64::NAN,
            },
            Schedule::Sequential {
                schedules,
                milestones,
            } => {
                let i = milestones.partition_point(|&m| m <= e);
                let start = if i == 0 { 0 } else { milestones[i - 1] };
                match (schedules.get(i), e.checked_sub(start)) {
                    (Some(s), Some(local)) => s.at_epoch(base, local),
                    _ => f64::NAN, // milestones of the wrong count or order
                }
            }
        }
    }

    /// Checks every field; the error names the first bad one, with its path inside
    /// `Sequential` (`schedules[1].t_max`).
    pub fn validate(&self) -> Result<()> {
        self.validate_at("")
    }

    fn validate_at(&self, path: &str) -> Result<()> {
        match self {
            &Schedule::Constant { factor, .. } => non_negative(path, "factor", factor),
            &Schedule::Linear {
                start_factor,
                end_factor,
                total_iters,
            } => {
                non_negative(path, "start_factor", start_factor)?;
                non_negative(path, "end_factor", end_factor)?;
                positive(path, "total_iters", total_iters)
            }
            &Schedule::Cosine { t_max, eta_min } => {
                positive(path, "t_max", t_max)?;
                non_negative(path, "eta_min", eta_min)
            }
            &Schedule::Polynomial {
                total_iters,
                power,
                end_lr,
            } => {
                positive(path, "total_iters", total_iters)?;
                non_negative(path, "power", power)?;
                non_negative(path, "end_lr", end_lr)
            }
            &Schedule::Step { step_size, gamma } => {
                positive(path, "step_size", step_size)?;
                non_negative(path, "gamma", gamma)
            }
            Schedule::Sequential {
                schedules,
                milestones,
            } => {
                if schedules.is_empty() {
                    return Err(invalid(path, "schedules", "[]", "at least one schedule"));
                }
                if milestones.len() != schedules.len() - 1 {
                    return Err(invalid(
                        path,
                        "milestones",
                        format!("{milestones:?}"),
                        format!(
                            "{} milestones (one fewer than the {} schedules)",
                            schedules.len() - 1,
                            schedules.len()
                        ),
                    ));
                }
                if milestones.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(invalid(
                        path,
                        "milestones",
                        format!("{milestones:?}"),
                        "strictly increasing epochs",
                    ));
                }
                for (i, s) in schedules.iter().enumerate() {
                    s.validate_at(&format!("{path}schedules[{i}]."))?;
                }
                Ok(())
            }
        }
    }
}

impl Default for Schedule {
    /// [`Schedule::constant`].
    fn default() -> Self {
        Self::constant()
    }
}

/// The JSON form of [`Schedule`] (serde's "remote" mirror, so that deserializing can validate
/// without a public non-validating `Schedule::deserialize`).
#[derive(Serialize, Deserialize)]
#[serde(
    remote = "Schedule",
    tag = "kind",
    rename_all = "snake_case",
    deny_unknown_fields
)]
enum ScheduleJson {
    Constant {
        factor: f64,
        total_iters: u64,
    },
    Linear {
        start_factor: f64,
        end_factor: f64,
        total_iters: u64,
    },
    Cosine {
        #[serde(alias = "T_max")]
        t_max: u64,
        #[serde(default)]
        eta_min: f64,
    },
    Polynomial {
        total_iters: u64,
        power: f64,
        #[serde(default)]
        end_lr: f64,
    },
    Step {
        step_size: u64,
        gamma: f64,
    },
    Sequential {
        schedules: Vec<Schedule>,
        milestones: Vec<u64>,
    },
}

impl Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ScheduleJson::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let schedule = ScheduleJson::deserialize(deserializer)?;
        schedule.validate().map_err(serde::de::Error::custom)?;
        Ok(schedule)
    }
}

/// `N - max(W, 1)`, the length of the decay after a warmup, which must be at least 1.
fn decay_steps(warmup_steps: u64, total_steps: u64) -> Result<u64> {
    let peak = warmup_steps.max(1);
    match total_steps.checked_sub(peak) {
        Some(decay) if decay > 0 => Ok(decay),
        _ => Err(invalid(
            "",
            "total_steps",
            total_steps,
            format!("more than max(warmup_steps, 1) = {peak}"),
        )),
    }
}

/// `then` alone for `warmup_steps <= 1`; otherwise `base * t / W` for `t <= W`, then `then`
/// restarted at step `W`.
fn with_warmup(warmup_steps: u64, then: Schedule) -> Schedule {
    if warmup_steps <= 1 {
        then
    } else {
        Schedule::Sequential {
            schedules: vec![
                Schedule::Linear {
                    start_factor: 1.0 / warmup_steps as f64,
                    end_factor: 1.0,
                    total_iters: warmup_steps - 1,
                },
                then,
            ],
            milestones: vec![warmup_steps - 1],
        }
    }
}

fn invalid(path: &str, field: &str, value: impl ToString, expected: impl Into<String>) -> Error {
    Error::InvalidSchedule {
        field: format!("{path}{field}"),
        value: value.to_string(),
        expected: expected.into(),
    }
}

fn non_negative(path: &str, field: &str, x: f64) -> Result<()> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(invalid(path, field, x, "a finite number >= 0"))
    }
}

fn positive(path: &str, field: &str, n: u64) -> Result<()> {
    if n > 0 {
        Ok(())
    } else {
        Err(invalid(path, field, n, "an integer >= 1"))
    }
}
