"""Plugin registration and the composite quantization config, with SGLang's real classes on CPU."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

from serving_harness import (
    init_sglang_cpu,
    load_on_cpu,
    methods_by_prefix,
    mix_config,
    model_config,
)
from sglang_mixed_precision.core.errors import MixedPrecisionError
from sglang_mixed_precision.serving.plandir import make_plan_dir


@pytest.fixture(scope="module")
def sglang_cpu():
    init_sglang_cpu()


def test_entry_point_is_declared_for_sglang():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("mixed_precision") == "sglang_mixed_precision.serving.plugin:register"


def test_register_adds_method_choice_and_loader_hook(sglang_cpu):
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import QUANTIZATION_CHOICES

    from sglang_mixed_precision.serving.hooks import LOADER_TARGET, select_model_loader
    from sglang_mixed_precision.serving.plugin import register
    from sglang_mixed_precision.serving.quant_config import MixedPrecisionConfig

    register()  # a second call changes nothing
    assert get_quantization_config("mixed_precision") is MixedPrecisionConfig
    assert QUANTIZATION_CHOICES.count("mixed_precision") == 1
    hooks = [h for _, h, _ in HookRegistry._hooks[LOADER_TARGET]]
    assert hooks.count(select_model_loader) == 1
    import sglang.srt.model_loader as package
    import sglang.srt.model_loader.loader as loader_module

    # Applied to the defining module and to the package's re-export SGLang calls.
    assert loader_module.get_model_loader.__wrapped__ is not None
    assert package.get_model_loader is loader_module.get_model_loader
    assert MixedPrecisionConfig.get_name() == "mixed_precision"
    assert "mixed_precision" in QUANTIZATION_METHODS


def test_a_mixed_mixtral_keeps_its_own_class(sglang_cpu):
    """SGLang 0.5.17 sends a Mixtral of a quantization outside its list to QuantMixtralForCausalLM;
    the get_model_architecture hook, registered under every name SGLang imports it by, gives a mixed
    plan MixtralForCausalLM back and leaves every other model alone."""
    from types import SimpleNamespace

    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_mixed_precision.serving.hooks import ARCHITECTURE_TARGETS, select_family_class
    from sglang_mixed_precision.serving.plugin import register

    register()
    for target in ARCHITECTURE_TARGETS:
        assert [h for _, h, _ in HookRegistry._hooks[target]].count(select_family_class) == 1

    def sglang_choice(model_config):
        return ModelRegistry.resolve_model_cls(["QuantMixtralForCausalLM"])

    def model_config(quantization):
        hf = SimpleNamespace(model_type="mixtral", architectures=["MixtralForCausalLM"])
        return SimpleNamespace(quantization=quantization, hf_config=hf)

    mixed = model_config("mixed_precision")
    model_class, resolved = select_family_class(sglang_choice, mixed)
    assert resolved == "MixtralForCausalLM" and model_class.__name__ == "MixtralForCausalLM"
    assert mixed._resolved_model_arch == "MixtralForCausalLM"
    assert select_family_class(sglang_choice, model_config("fp8"))[1] == "QuantMixtralForCausalLM"


def test_plan_dir_is_detected_by_sglang_model_config(tiny_qwen3, tmp_path, sglang_cpu):
    plan, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8"), tmp_path / "plan")
    config = model_config(path)
    assert config.quantization == "mixed_precision"
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mixed_precision" and qc["tp_size"] == 1
    assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()
    assert not list(path.glob("*.safetensors"))


def test_loader_selection(tiny_qwen3, tmp_path, sglang_cpu):
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader, DummyModelLoader, get_model_loader

    from sglang_mixed_precision.serving.loader import MixedPrecisionModelLoader

    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8"), tmp_path / "plan")
    mixed = model_config(path)
    assert type(get_model_loader(LoadConfig(load_format="auto"), mixed)) is MixedPrecisionModelLoader
    assert type(get_model_loader(load_config=LoadConfig(load_format="dummy"), model_config=mixed)) is DummyModelLoader
    stock = model_config(tiny_qwen3)
    assert type(get_model_loader(LoadConfig(load_format="auto"), stock)) is DefaultModelLoader
    with pytest.raises(MixedPrecisionError) as e:
        get_model_loader(LoadConfig(load_format="sharded_state"), mixed)
    assert e.value.code == "load_format_unsupported"


# ---- method per prefix -----------------------------------------------------------------------
def test_dense_mix_builds_each_layer_with_its_sources_method(tiny_qwen3, tmp_path, sglang_cpu):
    plan, path = make_plan_dir(mix_config(str(tiny_qwen3), "per_layer"), tmp_path / "plan")
    model, _ = load_on_cpu(path, postprocess=False)
    methods = methods_by_prefix(model)
    assert methods == {
        "model.embed_tokens": "UnquantizedEmbeddingMethod",
        "model.layers.0.self_attn.qkv_proj": "UnquantizedLinearMethod",
        "model.layers.0.self_attn.o_proj": "UnquantizedLinearMethod",
        "model.layers.0.mlp.gate_up_proj": "GPTQMarlinLinearMethod",
        "model.layers.0.mlp.down_proj": "GPTQMarlinLinearMethod",
        "model.layers.1.self_attn.qkv_proj": "GPTQMarlinLinearMethod",
        "model.layers.1.self_attn.o_proj": "GPTQMarlinLinearMethod",
        "model.layers.1.mlp.gate_up_proj": "Fp8LinearMethod",
        "model.layers.1.mlp.down_proj": "Fp8LinearMethod",
        "lm_head": "UnquantizedEmbeddingMethod",
    }
    # Attention itself (RadixAttention) gets no method: no fp8 KV cache from the fp8 source.
    attn = model.model.layers[1].self_attn.attn
    assert getattr(attn, "quant_method", None) is None
    # The fp8 delegate is SGLang's own config built from the fp8 source's quantization_config.
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig

    fp8 = model.model.layers[1].mlp.gate_up_proj.quant_method.quant_config
    assert type(fp8) is Fp8Config and fp8.weight_block_size == [128, 128] and fp8.is_checkpoint_fp8_serialized
    gptq = model.model.layers[0].mlp.down_proj.quant_method.quant_config
    assert type(gptq) is GPTQMarlinConfig and gptq.group_size == 128 and gptq.weight_bits == 4


def test_moe_mix_uses_marlin_moe_or_wna16_for_int4_experts(tiny_qwen3_moe, tmp_path, sglang_cpu):
    cfg = mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4")
    _, path = make_plan_dir(cfg, tmp_path / "marlin", int4_moe_kernel="marlin")
    methods = methods_by_prefix(load_on_cpu(path, postprocess=False)[0])
    assert methods["model.layers.0.mlp.experts"] == "GPTQMarlinMoEMethod"
    assert methods["model.layers.1.self_attn.qkv_proj"] == "Fp8LinearMethod"
    assert methods["model.layers.0.mlp.gate"] == "UnquantizedLinearMethod"  # the router stays 16-bit
    _, path = make_plan_dir(cfg, tmp_path / "wna16", int4_moe_kernel="wna16")
    methods = methods_by_prefix(load_on_cpu(path, postprocess=False)[0])
    assert methods["model.layers.0.mlp.experts"] == "MoeWNA16Method"


def test_config_interface_follows_the_schemes_used(tiny_qwen3, tmp_path, sglang_cpu):
    import torch

    from sglang_mixed_precision.serving.quant_config import MixedPrecisionConfig

    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_fp8_mlp_int4"), tmp_path / "plan")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    config = MixedPrecisionConfig.from_config(qc)
    assert config.get_min_capability() == 80  # fp8 block and GPTQ-Marlin both need SM80+
    assert set(config.get_supported_act_dtypes()) == {torch.bfloat16, torch.float16}
    assert config.get_scaled_act_names() == []
    assert MixedPrecisionConfig.override_quantization_method(qc, None) == "mixed_precision"
    assert MixedPrecisionConfig.override_quantization_method({"quant_method": "fp8"}, None) is None


def test_source_config_disagreeing_with_plan_fails_construction(tiny_qwen3, tmp_path, sglang_cpu):
    """The fp8 source's config says a planned-fp8 layer is not quantized: refuse, name the layer."""
    import shutil

    conv = mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8").parent
    bad = tmp_path / "conv"
    bad.mkdir()
    for sub in ("fp16", "int4"):
        (bad / sub).symlink_to(conv / sub)
    shutil.copytree(conv / "fp8", bad / "fp8")
    cfg_json = json.loads((bad / "fp8" / "config.json").read_text())
    cfg_json["quantization_config"]["modules_to_not_convert"].append("model.layers.1.mlp.down_proj")
    (bad / "fp8" / "config.json").write_text(json.dumps(cfg_json))
    (bad / "mix.yaml").write_text((conv / "attn_bf16_mlp_fp8.yaml").read_text())
    _, path = make_plan_dir(bad / "mix.yaml", tmp_path / "plan")
    with pytest.raises(MixedPrecisionError) as e:
        load_on_cpu(path)
    assert e.value.code == "method_mismatch"
    assert "model.layers.1.mlp.down_proj" in str(e.value) and "UnquantizedLinearMethod" in str(e.value)


