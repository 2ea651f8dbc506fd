"""Analyzer: tensor roles, counts and bytes; exported YAML (rules or explicit) plans cleanly; plot."""

from __future__ import annotations

import sys

import pytest
import yaml

from ckpt_writers import load_state, write_fp8_checkpoint, write_gptq_checkpoint
from sglang_mixed_precision.analyzer import analyze, choose_precisions, export_config, plot_bytes_per_layer
from sglang_mixed_precision.cli import main as cli_main
from sglang_mixed_precision.core.config import load_config
from sglang_mixed_precision.core.errors import MixedPrecisionError
from sglang_mixed_precision.core.naming import Role
from sglang_mixed_precision.core.plan import build_plan


@pytest.fixture(scope="module")
def moe(tiny_qwen3_moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("analyzer")
    return {
        "model": tiny_qwen3_moe,
        "fp8": write_fp8_checkpoint(tiny_qwen3_moe, root / "fp8"),
        "int4": write_gptq_checkpoint(tiny_qwen3_moe, root / "int4"),
    }


def test_roles_counts_and_bytes(tiny_qwen3_moe):
    a = analyze(tiny_qwen3_moe)
    counts = {role: s.modules for role, s in a.stats.items()}
    assert counts == {
        Role.ATTENTION: 8,
        Role.ROUTED_EXPERT: 48,
        Role.ROUTER: 2,
        Role.NORM: 9,
        Role.EMBEDDING: 1,
        Role.LM_HEAD: 1,
    }
    state = load_state(tiny_qwen3_moe)
    assert sum(s.bytes for s in a.stats.values()) == sum(t.numel() * t.element_size() for t in state.values())
    assert sum(s.tensors for s in a.stats.values()) == len(state)


def test_unknown_precision_is_refused(tiny_qwen3_moe):
    with pytest.raises(MixedPrecisionError) as e:
        choose_precisions(analyze(tiny_qwen3_moe), attention="fp4")
    assert (
        e.value.code == "bad_argument"
        and "precision 'fp4' for attention is not one of fp16, bf16, 16bit, fp8, int4" in str(e.value)
    )


def _assignments(plan):
    return {name: a.label for name, a in plan.modules.items()}


def test_exported_rules_plan_cleanly_and_follow_the_choice(moe, tmp_path):
    out = tmp_path / "mix.yaml"
    rc = cli_main(
        [
            "analyze",
            "--model_path",
            str(moe["model"]),
            "--export_config",
            str(out),
            "--attention_precision",
            "fp8",
            "--mlp_precision",
            "fp8",
            "--expert_precision",
            "int4",
            "--fp8_path",
            str(moe["fp8"]),
            "--int4_path",
            str(moe["int4"]),
        ]
    )
    assert rc == 0
    section = yaml.safe_load(out.read_text())["mixed_precision"]
    assert section["rules"] == [
        {"match": "model.layers.*.mlp.experts.*", "source": "int4"},
        {"match": "model.layers.*.self_attn.*", "source": "fp8"},
    ]
    plan = build_plan(load_config(out))
    for name, a in plan.modules.items():
        expected = {Role.ATTENTION: "fp8", Role.ROUTED_EXPERT: "int4"}.get(a.ref.role, "fp16")
        assert a.label == expected, name
    assert plan.warnings == []


def test_explicit_export_is_one_line_per_tensor_and_plans_the_same(moe, tmp_path):
    a = analyze(moe["model"])
    choice = choose_precisions(a, attention="int4", expert="fp8")
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(export_config(a, choice, fp8_path=moe["fp8"], int4_path=moe["int4"], explicit=True))
    mapping = yaml.safe_load(explicit.read_text())["mixed_precision"]["weight_mapping"]
    assert len(mapping) == len(a.tensor_names) and mapping["model.layers.1.self_attn.k_proj.weight"] == "int4"
    compact = tmp_path / "compact.yaml"
    compact.write_text(export_config(a, choice, fp8_path=moe["fp8"], int4_path=moe["int4"]))
    assert _assignments(build_plan(load_config(explicit))) == _assignments(build_plan(load_config(compact)))


def test_dense_model_export(tiny_qwen3, tmp_path):
    fp8 = write_fp8_checkpoint(tiny_qwen3, tmp_path / "fp8")
    out = tmp_path / "mix.yaml"
    assert (
        cli_main(
            [
                "analyze",
                "--model_path",
                str(tiny_qwen3),
                "--export_config",
                str(out),
                "--mlp_precision",
                "fp8",
                "--fp8_path",
                str(fp8),
            ]
        )
        == 0
    )
    assert yaml.safe_load(out.read_text())["mixed_precision"]["rules"] == [
        {"match": "model.layers.*.mlp.*", "source": "fp8"}
    ]
    plan = build_plan(load_config(out), tp_size=2)
    assert plan.group_for_prefix("model.layers.1.mlp.gate_up_proj").scheme.label() == "fp8-block128"
    assert plan.group_for_prefix("model.layers.1.self_attn.qkv_proj").scheme.label() == "bf16"


def test_cli_prints_roles_and_estimates(moe, capsys):
    assert cli_main(["analyze", "--model_path", str(moe["model"]), "--expert_precision", "int4"]) == 0
    out = capsys.readouterr().out
    assert "routed_expert" in out and "int4" in out and "router" in out and "with the chosen precisions" in out


def test_plot_writes_a_png(moe, tmp_path):
    pytest.importorskip("matplotlib")
    a = analyze(moe["model"])
    png = plot_bytes_per_layer(a, choose_precisions(a, expert="int4"), tmp_path / "layers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(moe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    a = analyze(moe["model"])
    with pytest.raises(MixedPrecisionError) as e:
        plot_bytes_per_layer(a, choose_precisions(a), tmp_path / "x.png")
    assert e.value.code == "missing_dependency" and "pip install matplotlib" in str(e.value)
