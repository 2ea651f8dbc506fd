"""The transformers reference and the demo for DeepSeek-V3: the router's e_score_correction_bias (a buffer)
from its source, and SGLang's two MLA computations for an FP8 kv_b_proj (reference.MlaPaths)."""

from __future__ import annotations

import pytest
import torch

from serving_harness import converted, write_mix
from sglang_mixed_precision.reference import (
    build_reference_model,
    greedy,
    mla_paths,
    plan_from_config,
    teacher_forced_logprobs,
)
from sglang_mixed_precision.testing.tinymodels import make_tiny_model

FP8_MIX = [
    ("model.layers.*.mlp.experts.*", "int4"),
    ("model.layers.*.self_attn.*", "fp8"),
    ("model.layers.*.mlp.shared_experts.*", "fp8"),
]
IDS = list(range(5, 29))


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    return make_tiny_model("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3_ref") / "bf16")


@pytest.fixture(scope="module")
def fp8_reference(tiny_deepseek):
    plan = plan_from_config(write_mix(converted(str(tiny_deepseek)), "ref_fp8", "fp16", FP8_MIX))
    return build_reference_model(plan, simulate_w8a8=True)


def test_all_bf16_reference_is_the_checkpoint_as_transformers_loads_it(tiny_deepseek):
    from transformers import AutoModelForCausalLM

    plan = plan_from_config(write_mix(converted(str(tiny_deepseek)), "ref_bf16", "fp16", []))
    ours = build_reference_model(plan, simulate_w8a8=True)
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_deepseek), dtype=torch.float32).eval()
    assert mla_paths(ours) is None  # a 16-bit kv_b_proj: SGLang's two paths compute the same
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert dict(ours.named_buffers())[bias].abs().sum() > 0  # the tiny model's biases are not zero
    for name, t in [*theirs.named_parameters(), *theirs.named_buffers()]:
        if "rotary_emb" not in name:
            assert torch.equal(dict([*ours.named_parameters(), *ours.named_buffers()])[name], t), name
    assert torch.equal(teacher_forced_logprobs(ours, IDS), teacher_forced_logprobs(theirs, IDS))


def test_fp8_kv_b_proj_is_quantized_in_prefill_only(fp8_reference):
    paths = mla_paths(fp8_reference)
    assert paths is not None and not paths.decode
    ids = torch.tensor([IDS])
    with torch.no_grad():
        prefill = fp8_reference(input_ids=ids).logits[0]
        paths.decode = True
        decode = fp8_reference(input_ids=ids).logits[0]
        paths.decode = False
    assert (prefill - decode).abs().max() > 1e-3  # the hook acts, and only in the prefill path
    # teacher-forced: prompt positions from the prefill pass, later ones from the decode pass
    mixed = teacher_forced_logprobs(fp8_reference, IDS, prompt_len=10)
    assert torch.allclose(mixed[:10], prefill[:10].log_softmax(-1), atol=1e-5)
    assert torch.allclose(mixed[10:], decode[10:].log_softmax(-1), atol=1e-5)
    # greedy: the first token from the prompt's pass, the second from a decode pass over prompt + first
    tokens, logits = greedy(fp8_reference, IDS, 2)
    assert tokens[0] == int(prefill[-1].argmax()) and torch.allclose(logits[0], prefill[-1], atol=1e-4)
    with torch.no_grad():
        paths.decode = True
        second = fp8_reference(input_ids=torch.tensor([IDS + tokens[:1]])).logits[0, -1]
        paths.decode = False
    assert torch.allclose(logits[1], second, atol=1e-4) and tokens[1] == int(second.argmax())


def test_demo_runs_deepseek_on_cpu(tmp_path, capsys):
    from sglang_mixed_precision.cli import main

    assert main(["demo", "--arch", "deepseek_v3", "--workdir", str(tmp_path), "--cpu", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "routed experts int4, dense and shared-expert MLPs fp8" in out
    assert "gptq-int4-g128" in out and "fp8-block128" in out and "Warnings:" not in out
    assert "'Once upon a time' -> " in out
