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

Mixed precision (`torch.amp.GradScaler`) and global-norm clipping (`clip_grad_norm_`), the loop
of torch's AMP docs; the recorder takes the scaler and the clipping norm, and records the scaled
gradients as backward leaves them, so `record_step()` comes before `scaler.unscale_`:

    scaler = torch.amp.GradScaler("cpu")               # or "cuda"; before its first use
    recorder = TraceRecorder(model.named_parameters(), optimizer, scaler=scaler,
                             max_grad_norm=1.0)
    for batch in batches:
        optimizer.zero_grad()
        scaler.scale(loss_fn(model(batch))).backward()
        recorder.record_step()                         # the scaled gradients
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # the same max_grad_norm
        scaler.step(optimizer)                         # skipped on inf/NaN
        scaler.update()
        scheduler.step()                               # schedules count skipped iterations too
    recorder.save("run.trace.safetensors", "run.expected.safetensors")

The trace's config then holds `loss_scale` (from the scaler: init_scale rounded to f32 as torch
stores it, growth_factor, backoff_factor, growth_interval, `dynamic`), `skip_nonfinite` and
`max_grad_norm`; torch's expected result holds `step` (applied steps), `skipped` and `loss_scale`
(the final scale, `repr(float)`). A fixed scale: `TraceRecorder(..., scaler=scaler,
dynamic_scale=False)` and `scaler.update(new_scale=S)` in place of `scaler.update()`. Skipping
without a scaler: `TraceRecorder(..., skip_nonfinite=True)`, whose `record_step()` returns False
when a gradient holds an inf or NaN; then do not call `optimizer.step()` (nor clip).
Torch checks the scaled gradients for inf/NaN, the spec the unscaled ones: they differ only when
the scale is below 1, and `record_step()` refuses an iteration where they would.

Either way, replay the trace and compare with torch's own final parameters and state:

    cargo run --release --example replay -- run.trace.safetensors run.out.safetensors
    python scripts/torch_trace.py compare run.trace.safetensors run.out.safetensors \\
        run.expected.safetensors

`compare` prints the largest difference of every tensor against its tolerance (the README's
"Replay a PyTorch run" explains it) and checks the result's metadata (`step`, and `skipped` and
`loss_scale` exactly where torch's file has them); it exits 1 if anything is off.

    python scripts/torch_trace.py demo [--out DIR]

records the small traces of a tiny model that the Rust tests replay (tests/data/torch/recorded_*).

    python scripts/torch_trace.py make-amp-test-data [--out DIR]

records the loss-scaling, skipping and clipping traces (tests/data/torch/amp_*, clip_*,
skip_*; tests/data/torch/README.md lists them), and checks torch's skips and scales against the
spec's rule (`prestep`) on each.

    python scripts/torch_trace.py check-compare [--data DIR]

