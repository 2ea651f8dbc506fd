"""The exact optimizer against brute force; the budget's edge cases."""

import itertools
import random

import pytest

from sglang_mixed_precision.core.autoplan import (
    AutoPlan,
    Choice,
    Inventory,
    Unit,
    choose,
    compact_rules,
    fitted_interaction,
    interaction_factor,
    layer_ranges,
    optimize,
)
from sglang_mixed_precision.core.errors import ErrorCode, MixedPrecisionError


def brute_force(units, capacity, beta=0.0):
    best = None
    for combo in itertools.product(*(u.choices for u in units)):
        b = sum(c.bytes for c in combo)
        k = interaction_factor(sum(c.moved for c in combo), len(units), beta) * sum(c.kld for c in combo)
        if b <= capacity and (best is None or k < best[1] - 1e-12):
            best = (b, k)
    return best


def random_units(rng, n):
    units = []
    for i in range(n):
        m = rng.randint(1, 4)
        # choice 0 is the 16-bit source: it costs nothing and counts as not moved
        choices = [Choice("bf16", rng.randint(1, 40), 0.0, moved=False)]
        choices += [Choice(f"s{j}", rng.randint(1, 40), round(rng.random(), 3)) for j in range(1, m)]
        units.append(Unit(f"model.layers.{i}.self_attn", "attention", i, choices))
    return units


@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("seed", range(60))
def test_optimizer_equals_brute_force(seed, beta):
    rng = random.Random(seed)
    units = random_units(rng, rng.randint(1, 6))
    capacity = rng.randint(0, 150)
    expected = brute_force(units, capacity, beta)
    got = optimize(units, capacity, beta)
    if expected is None:
        assert got is None
        return
    assert got is not None
    assert got.kld == pytest.approx(expected[1], abs=1e-9)
    # the picks are consistent with the totals and within capacity
    assert sum(c.bytes for c in got.picks.values()) == got.bytes <= capacity
    moved = sum(c.moved for c in got.picks.values())
    assert got.moved == moved and sum(c.kld for c in got.picks.values()) == pytest.approx(got.additive)
    assert got.kld == pytest.approx(interaction_factor(moved, len(units), beta) * got.additive)
    assert set(got.picks) == {u.name for u in units}


def test_optimizer_scales_to_a_large_model():
    rng = random.Random(1)
    units = []
    for layer in range(48):  # 48 layers (Qwen3-30B-A3B), attention and experts, three sources
        units.append(
            Unit(
                f"l{layer}.attn",
                "attention",
                layer,
                [Choice("a", 100, 0), Choice("b", 52, 0.01 * rng.random()), Choice("c", 28, 0.05 * rng.random())],
            )
        )
        units.append(
            Unit(
                f"l{layer}.exp",
                "routed_expert",
                layer,
                [Choice("a", 9000, 0), Choice("b", 4600, 0.01 * rng.random()), Choice("c", 2400, 0.05 * rng.random())],
            )
        )
    full = sum(u.choices[0].bytes for u in units)
    sol = optimize(units, full // 2)
    assert sol is not None and sol.bytes <= full // 2
    assert optimize(units, full).kld == 0.0


def _inventory(units, fixed=10):
    return Inventory(units, fixed, "bf16", 1)


def test_budget_too_small_names_the_smallest_budget_that_fits():
    units = [Unit("u0", "attention", 0, [Choice("bf16", 4 << 30, 0), Choice("int4", 1 << 30, 0.2)])]
    inv = _inventory(units, fixed=1 << 30)
    with pytest.raises(MixedPrecisionError) as e:
        choose(inv, budget_bytes=2 << 30, kv_reserve_bytes=1 << 30)
    assert e.value.code is ErrorCode.AUTOPLAN_BUDGET_TOO_SMALL
    assert "needs 3.000 GiB" in str(e.value) and "--budget-gib 3.000" in e.value.fix
    # exactly that budget fits, with the lightest choice
    plan = choose(inv, budget_bytes=3 << 30, kv_reserve_bytes=1 << 30)
    assert isinstance(plan, AutoPlan) and plan.solution.picks["u0"].label == "int4"
    assert plan.rank_bytes == 2 << 30
    # a larger budget buys back the 16-bit unit
    assert choose(inv, budget_bytes=6 << 30, kv_reserve_bytes=1 << 30).solution.picks["u0"].label == "bf16"


def test_layer_ranges_and_compact_rules():
    assert layer_ranges([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    picks = {f"model.layers.{i}.self_attn": Choice("fp8" if i in (0, 1, 5) else "bf16", 1, 0) for i in range(6)} | {
        f"model.layers.{i}.mlp.experts": Choice("int4", 1, 0) for i in range(6)
    }
    assert compact_rules(picks, "bf16") == [
        ("model.layers.[0-5].mlp.experts.*", "int4"),
        ("model.layers.[0-1,5].self_attn.*", "fp8"),
    ]


def test_interaction_is_fitted_on_the_uniform_mixes():
    units = {"a": {"fp8": 1.0, "int4": 4.0}, "b": {"fp8": 1.0, "int4": 4.0}}
    assert fitted_interaction(units, {"fp8": 1.5, "int4": 6.0}) == pytest.approx(0.25)
    assert fitted_interaction(units, {}) == 0.0
    assert fitted_interaction(units, {"fp8": 5.0}) == 0.0  # super-additive: no correction
    assert interaction_factor(1, 8, 0.25) == 1.0 and interaction_factor(8, 8, 0.25) == pytest.approx(0.75)
