"""Plans that must succeed: seed YAML, rules, fused groups, bytes per precision / rank, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from ckpt_writers import load_state, write_fp8_checkpoint
from sglang_mixed_precision.cli import main as cli_main
from sglang_mixed_precision.core.config import load_config, parse_config
from sglang_mixed_precision.core.naming import Role
from sglang_mixed_precision.core.plan import build_plan


def test_core_imports_neither_sglang_nor_torch():
    """Every module under core/ (walked, not listed) and the header-only tools import neither."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import sglang_mixed_precision.core as core\n"
        "names = [m.name for m in pkgutil.walk_packages(core.__path__, 'sglang_mixed_precision.core.')]\n"
        "names += ['sglang_mixed_precision.analyzer', 'sglang_mixed_precision.testing.shapegen']\n"
        "for m in names: importlib.import_module(m)\n"
        "print(len(names), sorted({n.split('.')[0] for n in sys.modules} & {'sglang', 'torch', 'safetensors'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) >= 14  # the walk found the core's modules
    assert out[1].strip() == "[]"


def seed_yaml(sources, mapping_lines: str) -> str:
    return (
        f"mixed_precision:\n  fp16_path: {sources['fp16']}\n  fp8_path: {sources['fp8']}\n"
        f"  int4_path: {sources['int4']}\n  weight_mapping:\n{mapping_lines}"
    )


def test_seed_yaml_example_plans_cleanly(moe_sources, tmp_path):
    lines = []
    for layer, attn, experts in ((0, "fp16", "int4"), (1, "fp8", "fp8")):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lines.append(f'    "model.layers.{layer}.self_attn.{proj}.weight": "{attn}"')
        for e in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                lines.append(f'    "model.layers.{layer}.mlp.experts.{e}.{proj}.weight": "{experts}"')
        lines.append(f'    "model.layers.{layer}.mlp.gate.weight": "fp16"')
    path = tmp_path / "seed.yaml"
    path.write_text(seed_yaml(moe_sources, "\n".join(lines) + "\n"))
    plan = build_plan(load_config(path))
    assert plan.skeleton_label == "fp16" and plan.skeleton_path == moe_sources["fp16"]
    assert plan.group_for_prefix("model.layers.0.self_attn.qkv_proj").scheme.label() == "bf16"
    assert plan.group_for_prefix("model.layers.0.mlp.experts").scheme.label() == "gptq-int4-g128"
    assert plan.group_for_prefix("model.layers.1.self_attn.qkv_proj").scheme.label() == "fp8-block128"
    assert plan.group_for_prefix("model.layers.1.mlp.experts").label == "fp8"
    assert plan.modules["model.layers.1.self_attn.o_proj"].rule.startswith(
        "weight_mapping 'model.layers.1.self_attn.o_proj.weight'"
    )
    assert plan.sources["int4"].quant_config["bits"] == 4
    assert plan.warnings == []


def test_rules_default_and_explicit_precedence(moe_sources):
    cfg = parse_config(
        seed_yaml(moe_sources, "    model.layers.1.self_attn.qkv_proj: fp16\n") + "  default: fp8\n  rules:\n"
        "    - {match: 'model.layers.*.mlp.experts.*', source: int4}\n"
        "    - {match: 'model.layers.[1].self_attn.*', source: int4}\n"
        "    - {match: 'model.layers.[0].mlp.experts.*', source: fp16}\n"
    )
    plan = build_plan(cfg)
    g = plan.group_for_prefix
    assert g("model.layers.0.mlp.experts").label == "int4"  # first matching rule wins
    assert g("model.layers.1.self_attn.qkv_proj").label == "fp16"  # explicit (fused name) beats rules
    assert g("model.layers.1.self_attn.o_proj").label == "int4"
    assert g("model.layers.0.self_attn.qkv_proj").label == "fp8"  # default
    assert plan.modules["model.layers.0.self_attn.o_proj"].rule.startswith("default 'fp8'")
    # non-linears stay with the skeleton whatever rules and default say
    for name in (
        "model.layers.1.self_attn.q_norm",
        "model.layers.0.mlp.gate",
        "model.embed_tokens",
        "lm_head",
        "model.norm",
    ):
        assert plan.modules[name].label == "fp16", name
    assert len(g("model.layers.0.mlp.experts").members) == 24
    assert g("model.layers.0.self_attn.k_proj").prefix == "model.layers.0.self_attn.qkv_proj"
    assert g("model.layers.0.self_attn.nothing") is None
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith(
        "rule #3 'model.layers.[0].mlp.experts.*' (<config>:11) decides no module"
    )


def test_non_linear_modules_move_only_when_named(moe_sources):
    plan = build_plan(
        parse_config(
            seed_yaml(moe_sources, "    model.norm.weight: int4\n    model.layers.0.mlp.gate: fp8\n")
            + "  default: fp8\n"
        )
    )
    assert plan.modules["model.norm"].label == "int4" and plan.modules["model.norm"].scheme.label() == "fp16"
    assert plan.modules["model.layers.0.mlp.gate"].label == "fp8"
    assert plan.modules["model.layers.0.mlp.gate"].scheme.label() == "bf16"
    assert plan.modules["model.layers.1.input_layernorm"].label == "fp16"