checks the committed files and `compare` itself: every torch expected file passes as a result;
each AMP trace replayed in torch by the spec's rule (`replay_in_torch`) passes, and fails without
clipping, with its skipped iterations stepped, or with the scale kept in float64 (where that
changes it); copies of torch's file with a wrong step, skipped count, loss scale (one ulp off,
or printed from f32) or parameter fail; the scale printed as Rust's `{}` prints it passes.
"""

import argparse
import json
import math
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


def _f32(x):
    """x rounded to float32 (torch's scale lives in a float32 tensor), as a Python float."""
    return torch.tensor(float(x), dtype=torch.float32).item()


def _inv_scale(scale):
    """torch's unscale factor: the reciprocal in f64, rounded to f32 (GradScaler.unscale_)."""
    return torch.tensor(scale, dtype=torch.float64).reciprocal().float()


def scaler_config(scaler, dynamic=True):
    """The `loss_scale` config of a torch.amp.GradScaler that has not been used yet."""
    if not scaler.is_enabled():
        raise ValueError("the GradScaler is disabled: record without scaler=")
    if scaler._get_scale_async() is not None:
        raise ValueError("the GradScaler was already used: start recording before its first "
                         "scale() (a trace starts from init_scale with no growth history)")
    init_scale = _f32(scaler.get_scale())  # torch.full((), init_scale, dtype=float32)
    config = {
        "init_scale": init_scale,
        "growth_factor": float(scaler.get_growth_factor()),
        "backoff_factor": float(scaler.get_backoff_factor()),
        "growth_interval": int(scaler.get_growth_interval()),
        "dynamic": bool(dynamic),
    }
    if not (0.0 < init_scale < float("inf")):
        raise ValueError(f"init_scale {scaler.get_scale()!r} is {init_scale!r} in float32 "
                         "(torch's scale tensor): it must be > 0 and finite")
    if not 0.0 < config["backoff_factor"] < 1.0:
        raise ValueError(f"backoff_factor {config['backoff_factor']!r} must be in (0, 1)")
    if config["growth_interval"] < 1:
        raise ValueError(f"growth_interval {config['growth_interval']!r} must be >= 1")
    return config


class TraceRecorder:
    """Records the initial parameters, then each iteration's gradients and learning rate.

    scaler: a torch.amp.GradScaler (not used yet); the gradients recorded are the scaled ones.
    dynamic_scale: False when the run keeps the scale fixed (`scaler.update(new_scale=S)`).
    max_grad_norm: the max_norm of the run's `clip_grad_norm_` (2-norm over all parameters,
      after `scaler.unscale_`); the recorder cannot see the call, so it must match.
    skip_nonfinite: without a scaler, the run skips optimizer.step() when record_step()
      returns False (a gradient holds an inf or NaN). Always on with a scaler.
    """

    def __init__(self, named_parameters, optimizer, algorithm=None, *, scaler=None,
                 dynamic_scale=True, max_grad_norm=None, skip_nonfinite=False):
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
        self.scaler = scaler
        self.loss_scale = scaler_config(scaler, dynamic_scale) if scaler is not None else None
        if max_grad_norm is not None:
            max_grad_norm = float(max_grad_norm)
            if not 0.0 < max_grad_norm < float("inf"):
                raise ValueError(f"max_grad_norm {max_grad_norm!r} must be > 0 and finite")
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite) or scaler is not None
        self.initial = {n: p.detach().cpu().clone().contiguous() for n, p in self.named}
        self.grads = []
        self.lrs = []
        self.found_inf = []  # per iteration: did torch skip it (scaled gradient not finite)
        self.scales = []     # per iteration: the scale the gradients were multiplied by

    def record_step(self):
        """Call after backward() and before scaler.unscale_ / clipping / optimizer.step().

        Returns True when the iteration's gradients are all finite (the step will be applied),
        False when it will be skipped (only with a scaler or skip_nonfinite).
        """
        t = len(self.grads) + 1
        if self.scaler is not None:
            stage = self.scaler._per_optimizer_states[id(self.optimizer)]["stage"]
            if stage.name != "READY":
                raise ValueError(f"iteration {t}: scaler.unscale_ (or step) already ran on this "
                                 "optimizer: call record_step() right after backward(), on the "
                                 "scaled gradients")
        step = {}
        nonfinite = None
        for n, p in self.named:
            if p.grad is None:
                raise ValueError(f"{n} has no gradient at step {t}: torch would skip it, "
                                 "wgpu-optim steps every parameter, so a trace needs them all")
            if p.grad.is_sparse:
                raise ValueError(f"{n} has a sparse gradient, which Adam does not take")
            step[n] = p.grad.detach().cpu().to(torch.float32).clone().contiguous()
            if nonfinite is None and not bool(torch.isfinite(step[n]).all()):
                nonfinite = n
        if nonfinite is not None and not self.skip_nonfinite:
            raise ValueError(f"gradient of {nonfinite} at iteration {t} holds an inf or NaN: "
                             "without a scaler or skip_nonfinite=True the replay refuses it")
        if self.scaler is not None:
            scale = float(self.scaler.get_scale())
            if self.scales and not self.loss_scale["dynamic"] \
                    and scale != self.loss_scale["init_scale"]:
                raise ValueError(f"iteration {t}: the scale moved to {scale!r} but "
                                 "dynamic_scale=False: keep it with scaler.update(new_scale=S)")
            if not self.scales and scale != self.loss_scale["init_scale"]:
                raise ValueError(f"iteration 1: scale {scale!r}, init_scale "
                                 f"{self.loss_scale['init_scale']!r}")
            if scale < 1.0 and nonfinite is None:
                # torch found every scaled value finite; the spec checks the unscaled ones.
                inv = _inv_scale(scale)
                for n, g in step.items():
                    if not bool(torch.isfinite(g * inv).all()):
                        raise ValueError(
                            f"iteration {t}: scale {scale!r} < 1 makes the unscaled gradient of "
                            f"{n} overflow where the scaled one is finite: torch steps, the spec "
                            "skips, so the replay cannot match")
            self.scales.append(scale)
        self.grads.append(step)
        self.found_inf.append(nonfinite is not None)
        self.lrs.append(optimizer_config(self.optimizer, self.algorithm)["lr"])
        return nonfinite is None

    def config(self):
        """The trace's config: the optimizer's keys plus the optimizer-wide ones in use."""
        config = optimizer_config(self.optimizer, self.algorithm)
        if self.lrs:
            config["lr"] = self.lrs[0]
        if self.loss_scale is not None:
            config["loss_scale"] = dict(self.loss_scale)
        if self.skip_nonfinite:
            config["skip_nonfinite"] = True
        if self.max_grad_norm is not None:
            config["max_grad_norm"] = self.max_grad_norm
        return config

    def save(self, trace_path, expected_path=None):
        """Writes the trace and, if asked, torch's own result in the replay result format."""
        iterations = len(self.grads)
        config = self.config()
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
        # Applied steps: every iteration whose gradients were finite (torch's found_inf is on
        # the scaled gradients; record_step() refused the S < 1 cases where the spec differs).
        applied = iterations - sum(self.found_inf)
        expected = {}
        for n, p in self.named:
            state = self.optimizer.state.get(p) or {}
            took = int(float(state["step"])) if "step" in state else 0
            if took != applied:
                raise ValueError(f"{n}: the optimizer took {took} steps but {applied} of the "
                                 f"{iterations} recorded iterations had finite gradients; call "
                                 "record_step() before every step (and skip the step when it "
                                 "returns False)")
            expected[f"param.{n}"] = p.detach().cpu().clone().contiguous()
            kinds = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if config["amsgrad"] else [])
            for kind in kinds:
                # No state yet (every iteration skipped): the initial state, zeros.
                value = state[kind] if kind in state else torch.zeros_like(p)
                expected[f"{kind}.{n}"] = value.detach().cpu().to(torch.float32) \
                    .clone().contiguous()
        metadata = {"step": str(applied), "config": config_json,
                    "torch_version": torch.__version__}
        if self.skip_nonfinite or self.max_grad_norm is not None:
            # Written only for the runs with the optimizer-wide keys, so that the older traces
            # (`demo`) regenerate as committed.
            metadata["skipped"] = str(iterations - applied)
        if self.scaler is not None:
            metadata["loss_scale"] = repr(float(self.scaler.get_scale()))
            metadata["growth_tracker"] = str(int(self.scaler._get_growth_tracker()))
        _atomic_save(expected, expected_path, metadata)


