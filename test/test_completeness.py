"""Incomplete models are refused: what a checkpoint must hold comes from its config.json, per
architecture (core/architectures.py), and every expected tensor must be in the source that gives it."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from sglang_mixed_precision.core.architectures import ARCHITECTURES, expected_modules
from sglang_mixed_precision.core.config import parse_config
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.core.formats import Scheme, detect_scheme
from sglang_mixed_precision.core.geometry import ModelGeometry
from sglang_mixed_precision.core.naming import classify
from sglang_mixed_precision.core.plan import build_plan
from sglang_mixed_precision.testing.shapegen import module_names, write_shape_checkpoint

FP8 = Scheme("fp8", dtype="BF16", fp8_block=(128, 128), fp8_strategy="block")
BASE = {
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "intermediate_size": 256,
    "vocab_size": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
CONFIGS = {
    "llama": {**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    "mistral": {**BASE, "model_type": "mistral", "architectures": ["MistralForCausalLM"]},
    "qwen2": {**BASE, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {**BASE, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
    "qwen2_moe": {
        **BASE,
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 2,  # SGLang 0.5.17 still makes every layer MoE
        "mlp_only_layers": [0],
    },
    "qwen3_moe": {
        **BASE,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "moe_intermediate_size": 128,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "mlp_only_layers": [1],
    },
    "mixtral": {
        **BASE,
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "deepseek_v3": {
        **BASE,
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "num_key_value_heads": 2,
        "moe_intermediate_size": 128,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
    },
}


def hf_saved_names(model_type: str, out) -> set[str]:
    """Tensor names transformers itself saves for a tiny model of this family (the ground truth)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in CONFIGS[model_type].items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).save_pretrained(str(out))
    names = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "numpy") as f:
            names.update(f.keys())
    return names


def hf_dense_layers(cfg: dict) -> set[int]:
    """Layers transformers builds without experts (mlp_only_layers, decoder_sparse_step)."""
    step = cfg.get("decoder_sparse_step", 1)
    return {i for i in range(cfg["num_hidden_layers"]) if i in cfg.get("mlp_only_layers", []) or (i + 1) % step}


def plan_of(text: str):
    return build_plan(parse_config(text, "/cfg/mix.yaml"))


def errors_of(text: str) -> ValidationErrors:
    with pytest.raises(MixedPrecisionError) as e:
        plan_of(text)
    return e.value if isinstance(e.value, ValidationErrors) else ValidationErrors([e.value])


def only(err: ValidationErrors, code: str) -> str:
    found = [str(x) for x in err.errors if x.code == code]
    assert found, f"no {code} in {err.codes}: {err}"
    return found[0]


# ---- the architecture table --------------------------------------------------------------------
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_expected_tensors_are_what_transformers_saves(model_type, tmp_path):
    """For every family, the table's tensors (biases included) are what transformers saves, on every
    layer both build alike (transformers honours mlp_only_layers; SGLang 0.5.17 builds experts in
    every layer of Qwen2/3-MoE, as the table does)."""
    cfg = CONFIGS[model_type]
    expected = expected_modules(cfg, ModelGeometry.from_hf_config(cfg))
    names = {f"{m.name}.{t}" for m in expected.values() for t in m.tensors}
    saved = hf_saved_names(model_type, tmp_path)
    differ = tuple(f"model.layers.{i}.mlp." for i in hf_dense_layers(cfg)) if "moe" in model_type else ()
    if differ:
        assert {n for n in saved if n.startswith(differ)} != {n for n in names if n.startswith(differ)}
    assert {n for n in names if not n.startswith(differ)} == {n for n in saved if not n.startswith(differ)}
    for module in expected.values():  # naming agrees with the table on every role
        assert classify(module.name).role is module.role, module.name


def test_every_family_has_a_test_config():
    assert set(ARCHITECTURES) == set(CONFIGS)


