"""DeepSeek-V3 planned from shape-only checkpoints: MLA names and shapes, dense and MoE layers, the fused
q_a/kv_a layer, per-rank FP8 rules and what SGLang 0.5.17's DeepseekV3ForCausalLM cannot serve."""

from __future__ import annotations

import pytest

from sglang_mixed_precision.core.architectures import expected_modules
from sglang_mixed_precision.core.config import parse_config
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.core.formats import Scheme
from sglang_mixed_precision.core.geometry import ModelGeometry
from sglang_mixed_precision.core.plan import build_plan
from sglang_mixed_precision.core.report import summary
from sglang_mixed_precision.testing.shapegen import write_shape_checkpoint

FP8 = Scheme("fp8", dtype="BF16", fp8_block=(128, 128), fp8_strategy="block")
FP8_64 = Scheme("fp8", dtype="BF16", fp8_block=(64, 64), fp8_strategy="block")
INT4 = Scheme("gptq", dtype="BF16", bits=4, group_size=128, sym=True, desc_act=False)
# DeepSeek-V3's own head dimensions, 4 heads, 3 layers (layer 0 dense)
CFG = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "topk_method": "noaux_tc",
    "q_lora_rank": 256,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "head_dim": 64,
    "vocab_size": 256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
A = "model.layers.1.self_attn."


def sources(tmp_path, cfg=CFG, **schemes):
    out = {"fp16": write_shape_checkpoint(cfg, tmp_path / "fp16")}
    for label, scheme in schemes.items():
        out[label] = write_shape_checkpoint(cfg, tmp_path / label, scheme)
    return out


def plan_of(paths: dict, rules: list[tuple[str, str]], default: str = "fp16", tp: int = 1):
    lines = ["mixed_precision:", "  sources:"] + [f"    {k}: {v}" for k, v in paths.items()]
    lines += [f"  default: {default}", "  rules:"] + [f"    - {{match: '{m}', source: {s}}}" for m, s in rules]
    return build_plan(parse_config("\n".join(lines) + "\n", "/cfg/mix.yaml"), tp_size=tp)


def errors_of(*args, **kwargs) -> ValidationErrors:
    with pytest.raises(MixedPrecisionError) as e:
        plan_of(*args, **kwargs)
    return e.value if isinstance(e.value, ValidationErrors) else ValidationErrors([e.value])


def messages(err: ValidationErrors, code: str) -> list[str]:
    found = [str(x) for x in err.errors if x.code == code]
    assert found, f"no {code} in {err.codes}: {err}"
    return found


def test_mla_modules_shapes_and_dense_layers():
    g = ModelGeometry.from_hf_config(CFG)
    expected = expected_modules(CFG, g)
    assert [g.is_moe_layer(i) for i in range(3)] == [False, True, True]
    layer1 = [n.removeprefix("model.layers.1.") for n in expected if n.startswith("model.layers.1.")]
    assert layer1[:9] == [
        "input_layernorm",
        "self_attn.q_a_proj",
        "self_attn.q_a_layernorm",
        "self_attn.q_b_proj",
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_a_layernorm",
        "self_attn.kv_b_proj",
        "self_attn.o_proj",
        "mlp.gate",
    ]
    assert expected["model.layers.1.mlp.gate"].tensors == ("weight", "e_score_correction_bias")
    assert "model.layers.0.mlp.gate_proj" in expected and "model.layers.0.mlp.gate" not in expected
    assert {"model.layers.2.mlp.shared_experts.down_proj", "model.layers.2.mlp.experts.3.up_proj"} <= set(expected)
    assert g.shared_intermediate == 256 and g.num_experts == 4
    # moe_layer_freq 2: only even layers past first_k_dense_replace get experts (SGLang's rule)
    g2 = ModelGeometry.from_hf_config({**CFG, "num_hidden_layers": 5, "moe_layer_freq": 2})
    assert [g2.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]
    # without q_lora_rank: one q_proj, and no q_a_layernorm
    g3 = ModelGeometry.from_hf_config({**CFG, "q_lora_rank": None})
    names = expected_modules({**CFG, "q_lora_rank": None}, g3)
    assert A + "q_proj" in names and A + "q_a_proj" not in names and A + "q_a_layernorm" not in names


