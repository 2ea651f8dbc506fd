"""The mixed loader's stream and the post-load audit, on real SGLang models built on CPU."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch

from serving_harness import init_sglang_cpu, load_on_cpu, methods_by_prefix, mix_config, read_source_tensor
from sglang_mixed_precision.core.errors import MixedPrecisionError
from sglang_mixed_precision.serving.client import parse_server_log
from sglang_mixed_precision.serving.plandir import make_plan_dir


@pytest.fixture(scope="module")
def sglang_cpu():
    init_sglang_cpu()


@pytest.fixture
def recorded_reads(monkeypatch):
    """Every safetensors file opened and every key read, through any handle."""
    import safetensors

    reads = {"files": Counter(), "keys": Counter()}
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, path, *args, **kwargs):
            reads["files"][str(path)] += 1
            self._f = real_open(path, *args, **kwargs)

        def get_tensor(self, name):
            reads["keys"][name] += 1
            return self._f.get_tensor(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __getattr__(self, item):
            return getattr(self._f, item)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return reads


def test_stream_reads_only_planned_tensors_from_their_sources(tiny_qwen3, tmp_path, recorded_reads):
    from sglang_mixed_precision.serving.loader import PlanWeightStream

    plan, _ = make_plan_dir(mix_config(str(tiny_qwen3), "attn_fp8_mlp_bf16", max_shard_size="1MB"), tmp_path / "plan")
    planned = {label: {i.name: i for i in infos} for label, infos in plan.tensors_by_source().items()}
    recorded_reads["keys"].clear()
    stream = PlanWeightStream(plan)
    got = {}
    for name, tensor in stream:
        assert name not in got, f"{name} yielded twice"
        got[name] = tensor
    # Exactly the planned keys were read, each once, and nothing else.
    assert Counter(recorded_reads["keys"]) == Counter(got.keys())
    assert set(got) == {n for by_name in planned.values() for n in by_name}
    for label, by_name in planned.items():
        for name, info in by_name.items():
            expected = read_source_tensor(plan, name)
            assert got[name].dtype == expected.dtype and torch.equal(
                got[name].view(torch.uint8), expected.view(torch.uint8)
            ), name
            assert tuple(got[name].shape) == info.shape
        assert stream.bytes_read[label] == sum(i.nbytes for i in by_name.values())
    # Only files holding planned tensors were opened; the fp8 source is sharded and most shards are skipped.
    fp8_files = {str(i.file) for i in planned["fp8"].values()}
    assert stream.files_opened["fp8"] == fp8_files
    all_fp8 = {str(p) for p in plan.sources["fp8"].path.glob("*.safetensors")}
    assert len(all_fp8) > len(fp8_files) >= 1


def test_dense_mix_loads_every_parameter_from_its_source(tiny_qwen3, tmp_path, sglang_cpu):
    plan, path = make_plan_dir(mix_config(str(tiny_qwen3), "per_layer"), tmp_path / "plan")
    model, loader = load_on_cpu(path, postprocess=False)
    params = dict(model.named_parameters())
    src = lambda name: read_source_tensor(plan, name)  # noqa: E731
    cat = lambda *names, dim=0: torch.cat([src(n) for n in names], dim=dim)  # noqa: E731
    bits = lambda t: t.view(torch.uint8) if t.element_size() == 1 else t  # noqa: E731

    a0 = "model.layers.0.self_attn."
    assert torch.equal(
        params[a0 + "qkv_proj.weight"], cat(a0 + "q_proj.weight", a0 + "k_proj.weight", a0 + "v_proj.weight")
    )
    m1 = "model.layers.1.mlp."
    assert params[m1 + "gate_up_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(
        bits(params[m1 + "gate_up_proj.weight"]), bits(cat(m1 + "gate_proj.weight", m1 + "up_proj.weight"))
    )
    assert torch.equal(
        params[m1 + "gate_up_proj.weight_scale_inv"],
        cat(m1 + "gate_proj.weight_scale_inv", m1 + "up_proj.weight_scale_inv"),
    )
    m0 = "model.layers.0.mlp."
    for suffix in ("qweight", "qzeros", "g_idx"):
        assert torch.equal(params[m0 + f"down_proj.{suffix}"], src(m0 + f"down_proj.{suffix}")), suffix
    assert torch.equal(
        params[m0 + "down_proj.scales"], src(m0 + "down_proj.scales").to(params[m0 + "down_proj.scales"].dtype)
    )
    assert torch.equal(
        params[m0 + "gate_up_proj.qweight"], cat(m0 + "gate_proj.qweight", m0 + "up_proj.qweight", dim=1)
    )
    assert torch.equal(params["model.norm.weight"], src("model.norm.weight"))
    assert torch.equal(params["lm_head.weight"], src("lm_head.weight"))

    report = loader.report
    assert report.ok and report.tensors == sum(len(v) for v in plan.tensors_by_source().values())
    assert report.layers["GPTQMarlinLinearMethod"] == 4 and report.layers["Fp8LinearMethod"] == 2
    assert dict(loader.stream.bytes_read) == {
        label: sum(i.nbytes for i in infos) for label, infos in plan.tensors_by_source().items()
    }


def test_moe_int4_experts_land_in_fused_expert_parameters(tiny_qwen3_moe, tmp_path, sglang_cpu):
    plan, path = make_plan_dir(
        mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4"), tmp_path / "plan", int4_moe_kernel="marlin"
    )
    model, loader = load_on_cpu(path, postprocess=False)
    experts = model.model.layers[1].mlp.experts
    inter = experts.intermediate_size_per_partition
    for e in (0, 5):
        base = f"model.layers.1.mlp.experts.{e}."
        gate, up, down = (
            read_source_tensor(plan, base + f"{p}.qweight") for p in ("gate_proj", "up_proj", "down_proj")
        )
        assert torch.equal(experts.w13_qweight[e][:, :inter], gate)
        assert torch.equal(experts.w13_qweight[e][:, inter:], up)
        assert torch.equal(experts.w2_qweight[e], down)
        scales = read_source_tensor(plan, base + "up_proj.scales").to(experts.w13_scales.dtype)
        assert torch.equal(experts.w13_scales[e][:, inter:], scales)
    assert loader.report.ok and loader.report.layers["GPTQMarlinMoEMethod"] == 2
    # Marlin MoE inside a bf16 model: its group scales are held in the model's dtype (stock SGLang: fp16)
    assert experts.w13_scales.dtype == experts.w2_scales.dtype == torch.bfloat16


def test_int4_experts_kernel_auto_takes_marlin_when_the_shapes_allow(tiny_qwen3_moe, tmp_path, sglang_cpu):
    plan, path = make_plan_dir(
        mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4"), tmp_path / "plan", int4_moe_kernel="auto"
    )
    assert json.loads((path / "mixed_precision_plan.json").read_text())["int4_moe_kernels"] == {
        "model.layers.0.mlp.experts": "marlin",
        "model.layers.1.mlp.experts": "marlin",
    }
    model, loader = load_on_cpu(path, postprocess=False)
    config = model.quant_config
    assert config.int4_kernels == {"model.layers.0.mlp.experts": "marlin", "model.layers.1.mlp.experts": "marlin"}
    assert config.methods["model.layers.1.mlp.experts"] == "GPTQMarlinMoEMethod (marlin)"
    assert loader.report.ok


def test_fp8_and_bf16_mix_loads_and_postprocesses(tiny_qwen3_moe, tmp_path, sglang_cpu, caplog):
    plan, path = make_plan_dir(mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_bf16"), tmp_path / "plan")
    caplog.set_level(logging.INFO, logger="sglang_mixed_precision")
    model, loader = load_on_cpu(path)  # Fp8 block post-processing runs on CPU too
    methods = methods_by_prefix(model)
    assert methods["model.layers.0.self_attn.o_proj"] == "Fp8LinearMethod"
    assert methods["model.layers.0.mlp.experts"] == "UnquantizedFusedMoEMethod"
    w13 = model.model.layers[0].mlp.experts.w13_weight
    gate = read_source_tensor(plan, "model.layers.0.mlp.experts.3.gate_proj.weight")
    assert torch.equal(w13[3][: gate.shape[0]], gate)
    assert loader.report.ok
    # Parameter bytes after post-processing agree with the plan's bytes for this rank.
    from sglang_mixed_precision.core.report import summary

    planned = summary(plan)["per_rank"][0]["bytes"]
    assert abs(loader.weight_bytes - planned) <= 0.02 * planned
    # The GPU tests read these numbers and the audit's method list from the server log.
    facts = parse_server_log(caplog.text)
    assert (facts["param_bytes"], facts["logged_plan_bytes"]) == (loader.weight_bytes, planned)
    assert "4 Fp8LinearMethod" in facts["layers"] and "2 UnquantizedFusedMoEMethod" in facts["layers"]
    assert "mixed_precision: source 'fp8'" in caplog.text and "MiB from 1 file(s)" in caplog.text


def test_dummy_load_format_builds_the_mix_without_reading_weights(tiny_qwen3, tmp_path, sglang_cpu, recorded_reads):
    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_fp8_mlp_bf16"), tmp_path / "plan")
    recorded_reads["keys"].clear()
    model, loader = load_on_cpu(path, load_format="dummy")
    assert type(loader).__name__ == "DummyModelLoader"
    assert methods_by_prefix(model)["model.layers.1.self_attn.qkv_proj"] == "Fp8LinearMethod"
    assert not recorded_reads["keys"]


# ---- the audit fails loudly ------------------------------------------------------------------
def _load_expecting_audit_failure(path) -> str:
    with pytest.raises(MixedPrecisionError) as e:
        load_on_cpu(path, postprocess=False)
    assert e.value.code == "load_audit_failed"
    return str(e.value)


def _stream_renaming(monkeypatch, name: str, to: str | None) -> None:
    """Make the loader's stream hand SGLang `to` instead of `name` (None: drop it), and count what
    it read accordingly, as a stream with that bug would."""
    from sglang_mixed_precision.serving.loader import PlanWeightStream

    real_iter = PlanWeightStream.__iter__

    def altered(self):
        for n, tensor in real_iter(self):
            if n == name:
                self.yielded[name] -= 1
                if to is None:
                    continue
                self.yielded[to] += 1
                n = to
            yield n, tensor

    monkeypatch.setattr(PlanWeightStream, "__iter__", altered)


def test_audit_fails_on_a_dropped_tensor(tiny_qwen3, tmp_path, sglang_cpu, monkeypatch):
    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_fp8_mlp_bf16"), tmp_path / "plan")
    dropped = "model.layers.1.self_attn.k_proj.weight_scale_inv"
    _stream_renaming(monkeypatch, dropped, None)
    message = _load_expecting_audit_failure(path)
    assert f"tensor {dropped} of source 'fp8' was read 0 times" in message
    assert "model.layers.1.self_attn.qkv_proj.weight_scale_inv lacks 1 shard(s): k" in message


def test_audit_fails_when_sglang_skips_a_name(tiny_qwen3, tmp_path, sglang_cpu, monkeypatch):
    """SGLang's load_weights ignores names it does not know: the audit must not."""
    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8"), tmp_path / "plan")
    _stream_renaming(
        monkeypatch, "model.layers.0.mlp.down_proj.weight_scale_inv", "model.layers.0.mlp.down_proj.scale_inv"
    )
    message = _load_expecting_audit_failure(path)
    assert "parameter model.layers.0.mlp.down_proj.weight_scale_inv (4, 8) torch.float32 was never loaded" in message
    assert "tensor model.layers.0.mlp.down_proj.scale_inv was read but is not in the plan" in message


