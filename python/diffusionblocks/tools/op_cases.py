"""The ops' robustness cases: a matrix of bad (and odd but valid) inputs, a fuzz space of
random valid ones, and `run(case, path)`, which runs one case in this process and
classifies the outcome against the float64 reference.

Paths: 'public' is diffusionblocks_ext.<op> (the compiled kernels when loaded, else the
reference); 'reference' is diffusionblocks_ext.reference.<op>; 'dispatcher' is
torch.ops.diffusionblocks.<op> with its registered autograd (when the extension is loaded).
Each input on each path has one outcome:
  correct    a result, and gradients when asked, equal to the float64 reference within the
             output dtype's rounding (plus the working precision times the size of the terms)
  error      a ValueError/RuntimeError whose first line starts with the argument's name and
             what was expected, and is the same text as the reference's
  bad_error  any other exception, another text than the reference's, or an error where a
             result was expected
  wrong      a value off the float64 reference (a silently wrong value), or a result where
             an error was expected (a bad input silently accepted)
  crash      the worker process died (segfault, abort) or hung (counted by robustness.py)

tests/test_bad_inputs.py (the matrix) and tests/test_fuzz.py (hypothesis over fuzz_case)
run these cases in-process; `python -m diffusionblocks.tools.robustness` runs them in
worker subprocesses, so that a crash is counted instead of ending the run."""

import contextlib
import dataclasses
import math
import random
from typing import Callable

import torch

from diffusionblocks_ext import _checks, ops, reference
from diffusionblocks_ext._philox import as_int64
from diffusionblocks_ext.reference import P_MEAN, P_STD, SIGMA_DATA, acc_dtype, broadcast_rows

FLOAT_DTYPES = _checks.FLOAT_DTYPES
ALL_PATHS = ("public", "reference", "dispatcher")
OUTCOMES = ("correct", "error", "bad_error", "wrong", "crash")


def available_paths() -> tuple:
    """Without the extension 'public' is the reference itself and there is no dispatcher op."""
    return ALL_PATHS if ops.HAS_EXT else ("public",)


# ------------------------------------------------------------------ inputs

def make(shape, dtype=torch.float32, layout="contiguous", gen=None, low=-2.0, high=2.0, device="cpu"):
    """Random values in [low, high) with `shape`, laid out in memory as `layout` says:
    contiguous, transposed (last two dims), strided (every other element of the last dim),
    expanded (stride 0 over dim 0), offset (a slice starting one row in) or channels_last
    (4-d). Always a view of a fresh contiguous base, so a leaf of the same geometry can be
    rebuilt for gradients (see _leaf)."""
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base_shape, view = shape[:-2] + (shape[-1], shape[-2]), lambda b: b.transpose(-1, -2)
    elif layout == "strided" and len(shape) >= 1:
        base_shape, view = shape[:-1] + (2 * shape[-1],), lambda b: b[..., ::2]
    elif layout == "expanded" and len(shape) >= 1:
        base_shape, view = (1,) + shape[1:], lambda b: b.expand(shape)
    elif layout == "offset" and len(shape) >= 1:
        base_shape, view = (shape[0] + 1,) + shape[1:], lambda b: b[1:]
    elif layout == "channels_last" and len(shape) == 4:
        n, c, h, w = shape
        base_shape, view = (n, h, w, c), lambda b: b.permute(0, 3, 1, 2)
    else:
        base_shape, view = shape, lambda b: b
    values = torch.rand(base_shape, dtype=torch.float64, generator=gen) * (high - low) + low
    return view(values.to(dtype).to(device))


def make_sigma(n, gen, low=0.002, high=80.0, dtype=torch.float32, layout="contiguous", device="cpu"):
    """Per-example σ spread log-uniformly over [low, high]."""
    log_sigma = make((n,), torch.float64, layout, gen, math.log(low), math.log(high))
    return torch.exp(log_sigma).to(dtype).to(device)


def make_target(shape, classes, gen, ignore_every=0, ignore_index=-100):
    """Class indices in [0, classes), every `ignore_every`-th position set to ignore_index."""
    target = make(shape, torch.float64, "contiguous", gen, 0, classes).floor().long().clamp(max=classes - 1)
    if ignore_every:
        target.view(-1)[::ignore_every] = ignore_index
    return target


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def _leaf(t: torch.Tensor, dtype=None, requires_grad=False):
    """(leaf, view): a fresh copy of t's base as a leaf (optionally in another dtype) and a
    view of it with t's sizes, strides and offset, so each path gets its own inputs and
    gradients flow through the same memory layout into a leaf."""
    base = _root(t)
    leaf = base.detach().to(dtype or base.dtype, copy=True).contiguous().requires_grad_(requires_grad)
    return leaf, leaf.as_strided(t.size(), t.stride(), t.storage_offset() - base.storage_offset())


# ------------------------------------------------------------------ cases

@dataclasses.dataclass
class Case:
    op: str              # public op name, or a dispatcher-only op (sample_sigma_, *_backward)
    name: str            # what is tried, unique per op
    build: Callable      # build(gen) -> keyword arguments of the op
    expect: str | None = None   # None: a result; else how the error's first line starts
    grad: tuple = ()     # arguments whose leaves require grad; their gradients are compared
    no_grad: bool = False  # run under torch.no_grad()
    paths: tuple = ALL_PATHS
    seed: int = 0
    needs_cuda: bool = False  # mixed-device cases: skipped without a GPU

    @property
    def id(self) -> str:
        return f"{self.op}: {self.name}"


# The state tensors and σ vectors of each elementwise op, and its other arguments.
STATE_OPS = {
    "add_noise": (("y",), ("sigma",), {"seed": 5, "offset": 3}),
    "denoise": (("F", "z"), ("sigma",), {}),
    "euler_step": (("z", "F"), ("sigma", "sigma_next"), {}),
    "heun_step": (("z", "F", "z_euler", "F_euler"), ("sigma", "sigma_next"), {}),
    "edm_loss": (("F", "z", "y"), ("sigma",), {}),
}
OPS = ("sample_sigma",) + tuple(STATE_OPS) + ("weighted_cross_entropy",)
FLOAT_MSG = "expected a floating-point tensor (float32, float64, bfloat16 or float16), got "


def _state_kwargs(op, gen, n=3, trailing=(5,), dtype=torch.float32, layouts=None, sigma_dtype=torch.float32,
                  sigma_layout="contiguous", sigma_range=(0.002, 80.0), device="cpu"):
    data, sigmas, extra = STATE_OPS[op]
    layouts = layouts or {}
    kw = dict(extra)
    for name in data:
        kw[name] = make((n, *trailing), dtype, layouts.get(name, "contiguous"), gen, device=device)
    for name in sigmas:
        kw[name] = make_sigma(n, gen, *sigma_range, dtype=sigma_dtype, layout=sigma_layout, device=device)
    return kw


