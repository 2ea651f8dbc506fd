"""The converter and the analyzer on every family: names, what stays 16-bit, GPTQ calibration through
the family's own transformers layers (Qwen2's biased q/k/v, Qwen2-MoE's shared expert and its gate,
Mixtral's block_sparse_moe with w1/w2/w3 experts, tied embeddings)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
from sglang_mixed_precision.core.naming import Role, classify, split_tensor_name
from sglang_mixed_precision.testing.tinymodels import make_tiny_model

FAMILIES = ("llama", "qwen2", "qwen2_moe", "mixtral", "qwen3_tied")


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                out[k] = h.get_tensor(k)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_gptq(request, tmp_path_factory):
    """(name, 16-bit input, report, output dir) of a calibrated GPTQ + fp8 conversion."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_tiny_model(request.param, root / "bf16")
    options = ConvertOptions(
        model_path=str(model),
        output_dir=str(root / "out"),
        method="gptq",
        nsamples=12,
        seqlen=128,
        min_expert_tokens=8,
        progress=False,
    )
    return request.param, model, convert(options), root / "out"


def test_gptq_calibrates_through_the_familys_layers(family_gptq):
    name, model, report, out = family_gptq
    m = report.int4_method
    assert m["method"] == "gptq" and m["calibration_sequences"] == 12
    # every linear was quantized with a Hessian from the calibration tokens (experts may fall back to RTN)
    assert m["heldout_gptq_error"] < m["heldout_rtn_error"], m
    assert set(m["per_layer_heldout_error"]) == {"0", "1"}
    for fmt in ("fp8", "int4"):
        assert not report.checks[fmt].problems, report.checks[fmt].problems
    if name in ("qwen2_moe", "mixtral"):
        routed = {k: v for k, v in m["expert_tokens"].items() if k.startswith("model.layers.0.")}
        assert len(routed) == 8 * 3  # every projection of every expert
        per_expert = [v for k, v in routed.items() if k.endswith((".gate_proj", ".w1"))]
        assert sum(per_expert) == 2 * 12 * 128  # top-2 of every calibration token, routed by the family's gate


def test_what_stays_16_bit_in_every_output(family_gptq):
    name, model, _, out = family_gptq
    original = tensors(model)
    for fmt, marker in (("fp8", "weight_scale_inv"), ("int4", "qweight")):
        written = tensors(out / fmt)
        for n, t in original.items():
            module, suffix = split_tensor_name(n)
            if classify(module).role.quantizable and suffix == "weight":
                assert f"{module}.{marker}" in written, f"{fmt}: {module} not quantized"
            else:  # biases, norms, embeddings, lm_head, routers, the shared expert gate: as they were
                assert n in written and torch.equal(written[n], t), f"{fmt}: {n} should stay 16-bit"
        config = json.loads((out / fmt / "config.json").read_text())
        assert config["model_type"] == json.loads((model / "config.json").read_text())["model_type"]
    if name in ("qwen2", "qwen2_moe"):
        assert "model.layers.0.self_attn.q_proj.bias" in tensors(out / "int4")
    if name == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate.weight" in tensors(out / "fp8")
        assert "model.layers.0.mlp.shared_expert.gate_proj.qweight" in tensors(out / "int4")
    if name == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.7.w2.qweight" in tensors(out / "int4")
        assert "model.layers.1.block_sparse_moe.gate.weight" in tensors(out / "int4")
    if name == "qwen3_tied":
        assert not any(n.startswith("lm_head") for n in tensors(out / "int4"))


def test_analyzer_exports_a_config_that_plans(family_gptq, tmp_path):
    from sglang_mixed_precision.core.config import load_config
    from sglang_mixed_precision.core.plan import build_plan

    name, model, _, out = family_gptq
    export = tmp_path / "mix.yaml"
    from sglang_mixed_precision.cli import main as cli_main

    assert cli_main(["analyze", "--model_path", str(out / "int4"), "--export_config", str(export)]) == 0
    doc = yaml.safe_load(export.read_text())["mixed_precision"]
    assert doc["int4_path"] and doc["fp16_path"]
    plan = build_plan(load_config(export))
    roles = {a.ref.role for a in plan.modules.values() if a.scheme.quantized}
    assert Role.ATTENTION in roles and roles <= {Role.ATTENTION, Role.DENSE_MLP, Role.SHARED_EXPERT, Role.ROUTED_EXPERT}
    routers = [a for a in plan.modules.values() if a.ref.role is Role.ROUTER]
    assert all(not a.scheme.quantized for a in routers)
    if name in ("qwen2_moe", "mixtral"):
        assert routers and any(a.ref.role is Role.ROUTED_EXPERT and a.scheme.quantized for a in plan.modules.values())
