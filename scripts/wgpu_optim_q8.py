#!/usr/bin/env python3
"""q8 optimizer state of wgpu-optim checkpoints, dequantised in pure Python (no torch, no numpy).

A checkpoint (docs/checkpoint-format.md) stores a q8 state `<state>` of parameter `<name>` as
U8 codes `<state>.<name>` (one per element), F32 `<state>_absmax.<name>` (one per block of 256
elements, from the parameter's first) and the metadata `q8_maps`, a JSON object naming each q8
state's map: `dynamic_signed` for exp_avg, `dynamic_unsigned` for exp_avg_sq and
max_exp_avg_sq. Element i holds

    f32(map[codes[i]] * absmax[i // 256])

the f32 product of two f32 values, as src/dtype/q8.rs `Map::value` and the kernel compute it.
The maps are bitsandbytes' dynamic maps, computed exactly as src/dtype/q8.rs `dynamic_map`: in
f64, each entry rounded once to f32, sorted ascending.

Here the product is formed in Python floats (f64), where it is exact (two 24-bit significands
make at most 48 bits, and f64's exponent range holds every product of two f32), then rounded
once to f32 by `array("f")` (C's double-to-float conversion, round to nearest even): that is
the correctly rounded f32 product, subnormal results included.

scripts/torch_checkpoint.py uses `dequantize` to load q8 states into torch as f32. The
command line checks this module against a file written by wgpu-optim:

    python3 scripts/wgpu_optim_q8.py check CHECKPOINT EXPECTED
        CHECKPOINT: a checkpoint with q8 states; EXPECTED: a safetensors file with F32
        `<state>.<name>` (the optimizer's own dequantised state, Optimizer::read_state) and
        `map.dynamic_signed` / `map.dynamic_unsigned` (q8::Map values). Compares bit for bit;
        exits 1 on any difference. tests/checkpoint.rs writes both files and runs this when
        python3 is on the PATH.
"""

import array
import json
import struct
import sys

BLOCK = 256
# The map each q8 state uses (src/dtype/q8.rs, Map::for_state).
STATE_MAPS = {"exp_avg": "dynamic_signed", "exp_avg_sq": "dynamic_unsigned",
              "max_exp_avg_sq": "dynamic_unsigned"}
_DTYPE_KEYS = {"exp_avg": "exp_avg_dtype", "exp_avg_sq": "exp_avg_sq_dtype",
               "max_exp_avg_sq": "exp_avg_sq_dtype"}


def dynamic_map(signed):
    """bitsandbytes' create_dynamic_map(signed) with 7 exponent bits, as src/dtype/q8.rs builds
    it: for each exponent i in 0..7, 10^(i - 6) times the midpoints of linspace(0.1, 1, n + 1),
    n = 2^i (signed, both signs) or 2^(i + 1) (unsigned), then 0 and 1; computed in f64,
    rounded once to f32, sorted. Returns 256 Python floats, each exactly an f32."""
    data = []
    for i in range(7):
        n = 1 << i if signed else 1 << (i + 1)
        # 10^(i - 6): 1 / 10^(6 - i), the integer power exact, one correctly rounded division
        # (Rust's powi computes the same).
        scale = 1.0 / float(10 ** (6 - i))
        for k in range(n):
            lo = 0.1 + 0.9 * k / n
            hi = 0.1 + 0.9 * (k + 1) / n
            mean = (lo + hi) / 2.0
            data.append(scale * mean)
            if signed:
                data.append(-scale * mean)
    data += [0.0, 1.0]
    if len(data) != 256:
        raise AssertionError(f"the map has {len(data)} entries, not 256")
    return sorted(array.array("f", data).tolist())


MAPS = {"dynamic_signed": dynamic_map(True), "dynamic_unsigned": dynamic_map(False)}


def blocks(length):
    """Blocks of a tensor of `length` elements."""
    return (length + BLOCK - 1) // BLOCK


def dequantize(codes, absmax, map_name):
    """The f32 values of one q8 state: `codes` (bytes-like, one per element), `absmax` (one
    float per block, each an f32 value), `map_name` (a key of MAPS). Returns array("f")."""
    if map_name not in MAPS:
        raise ValueError(f"unknown q8 map {map_name!r} (known: {sorted(MAPS)})")
    codes = bytes(codes)
    if len(absmax) != blocks(len(codes)):
        raise ValueError(f"{len(absmax)} absmax values for {len(codes)} codes; expected "
                         f"{blocks(len(codes))}, one per block of {BLOCK}")
    table = MAPS[map_name]
    out = array.array("f")
    for b, a in enumerate(absmax):
        a = float(a)
        # Exact f64 products, each rounded once to f32 by array("f").
        out.extend(array.array("f", [table[c] * a for c in codes[b * BLOCK:(b + 1) * BLOCK]]))
    return out