def _load(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _iterations(trace):
    return max([int(k.split(".")[1]) for k in trace if k.startswith("grad.")], default=0)


def prestep(trace, config, keep_grads=False, clip=True, f64_scale=False):
    """The spec's "Before the per-element step" on a trace, iteration by iteration.

    semantics.md with torch's arithmetic where the spec leaves it open: the scale S is a float32
    (torch keeps it in a float32 tensor), unscaling multiplies by f32(1 / f64(S)), and a scale
    update is S = f32(f64(S) * factor), kept only if that float32 is finite (torch's
    `_amp_update_scale_`). The norm is summed in f64 here (it only sizes the tolerances).

    Returns a dict: `found_inf`, `scale` (S the iteration's gradients carry; None without
    loss_scale), `norm`, `coef` (None when skipped) per iteration; `applied` (the iterations
    stepped), `final_scale`, `growth_tracker`, `g_max` (per name, the largest |processed
    gradient| of an applied iteration: unscaled and clipped); with keep_grads, `grads`: per
    iteration, the gradients the step sees (float32, clipped by multiplying with f32(coef)).
    clip=False and f64_scale=True (S kept in float64) are wrong variants, for check-compare.
    """
    names = sorted(k[len("param."):] for k in trace if k.startswith("param."))
    ls = config.get("loss_scale")
    skip = ls is not None or bool(config.get("skip_nonfinite", False))
    max_norm = config.get("max_grad_norm")
    rounded = (lambda x: x) if f64_scale else _f32
    scale = rounded(ls.get("init_scale", 65536.0)) if ls is not None else None
    dynamic = ls is not None and ls.get("dynamic", True)
    tracker = 0
    out = {"found_inf": [], "scale": [], "norm": [], "coef": [], "applied": [],
           "g_max": {n: 0.0 for n in names}, "grads": []}
    for k in range(1, _iterations(trace) + 1):
        grads = {n: trace[f"grad.{k}.{n}"].to(torch.float32) for n in names}
        if ls is not None:
            inv = _inv_scale(scale)
            grads = {n: g * inv for n, g in grads.items()}
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        found = skip and not finite
        out["found_inf"].append(found)
        out["scale"].append(scale)
        if found:
            out["norm"].append(None)
            out["coef"].append(None)
            if keep_grads:
                out["grads"].append(grads)
        else:
            norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
            coef = 1.0 if max_norm is None or not clip else min(1.0, max_norm / (norm + 1e-6))
            out["norm"].append(norm)
            out["coef"].append(coef)
            out["applied"].append(k)
            for n, g in grads.items():
                if g.numel():
                    out["g_max"][n] = max(out["g_max"][n], float(g.abs().max()) * coef)
            if keep_grads:
                out["grads"].append({n: g * _f32(coef) for n, g in grads.items()})
        if dynamic:
            if found:
                scale = rounded(scale * float(ls.get("backoff_factor", 0.5)))
                tracker = 0
            else:
                tracker += 1
                if tracker == int(ls.get("growth_interval", 2000)):
                    grown = rounded(scale * float(ls.get("growth_factor", 2.0)))
                    if math.isfinite(grown):
                        scale = grown
                    tracker = 0
    out["final_scale"] = scale
    out["growth_tracker"] = tracker if ls is not None else None
    return out


def _check_metadata(got_meta, want_meta, iterations, out):
    """The result's `step`, `skipped` and `loss_scale` against torch's; returns False if off."""
    ok = True

    def report(good, line):
        nonlocal ok
        ok = ok and good
        print(f"{'ok' if good else 'FAIL':4} {line}", file=out)

    def as_int(meta, key):
        try:
            return int(meta[key])
        except (KeyError, ValueError):
            return None

    step = as_int(got_meta, "step")
    report(step is not None and step == as_int(want_meta, "step"),
           f"metadata step: {got_meta.get('step')!r}, torch's {want_meta.get('step')!r}")
    if "skipped" in want_meta:
        skipped = as_int(got_meta, "skipped")
        report(skipped is not None and skipped == as_int(want_meta, "skipped")
               and step is not None and skipped == iterations - step,
               f"metadata skipped: {got_meta.get('skipped')!r}, torch's "
               f"{want_meta['skipped']!r} (of {iterations} iterations)")
    if "loss_scale" in want_meta:
        # Exact: the same float64 value, however printed (Python's repr, Rust's `{}`).
        want = float(want_meta["loss_scale"])
        try:
            got = float(got_meta["loss_scale"])
        except (KeyError, ValueError):
            got = None
        hint = ""
        if got is not None and got != want and _f32(got) == want:
            hint = " (equal in f32: print the f32 scale widened to f64, not the f32 itself)"
        report(got == want, f"metadata loss_scale: {got_meta.get('loss_scale')!r}, torch's "
                            f"{want_meta['loss_scale']!r}{hint}")
    return ok


def compare(trace_path, result_path, expected_path, out=sys.stdout):
    """Compares a replay result with torch's; returns the worst error / tolerance ratio.

    Metadata: `step` equal; where torch's file has them, `skipped` equal (and = iterations -
    step) and `loss_scale` the same float64. Any of them off makes the ratio infinite.

    Tolerances (the README explains them; the Rust tests use the same):
      param:   steps * (2u * max|p| + 1e-4 * max lr)        absolute, per tensor
      moments: 1e-5 * max(max|want|, s) + 1e-5 * |want|     s = the largest |g| the tensor saw
                                                            (g^2 for exp_avg_sq, max_exp_avg_sq)
    where steps counts the applied steps, lr runs over their iterations, and g is the gradient
    the step sees (unscaled and clipped, `prestep`), plus Adam's coupled decay weight_decay * p.
    """
    trace, trace_meta = _load(trace_path)
    got, got_meta = _load(result_path)
    want, want_meta = _load(expected_path)
    config = json.loads(trace_meta["config"])
    names = sorted(k[len("param."):] for k in trace if k.startswith("param."))
    iterations = _iterations(trace)
    pre = prestep(trace, config)
    worst = 0.0
    skipping = "loss_scale" in config or config.get("skip_nonfinite", False)
    if not skipping and not all(math.isfinite(v) for v in pre["g_max"].values()):
        print("FAIL the trace holds an inf or NaN gradient without loss_scale or "
              "skip_nonfinite: a bad input", file=out)
        return float("inf")
    if not _check_metadata(got_meta, want_meta, iterations, out):
        worst = float("inf")
    # torch's own file against the spec's rule: a difference means the trace is one the
    # replay cannot match (say S < 1), whatever the result.
    spec = {"step": str(len(pre["applied"]))}
    if "skipped" in want_meta:
        spec["skipped"] = str(iterations - len(pre["applied"]))
    if "loss_scale" in want_meta:
        spec["loss_scale"] = repr(pre["final_scale"])
    if any(float(want_meta.get(k, "nan")) != float(v) for k, v in spec.items()):
        print(f"note torch's {({k: want_meta.get(k) for k in spec})} differ from the spec's "
              f"rule on this trace {spec}", file=out)
    steps = len(pre["applied"])
    if "lr" in trace:
        lr_max = max([float(trace["lr"][k - 1]) for k in pre["applied"]], default=0.0)
    else:
        lr_max = float(config.get("lr", 1e-3))
    wd = float(config.get("weight_decay", 0.0))
    for n in names:
        p_max = max(float(trace[f"param.{n}"].abs().max()), float(want[f"param.{n}"].abs().max())) \
            if trace[f"param.{n}"].numel() else 0.0
        g_max = pre["g_max"][n]
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
            # A NaN anywhere (err NaN) must fail: max() of a tensor propagates it, and the
            # comparison with 1 below is then False.
            ratio = float((err / tol.clamp_min(1e-45)).max()) if err.numel() else 0.0
            if math.isnan(ratio):
                ratio = float("inf")
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


def _warmup_cosine(optimizer, iterations):
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations - 3)],
        milestones=[3])


