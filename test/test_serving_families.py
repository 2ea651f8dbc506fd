"""Every model family on CPU: the converter's fp8 / int4 sources mixed, planned, loaded by the family's
real SGLang 0.5.17 class through the mixed loader, audited, and every parameter equal to its source.

What ``core.architectures`` says of each class (which class builds the family, what its
``load_weights`` drops, whether it ties lm_head to the embedding) is checked here against the class.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from serving_harness import converted, init_sglang_cpu, load_on_cpu, write_mix
from sglang_mixed_precision.core.architectures import architecture_for
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.core.naming import Role
from sglang_mixed_precision.serving.plandir import make_plan_dir
from sglang_mixed_precision.testing.tinymodels import make_tiny_model

# tiny model name -> model_type
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2_moe", "mixtral": "mixtral", "qwen3_tied": "qwen3"}
# mix -> (attention source, MLP / experts source); the router, norms and embeddings stay 16-bit
FAMILY_MIXES = {"attn_fp8+mlp_int4": ("fp8", "int4"), "attn_int4+mlp_fp8": ("int4", "fp8")}
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales")  # fused along N, which GPTQ stores in dim 1


@pytest.fixture(scope="module")
def sglang_cpu():
    init_sglang_cpu()


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = make_tiny_model(name, tmp_path_factory.mktemp(name) / "bf16")
        return made[name]

    return get


def family_mix(model_dir, name: str, mix: str):
    """The mix's YAML beside the converter's outputs of ``model_dir``, in the family's names."""
    arch = architecture_for(FAMILIES[name])
    attention, mlp = FAMILY_MIXES[mix]
    block = arch.moe if arch.moe_family else arch.mlp
    rules = [(f"model.layers.*.{arch.attention}.*", attention), (f"model.layers.*.{block}.*", mlp)]
    return write_mix(converted(str(model_dir)), f"{name}-{mix}", "fp16", rules)


def source_tensor(info):
    from safetensors import safe_open

    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(info.name)


def expected_parameters(plan) -> dict[str, torch.Tensor]:
    """{SGLang parameter name: tensor} the plan's sources imply at TP 1: fused members concatenated
    in SGLang's shard order (q, k, v; gate, up; w1, w3), experts stacked."""
    linear_order = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}
    parts: dict[str, dict] = defaultdict(dict)
    for a in plan.modules.values():
        ref = a.ref
        for suffix, info in a.tensors.items():
            tensor = source_tensor(info)
            if ref.role is Role.ROUTED_EXPERT:
                fused = "w13" if ref.shard in ("w1", "w3") else "w2"
                parts[f"{ref.group}.{fused}_{suffix}"][(ref.expert, ref.shard == "w3")] = tensor
            elif ref.group != ref.name:
                parts[f"{ref.group}.{suffix}"][(None, linear_order[ref.shard])] = tensor
            else:
                parts[f"{ref.name}.{suffix}"][(None, 0)] = tensor
    out = {}
    for name, pieces in parts.items():
        suffix = name.rsplit(".", 1)[1]
        suffix = suffix.split("_", 1)[1] if ".experts." in name else suffix  # w13_qweight -> qweight
        dim = 1 if suffix in GPTQ_SUFFIXES else 0
        join = (lambda ts: ts[0]) if suffix == "g_idx" else (lambda ts, dim=dim: torch.cat(ts, dim=dim))
        experts = sorted({k[0] for k in pieces}, key=lambda e: -1 if e is None else e)
        if experts == [None]:
            out[name] = join([pieces[k] for k in sorted(pieces, key=lambda k: k[1])])
        else:
            out[name] = torch.stack(
                [join([pieces[(e, k)] for k in (False, True) if (e, k) in pieces]) for e in experts]
            )
    return out


def same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Raw equality; 16-bit group scales are held in the model's dtype."""
    if actual.element_size() == 1:
        return torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))
    if actual.dtype != expected.dtype and actual.is_floating_point():
        expected = expected.to(actual.dtype)
    return torch.equal(actual, expected)


