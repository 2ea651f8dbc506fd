"""The reference forward pass: every module from its planned source, dequantized where needed."""

from __future__ import annotations

import pytest
import torch

from serving_harness import converted, mix_config, write_mix
from sglang_mixed_precision.core.errors import MixedPrecisionError
from sglang_mixed_precision.reference import (
    build_reference_model,
    fake_quant_fp8_activation,
    fill_model,
    generate_reference,
    logprob_deviation,
    logprob_tolerance,
    module_weights,
    plan_from_config,
    reference_pair,
    scored_continuation,
    simulate_fp8_activations,
    teacher_forced_logprobs,
)
from sglang_mixed_precision.tensors import read_tensor
from sglang_mixed_precision.testing.tinymodels import tiny_config


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_all_bf16_reference_is_the_checkpoint_as_transformers_loads_it(arch, request):
    """Same parameters (experts stacked into transformers' fused layout) and the same logits."""
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    plan = plan_from_config(write_mix(converted(str(model_dir)), "all_bf16", "fp16", []))
    ours = build_reference_model(plan)
    theirs = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, theirs_params[name]), name
    ids = list(range(5, 40))
    assert torch.equal(teacher_forced_logprobs(ours, ids), teacher_forced_logprobs(theirs, ids))


def test_quantized_modules_are_dequantized_from_their_source(tiny_qwen3):
    from sglang_mixed_precision.core.formats.fp8 import dequant_block as dequant_fp8_block
    from sglang_mixed_precision.core.formats.gptq import dequant as dequant_gptq

    plan = plan_from_config(mix_config(str(tiny_qwen3), "per_layer"))
    fp16 = plan_from_config(write_mix(converted(str(tiny_qwen3)), "all_bf16", "fp16", []))
    model = build_reference_model(plan)
    params = dict(model.named_parameters())

    fp8_module = "model.layers.1.mlp.up_proj"  # fp8 in this mix
    src = plan.sources["fp8"]
    expected = dequant_fp8_block(
        read_tensor(src, fp8_module + ".weight"), read_tensor(src, fp8_module + ".weight_scale_inv")
    )
    assert torch.equal(params[fp8_module + ".weight"], expected)
    assert _relative_error(expected, module_weights(fp16, fp8_module)["weight"]) < 0.05

    int4_module = "model.layers.1.self_attn.k_proj"  # int4 in this mix
    src = plan.sources["int4"]
    q = {s: read_tensor(src, f"{int4_module}.{s}") for s in ("qweight", "qzeros", "scales")}
    expected = dequant_gptq(q["qweight"], q["qzeros"], q["scales"], None)
    assert torch.equal(params[int4_module + ".weight"], expected)
    assert _relative_error(expected, module_weights(fp16, int4_module)["weight"]) < 0.15

    bf16_module = "model.layers.0.self_attn.q_proj"
    assert torch.equal(params[bf16_module + ".weight"], module_weights(fp16, bf16_module)["weight"].float())