# The committed loss-scaling / skipping / clipping traces. Each: the optimizer; the GradScaler's
# arguments (None: no scaler), `fixed_scale` (a static scale: update(new_scale=init_scale));
# max_grad_norm; skip_nonfinite (without a scaler); a warmup + cosine schedule; `loss_mult`
# (the loss is multiplied by it, to size the gradients); `inject`: {iteration: (param, value)}
# written into element 0 of that param's gradient after backward. No scale below 1 (there the
# spec's found_inf, on the unscaled gradient, and torch's, on the scaled one, may differ) and
# none at 2^126 or above (1/S would be a float32 subnormal, which a GPU may flush to zero).
AMP_CASES = [
    # Overflow at the start: init_scale 2^120 makes the scaled gradients overflow float32 until
    # the scale has backed off (4 iterations); growth_interval 3 then grows it back into
    # overflow every 4th iteration, the last one included.
    {"name": "amp_adamw_overflow", "iterations": 16, "loss_mult": 2500.0,
     "optimizer": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
     "scaler": {"init_scale": 2.0 ** 120, "growth_interval": 3}},
    # Clipping to 1.0 after unscale_, an inf injected in a middle iteration, a NaN in the last.
    {"name": "amp_adam_clip", "iterations": 12, "loss_mult": 4.0,
     "optimizer": lambda ps: torch.optim.Adam(ps, lr=1e-2),
     "scaler": {"init_scale": 2.0 ** 16, "growth_interval": 4}, "max_grad_norm": 1.0,
     "inject": {6: ("encoder.0.weight", float("inf")), 12: ("head.bias", float("nan"))}},
    # Clipping alone (no scaler, nothing skipped) under a warmup + cosine schedule.
    {"name": "clip_adamw_schedule", "iterations": 12, "loss_mult": 2.0,
     "optimizer": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
     "max_grad_norm": 1.0, "schedule": True},
    # amsgrad with a fixed scale (dynamic false): the first iteration and a middle one skipped,
    # clipping at 0.5, L2 decay.
    {"name": "amp_static_adam_amsgrad", "iterations": 12, "loss_mult": 1.0,
     "optimizer": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3, amsgrad=True),
     "scaler": {"init_scale": 1024.0}, "fixed_scale": True, "max_grad_norm": 0.5,
     "inject": {1: ("temperature", float("-inf")), 7: ("head.weight", float("nan"))}},
    # Scales that are not powers of two: init_scale 1e30 is rounded to float32 (the config
    # records the rounded value), S = f32(f64(S) * factor) at every update, 1/S is inexact, and
    # a growth whose product overflows float32 (but not float64) is refused, twice (at 6:
    # 1e39; at 9: 4e38, just above float32's 3.4e38). The final scale tells S kept in f32 this
    # way from S kept in f64 (1.6e44) and from f32 * f32 products (another last digit).
    {"name": "amp_odd_factors", "iterations": 12, "loss_mult": 1.0,
     "optimizer": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99)),
     "scaler": {"init_scale": 1e30, "growth_factor": 1000.0, "backoff_factor": 0.4,
                "growth_interval": 2},
     "inject": {7: ("encoder.0.bias", float("inf")), 10: ("head.weight", float("inf"))}},
    # Skipping without a scaler (skip_nonfinite): the step is not called on a NaN iteration.
    {"name": "skip_adamw_nonfinite", "iterations": 10, "loss_mult": 1.0,
     "optimizer": lambda ps: torch.optim.AdamW(ps, lr=5e-3, amsgrad=True),
     "skip_nonfinite": True, "inject": {4: ("encoder.0.weight", float("nan"))}},
]


