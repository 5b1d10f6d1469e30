"""Every public op on every path (the compiled kernels through the public op, the
reference, the dispatcher op with its autograd) answers each input of the bad-input matrix
(diffusionblocks.tools.op_cases.matrix: wrong dtypes, shapes and σ lengths, σ <= 0, NaN,
inf and huge σ, N = 0, strided, transposed and expanded inputs, 0-d tensors, gradient
combinations, meta and mixed devices) with either a result equal to the float64 reference
or a ValueError naming the argument, with the reference's text. Plus the fixes the matrix
led to that it cannot express: the lse output's gradient, double backward, the σ sampler's
far tail, and the crash accounting of the robustness script."""

import math

import pytest
import torch
from scipy import stats

import diffusionblocks_ext as dx
from diffusionblocks_ext import reference as R
from diffusionblocks.tools import op_cases as oc
from diffusionblocks.tools import robustness

from conftest import requires_ext

PARAMS = [pytest.param(case, path, id=f"{path}-{case.id}")
          for case in oc.matrix() for path in oc.available_paths() if path in case.paths]


@pytest.mark.parametrize("case, path", PARAMS)
def test_each_input_gives_a_correct_result_or_a_clear_error(case, path):
    if case.needs_cuda and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    outcome = oc.run(case, path)
    assert outcome.kind in ("correct", "error"), f"{outcome.kind}: {outcome.detail}"


def test_the_matrix_covers_every_op_with_results_and_errors():
    cases = oc.matrix()
    for op in oc.OPS:
        ours = [c for c in cases if c.op == op]
        assert any(c.expect is None for c in ours) and any(c.expect for c in ours), op
    for op in oc.STATE_OPS:
        names = " / ".join(c.name for c in cases if c.op == op)
        for needed in ("int64", "bool", "0-d", "N = 0", "N - 1 values", "NaN", "+inf", "1e6", "< 0", "transposed",
                       "expanded", "strided", "requires grad", "gradients to every input", "on meta", "on cuda"):
            assert needed in names, (op, needed)


@requires_ext
def test_the_lse_output_of_the_dispatcher_op_is_differentiable():
    logits = oc.make((3, 4, 6), torch.float64, gen=torch.Generator().manual_seed(0)).requires_grad_(True)
    target = torch.tensor([[0, 1, 5, -100], [2, 2, 2, 2], [5, 4, 3, 2]])
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    upstream = torch.rand(3, 4, dtype=torch.float64)
    for with_loss in (False, True):
        loss, lse = torch.ops.diffusionblocks.weighted_cross_entropy(logits, target, weight, -100)
        total = (lse * upstream).sum() + (loss.sum() if with_loss else 0)
        (ours,) = torch.autograd.grad(total, logits)
        expected_total = (torch.logsumexp(logits, -1) * upstream).sum() + (
            R.weighted_cross_entropy(logits, target, weight).sum() if with_loss else 0)
        (expected,) = torch.autograd.grad(expected_total, logits)
        torch.testing.assert_close(ours, expected)


def test_double_backward_matches_the_reference():
    g = torch.Generator().manual_seed(1)
    F, z, y = (oc.make((3, 7), torch.float64, gen=g).requires_grad_(True) for _ in range(3))
    sigma = oc.make_sigma(3, g, dtype=torch.float64)
    logits = oc.make((3, 2, 5), torch.float64, gen=g).requires_grad_(True)
    target = torch.tensor([[0, 4], [2, -100], [1, 1]])

    def penalty(impl):
        """A gradient penalty: the loss plus the squared norm of its gradient."""
        loss = impl.edm_loss(F, z, y, sigma).sum() + impl.weighted_cross_entropy(logits, target, sigma).sum()
        grads = torch.autograd.grad(loss, (F, z, logits), create_graph=True)
        return torch.autograd.grad(loss + sum(gr.square().sum() for gr in grads), (F, z, y, logits))

    for ours, expected in zip(penalty(dx), penalty(R)):
        torch.testing.assert_close(ours, expected)


def test_gradgradcheck_of_the_losses():
    g = torch.Generator().manual_seed(2)
    F, z, y = (oc.make((2, 3), torch.float64, gen=g).requires_grad_(True) for _ in range(3))
    sigma = oc.make_sigma(2, g, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda a, b, c: dx.edm_loss(a, b, c, sigma), (F, z, y))
    logits = oc.make((2, 3, 4), torch.float64, gen=g).requires_grad_(True)
    target = torch.tensor([[0, 3, -100], [1, 1, 2]])
    assert torch.autograd.gradgradcheck(lambda x: dx.weighted_cross_entropy(x, target, sigma), (logits,))


@pytest.mark.parametrize("lo, hi", [(1e5, 1e6), (1e-6, 1e-5), (30.0, 1e4)])
def test_sample_sigma_far_tails_follow_the_truncated_lognormal(lo, hi):
    # Φ(ℓ) rounds to 1 from σ ≈ 1e5 on: the sampler works from the tail the range lies in.
    sigma = dx.sample_sigma(5000, lo, hi, seed=4, dtype=torch.float64)
    assert bool(((sigma >= lo) & (sigma <= hi)).all()) and sigma.unique().numel() > 4900

    def ell(s):
        return (torch.log(torch.as_tensor(s, dtype=torch.float64)).numpy() - R.P_MEAN) / R.P_STD
    upper = ell(lo) > 0  # measure the mass from the nearer tail, as the sampler does
    if upper:
        cdf = lambda s: (stats.norm.sf(ell(lo)) - stats.norm.sf(ell(s))) / (stats.norm.sf(ell(lo)) - stats.norm.sf(ell(hi)))  # noqa: E731
    else:
        cdf = lambda s: (stats.norm.cdf(ell(s)) - stats.norm.cdf(ell(lo))) / (stats.norm.cdf(ell(hi)) - stats.norm.cdf(ell(lo)))  # noqa: E731
    assert stats.kstest(sigma.numpy(), cdf).pvalue > 1e-3
    # Most of the mass sits at the end nearer the median, not clamped onto an end.
    nearer = lo if upper else hi
    assert math.isclose(float(sigma.median()), nearer, rel_tol=0.5)


def test_the_script_counts_a_crash_and_goes_on(monkeypatch):
    # A worker that dies (here by abort, standing in for a segfault) is counted for the
    # case it was running; a fresh worker carries on with the next case.
    crash = "denoise: fuzz 0"
    monkeypatch.setenv("DBX_ROBUSTNESS_CRASH", crash)
    records = robustness._supervise("fuzz", "public", count=1, seed=0, timeout=120)
    assert [r["case"] for r in records] == ["fuzz 0"] * len(oc.OPS)
    kinds = {f"{r['op']}: {r['case']}": r["kind"] for r in records}
    assert kinds.pop(crash) == "crash"
    assert set(kinds.values()) <= {"correct", "error"}, records