def test_audit_fails_on_a_layer_built_with_the_wrong_method(tiny_qwen3, tmp_path, sglang_cpu, monkeypatch):
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    from sglang_mixed_precision.serving.quant_config import MixedPrecisionConfig

    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8"), tmp_path / "plan")
    real = MixedPrecisionConfig.get_quant_method
    wrong = "model.layers.1.mlp.down_proj"
    monkeypatch.setattr(
        MixedPrecisionConfig,
        "get_quant_method",
        lambda self, layer, prefix: UnquantizedLinearMethod() if prefix == wrong else real(self, layer, prefix),
    )
    message = _load_expecting_audit_failure(path)
    assert (
        f"layer {wrong} runs UnquantizedLinearMethod but the plan (fp8-block128 from 'fp8') needs Fp8LinearMethod"
        in message
    )
    assert f"tensor {wrong}.weight_scale_inv of source 'fp8' was read but the model consumed it nowhere" in message


def test_audit_fails_on_a_tensor_loaded_twice(tiny_qwen3, tmp_path, sglang_cpu, monkeypatch):
    from sglang_mixed_precision.serving.loader import PlanWeightStream

    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8"), tmp_path / "plan")
    twice = "model.norm.weight"
    real_iter = PlanWeightStream.__iter__

    def doubled(self):
        for name, tensor in real_iter(self):
            yield name, tensor
            if name == twice:
                self.yielded[name] += 1
                yield name, tensor

    monkeypatch.setattr(PlanWeightStream, "__iter__", doubled)
    message = _load_expecting_audit_failure(path)
    assert f"tensor {twice} of source 'fp16' was read 2 times (expected once)" in message


