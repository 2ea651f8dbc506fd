"""DeepSeek-V3 mixes built and loaded by SGLang 0.5.17's own DeepseekV3ForCausalLM on CPU, through the
mixed loader and its audit: the fused q_a/kv_a layer, kv_b_proj's post-load split, shared experts,
int4 routed experts and the router's e_score_correction_bias, each from its planned source."""

from __future__ import annotations

import pytest
import torch

from serving_harness import (
    converted,
    init_sglang_cpu,
    load_on_cpu,
    methods_by_prefix,
    read_source_tensor,
    run_ranks,
    tp_worker,
    write_mix,
)
from sglang_mixed_precision.core.errors import MixedPrecisionError
from sglang_mixed_precision.core.formats.fp8 import dequant_block
from sglang_mixed_precision.serving.plandir import make_plan_dir
from sglang_mixed_precision.testing.tinymodels import make_tiny_model

MIXES = {
    "fp8_attn_fp8_shared_int4_experts": [
        ("model.layers.*.mlp.experts.*", "int4"),
        ("model.layers.*.self_attn.*", "fp8"),
        ("model.layers.*.mlp.shared_experts.*", "fp8"),
    ],
    "bf16_attn_fp8_experts": [("model.layers.*.mlp.*", "fp8")],
}
A1 = "model.layers.1.self_attn."


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    return make_tiny_model("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3") / "bf16")


def use_generic_rope_on_cpu():
    """SGLang's CPU rotary embedding only takes DeepSeek's yarn scaling; the tiny model has none, so
    the generic rotary embedding (the one CUDA runs) is built on CPU too. Returns the undo."""
    import sglang.srt.layers.rotary_embedding.factory as factory

    original = factory.get_rope_cpu

    def generic_rope(*args, device=None, **kwargs):
        return factory.get_rope(*args[:8], **kwargs)

    factory.get_rope_cpu = generic_rope
    return lambda: setattr(factory, "get_rope_cpu", original)


@pytest.fixture(scope="module")
def deepseek_cpu():
    init_sglang_cpu()
    undo = use_generic_rope_on_cpu()
    yield
    undo()


def deepseek_tp_worker(rank: int, world: int, port: int, plan_dir: str, queue) -> None:
    from sglang_mixed_precision.serving.plugin import register_quantization_method

    register_quantization_method()  # before the rotary module is imported and ServerArgs reads the plan dir
    use_generic_rope_on_cpu()
    tp_worker(rank, world, port, plan_dir, queue)


def plan_dir(model_dir, mix: str, tmp_path):
    config = write_mix(converted(str(model_dir)), mix, "fp16", MIXES[mix])
    return make_plan_dir(config, tmp_path / "plan")


