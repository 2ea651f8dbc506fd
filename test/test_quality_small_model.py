"""eval, sensitivity and autoplan on CPU with the small trained model shipped in the package.

The model is converted once per session by the project's converter (fp8 block, GPTQ int4 calibrated
on held-out text); every mix is scored through the reference path against the 16-bit model.
"""

from __future__ import annotations

import json

import pytest
import torch

from sglang_mixed_precision.cli import main
from sglang_mixed_precision.core.autoplan import assigned_labels, fitted_interaction, interaction_factor, inventory
from sglang_mixed_precision.core.config import load_config
from sglang_mixed_precision.core.errors import ErrorCode, MixedPrecisionError
from sglang_mixed_precision.core.plan import build_plan
from sglang_mixed_precision.quality.cpu import CpuBackend
from sglang_mixed_precision.quality.evaluate import evaluate, predicted_kld
from sglang_mixed_precision.quality.sensitivity import SensitivityTable, run_sensitivity
from sglang_mixed_precision.testing.small_model import convert_small_model, uniform_config

TOKENS = 128


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    return convert_small_model(tmp_path_factory.mktemp("small") / "converted", method="gptq")


@pytest.fixture(scope="session")
def sensitivity(converted, tmp_path_factory):
    cache = tmp_path_factory.mktemp("sensitivity")
    sources = uniform_config(converted, "fp16", "sources.yaml")
    table, path = run_sensitivity(sources, CpuBackend(), tokens=TOKENS, cache_dir=cache, log=lambda m: None)
    return sources, cache, table, path


def test_the_trained_model_predicts_held_out_python(converted):
    r = evaluate(uniform_config(converted, "fp16"), CpuBackend(), tokens=TOKENS)
    # a uniform guess over 1024 tokens has perplexity 1024; the model saw no line of this text
    assert r.comparison.baseline_ppl < 100
    assert r.comparison.kld_mean == 0.0 and r.comparison.top1 == 1.0


def test_fp8_costs_less_than_int4(converted):
    fp8 = evaluate(uniform_config(converted, "fp8"), CpuBackend(), tokens=TOKENS).comparison
    int4 = evaluate(uniform_config(converted, "int4"), CpuBackend(), tokens=TOKENS).comparison
    assert 0 < fp8.kld_mean < int4.kld_mean
    assert fp8.exact and fp8.k == 1024


def test_bf16_arithmetic_gives_the_same_numbers_within_its_noise(converted):
    """What SGLang computes in bf16 and the fp32 reference must agree: the int4 mix's KLD in bf16 and
    in fp32 differ by no more than bf16 arithmetic moves each side of it (the 16-bit baseline's and
    the int4 mix's own KLD between bf16 and fp32; int4's dequantized weights round in bf16 too),
    plus 10 %."""
    config = uniform_config(converted, "int4")
    fp32 = evaluate(config, CpuBackend(), tokens=TOKENS).comparison
    bf16 = evaluate(config, CpuBackend(dtype=torch.bfloat16), tokens=TOKENS).comparison
    noise_16bit = evaluate(uniform_config(converted, "fp16"), _Bf16Mix(), tokens=TOKENS).comparison.kld_mean
    noise_int4 = evaluate(config, _Bf16Mix(), baseline="int4", tokens=TOKENS).comparison.kld_mean
    assert noise_16bit > 0 and noise_int4 > 0
    assert abs(bf16.kld_mean - fp32.kld_mean) <= noise_16bit + noise_int4 + 0.1 * fp32.kld_mean


class _Bf16Mix(CpuBackend):
    """The baseline in fp32, the 'mix' (the same 16-bit weights) in bf16: bf16 arithmetic alone."""

    def score(self, plan, ids, k, top_ids=None):
        self.dtype = torch.float32 if top_ids is None else torch.bfloat16
        return super().score(plan, ids, k, top_ids)


def test_sensitivity_table_covers_every_unit_and_source(sensitivity):
    _, _, table, path = sensitivity
    assert len(table.units) == 8  # 4 layers x (attention, routed experts)
    for unit, by in table.units.items():
        assert set(by) == {"fp8", "int4"}, unit
        assert all(by[label]["kld_mean"] >= 0 for label in by), unit
    # every unit matters, and the uniform mixes cost less than their units summed but more than the
    # largest one (errors of different layers partly cancel, see core/autoplan.interaction_factor)
    for label in ("fp8", "int4"):
        per_unit = [by[label]["kld_mean"] for by in table.units.values()]
        assert max(per_unit) < table.uniform[label]["kld_mean"] <= sum(per_unit)
    assert json.loads(path.read_text())["key"] == table.key


class _Counting(CpuBackend):
    def __init__(self):
        super().__init__()
        self.scored = []

    def score(self, plan, ids, k, top_ids=None):
        self.scored.append(plan.config.path.name)
        return super().score(plan, ids, k, top_ids)