def q8_states(config):
    """The states a checkpoint's config (a dict) stores as q8."""
    return [kind for kind in STATE_MAPS
            if (kind != "max_exp_avg_sq" or config.get("amsgrad", False))
            and config.get(_DTYPE_KEYS[kind], "f32") == "q8"]


def check_q8_maps(config, metadata, where):
    """Checks the metadata `q8_maps` against the config's q8 states (each state's own map);
    returns the q8 states. Raises ValueError naming `where`."""
    kinds = q8_states(config)
    if not kinds:
        return kinds
    want = {kind: STATE_MAPS[kind] for kind in kinds}
    text = metadata.get("q8_maps")
    if text is None:
        raise ValueError(f"{where}: metadata q8_maps is missing (the config has q8 states)")
    try:
        got = json.loads(text)
    except ValueError:
        got = None
    if got != want:
        raise ValueError(f"{where}: metadata q8_maps is {text}, expected {json.dumps(want)}")
    return kinds


def read_safetensors(path):
    """A safetensors file: {name: (dtype, shape, bytes)}, metadata."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        tensors[name] = (t["dtype"], t["shape"], data[base + start:base + end])
    return tensors, metadata


def _f32(raw):
    """Little-endian F32 bytes as array("f")."""
    out = array.array("f")
    out.frombytes(raw)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def _product(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def checkpoint_q8_values(tensors, metadata, where):
    """Every q8 state of a checkpoint read by `read_safetensors`, checked (q8_maps, codes U8,
    absmax F32 of shape [blocks]) and dequantised: {"<state>.<name>": array("f")}."""
    config = json.loads(metadata["config"])
    names = json.loads(metadata["param_names"])
    out = {}
    for kind in check_q8_maps(config, metadata, where):
        for name in names:
            key, absmax_key = f"{kind}.{name}", f"{kind}_absmax.{name}"
            for k in (key, absmax_key):
                if k not in tensors:
                    raise ValueError(f"{where}: {k} is missing")
            dtype, shape, codes = tensors[key]
            if dtype != "U8":
                raise ValueError(f"{where}: {key} has dtype {dtype}, expected U8 (q8 codes)")
            a_dtype, a_shape, a_raw = tensors[absmax_key]
            if a_dtype != "F32" or a_shape != [blocks(_product(shape))]:
                raise ValueError(f"{where}: {absmax_key} is {a_dtype} {a_shape}, expected F32 "
                                 f"[{blocks(_product(shape))}]")
            out[key] = dequantize(codes, _f32(a_raw), STATE_MAPS[kind])
    return out


def _bits(values):
    """f32 values as their bits, NaNs made one NaN."""
    return [0x7fc00000 if v != v else struct.unpack("<I", struct.pack("<f", v))[0]
            for v in values]


def check(checkpoint, expected):
    tensors, metadata = read_safetensors(checkpoint)
    want, _ = read_safetensors(expected)
    ok = True
    for name, values in MAPS.items():
        dtype, _, raw = want[f"map.{name}"]
        same = dtype == "F32" and _bits(values) == _bits(_f32(raw))
        ok &= same
        print(f"map {name}: {'same bits' if same else 'DIFFERS'}")
    got = checkpoint_q8_values(tensors, metadata, checkpoint)
    if not got:
        print("no q8 state in the checkpoint")
        ok = False
    for key, values in sorted(got.items()):
        dtype, _, raw = want[key]
        w = _f32(raw)
        bad = [i for i, (a, b) in enumerate(zip(_bits(values), _bits(w))) if a != b]
        same = dtype == "F32" and len(values) == len(w) and not bad
        ok &= same
        detail = "" if same else f" (first at {bad[:1]}, {len(bad)} in all)"
        print(f"{key}: {len(values)} values, {'same bits' if same else 'DIFFER'}{detail}")
    print("PASS" if ok else "FAIL")
    return ok


def main():
    if len(sys.argv) != 4 or sys.argv[1] != "check":
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if check(sys.argv[2], sys.argv[3]) else 1)


if __name__ == "__main__":
    main()