def _replace(name, value_fn):
    """A change of one argument: value_fn(kwargs, gen) -> new value."""
    def change(kw, gen):
        kw[name] = value_fn(kw, gen)
        return kw
    return change


def _set_middle(name, value, dtype=None):
    """A change setting the middle example of the vector `name` to `value` (the others stay
    valid), optionally in another dtype."""
    def change(kw, gen):
        vector = kw[name].to(dtype or kw[name].dtype, copy=True)
        vector[len(vector) // 2] = value
        kw[name] = vector
        return kw
    return change


def _state_cases(op):
    data, sigmas, _ = STATE_OPS[op]
    first, others = data[0], data[1:]
    cases = []

    def add(name, change=None, expect=None, grad=(), no_grad=False, paths=ALL_PATHS, needs_cuda=False, **base):
        def build(gen):
            kw = _state_kwargs(op, gen, **base)
            return change(kw, gen) if change else kw
        cases.append(Case(op, name, build, expect, tuple(grad), no_grad, paths, needs_cuda=needs_cuda))

    # Valid inputs: dtypes, shapes, layouts.
    for dtype in FLOAT_DTYPES:
        add(f"valid {_checks.dtype_name(dtype)}", dtype=dtype)
    add("N = 1", n=1)
    add("N = 0", n=0)
    add("N = 0 with 3 trailing dims", n=0, trailing=(2, 3, 4))
    add("trailing dim of size 0", trailing=(0,))
    add("1-d inputs [N]", trailing=())
    add("4-d inputs", n=2, trailing=(3, 4, 5))
    # 39003 elements: above the kernels' grain (32768), so two threads split the range mid-row.
    add("rows split across threads", trailing=(13001,))
    for name in data:
        for layout in ("transposed", "strided", "expanded", "offset"):
            add(f"{name} {layout}", trailing=(4, 6), layouts={name: layout})
    add(f"{first} channels_last 4-d", n=2, trailing=(3, 4, 5), layouts={first: "channels_last"})
    add("every input expanded (stride 0)", layouts={name: "expanded" for name in data}, sigma_layout="expanded")
    add("float16 at sigma 1e6 (overflows to inf like the reference)", dtype=torch.float16,
        change=_replace(sigmas[0], lambda kw, g: torch.full_like(kw[sigmas[0]], 1e6)))
    add(f"NaN in {first}", change=_replace(first, lambda kw, g: kw[first].index_fill(1, torch.tensor([2]),
                                                                                     float("nan"))))
    add(f"inf in {first}", change=_replace(first, lambda kw, g: kw[first].index_fill(1, torch.tensor([1]),
                                                                                     float("inf"))))
    # Bad dtypes and shapes.
    for dtype in (torch.int32, torch.int64, torch.bool, torch.complex64):
        add(f"{first} {dtype}", change=_replace(first, lambda kw, g, d=dtype: kw[first].to(d)),
            expect=f"{first}: " + FLOAT_MSG)
    add(f"{first} 0-d", change=_replace(first, lambda kw, g: kw[first][0, 0]),
        expect=f"{first}: expected at least 1 dimension [N, ...], got a 0-d tensor")
    for name in others:
        add(f"{name} float64 where {first} is float32", change=_replace(name, lambda kw, g, k=name: kw[k].double()),
            expect=f"{name}: expected dtype float32 like {first}, got float64")
        add(f"{name} int64", change=_replace(name, lambda kw, g, k=name: kw[k].long()),
            expect=f"{name}: expected dtype float32 like {first}, got int64")
        add(f"{name} with one example more", change=_replace(name, lambda kw, g, k=name: torch.cat([kw[k], kw[k][:1]])),
            expect=f"{name}: expected shape [3, 5] like {first}, got [4, 5]")
        add(f"{name} with another trailing shape", change=_replace(name, lambda kw, g, k=name: kw[k][:, :4]),
            expect=f"{name}: expected shape [3, 5] like {first}, got [3, 4]")
        add(f"{name} broadcastable but not equal [1, 5]", change=_replace(name, lambda kw, g, k=name: kw[k][:1]),
            expect=f"{name}: expected shape [3, 5] like {first}, got [1, 5]")
        add(f"{name} 0-d", change=_replace(name, lambda kw, g, k=name: kw[k][0, 0]),
            expect=f"{name}: expected shape [3, 5] like {first}, got []")
    # σ: dtype, length, values, layout, gradients.
    for s in sigmas:
        allow_zero = op == "euler_step" and s == "sigma_next"
        add(f"{s} int64", change=_replace(s, lambda kw, g, k=s: torch.ones(3, dtype=torch.int64)),
            expect=f"{s}: " + FLOAT_MSG + "int64")
        add(f"{s} bool", change=_replace(s, lambda kw, g, k=s: torch.ones(3, dtype=torch.bool)),
            expect=f"{s}: " + FLOAT_MSG + "bool")
        for label, fn, got in [("N - 1 values", lambda t: t[:2], "[2]"), ("N + 1 values", lambda t: torch.cat([t, t[:1]]), "[4]"),
                               ("shape [N, 1]", lambda t: t[:, None], "[3, 1]"), ("0-d", lambda t: t[0], "[]")]:
            add(f"{s} {label}", change=_replace(s, lambda kw, g, k=s, f=fn: f(kw[k])),
                expect=f"{s}: expected shape [N] with N = 3 (the leading dim of {first}), got {got}")
        add(f"{s} = 0", change=_set_middle(s, 0.0),
            expect=None if allow_zero else f"{s}: expected every value > 0 and finite")
        sign = ">= 0" if allow_zero else "> 0"
        for label, v in [("< 0", -0.5), ("NaN", float("nan")), ("+inf", float("inf")), ("-inf", float("-inf"))]:
            add(f"{s} {label}", change=_set_middle(s, v), expect=f"{s}: expected every value {sign} and finite")
        add(f"{s} +inf in float16", change=_set_middle(s, float("inf"), torch.float16),
            expect=f"{s}: expected every value {sign} and finite")
        add(f"{s} = 1e6", change=_set_middle(s, 1e6))
        add(f"{s} = 1e18 (the largest accepted)", change=_set_middle(s, 1e18), dtype=torch.float64)
        add(f"{s} = 1e20 (sigma^2 overflows float32)", change=_set_middle(s, 1e20),
            expect=f"{s}: expected every value <= 1e+18 (larger values overflow float32 arithmetic)")
        add(f"{s} = 1e-30", change=_set_middle(s, 1e-30))
        add(f"{s} float64 for float32 data", change=_replace(s, lambda kw, g, k=s: kw[k].double()))
        add(f"{s} bfloat16 for float64 data", dtype=torch.float64,
            change=_replace(s, lambda kw, g, k=s: kw[k].bfloat16()))
        add(f"{s} float16 for bfloat16 data", dtype=torch.bfloat16, change=_replace(s, lambda kw, g, k=s: kw[k].half()))
        add(f"{s} strided", change=_replace(s, lambda kw, g, k=s: make_sigma(3, g, layout="strided")))
        add(f"{s} expanded (stride 0)", change=_replace(s, lambda kw, g, k=s: make_sigma(3, g, layout="expanded")))
        add(f"{s} requires grad", grad=(s,), expect=f"{s}: gradients with respect to {s} are not supported")
        add(f"{s} requires grad under no_grad", grad=(s,), no_grad=True)
        add(f"{s} on meta", change=_replace(s, lambda kw, g, k=s: kw[k].to("meta")),
            expect=f"{s}: expected a tensor on cpu like {first}, got meta")
        add(f"{s} on cuda", change=_replace(s, lambda kw, g, k=s: kw[k].cuda()), needs_cuda=True,
            expect=f"{s}: expected a tensor on cpu like {first}, got cuda:0")
    # Devices: the first argument decides where the op runs; every other must follow it.
    follower = others[0] if others else sigmas[0]
    add(f"{first} on meta, the rest on cpu", change=_replace(first, lambda kw, g: kw[first].to("meta")),
        expect=f"{follower}: expected a tensor on meta like {first}, got cpu")
    if others:
        add(f"{others[0]} on meta", change=_replace(others[0], lambda kw, g: kw[others[0]].to("meta")),
            expect=f"{others[0]}: expected a tensor on cpu like {first}, got meta")
    add("every input on meta (shapes only)", device="meta")
    add(f"{first} on cuda, the rest on cpu", change=_replace(first, lambda kw, g: kw[first].cuda()),
        needs_cuda=True, expect=f"{follower}: expected a tensor on cuda:0 like {first}, got cpu")
    add("every input on cuda", device="cuda", grad=data, needs_cuda=True)
    # sigma_data.
    for v, text in [(0.0, "0"), (-1.0, "-1"), (float("nan"), "nan"), (float("inf"), "inf")]:
        add(f"sigma_data = {text}", change=_replace("sigma_data", lambda kw, g, v=v: v),
            expect=f"sigma_data: expected a positive finite number, got {text}")
    add("sigma_data as a string", change=_replace("sigma_data", lambda kw, g: "0.5"),
        expect="sigma_data: expected a positive finite number, got str", paths=("public", "reference"))
    add("sigma_data = 2", change=_replace("sigma_data", lambda kw, g: 2))
    # Gradients: every subset that matters, dtypes, layouts.
    add("gradients to every input", grad=data)
    for name in data:
        add(f"gradient to {name} only", grad=(name,))
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        add(f"gradients to every input, {_checks.dtype_name(dtype)}", grad=data, dtype=dtype)
    add("gradients through expanded inputs", grad=data, layouts={name: "expanded" for name in data})
    add("gradients through transposed inputs", grad=data, trailing=(4, 6),
        layouts={name: "transposed" for name in data})
    add("gradients with N = 0", grad=data, n=0)
    add("gradients at sigma = 1e6", grad=data, change=_set_middle(sigmas[0], 1e6))
    if op in ("euler_step", "heun_step"):
        add("denoised=True", change=_replace("denoised", lambda kw, g: True))
        add("denoised=True with gradients", grad=data, change=_replace("denoised", lambda kw, g: True))
    return cases


def _cross_entropy_cases():
    op = "weighted_cross_entropy"
    cases = []

    def add(name, change=None, expect=None, grad=(), no_grad=False, paths=ALL_PATHS, n=3, t=None, c=7,
            dtype=torch.float32, layout="contiguous", ignore_every=0, ignore_index=-100, device="cpu",
            needs_cuda=False):
        def build(gen):
            shape = (n, c) if t is None else (n, t, c)
            kw = dict(logits=make(shape, dtype, layout, gen, -8, 8, device=device),
                      target=make_target(shape[:-1], c, gen, ignore_every, ignore_index).to(device),
                      weight=make_sigma(n, gen, 0.1, 3.0, device=device), ignore_index=ignore_index)
            return change(kw, gen) if change else kw
        cases.append(Case(op, name, build, expect, tuple(grad), no_grad, paths, needs_cuda=needs_cuda))

    for dtype in FLOAT_DTYPES:
        add(f"valid [N, C] {_checks.dtype_name(dtype)}", dtype=dtype, grad=("logits",))
        add(f"valid [N, T, C] with ignored positions {_checks.dtype_name(dtype)}", dtype=dtype, t=4,
            ignore_every=3, grad=("logits",))
    add("ignore_index = 2 (a valid class)", t=4, ignore_every=2, ignore_index=2, grad=("logits",))
    add("every position ignored", t=3, ignore_every=1, grad=("logits",))
    add("C = 1", c=1, grad=("logits",))
    add("N = 0", n=0, grad=("logits",))
    add("T = 0", t=0, grad=("logits",))
    add("C = 3000 (multi-threaded rows)", c=3000, t=20, grad=("logits",))
    for layout in ("transposed", "strided", "expanded", "offset"):
        add(f"logits {layout}", t=4, layout=layout, grad=("logits",))
    add("target expanded", change=_replace("target", lambda kw, g: kw["target"][:1].expand(3)))
    add("target strided", change=_replace("target", lambda kw, g: make_target((3, 8), 7, g)[:, ::2]), t=4)
    add("weight expanded", change=_replace("weight", lambda kw, g: make_sigma(3, g, 0.1, 3.0, layout="expanded")))
    add("weight float64", change=_replace("weight", lambda kw, g: kw["weight"].double()))
    add("weight bfloat16 for float16 logits", dtype=torch.float16,
        change=_replace("weight", lambda kw, g: kw["weight"].bfloat16()))
    add("weight negative and zero", change=_replace("weight", lambda kw, g: torch.tensor([-1.0, 0.0, 2.0])))
    add("weight NaN", change=_replace("weight", lambda kw, g: torch.tensor([1.0, float("nan"), 2.0])))
    add("weight requires grad", grad=("weight",), expect="weight: gradients with respect to weight are not supported")
    add("weight requires grad under no_grad", grad=("weight",), no_grad=True)
    add("NaN logit", grad=("logits",), change=_replace("logits", lambda kw, g: kw["logits"].index_fill(
        1, torch.tensor([3]), float("nan"))))
    add("-inf logit on other classes", grad=("logits",), change=_replace("logits", lambda kw, g: torch.where(
        torch.arange(7) == kw["target"][:, None], kw["logits"], torch.tensor(float("-inf")))))
    add("+inf logit", change=_replace("logits", lambda kw, g: kw["logits"].index_fill(1, torch.tensor([0]),
                                                                                      float("inf"))))
    add("logits of +-1e4 (a stable logsumexp)", grad=("logits",), change=_replace("logits", lambda kw, g: kw["logits"] * 1250))
    for dtype in (torch.int64, torch.bool):
        add(f"logits {dtype}", change=_replace("logits", lambda kw, g, d=dtype: kw["logits"].to(d)),
            expect="logits: " + FLOAT_MSG)
    for label, fn, got in [("1-d", lambda x: x[0], "[7]"), ("4-d", lambda x: x[:, None, None], "[3, 1, 1, 7]"),
                           ("0-d", lambda x: x[0, 0], "[]")]:
        add(f"logits {label}", change=_replace("logits", lambda kw, g, f=fn: f(kw["logits"])),
            expect=f"logits: expected shape [N, C] or [N, T, C], got {got}")
    add("C = 0", change=_replace("logits", lambda kw, g: kw["logits"][:, :0]),
        expect="logits: expected at least one class (C >= 1), got C = 0")
    for dtype in (torch.int32, torch.float32, torch.bool):
        add(f"target {dtype}", change=_replace("target", lambda kw, g, d=dtype: kw["target"].to(d)),
            expect="target: expected an int64 tensor of class indices, got ")
    add("target with another shape", change=_replace("target", lambda kw, g: kw["target"][:2]),
        expect="target: expected shape [3] (logits without its class dim), got [2]")
    add("target 0-d", change=_replace("target", lambda kw, g: kw["target"][0]),
        expect="target: expected shape [3] (logits without its class dim), got []")
    for v in (7, -1, 2**40):
        add(f"target value {v}", change=_replace("target", lambda kw, g, v=v: kw["target"].index_fill(0, torch.tensor([1]), v)),
            expect="target: expected class indices in [0, 7) or ignore_index = -100")
    add("target on meta", change=_replace("target", lambda kw, g: kw["target"].to("meta")),
        expect="target: expected a tensor on cpu like logits, got meta")
    add("weight int64", change=_replace("weight", lambda kw, g: torch.ones(3, dtype=torch.int64)),
        expect="weight: " + FLOAT_MSG + "int64")
    for label, fn, got in [("N - 1 values", lambda w: w[:2], "[2]"), ("shape [N, 1]", lambda w: w[:, None], "[3, 1]"),
                           ("0-d", lambda w: w[0], "[]")]:
        add(f"weight {label}", change=_replace("weight", lambda kw, g, f=fn: f(kw["weight"])),
            expect=f"weight: expected shape [N] with N = 3 (the leading dim of logits), got {got}")
    add("weight on meta", change=_replace("weight", lambda kw, g: kw["weight"].to("meta")),
        expect="weight: expected a tensor on cpu like logits, got meta")
    add("logits on meta, the rest on cpu", change=_replace("logits", lambda kw, g: kw["logits"].to("meta")),
        expect="target: expected a tensor on meta like logits, got cpu")
    add("every input on meta (shapes only)", device="meta")
    add("weight on cuda", change=_replace("weight", lambda kw, g: kw["weight"].cuda()), needs_cuda=True,
        expect="weight: expected a tensor on cpu like logits, got cuda:0")
    add("every input on cuda", device="cuda", t=4, ignore_every=3, grad=("logits",), needs_cuda=True)
    return cases


def _sample_sigma_cases():
    op = "sample_sigma"
    cases = []
    python_only = ("public", "reference")  # arguments the dispatcher schema does not have

    def add(name, expect=None, paths=ALL_PATHS, needs_cuda=False, **kw):
        base = dict(n=64, sigma_lo=0.002, sigma_hi=80.0, seed=11, offset=2)
        base.update(kw)
        cases.append(Case(op, name, lambda gen, kw=base: dict(kw), expect, (), False, paths, needs_cuda=needs_cuda))

    for dtype in FLOAT_DTYPES:
        add(f"valid {_checks.dtype_name(dtype)}", dtype=dtype)
    add("n = 0", n=0)
    add("n = 1", n=1)
    add("n = 5000 (multi-threaded)", n=5000, dtype=torch.float64)
    add("sigma_lo = sigma_hi", sigma_lo=0.3, sigma_hi=0.3, dtype=torch.float64)
    add("the upper tail [79, 80]", sigma_lo=79.0, sigma_hi=80.0, dtype=torch.float64)
    add("far upper tail [1e5, 1e6]", sigma_lo=1e5, sigma_hi=1e6, dtype=torch.float64)
    add("far lower tail [1e-6, 1e-5]", sigma_lo=1e-6, sigma_hi=1e-5, dtype=torch.float64)
    add("sigma_hi = 1e6 in float16 (inf like the reference)", sigma_lo=1e5, sigma_hi=1e6, dtype=torch.float16)
    add("p_mean = 2, p_std = 3", p_mean=2.0, p_std=3.0, dtype=torch.float64)
    add("seed and offset 2**64 - 1", seed=2**64 - 1, offset=2**64 - 1)
    add("on meta (shapes only)", device="meta")
    add("on cuda", device="cuda", dtype=torch.float64, needs_cuda=True)
    for n in (-1, 2.5, True, "3"):
        add(f"n = {n!r}", n=n, expect="n: expected an integer >= 0, got ", paths=python_only)
    for lo, hi in [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0), (0.1, float("inf"))]:
        add(f"sigma_lo = {lo}, sigma_hi = {hi}", sigma_lo=lo, sigma_hi=hi,
            expect="sigma_lo, sigma_hi: expected 0 < sigma_lo <= sigma_hi, both finite, got ")
    add("a range with no mass in float64 [1e-300, 1e-290]", sigma_lo=1e-300, sigma_hi=1e-290,
        expect="sigma_lo, sigma_hi: expected a range with probability > 0 under the log-normal")
    add("sigma_lo as a tensor", sigma_lo=torch.tensor(0.1), expect="sigma_lo: expected a number, got Tensor",
        paths=python_only)
    for v in (0.0, -1.0, float("nan")):
        add(f"p_std = {v}", p_std=v, expect="p_std: expected a positive finite number, got ")
    add("p_mean = nan", p_mean=float("nan"), expect="p_mean: expected a finite number, got nan")
    for dtype in (torch.int64, torch.bool):
        add(f"dtype {dtype}", dtype=dtype, expect="dtype: expected a floating-point dtype, got ", paths=python_only)
    return cases