def test_plan_groups_mla_as_sglang_builds_it(tmp_path):
    plan = plan_of(sources(tmp_path, fp8=FP8), [("model.layers.*.self_attn.*", "fp8")])
    fused = plan.groups[A + "fused_qkv_a_proj_with_mqa"]
    assert sorted(fused.members) == [A + "kv_a_proj_with_mqa", A + "q_a_proj"] and fused.label == "fp8"
    assert plan.modules[A + "q_a_proj"].shape == (256, 512)
    assert plan.modules[A + "kv_a_proj_with_mqa"].shape == (576, 512)
    assert plan.modules[A + "q_b_proj"].shape == (4 * 192, 256)
    assert plan.modules[A + "kv_b_proj"].shape == (4 * 256, 512)
    assert plan.modules[A + "o_proj"].shape == (512, 4 * 128)
    # norms, router (with its correction bias) stay with the 16-bit source
    for name in (A + "q_a_layernorm", A + "kv_a_layernorm", "model.layers.1.mlp.gate"):
        assert plan.modules[name].label == "fp16" and not plan.modules[name].scheme.quantized
    assert "e_score_correction_bias" in plan.modules["model.layers.1.mlp.gate"].tensors


def test_plan_without_q_lora_rank_keeps_q_proj_and_kv_a_apart(tmp_path):
    cfg = {**CFG, "q_lora_rank": None}
    plan = plan_of(sources(tmp_path, cfg, fp8=FP8), [("model.layers.*.self_attn.*", "fp8")])
    assert A + "q_proj" in plan.groups and A + "kv_a_proj_with_mqa" in plan.groups
    assert A + "qkv_proj" not in plan.groups and A + "fused_qkv_a_proj_with_mqa" not in plan.groups
    assert plan.modules[A + "q_proj"].shape == (4 * 192, 512)


def test_fp8_attention_shared_experts_and_int4_experts_plan(tmp_path):
    plan = plan_of(
        sources(tmp_path, fp8=FP8, int4=INT4),
        [
            ("model.layers.*.mlp.experts.*", "int4"),
            ("model.layers.*.self_attn.*", "fp8"),
            ("model.layers.*.mlp.shared_experts.*", "fp8"),
        ],
    )
    labels = {p: g.scheme.label() for p, g in plan.groups.items() if ".layers.2." in p and g.scheme.quantized}
    assert labels == {
        "model.layers.2.self_attn.fused_qkv_a_proj_with_mqa": "fp8-block128",
        "model.layers.2.self_attn.q_b_proj": "fp8-block128",
        "model.layers.2.self_attn.kv_b_proj": "fp8-block128",
        "model.layers.2.self_attn.o_proj": "fp8-block128",
        "model.layers.2.mlp.shared_experts.gate_up_proj": "fp8-block128",
        "model.layers.2.mlp.shared_experts.down_proj": "fp8-block128",
        "model.layers.2.mlp.experts": "gptq-int4-g128",
    }
    assert plan.groups["model.layers.0.mlp.gate_up_proj"].label == "fp16"


@pytest.mark.parametrize(
    "match,leaf,needle",
    [
        ("model.layers.*.self_attn.*", "fused_qkv_a_proj_with_mqa", "concatenates q_a_proj and kv_a_proj_with_mqa"),
        ("model.layers.*.self_attn.q_b_proj", "q_b_proj", "reads q_b_proj.weight.shape"),
        ("model.layers.*.self_attn.kv_b_proj", "kv_b_proj", "splits kv_b_proj into w_kc / w_vc"),
        ("model.layers.*.self_attn.o_proj", "o_proj", "reads o_proj.weight.dtype"),
        ("model.layers.*.mlp.shared_experts.*", "gate_up_proj", "shared_experts.gate_up_proj.weight.dtype"),
    ],
)
def test_int4_where_sglang_cannot_serve_it_is_refused_with_the_reason(tmp_path, match, leaf, needle):
    err = errors_of(sources(tmp_path, int4=INT4), [(match, "int4")])
    msg = next(m for m in messages(err, "architecture_refuses_scheme") if f"serve {leaf} " in m)
    assert "deepseek_v3" in msg and "gptq-int4-g128" in msg and needle in msg
    assert "model.layers.1." in msg and "model.layers.2." in msg and "16-bit or FP8 source" in msg


def test_int4_dense_mlp_and_experts_are_allowed(tmp_path):
    plan = plan_of(
        sources(tmp_path, int4=INT4), [("model.layers.*.mlp.experts.*", "int4"), ("model.layers.0.mlp.*", "int4")]
    )
    assert plan.groups["model.layers.0.mlp.gate_up_proj"].scheme == INT4
    assert plan.groups["model.layers.1.mlp.experts"].scheme == INT4