def record_amp_case(case, seed, out_dir):
    """Runs one AMP_CASES entry the way torch's AMP docs write the loop, and records it."""
    torch.manual_seed(seed)
    model = TinyModel()
    optimizer = case["optimizer"](model.parameters())
    iterations = case["iterations"]
    scheduler = _warmup_cosine(optimizer, iterations) if case.get("schedule") else None
    scaler = None
    if case.get("scaler") is not None:
        scaler = torch.amp.GradScaler("cpu", **case["scaler"])
    max_norm = case.get("max_grad_norm")
    recorder = TraceRecorder(model.named_parameters(), optimizer, scaler=scaler,
                             dynamic_scale=not case.get("fixed_scale", False),
                             max_grad_norm=max_norm,
                             skip_nonfinite=case.get("skip_nonfinite", False))
    for k, (x, y) in enumerate(tiny_batches(iterations, seed), 1):
        optimizer.zero_grad()
        loss = case["loss_mult"] * torch.nn.functional.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if k in case.get("inject", {}):
            name, value = case["inject"][k]
            with torch.no_grad():
                model.get_parameter(name).grad.view(-1)[0] = value
        finite = recorder.record_step()
        if scaler is not None:
            scaler.unscale_(optimizer)
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(optimizer)
            if case.get("fixed_scale"):
                scaler.update(new_scale=float(case["scaler"]["init_scale"]))
            else:
                scaler.update()
        elif finite:
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
    trace_path = os.path.join(out_dir, f"{case['name']}.trace.safetensors")
    expected_path = os.path.join(out_dir, f"{case['name']}.expected.safetensors")
    recorder.save(trace_path, expected_path)
    return recorder, trace_path, expected_path


