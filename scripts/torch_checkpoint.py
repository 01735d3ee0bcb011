#!/usr/bin/env python3
"""Move Adam/AdamW optimizer state between PyTorch and wgpu-optim checkpoints.

Needs torch and safetensors; not run in CI. The checkpoint layout (docs/checkpoint-format.md,
the README's "Checkpoints", src/checkpoint.rs): tensors `exp_avg.<name>` (in the config's
`exp_avg_dtype`), `exp_avg_sq.<name>` and `max_exp_avg_sq.<name>` (amsgrad) (in
`exp_avg_sq_dtype`), `master_param.<name>` (f32 master weights; only with `master_weights` and a
16-bit `param_dtype`), `step.<name>` (0-d f32, torch's per-parameter step); metadata `config`
(JSON, semantics.md keys), `step` (decimal) and `param_names` (JSON list). `<name>` is the name
from `model.named_parameters()`; torch's state dict is keyed by parameter index instead, and
these functions map one to the other.

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

Storage dtypes (semantics.md, "Storage dtypes"). An export writes f32 states and a config with
no storage keys (f32 storage), whatever the torch parameters' dtype. An import reads states saved
as BF16 or F16 (each must have the dtype its config key gives it) and loads them widened to f32
(exact): torch's Adam state is f32 for f32 parameters, and load_state_dict casts it to each
parameter's dtype. Torch cannot hold q8 state: an import loads each q8 state (U8 codes
`<state>.<name>`, F32 `<state>_absmax.<name>`, its map named in the metadata `q8_maps`)
dequantised to f32, bit for bit the values the optimizer holds (scripts/wgpu_optim_q8.py, pure
Python, checked against wgpu-optim by tests/checkpoint.rs); going back from torch gives an f32
file, which loads only into an optimizer with f32 states. Torch's Adam has no master weights: `master_param.<name>` is checked but not
loaded into the optimizer; `import_checkpoint(..., params_from_master=True)` copies it into the
torch parameters (the f32 weights the run was training; the engine's 16-bit parameters are
their rounding), and without it the parameters are left as they are.

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
from wgpu_optim_q8 import blocks, check_q8_maps, dequantize, STATE_MAPS  # noqa: E402

GENERATOR = "scripts/torch_checkpoint.py"
STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# The storage dtypes a checkpoint tensor can have, by config value; a q8 state is U8 codes (with
# F32 absmax beside them).
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "q8": torch.uint8}


def stored_dtype(config, kind):
    """The dtype name (a key of DTYPES) a checkpoint stores tensor `kind` in under `config`."""
    key = {"exp_avg": "exp_avg_dtype", "exp_avg_sq": "exp_avg_sq_dtype",
           "max_exp_avg_sq": "exp_avg_sq_dtype"}.get(kind)
    return config.get(key, "f32") if key else "f32"


def keeps_master(config):
    """Whether a checkpoint of `config` holds master weights (`master_param.<name>`)."""
    return bool(config.get("master_weights", False)) and config.get("param_dtype", "f32") != "f32"


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


def import_checkpoint(named_parameters, optimizer, path, params_from_master=False):
    """Loads a wgpu-optim checkpoint into a torch.optim.Adam / AdamW built on the same model.

    States saved as BF16 or F16 are loaded as f32, q8 states dequantised to f32. With `params_from_master`, the checkpoint's
    master weights (it must have them) are copied into the parameters; otherwise the parameters
    are not touched. Everything is checked before anything is written.
    """
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
    for key in ("exp_avg_dtype", "exp_avg_sq_dtype"):
        if config.get(key, "f32") not in DTYPES:
            raise ValueError(f"{path}: config {key}={config[key]!r} is not supported here "
                             f"(one of {sorted(DTYPES)})")
    q8 = check_q8_maps(config, meta, path)
    master = keeps_master(config)
    if params_from_master and not master:
        raise ValueError(f"{path}: params_from_master=True, but the checkpoint has no master "
                         "weights (master_weights with a 16-bit param_dtype)")
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
    masters = []

    def stored(kind, n, p):
        """Tensor `kind.n`, checked (present, its dtype, p's element count), widened to f32."""
        key = f"{kind}.{n}"
        if key not in tensors:
            raise ValueError(f"{path}: {key} is missing")
        t, want = tensors[key], DTYPES[stored_dtype(config, kind)]
        if t.dtype != want:
            raise ValueError(f"{path}: {key} has dtype {t.dtype}, but the config gives it {want}")
        if t.numel() != p.numel():
            raise ValueError(f"{path}: {key} has {t.numel()} elements, the parameter {p.numel()}")
        if kind not in q8:
            return t.to(torch.float32).reshape(p.shape).clone()
        absmax_key = f"{kind}_absmax.{n}"
        if absmax_key not in tensors:
            raise ValueError(f"{path}: {absmax_key} is missing")
        absmax = tensors[absmax_key]
        if absmax.dtype != torch.float32 or list(absmax.shape) != [blocks(t.numel())]:
            raise ValueError(f"{path}: {absmax_key} is {absmax.dtype} {list(absmax.shape)}, "
                             f"expected torch.float32 [{blocks(t.numel())}]")
        values = dequantize(bytes(t.flatten().tolist()), absmax.tolist(), STATE_MAPS[kind])
        return torch.tensor(values.tolist(), dtype=torch.float32).reshape(p.shape)

    for n, p in named:
        s = {"step": tensors[f"step.{n}"].to(torch.float32).reshape(()).clone()}
        if float(s["step"]) != float(step):
            raise ValueError(f"{path}: step.{n} = {float(s['step'])} but the metadata step is {step}")
        for kind in STATE:
            if kind == "max_exp_avg_sq" and not config["amsgrad"]:
                continue
            s[kind] = stored(kind, n, p)
        if master:
            masters.append((p, stored("master_param", n, p)))
        state_dict["state"][index[id(p)]] = s
    for group in state_dict["param_groups"]:
        group["lr"] = config["lr"]
    optimizer.load_state_dict(state_dict)
    if params_from_master:
        with torch.no_grad():
            for p, weights in masters:
                p.copy_(weights)


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