def test_splitting_the_fused_q_a_kv_a_layer_is_refused(tmp_path):
    err = errors_of(sources(tmp_path, fp8=FP8), [("model.layers.1.self_attn.q_a_proj", "fp8")])
    (msg,) = messages(err, "mixed_group")
    assert A + "fused_qkv_a_proj_with_mqa" in msg and "q_a_proj" in msg and "kv_a_proj_with_mqa" in msg


def test_fp8_block_rules_for_mla(tmp_path):
    # q_lora_rank 192: the fused q_a/kv_a weight's block scales no longer line up when concatenated
    cfg = {**CFG, "q_lora_rank": 192}
    err = errors_of(sources(tmp_path / "a", cfg, fp8=FP8), [("model.layers.*.self_attn.*", "fp8")])
    msg = messages(err, "tp_indivisible")[0]
    assert "part 0 (192 rows) is not divisible by block_n 128" in msg and "fused_qkv_a_proj_with_mqa" in msg
    # at tp 8, kv_b_proj's 1024 rows give 128 per rank (fine), o_proj's K 512 gives 64 (not a block)
    err = errors_of(sources(tmp_path / "b", fp8=FP8), [("model.layers.*.self_attn.*", "fp8")], tp=8)
    problems = " ".join(messages(err, "tp_indivisible"))
    assert "per-rank K 64 (of 512) is not divisible by block_k 128" in problems and "o_proj" in problems
    assert "kv_b_proj" not in problems and "fused_qkv_a" not in problems


def test_fp8_linears_of_two_block_sizes_are_refused(tmp_path):
    err = errors_of(
        sources(tmp_path, fp8=FP8, fp8b=FP8_64),
        [("model.layers.1.self_attn.*", "fp8"), ("model.layers.2.self_attn.*", "fp8b")],
    )
    (msg,) = messages(err, "architecture_refuses_scheme")
    assert "fp8-block128" in msg and "fp8-block64" in msg and "kv_b_proj" in msg and "one weight_block_size" in msg


def test_replicated_fused_q_a_kv_a_counts_in_full_on_every_rank(tmp_path):
    paths = sources(tmp_path, fp8=FP8)
    rules = [("model.layers.*.self_attn.*", "fp8")]
    one, two = plan_of(paths, rules), plan_of(paths, rules, tp=2)
    fused = A + "q_a_proj"
    g1, g2 = one.geometry, two.geometry
    assert g2.rank_fraction(two.modules[fused].ref, 2) == 1.0
    assert g2.rank_fraction(two.modules[A + "q_b_proj"].ref, 2) == 0.5
    assert g1.rank_fraction(one.modules[fused].ref, 1) == 1.0
    assert summary(two)["per_rank"][0]["bytes"] > summary(one)["per_rank"][0]["bytes"] / 2


def test_launcher_turns_shared_expert_fusion_off(capsys):
    from sglang_mixed_precision.serving.launcher import family_flags

    assert family_flags("deepseek_v3") == ["--disable-shared-experts-fusion"]
    assert "shared expert" in capsys.readouterr().out
    assert family_flags("qwen3") == []


def test_analyzer_exports_the_deepseek_mix_that_plans(tmp_path, capsys):
    from sglang_mixed_precision.cli import main

    paths = sources(tmp_path, fp8=FP8, int4=INT4)
    out = tmp_path / "mix.yaml"
    argv = ["analyze", "--model_path", str(paths["fp16"]), "--export_config", str(out)]
    argv += ["--attention_precision", "fp8", "--mlp_precision", "fp8", "--shared_expert_precision", "fp8"]
    argv += ["--expert_precision", "int4", "--fp8_path", str(paths["fp8"]), "--int4_path", str(paths["int4"])]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "shared_expert" in table and "routed_expert" in table and "router" in table
    plan = build_plan(parse_config(out.read_text(), str(out)))
    assert plan.groups[A + "fused_qkv_a_proj_with_mqa"].label == "fp8"
    assert plan.groups["model.layers.1.mlp.shared_experts.gate_up_proj"].label == "fp8"
    assert plan.groups["model.layers.1.mlp.experts"].label == "int4"
    assert plan.groups["model.layers.0.mlp.down_proj"].label == "fp8"
    assert plan.modules["model.layers.1.mlp.gate"].label == "fp16"
