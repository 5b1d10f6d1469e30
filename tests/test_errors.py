"""Bad input raises ValueError naming the argument and what was expected, with the same
text from the public op, the reference and (when compiled) the dispatcher op itself."""

import re

import pytest
import torch

import diffusionblocks_ext as dx
from diffusionblocks_ext import reference as R

from conftest import requires_ext

F = torch.randn(3, 4)
SIGMA = torch.rand(3) + 0.1
TARGET = torch.tensor([0, 1, 2])
FLOAT_MSG = "expected a floating-point tensor (float32, float64, bfloat16 or float16), got "

# (op name, kwargs for the public op, expected message). Each case breaks one argument.
CASES = [
    ("denoise", dict(F=F.int(), z=F, sigma=SIGMA), "F: " + FLOAT_MSG + "int32"),
    ("denoise", dict(F=F, z=F.double(), sigma=SIGMA), "z: expected dtype float32 like F, got float64"),
    ("denoise", dict(F=F, z=F[:2], sigma=SIGMA), "z: expected shape [3, 4] like F, got [2, 4]"),
    ("denoise", dict(F=F[0, 0], z=F[0, 0], sigma=SIGMA), "F: expected at least 1 dimension [N, ...], got a 0-d tensor"),
    ("denoise", dict(F=F, z=F, sigma=SIGMA[:2]), "sigma: expected shape [N] with N = 3 (the leading dim of F), got [2]"),
    ("denoise", dict(F=F, z=F, sigma=SIGMA[:, None]), "sigma: expected shape [N] with N = 3 (the leading dim of F), got [3, 1]"),
    ("denoise", dict(F=F, z=F, sigma=torch.tensor([1, 2, 3])), "sigma: " + FLOAT_MSG + "int64"),
    ("denoise", dict(F=F, z=F, sigma=torch.tensor([1.0, 0.0, 1.0])), "sigma: expected every value > 0 and finite"),
    ("denoise", dict(F=F, z=F, sigma=torch.tensor([1.0, -2.0, 1.0])), "sigma: expected every value > 0 and finite"),
    ("denoise", dict(F=F, z=F, sigma=torch.tensor([1.0, float("nan"), 1.0])), "sigma: expected every value > 0 and finite"),
    ("denoise", dict(F=F, z=F, sigma=torch.tensor([1.0, float("inf"), 1.0])), "sigma: expected every value > 0 and finite"),
    ("denoise", dict(F=F, z=F, sigma=SIGMA, sigma_data=0.0), "sigma_data: expected a positive finite number, got 0"),
    ("denoise", dict(F=F, z=F, sigma=SIGMA, sigma_data=float("inf")), "sigma_data: expected a positive finite number, got inf"),
    ("add_noise", dict(y=F.bool(), sigma=SIGMA, seed=0), "y: " + FLOAT_MSG + "bool"),
    ("add_noise", dict(y=F, sigma=torch.zeros(3), seed=0), "sigma: expected every value > 0 and finite"),
    ("add_noise", dict(y=F, sigma=SIGMA[:1], seed=0), "sigma: expected shape [N] with N = 3 (the leading dim of y), got [1]"),
    ("euler_step", dict(z=F, F=F.half(), sigma=SIGMA, sigma_next=SIGMA), "F: expected dtype float32 like z, got float16"),
    ("euler_step", dict(z=F, F=F, sigma=SIGMA, sigma_next=-SIGMA), "sigma_next: expected every value >= 0 and finite"),
    ("heun_step", dict(z=F, F=F, z_euler=F, F_euler=F, sigma=SIGMA, sigma_next=torch.zeros(3)),
     "sigma_next: expected every value > 0 and finite"),
    ("heun_step", dict(z=F, F=F, z_euler=F.t(), F_euler=F, sigma=SIGMA, sigma_next=SIGMA),
     "z_euler: expected shape [3, 4] like z, got [4, 3]"),
    ("edm_loss", dict(F=F, z=F, y=F[:, :2], sigma=SIGMA), "y: expected shape [3, 4] like F, got [3, 2]"),
    ("edm_loss", dict(F=F, z=F, y=F.long(), sigma=SIGMA), "y: expected dtype float32 like F, got int64"),
    ("weighted_cross_entropy", dict(logits=F.long(), target=TARGET, weight=SIGMA), "logits: " + FLOAT_MSG + "int64"),
    ("weighted_cross_entropy", dict(logits=F[0], target=TARGET, weight=SIGMA),
     "logits: expected shape [N, C] or [N, T, C], got [4]"),
    ("weighted_cross_entropy", dict(logits=F[:, :0], target=TARGET, weight=SIGMA),
     "logits: expected at least one class (C >= 1), got C = 0"),
    ("weighted_cross_entropy", dict(logits=F, target=TARGET.int(), weight=SIGMA),
     "target: expected an int64 tensor of class indices, got int32"),
    ("weighted_cross_entropy", dict(logits=F, target=TARGET[:2], weight=SIGMA),
     "target: expected shape [3] (logits without its class dim), got [2]"),
    ("weighted_cross_entropy", dict(logits=F, target=torch.tensor([0, 4, 1]), weight=SIGMA),
     "target: expected class indices in [0, 4) or ignore_index = -100"),
    ("weighted_cross_entropy", dict(logits=F, target=torch.tensor([0, -1, 1]), weight=SIGMA),
     "target: expected class indices in [0, 4) or ignore_index = -100"),
    ("weighted_cross_entropy", dict(logits=F, target=TARGET, weight=SIGMA[:2]),
     "weight: expected shape [N] with N = 3 (the leading dim of logits), got [2]"),
]

