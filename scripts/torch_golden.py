#!/usr/bin/env python3
"""Record short PyTorch Adam/AdamW trajectories as golden test data for wgpu-optim.

This script is NOT run in CI. Its output (tests/data/torch/*.safetensors) is committed, and the
Rust tests only read those files, so neither Python nor PyTorch is needed to build or test the
crate. Rerun it only to regenerate or extend the data.

How to run (from the repository root; keep the virtual environment outside the repository):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch safetensors numpy
    /tmp/torchenv/bin/python scripts/torch_golden.py            # writes tests/data/torch/
    /tmp/torchenv/bin/python scripts/torch_golden.py --out DIR  # or somewhere else

A CPU build of torch is enough; everything runs on the CPU in float32.

Every case writes two files in the replay format (docs: shared spec `replay-format.md`,
config keys as in `semantics.md`):

* `<case>.trace.safetensors`: metadata `config` (JSON), `torch_version`, `generator`;
  tensors `param.<name>` (initial parameters), `grad.<t>.<name>` for t = 1..T, and, for cases
  whose learning rate changes every step, `lr` (f32, shape [T]).
* `<case>.expected.safetensors`: tensors `param.<name>` after T steps, `exp_avg.<name>`,
  `exp_avg_sq.<name>` and (amsgrad) `max_exp_avg_sq.<name>` from `optimizer.state[p]`;
  metadata `step` (= str(T)), `config` (same JSON as the trace), `torch_version`.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

GENERATOR = "scripts/torch_golden.py"
STEPS = 12
SEED = 20240607

# Names contain dots on purpose (the replay format splits only at the first dot); shapes cover
# a 0-d tensor, a single element, a length that is not a multiple of 4, and a 3-d tensor whose
# element count crosses a 128-element boundary.
PARAM_SHAPES = [
    ("temperature", []),
    ("head.bias", [1]),
    ("encoder.layer.0.weight", [3, 5]),
    ("encoder.layer.0.norm.gamma", [37]),
    ("decoder.proj.weight", [2, 5, 13]),
]

# Per-parameter gradient scales, so that moments of very different magnitudes are exercised
# (and eps matters for the small ones).
GRAD_SCALES = {
    "temperature": 1.0,
    "head.bias": 1e-3,
    "encoder.layer.0.weight": 0.1,
    "encoder.layer.0.norm.gamma": 10.0,
    "decoder.proj.weight": 1e-6,
}


def f32(x):
    """Round a Python float to the nearest float32 and return it as a Python float."""
    return float(torch.tensor(x, dtype=torch.float32).item())


def lr_schedule(steps, peak):
    """Linear warmup over 4 steps to `peak`, then linear decay; values exactly f32."""
    warm = 4
    out = []
    for t in range(1, steps + 1):
        if t <= warm:
            lr = peak * t / warm
        else:
            lr = peak * (1.0 - 0.9 * (t - warm) / (steps - warm))
        out.append(f32(lr))
    return out


CASES = [
    # name, config (semantics.md keys), schedule
    ("adam_default", dict(algorithm="adam", lr=1e-3, betas=[0.9, 0.999], eps=1e-8,
                          weight_decay=0.0, amsgrad=False, maximize=False), False),
    ("adam_wd", dict(algorithm="adam", lr=1e-2, betas=[0.9, 0.999], eps=1e-8,
                     weight_decay=0.1, amsgrad=False, maximize=False), False),
    ("adam_amsgrad", dict(algorithm="adam", lr=1e-2, betas=[0.8, 0.99], eps=1e-8,
                          weight_decay=0.0, amsgrad=True, maximize=False), False),
    ("adam_maximize", dict(algorithm="adam", lr=1e-3, betas=[0.9, 0.999], eps=1e-8,
                           weight_decay=0.05, amsgrad=False, maximize=True), False),
    ("adamw_default", dict(algorithm="adamw", lr=1e-3, betas=[0.9, 0.999], eps=1e-8,
                           weight_decay=1e-2, amsgrad=False, maximize=False), False),
    ("adamw_amsgrad_maximize", dict(algorithm="adamw", lr=5e-3, betas=[0.9, 0.999], eps=1e-8,
                                    weight_decay=0.1, amsgrad=True, maximize=True), False),
    # lr changes every step; config lr = first value of the schedule (peak 1e-2).
    ("adam_lr_schedule", dict(algorithm="adam", lr=1e-2, betas=[0.9, 0.999], eps=1e-8,
                              weight_decay=0.0, amsgrad=False, maximize=False), True),
    ("adamw_eps", dict(algorithm="adamw", lr=2e-2, betas=[0.5, 0.9], eps=1e-6,
                       weight_decay=1e-2, amsgrad=False, maximize=False), False),
]


def make_optimizer(params, cfg):
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg["algorithm"]]
    # foreach=False (and fused left off, capturable=False, differentiable=False) selects
    # `_single_tensor_adam`, PyTorch's plain per-tensor reference implementation, so the
    # recorded numbers come from the canonical code path rather than the multi-tensor one.
    return cls(
        params,
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
        eps=cfg["eps"],
        weight_decay=cfg["weight_decay"],
        amsgrad=cfg["amsgrad"],
        maximize=cfg["maximize"],
        foreach=False,
        fused=False,
        capturable=False,
        differentiable=False,
    )


def run_case(case_index, name, cfg, schedule, out_dir):
    gen = torch.Generator().manual_seed(SEED + 1000 * case_index)
    cfg = dict(cfg)

    lrs = None
    if schedule:
        lrs = lr_schedule(STEPS, cfg["lr"])
        cfg["lr"] = lrs[0]

    init = {n: torch.randn(s, generator=gen, dtype=torch.float32) for n, s in PARAM_SHAPES}
    grads = []
    for _t in range(STEPS):
        step_grads = {}
        for n, s in PARAM_SHAPES:
            # Per-step scale varies too (between 0.25x and 4x), on top of the per-param scale.
            step_scale = float(torch.empty((), dtype=torch.float64).uniform_(-2.0, 2.0,
                                                                             generator=gen).exp2())
            g = torch.randn(s, generator=gen, dtype=torch.float32) * f32(GRAD_SCALES[n] * step_scale)
            step_grads[n] = g
        grads.append(step_grads)

    params = {n: init[n].clone() for n, _ in PARAM_SHAPES}
    opt = make_optimizer([params[n] for n, _ in PARAM_SHAPES], cfg)
    for t in range(STEPS):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for n, _ in PARAM_SHAPES:
            params[n].grad = grads[t][n].clone()
        opt.step()

    config_json = json.dumps(cfg)
    trace = {}
    for n, _ in PARAM_SHAPES:
        trace[f"param.{n}"] = init[n].contiguous()
    for t in range(STEPS):
        for n, _ in PARAM_SHAPES:
            trace[f"grad.{t + 1}.{n}"] = grads[t][n].contiguous()
    if lrs is not None:
        trace["lr"] = torch.tensor(lrs, dtype=torch.float32)

    expected = {}
    for n, _ in PARAM_SHAPES:
        p = params[n]
        state = opt.state[p]
        step = state["step"]
        assert float(step) == STEPS, (name, n, step)
        expected[f"param.{n}"] = p.detach().clone().contiguous()
        expected[f"exp_avg.{n}"] = state["exp_avg"].clone().contiguous()
        expected[f"exp_avg_sq.{n}"] = state["exp_avg_sq"].clone().contiguous()
        if cfg["amsgrad"]:
            expected[f"max_exp_avg_sq.{n}"] = state["max_exp_avg_sq"].clone().contiguous()
    for k, v in list(trace.items()) + list(expected.items()):
        assert v.dtype == torch.float32, k
        assert torch.isfinite(v).all(), k

    trace_path = os.path.join(out_dir, f"{name}.trace.safetensors")
    expected_path = os.path.join(out_dir, f"{name}.expected.safetensors")
    save_file(trace, trace_path, metadata={
        "config": config_json,
        "torch_version": torch.__version__,
        "generator": GENERATOR,
    })
    save_file(expected, expected_path, metadata={
        "step": str(STEPS),
        "config": config_json,
        "torch_version": torch.__version__,
    })
    return trace_path, expected_path


def main():
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(repo_root, "tests", "data", "torch"),
                    help="output directory (default: tests/data/torch in the repository)")
    args = ap.parse_args()

    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__} (python {sys.version.split()[0]})")
    for i, (name, cfg, schedule) in enumerate(CASES):
        for path in run_case(i, name, cfg, schedule, args.out):
            print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