def test_layer_missing_from_plan_is_refused(tiny_qwen3, tmp_path, sglang_cpu):
    from sglang.srt.layers.linear import RowParallelLinear

    from sglang_mixed_precision.serving.quant_config import MixedPrecisionConfig

    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8"), tmp_path / "plan")
    config = MixedPrecisionConfig.from_config(json.loads((path / "config.json").read_text())["quantization_config"])
    with pytest.raises(MixedPrecisionError) as e:
        RowParallelLinear(512, 512, bias=False, quant_config=config, prefix="model.layers.7.mlp.down_proj")
    assert e.value.code == "layer_not_planned"
    layer = RowParallelLinear(1024, 512, bias=False, quant_config=config, prefix="model.layers.1.mlp.down_proj")
    assert type(layer.quant_method).__name__ == "Fp8LinearMethod"
    assert layer.weight.dtype.is_floating_point and layer.weight.element_size() == 1


def test_plan_summary_counts_groups_drawn_from_two_sources_of_one_scheme(tiny_qwen3, tmp_path):
    from sglang_mixed_precision.core.config import parse_config
    from sglang_mixed_precision.core.plan import build_plan
    from sglang_mixed_precision.serving.quant_config import plan_summary

    (tmp_path / "alt").symlink_to(tiny_qwen3, target_is_directory=True)  # a second 16-bit source
    plan = build_plan(
        parse_config(
            f"mixed_precision:\n  sources: {{fp16: {tiny_qwen3}, alt: {tmp_path / 'alt'}}}\n"
            "  default: fp16\n  weight_mapping:\n    model.layers.0.self_attn.q_proj: alt\n"
        )
    )
    qkv = plan.groups["model.layers.0.self_attn.qkv_proj"]
    assert qkv.label == "alt+fp16"
    line = plan_summary(plan)
    mib = sum(plan.modules[m].nbytes for m in qkv.members) / 2**20
    assert f"alt+fp16=bf16: 1 layers, {mib:.1f} MiB" in line
    assert sum(float(part.split(", ")[1].split()[0]) for part in line.split(": ", 1)[1].split("; ")) == pytest.approx(
        sum(m.nbytes for m in plan.modules.values()) / 2**20, abs=0.05 * len(plan.groups)
    )