def _dispatcher_only_cases():
    """Arguments only the dispatcher ops have: sample_sigma_'s `out`, and the fused
    backwards called directly (autograd reaches them only with checked arguments)."""
    only = ("dispatcher",)
    cases = []

    def sample(name, out_fn, expect=None):
        def build(gen):
            return dict(out=out_fn(), sigma_lo=0.01, sigma_hi=5.0, seed=1, offset=2, p_mean=P_MEAN, p_std=P_STD)
        cases.append(Case("sample_sigma_", name, build, expect, paths=only))

    sample("out strided", lambda: torch.empty(20)[::2])
    sample("out 2-d", lambda: torch.empty(3, 4, dtype=torch.float64))
    sample("out 0-d", lambda: torch.empty(()))
    sample("out expanded (stride 0)", lambda: torch.empty(1).expand(4),
           "out: expected a tensor whose elements do not share memory, got an expanded one")
    sample("out int64", lambda: torch.empty(4, dtype=torch.int64), "out: " + FLOAT_MSG + "int64")

    def edm_backward(name, change=None, expect=None, need=(True, False)):
        def build(gen):
            kw = dict(grad=make((3,), torch.float32, gen=gen), F=make((3, 5), gen=gen), z=make((3, 5), gen=gen),
                      y=make((3, 5), gen=gen), sigma=make_sigma(3, gen), sigma_data=SIGMA_DATA,
                      need_z=need[0], need_y=need[1])
            return change(kw, gen) if change else kw
        cases.append(Case("edm_loss_backward", name, build, expect, paths=only))

    edm_backward("valid")
    edm_backward("valid, every gradient", need=(True, True))
    edm_backward("grad with N - 1 values", _replace("grad", lambda kw, g: kw["grad"][:2]),
                 "grad: expected shape [N] with N = 3 (the leading dim of F), got [2]")
    edm_backward("grad int64", _replace("grad", lambda kw, g: kw["grad"].long()), "grad: " + FLOAT_MSG + "int64")
    edm_backward("y with another shape", _replace("y", lambda kw, g: kw["y"][:, :2]),
                 "y: expected shape [3, 5] like F, got [3, 2]")
    edm_backward("sigma on meta", _replace("sigma", lambda kw, g: kw["sigma"].to("meta")),
                 "sigma: expected a tensor on cpu like F, got meta")

    def ce_backward(name, change=None, expect=None):
        def build(gen):
            logits = make((3, 4, 6), gen=gen, low=-4, high=4)
            kw = dict(grad=make((3,), gen=gen), logits=logits, target=make_target((3, 4), 6, gen, 3),
                      weight=make_sigma(3, gen, 0.1, 3.0), lse=torch.logsumexp(logits, -1), ignore_index=-100)
            return change(kw, gen) if change else kw
        cases.append(Case("weighted_cross_entropy_backward", name, build, expect, paths=only))

    ce_backward("valid")
    ce_backward("lse with another shape", _replace("lse", lambda kw, g: kw["lse"][:, :2]),
                "lse: expected shape [3, 4] (logits without its class dim), got [3, 2]")
    ce_backward("lse int64", _replace("lse", lambda kw, g: kw["lse"].long()), "lse: " + FLOAT_MSG + "int64")
    ce_backward("target value 6", _replace("target", lambda kw, g: kw["target"].index_fill(0, torch.tensor([1]), 6)),
                "target: expected class indices in [0, 6) or ignore_index = -100")
    ce_backward("grad on meta", _replace("grad", lambda kw, g: kw["grad"].to("meta")),
                "grad: expected a tensor on cpu like logits, got meta")
    return cases