def test_moe_experts_from_int4_are_stacked_per_expert(tiny_qwen3_moe):
    plan = plan_from_config(mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4"))
    experts = build_reference_model(plan).model.layers[0].mlp.experts
    inter = experts.down_proj.shape[-1]
    for e in (0, 7):
        base = f"model.layers.0.mlp.experts.{e}."
        assert torch.equal(experts.gate_up_proj[e][:inter], module_weights(plan, base + "gate_proj")["weight"])
        assert torch.equal(experts.gate_up_proj[e][inter:], module_weights(plan, base + "up_proj")["weight"])
        assert torch.equal(experts.down_proj[e], module_weights(plan, base + "down_proj")["weight"])


def test_fp8_activation_model_matches_e4m3_rounding():
    torch.manual_seed(0)
    x = torch.randn(3, 256) * torch.logspace(-2, 2, 256)
    q = fake_quant_fp8_activation(x)
    assert torch.equal(fake_quant_fp8_activation(q), q)  # already on the grid
    groups, qg = x.reshape(3, 2, 128), q.reshape(3, 2, 128)
    amax = groups.abs().amax(-1, keepdim=True)
    assert torch.allclose(qg.abs().amax(-1, keepdim=True), amax, rtol=1e-6)  # the group's max maps to 448 exactly
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 for normal numbers, absolute error
    # at most half of the smallest subnormal step (2^-10 in scaled units) below that.
    err = (qg - groups).abs()
    bound = torch.maximum(groups.abs() / 16, amax / 448 * 2.0**-10)
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert float(err.max()) > 0


def test_w8a8_simulation_applies_to_fp8_modules_only(tiny_qwen3, tiny_qwen3_moe):
    dense = plan_from_config(mix_config(str(tiny_qwen3), "per_layer"))
    model = build_reference_model(dense)
    assert simulate_fp8_activations(model, dense) == 3  # layer 1 gate_proj, up_proj, down_proj
    moe_fp8 = plan_from_config(
        write_mix(converted(str(tiny_qwen3_moe)), "experts_fp8", "fp16", [("model.layers.*.mlp.experts.*", "fp8")])
    )
    model = build_reference_model(moe_fp8)
    ids = list(range(3, 30))
    a = teacher_forced_logprobs(model, ids)
    assert simulate_fp8_activations(model, moe_fp8) == 2  # one fused experts module per layer
    b = teacher_forced_logprobs(model, ids)
    assert not torch.equal(a, b) and float((a - b).abs().max()) < 1.0
    int4_only = plan_from_config(
        write_mix(converted(str(tiny_qwen3)), "mlp_int4", "fp16", [("model.layers.*.mlp.*", "int4")])
    )
    assert simulate_fp8_activations(build_reference_model(int4_only), int4_only) == 0


def test_greedy_generation_is_consistent_with_a_full_forward(tiny_qwen3_moe):
    plan = plan_from_config(mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4"))
    model = build_reference_model(plan, simulate_w8a8=True)
    (out,) = generate_reference(plan, ["Once upon a time"], 8, model=model)
    assert len(out.output_ids) == 8 and isinstance(out.text, str)
    full = teacher_forced_logprobs(model, out.prompt_ids + out.output_ids)
    n = len(out.prompt_ids)
    # Each token is the argmax of the full forward at its position; the cached logits agree with it.
    assert full[n - 1 : n - 1 + 8].argmax(-1).tolist() == out.output_ids
    assert torch.allclose(full[n - 1 : n - 1 + 8], out.logprobs, atol=1e-3)


def test_logprob_deviation_measures_against_fp32_and_bf16_noise(tiny_qwen3):
    plan = plan_from_config(mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8"))
    pair = reference_pair(plan)
    prompt, tokens = list(range(5, 20)), [7, 300, 41, 9]
    lp32 = teacher_forced_logprobs(pair.fp32, prompt + tokens)
    own = [float(lp32[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens)]
    dev, noise = logprob_deviation(pair, [scored_continuation(prompt, tokens, own)])
    assert dev == 0 and 0 < noise < 0.5  # the fp32 reference's own log-probs; bf16 arithmetic moves them a little
    shifted = [own[0], own[1] - 0.25, *own[2:]]
    assert logprob_deviation(pair, [scored_continuation(prompt, tokens, shifted)]) == (pytest.approx(0.25), noise)
    assert logprob_tolerance(0.1) == pytest.approx(0.32)


@pytest.mark.parametrize(
    "change, code",
    [
        ({"num_layers": 1}, "reference_no_parameter"),
        ({"num_layers": 3}, "reference_unfilled"),
        ({"hidden": 256}, "reference_shape"),
    ],
)
def test_a_model_unlike_the_plan_is_refused(tiny_qwen3, change, code):
    from transformers import AutoModelForCausalLM

    plan = plan_from_config(write_mix(converted(str(tiny_qwen3)), "all_bf16", "fp16", []))
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", **change))
    with pytest.raises(MixedPrecisionError, match=code) as e:
        fill_model(model, plan)
    message = {
        "reference_no_parameter": "has no parameter model.layers.1.",
        "reference_unfilled": "have no planned source: model.layers.2.",
        "reference_shape": "the model has (",
    }[code]
    assert message in str(e.value)


def test_activation_width_must_be_whole_groups():
    with pytest.raises(MixedPrecisionError, match="reference_act_group") as e:
        fake_quant_fp8_activation(torch.zeros(2, 200))
    assert "activation width 200 is not a multiple of 128" in str(e.value)


def test_demo_runs_a_mix_on_cpu_through_the_reference_path(tmp_path, capsys):
    from sglang_mixed_precision.cli import main

    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--cpu", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "gptq-int4-g128" in out and "fp8-block128" in out  # the plan's tables
    assert "generating through the reference path" in out
    # the shipped model learned Python: after a `def` line comes an indented body
    assert "'def read_lines(path):\\n' -> '    " in out
    assert "NVIDIA GPU" in out and "launch_mixed_precision_server.py --enable-mixed-precision" in out
    assert (tmp_path / "demo" / "converted" / "mixed_precision_config.yaml").is_file()
