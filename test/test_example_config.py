"""The repository's documented mixed_precision_config.yaml plans cleanly against real sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
from sglang_mixed_precision.core.config import parse_config
from sglang_mixed_precision.core.plan import build_plan
from sglang_mixed_precision.testing.tinymodels import make_tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "mixed_precision_config.yaml"


@pytest.fixture(scope="module")
def five_layer_sources(tmp_path_factory):
    """Layers 0-3 stay 16-bit in the example, so the model needs a fifth layer for int4 experts."""
    root = tmp_path_factory.mktemp("example")
    src = make_tiny_model("qwen3_moe", root / "model", num_layers=5)
    convert(
        ConvertOptions(model_path=str(src), output_dir=str(root / "conv"), method="rtn", check=False, progress=False)
    )
    return root / "conv"


def example_with_paths(conv: Path) -> str:
    text = EXAMPLE.read_text()
    for label, name in (
        ("fp16_path", "Qwen3-235B-A22B"),
        ("fp8_path", "Qwen3-235B-A22B-FP8"),
        ("int4_path", "Qwen3-235B-A22B-GPTQ-Int4"),
    ):
        old = f"{label}: /models/{name}\n"
        assert old in text, f"the example no longer has {old!r}"
        text = text.replace(old, f"{label}: {conv / label.split('_')[0]}\n")
    return text


def test_documented_example_plans_with_the_promised_assignment(five_layer_sources):
    plan = build_plan(parse_config(example_with_paths(five_layer_sources), "mixed_precision_config.yaml"))
    kinds = {prefix: g.scheme.kind for prefix, g in plan.groups.items()}
    assert kinds["model.layers.4.mlp.experts"] == "gptq"  # routed experts in int4
    assert kinds["model.layers.2.mlp.experts"] == "unquantized"  # first four layers in 16-bit
    assert kinds["model.layers.4.self_attn.qkv_proj"] == "unquantized"  # attention in 16-bit
    assert kinds["model.layers.0.self_attn.o_proj"] == "fp8"  # the explicit seed-style line
    assert plan.modules["lm_head"].label == "fp16"
