//! Learning-rate schedules against their closed forms, HuggingFace's multipliers and golden
//! values recorded from PyTorch (`scripts/torch_schedules.py`), kept out of `src/schedule.rs`.

use std::f64::consts::PI;

use approx::relative_eq;

use wgpu_optim::Schedule;
use wgpu_optim::{Error, Result};

const BASES: [f64; 3] = [1.0, 0.1, 3e-4];

/// Compares `s.lr(base, t)` with `want(t)` for every `t` and reports every mismatch.
///
/// Tolerance: relative 1e-12, or 1e-15 * base absolute. The absolute part is for values
/// near a floor of 0, where torch's `1 + cos(x)` and `1 - e / T` cancel and keep only an
/// ulp of `base` of accuracy; one epoch off moves the value by far more than that.
fn expect(
    case: &str,
    s: &Schedule,
    base: f64,
    ts: impl IntoIterator<Item = u64>,
    want: impl Fn(u64) -> f64,
) {
    let bad: Vec<String> = ts
        .into_iter()
        .filter_map(|t| {
            let (got, want) = (s.lr(base, t), want(t));
            let ok = relative_eq!(got, want, epsilon = 1e-15 * base, max_relative = 1e-12);
            (!ok).then(|| format!("  t = {t}: got {got:e}, want {want:e}"))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{case} (base {base}): {} mismatches\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn field_of(err: Error) -> String {
    match err {
        Error::InvalidSchedule { field, .. } => field,
        other => panic!("expected InvalidSchedule, got {other:?}"),
    }
}

// --- Each schedule against its closed form, written independently, in t. ---

#[test]
fn constant_closed_form() {
    for (factor, total_iters) in [(0.25, 4), (1.0 / 3.0, 5), (0.0, 1), (2.0, 3), (0.5, 0)] {
        let s = Schedule::Constant {
            factor,
            total_iters,
        };
        for base in BASES {
            // Steps 1..=total_iters run at base * factor, then base.
            expect(&format!("{s:?}"), &s, base, 1..=20, |t| {
                if t <= total_iters {
                    base * factor
                } else {
                    base
                }
            });
        }
    }
}

#[test]
fn constant_plain_is_base_exactly() {
    for base in BASES {
        for t in 0..100 {
            assert_eq!(Schedule::constant().lr(base, t), base);
            assert_eq!(Schedule::default().lr(base, t), base);
        }
    }
}

#[test]
fn linear_closed_form_warmup_and_decay() {
    for (start, end, total) in [
        (0.1, 1.0, 7),       // warmup
        (1.0, 0.05, 9),      // decay
        (0.0, 1.0, 1),       // from zero in one epoch
        (0.5, 0.5, 3),       // flat
        (1.0 / 3.0, 1.0, 5), // torch's defaults
    ] {
        let s = Schedule::Linear {
            start_factor: start,
            end_factor: end,
            total_iters: total,
        };
        for base in BASES {
            // Interpolation between the two ends, reached at step total + 1.
            expect(&format!("{s:?}"), &s, base, 1..=total + 10, |t| {
                let (e, n) = ((t - 1) as f64, total as f64);
                if t > total {
                    base * end
                } else {
                    base * (start * (n - e) + end * e) / n
                }
            });
        }
    }
}

#[test]
fn linear_edges() {
    let s = Schedule::Linear {
        start_factor: 0.1,
        end_factor: 1.0,
        total_iters: 4,
    };
    assert_eq!(s.lr(0.5, 1), 0.5 * 0.1);
    assert_eq!(s.lr(0.5, 5), 0.5);
    assert_eq!(s.lr(0.5, 1_000_000), 0.5);
    assert!(s.lr(0.5, 4) < 0.5);
}

#[test]
fn cosine_closed_form() {
    for (t_max, eta_min) in [(1, 0.0), (10, 1e-4), (7, 0.0), (1000, 1e-6)] {
        let s = Schedule::Cosine { t_max, eta_min };
        for base in BASES {
            // (1 + cos x) / 2 = cos^2(x / 2); continues past t_max with period 2 t_max.
            expect(&format!("{s:?}"), &s, base, 1..=3 * t_max + 2, |t| {
                let half = (PI * (t - 1) as f64 / (2 * t_max) as f64).cos();
                eta_min + (base - eta_min) * half * half
            });
        }
    }
}

#[test]
fn cosine_edges() {
    let s = Schedule::Cosine {
        t_max: 10,
        eta_min: 1e-4,
    };
    assert_eq!(s.lr(0.1, 1), 0.1);
    assert_eq!(s.lr(0.1, 11), 1e-4);
    assert!(relative_eq!(s.lr(0.1, 21), 0.1, max_relative = 1e-12));
    // Symmetric around the floor, as torch's closed form is.
    assert!(relative_eq!(
        s.lr(0.1, 8),
        s.lr(0.1, 14),
        max_relative = 1e-12
    ));
}

#[test]
fn polynomial_closed_form() {
    for (total, power, end_lr) in [
        (8, 2.0, 0.0),
        (12, 1.0, 0.0),
        (5, 0.5, 1e-5),
        (10, 3.0, 0.01),
    ] {
        let s = Schedule::Polynomial {
            total_iters: total,
            power,
            end_lr,
        };
        for base in BASES {
            expect(&format!("{s:?}"), &s, base, 1..=total + 10, |t| {
                let e = t - 1;
                if e >= total {
                    end_lr
                } else {
                    end_lr + (base - end_lr) * ((total - e) as f64 / total as f64).powf(power)
                }
            });
        }
    }
}

#[test]
fn polynomial_with_end_lr_zero_is_torch_bit_for_bit() {
    let (total, power) = (9, 0.9);
    let s = Schedule::Polynomial {
        total_iters: total,
        power,
        end_lr: 0.0,
    };
    for base in BASES {
        for e in 0..20u64 {
            let torch = base * (1.0 - e.min(total) as f64 / total as f64).powf(power);
            assert_eq!(s.lr(base, e + 1), torch, "e = {e}");
        }
    }
}

#[test]
fn step_closed_form() {
    for (step_size, gamma) in [(3, 0.5), (1, 0.9), (30, 0.1), (4, 1.5)] {
        let s = Schedule::Step { step_size, gamma };
        for base in BASES {
            // Torch's recursive form: multiply by gamma at every multiple of step_size.
            expect(&format!("{s:?}"), &s, base, 1..=100, |t| {
                let mut lr = base;
                for e in 1..t {
                    if e % step_size == 0 {
                        lr *= gamma;
                    }
                }
                lr
            });
        }
    }
}

#[test]
fn t_zero_is_t_one() {
    let s = Schedule::warmup_cosine(5, 20, 1e-5).unwrap();
    assert_eq!(s.lr(0.1, 0), s.lr(0.1, 1));
}

// --- Composition. ---

#[test]
fn sequential_restarts_each_schedule_at_its_milestone() {
    let phases = [
        Schedule::Constant {
            factor: 0.1,
            total_iters: 4,
        },
        Schedule::Step {
            step_size: 2,
            gamma: 0.5,
        },
        Schedule::Polynomial {
            total_iters: 6,
            power: 1.5,
            end_lr: 0.0,
        },
    ];
    let s = Schedule::Sequential {
        schedules: phases.to_vec(),
        milestones: vec![3, 8],
    };
    s.validate().unwrap();
    for base in BASES {
        // Epochs 0..=2 (steps 1..=3), 3..=7 (steps 4..=8), 8.. (steps 9..).
        expect("three phases", &s, base, 1..=30, |t| match t {
            1..=3 => phases[0].lr(base, t),
            4..=8 => phases[1].lr(base, t - 3),
            _ => phases[2].lr(base, t - 8),
        });
        // At a milestone the next schedule starts from base, not where the last one was.
        assert_eq!(s.lr(base, 3), base * 0.1);
        assert_eq!(s.lr(base, 4), base);
        assert_eq!(s.lr(base, 8), base * 0.25);
        assert_eq!(s.lr(base, 9), base);
    }
}

#[test]
fn sequential_of_one_and_milestone_zero() {
    let cosine = Schedule::Cosine {
        t_max: 12,
        eta_min: 1e-3,
    };
    let alone = Schedule::Sequential {
        schedules: vec![cosine.clone()],
        milestones: vec![],
    };
    // Milestone 0: the first schedule never runs (torch's bisect_right(milestones, 0) = 1).
    let skipped = Schedule::Sequential {
        schedules: vec![Schedule::constant(), cosine.clone()],
        milestones: vec![0],
    };
    for base in BASES {
        for t in 0..40 {
            assert_eq!(alone.lr(base, t), cosine.lr(base, t));
            assert_eq!(skipped.lr(base, t), cosine.lr(base, t));
        }
    }
}

#[test]
fn sequential_nested() {
    let inner = Schedule::Sequential {
        schedules: vec![
            Schedule::Linear {
                start_factor: 0.5,
                end_factor: 1.0,
                total_iters: 2,
            },
            Schedule::Step {
                step_size: 1,
                gamma: 0.9,
            },
        ],
        milestones: vec![2],
    };
    let cosine = Schedule::Cosine {
        t_max: 4,
        eta_min: 0.0,
    };
    let s = Schedule::Sequential {
        schedules: vec![inner.clone(), cosine.clone()],
        milestones: vec![5],
    };
    s.validate().unwrap();
    expect("nested", &s, 0.1, 1..=15, |t| {
        if t <= 5 {
            inner.lr(0.1, t)
        } else {
            cosine.lr(0.1, t - 5)
        }
    });
}

// --- The convenience constructors. ---

#[test]
fn warmup_cosine_closed_form() {
    for (warmup, total, floor) in [
        (5, 20, 1e-5),
        (0, 10, 0.0),
        (1, 10, 0.0),
        (2, 3, 0.0),
        (100, 1000, 1e-6),
    ] {
        let s = Schedule::warmup_cosine(warmup, total, floor).unwrap();
        let w = warmup.max(1);
        for base in BASES {
            expect(
                &format!("warmup_cosine({warmup}, {total}, {floor})"),
                &s,
                base,
                1..=total + 5,
                |t| {
                    if t <= w {
                        base * t as f64 / w as f64
                    } else {
                        let x = PI * (t - w) as f64 / (total - w) as f64;
                        floor + (base - floor) * (1.0 + x.cos()) / 2.0
                    }
                },
            );
            assert!(relative_eq!(s.lr(base, w), base, max_relative = 1e-12));
            assert!(relative_eq!(
                s.lr(base, total),
                floor,
                epsilon = 1e-15 * base
            ));
        }
    }
}

/// HuggingFace's `get_cosine_schedule_with_warmup` multiplier (`num_cycles = 0.5`).
fn hf_cosine(e: u64, warmup: u64, total: u64) -> f64 {
    if e < warmup {
        return e as f64 / warmup.max(1) as f64;
    }
    let progress = (e - warmup) as f64 / (total - warmup).max(1) as f64;
    (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
}

/// HuggingFace's `get_polynomial_decay_schedule_with_warmup` multiplier
/// (`get_linear_schedule_with_warmup` is `power = 1`, `lr_end = 0`).
fn hf_polynomial(e: u64, warmup: u64, total: u64, base: f64, end: f64, power: f64) -> f64 {
    if e < warmup {
        e as f64 / warmup.max(1) as f64
    } else if e > total {
        end / base
    } else {
        let remaining = 1.0 - (e - warmup) as f64 / (total - warmup) as f64;
        ((base - end) * remaining.powf(power) + end) / base
    }
}

#[test]
fn warmup_schedules_are_huggingface_one_step_ahead() {
    for (warmup, total) in [(1, 10), (4, 16), (10, 100)] {
        for base in BASES {
            let s = Schedule::warmup_cosine(warmup, total, 0.0).unwrap();
            expect("cosine vs hf", &s, base, 1..=2 * total, |t| {
                base * hf_cosine(t, warmup, total)
            });
            let s = Schedule::warmup_linear_decay(warmup, total, 0.0).unwrap();
            expect("linear vs hf", &s, base, 1..=total + 10, |t| {
                base * hf_polynomial(t, warmup, total, base, 0.0, 1.0)
            });
            let end = base / 50.0;
            let s = Schedule::warmup_polynomial(warmup, total, 2.0, end).unwrap();
            expect("polynomial vs hf", &s, base, 1..=total + 10, |t| {
                base * hf_polynomial(t, warmup, total, base, end, 2.0)
            });
        }
    }
}

#[test]
fn bert_original_composes_exactly() {
    // BERT's optimization.py at global_step g = t - 1: warmup g / W, else 1 - min(g, N) / N.
    let (w, n) = (10u64, 100u64);
    let s = Schedule::Sequential {
        schedules: vec![
            Schedule::Linear {
                start_factor: 0.0,
                end_factor: 1.0,
                total_iters: w,
            },
            Schedule::Linear {
                start_factor: 1.0 - w as f64 / n as f64,
                end_factor: 0.0,
                total_iters: n - w,
            },
        ],
        milestones: vec![w],
    };
    s.validate().unwrap();
    for base in BASES {
        expect("bert original", &s, base, 1..=n + 10, |t| {
            let g = t - 1;
            if g < w {
                base * g as f64 / w as f64
            } else {
                base * (1.0 - g.min(n) as f64 / n as f64)
            }
        });
    }
}

#[test]
fn constructors_refuse_bad_arguments() {
    let err = |r: Result<Schedule>| field_of(r.unwrap_err());
    assert_eq!(err(Schedule::warmup_cosine(10, 10, 0.0)), "total_steps");
    assert_eq!(err(Schedule::warmup_cosine(0, 1, 0.0)), "total_steps");
    assert_eq!(err(Schedule::warmup_cosine(5, 20, -1e-5)), "floor");
    assert_eq!(err(Schedule::warmup_cosine(5, 20, f64::NAN)), "floor");
    assert_eq!(
        err(Schedule::warmup_linear_decay(20, 5, 0.0)),
        "total_steps"
    );
    assert_eq!(
        err(Schedule::warmup_linear_decay(5, 20, f64::INFINITY)),
        "end_lr"
    );
    assert_eq!(err(Schedule::warmup_polynomial(5, 20, -2.0, 0.0)), "power");
    for s in [
        Schedule::warmup_cosine(0, 2, 0.0),
        Schedule::warmup_cosine(1, 2, 0.0),
        Schedule::warmup_cosine(2, 3, 0.0),
        Schedule::warmup_polynomial(7, 8, 0.0, 0.0),
    ] {
        s.unwrap().validate().unwrap();
    }
}

// --- Validation and robustness. ---

#[test]
fn validate_names_the_field() {
    use Schedule::*;
    let cosine = |t_max| Cosine {
        t_max,
        eta_min: 0.0,
    };
    let cases = [
        (
            Constant {
                factor: f64::NAN,
                total_iters: 3,
            },
            "factor",
        ),
        (
            Constant {
                factor: -0.5,
                total_iters: 3,
            },
            "factor",
        ),
        (
            Linear {
                start_factor: f64::INFINITY,
                end_factor: 1.0,
                total_iters: 3,
            },
            "start_factor",
        ),
        (
            Linear {
                start_factor: 0.1,
                end_factor: -0.1,
                total_iters: 3,
            },
            "end_factor",
        ),
        (
            Linear {
                start_factor: 0.1,
                end_factor: 1.0,
                total_iters: 0,
            },
            "total_iters",
        ),
        (cosine(0), "t_max"),
        (
            Cosine {
                t_max: 5,
                eta_min: f64::NAN,
            },
            "eta_min",
        ),
        (
            Cosine {
                t_max: 5,
                eta_min: -1e-5,
            },
            "eta_min",
        ),
        (
            Polynomial {
                total_iters: 0,
                power: 1.0,
                end_lr: 0.0,
            },
            "total_iters",
        ),
        (
            Polynomial {
                total_iters: 5,
                power: -1.0,
                end_lr: 0.0,
            },
            "power",
        ),
        (
            Polynomial {
                total_iters: 5,
                power: 1.0,
                end_lr: f64::NEG_INFINITY,
            },
            "end_lr",
        ),
        (
            Step {
                step_size: 0,
                gamma: 0.5,
            },
            "step_size",
        ),
        (
            Step {
                step_size: 2,
                gamma: -0.5,
            },
            "gamma",
        ),
        (
            Sequential {
                schedules: vec![],
                milestones: vec![],
            },
            "schedules",
        ),
        (
            Sequential {
                schedules: vec![cosine(5), cosine(5)],
                milestones: vec![],
            },
            "milestones",
        ),
        (
            Sequential {
                schedules: vec![cosine(5)],
                milestones: vec![3],
            },
            "milestones",
        ),
        (
            Sequential {
                schedules: vec![cosine(5), cosine(5), cosine(5)],
                milestones: vec![4, 4],
            },
            "milestones",
        ),
        (
            Sequential {
                schedules: vec![cosine(5), cosine(5), cosine(5)],
                milestones: vec![6, 4],
            },
            "milestones",
        ),
        (
            Sequential {
                schedules: vec![cosine(5), cosine(0)],
                milestones: vec![4],
            },
            "schedules[1].t_max",
        ),
        (
            Sequential {
                schedules: vec![
                    cosine(5),
                    Sequential {
                        schedules: vec![
                            cosine(2),
                            Step {
                                step_size: 0,
                                gamma: 0.5,
                            },
                        ],
                        milestones: vec![1],
                    },
                ],
                milestones: vec![4],
            },
            "schedules[1].schedules[1].step_size",
        ),
    ];
    let mut bad = Vec::new();
    for (s, want) in cases {
        match s.validate() {
            Err(Error::InvalidSchedule { field, .. }) if field == want => {}
            other => bad.push(format!("  {s:?}: got {other:?}, want field {want}")),
        }
        // And lr gives a number or NaN for it, without panicking.
        for t in 0..30 {
            let _ = s.lr(0.1, t);
        }
    }
    assert!(bad.is_empty(), "{} cases\n{}", bad.len(), bad.join("\n"));

    let err = Sequential {
        schedules: vec![cosine(5), cosine(5)],
        milestones: vec![],
    }
    .validate()
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "schedule field `milestones`: got [], expected 1 milestones (one fewer than the 2 schedules)"
    );
}

#[test]
fn invalid_schedules_give_nan_not_panics() {
    let s = Schedule::Step {
        step_size: 0,
        gamma: 0.5,
    };
    assert!(s.lr(0.1, 5).is_nan());
    let s = Schedule::Sequential {
        schedules: vec![],
        milestones: vec![],
    };
    assert!(s.lr(0.1, 5).is_nan());
    let s = Schedule::Sequential {
        schedules: vec![
            Schedule::constant(),
            Schedule::constant(),
            Schedule::constant(),
        ],
        milestones: vec![9, 2],
    };
    for t in 0..20 {
        let _ = s.lr(0.1, t);
    }
}

#[test]
fn json_form() {
    let s: Schedule = serde_json::from_str(
        r#"{"kind": "sequential", "milestones": [4], "schedules": [
            {"kind": "linear", "start_factor": 0.2, "end_factor": 1.0, "total_iters": 4},
            {"kind": "cosine", "T_max": 15}]}"#,
    )
    .unwrap();
    assert_eq!(
        s,
        Schedule::Sequential {
            schedules: vec![
                Schedule::Linear {
                    start_factor: 0.2,
                    end_factor: 1.0,
                    total_iters: 4
                },
                Schedule::Cosine {
                    t_max: 15,
                    eta_min: 0.0
                },
            ],
            milestones: vec![4],
        }
    );
    let all = [
        Schedule::constant(),
        Schedule::Step {
            step_size: 3,
            gamma: 0.5,
        },
        Schedule::warmup_cosine(5, 20, 1e-5).unwrap(),
        Schedule::warmup_polynomial(3, 30, 2.0, 1e-6).unwrap(),
    ];
    for s in all {
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            serde_json::from_str::<Schedule>(&text).unwrap(),
            s,
            "{text}"
        );
    }
    assert_eq!(
        serde_json::to_string(&Schedule::Cosine {
            t_max: 10,
            eta_min: 0.0
        })
        .unwrap(),
        r#"{"kind":"cosine","t_max":10,"eta_min":0.0}"#
    );
    // Deserializing validates, and unknown fields and kinds are refused.
    for (text, needle) in [
        (r#"{"kind": "cosine", "t_max": 0}"#, "t_max"),
        (
            r#"{"kind": "sequential", "schedules": [{"kind": "step", "step_size": 0, "gamma": 0.1}], "milestones": []}"#,
            "step_size",
        ),
        (
            r#"{"kind": "sequential", "schedules": [], "milestones": []}"#,
            "schedules",
        ),
        (
            r#"{"kind": "step", "step_size": 2, "gamma": 0.5, "gama": 1}"#,
            "gama",
        ),
        (r#"{"kind": "exponential", "gamma": 0.5}"#, "exponential"),
    ] {
        let err = serde_json::from_str::<Schedule>(text)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}

// --- Golden values from PyTorch (recursive `scheduler.step()`), two groups each. ---

const TORCH_BASES: [f64; 2] = [0.1, 2e-3];

fn golden<const N: usize>(case: &str, s: &Schedule, rows: &[[f64; N]; 2]) {
    s.validate().unwrap();
    for (base, row) in TORCH_BASES.into_iter().zip(rows) {
        expect(case, s, base, 1..=N as u64, |t| row[t as usize - 1]);
    }
}

#[test]
fn torch_golden_values() {
    use Schedule::*;
    golden(
        "constant",
        &Constant {
            factor: 0.25,
            total_iters: 4,
        },
        &TORCH_CONSTANT,
    );
    golden(
        "linear warmup",
        &Linear {
            start_factor: 0.1,
            end_factor: 1.0,
            total_iters: 7,
        },
        &TORCH_LINEAR_WARMUP,
    );
    golden(
        "linear decay",
        &Linear {
            start_factor: 1.0,
            end_factor: 0.05,
            total_iters: 9,
        },
        &TORCH_LINEAR_DECAY,
    );
    golden(
        "cosine",
        &Cosine {
            t_max: 10,
            eta_min: 1e-4,
        },
        &TORCH_COSINE,
    );
    golden(
        "polynomial",
        &Polynomial {
            total_iters: 8,
            power: 2.0,
            end_lr: 0.0,
        },
        &TORCH_POLYNOMIAL,
    );
    golden(
        "step",
        &Step {
            step_size: 3,
            gamma: 0.5,
        },
        &TORCH_STEP,
    );
    golden(
        "warmup_cosine",
        &Schedule::warmup_cosine(5, 20, 1e-5).unwrap(),
        &TORCH_WARMUP_COSINE,
    );
    golden(
        "warmup_linear_decay",
        &Schedule::warmup_linear_decay(4, 16, 0.0).unwrap(),
        &TORCH_WARMUP_LINEAR_DECAY,
    );
    golden(
        "sequential of three",
        &Sequential {
            schedules: vec![
                Constant {
                    factor: 0.1,
                    total_iters: 4,
                },
                Step {
                    step_size: 2,
                    gamma: 0.5,
                },
                Polynomial {
                    total_iters: 6,
                    power: 1.5,
                    end_lr: 0.0,
                },
            ],
            milestones: vec![3, 8],
        },
        &TORCH_SEQUENTIAL3,
    );
}

// Generated by scripts/torch_schedules.py; rerun it and paste its output over this block.
// BEGIN torch_schedules.py (torch 2.15.0+cu132); base lrs [0.1, 0.002]
#[rustfmt::skip]
const TORCH_CONSTANT: [[f64; 10]; 2] = [
    [0.025, 0.025, 0.025, 0.025, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    [0.0005, 0.0005, 0.0005, 0.0005, 0.002, 0.002, 0.002, 0.002, 0.002, 0.002],
];
#[rustfmt::skip]
const TORCH_LINEAR_WARMUP: [[f64; 12]; 2] = [
    [0.010000000000000002, 0.02285714285714286, 0.03571428571428572, 0.04857142857142857, 0.06142857142857142, 0.07428571428571427, 0.08714285714285713, 0.09999999999999998, 0.09999999999999998, 0.09999999999999998, 0.09999999999999998, 0.09999999999999998],
    [0.0002, 0.00045714285714285713, 0.0007142857142857143, 0.0009714285714285713, 0.0012285714285714285, 0.0014857142857142855, 0.0017428571428571428, 0.0019999999999999996, 0.0019999999999999996, 0.0019999999999999996, 0.0019999999999999996, 0.0019999999999999996],
];
#[rustfmt::skip]
const TORCH_LINEAR_DECAY: [[f64; 12]; 2] = [
    [0.1, 0.08944444444444445, 0.0788888888888889, 0.06833333333333334, 0.05777777777777779, 0.04722222222222223, 0.036666666666666674, 0.026111111111111116, 0.015555555555555564, 0.005000000000000005, 0.005000000000000005, 0.005000000000000005],
    [0.002, 0.001788888888888889, 0.0015777777777777778, 0.0013666666666666666, 0.0011555555555555555, 0.0009444444444444444, 0.0007333333333333333, 0.0005222222222222222, 0.0003111111111111112, 0.00010000000000000009, 0.00010000000000000009, 0.00010000000000000009],
];
#[rustfmt::skip]
const TORCH_COSINE: [[f64; 25]; 2] = [
    [0.1, 0.09755527298894293, 0.09046039886902862, 0.07940987335200904, 0.06548539886902863, 0.050050000000000004, 0.03461460113097138, 0.020690126647990973, 0.00963960113097138, 0.002544727011057081, 0.0001, 0.002544727011057081, 0.009639601130971414, 0.020690126647991056, 0.034614601130971534, 0.050050000000000226, 0.06548539886902892, 0.07940987335200939, 0.09046039886902904, 0.09755527298894337, 0.10000000000000045, 0.09755527298894337, 0.09046039886902907, 0.0794098733520094, 0.06548539886902893],
    [0.002, 0.001953503690480396, 0.0018185661446562002, 0.0016083959896778497, 0.0013435661446562002, 0.0010500000000000002, 0.0007564338553438002, 0.0004916040103221507, 0.00028143385534380006, 0.00014649630951960415, 0.0001, 0.00014649630951960415, 0.00028143385534380066, 0.0004916040103221523, 0.0007564338553438031, 0.0010500000000000045, 0.0013435661446562059, 0.0016083959896778565, 0.0018185661446562084, 0.0019535036904804047, 0.0020000000000000087, 0.0019535036904804043, 0.0018185661446562084, 0.0016083959896778565, 0.0013435661446562059],
];
#[rustfmt::skip]
const TORCH_POLYNOMIAL: [[f64; 12]; 2] = [
    [0.1, 0.0765625, 0.05625, 0.03906250000000001, 0.02500000000000001, 0.014062500000000006, 0.006250000000000002, 0.0015625000000000005, 0.0, 0.0, 0.0, 0.0],
    [0.002, 0.00153125, 0.001125, 0.00078125, 0.0005000000000000001, 0.0002812500000000001, 0.00012500000000000003, 3.125000000000001e-05, 0.0, 0.0, 0.0, 0.0],
];
#[rustfmt::skip]
const TORCH_STEP: [[f64; 12]; 2] = [
    [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125, 0.0125, 0.0125],
    [0.002, 0.002, 0.002, 0.001, 0.001, 0.001, 0.0005, 0.0005, 0.0005, 0.00025, 0.00025, 0.00025],
];
#[rustfmt::skip]
const TORCH_WARMUP_COSINE: [[f64; 24]; 2] = [
    [0.020000000000000004, 0.04000000000000001, 0.06000000000000001, 0.08000000000000002, 0.1, 0.09890748929868662, 0.09567770515484182, 0.0904518046337755, 0.08345818466491112, 0.0750025, 0.0654543046337755, 0.05523090052106634, 0.04477909947893368, 0.03455569536622451, 0.025007500000000012, 0.0165518153350889, 0.009558195366224506, 0.0043322948451581635, 0.0011025107013133847, 1e-05, 0.0011025107013133847, 0.0043322948451581696, 0.009558195366224495, 0.01655181533508887],
    [0.0004, 0.0008, 0.0012000000000000001, 0.0016, 0.002, 0.0019782568627301367, 0.001913977730354388, 0.0018099719094030729, 0.001670784953327064, 0.0015025000000000001, 0.001312471909403073, 0.0011090058209513155, 0.0009009941790486852, 0.0006975280905969276, 0.0005075000000000004, 0.0003392150466729365, 0.0002000280905969274, 9.602226964561204e-05, 3.174313726986335e-05, 1e-05, 3.174313726986334e-05, 9.602226964561215e-05, 0.0002000280905969272, 0.0003392150466729359],
];
#[rustfmt::skip]
const TORCH_WARMUP_LINEAR_DECAY: [[f64; 20]; 2] = [
    [0.025, 0.05, 0.07500000000000001, 0.1, 0.09166666666666667, 0.08333333333333334, 0.075, 0.06666666666666667, 0.05833333333333332, 0.049999999999999996, 0.04166666666666666, 0.03333333333333333, 0.024999999999999994, 0.01666666666666666, 0.008333333333333335, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0005, 0.001, 0.0015, 0.002, 0.0018333333333333333, 0.0016666666666666668, 0.0015, 0.0013333333333333335, 0.0011666666666666665, 0.001, 0.0008333333333333333, 0.0006666666666666668, 0.0005, 0.00033333333333333327, 0.00016666666666666674, 0.0, 0.0, 0.0, 0.0, 0.0],
];
#[rustfmt::skip]
const TORCH_SEQUENTIAL3: [[f64; 16]; 2] = [
    [0.010000000000000002, 0.010000000000000002, 0.010000000000000002, 0.1, 0.1, 0.05, 0.05, 0.025, 0.1, 0.07607257743127309, 0.05443310539518176, 0.03535533905932738, 0.019245008972987532, 0.006804138174397715, 0.0, 0.0],
    [0.0002, 0.0002, 0.0002, 0.002, 0.002, 0.001, 0.001, 0.0005, 0.002, 0.0015214515486254617, 0.001088662107903635, 0.0007071067811865476, 0.00038490017945975064, 0.0001360827634879543, 0.0, 0.0],
];
// END torch_schedules.py
