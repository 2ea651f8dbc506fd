"""Tensor parallelism: two CPU ranks (gloo) load a mix; each holds its shard of every source tensor."""

from __future__ import annotations

import torch

from serving_harness import mix_config, read_source_tensor, run_ranks, tp_worker
from sglang_mixed_precision.serving.plandir import make_plan_dir


def test_two_ranks_load_their_shards_of_an_fp8_attention_int4_experts_mix(tiny_qwen3_moe, tmp_path):
    plan, path = make_plan_dir(
        mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4"), tmp_path / "plan", tp_size=2, int4_moe_kernel="marlin"
    )
    results = run_ranks(tp_worker, path)
    for rank, ok, summary, _ in results:
        assert ok, f"rank {rank}: {summary}"
        assert "4 Fp8LinearMethod, 2 GPTQMarlinMoEMethod" in summary

    src = lambda name: read_source_tensor(plan, name)  # noqa: E731
    bits = lambda t: t.view(torch.uint8)  # noqa: E731
    a, e = "model.layers.1.self_attn.", "model.layers.1.mlp.experts."
    for rank, _, _, shards_file in results:
        shards = torch.load(shards_file)
        half = slice(rank * 256, (rank + 1) * 256)  # o_proj K 512 / 2; q rows 512 / 2
        kv = slice(rank * 128, (rank + 1) * 128)  # one of two kv heads of 128 per rank
        assert torch.equal(bits(shards[a + "o_proj.weight"]), bits(src(a + "o_proj.weight"))[:, half])
        qkv = torch.cat(
            [
                bits(src(a + "q_proj.weight"))[half],
                bits(src(a + "k_proj.weight"))[kv],
                bits(src(a + "v_proj.weight"))[kv],
            ]
        )
        assert torch.equal(bits(shards[a + "qkv_proj.weight"]), qkv)
        inter = slice(rank * 128, (rank + 1) * 128)  # moe_intermediate 256 / 2
        packed = slice(rank * 16, (rank + 1) * 16)  # the same 128 rows of K, 8 per int32
        for x in (0, 6):
            assert torch.equal(shards[e + "w13_qweight"][x][:, :128], src(e + f"{x}.gate_proj.qweight")[:, inter])
            assert torch.equal(shards[e + "w13_qweight"][x][:, 128:], src(e + f"{x}.up_proj.qweight")[:, inter])
            assert torch.equal(shards[e + "w2_qweight"][x], src(e + f"{x}.down_proj.qweight")[packed])