def make_amp_test_data(out_dir):
    """Records AMP_CASES, checks torch's skips and scales against `prestep`, prints a table."""
    import io
    import warnings
    # A schedule stepped while the scaler skipped the optimizer's first step: torch warns, and
    # counts the iteration, as the spec does.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
    failures = []
    for i, case in enumerate(AMP_CASES):
        recorder, trace_path, expected_path = record_amp_case(case, 2024 + i, out_dir)
        trace, trace_meta = _load(trace_path)
        _, want_meta = _load(expected_path)
        pre = prestep(trace, json.loads(trace_meta["config"]))
        name = case["name"]
        skipped = [k for k, f in enumerate(recorder.found_inf, 1) if f]
        print(f"{name}: {len(recorder.grads)} iterations, skipped {skipped}, step "
              f"{want_meta['step']}, final loss_scale {want_meta.get('loss_scale')}")
        lrs = trace["lr"].tolist() if "lr" in trace else [None] * len(recorder.grads)
        for k in range(1, len(recorder.grads) + 1):
            s = pre["scale"][k - 1]
            norm, coef = pre["norm"][k - 1], pre["coef"][k - 1]
            print(f"  {k:2}: S {'-' if s is None else repr(s):>24}  "
                  f"{'skipped' if pre['found_inf'][k - 1] else 'applied'}  "
                  f"norm {'-' if norm is None else f'{norm:.4g}':>8}  "
                  f"coef {'-' if coef is None else f'{coef:.4g}':>7}  "
                  f"lr {'-' if lrs[k - 1] is None else f'{lrs[k - 1]:.4g}'}")
        # The spec's rule (with torch's float32 scale arithmetic) gives torch's skips and scales.
        if pre["found_inf"] != recorder.found_inf:
            failures.append(f"{name}: found_inf {pre['found_inf']}, torch {recorder.found_inf}")
        if recorder.scales and pre["scale"] != recorder.scales:
            failures.append(f"{name}: scales {pre['scale']}, torch {recorder.scales}")
        if recorder.scales and min(recorder.scales) < 1.0:
            failures.append(f"{name}: a scale below 1 ({min(recorder.scales)!r})")
        if recorder.scales and max(recorder.scales) >= 2.0 ** 126:
            # 1/S would be subnormal in float32, which a GPU may flush to zero.
            failures.append(f"{name}: a scale of 2^126 or more ({max(recorder.scales)!r})")
        if str(len(pre["applied"])) != want_meta["step"]:
            failures.append(f"{name}: applied {pre['applied']}, torch step {want_meta['step']}")
        if "loss_scale" in want_meta and (
                repr(pre["final_scale"]) != want_meta["loss_scale"]
                or str(pre["growth_tracker"]) != want_meta["growth_tracker"]):
            failures.append(f"{name}: final scale {pre['final_scale']!r} tracker "
                            f"{pre['growth_tracker']}, torch {want_meta['loss_scale']} "
                            f"{want_meta['growth_tracker']}")
        report = io.StringIO()
        if compare(trace_path, expected_path, expected_path, out=report) != 0.0:
            failures.append(f"{name}: torch's file against itself:\n{report.getvalue()}")
        for path in (trace_path, expected_path):
            print(f"  wrote {path} ({os.path.getsize(path)} bytes)")
    if failures:
        raise SystemExit("\n".join(failures))


