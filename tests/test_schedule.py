"""Noise schedule and block partition against docs/method.md §2-§5 reference values."""

import math

import pytest
import torch

import diffusionblocks_ext as dx
from diffusionblocks import schedule
from diffusionblocks.partition import BlockPartition, PartitionError, SigmaAxis

# docs/method.md §3, ascending, 5 significant digits.
EQUI = {
    2: [0.002, 0.3012, 80],
    3: [0.002, 0.17963, 0.50504, 80],
    4: [0.002, 0.13408, 0.3012, 0.67665, 80],
    6: [0.002, 0.09434, 0.17963, 0.3012, 0.50504, 0.96167, 80],
}


@pytest.mark.parametrize("blocks", sorted(EQUI))
def test_equi_probability_boundaries_match_spec(blocks):
    got = schedule.equi_probability_boundaries(blocks)
    assert got.dtype == torch.float64
    for value, expected in zip(got.tolist(), EQUI[blocks], strict=True):
        assert value == pytest.approx(expected, rel=5e-5)


@pytest.mark.parametrize("blocks", [2, 3, 5])
def test_equi_probability_intervals_hold_equal_mass(blocks):
    q = torch.special.ndtr((schedule.equi_probability_boundaries(blocks).log() - dx.P_MEAN) / dx.P_STD)
    masses = q.diff()
    assert torch.allclose(masses, masses.mean().expand_as(masses), rtol=1e-9, atol=0)


def test_log_uniform_boundaries_match_spec():
    got = schedule.log_uniform_boundaries(3).tolist()
    for value, expected in zip(got, [0.002, 0.0684, 2.339, 80], strict=True):
        assert value == pytest.approx(expected, rel=5e-4)


def test_overlap_widens_by_the_ratio_power_and_clamps():
    lo, hi = 0.17963, 0.50504
    a = (hi / lo) ** 0.05
    assert schedule.widen(lo, hi, 0.05) == pytest.approx((lo / a, hi * a))
    assert schedule.widen(lo, hi, 0.0) == (lo, hi)
    # The end intervals cannot grow past [σ_min, σ_max].
    assert schedule.widen(dx.SIGMA_MIN, 0.17963, 0.1)[0] == dx.SIGMA_MIN
    assert schedule.widen(0.50504, dx.SIGMA_MAX, 0.1)[1] == dx.SIGMA_MAX


def test_block_sigma_samples_stay_in_range_and_follow_the_density():
    torch.manual_seed(0)
    sigma = schedule.sample_sigmas(20000, (0.17963, 0.50504))
    assert sigma.shape == (20000,) and sigma.min() >= 0.17963 and sigma.max() <= 0.50504
    # Inside an equi-probability interval the CDF of the draws is uniform: its median
    # is the interval's CDF midpoint.
    q = torch.special.ndtr((sigma.double().log() - dx.P_MEAN) / dx.P_STD)
    q_ends = torch.special.ndtr((torch.tensor([0.17963, 0.50504]).double().log() - dx.P_MEAN) / dx.P_STD)
    assert float(q.median()) == pytest.approx(float(q_ends.mean()), abs=2e-3)


def test_block_sigma_samples_repeat_under_manual_seed():
    torch.manual_seed(3)
    first = schedule.sample_sigmas(8, (0.002, 80.0))
    torch.manual_seed(3)
    assert torch.equal(first, schedule.sample_sigmas(8, (0.002, 80.0)))


def test_inference_sigmas_are_equally_spaced_in_the_cdf_and_descending():
    sigmas = schedule.inference_sigmas(5)
    assert sigmas[0] == dx.SIGMA_MAX and sigmas[-1] == dx.SIGMA_MIN
    assert bool((sigmas.diff() < 0).all())
    q = torch.special.ndtr((sigmas.log() - dx.P_MEAN) / dx.P_STD)
    assert torch.allclose(q.diff(), q.diff().mean().expand(4), rtol=1e-9, atol=0)
    # With N = 3 the middle level is the CDF midpoint, which is the B = 2 boundary.
    assert schedule.inference_sigmas(3)[1].item() == pytest.approx(0.3012, rel=5e-5)


def test_midpoint_levels_put_one_level_in_the_middle_of_each_block():
    blocks = 4
    sigmas = schedule.midpoint_sigmas(blocks)
    assert sigmas[0] == dx.SIGMA_MAX and sigmas[-1] > dx.SIGMA_MIN and bool((sigmas.diff() < 0).all())
    axis = SigmaAxis(blocks)
    assert [int(b) for b in axis.block_of(sigmas)] == list(range(blocks))
    for block, sigma in enumerate(sigmas[1:].tolist(), start=1):  # the CDF midpoint of the block's interval
        q_lo, q_hi = schedule._cdf_of_sigma(list(axis.level_range(block))).tolist()
        assert schedule._cdf_of_sigma(sigma).item() == pytest.approx((q_lo + q_hi) / 2, rel=1e-9)


def test_karras_schedule_endpoints_and_rho():
    sigmas = schedule.karras_sigmas(3)
    mid = ((dx.SIGMA_MAX ** (1 / 7) + dx.SIGMA_MIN ** (1 / 7)) / 2) ** 7
    assert sigmas.tolist() == pytest.approx([80.0, mid, 0.002])


def test_interval_lookup_is_half_open_with_the_top_closed():
    b = schedule.equi_probability_boundaries(3)
    # On a boundary a σ belongs to the noisier interval above it; σ_max to the top one.
    assert schedule.interval_index(b, b).tolist() == [0, 1, 2, 2]
    just_below = b[1:3] * (1 - 1e-12)
    assert schedule.interval_index(just_below, b).tolist() == [0, 1]
    # Out of range clamps to the end intervals.
    assert schedule.interval_index(torch.tensor([1e-4, 1e3]), b).tolist() == [0, 2]


def test_partition_block_zero_holds_the_first_layers_and_the_noisiest_range():
    plan = BlockPartition(6, 3, "equi", gamma=0.0)
    assert [list(plan.layers(k)) for k in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert plan.level_range(0) == pytest.approx((0.50504, 80.0), rel=5e-5)
    assert plan.level_range(2) == pytest.approx((0.002, 0.17963), rel=5e-5)
    assert plan.block_of(torch.tensor([80.0, 0.3, 0.002])).tolist() == [0, 1, 2]


def test_partition_explicit_split_and_widened_training_range():
    plan = BlockPartition(6, 4, "uniform", gamma=0.05, split=(2, 2, 1, 1))
    assert [len(plan.layers(k)) for k in range(4)] == [2, 2, 1, 1]
    lo, hi = plan.level_range(1)
    wide = plan.training_range(1)
    assert wide[0] < lo and wide[1] > hi
    assert math.log(hi / lo) * 1.1 == pytest.approx(math.log(wide[1] / wide[0]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_layers=2, num_blocks=3), "blocks"),
    (dict(num_layers=6, num_blocks=4), "split"),
    (dict(num_layers=6, num_blocks=2, gamma=-0.1), "gamma"),
    (dict(num_layers=6, num_blocks=2, split=(5, 2)), "split"),
    (dict(num_layers=6, num_blocks=2, partition="cosine"), "partition"),
])
def test_bad_partitions_name_the_field(kwargs, field):
    with pytest.raises(PartitionError, match=f"^{field}: "):
        BlockPartition(**kwargs)