def matrix() -> list:
    """The bad-input matrix: every case once, with a stable seed per case."""
    cases = _sample_sigma_cases()
    for op in STATE_OPS:
        cases += _state_cases(op)
    cases += _cross_entropy_cases() + _dispatcher_only_cases()
    for index, case in enumerate(cases):
        case.seed = index
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case names must be unique per op"
    return cases


# ------------------------------------------------------------------ fuzz

class RandomPick:
    """Choices from random.Random (the script); tests/test_fuzz.py has the hypothesis twin."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def choice(self, options):
        return options[self.rng.randrange(len(options))]

    def integer(self, lo, hi):
        return self.rng.randint(lo, hi)


LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "offset")
SIGMA_LAYOUTS = ("contiguous", "strided", "expanded")
SIGMA_RANGES = ((0.002, 80.0), (0.002, 0.05), (10.0, 80.0), (1e-4, 1e6))


def fuzz_case(op, pick, index=0) -> Case:
    """A random valid input for `op` (shapes, dtypes, strides, σ, gradients) drawn through
    `pick`; the one definition of the fuzz space for the test and the script."""
    seed = pick.integer(0, 2**31 - 1)
    dtype = pick.choice(FLOAT_DTYPES)
    if op == "sample_sigma":
        lo, hi = sorted(10 ** (pick.integer(-600, 600) / 100) for _ in range(2))
        kw = dict(n=pick.choice((0, 1, 7, 64, 1000, 9000)), sigma_lo=lo, sigma_hi=hi, dtype=dtype,
                  seed=pick.integer(0, 2**64 - 1), offset=pick.integer(0, 2**64 - 1),
                  p_mean=pick.choice((P_MEAN, 0.0, 1.5)), p_std=pick.choice((P_STD, 0.7, 2.0)))
        return Case(op, f"fuzz {index}", lambda gen: dict(kw), seed=seed)
    n = pick.choice((0, 1, 2, 3, 5, 8))
    if pick.integer(0, 9) == 5:  # now and then 33k-60k elements: two threads split a row (not 0:
        # hypothesis draws the boundary values of a range far more often)
        n, trailing = 3, (pick.integer(11000, 20000),)
    else:
        trailing = tuple(pick.integer(1, 24 if k < 2 else 4) for k in range(pick.integer(0, 3)))
    if op == "weighted_cross_entropy":
        c = pick.choice((1, 2, 7, 33, 130, 1500))
        t = pick.choice((None, 0, 1, 5))
        shape = (n, c) if t is None else (n, t, c)
        layout, weight_layout = pick.choice(LAYOUTS), pick.choice(SIGMA_LAYOUTS)
        weight_dtype = pick.choice(FLOAT_DTYPES)
        ignore_every, ignore_index = pick.choice((0, 2, 5)), pick.choice((-100, 0))
        scale = pick.choice((1.0, 8.0, 40.0))
        grad = ("logits",) if pick.integer(0, 1) else ()

        def build(gen):
            return dict(logits=make(shape, dtype, layout, gen, -scale, scale),
                        target=make_target(shape[:-1], c, gen, ignore_every, ignore_index),
                        weight=make_sigma(n, gen, 0.1, 3.0, weight_dtype, weight_layout), ignore_index=ignore_index)
        return Case(op, f"fuzz {index}", build, grad=grad, seed=seed)
    data, sigmas, _ = STATE_OPS[op]
    layouts = {name: pick.choice(LAYOUTS) for name in data}
    sigma_layout = pick.choice(SIGMA_LAYOUTS)
    sigma_range = pick.choice(SIGMA_RANGES)
    sigma_dtype = pick.choice(FLOAT_DTYPES if sigma_range[1] < 6e4 else (torch.float32, torch.float64))
    sigma_data = pick.choice((SIGMA_DATA, SIGMA_DATA, 1.0, 0.1))
    zero_next = op == "euler_step" and pick.integer(0, 4) == 0
    denoised = pick.integer(0, 1) == 1
    grad = tuple(name for name in data if pick.integer(0, 1))

    def build(gen):
        kw = _state_kwargs(op, gen, n, trailing, dtype, layouts, sigma_dtype, sigma_layout, sigma_range)
        kw["sigma_data"] = sigma_data
        if zero_next:
            kw["sigma_next"] = torch.zeros_like(kw["sigma_next"])
        if op in ("euler_step", "heun_step"):
            kw["denoised"] = denoised
        return kw
    return Case(op, f"fuzz {index}", build, grad=grad, seed=seed)


# ------------------------------------------------------------------ running one case

def _dispatcher(op):
    lib = torch.ops.diffusionblocks

    # Seeds and offsets are uint64 values carried as int64 in the schemas (as ops.py passes them).
    def sample_sigma(n, sigma_lo, sigma_hi, *, seed=0, offset=0, p_mean=P_MEAN, p_std=P_STD, device="cpu",
                     dtype=torch.float32):
        out = torch.empty(n, dtype=dtype, device=device)
        lib.sample_sigma_(out, sigma_lo, sigma_hi, as_int64("seed", seed), as_int64("offset", offset), p_mean, p_std)
        return out

    def sample_sigma_(out, sigma_lo, sigma_hi, seed, offset, p_mean, p_std):
        lib.sample_sigma_(out, sigma_lo, sigma_hi, seed, offset, p_mean, p_std)
        return out

    calls = {
        "sample_sigma": sample_sigma,
        "sample_sigma_": sample_sigma_,
        "add_noise": lambda y, sigma, seed=0, offset=0, sigma_data=SIGMA_DATA: lib.add_noise(
            y, sigma, as_int64("seed", seed), as_int64("offset", offset), sigma_data),
        "denoise": lambda F, z, sigma, sigma_data=SIGMA_DATA: lib.denoise(F, z, sigma, sigma_data),
        "euler_step": lambda z, F, sigma, sigma_next, sigma_data=SIGMA_DATA, denoised=False: lib.euler_step(
            z, F, sigma, sigma_next, sigma_data, denoised),
        "heun_step": lambda z, F, z_euler, F_euler, sigma, sigma_next, sigma_data=SIGMA_DATA, denoised=False:
            lib.heun_step(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data, denoised),
        "edm_loss": lambda F, z, y, sigma, sigma_data=SIGMA_DATA: lib.edm_loss(F, z, y, sigma, sigma_data),
        "weighted_cross_entropy": lambda logits, target, weight, ignore_index=-100: lib.weighted_cross_entropy(
            logits, target, weight, ignore_index)[0],
        "edm_loss_backward": lambda grad, F, z, y, sigma, sigma_data, need_z, need_y: lib.edm_loss_backward(
            grad, F, z, y, sigma, sigma_data, need_z, need_y),
        "weighted_cross_entropy_backward": lambda grad, logits, target, weight, lse, ignore_index:
            lib.weighted_cross_entropy_backward(grad, logits, target, weight, lse, ignore_index),
    }
    return calls[op]


def _oracle(op):
    """The float64 truth of an op: the reference, or autograd of it for the fused backwards."""
    if op == "sample_sigma":
        return lambda **kw: reference.sample_sigma(**{**kw, "dtype": torch.float64})
    if op == "sample_sigma_":
        def sample(out, sigma_lo, sigma_hi, seed, offset, p_mean, p_std):
            return reference.sample_sigma(out.numel(), sigma_lo, sigma_hi, seed=seed, offset=offset, p_mean=p_mean,
                                          p_std=p_std, dtype=torch.float64).reshape(out.shape)
        return sample
    if op == "edm_loss_backward":
        def edm(grad, F, z, y, sigma, sigma_data, need_z, need_y):
            leaves = [t.detach().requires_grad_(True) for t in (F, z, y)]
            grads = torch.autograd.grad(reference.edm_loss(*leaves, sigma, sigma_data=sigma_data), leaves, grad)
            return grads[0], grads[1] if need_z else F.new_empty(0), grads[2] if need_y else F.new_empty(0)
        return edm
    if op == "weighted_cross_entropy_backward":
        def ce(grad, logits, target, weight, lse, ignore_index):
            leaf = logits.detach().requires_grad_(True)
            loss = reference.weighted_cross_entropy(leaf, target, weight, ignore_index=ignore_index)
            return torch.autograd.grad(loss, leaf, grad)[0]
        return ce
    return getattr(reference, op)


def _function(op, path):
    if path == "dispatcher":
        return _dispatcher(op)
    return getattr(ops if path == "public" else reference, op)


def _contract_dtypes(op, kw):
    """The dtypes the op promises for its outputs."""
    if op == "sample_sigma":
        return (kw.get("dtype", torch.float32),)
    if op == "sample_sigma_":
        return (kw["out"].dtype,)
    if op == "edm_loss_backward":
        return (kw["F"].dtype,) * 3
    if op == "weighted_cross_entropy_backward":
        return (kw["logits"].dtype,)
    if op == "weighted_cross_entropy":
        return (acc_dtype(kw["logits"].dtype),)
    first = kw[STATE_OPS[op][0][0]]
    if op == "edm_loss":
        return (acc_dtype(first.dtype),)
    return (first.dtype,) * (2 if op == "add_noise" else 1)


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _upstream(case, outputs, dtypes):
    """The same incoming gradients for every path: float64 draws rounded to the contract dtype."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    return [make(o.shape, torch.float64, gen=gen).to(d).to(o.dtype).to(o.device) for o, d in zip(outputs, dtypes)]