def replay_in_torch(trace, config, step_skipped=False, **variant):
    """The trace replayed through torch's Adam/AdamW, the pre-step by `prestep` (the spec's
    rule): the result a correct replay writes. step_skipped=True (skipped iterations stepped
    with their non-finite values zeroed) and prestep's variants are wrong replays."""
    names = sorted(k[len("param."):] for k in trace if k.startswith("param."))
    params = {n: torch.nn.Parameter(trace[f"param.{n}"].clone()) for n in names}
    kind = torch.optim.AdamW if config["algorithm"] == "adamw" else torch.optim.Adam
    optimizer = kind(list(params.values()), lr=config["lr"], betas=tuple(config["betas"]),
                     eps=config["eps"], weight_decay=config["weight_decay"],
                     amsgrad=config["amsgrad"], maximize=config["maximize"], foreach=False)
    pre = prestep(trace, config, keep_grads=True, **variant)
    for k, grads in enumerate(pre["grads"], 1):
        if k not in pre["applied"] and not step_skipped:
            continue
        for n in names:
            params[n].grad = torch.nan_to_num(grads[n], nan=0.0, posinf=0.0, neginf=0.0)
        if "lr" in trace:
            optimizer.param_groups[0]["lr"] = float(trace["lr"][k - 1])
        optimizer.step()
    tensors = {}
    for n in names:
        state = optimizer.state.get(params[n]) or {}
        tensors[f"param.{n}"] = params[n].detach().clone()
        kinds = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if config["amsgrad"] else [])
        for kind in kinds:
            tensors[f"{kind}.{n}"] = state[kind].clone() if kind in state \
                else torch.zeros_like(params[n].detach())
    iterations = _iterations(trace)
    metadata = {"step": str(len(pre["applied"])),
                "skipped": str(iterations - len(pre["applied"])), "config": json.dumps(config)}
    if "loss_scale" in config:
        metadata["loss_scale"] = repr(pre["final_scale"])
    return tensors, metadata