# How the public keyword arguments map onto the dispatcher schema, defaults filled in.
SCHEMA_ARGS = {
    "denoise": lambda F, z, sigma, sigma_data=0.5: (F, z, sigma, sigma_data),
    "add_noise": lambda y, sigma, seed, sigma_data=0.5: (y, sigma, seed, 0, sigma_data),
    "euler_step": lambda z, F, sigma, sigma_next: (z, F, sigma, sigma_next, 0.5, False),
    "heun_step": lambda z, F, z_euler, F_euler, sigma, sigma_next: (z, F, z_euler, F_euler, sigma, sigma_next, 0.5, False),
    "edm_loss": lambda F, z, y, sigma: (F, z, y, sigma, 0.5),
    "weighted_cross_entropy": lambda logits, target, weight: (logits, target, weight, -100),
}


def _ids(case):
    return f"{case[0]}:{case[2][:40]}"


@pytest.mark.parametrize("op, kwargs, message", CASES, ids=[_ids(c) for c in CASES])
def test_public_op_and_reference_name_the_bad_argument(op, kwargs, message):
    for impl in (dx, R):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            getattr(impl, op)(**kwargs)


@requires_ext
@pytest.mark.parametrize("op, kwargs, message", CASES, ids=[_ids(c) for c in CASES])
def test_compiled_op_raises_the_same_text(op, kwargs, message):
    with pytest.raises(ValueError) as error:
        getattr(torch.ops.diffusionblocks, op)(*SCHEMA_ARGS[op](**kwargs))
    assert str(error.value).splitlines()[0] == message


def test_device_mismatch_is_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    with pytest.raises(ValueError, match=re.escape("z: expected a tensor on cuda:0 like F, got cpu")):
        dx.denoise(F.cuda(), F, SIGMA.cuda())
    with pytest.raises(ValueError, match=re.escape("sigma: expected a tensor on cuda:0 like y, got cpu")):
        dx.add_noise(F.cuda(), SIGMA, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=-1, sigma_lo=0.1, sigma_hi=1.0), "n: expected an integer >= 0, got -1"),
    (dict(n=4, sigma_lo=1.0, sigma_hi=0.1),
     "sigma_lo, sigma_hi: expected 0 < sigma_lo <= sigma_hi, both finite, got sigma_lo=1, sigma_hi=0.1"),
    (dict(n=4, sigma_lo=0.0, sigma_hi=0.1),
     "sigma_lo, sigma_hi: expected 0 < sigma_lo <= sigma_hi, both finite, got sigma_lo=0, sigma_hi=0.1"),
    (dict(n=4, sigma_lo=0.1, sigma_hi=float("inf")),
     "sigma_lo, sigma_hi: expected 0 < sigma_lo <= sigma_hi, both finite, got sigma_lo=0.1, sigma_hi=inf"),
    (dict(n=4, sigma_lo=0.1, sigma_hi=1.0, p_std=0.0), "p_std: expected a positive finite number, got 0"),
    (dict(n=4, sigma_lo=0.1, sigma_hi=1.0, dtype=torch.int64), "dtype: expected a floating-point dtype, got int64"),
])
def test_sample_sigma_rejects_bad_ranges(kwargs, message):
    for impl in (dx, R):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            impl.sample_sigma(seed=0, **kwargs)


def test_gradients_with_respect_to_sigma_are_refused():
    sigma = SIGMA.clone().requires_grad_(True)
    for impl in (dx, R):
        with pytest.raises(ValueError, match=re.escape("sigma: gradients with respect to sigma are not supported")):
            impl.denoise(F, F, sigma)
    with torch.no_grad():
        dx.denoise(F, F, sigma)  # fine when no graph is being built
