#!/usr/bin/env python3
"""Move Adam/AdamW optimizer state between PyTorch and wgpu-optim checkpoints.

Needs torch and safetensors; not run in CI. The checkpoint layout (the README's "Checkpoints",
and src/checkpoint.rs): tensors `exp_avg.<name>`, `exp_avg_sq.<name>`, `max_exp_avg_sq.<name>`
(amsgrad), `step.<name>` (0-d f32, torch's per-parameter step); metadata `config` (JSON,
semantics.md keys), `step` (decimal) and `param_names` (JSON list). `<name>` is the name from
`model.named_parameters()`; torch's state dict is keyed by parameter index instead, and these
functions map one to the other.

    from torch_checkpoint import export_checkpoint, import_checkpoint  # scripts/ on sys.path

    # PyTorch -> wgpu-optim
    export_checkpoint(model.named_parameters(), optimizer, "optimizer.safetensors")
    # wgpu-optim -> PyTorch (an optimizer built on the same model, same hyperparameters)
    import_checkpoint(model.named_parameters(), optimizer, "optimizer.safetensors")

The config of an export comes from param_groups[0] (lr, betas, eps, weight_decay, amsgrad,
maximize; the algorithm from the class, `algorithm=` overrides). An import refuses a config whose
algorithm or hyperparameters differ from the optimizer's, or which uses an option torch lacks
(yogi, eps_root, eps_mode folded, rescale_grad, clip_gradient, no bias correction); it restores
the learning rate, as torch's load_state_dict does.

Command line:

    python scripts/torch_checkpoint.py make-test-data [--out DIR]
        writes tests/data/torch/torch_checkpoint.safetensors (a checkpoint exported from a tiny
        model after 5 AdamW steps) and torch_checkpoint.continue.safetensors (the next 3 steps:
        params at the save, gradients, torch's params and state after them), which
        tests/checkpoint.rs loads and continues on the GPU.
    python scripts/torch_checkpoint.py verify-import PATH
        the manual check of the other direction: imports PATH (the checkpoint tests/checkpoint.rs
        writes after those 3 steps on the GPU) into torch, compares it with torch's own state
        after 8 steps, then steps torch once from each and compares the parameters.
"""

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_trace import (F32_EPS, TinyModel, _atomic_save, _named, optimizer_config,  # noqa: E402
                         tiny_batches)

GENERATOR = "scripts/torch_checkpoint.py"
STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _indices(optimizer):
    """id(param) -> its index in optimizer.state_dict()['state']."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def export_checkpoint(named_parameters, optimizer, path, algorithm=None):
    """Writes the optimizer's state as a wgpu-optim checkpoint (atomically)."""
    named = _named(named_parameters, optimizer)
    config = optimizer_config(optimizer, algorithm)
    index = _indices(optimizer)
    state = optimizer.state_dict()["state"]
    tensors, steps = {}, set()
    for n, p in named:
        s = state.get(index[id(p)])
        if not s:
            raise ValueError(f"{n} has no optimizer state (no step has updated it yet); "
                             "wgpu-optim keeps one step count for all parameters")
        steps.add(float(s["step"]))
        for kind in STATE:
            if kind in s:
                tensors[f"{kind}.{n}"] = s[kind].detach().cpu().to(torch.float32) \
                    .clone().contiguous()
        tensors[f"step.{n}"] = torch.as_tensor(s["step"]).detach().cpu() \
            .to(torch.float32).reshape(()).clone()
    if len(steps) != 1:
        raise ValueError(f"the parameters have taken different numbers of steps ({sorted(steps)}); "
                         "wgpu-optim keeps one step count for all parameters")
    _atomic_save(tensors, path, {
        "config": json.dumps(config),
        "step": str(int(steps.pop())),
        "param_names": json.dumps([n for n, _ in named]),
        "torch_version": torch.__version__,
        "generator": GENERATOR,
    })