def check_compare(data_dir):
    """`compare` on the committed files: torch's expected file as the result passes, copies with
    one thing wrong fail. Returns the list of checks that came out otherwise."""
    import io
    import tempfile
    import numpy as np
    wrong = []

    def run(case, label, tensors, metadata, should_pass):
        trace = os.path.join(data_dir, f"{case}.trace.safetensors")
        expected = os.path.join(data_dir, f"{case}.expected.safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "result.safetensors")
            save_file(tensors, path, metadata=metadata)
            report = io.StringIO()
            passed = compare(trace, path, expected, out=report) <= 1
        verdict = "as it should" if passed == should_pass else "WRONG"
        print(f"{case}: {label}: {'PASS' if passed else 'FAIL'} ({verdict})")
        if passed != should_pass:
            wrong.append(f"{case}: {label}\n{report.getvalue()}")

    # Every committed torch trace (the older ones too): its expected file passes as a result.
    cases = sorted(f[:-len(".expected.safetensors")] for f in os.listdir(data_dir)
                   if f.endswith(".expected.safetensors")
                   and os.path.exists(os.path.join(data_dir, f.replace(".expected.", ".trace."))))
    for case in cases:
        tensors, meta = _load(os.path.join(data_dir, f"{case}.expected.safetensors"))
        run(case, "torch's file as the result", tensors, meta, True)
    for case in (c["name"] for c in AMP_CASES):
        tensors, meta = _load(os.path.join(data_dir, f"{case}.expected.safetensors"))
        trace, trace_meta = _load(os.path.join(data_dir, f"{case}.trace.safetensors"))
        config = json.loads(trace_meta["config"])
        # The trace alone, replayed by the spec's rule (in torch), gives torch's result.
        run(case, "the trace replayed in torch by the spec's rule",
            *replay_in_torch(trace, config), True)
        if "max_grad_norm" in config:
            run(case, "replayed without clipping", *replay_in_torch(trace, config, clip=False),
                False)
        if "loss_scale" in config:
            # Powers of two keep S exact in f32: only the odd factors tell f32 from f64.
            run(case, "replayed with S kept in float64",
                *replay_in_torch(trace, config, f64_scale=True), case != "amp_odd_factors")
        if int(meta["skipped"]):
            # Right metadata, wrong tensors: the skipped iterations stepped (non-finite -> 0).
            stepped, _ = replay_in_torch(trace, config, step_skipped=True)
            run(case, "skipped iterations stepped (tensors only)", stepped, meta, False)
        step, skipped = int(meta["step"]), int(meta["skipped"])
        run(case, "step + 1", tensors, {**meta, "step": str(step + 1)}, False)
        run(case, "step + 1, skipped - 1", tensors,
            {**meta, "step": str(step + 1), "skipped": str(skipped - 1)}, False)
        run(case, "skipped + 1", tensors, {**meta, "skipped": str(skipped + 1)}, False)
        run(case, "no skipped", tensors, {k: v for k, v in meta.items() if k != "skipped"},
            False)
        if "loss_scale" in meta:
            s = float(meta["loss_scale"])
            run(case, "loss_scale printed as Rust's {} prints an f64", tensors,
                {**meta, "loss_scale": np.format_float_positional(s, unique=True, trim="-")},
                True)
            run(case, "loss_scale one f64 ulp up", tensors,
                {**meta, "loss_scale": repr(math.nextafter(s, math.inf))}, False)
            printed32 = repr(float(str(np.float32(s))))
            if float(printed32) != s:
                run(case, "loss_scale printed from the f32 (shortest f32 digits)", tensors,
                    {**meta, "loss_scale": printed32}, False)
            run(case, "loss_scale * 2", tensors, {**meta, "loss_scale": repr(s * 2)}, False)
            run(case, "no loss_scale", tensors,
                {k: v for k, v in meta.items() if k != "loss_scale"}, False)
        lr = float(trace["lr"].max()) if "lr" in trace else float(config["lr"])
        name = sorted(k for k in tensors if k.startswith("param."))[0]
        moved = tensors[name].clone()
        moved.view(-1)[0] += 0.1 * lr  # a tenth of one step's size
        run(case, f"{name}[0] + lr / 10", {**tensors, name: moved}, meta, False)
        key = name.replace("param.", "exp_avg.", 1)
        nan = tensors[key].clone()
        nan.view(-1)[0] = float("nan")
        run(case, f"{key}[0] = NaN", {**tensors, key: nan}, meta, False)
    return wrong


def main():
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_dir = os.path.join(repo_root, "tests", "data", "torch")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="compare a replay result with torch's expected file")
    c.add_argument("trace")
    c.add_argument("result")
    c.add_argument("expected")
    d = sub.add_parser("demo", help="record the tiny demo traces the tests replay")
    d.add_argument("--out", default=data_dir)
    a = sub.add_parser("make-amp-test-data",
                       help="record the loss-scaling, skipping and clipping traces")
    a.add_argument("--out", default=data_dir)
    k = sub.add_parser("check-compare", help="check `compare` on the committed AMP files")
    k.add_argument("--data", default=data_dir)
    args = ap.parse_args()
    if args.command == "compare":
        sys.exit(0 if compare(args.trace, args.result, args.expected) <= 1 else 1)
    if args.command == "check-compare":
        wrong = check_compare(args.data)
        print("\n".join(wrong) if wrong else "compare: every check came out as it should")
        sys.exit(1 if wrong else 0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} (python {sys.version.split()[0]})")
    os.makedirs(args.out, exist_ok=True)
    if args.command == "demo":
        demo(args.out)
    else:
        make_amp_test_data(args.out)


if __name__ == "__main__":
    main()
