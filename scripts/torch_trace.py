#!/usr/bin/env python3
"""Record a PyTorch Adam/AdamW run as a wgpu-optim replay trace, and check a replay against it.

Needs torch and safetensors (`pip install torch safetensors`); not run in CI. The formats are
those of the shared spec `replay-format.md` (config keys as in `semantics.md`).

In your training script (any model; float32 parameters; Adam or AdamW):

    from torch_trace import TraceRecorder             # scripts/ on sys.path, or copy the file

    recorder = TraceRecorder(model.named_parameters(), optimizer)  # before the first step
    for batch in batches:
        optimizer.zero_grad()
        loss_fn(model(batch)).backward()
        recorder.record_step()                         # this step's gradients and lr
        optimizer.step()
        scheduler.step()                               # if any: the lr of each step is kept
    recorder.save("run.trace.safetensors", "run.expected.safetensors")

then replay it and compare with torch's own final parameters and state:

    cargo run --release --example replay -- run.trace.safetensors run.out.safetensors
    python scripts/torch_trace.py compare run.trace.safetensors run.out.safetensors \\
        run.expected.safetensors

`compare` prints the largest difference of every tensor against its tolerance (the README's
"Replay a PyTorch run" explains it) and exits 1 if any tensor is outside it.

    python scripts/torch_trace.py demo [--out DIR]

records the small traces of a tiny model that the Rust tests replay (tests/data/torch/recorded_*).
"""

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

GENERATOR = "scripts/torch_trace.py"
F32_EPS = 2.0 ** -23  # f32 machine epsilon = 2u


def optimizer_config(optimizer, algorithm=None):
    """The wgpu-optim config (semantics.md keys) of a torch.optim.Adam / AdamW.

    Every param group must share the hyperparameters: wgpu-optim has one configuration per
    optimizer. `algorithm` overrides the one inferred from the optimizer's class.
    """
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
    groups = optimizer.param_groups
    first = groups[0]
    for i, group in enumerate(groups[1:], 1):
        for k in keys:
            if _plain(group[k]) != _plain(first[k]):
                raise ValueError(f"param group {i} has {k}={group[k]!r} but group 0 has "
                                 f"{first[k]!r}: wgpu-optim has one configuration per optimizer")
    if algorithm is None:
        if isinstance(optimizer, torch.optim.AdamW):
            algorithm = "adamw"
        elif isinstance(optimizer, torch.optim.Adam):
            algorithm = "adamw" if first.get("decoupled_weight_decay") else "adam"
        else:
            raise ValueError(f"{type(optimizer).__name__}: only torch.optim.Adam and AdamW map "
                             "to wgpu-optim (pass algorithm= to override)")
    return {
        "algorithm": algorithm,
        "lr": float(first["lr"]),
        "betas": [float(b) for b in first["betas"]],
        "eps": float(first["eps"]),
        "weight_decay": float(first["weight_decay"]),
        "amsgrad": bool(first["amsgrad"]),
        "maximize": bool(first["maximize"]),
    }


def _plain(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, tuple):
        return [_plain(v) for v in x]
    return x


def _named(named_parameters, optimizer):
    """(name, param) for every parameter of the optimizer, in the model's order."""
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names_of = {id(p): n for n, p in named}
    if set(names_of) != held or len(names_of) != len(named):
        missing = len(held - set(names_of))
        raise ValueError(f"the named parameters and the optimizer's differ ({missing} of the "
                         "optimizer's have no name); pass model.named_parameters() of the model "
                         "the optimizer was built on")
    return named


def _atomic_save(tensors, path, metadata):
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class TraceRecorder:
    """Records the initial parameters, then each step's gradients and learning rate."""

    def __init__(self, named_parameters, optimizer, algorithm=None):
        self.optimizer = optimizer
        self.algorithm = algorithm
        self.named = _named(named_parameters, optimizer)
        for n, p in self.named:
            if p.dtype != torch.float32:
                raise ValueError(f"{n} is {p.dtype}: the replay format is float32")
            if optimizer.state.get(p):
                raise ValueError(f"{n} already has optimizer state: start recording before the "
                                 "first step (a trace starts from a fresh state)")
        optimizer_config(optimizer, algorithm)  # refuse what has no wgpu-optim equivalent now
        self.initial = {n: p.detach().cpu().clone().contiguous() for n, p in self.named}
        self.grads = []
        self.lrs = []

    def record_step(self):
        """Call after backward() and before optimizer.step()."""
        t = len(self.grads) + 1
        step = {}
        for n, p in self.named:
            if p.grad is None:
                raise ValueError(f"{n} has no gradient at step {t}: torch would skip it, "
                                 "wgpu-optim steps every parameter, so a trace needs them all")
            if p.grad.is_sparse:
                raise ValueError(f"{n} has a sparse gradient, which Adam does not take")
            step[n] = p.grad.detach().cpu().to(torch.float32).clone().contiguous()
        self.grads.append(step)
        self.lrs.append(optimizer_config(self.optimizer, self.algorithm)["lr"])

    def save(self, trace_path, expected_path=None):
        """Writes the trace and, if asked, torch's own result in the replay result format."""
        steps = len(self.grads)
        config = optimizer_config(self.optimizer, self.algorithm)
        if self.lrs:
            config["lr"] = self.lrs[0]
        trace = {f"param.{n}": self.initial[n] for n, _ in self.named}
        for t, grads in enumerate(self.grads, 1):
            for n, _ in self.named:
                trace[f"grad.{t}.{n}"] = grads[n]
        if any(lr != self.lrs[0] for lr in self.lrs):
            # f32, as the format has it: the rounding (6e-8 relative) is far inside the tolerance.
            trace["lr"] = torch.tensor(self.lrs, dtype=torch.float32)
        config_json = json.dumps(config)
        _atomic_save(trace, trace_path, {"config": config_json,
                                         "torch_version": torch.__version__,
                                         "generator": GENERATOR})
        if expected_path is None:
            return
        expected = {}
        for n, p in self.named:
            state = self.optimizer.state[p]
            if float(state["step"]) != steps:
                raise ValueError(f"{n}: the optimizer took {float(state['step']):g} steps but "
                                 f"{steps} were recorded; call record_step() before every step")
            expected[f"param.{n}"] = p.detach().cpu().clone().contiguous()
            for kind in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if kind in state:
                    expected[f"{kind}.{n}"] = state[kind].detach().cpu().to(torch.float32) \
                        .clone().contiguous()
        _atomic_save(expected, expected_path, {"step": str(steps), "config": config_json,
                                               "torch_version": torch.__version__})


