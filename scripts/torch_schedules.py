#!/usr/bin/env python3
"""Print PyTorch's learning rates for a few lr_scheduler configurations as Rust constants.

The output is the golden data of the `torch_golden_values` test in `src/schedule.rs`: paste it,
indented by 4 spaces, over the `// BEGIN torch_schedules.py` ... `// END torch_schedules.py`
block there (the first line records the torch version that produced it). This script is
NOT run in CI; neither Python nor PyTorch is needed to build or test the crate.

How to run (from the repository root; keep the virtual environment outside the repository):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch
    /tmp/torchenv/bin/python scripts/torch_schedules.py

The loop is torch's documented one: `optimizer.step()` then `scheduler.step()`. The value
recorded for optimizer step t = 1, 2, ... is `scheduler.get_last_lr()` before that step, i.e.
after t - 1 calls of `scheduler.step()` (`last_epoch = t - 1`), which is `Schedule::lr(base, t)`.
These are the values of torch's recursive `get_lr` (what a training loop gets), not of the
closed forms, so they can differ from them by rounding.

Every configuration has two parameter groups with different base learning rates, so the
constants hold two rows: one per group.
"""

import math

import torch
from torch.optim import lr_scheduler as S

BASE_LRS = [0.1, 2e-3]

# name, number of steps, builder(optimizer) -> scheduler (the matching Schedule is in the test)
CASES = [
    ("CONSTANT", 10, lambda o: S.ConstantLR(o, factor=0.25, total_iters=4)),
    ("LINEAR_WARMUP", 12, lambda o: S.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=7)),
    ("LINEAR_DECAY", 12, lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.05, total_iters=9)),
    ("COSINE", 25, lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=1e-4)),
    ("POLYNOMIAL", 12, lambda o: S.PolynomialLR(o, total_iters=8, power=2.0)),
    ("STEP", 12, lambda o: S.StepLR(o, step_size=3, gamma=0.5)),
    # Schedule::warmup_cosine(5, 20, 1e-5): LinearLR(1/W, 1, W - 1) then cosine, milestone W - 1.
    ("WARMUP_COSINE", 24, lambda o: S.SequentialLR(
        o,
        [S.LinearLR(o, start_factor=1 / 5, end_factor=1.0, total_iters=4),
         S.CosineAnnealingLR(o, T_max=15, eta_min=1e-5)],
        milestones=[4])),
    # Schedule::warmup_linear_decay(4, 16, 0.0): LinearLR(1/W, 1, W - 1) then PolynomialLR(power 1).
    ("WARMUP_LINEAR_DECAY", 20, lambda o: S.SequentialLR(
        o,
        [S.LinearLR(o, start_factor=1 / 4, end_factor=1.0, total_iters=3),
         S.PolynomialLR(o, total_iters=12, power=1.0)],
        milestones=[3])),
    # Three phases; the first is cut before its own total_iters.
    ("SEQUENTIAL3", 16, lambda o: S.SequentialLR(
        o,
        [S.ConstantLR(o, factor=0.1, total_iters=4),
         S.StepLR(o, step_size=2, gamma=0.5),
         S.PolynomialLR(o, total_iters=6, power=1.5)],
        milestones=[3, 8])),
]


def run(steps, build):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in BASE_LRS]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, BASE_LRS)]
    opt = torch.optim.SGD(groups, lr=BASE_LRS[0])
    sched = build(opt)
    rows = [[] for _ in BASE_LRS]
    for _ in range(steps):
        for row, lr in zip(rows, sched.get_last_lr()):
            row.append(float(lr))
        opt.step()
        sched.step()
    return rows


def rust(x):
    r = repr(x)
    assert math.isfinite(x)
    return r if ("." in r or "e" in r) else r + ".0"


def main():
    print(f"// BEGIN torch_schedules.py (torch {torch.__version__}); base lrs {BASE_LRS}")
    for name, steps, build in CASES:
        rows = run(steps, build)
        print("#[rustfmt::skip]")
        print(f"const TORCH_{name}: [[f64; {steps}]; {len(rows)}] = [")
        for row in rows:
            print("    [" + ", ".join(rust(x) for x in row) + "],")
        print("];")
    print("// END torch_schedules.py")


if __name__ == "__main__":
    main()