def test_an_interrupted_sensitivity_run_resumes(sensitivity, tmp_path):
    sources, cache, table, path = sensitivity
    partial = SensitivityTable.from_json(json.loads(path.read_text()))
    dropped = next(iter(partial.units))
    del partial.units[dropped]["int4"]
    resumed_cache = tmp_path / "cache"
    partial.save(resumed_cache / path.name)
    backend = _Counting()
    again, _ = run_sensitivity(sources, backend, tokens=TOKENS, cache_dir=resumed_cache, log=lambda m: None)
    # the baseline, then only the missing mix
    assert backend.scored[1:] == [f"{dropped}--int4.yaml"]
    assert again.units[dropped]["int4"]["kld_mean"] == pytest.approx(table.units[dropped]["int4"]["kld_mean"])


def _autoplan(sensitivity, tmp_path, budget_gib, capsys, name="mix.yaml"):
    sources, cache, _, _ = sensitivity
    out = tmp_path / name
    args = ["autoplan", "--config", str(sources), "--budget-gib", str(budget_gib), "--tp-size", "1"]
    args += ["--tokens", str(TOKENS), "--backend", "cpu", "--cache-dir", str(cache), "--output", str(out)]
    rc = main(args)
    return rc, out, capsys.readouterr()


def test_autoplan_kld_falls_as_the_budget_grows_and_the_yaml_is_the_choice(sensitivity, tmp_path, capsys):
    sources, _, table, _ = sensitivity
    inv = inventory(load_config(sources), 1, table.kld())
    beta = fitted_interaction(table.kld(), {label: s["kld_mean"] for label, s in table.uniform.items()})
    light = inv.fixed_bytes + sum(min(c.bytes for c in u.choices) for u in inv.units)
    heavy = inv.fixed_bytes + sum(max(c.bytes for c in u.choices) for u in inv.units)
    predicted, measured = [], []
    for fraction in (0.1, 0.4, 0.7):
        gib = round((light + fraction * (heavy - light)) / (1 << 30), 6)
        rc, out, printed = _autoplan(sensitivity, tmp_path, gib, capsys, f"mix-{gib}.yaml")
        assert rc == 0, printed.err
        plan = build_plan(load_config(out))
        weights = sum(a.nbytes for a in plan.modules.values())
        assert weights <= gib * (1 << 30)
        predicted.append(predicted_kld(out))
        # the YAML plans to exactly the units the optimizer picked: its prediction is made of theirs
        labels = assigned_labels(plan)
        moved = [(u, label) for u, label in labels.items() if label != "fp16"]
        summed = sum(table.units[u][label]["kld_mean"] for u, label in moved)
        assert predicted[-1] == pytest.approx(interaction_factor(len(moved), len(labels), beta) * summed, rel=1e-6)
        measured.append(evaluate(out, CpuBackend(), tokens=TOKENS).comparison.kld_mean)
    assert predicted[0] > predicted[1] > predicted[2]
    assert measured[0] > measured[1] > measured[2]
    # 128 tokens keep this test short and its KLDs noisy (3e-5 to 3e-4 nats): within 50 % here; the
    # 512-token run of bench/gpu_quality_proof.py --cpu-check holds every prediction within 10 %
    for p, m in zip(predicted, measured):
        assert p == pytest.approx(m, rel=0.5)


def test_autoplan_refuses_a_budget_nothing_fits(sensitivity, tmp_path, capsys):
    rc, out, printed = _autoplan(sensitivity, tmp_path, 0.001, capsys)
    assert rc == 2 and not out.exists()
    assert "autoplan_budget_too_small" in printed.err and "--budget-gib 0.00" in printed.err


def test_autoplan_without_a_sensitivity_run_says_which_to_run(sensitivity, tmp_path):
    from types import SimpleNamespace

    from sglang_mixed_precision.commands import autoplan

    sources = sensitivity[0]
    args = SimpleNamespace(
        config=str(sources), budget_gib=1.0, tp_size=1, kv_cache_gib=0.0, output=None, text=None,
        tokens=TOKENS + 1, top_k=0, backend="cpu", cache_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(MixedPrecisionError) as e:
        autoplan.run(args)
    assert e.value.code is ErrorCode.SENSITIVITY_MISSING and "sglang-mp sensitivity --config" in e.value.fix


def test_eval_command_prints_json_and_a_png(converted, tmp_path, capsys):
    png = tmp_path / "kld.png"
    args = ["eval", "--config", str(uniform_config(converted, "int4")), "--backend", "cpu", "--tokens", "64"]
    assert main([*args, "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["positions"] == 63 and len(out["kld_per_position"]) == 63 and out["kld_mean"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_text_too_short_to_score_is_refused():
    from sglang_mixed_precision.quality.evaluate import MIN_TOKENS, text_ids
    from sglang_mixed_precision.testing.small_model import small_model_path

    with pytest.raises(MixedPrecisionError) as e:
        text_ids(small_model_path(), "x = 1", tokens=512, where="short.py")
    assert e.value.code == ErrorCode.QUALITY_TEXT_TOO_SHORT.value and e.value.where == "short.py"
    assert f"at least {MIN_TOKENS} are needed" in str(e.value) and "--text" in str(e.value)