def _execute(case, kw, fn, leaves, dtypes):
    """Runs fn(**kw); returns (outputs, {name: leaf gradient}, upstream)."""
    with torch.no_grad() if case.no_grad else contextlib.nullcontext():
        outputs = _as_tuple(fn(**kw))
    grads, upstream = {}, []
    if leaves and not case.no_grad:
        live = [(o, d) for o, d in zip(outputs, dtypes) if isinstance(o, torch.Tensor) and o.requires_grad]
        upstream = _upstream(case, [o for o, _ in live], [d for _, d in live])
        torch.autograd.backward([o for o, _ in live], upstream)
        grads = {name: leaf.grad for name, leaf in leaves.items()}
    return outputs, grads, upstream


def _run_path(case, path):
    """(outputs, gradients, upstream) of the case on `path`, or raises what the op raised."""
    kw = case.build(torch.Generator().manual_seed(case.seed))
    leaves = {}
    for name in case.grad:
        leaves[name], kw[name] = _leaf(kw[name], requires_grad=True)
    return _execute(case, kw, _function(case.op, path), leaves, _contract_dtypes(case.op, kw))


def _run_oracle(case):
    """The float64 truth: outputs, gradients with respect to the views (not the leaves), the
    float64 inputs, and the contract dtypes."""
    kw = case.build(torch.Generator().manual_seed(case.seed))
    dtypes = _contract_dtypes(case.op, kw)
    kw64, views = {}, {}
    for name, value in kw.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and name != "out":
            value = value.detach().to(torch.float64).contiguous()
            if name in case.grad:
                value.requires_grad_(True)
                views[name] = value
        kw64[name] = value
    outputs, grads, upstream = _execute(case, kw64, _oracle(case.op), views, dtypes)
    return outputs, grads, upstream, kw, kw64, dtypes