def test_qwen_moe_layers_are_all_moe_whatever_mlp_only_layers_says():
    for model_type in ("qwen2_moe", "qwen3_moe"):
        g = ModelGeometry.from_hf_config(CONFIGS[model_type])
        assert all(g.is_moe_layer(i) for i in range(g.layers)), model_type
    # a family the table does not know keeps transformers' rule
    g = ModelGeometry.from_hf_config({**CONFIGS["qwen3_moe"], "model_type": "other_moe"})
    assert [g.is_moe_layer(i) for i in range(3)] == [True, False, True]


def test_biases_and_tied_embeddings_per_family():
    def mods(model_type, **over):
        cfg = {**CONFIGS[model_type], **over}
        return expected_modules(cfg, ModelGeometry.from_hf_config(cfg))

    qwen2 = mods("qwen2")
    assert qwen2["model.layers.0.self_attn.q_proj"].tensors == ("weight", "bias")
    assert qwen2["model.layers.0.self_attn.o_proj"].tensors == ("weight",)
    assert mods("llama")["model.layers.0.self_attn.o_proj"].tensors == ("weight",)
    assert mods("llama", attention_bias=True)["model.layers.0.self_attn.o_proj"].tensors == ("weight", "bias")
    assert mods("qwen3", attention_bias=True)["model.layers.0.self_attn.k_proj"].tensors == ("weight", "bias")
    assert "lm_head" in qwen2 and "lm_head" not in mods("qwen2", tie_word_embeddings=True)
    moe = mods("qwen2_moe")
    assert "model.layers.2.mlp.shared_expert_gate" in moe and "model.layers.2.mlp.shared_expert.down_proj" in moe
    assert "model.layers.0.mlp.shared_expert_gate" not in mods("qwen2_moe", shared_expert_intermediate_size=0)
    mixtral = mods("mixtral")
    assert (
        "model.layers.1.block_sparse_moe.experts.3.w2" in mixtral and "model.layers.1.block_sparse_moe.gate" in mixtral
    )


def test_shapegen_names_come_from_the_table():
    for cfg in CONFIGS.values():
        assert list(module_names(cfg)) == list(expected_modules(cfg, ModelGeometry.from_hf_config(cfg)))
    with pytest.raises(MixedPrecisionError) as e:
        list(module_names({**BASE, "model_type": "gpt_neox"}))
    assert e.value.code == "unsupported_architecture" and "'gpt_neox'" in str(e.value)


# ---- the plan refuses incomplete sources --------------------------------------------------------
@pytest.mark.parametrize(
    "model_type,dropped,needle",
    [
        ("qwen3", "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj"),
        ("llama", "model.layers.2.post_attention_layernorm.weight", "model.layers.2.post_attention_layernorm"),
        ("qwen3", "model.norm.weight", "model.norm"),
        ("qwen3", "lm_head.weight", "lm_head"),
        ("qwen3_moe", "model.layers.1.mlp.experts.2.down_proj.weight", "model.layers.1.mlp.experts.2.down_proj"),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2.weight", "block_sparse_moe.experts.3.w2"),
        ("qwen2_moe", "model.layers.2.mlp.shared_expert_gate.weight", "model.layers.2.mlp.shared_expert_gate"),
        ("qwen3", "model.layers.0.self_attn.k_norm.weight", "model.layers.0.self_attn.k_norm"),
    ],
)
def test_a_missing_module_is_refused(tmp_path, model_type, dropped, needle):
    src = write_shape_checkpoint(CONFIGS[model_type], tmp_path / "bf16", drop=lambda n: n == dropped)
    msg = only(errors_of(f"mixed_precision:\n  fp16_path: {src}\n"), "missing_tensor")
    assert f"source 'fp16' lacks 1 module(s) that its config.json ({model_type}, 3 layers" in msg
    assert needle in msg and str(src) in msg and "download the missing files again" in msg


def test_a_missing_bias_is_refused(tmp_path):
    src = write_shape_checkpoint(
        CONFIGS["qwen2"], tmp_path / "bf16", drop=lambda n: n == "model.layers.1.self_attn.v_proj.bias"
    )
    msg = only(errors_of(f"mixed_precision:\n  fp16_path: {src}\n"), "missing_tensor")
    assert "lack their 'bias' tensor: model.layers.1.self_attn.v_proj" in msg


