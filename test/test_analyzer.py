"""Analyzer: tensor roles, counts and bytes; exported YAML (rules or explicit) plans cleanly; plot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from ckpt_writers import load_state, write_fp8_checkpoint, write_gptq_checkpoint
from sglang_mixed_precision.analyzer import analyze, choose_precisions, export_config, plot_bytes_per_layer, role_table
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


# ---- outputs are checked before the analysis ------------------------------------------------------
def _no_analysis(monkeypatch):
    import sglang_mixed_precision.analyzer as analyzer_mod

    def refuse(*a, **k):
        raise AssertionError("the analysis ran before the outputs were checked")

    monkeypatch.setattr(analyzer_mod, "analyze", refuse)


@pytest.mark.parametrize(
    "flag,make,needle",
    [
        ("--export_config", lambda d: d / "no" / "such" / "dir.yaml", "which does not exist"),
        ("--export_config", lambda d: d, "is a directory"),
        ("--plot", lambda d: d / "nodir" / "x.png", "which does not exist"),
        ("--export_config", lambda d: (d / "a_file").write_text("x") and d / "a_file" / "out.yaml", "not a directory"),
    ],
)
def test_unwritable_outputs_are_refused_first(moe, tmp_path, monkeypatch, capsys, flag, make, needle):
    _no_analysis(monkeypatch)
    target = make(tmp_path)
    assert cli_main(["analyze", "--model_path", str(moe["model"]), flag, str(target)]) == 2
    err = capsys.readouterr().err
    assert "[output_unwritable]" in err and f"{flag} {target} " in err and needle in err and "fix:" in err


def test_outputs_never_replace_files_the_analyzer_did_not_write(moe, tmp_path, monkeypatch, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"precious": true}')
    picture = tmp_path / "notes.png"
    picture.write_text("not a png")
    _no_analysis(monkeypatch)
    for flag, target in (("--export_config", config), ("--plot", picture)):
        assert cli_main(["analyze", "--model_path", str(moe["model"]), flag, str(target)]) == 2
        assert "exists and is not a file this command wrote: writing would replace it" in capsys.readouterr().err
    assert config.read_text() == '{"precious": true}' and picture.read_text() == "not a png"


def test_permission_denied_is_refused_first(moe, tmp_path, monkeypatch, capsys):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path else real_access(p, mode, **k))
    _no_analysis(monkeypatch)
    assert cli_main(["analyze", "--model_path", str(moe["model"]), "--export_config", str(tmp_path / "m.yaml")]) == 2
    assert "which is not writable (permission denied)" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the mode (os.access monkeypatched above instead)")
def test_read_only_directory_by_mode(moe, tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        assert (
            cli_main(["analyze", "--model_path", str(moe["model"]), "--export_config", str(tmp_path / "m.yaml")]) == 2
        )
    finally:
        tmp_path.chmod(0o755)
    assert "[output_unwritable]" in capsys.readouterr().err


def test_an_earlier_export_is_replaced(moe, tmp_path):
    out = tmp_path / "mix.yaml"
    args = ["analyze", "--model_path", str(moe["model"]), "--export_config", str(out)]
    assert cli_main(args + ["--expert_precision", "int4", "--int4_path", str(moe["int4"])]) == 0
    first = out.read_text()
    assert cli_main(args) == 0
    assert out.read_text() != first and "int4_path" not in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["mix.yaml"]  # no temporary file left


# ---- quantized checkpoints are analyzed as what they are ----------------------------------------
def test_a_gptq_checkpoint_is_analyzed_as_gptq(moe):
    a, base = analyze(moe["int4"]), analyze(moe["model"])
    assert a.scheme.label() == "gptq-int4-g128" and a.label == "int4"
    rows = {r["role"]: r for r in role_table(a, choose_precisions(a))}
    assert rows["routed_expert"]["stored"] == "gptq-int4-g128" and rows["norm"]["stored"] == "fp16"
    assert rows["routed_expert"]["precision"] == "int4" and rows["attention"]["precision"] == "int4"
    # bytes as stored; parameters of the model (a packed int32 counts its eight weights)
    state = load_state(moe["int4"])
    assert sum(s.bytes for s in a.stats.values()) == sum(t.numel() * t.element_size() for t in state.values())
    assert a.stats[Role.ROUTED_EXPERT].parameters == base.stats[Role.ROUTED_EXPERT].parameters
    assert rows["routed_expert"]["planned_bytes"] == rows["routed_expert"]["bytes"]
    as16 = {r["role"]: r for r in role_table(a, choose_precisions(a, expert="fp16"))}
    assert as16["routed_expert"]["planned_bytes"] == base.stats[Role.ROUTED_EXPERT].bytes


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_quantized_exports_plan(moe, tmp_path, fmt, capsys):
    layout = tmp_path / "converted"  # the converter's layout: fp16/ beside int4/ and fp8/
    layout.mkdir()
    for name, src in (("fp16", moe["model"]), (fmt, moe[fmt])):
        (layout / name).mkdir()
        for f in src.iterdir():
            (layout / name / f.name).symlink_to(f)
    out = tmp_path / "mix.yaml"
    assert cli_main(["analyze", "--model_path", str(layout / fmt), "--export_config", str(out)]) == 0
    assert f"16-bit source for the export: {layout / 'fp16'}" in capsys.readouterr().out
    section = yaml.safe_load(out.read_text())["mixed_precision"]
    assert section["fp16_path"] == str(layout / "fp16") and section[f"{fmt}_path"] == str(layout / fmt)
    plan = build_plan(load_config(out))
    for name, a in plan.modules.items():
        assert a.label == (fmt if a.ref.role.quantizable else "fp16"), name


def test_a_quantized_export_without_a_16bit_source_is_refused_first(moe, tmp_path, monkeypatch, capsys):
    _no_analysis(monkeypatch)
    out = tmp_path / "mix.yaml"
    assert cli_main(["analyze", "--model_path", str(moe["int4"]), "--export_config", str(out)]) == 2
    err = capsys.readouterr().err
    assert "[bad_argument]" in err and "is a gptq-int4-g128 checkpoint: its export needs the model's 16-bit" in err
    assert "--fp16_path" in err and not out.exists()