def import_checkpoint(named_parameters, optimizer, path):
    """Loads a wgpu-optim checkpoint into a torch.optim.Adam / AdamW built on the same model."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    step = int(meta["step"])
    names = json.loads(meta["param_names"])

    lacking = {
        "algorithm": config["algorithm"] == "yogi",
        "eps_root": config.get("eps_root", 0.0) != 0.0,
        "eps_mode": config.get("eps_mode", "torch") != "torch"
        and config.get("bias_correction", True),
        "bias_correction": not config.get("bias_correction", True),
        "rescale_grad": config.get("rescale_grad", 1.0) != 1.0,
        "clip_gradient": config.get("clip_gradient") is not None,
    }
    for key, bad in lacking.items():
        if bad:
            raise ValueError(f"{path}: config {key}={config[key]!r} has no torch.optim equivalent")
    mine = optimizer_config(optimizer)
    for key in ("algorithm", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        if config[key] != mine[key]:
            raise ValueError(f"{path}: config {key}={config[key]!r}, but the optimizer has "
                             f"{mine[key]!r}")

    named = _named(named_parameters, optimizer)
    if sorted(names) != sorted(n for n, _ in named):
        raise ValueError(f"{path}: parameter names {names} differ from the model's "
                         f"{[n for n, _ in named]}")
    index = _indices(optimizer)
    state_dict = optimizer.state_dict()
    for n, p in named:
        s = {"step": tensors[f"step.{n}"].to(torch.float32).reshape(()).clone()}
        if float(s["step"]) != float(step):
            raise ValueError(f"{path}: step.{n} = {float(s['step'])} but the metadata step is {step}")
        for kind in STATE:
            key = f"{kind}.{n}"
            if kind == "max_exp_avg_sq" and not config["amsgrad"]:
                continue
            if tensors[key].numel() != p.numel():
                raise ValueError(f"{path}: {key} has {tensors[key].numel()} elements, "
                                 f"the parameter {p.numel()}")
            s[kind] = tensors[key].reshape(p.shape).clone()
        state_dict["state"][index[id(p)]] = s
    for group in state_dict["param_groups"]:
        group["lr"] = config["lr"]
    optimizer.load_state_dict(state_dict)


# The test data: a tiny model trained with AdamW + amsgrad, exported after SAVED_AT steps.
SAVED_AT, CONTINUED = 5, 3


def _tiny_run():
    torch.manual_seed(4321)
    model = TinyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99),
                                  weight_decay=0.05, amsgrad=True)
    return model, optimizer, tiny_batches(SAVED_AT + CONTINUED + 1, 77)


def _backward(model, batch):
    x, y = batch
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


def make_test_data(out_dir):
    model, optimizer, batches = _tiny_run()
    for batch in batches[:SAVED_AT]:
        _backward(model, batch)
        optimizer.step()
    checkpoint = os.path.join(out_dir, "torch_checkpoint.safetensors")
    export_checkpoint(model.named_parameters(), optimizer, checkpoint)

    names = [n for n, _ in model.named_parameters()]
    cont = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for k, batch in enumerate(batches[SAVED_AT:SAVED_AT + CONTINUED], 1):
        _backward(model, batch)
        for n, p in model.named_parameters():
            cont[f"grad.{k}.{n}"] = p.grad.detach().clone()
        optimizer.step()
    for n, p in model.named_parameters():
        cont[f"after.param.{n}"] = p.detach().clone()
        for kind in STATE:
            cont[f"after.{kind}.{n}"] = optimizer.state[p][kind].detach().clone()
    path = os.path.join(out_dir, "torch_checkpoint.continue.safetensors")
    _atomic_save(cont, path, {"steps": str(CONTINUED), "param_names": json.dumps(names),
                              "torch_version": torch.__version__, "generator": GENERATOR})
    for p in (checkpoint, path):
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")


def verify_import(path):
    """Imports a checkpoint saved after SAVED_AT + CONTINUED steps and checks it against torch."""
    model, optimizer, batches = _tiny_run()
    for batch in batches[:SAVED_AT + CONTINUED]:
        _backward(model, batch)
        optimizer.step()
    # A second model at the same parameters, its optimizer loaded from the file.
    other = TinyModel()
    other.load_state_dict(model.state_dict())
    imported = torch.optim.AdamW(other.parameters(), lr=1.0, betas=(0.9, 0.99),
                                 weight_decay=0.05, amsgrad=True)
    import_checkpoint(other.named_parameters(), imported, path)

    ok = True
    lr = imported.param_groups[0]["lr"]
    print(f"imported: lr {lr} (torch's {optimizer.param_groups[0]['lr']})")
    ok &= lr == optimizer.param_groups[0]["lr"]
    own = dict(model.named_parameters())
    for n, p in other.named_parameters():
        mine, theirs = optimizer.state[own[n]], imported.state[p]
        ok &= float(theirs["step"]) == float(mine["step"]) == SAVED_AT + CONTINUED
        for kind in STATE:
            w, g = mine[kind].double(), theirs[kind].double()
            tol = 1e-5 * float(w.abs().max()) + 1e-5 * w.abs() + 1e-45
            ratio = float(((g - w).abs() / tol).max())
            ok &= g.shape == w.shape and ratio <= 1
            print(f"{kind}.{n}: shape {list(g.shape)}, max |diff| "
                  f"{float((g - w).abs().max()):.3e}, {ratio:.3g} of the tolerance")
    # One more step from each: the imported state (step count included) must behave the same.
    batch = batches[SAVED_AT + CONTINUED]
    for m, opt in ((model, optimizer), (other, imported)):
        _backward(m, batch)
        opt.step()
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        tol = F32_EPS * float(p.detach().abs().max()) + 1e-4 * lr
        diff = float((p - q).detach().abs().max())
        ok &= diff <= tol
        print(f"param.{n} after one more step: max |diff| {diff:.3e} (tolerance {tol:.3e})")
    print("PASS" if ok else "FAIL")
    return ok


def main():
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-test-data", help="write the committed torch checkpoint test data")
    m.add_argument("--out", default=os.path.join(repo_root, "tests", "data", "torch"))
    v = sub.add_parser("verify-import", help="import a wgpu-optim checkpoint into torch, check it")
    v.add_argument("path")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} (python {sys.version.split()[0]})")
    if args.command == "make-test-data":
        os.makedirs(args.out, exist_ok=True)
        make_test_data(args.out)
    else:
        sys.exit(0 if verify_import(args.path) else 1)


if __name__ == "__main__":
    main()