def test_config_with_more_layers_than_the_checkpoint(tmp_path):
    src = write_shape_checkpoint(CONFIGS["qwen3"], tmp_path / "bf16")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 6}))
    msg = only(errors_of(f"mixed_precision:\n  fp16_path: {src}\n"), "missing_tensor")
    assert "lacks 33 module(s) that its config.json (qwen3, 6 layers) implies: layers 3-5 (every module)" in msg


def test_checkpoint_with_more_layers_than_its_config(tmp_path):
    src = write_shape_checkpoint({**CONFIGS["llama"], "num_hidden_layers": 5}, tmp_path / "bf16")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    msg = only(errors_of(f"mixed_precision:\n  fp16_path: {src}\n"), "architecture_mismatch")
    assert "holds layers 3-4, but its config.json says num_hidden_layers=3" in msg


def test_shards_without_index_with_one_deleted(tmp_path):
    src = write_shape_checkpoint(CONFIGS["qwen3"], tmp_path / "bf16", shard_bytes=40_000, index=False)
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) >= 4
    shards[1].unlink()
    err = errors_of(f"mixed_precision:\n  fp16_path: {src}\n")
    msg = only(err, "missing_file")
    assert f"1 of {len(shards)} shards are missing from {src} (the directory holds {len(shards) - 1})" in msg
    assert shards[1].name in msg
    # and without the numbering, the layers it held are what is missing
    for i, shard in enumerate(sorted(src.glob("*.safetensors"))):
        shard.rename(src / f"part{i}.safetensors")
    assert "module(s) that its config.json" in only(
        errors_of(f"mixed_precision:\n  fp16_path: {src}\n"), "missing_tensor"
    )


def test_a_module_the_skeleton_lacks_may_come_from_another_source(tmp_path):
    cfg = CONFIGS["qwen3"]
    name = "model.layers.2.mlp.down_proj"
    bf16 = write_shape_checkpoint(cfg, tmp_path / "bf16", drop=lambda n: n.startswith(name + "."))
    fp8 = write_shape_checkpoint(cfg, tmp_path / "fp8", FP8)
    text = f"mixed_precision:\n  fp16_path: {bf16}\n  fp8_path: {fp8}\n"
    assert "lacks 1 module(s)" in only(errors_of(text), "missing_tensor")
    plan = plan_of(text + f"  weight_mapping:\n    {name}: fp8\n")
    assert plan.modules[name].label == "fp8"
    # both lack it: the source it is assigned to is named
    fp8_too = write_shape_checkpoint(cfg, tmp_path / "fp8b", FP8, drop=lambda n: n.startswith(name + "."))
    text = f"mixed_precision:\n  fp16_path: {bf16}\n  fp8_path: {fp8_too}\n  weight_mapping:\n    {name}: fp8\n"
    assert "source 'fp8' lacks 1 module(s)" in only(errors_of(text), "missing_tensor")


def test_tied_embeddings_need_no_lm_head(tmp_path):
    src = write_shape_checkpoint({**CONFIGS["qwen2"], "tie_word_embeddings": True}, tmp_path / "bf16")
    with safe_open(str(next(src.glob("*.safetensors"))), "numpy") as f:
        assert "lm_head.weight" not in set(f.keys())
    plan = plan_of(f"mixed_precision:\n  fp16_path: {src}\n")
    assert "lm_head" not in plan.modules and plan.warnings == []