@pytest.mark.parametrize("mix", list(FAMILY_MIXES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_mix_loads_every_parameter_from_its_source(name, mix, family_models, tmp_path, sglang_cpu):
    arch = architecture_for(FAMILIES[name])
    plan, path = make_plan_dir(family_mix(family_models(name), name, mix), tmp_path / "plan", int4_moe_kernel="marlin")
    model, loader = load_on_cpu(path, postprocess=False)
    assert type(model).__name__ == arch.sglang_class
    report = loader.report
    assert report.ok, report.problems
    assert report.tensors == sum(len(v) for v in plan.tensors_by_source().values())
    attention, mlp = FAMILY_MIXES[mix]
    fp8_layers = report.layers["Fp8LinearMethod"] + report.layers["Fp8MoEMethod"]
    int4_layers = report.layers["GPTQMarlinLinearMethod"] + report.layers["GPTQMarlinMoEMethod"]
    layers = plan.geometry.layers
    assert fp8_layers >= layers and int4_layers >= layers, report.layers  # attention and MLP of every layer

    params = dict(model.named_parameters())
    expected = expected_parameters(plan)
    missing = sorted(set(expected) - set(params))
    if arch.ties_embeddings and plan.geometry.tie_word_embeddings:
        assert missing == [] and "lm_head.weight" not in expected
        assert model.lm_head is model.model.embed_tokens  # the head is the embedding
    assert missing == []
    unchecked = [n for n, p in params.items() if n not in expected and p.numel() and not n.endswith("sort_indices")]
    assert unchecked == []
    different = [n for n, t in expected.items() if not same(params[n].data, t)]
    assert different == []


@pytest.mark.parametrize("name", ["qwen2", "qwen2_moe"])
def test_qwen2_biases_come_from_the_attention_source_and_stay_16_bit(name, family_models, tmp_path, sglang_cpu):
    plan, path = make_plan_dir(family_mix(family_models(name), name, "attn_int4+mlp_fp8"), tmp_path / "plan")
    int4 = plan.sources["int4"]
    for layer in range(plan.geometry.layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            a = plan.modules[f"model.layers.{layer}.self_attn.{proj}"]
            bias = a.tensors["bias"]
            assert a.label == "int4" and bias.file.parent == int4.path and bias.dtype == "BF16"
    model, loader = load_on_cpu(path, postprocess=False)
    assert loader.report.ok
    got = dict(model.named_parameters())["model.layers.1.self_attn.qkv_proj.bias"]
    want = torch.cat([source_tensor(plan.modules[f"model.layers.1.self_attn.{p}_proj"].tensors["bias"]) for p in "qkv"])
    assert got.dtype == torch.bfloat16 and torch.equal(got.data, want)


def test_llama_class_drops_block_fp8_scales_unless_fed_directly(family_models, tmp_path, sglang_cpu, monkeypatch):
    """What core.architectures says of LlamaForCausalLM: its load_weights alone leaves every block-FP8
    scale unloaded (the plan promised them); fed directly, the same mix loads and audits clean."""
    import sglang_mixed_precision.serving.delivery as delivery

    plan, path = make_plan_dir(family_mix(family_models("llama"), "llama", "attn_fp8+mlp_int4"), tmp_path / "plan")
    monkeypatch.setattr(delivery, "fed_directly", lambda model_type: frozenset())
    with pytest.raises(MixedPrecisionError) as raised:
        load_on_cpu(path, postprocess=False)
    message = str(raised.value)
    assert raised.value.code == "load_audit_failed"
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" in message and "consumed it nowhere" in message
    assert "qkv_proj.weight_scale_inv" in message and "never loaded" in message
    monkeypatch.undo()
    model, loader = load_on_cpu(path, postprocess=False)
    assert loader.report.ok and loader.report.layers["Fp8LinearMethod"] == 4


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral", "qwen3_moe"])
def test_a_tied_checkpoint_of_a_class_that_does_not_tie_is_refused_before_launch(name, tmp_path):
    from sglang_mixed_precision.core.config import parse_config
    from sglang_mixed_precision.core.plan import build_plan
    from sglang_mixed_precision.testing.shapegen import write_shape_checkpoint
    from sglang_mixed_precision.testing.tinymodels import tiny_config

    cfg = tiny_config(name, tie_word_embeddings=True).to_dict()
    write_shape_checkpoint(cfg, tmp_path / "bf16")
    config = parse_config(f"mixed_precision:\n  fp16_path: {tmp_path / 'bf16'}\n")
    with pytest.raises(ValidationErrors) as raised:
        build_plan(config)
    assert raised.value.codes == ["model_class_cannot_load"]
    arch = architecture_for(cfg["model_type"])
    message = str(raised.value)
    assert arch.sglang_class in message and "does not tie" in message and "config.json" in message


@pytest.mark.parametrize("name", ["qwen3_tied", "llama", "qwen2", "qwen2_moe", "qwen3_moe", "mixtral"])
def test_which_classes_tie_lm_head_to_the_embedding(name, tmp_path, sglang_cpu):
    """The ties_embeddings column, asked of the real class: built from a tied config.json."""
    from sglang_mixed_precision.testing.tinymodels import tiny_config

    cfg = tiny_config(name, num_layers=1, tie_word_embeddings=True)
    arch = architecture_for(cfg.model_type)
    cfg.architectures = [arch.sglang_class]  # as save_pretrained of the model writes it
    cfg.save_pretrained(str(tmp_path))
    model, _ = load_on_cpu(tmp_path, load_format="dummy")
    assert (model.lm_head is model.model.embed_tokens) == arch.ties_embeddings
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