def fp8_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_fp8_attention_and_shared_experts_with_int4_experts(tiny_deepseek, deepseek_cpu, tmp_path):
    plan, path = plan_dir(tiny_deepseek, "fp8_attn_fp8_shared_int4_experts", tmp_path)
    model, loader = load_on_cpu(path, postprocess=False)  # int4 experts repack on CUDA only
    report = loader.report
    assert report.ok and report.tensors == sum(len(v) for v in plan.tensors_by_source().values())
    methods = methods_by_prefix(model)
    for layer in (0, 1):
        p = f"model.layers.{layer}.self_attn."
        for leaf in ("fused_qkv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "o_proj"):
            assert methods[p + leaf] == "Fp8LinearMethod", p + leaf
    assert methods["model.layers.1.mlp.shared_experts.gate_up_proj"] == "Fp8LinearMethod"
    assert methods["model.layers.1.mlp.shared_experts.down_proj"] == "Fp8LinearMethod"
    assert methods["model.layers.1.mlp.experts"] in ("MoeWNA16Method", "GPTQMarlinMoEMethod")
    assert methods["model.layers.0.mlp.gate_up_proj"] == "UnquantizedLinearMethod"  # the dense layer

    params = dict(model.named_parameters())
    src = lambda name: read_source_tensor(plan, name)  # noqa: E731
    # SGLang's load_weights joined q_a_proj and kv_a_proj_with_mqa, FP8 weights and block scales alike
    fused = A1 + "fused_qkv_a_proj_with_mqa."
    assert torch.equal(
        fp8_bits(params[fused + "weight"]),
        fp8_bits(torch.cat([src(A1 + "q_a_proj.weight"), src(A1 + "kv_a_proj_with_mqa.weight")])),
    )
    assert torch.equal(
        params[fused + "weight_scale_inv"],
        torch.cat([src(A1 + "q_a_proj.weight_scale_inv"), src(A1 + "kv_a_proj_with_mqa.weight_scale_inv")]),
    )
    # kv_b_proj was split into w_kc / w_vc after loading, from its FP8 weight (requantized per tensor on CPU)
    attn = model.model.layers[1].self_attn
    kv_b = dequant_block(src(A1 + "kv_b_proj.weight"), src(A1 + "kv_b_proj.weight_scale_inv"))
    w_kc, w_vc = kv_b.unflatten(0, (-1, 256)).split([128, 128], dim=1)
    scale = attn.w_scale.float() if attn.w_scale is not None else 1.0
    got_kc, got_vc = attn.w_kc.float() * scale, attn.w_vc.float() * scale
    assert got_kc.shape == w_kc.shape and got_vc.shape == w_vc.transpose(1, 2).shape
    assert (got_kc - w_kc).norm() / w_kc.norm() < 0.08
    assert (got_vc - w_vc.transpose(1, 2)).norm() / w_vc.norm() < 0.08
    # the router's correction bias, float32 from the 16-bit source; int4 experts from the int4 source
    bias = params["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and torch.equal(bias, src("model.layers.1.mlp.gate.e_score_correction_bias"))
    assert plan.modules["model.layers.1.mlp.experts.3.up_proj"].label == "int4"
    experts = model.model.layers[1].mlp.experts
    qweight = getattr(experts, "w13_qweight", None)
    if qweight is not None:  # MoeWNA16: [E, 2I, K/8 as packed int32 viewed per row]
        assert qweight.abs().sum() > 0
    shared = "model.layers.1.mlp.shared_experts.gate_up_proj.weight"
    assert torch.equal(
        fp8_bits(params[shared]),
        fp8_bits(
            torch.cat(
                [
                    src("model.layers.1.mlp.shared_experts.gate_proj.weight"),
                    src("model.layers.1.mlp.shared_experts.up_proj.weight"),
                ]
            )
        ),
    )


def test_bf16_attention_and_fp8_experts(tiny_deepseek, deepseek_cpu, tmp_path):
    plan, path = plan_dir(tiny_deepseek, "bf16_attn_fp8_experts", tmp_path)
    model, loader = load_on_cpu(path, postprocess=False)
    assert loader.report.ok
    methods = methods_by_prefix(model)
    assert methods[A1 + "fused_qkv_a_proj_with_mqa"] == "UnquantizedLinearMethod"
    assert methods[A1 + "kv_b_proj"] == "UnquantizedLinearMethod"
    assert methods["model.layers.1.mlp.experts"] == "Fp8MoEMethod"
    assert methods["model.layers.0.mlp.gate_up_proj"] == "Fp8LinearMethod"
    params = dict(model.named_parameters())
    src = lambda name: read_source_tensor(plan, name)  # noqa: E731
    assert torch.equal(
        params[A1 + "fused_qkv_a_proj_with_mqa.weight"],
        torch.cat([src(A1 + "q_a_proj.weight"), src(A1 + "kv_a_proj_with_mqa.weight")]),
    )
    # a 16-bit kv_b_proj is split as stored
    attn = model.model.layers[1].self_attn
    w_kc, w_vc = src(A1 + "kv_b_proj.weight").unflatten(0, (-1, 256)).split([128, 128], dim=1)
    assert torch.equal(attn.w_kc, w_kc) and torch.equal(attn.w_vc, w_vc.transpose(1, 2))
    # FusedMoE w13 of expert 5 = gate rows then up rows, FP8 bits and block scales from the fp8 source
    experts = model.model.layers[1].mlp.experts
    e5 = "model.layers.1.mlp.experts.5."
    assert torch.equal(
        fp8_bits(experts.w13_weight[5]),
        fp8_bits(torch.cat([src(e5 + "gate_proj.weight"), src(e5 + "up_proj.weight")])),
    )
    assert torch.equal(
        experts.w13_weight_scale_inv[5],
        torch.cat([src(e5 + "gate_proj.weight_scale_inv"), src(e5 + "up_proj.weight_scale_inv")]),
    )
    assert torch.equal(fp8_bits(experts.w2_weight[5]), fp8_bits(src(e5 + "down_proj.weight")))


def test_the_audit_catches_a_tensor_deepseek_skips(tiny_deepseek, deepseek_cpu, tmp_path, monkeypatch):
    """DeepSeek loads on a thread pool: the audit still names the one tensor load_weights dropped."""
    from sglang.srt.models.deepseek_v2 import DeepseekV2ForCausalLM

    original = DeepseekV2ForCausalLM.load_weights

    def dropping(self, weights, *args, **kwargs):
        kept = ((n, t) for n, t in weights if n != "model.layers.1.mlp.gate.e_score_correction_bias")
        return original(self, kept, *args, **kwargs)

    monkeypatch.setattr(DeepseekV2ForCausalLM, "load_weights", dropping)
    _, path = plan_dir(tiny_deepseek, "bf16_attn_fp8_experts", tmp_path)
    with pytest.raises(MixedPrecisionError) as e:
        load_on_cpu(path, postprocess=False)
    msg = str(e.value)
    assert e.value.code == "load_audit_failed"
    assert "model.layers.1.mlp.gate.e_score_correction_bias of source 'fp16' was read but the model consumed it" in msg
    assert "parameter model.layers.1.mlp.gate.e_score_correction_bias (8,) torch.float32 was never loaded" in msg
    assert msg.count("problem(s)") == 1 and "2 problem(s)" in msg


def test_two_ranks_load_their_shards_of_the_mla_mix(tiny_deepseek, tmp_path):
    """TP 2 on gloo: the fused q_a/kv_a layer is replicated, q_b_proj / kv_b_proj split their rows,
    o_proj its columns, the shared experts their intermediate; every rank's audit passes."""
    config = write_mix(converted(str(tiny_deepseek)), "tp2", "fp16", MIXES["fp8_attn_fp8_shared_int4_experts"])
    plan, path = make_plan_dir(config, tmp_path / "plan", tp_size=2, int4_moe_kernel="wna16")
    results = run_ranks(deepseek_tp_worker, path, timeout=400)
    for rank, ok, summary, _ in results:
        assert ok, f"rank {rank}: {summary}"
        assert "10 Fp8LinearMethod, 1 MoeWNA16Method" in summary  # 2 x 4 attention layers, 2 shared-expert ones

    src = lambda name: read_source_tensor(plan, name)  # noqa: E731
    m = "model.layers.1.mlp.shared_experts."
    for rank, _, _, shards_file in results:
        shards = torch.load(shards_file)
        rows = lambda n, r=rank: slice(r * n // 2, (r + 1) * n // 2)  # noqa: E731
        fused = torch.cat([src(A1 + "q_a_proj.weight"), src(A1 + "kv_a_proj_with_mqa.weight")])
        assert torch.equal(fp8_bits(shards[A1 + "fused_qkv_a_proj_with_mqa.weight"]), fp8_bits(fused))
        assert torch.equal(fp8_bits(shards[A1 + "q_b_proj.weight"]), fp8_bits(src(A1 + "q_b_proj.weight"))[rows(768)])
        assert torch.equal(shards[A1 + "q_b_proj.weight_scale_inv"], src(A1 + "q_b_proj.weight_scale_inv")[rows(6)])
        assert torch.equal(
            fp8_bits(shards[A1 + "kv_b_proj.weight"]), fp8_bits(src(A1 + "kv_b_proj.weight"))[rows(1024)]
        )
        assert torch.equal(fp8_bits(shards[A1 + "o_proj.weight"]), fp8_bits(src(A1 + "o_proj.weight"))[:, rows(512)])
        gate_up = torch.cat([src(m + "gate_proj.weight")[rows(256)], src(m + "up_proj.weight")[rows(256)]])
        assert torch.equal(fp8_bits(shards[m + "gate_up_proj.weight"]), fp8_bits(gate_up))
        bias = shards["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert torch.equal(bias, src("model.layers.1.mlp.gate.e_score_correction_bias"))


def test_shared_experts_fused_into_the_routed_layer_are_refused(tiny_deepseek, deepseek_cpu, tmp_path, monkeypatch):
    """On CUDA, SGLang fuses DeepSeek-V3's shared expert into the FusedMoE (256 experts) unless told not
    to: the loader refuses before reading a weight, naming the flag."""
    import sglang.srt.models.deepseek_v2 as deepseek_v2

    # SGLang decides the fusion in a model method in 0.5.17 and in a module-level function in 0.5.23.
    if hasattr(deepseek_v2.DeepseekV2ForCausalLM, "determine_num_fused_shared_experts"):

        def fused(self, *args, **kwargs):
            self.num_fused_shared_experts = 1

        monkeypatch.setattr(deepseek_v2.DeepseekV2ForCausalLM, "determine_num_fused_shared_experts", fused)
    else:
        monkeypatch.setattr(deepseek_v2, "get_num_fused_shared_experts", lambda *args, **kwargs: 1)
    _, path = plan_dir(tiny_deepseek, "bf16_attn_fp8_experts", tmp_path)
    with pytest.raises(MixedPrecisionError) as e:
        load_on_cpu(path, postprocess=False)
    assert e.value.code == "shared_experts_fused" and "--disable-shared-experts-fusion" in str(e.value)