def test_unknown_model_type_plans_with_a_warning(tmp_path):
    cfg = CONFIGS["llama"]
    src = write_shape_checkpoint(cfg, tmp_path / "bf16")
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "my_llama"}))
    plan = plan_of(f"mixed_precision:\n  fp16_path: {src}\n")
    assert len(plan.modules) == len(list(module_names(cfg)))
    (warning,) = plan.warnings
    assert "model_type 'my_llama' is not one whose modules the plan knows" in warning
    assert "cannot check that none is missing" in warning and "qwen3_moe" in warning


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"num_attention_heads": 0}, "num_attention_heads is 0: it must be an integer of at least 1"),
        ({"hidden_size": -128}, "hidden_size is -128"),
        ({"num_hidden_layers": 2.0}, "num_hidden_layers is 2.0"),
        ({"vocab_size": "64"}, "vocab_size is '64'"),
        ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
        ({"num_key_value_heads": 3}, "num_attention_heads 2 is not a multiple of num_key_value_heads 3"),
        ({"head_dim": None, "hidden_size": 129}, "hidden_size 129 is not a multiple of num_attention_heads 2"),
        ({"intermediate_size": True}, "intermediate_size is True"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false', not true or false"),
        ({"vocab_size": None}, "lacks a model dimension ('vocab_size')"),
    ],
)
def test_config_json_dimensions_are_checked(tmp_path, change, needle):
    src = write_shape_checkpoint(CONFIGS["qwen3"], tmp_path / "bf16")
    (src / "config.json").write_text(json.dumps({**CONFIGS["qwen3"], **change}))
    msg = only(errors_of(f"mixed_precision:\n  fp16_path: {src}\n"), "corrupt_config")
    assert needle in msg and str(src / "config.json") in msg and "restore the model's original config.json" in msg


def test_moe_config_without_its_expert_count(tmp_path):
    cfg = {k: v for k, v in CONFIGS["qwen3_moe"].items() if k != "num_experts"}
    with pytest.raises(MixedPrecisionError) as e:
        ModelGeometry.from_hf_config(cfg, where="m/config.json")
    assert e.value.code == "corrupt_config" and "lacks a model dimension ('num_experts')" in str(e.value)
    # transformers 5 writes the Qwen-MoE count as num_local_experts
    assert ModelGeometry.from_hf_config({**cfg, "num_local_experts": 4}).num_experts == 4


def test_converter_refuses_an_incomplete_input(tiny_qwen3, tmp_path):
    from ckpt_writers import rewrite_checkpoint
    from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert

    broken = rewrite_checkpoint(tiny_qwen3, tmp_path / "in", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    out = tmp_path / "out"
    with pytest.raises(MixedPrecisionError) as e:
        convert(ConvertOptions(str(broken), str(out), formats=("fp16", "fp8"), method="rtn", progress=False))
    assert e.value.code == "missing_tensor"
    assert "the input lacks 1 tensor(s) that its config.json (qwen3, 2 layers) implies" in str(e.value)
    assert "model.layers.1.mlp.up_proj" in str(e.value) and not out.exists()


# ---- whatever config.json says, only the project's errors escape ---------------------------------
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)
_keys = st.sampled_from(
    [*BASE, "model_type", "num_experts", "num_local_experts", "moe_intermediate_size", "mlp_only_layers"]
    + ["decoder_sparse_step", "shared_expert_intermediate_size", "text_config", "attention_bias", "qkv_bias"]
)
_quant = st.fixed_dictionaries(
    {"quant_method": st.sampled_from(["fp8", "gptq", "gptq_marlin", "compressed-tensors", "awq", 3])},
    optional={
        k: _values
        for k in ("bits", "group_size", "sym", "desc_act", "fmt", "weight_block_size", "config_groups")
        + ("checkpoint_format",)
    },
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(
    model_type=st.sampled_from([*CONFIGS, "other"]),
    changes=st.dictionaries(_keys, _values, max_size=3),
    quant=st.none() | _quant | _values,
)
def test_hostile_config_json_raises_only_project_errors(model_type, changes, quant):
    cfg = {**CONFIGS.get(model_type, {**CONFIGS["llama"], "model_type": "other"}), **changes}
    if quant is not None:
        cfg["quantization_config"] = quant
    try:
        detect_scheme(cfg, where="m/config.json")
        g = ModelGeometry.from_hf_config(cfg, where="m/config.json")
        modules = expected_modules(cfg, g)
    except MixedPrecisionError as e:
        assert e.code in ("corrupt_config", "unsupported_scheme") and e.fix
        return
    assert g.hidden >= 1 and g.heads % g.kv_heads == 0 and g.layers >= 1
    assert modules is None or len(modules) >= 3 * g.layers