def test_quantized_lm_head_is_refused_before_launch_and_by_the_serving_config(tiny_qwen3, tmp_path, sglang_cpu):
    """SGLang has no quantized embedding method: the plan refuses a GPTQ lm_head before launch; the
    serving config's own guard names the layer and its source."""
    from ckpt_writers import rewrite_checkpoint, write_gptq_checkpoint
    from sglang_mixed_precision.convert.gptq_pack import rtn_quantize
    from sglang_mixed_precision.core.errors import ValidationErrors
    from sglang_mixed_precision.core.formats import Scheme
    from sglang_mixed_precision.reference import plan_from_config
    from sglang_mixed_precision.serving.methods import EMBEDDING, method_class

    int4_scheme = Scheme("gptq", dtype="BF16", bits=4, group_size=128, sym=True, desc_act=False)

    def quantize_lm_head(state):
        state.update(rtn_quantize(state.pop("lm_head.weight").float(), 128).as_dict("lm_head"))

    plain_int4 = write_gptq_checkpoint(tiny_qwen3, tmp_path / "int4_plain", only=lambda m: False)
    int4 = rewrite_checkpoint(plain_int4, tmp_path / "int4", quantize_lm_head)
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        f"mixed_precision:\n  fp16_path: {tiny_qwen3}\n  int4_path: {int4}\n  weight_mapping:\n    lm_head: int4\n"
    )
    with pytest.raises(ValidationErrors) as e:
        plan_from_config(cfg)
    (err,) = [x for x in e.value.errors if x.code == "quantized_vocab"]
    assert (
        err.detail
        == "lm_head is gptq-int4-g128 in source 'int4', but SGLang serves embeddings and lm_head only in 16 bits"
    )
    assert err.where.startswith("lm_head (decided by: weight_mapping")
    assert err.fix == "map lm_head to a 16-bit source (official FP8 and GPTQ releases keep it 16-bit)"

    with pytest.raises(MixedPrecisionError) as e2:  # the serving config's own guard
        method_class(EMBEDDING, int4_scheme, where="lm_head (gptq-int4-g128 from source 'int4')")
    assert e2.value.code == "unsupported_layer_scheme"
    assert e2.value.detail == "SGLang has no gptq-int4-g128 method for a embedding layer"
    assert e2.value.where == "lm_head (gptq-int4-g128 from source 'int4')"