def test_loader_refuses_a_model_or_stream_without_the_plan(tiny_qwen3, tmp_path, sglang_cpu):
    from sglang.srt.configs.load_config import LoadConfig

    from sglang_mixed_precision.serving.loader import MixedPrecisionModelLoader, mixed_config_of

    with pytest.raises(MixedPrecisionError) as e:
        mixed_config_of(torch.nn.Linear(2, 2))
    assert (
        e.value.code == "loader_without_plan"
        and "Linear was not built with the mixed_precision config" in e.value.detail
    )
    loader = MixedPrecisionModelLoader(LoadConfig(load_format="auto"))
    with pytest.raises(MixedPrecisionError) as e:
        loader.load_weights_and_postprocess(torch.nn.Linear(2, 2), iter([]), torch.device("cpu"))
    assert e.value.code == "loader_stream" and "loads only its plan's weight stream" in e.value.detail


def test_plan_dir_records_the_plan_for_people(tiny_qwen3, tmp_path):
    plan, path = make_plan_dir(mix_config(str(tiny_qwen3), "per_layer"), tmp_path / "plan")
    recorded = json.loads((path / "mixed_precision_plan.json").read_text())
    assert recorded["groups"]["model.layers.1.mlp.gate_up_proj"]["scheme"] == "fp8-block128"
    assert recorded["settings"]["quant_method"] == "mixed_precision"