def test_aliases_resolve_to_the_unquantized_source(moe_sources):
    text = (
        f"mixed_precision:\n  sources: {{base: {moe_sources['fp16']}, q8: {moe_sources['fp8']}}}\n"
        "  default: q8\n  rules:\n    - {match: 'model.layers.[1].*', source: bf16}\n"
    )
    plan = build_plan(parse_config(text))
    assert plan.skeleton_label == "base"
    assert plan.group_for_prefix("model.layers.1.mlp.experts").label == "base"
    assert plan.group_for_prefix("model.layers.0.mlp.experts").label == "q8"


def test_tensors_by_source_is_exactly_what_to_read(moe_sources):
    plan = build_plan(
        parse_config(
            seed_yaml(moe_sources, "") + "  rules:\n"
            "    - {match: 'model.layers.0.mlp.experts.*', source: int4}\n"
            "    - {match: 'model.layers.1.self_attn.*', source: fp8}\n"
        )
    )
    by_source = {label: {t.name for t in infos} for label, infos in plan.tensors_by_source().items()}
    expected_int4 = {
        f"model.layers.0.mlp.experts.{e}.{p}.{s}"
        for e in range(8)
        for p in ("gate_proj", "up_proj", "down_proj")
        for s in ("qweight", "qzeros", "scales", "g_idx")
    }
    expected_fp8 = {
        f"model.layers.1.self_attn.{p}.{s}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for s in ("weight", "weight_scale_inv")
    }
    assert by_source["int4"] == expected_int4 and by_source["fp8"] == expected_fp8
    everything = set(load_state(moe_sources["fp16"]))
    moved = {
        f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")
    }
    moved |= {f"model.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert by_source["fp16"] == everything - moved
    # every tensor is read from the file its source stores it in
    for label, infos in plan.tensors_by_source().items():
        for info in infos:
            assert plan.sources[label].tensor(info.name).file == info.file


def test_bytes_by_precision_and_per_rank(moe_sources):
    cfg = parse_config(
        seed_yaml(moe_sources, "") + "  rules:\n    - {match: 'model.layers.*.mlp.experts.*', source: int4}\n"
    )
    plan = build_plan(cfg, tp_size=2)
    states = {label: load_state(path) for label, path in moe_sources.items()}
    expected = {}
    for label, infos in plan.tensors_by_source().items():
        for info in infos:
            t = states[label][info.name]
            scheme = "gptq-int4-g128" if label == "int4" else "bf16"
            expected[scheme] = expected.get(scheme, 0) + t.numel() * t.element_size()
    assert plan.bytes_by_scheme() == expected
    summary = plan.to_json()["summary"]
    assert {r["precision"]: r["bytes"] for r in summary["by_precision"]} == expected
    assert summary["total"]["parameters"] == sum(t.numel() for t in states["fp16"].values())
    # per rank: everything splits over 2 ranks except norms and the router; kv heads (2) split too
    replicated = sum(a.nbytes for a in plan.modules.values() if a.ref.role in (Role.NORM, Role.ROUTER))
    total = sum(expected.values())
    assert [r["rank"] for r in summary["per_rank"]] == [0, 1]
    assert abs(summary["per_rank"][0]["bytes"] - ((total - replicated) / 2 + replicated)) <= 2
    layers = {r["layer"]: r["total"] for r in summary["by_layer"]}
    assert set(layers) == {0, 1, "other"} and sum(layers.values()) == total


def test_kv_replication_in_per_rank_bytes(tiny_qwen3):
    plan = build_plan(parse_config(f"mixed_precision:\n  fp16_path: {tiny_qwen3}\n"), tp_size=4)
    per_rank = plan.to_json()["summary"]["per_rank"][0]["bytes"]
    kv = sum(a.nbytes for a in plan.modules.values() if a.ref.shard in ("k", "v"))
    replicated = sum(a.nbytes for a in plan.modules.values() if a.ref.role in (Role.NORM, Role.ROUTER))
    rest = sum(a.nbytes for a in plan.modules.values()) - kv - replicated
    assert abs(per_rank - (rest / 4 + kv / 2 + replicated)) <= 2  # 2 kv heads over 4 ranks: each holds one


def test_sharded_llama_with_fp8_attention(tiny_llama, tmp_path):
    fp8 = write_fp8_checkpoint(tiny_llama, tmp_path / "fp8", shards=3)
    plan = build_plan(
        parse_config(
            f"mixed_precision:\n  fp16_path: {tiny_llama}\n  fp8_path: {fp8}\n"
            "  rules:\n    - {match: '*.self_attn.*', source: fp8}\n"
        ),
        tp_size=2,
    )
    assert {g.scheme.label() for p, g in plan.groups.items() if "self_attn" in p} == {"fp8-block128"}
    assert plan.group_for_prefix("model.layers.0.mlp.gate_up_proj").scheme.label() == "bf16"


def test_cli_plan_tables_json_and_exit_codes(moe_sources, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(seed_yaml(moe_sources, "") + "  default: fp8\n")
    assert cli_main(["plan", "--config", str(good), "--tp-size", "2"]) == 0
    out = capsys.readouterr().out
    for needle in ("By precision:", "By layer:", "Per TP rank (tp_size 2", "fp8-block128", "bf16"):
        assert needle in out
    assert cli_main(["plan", "--config", str(good), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["modules"]["model.layers.0.mlp.experts.3.up_proj"]["scheme"] == "fp8-block128"
    assert data["groups"]["model.layers.1.mlp.experts"]["members"] == 24
    bad = tmp_path / "bad.yaml"
    bad.write_text(seed_yaml(moe_sources, "    model.layers.0.self_attn.q_proj.weight: int4\n"))
    assert cli_main(["plan", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "[mixed_group]" in err and "model.layers.0.self_attn.qkv_proj" in err
