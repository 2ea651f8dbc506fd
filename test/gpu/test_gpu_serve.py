"""Tiny mixes of every family served by SGLang through the launcher match a transformers reference.

Each mix is its own server (started side by side by the ``fleet`` fixture) and its own test ids:
gpu_harness.MIXES for Qwen3 and Qwen3-MoE, gpu_harness.FAMILY_MIXES (FP8-block attention; int4 MLP
or experts) for Llama, Qwen2, Qwen2-MoE, Mixtral and a tied-embedding Qwen3. For every mix:

* ``/generate``, ``/v1/completions`` and ``/v1/chat/completions`` answer;
* greedy tokens equal the reference's (transformers on the same GPU from the same sources: 16-bit
  layers as stored, quantized layers dequantized, fp8 layers' activations quantized per token-group
  of 128 as SGLang's W8A8 block kernels do), and the log-probabilities SGLang returns (prompt and
  generated tokens, teacher-forced through the reference) are within the tolerance;
* the weight memory SGLang holds (parameter bytes the mixed loader logs) is within 2% of the plan.

Tolerance. Both sides compute the same function and differ by floating-point arithmetic only.
How far bf16 arithmetic alone moves this model's log-probabilities is measured on the same GPU by
running the reference in bf16 and in fp32 (delta); SGLang's kernels also run in bf16 but sum in
other orders, fuse norms/rotary and round fp8 activations near e4m3 boundaries differently:
tolerance = 3 * delta + 0.02 nats (reference.logprob_tolerance).

The plan directory the launcher wrote for ENTRYPOINT_MIX is also served by plain
``python -m sglang.launch_server`` (greedy tokens equal the launcher's), with ``--load-format dummy``
(answers without reading a weight) and by ``sglang.Engine`` (tokens equal the launcher's).
"""

from __future__ import annotations

import pytest

import gpu_harness as h
from sglang_mixed_precision.serving import client

pytestmark = pytest.mark.gpu

MIX_CASES = [
    pytest.param(arch, mix, id=h.mix_server(arch, mix), marks=pytest.mark.servers(h.mix_server(arch, mix)))
    for arch, mix in h.mix_cases()
]


def entrypoint_case(entrypoint: str):
    """One case per architecture: the launcher's server for ENTRYPOINT_MIX and `entrypoint` on its
    plan directory ("weights" / "dummy": stock launch_server, "engine": sglang.Engine)."""

    def name(arch: str) -> str:
        if entrypoint == "engine":
            return h.engine_run(arch, h.ENTRYPOINT_MIX)
        return h.plan_dir_server(arch, h.ENTRYPOINT_MIX, entrypoint)

    return [
        pytest.param(
            arch,
            id=h.mix_server(arch, h.ENTRYPOINT_MIX),
            marks=pytest.mark.servers(h.mix_server(arch, h.ENTRYPOINT_MIX), name(arch)),
        )
        for arch in h.ARCHS
    ]


@pytest.fixture(scope="module")
def generated(fleet, serve_work):
    """Greedy /generate replies of a server to PROMPTS (one request per prompt), asked once."""
    cache: dict[str, list[h.Generation]] = {}

    def get(name: str, arch: str) -> list[h.Generation]:
        if name not in cache:
            prompts = h.prompt_ids(serve_work.source(arch, "fp16"))
            cache[name] = h.generate_each(fleet.server(name).url, prompts)
        return cache[name]

    return get


@pytest.mark.parametrize("arch, mix", MIX_CASES)
def test_endpoints_answer(arch, mix, fleet, generated, record):
    server = fleet.server(h.mix_server(arch, mix))
    record["ready_s"] = server.ready_s
    outputs = generated(server.spec.name, arch)
    assert [len(g.output_ids) for g in outputs] == [h.MAX_NEW_TOKENS] * len(h.PROMPTS)
    assert all(len(g.output_logprobs) == h.MAX_NEW_TOKENS for g in outputs)
    model = client.get_json(f"{server.url}/v1/models")["data"][0]["id"]
    completion = client.post_json(
        f"{server.url}/v1/completions",
        {"model": model, "prompt": h.PROMPTS[0], "max_tokens": h.MAX_NEW_TOKENS, "temperature": 0},
    )
    text = completion["choices"][0]["text"]
    assert isinstance(text, str) and completion["usage"]["completion_tokens"] >= 1, completion
    record["completions_equal_generate"] = text == outputs[0].text  # recorded: EOS may end the completion early
    chat = client.post_json(
        f"{server.url}/v1/chat/completions",
        {
            "model": model,
            "temperature": 0,
            "max_tokens": h.MAX_NEW_TOKENS,
            "messages": [{"role": "user", "content": "Say hello."}],
        },
    )
    assert isinstance(chat["choices"][0]["message"]["content"], str), chat
    assert chat["usage"]["completion_tokens"] >= 1, chat


@pytest.mark.parametrize("arch, mix", MIX_CASES)
def test_matches_reference(arch, mix, generated, serve_work, record):
    outputs = generated(h.mix_server(arch, mix), arch)
    h.check_against_reference(serve_work.config(arch, mix), outputs, record)


@pytest.mark.parametrize("arch, mix", MIX_CASES)
def test_weight_memory_matches_plan(arch, mix, fleet, serve_work, record):
    server = fleet.server(h.mix_server(arch, mix))
    facts = client.parse_server_log(server.log_text())
    planned = h.plan_rank_bytes(serve_work.config(arch, mix))
    record.update(layers=facts.get("layers"), plan_bytes=planned, weight_load_s=facts.get("weight_load_s"))
    assert "param_bytes" in facts, f"the mixed loader's weight-memory line is not in {server.log_path}"
    delta = (facts["param_bytes"] - planned) / planned
    record.update(param_bytes=facts["param_bytes"], weight_vs_plan=round(delta, 5))
    assert facts["logged_plan_bytes"] == planned, "the loader planned other bytes than this plan"
    assert abs(delta) <= h.MEMORY_TOLERANCE


# ---- SGLang's own entry points on the launcher's plan directory ------------------------------------------
@pytest.mark.parametrize("arch", entrypoint_case("weights"))
def test_plan_dir_served_by_stock_launch_server(arch, fleet, generated, record):
    launcher_tokens = [g.output_ids for g in generated(h.mix_server(arch, h.ENTRYPOINT_MIX), arch)]
    name = h.plan_dir_server(arch, h.ENTRYPOINT_MIX, "weights")
    record["ready_s"] = fleet.server(name).ready_s
    assert [g.output_ids for g in generated(name, arch)] == launcher_tokens


@pytest.mark.parametrize("arch", entrypoint_case("dummy"))
def test_plan_dir_with_dummy_weights_answers(arch, fleet, generated, record):
    name = h.plan_dir_server(arch, h.ENTRYPOINT_MIX, "dummy")
    record["ready_s"] = fleet.server(name).ready_s
    outputs = generated(name, arch)
    assert [len(g.output_ids) for g in outputs] == [h.MAX_NEW_TOKENS] * len(h.PROMPTS)


@pytest.mark.parametrize("arch", entrypoint_case("engine"))
def test_plan_dir_in_sglang_engine(arch, fleet, generated, record):
    launcher_tokens = [g.output_ids for g in generated(h.mix_server(arch, h.ENTRYPOINT_MIX), arch)]
    engine = fleet.server(h.engine_run(arch, h.ENTRYPOINT_MIX))  # run by the fleet beside the servers
    record["run_s"] = engine.ready_s
    assert engine.result == launcher_tokens