# Error allowance per op, in units of the working precision times the size of the terms:
# reductions accumulate more roundings; sample_sigma's Φ⁻¹ (AS 241 vs torch's ndtri) and exp
# differ by a few 1e-16 relative, amplified by p_std·|ℓ| up to ~20 (its conditioning on
# top of that: _sample_sigma_scale).
EPS_UNITS = {"sample_sigma": 4096, "sample_sigma_": 4096, "edm_loss": 256, "weighted_cross_entropy": 256,
             "edm_loss_backward": 64, "weighted_cross_entropy_backward": 64}


def _working_eps(op, dtype):
    # add_noise draws ε in float32 for every dtype (Sleef/libm/torch differ in the last ulp).
    if dtype == torch.float64 and op != "add_noise":
        return 2.0**-53
    return 2.0**-24


def _sample_sigma_scale(kw, sigma):
    """σ·(1 + p_std·Φ(s·ℓ)/φ(ℓ)): the sampler draws p = Φ(s·ℓ) (s = −1 for a range above the
    median, as both implementations do) and rounds it by eps·p, which moves ℓ by
    eps·p/φ(ℓ). Near the top of a range that straddles the median p ≈ 1 while φ(ℓ) is
    small (ℓ = 4: 7,500 times eps), so σ there is only that well defined."""
    p_mean, p_std = kw.get("p_mean", P_MEAN), kw.get("p_std", P_STD)
    sigma = sigma.double().abs()
    ell = (sigma.log() - p_mean) / p_std
    s = -1.0 if (math.log(kw["sigma_lo"]) - p_mean) / p_std > 0 else 1.0
    log_ratio = torch.special.log_ndtr(s * ell) + ell.square() / 2 + 0.5 * math.log(2 * math.pi)
    return sigma * (1 + p_std * log_ratio.clamp(max=400.0).exp())


