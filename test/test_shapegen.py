"""Shape-only checkpoints: valid headers over sparse data that plan like real ones."""

from __future__ import annotations

import json

from safetensors import safe_open

from ckpt_writers import write_fp8_checkpoint, write_gptq_checkpoint
from sglang_mixed_precision.core.config import parse_config
from sglang_mixed_precision.core.formats import Scheme
from sglang_mixed_precision.core.plan import build_plan
from sglang_mixed_precision.core.sources import CheckpointSource
from sglang_mixed_precision.testing.shapegen import write_shape_checkpoint

FP8 = Scheme("fp8", dtype="BF16", fp8_block=(128, 128), fp8_strategy="block")
INT4 = Scheme("gptq", dtype="F16", bits=4, group_size=128, sym=True, desc_act=False)


def _shapes(source: CheckpointSource) -> dict:
    return {n: (source.tensor(n).dtype, source.tensor(n).shape) for n in source.tensor_names}


def test_shape_checkpoints_match_real_ones(tiny_qwen3_moe, tmp_path):
    cfg = json.loads((tiny_qwen3_moe / "config.json").read_text())
    real = {
        "bf16": tiny_qwen3_moe,
        "fp8": write_fp8_checkpoint(tiny_qwen3_moe, tmp_path / "rfp8"),
        "int4": write_gptq_checkpoint(tiny_qwen3_moe, tmp_path / "rint4"),
    }
    for label, scheme in (("bf16", None), ("fp8", FP8), ("int4", INT4)):
        fake = write_shape_checkpoint(cfg, tmp_path / label, scheme, shard_bytes=4 << 20)
        assert _shapes(CheckpointSource(label, fake)) == _shapes(CheckpointSource(label, real[label])), label
        assert len(list(fake.glob("*.safetensors"))) > 1


def test_files_are_sparse_and_readable_by_safetensors(tiny_qwen3, tmp_path):
    cfg = json.loads((tiny_qwen3 / "config.json").read_text())
    out = write_shape_checkpoint(cfg, tmp_path / "m", FP8)
    files = list(out.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) > 8 * sum(f.stat().st_blocks * 512 for f in files)
    with safe_open(str(files[0]), framework="numpy") as f:
        assert len(list(f.keys())) > 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]


def test_a_mixed_plan_over_shape_checkpoints(tmp_path):
    cfg = {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 3072,
        "moe_intermediate_size": 512,
        "num_experts": 16,
        "vocab_size": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    paths = {
        label: write_shape_checkpoint(cfg, tmp_path / label, scheme)
        for label, scheme in (("fp16", None), ("fp8", FP8), ("int4", INT4))
    }
    text = (
        f"mixed_precision:\n  fp16_path: {paths['fp16']}\n  fp8_path: {paths['fp8']}\n  int4_path: {paths['int4']}\n"
        "  default: fp8\n  rules:\n    - {match: 'model.layers.[2-3].mlp.experts.*', source: int4}\n"
    )
    plan = build_plan(parse_config(text), tp_size=4)
    assert plan.group_for_prefix("model.layers.3.mlp.experts").scheme.label() == "gptq-int4-g128"
    assert plan.group_for_prefix("model.layers.1.mlp.experts").scheme.label() == "fp8-block128"
    assert len(plan.modules) == 1 + 4 * (1 + 4 + 2 + 1 + 16 * 3 + 1) + 2
