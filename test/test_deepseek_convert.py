"""The converter on a tiny DeepSeek-V3: FP8-block and int4 sources with norms, router, correction bias,
embeddings and lm_head left 16-bit; GPTQ calibrated through MLA and the model's own expert routing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from serving_harness import converted
from sglang_mixed_precision.testing.tinymodels import make_tiny_model


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    return make_tiny_model("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3_conv") / "bf16")


def header(model_dir) -> dict[str, str]:
    """{tensor name: safetensors dtype} over every file of a model directory."""
    out = {}
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})  # noqa: SIM118 (a safe_open handle)
    return out


KEPT_16BIT = [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.norm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.self_attn.q_a_layernorm.weight",
    "model.layers.1.self_attn.kv_a_layernorm.weight",
    "model.layers.1.mlp.gate.weight",
]
LINEARS = [
    "model.layers.0.self_attn.q_a_proj",
    "model.layers.0.self_attn.q_b_proj",
    "model.layers.0.self_attn.kv_a_proj_with_mqa",
    "model.layers.0.self_attn.kv_b_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.1.mlp.shared_experts.down_proj",
    "model.layers.1.mlp.experts.7.up_proj",
]


def test_fp8_and_int4_sources_keep_the_right_tensors_16bit(tiny_deepseek):
    out = converted(str(tiny_deepseek))
    fp8, int4 = header(out / "fp8"), header(out / "int4")
    for name in KEPT_16BIT:
        assert fp8[name] == "BF16" and int4[name] == "BF16", name
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert fp8[bias] == int4[bias] == "F32"  # as the release stores it
    for module in LINEARS:
        assert fp8[module + ".weight"] == "F8_E4M3" and fp8[module + ".weight_scale_inv"] == "F32", module
        assert int4[module + ".qweight"] == "I32" and module + ".weight" not in int4, module
    qc = json.loads((out / "fp8" / "config.json").read_text())["quantization_config"]
    assert qc["weight_block_size"] == [128, 128]
    assert "model.layers.1.mlp.gate" in qc["modules_to_not_convert"]
    assert "model.layers.1.self_attn.kv_a_layernorm" in qc["modules_to_not_convert"]


def test_experts_are_calibrated_on_the_tokens_the_model_routes_to_them(tiny_deepseek):
    """Sigmoid scores plus e_score_correction_bias, best group first (DeepseekV3MoE), not a softmax top-k."""
    from sglang_mixed_precision.convert.calibration import GptqInt4, LayerFactory
    from sglang_mixed_precision.convert.model_dir import InputModel

    factory = LayerFactory(tiny_deepseek)
    model = InputModel(tiny_deepseek)
    prefix = "model.layers.1."
    tensors = {n: model.read(n) for n in model.tensors if n.startswith(prefix)}
    lw = factory.build(1, tensors, prefix)
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    gptq = GptqInt4.__new__(GptqInt4)
    gptq.top_k = 2
    router = tensors[prefix + "mlp.gate.weight"].float()
    bias = tensors[prefix + "mlp.gate.e_score_correction_bias"].float()
    chosen = gptq._selected_experts(lw, "model.layers.1.mlp", x, router)
    # written here from DeepSeek-V3's routing: 8 experts in 2 groups, the best group (sum of its top-2
    # biased scores), then the top-2 biased scores inside it
    biased = (x @ router.t()).sigmoid() + bias
    groups = biased.view(-1, 2, 4).topk(2, dim=-1).values.sum(-1).argmax(-1)
    masked = biased.view(-1, 2, 4).clone()
    masked[torch.arange(len(x)), 1 - groups] = float("-inf")
    expected = masked.view(-1, 8).topk(2, dim=-1).indices
    assert torch.equal(chosen.sort(-1).values, expected.sort(-1).values)
    softmax_topk = gptq.route(x, router)
    assert not torch.equal(softmax_topk.sort(-1).values, expected.sort(-1).values)  # the bias matters here


def test_gptq_calibrates_through_mla_and_beats_rtn(tiny_deepseek, tmp_path):
    from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert

    report = convert(
        ConvertOptions(
            model_path=str(tiny_deepseek),
            output_dir=str(tmp_path / "out"),
            formats=("int4",),
            method="gptq",
            nsamples=12,
            seqlen=128,
            min_expert_tokens=8,
            check=False,
            progress=False,
        )
    )
    method = report.int4_method
    assert method["method"] == "gptq"
    for layer in ("0", "1"):
        errors = method["per_layer_heldout_error"][layer]
        assert errors["gptq"] < errors["rtn"], (layer, errors)
    # every calibration token reaches 2 experts, each counted for its 3 projections
    tokens = method["expert_tokens"]
    assert len(tokens) == 24 and not method["rtn_fallback"]
    assert sum(tokens.values()) == 3 * 2 * method["calibration_sequences"] * method["seqlen"]
    written = header(tmp_path / "out" / "int4")
    assert written["model.layers.1.self_attn.kv_b_proj.qweight"] == "I32"
    assert written["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