def _edm_grad_scales(kw, grad):
    """Σ|terms| of the edm_loss gradients: k·(|F| + |f_target|) with k = 2|grad|/M."""
    F, z, y = kw["F"], kw["z"], kw["y"]
    s, sd = broadcast_rows(kw["sigma"], F), kw.get("sigma_data", SIGMA_DATA)
    m = max(1, F[0].numel()) if F.shape[0] else 1
    k = 2 * broadcast_rows(grad.abs(), F) / m
    base = k * (F.abs() + (y.abs() + reference.c_skip(s, sd) * z.abs()) / reference.c_out(s, sd))
    return {"F": base, "z": base * reference.c_skip(s, sd) / reference.c_out(s, sd), "y": base / reference.c_out(s, sd)}


def _ce_grad_scale(kw, grad):
    """|grad·weight/T|·(|x| + |lse| + 1): the error of exp(x − lse) scaled like the gradient."""
    x = kw["logits"]
    t = x.shape[1] if x.dim() == 3 else 1
    g = (grad * kw["weight"]).abs() / max(t, 1)
    lse = torch.logsumexp(x, -1, keepdim=True).abs().nan_to_num(0, 0, 0)
    return broadcast_rows(g, x) * (x.abs().nan_to_num(0, 0, 0) + lse + 1)


def _output_scales(op, kw, outputs):
    """Per output, Σ|terms| of its float64 formula: evaluating a sum in working precision
    errs by about eps·Σ|terms|, however much the terms cancel."""
    sd = kw.get("sigma_data", SIGMA_DATA)
    if op in ("sample_sigma", "sample_sigma_"):
        return [_sample_sigma_scale(kw, outputs[0])]
    if op == "edm_loss_backward":
        scales = _edm_grad_scales(kw, kw["grad"])
        return [scales["F"], scales["z"] if kw["need_z"] else outputs[1], scales["y"] if kw["need_y"] else outputs[2]]
    if op == "weighted_cross_entropy_backward":
        return [_ce_grad_scale(kw, kw["grad"])]
    if op == "weighted_cross_entropy":
        x = kw["logits"]
        flat = x.flatten(1).abs().nan_to_num(0, 0, 0)
        size = flat.amax(dim=1) if flat.shape[1] else torch.zeros(x.shape[0], dtype=x.dtype)
        return [kw["weight"].abs() * (2 * size + math.log(x.shape[-1]) + 1)]
    first = kw[STATE_OPS[op][0][0]]
    s = broadcast_rows(kw[STATE_OPS[op][1][0]], first)
    if op == "add_noise":
        magnitude = kw["y"].abs() + (outputs[0] - kw["y"]).abs()
        return [magnitude, reference.c_in(s, sd) * magnitude]
    if op == "denoise":
        return [reference.c_skip(s, sd) * kw["z"].abs() + reference.c_out(s, sd) * kw["F"].abs()]
    s_next = broadcast_rows(kw["sigma_next"], first) if "sigma_next" in kw else None
    denoised = kw.get("denoised", False)
    if op == "euler_step":
        a_z, a_f = reference.euler_coefficients(s, s_next, sd, denoised)
        return [a_z.abs() * kw["z"].abs() + a_f.abs() * kw["F"].abs()]
    if op == "heun_step":
        coefs = reference.heun_coefficients(s, s_next, sd, denoised)
        return [sum(c.abs() * kw[name].abs() for c, name in zip(coefs, ("z", "F", "z_euler", "F_euler")))]
    if op == "edm_loss":
        target = (kw["y"].abs() + reference.c_skip(s, sd) * kw["z"].abs()) / reference.c_out(s, sd)
        return [reference._per_row((kw["F"].abs() + target).square()).mean(dim=1)]
    raise KeyError(op)