def _load(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def compare(trace_path, result_path, expected_path, out=sys.stdout):
    """Compares a replay result with torch's; returns the worst error / tolerance ratio.

    Tolerances (the README explains them; the Rust tests use the same):
      param:   steps * (2u * max|p| + 1e-4 * max lr)        absolute, per tensor
      moments: 1e-5 * max(max|want|, s) + 1e-5 * |want|     s = the largest |g| the tensor saw
                                                            (g^2 for exp_avg_sq, max_exp_avg_sq)
    where g includes Adam's coupled decay weight_decay * p.
    """
    trace, trace_meta = _load(trace_path)
    got, _ = _load(result_path)
    want, _ = _load(expected_path)
    config = json.loads(trace_meta["config"])
    names = sorted(k[len("param."):] for k in trace if k.startswith("param."))
    steps = max([int(k.split(".")[1]) for k in trace if k.startswith("grad.")], default=0)
    lr_max = float(trace["lr"].max()) if "lr" in trace else float(config["lr"])
    wd = float(config.get("weight_decay", 0.0))
    worst = 0.0
    for n in names:
        p_max = max(float(trace[f"param.{n}"].abs().max()), float(want[f"param.{n}"].abs().max())) \
            if trace[f"param.{n}"].numel() else 0.0
        g_max = max([float(trace[f"grad.{t}.{n}"].abs().max())
                     for t in range(1, steps + 1) if trace[f"grad.{t}.{n}"].numel()], default=0.0)
        if config["algorithm"] != "adamw":  # coupled L2 decay: g += weight_decay * p
            g_max += wd * p_max
        for kind in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            key = f"{kind}.{n}"
            if key not in want:
                continue
            if key not in got:
                print(f"{key}: missing from the result", file=out)
                worst = float("inf")
                continue
            w, g = want[key].double(), got[key].double()
            if w.shape != g.shape:
                print(f"{key}: shape {list(g.shape)}, torch's {list(w.shape)}", file=out)
                worst = float("inf")
                continue
            if kind == "param":
                tol = torch.full_like(w, steps * (F32_EPS * float(w.abs().max()) + 1e-4 * lr_max))
            else:
                scale = g_max if kind == "exp_avg" else g_max * g_max
                tol = 1e-5 * max(float(w.abs().max()), scale) + 1e-5 * w.abs()
            err = (g - w).abs()
            ratio = float((err / tol.clamp_min(1e-45)).max()) if err.numel() else 0.0
            worst = max(worst, ratio)
            flag = "ok" if ratio <= 1 else "FAIL"
            print(f"{flag:4} {key}: max |diff| {float(err.max()) if err.numel() else 0:.3e}, "
                  f"{ratio:.3g} of the tolerance", file=out)
    print(f"worst: {worst:.3g} of the tolerance -> {'PASS' if worst <= 1 else 'FAIL'}", file=out)
    return worst


class TinyModel(torch.nn.Module):
    """The demo model: dotted names, a 0-d parameter, a few dozen elements."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        self.head = torch.nn.Linear(6, 3)
        self.temperature = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.head(self.encoder(x)) / self.temperature


def tiny_batches(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(steps)]


def demo(out_dir):
    """Records the committed demo traces: a tiny model, a real loss, torch's defaults."""
    cases = [
        # Adam with L2 decay under a warmup + cosine schedule: the trace gets an `lr` tensor.
        ("recorded_adam_cosine", lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
         True),
        ("recorded_adamw_amsgrad",
         lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.05,
                                      amsgrad=True), False),
    ]
    steps = 10
    for i, (name, make, schedule) in enumerate(cases):
        torch.manual_seed(1234 + i)
        model = TinyModel()
        optimizer = make(model.parameters())
        scheduler = None
        if schedule:
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=3),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps - 3)],
                milestones=[3])
        recorder = TraceRecorder(model.named_parameters(), optimizer)
        for x, y in tiny_batches(steps, 99 + i):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            recorder.record_step()
            optimizer.step()
            if scheduler:
                scheduler.step()
        trace = os.path.join(out_dir, f"{name}.trace.safetensors")
        expected = os.path.join(out_dir, f"{name}.expected.safetensors")
        recorder.save(trace, expected)
        for path in (trace, expected):
            print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="compare a replay result with torch's expected file")
    c.add_argument("trace")
    c.add_argument("result")
    c.add_argument("expected")
    d = sub.add_parser("demo", help="record the tiny demo traces the tests replay")
    d.add_argument("--out", default=os.path.join(repo_root, "tests", "data", "torch"))
    args = ap.parse_args()
    if args.command == "compare":
        sys.exit(0 if compare(args.trace, args.result, args.expected) <= 1 else 1)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} (python {sys.version.split()[0]})")
    os.makedirs(args.out, exist_ok=True)
    demo(args.out)


if __name__ == "__main__":
    main()
