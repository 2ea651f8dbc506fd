"""The catalogue of bad inputs: each is its own error, raised before any GPU work, naming the
file / tensor / rule at fault and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_writers import rewrite_checkpoint, write_fp8_checkpoint, write_gptq_checkpoint
from sglang_mixed_precision.core.config import parse_config
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.core.plan import build_plan
from sglang_mixed_precision.testing.tinymodels import make_tiny_model


def yaml_for(sources: dict, extra: str = "") -> str:
    lines = ["mixed_precision:"] + [f"  {label}_path: {path}" for label, path in sources.items()]
    return "\n".join(lines) + "\n" + extra


def plan_errors(text: str, tp: int = 1) -> ValidationErrors:
    with pytest.raises(ValidationErrors) as e:
        build_plan(parse_config(text, "/cfg/mix.yaml"), tp_size=tp)
    return e.value


def only(err: ValidationErrors, code: str) -> MixedPrecisionError:
    found = [x for x in err.errors if x.code == code]
    assert found, f"no {code} in {err.codes}: {err}"
    assert found[0].fix, "every error says how to fix it"
    return found[0]


def test_missing_source_dir(moe_sources, tmp_path):
    err = plan_errors(yaml_for({"fp16": moe_sources["fp16"], "fp8": tmp_path / "nowhere"}))
    e = only(err, "missing_source")
    assert "'fp8'" in str(e) and str(tmp_path / "nowhere") in str(e) and "/cfg/mix.yaml:3 (fp8_path)" in str(e)


def test_missing_config_json(moe_sources, tmp_path):
    (tmp_path / "fp8").mkdir()
    e = only(plan_errors(yaml_for({"fp16": moe_sources["fp16"], "fp8": tmp_path / "fp8"})), "missing_file")
    assert "config.json" in str(e) and "'fp8'" in str(e)


def linked_without(sources, label: str, tmp_path, name: str):
    """Source `label` linked file by file into tmp_path/label, except the file `name`."""
    copy = tmp_path / label
    copy.mkdir()
    for f in sources[label].iterdir():
        if f.name != name:
            (copy / f.name).symlink_to(f)
    return copy


def test_missing_shard_file(moe_sources, tmp_path):
    broken = linked_without(moe_sources, "int4", tmp_path, "model-00002-of-00002.safetensors")
    e = only(plan_errors(yaml_for({"fp16": moe_sources["fp16"], "int4": broken})), "missing_file")
    assert "model-00002-of-00002.safetensors" in str(e) and "model.safetensors.index.json" in str(e)


def test_truncated_safetensors(moe_sources, tmp_path):
    broken = linked_without(moe_sources, "int4", tmp_path, "model-00001-of-00002.safetensors")
    data = (moe_sources["int4"] / "model-00001-of-00002.safetensors").read_bytes()
    (broken / "model-00001-of-00002.safetensors").write_bytes(data[:-4096])
    e = only(plan_errors(yaml_for({"fp16": moe_sources["fp16"], "int4": broken})), "corrupt_safetensors")
    assert "model-00001-of-00002.safetensors" in str(e) and "truncated" in str(e) and str(len(data)) in str(e)


def test_tensor_missing_from_assigned_source(moe_sources, tmp_path):
    fp8 = rewrite_checkpoint(
        moe_sources["fp8"], tmp_path / "fp8", lambda s: [s.pop(n) for n in list(s) if ".layers.1.mlp.experts." in n]
    )
    err = plan_errors(
        yaml_for({"fp16": moe_sources["fp16"], "fp8": fp8}, "  rules:\n    - {match: '*.mlp.experts.*', source: fp8}\n")
    )
    e = only(err, "missing_tensor")
    msg = str(e)
    assert "24 module(s) assigned to source 'fp8'" in msg and "model.layers.1.mlp.experts.0.gate_proj" in msg
    assert "rule #1 '*.mlp.experts.*' (/cfg/mix.yaml:5)" in msg and str(fp8) in msg


def test_quantized_part_missing(moe_sources, tmp_path):
    fp8 = rewrite_checkpoint(
        moe_sources["fp8"], tmp_path / "fp8", lambda s: s.pop("model.layers.0.self_attn.o_proj.weight_scale_inv")
    )
    e = only(plan_errors(yaml_for({"fp16": moe_sources["fp16"], "fp8": fp8}, "  default: fp8\n")), "missing_tensor")
    assert "'weight_scale_inv'" in str(e) and "model.layers.0.self_attn.o_proj" in str(e)


def test_shape_disagrees_with_model_config(tiny_qwen3, tmp_path):
    # a checkpoint of another size passed off with the right config.json: its tensors are what is wrong
    other = make_tiny_model("qwen3", tmp_path / "other", intermediate_size=768)
    (other / "config.json").write_text((tiny_qwen3 / "config.json").read_text())
    fp8 = write_fp8_checkpoint(other, tmp_path / "fp8")
    err = plan_errors(yaml_for({"fp16": tiny_qwen3, "fp8": fp8}, "  rules:\n    - {match: '*.mlp.*', source: fp8}\n"))
    only(err, "shape_mismatch")
    msg = "\n".join(str(e) for e in err.errors if e.code == "shape_mismatch")
    assert (
        "F8_E4M3[768, 512]" in msg
        and "F8_E4M3[512, 768]" in msg
        and "[1024, 512]" in msg
        and "model.layers.0.mlp.gate_proj.weight" in msg
    )
    assert "model.safetensors" in msg and "rule #1" in msg


def test_wrong_scale_shape(moe_sources, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    fp8 = rewrite_checkpoint(moe_sources["fp8"], tmp_path / "fp8", lambda s: s.__setitem__(name, torch.ones(2, 2)))
    e = only(plan_errors(yaml_for({"fp16": moe_sources["fp16"], "fp8": fp8}, "  default: fp8\n")), "shape_mismatch")
    assert name in str(e) and "F32[2, 2]" in str(e) and "F32/BF16/F16[4, 4]" in str(e)


def test_mixed_precision_inside_fused_groups(moe_sources):
    err = plan_errors(
        yaml_for(
            moe_sources,
            "  default: fp8\n  weight_mapping:\n"
            "    model.layers.0.self_attn.q_proj.weight: fp16\n"
            "    model.layers.1.mlp.experts.5.up_proj: int4\n",
        )
    )
    groups = {e.where.split(" ")[0]: str(e) for e in err.errors if e.code == "mixed_group"}
    assert set(groups) == {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.experts"}
    qkv = groups["model.layers.0.self_attn.qkv_proj"]
    assert (
        "bf16 from 'fp16': q_proj" in qkv
        and "fp8-block128 from 'fp8': k_proj, v_proj" in qkv
        and "/cfg/mix.yaml:7" in qkv
    )
    experts = groups["model.layers.1.mlp.experts"]
    assert "gptq-int4-g128 from 'int4': experts.5.up_proj" in experts and "and 18 more" in experts


def test_architecture_mismatch(tiny_qwen3, tiny_llama):
    err = plan_errors(yaml_for({"fp16": tiny_qwen3, "fp8": tiny_llama}))
    e = only(err, "architecture_mismatch")
    assert "model_type: 'llama' vs 'qwen3'" in str(e) and str(tiny_llama / "config.json") in str(e)
    # and fp8_path holds a 16-bit checkpoint: reported in the same pass
    assert "fp8_path promises an FP8 checkpoint" in str(only(err, "source_label_mismatch"))


@pytest.mark.parametrize("override,needle", [({"sym": False}, "asymmetric"), ({"group_size": 256}, "group_size=256")])
def test_unsupported_scheme(tiny_qwen3, tmp_path, override, needle):
    int4 = write_gptq_checkpoint(tiny_qwen3, tmp_path / "int4", config_overrides=override)
    e = only(plan_errors(yaml_for({"fp16": tiny_qwen3, "int4": int4})), "unsupported_scheme")
    assert needle in str(e) and "gptq_marlin" in str(e) and str(int4 / "config.json") in str(e)


def test_tp_indivisible_for_block_fp8_and_marlin(moe_sources):
    err = plan_errors(
        yaml_for(
            moe_sources,
            "  rules:\n    - {match: 'model.layers.0.mlp.experts.*', source: fp8}\n"
            "    - {match: 'model.layers.1.mlp.experts.*', source: int4}\n",
        ),
        tp=4,
    )
    msgs = [str(e) for e in err.errors if e.code == "tp_indivisible"]
    fp8 = next(m for m in msgs if "fp8-block128" in m)
    assert "per-rank MoE intermediate 64" in fp8 and "block_n 128" in fp8 and "model.layers.0.mlp.experts" in fp8
    assert "valid here: 1, 2" in fp8 and "rule #1" in fp8
    # int4 experts of intermediate 64 per rank: Marlin MoE cannot run them, the Triton W4A16 kernel can
    assert not [m for m in msgs if "gptq-int4-g128" in m]


def test_int4_experts_no_moe_kernel_runs_are_refused_per_kernel(moe_sources, tmp_path):
    """auto passes while one int4 MoE kernel runs the experts; an explicit kernel that cannot is refused
    before launch naming the layer; act-order experts at a shape Marlin cannot run are refused by the plan."""
    from sglang_mixed_precision.core.config import parse_config
    from sglang_mixed_precision.core.plan import build_plan
    from sglang_mixed_precision.serving.methods import int4_moe_kernels

    text = yaml_for(moe_sources, "  rules:\n    - {match: 'model.layers.*.mlp.experts.*', source: int4}\n")
    plan = build_plan(parse_config(text, tmp_path / "mix.yaml"), tp_size=4)
    assert set(int4_moe_kernels(plan, "auto").values()) == {"wna16"}
    with pytest.raises(MixedPrecisionError) as e:
        int4_moe_kernels(plan, "marlin")
    assert e.value.code == "tp_indivisible" and "model.layers.0.mlp.experts" in e.value.where
    assert "per-rank MoE intermediate 64 is not divisible by 128" in e.value.detail
    assert set(int4_moe_kernels(build_plan(parse_config(text, tmp_path / "mix.yaml")), "auto").values()) == {"marlin"}


def test_tp_indivisible_heads(tiny_qwen3):
    e = only(plan_errors(yaml_for({"fp16": tiny_qwen3}), tp=3), "tp_indivisible")
    assert "num_attention_heads=4 is not divisible by tp_size=3" in str(e)


def test_fp8_qkv_per_rank_block(tmp_path):
    # 4 kv heads of 64 at tp 2: k/v per rank 128 is fine, q per rank 64*8/2=256; at tp 4 k/v 64 is not
    base = make_tiny_model(
        "qwen3", tmp_path / "bf16", num_layers=1, num_attention_heads=8, num_key_value_heads=4, head_dim=64
    )
    fp8 = write_fp8_checkpoint(base, tmp_path / "fp8")
    text = yaml_for({"fp16": base, "fp8": fp8}, "  default: fp8\n")
    build_plan(parse_config(text), tp_size=2)
    e = only(plan_errors(text, tp=4), "tp_indivisible")
    assert "per-rank N 64 of fused parts [128, 64, 64]" in str(e) and "qkv_proj" in str(e)


def test_no_unquantized_source_and_quantized_skeleton(moe_sources):
    e = only(plan_errors(yaml_for({"fp8": moe_sources["fp8"], "int4": moe_sources["int4"]})), "missing_source")
    assert "no unquantized" in str(e) and "fp16_path" in str(e)
    e = only(plan_errors(yaml_for(moe_sources, "  skeleton: fp8\n")), "skeleton_quantized")
    assert "'fp8'" in str(e)


def test_unknown_module_in_weight_mapping(moe_sources):
    e = only(
        plan_errors(yaml_for(moe_sources, "  weight_mapping:\n    model.layers.7.self_attn.q_proj.weight: fp8\n")),
        "unknown_module",
    )
    assert "'model.layers.7.self_attn.q_proj.weight' (/cfg/mix.yaml:6)" in str(e)


def test_independent_errors_are_reported_together(moe_sources, tmp_path):
    int4 = write_gptq_checkpoint(moe_sources["fp16"], tmp_path / "asym", config_overrides={"sym": False})
    err = plan_errors(yaml_for({"fp16": moe_sources["fp16"], "fp8": tmp_path / "none", "int4": int4}))
    assert sorted(err.codes) == ["missing_source", "unsupported_scheme"]
    err = plan_errors(
        yaml_for(
            moe_sources,
            "  rules:\n    - {match: 'model.layers.0.mlp.experts.*', source: fp8}\n"
            "  weight_mapping:\n    model.layers.1.self_attn.k_proj: int4\n",
        ),
        tp=4,
    )
    assert {"mixed_group", "tp_indivisible"} <= set(err.codes)
    assert str(err).startswith(f"{len(err.errors)} problem(s) found:")


def test_corrupt_config_json(moe_sources, tmp_path):
    broken = linked_without(moe_sources, "fp8", tmp_path, "config.json")
    (broken / "config.json").write_text("{not json")
    e = only(plan_errors(yaml_for({"fp16": moe_sources["fp16"], "fp8": broken})), "corrupt_config")
    assert str(broken / "config.json") in str(e)


def test_bad_tp_size_argument(moe_sources):
    with pytest.raises(MixedPrecisionError) as e:
        build_plan(parse_config(yaml_for(moe_sources)), tp_size=0)
    assert e.value.code == "bad_argument"
    assert "tp_size must be a positive integer, got 0" in str(e.value)


def test_skeleton_alias_without_an_unquantized_source(moe_sources):
    e = only(plan_errors(yaml_for({"fp8": moe_sources["fp8"]}, "  skeleton: bf16\n")), "missing_source")
    assert "no unquantized (16-bit) source" in str(e)


def test_config_json_without_model_dimensions(moe_sources, tmp_path):
    broken = linked_without(moe_sources, "fp16", tmp_path, "config.json")
    cfg = json.loads((moe_sources["fp16"] / "config.json").read_text())
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MixedPrecisionError) as e:
        build_plan(parse_config(yaml_for({"fp16": broken})))
    assert e.value.code == "corrupt_config"
    assert f"{broken / 'config.json'}: lacks a model dimension ('hidden_size')" in str(e.value)


def test_header_entry_that_does_not_fit_its_bytes(tiny_qwen3, tmp_path):
    from sglang_mixed_precision.testing.shapegen import write_shape_checkpoint

    cfg = json.loads((tiny_qwen3 / "config.json").read_text())
    base = write_shape_checkpoint(cfg, tmp_path / "bf16", shard_bytes=1 << 40)
    shard = next(base.glob("*.safetensors"))
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = "model.layers.0.input_layernorm.weight"
    start, stop = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, stop + 2]  # claims 2 bytes more than BF16[512] holds
    new = json.dumps(header).encode()
    data_end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    with open(shard, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new)
        f.truncate(8 + len(new) + data_end)
    e = only(plan_errors(yaml_for({"fp16": base})), "corrupt_safetensors")
    assert name in str(e) and shard.name in str(e) and f"BF16[512] does not fit bytes [{start}, {stop + 2})" in str(e)


# ---- contradictions in the config, whatever their order --------------------------------------------
@pytest.mark.parametrize(
    "first,second",
    [
        ("model.layers.0.self_attn.q_proj: fp16", "model.layers.0.self_attn.qkv_proj: fp8"),
        ("model.layers.1.mlp.experts.3.gate_proj.weight: int4", "model.layers.1.mlp.experts: fp8"),
        ("model.layers.1.mlp.experts.3: int4", "model.layers.1.mlp.experts: fp8"),
        ("model.layers.1.mlp.experts.3: int4", "model.layers.1.mlp.experts.3.down_proj: fp8"),
    ],
)
@pytest.mark.parametrize("order", ["as written", "reversed"])
def test_member_and_fused_names_with_different_sources_conflict(moe_sources, first, second, order):
    lines = [first, second] if order == "as written" else [second, first]
    text = yaml_for(moe_sources, "  weight_mapping:\n" + "".join(f"    {line}\n" for line in lines))
    err = plan_errors(text)
    e = only(err, "config_conflict")
    for line in lines:
        key, label = line.split(": ")
        assert f"{key!r} (/cfg/mix.yaml:{6 + lines.index(line)}) says {label!r}" in str(e)
    assert "weight_mapping gives" in str(e) and "keep one of these entries" in e.fix
    assert "mixed_group" not in err.codes  # the conflict is the one error, not a consequence of an order


def test_member_and_fused_names_with_the_same_source_agree(moe_sources):
    text = yaml_for(
        moe_sources,
        "  weight_mapping:\n    model.layers.0.self_attn.q_proj: fp8\n    model.layers.0.self_attn.qkv_proj: fp8\n"
        "    model.layers.1.mlp.experts.2: int4\n    model.layers.1.mlp.experts: int4\n",
    )
    plan = build_plan(parse_config(text, "/cfg/mix.yaml"))
    assert plan.modules["model.layers.0.self_attn.q_proj"].rule.startswith(
        "weight_mapping 'model.layers.0.self_attn.q_proj'"
    )
    assert plan.group_for_prefix("model.layers.1.mlp.experts").label == "int4"


# ---- a source whose format is not its label ----------------------------------------------------------
@pytest.mark.parametrize(
    "key,given,needle",
    [
        ("fp8_path", "fp16", "fp8_path promises an FP8 checkpoint, but {path} is bf16"),
        ("int4_path", "fp8", "int4_path promises a GPTQ-Int4 checkpoint, but {path} is fp8-block128"),
        ("fp8_path", "int4", "fp8_path promises an FP8 checkpoint, but {path} is gptq-int4-g128"),
        ("bf16_path", "int4", "bf16_path promises a 16-bit checkpoint, but {path} is gptq-int4-g128"),
    ],
)
def test_seed_key_holding_another_format(moe_sources, key, given, needle):
    text = f"mixed_precision:\n  fp16_path: {moe_sources['fp16']}\n  {key}: {moe_sources[given]}\n"
    if key == "bf16_path":
        text = f"mixed_precision:\n  fp8_path: {moe_sources['fp8']}\n  {key}: {moe_sources[given]}\n"
    e = only(plan_errors(text), "source_label_mismatch")
    assert needle.format(path=moe_sources[given]) in str(e) and f"/cfg/mix.yaml:3 ({key})" in str(e)
    assert "under 'sources:' with a label of your choice" in e.fix


def test_one_directory_under_two_seed_keys(moe_sources):
    e = only(plan_errors(yaml_for({"fp16": moe_sources["fp16"], "fp8": moe_sources["fp16"]})), "source_label_mismatch")
    assert "fp8_path promises an FP8 checkpoint" in str(e)


def test_free_labels_that_read_like_another_format_warn(moe_sources):
    text = (
        f"mixed_precision:\n  fp16_path: {moe_sources['fp16']}\n"
        f"  sources:\n    my-fp8: {moe_sources['int4']}\n    fast: {moe_sources['fp8']}\n    again: {moe_sources['fp8']}\n"
    )
    plan = build_plan(parse_config(text, "/cfg/mix.yaml"))
    assert (
        f"source label 'my-fp8' (/cfg/mix.yaml:4 (sources.my-fp8)) reads like an FP8 checkpoint, but "
        f"{moe_sources['int4']} is gptq-int4-g128" in plan.warnings
    )
    assert f"sources 'fast', 'again' are the same directory {moe_sources['fp8'].resolve()}" in plan.warnings
    assert not any("'fast'" in w and "reads like" in w for w in plan.warnings)