def _grad_scales(op, kw, grads, upstream):
    """Per input gradient (on the view), Σ|terms|; the linear ops' gradients are single products."""
    if op == "edm_loss":
        return _edm_grad_scales(kw, upstream[0])
    if op == "weighted_cross_entropy":
        return {"logits": _ce_grad_scale(kw, upstream[0])}
    if op == "add_noise":
        s = broadcast_rows(kw["sigma"], kw["y"])
        return {"y": upstream[0].abs() + reference.c_in(s, kw.get("sigma_data", SIGMA_DATA)) * upstream[1].abs()}
    return {name: g.abs() for name, g in grads.items()}


def _to_leaf(view_value, like):
    """A per-view-element quantity summed into the leaf of `like`'s geometry (how autograd
    sums the gradients of an expanded input)."""
    leaf, view = _leaf(like, torch.float64, requires_grad=True)
    view.backward(view_value.to(torch.float64))
    return leaf.grad


def _mismatch(actual, expected, scale, dtype, op):
    """None when `actual` equals the float64 `expected` within tolerance, else a description."""
    if not isinstance(actual, torch.Tensor):
        return f"expected a tensor, got {type(actual).__name__}"
    if actual.shape != expected.shape or actual.dtype != dtype or actual.device != expected.device:
        return (f"expected {tuple(expected.shape)} {dtype} on {expected.device}, "
                f"got {tuple(actual.shape)} {actual.dtype} on {actual.device}")
    if actual.device.type == "meta":
        return None
    e = expected.to(dtype).double().cpu()  # the truth rounded to the output dtype (overflow included)
    a = actual.detach().double().cpu()
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        index = int((torch.isfinite(a) != finite).flatten().nonzero()[0])
        return f"finite/non-finite differs at flat index {index}: got {a.flatten()[index]}, expected {e.flatten()[index]}"
    ulp = torch.finfo(dtype).eps  # one unit in the last place of the output dtype, relative
    scale = scale.double().cpu().nan_to_num(0, 0, 0)
    tol = ulp * torch.maximum(e.abs(), scale) + EPS_UNITS.get(op, 32) * _working_eps(op, dtype) * scale \
        + torch.finfo(dtype).smallest_normal * ulp  # the spacing of subnormals
    bad = finite & ((a - e).abs() > tol)
    if bool(bad.any()):
        index = int(bad.flatten().nonzero()[0])
        return (f"{int(bad.sum())} of {bad.numel()} values off, e.g. flat index {index}: got {a.flatten()[index]:.9g}, "
                f"expected {e.flatten()[index]:.9g} (tolerance {tol.flatten()[index]:.3g})")
    return None


def _compare(case, got, truth):
    """None when the path's outputs and gradients match the float64 truth, else why not."""
    outputs, grads, _ = got
    ref_outputs, ref_grads, upstream, kw, kw64, dtypes = truth
    if len(outputs) != len(ref_outputs):
        return f"expected {len(ref_outputs)} outputs, got {len(outputs)}"
    meta = any(isinstance(o, torch.Tensor) and o.device.type == "meta" for o in ref_outputs)
    scales = [None] * len(ref_outputs) if meta else _output_scales(case.op, kw64, ref_outputs)
    for i, (a, e, scale, dtype) in enumerate(zip(outputs, ref_outputs, scales, dtypes)):
        why = _mismatch(a, e, scale if scale is not None else e.abs(), dtype, case.op)
        if why:
            return f"output {i}: {why}"
    if ref_grads and not meta:
        grad_scales = _grad_scales(case.op, kw64, ref_grads, upstream)
        for name, g in ref_grads.items():
            if g is None:
                continue
            leaf_grad = _to_leaf(g, kw[name])
            leaf_scale = _to_leaf(grad_scales[name].expand_as(g), kw[name])
            why = _mismatch(grads.get(name), leaf_grad, leaf_scale, _root(kw[name]).dtype, case.op)
            if why:
                return f"gradient of {name}: {why}"
    return None


@dataclasses.dataclass
class Outcome:
    kind: str        # one of OUTCOMES
    detail: str = ""


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""


def reference_message(case):
    """The reference's error text for the case (the text every path must give), or None."""
    if "reference" not in case.paths:
        return None
    try:
        _run_path(case, "reference")
    except Exception as error:  # noqa: BLE001 - any error's text is what we compare
        return _first_line(error)
    return None


def run(case, path) -> Outcome:
    """Runs one case on one path in this process and classifies what happened."""
    try:
        got = _run_path(case, path)
    except Exception as error:  # noqa: BLE001 - classifying every exception is the point
        text = f"{type(error).__name__}: {_first_line(error)}"
        if case.expect is None:
            return Outcome("bad_error", f"a result was expected, got {text}")
        if not isinstance(error, (ValueError, RuntimeError)) or not _first_line(error).startswith(case.expect):
            return Outcome("bad_error", f"expected an error starting {case.expect!r}, got {text}")
        if path != "reference":
            ref = reference_message(case)
            if ref is not None and ref != _first_line(error):
                return Outcome("bad_error", f"the text differs from the reference's {ref!r}: {text}")
        return Outcome("error", text)
    if case.expect is not None:
        return Outcome("wrong", f"bad input accepted: expected an error starting {case.expect!r}")
    try:
        truth = _run_oracle(case)
    except Exception as error:  # noqa: BLE001
        return Outcome("bad_error", f"the float64 reference failed: {type(error).__name__}: {_first_line(error)}")
    why = _compare(case, got, truth)
    return Outcome("wrong", why) if why else Outcome("correct")
