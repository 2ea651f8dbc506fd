"""The runtime reload on a real server: swap the MLPs' fp8 source while requests stream.

A tiny Qwen3 A and a copy B with perturbed MLP weights, each converted with the project's converter;
the mix is {attention bf16, MLP fp8-block}, served through the launcher on A's fp8 source. Then:

1. greedy outputs of fixed prompts on mix A are A's (reference A);
2. a thread streams /generate requests while POST /mixed_precision/reload points the MLPs at B:
   every request succeeds and returns A's or B's tokens, and the server then computes B;
3. a reload pointing at a truncated fp8 file and one at a NaN scale are refused with 400 and the
   outputs stay B's; a change of scheme (MLP -> int4) answers 409 naming the MLP layers;
4. /mixed_precision/info and /mixed_precision/config describe mix B.

Which mix the server computes is judged on log-probabilities, not on greedy tokens alone (random
weights have near-ties that bf16 kernels break differently from any reference): SGLang's log-prob of
every generated token against the reference of mix A and of mix B, with the serve test's tolerance.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import gpu_harness as h
from sglang_mixed_precision.core.errors import ErrorCode
from sglang_mixed_precision.serving import client

pytestmark = [pytest.mark.gpu, pytest.mark.servers(h.RELOAD_SERVER)]

# damaged source -> the code its refusal names (the truncated file fails the plan, the NaN the workers' staging)
REFUSALS = {"fp8_trunc": str(ErrorCode.CORRUPT_SAFETENSORS), "fp8_nan": str(ErrorCode.RELOAD_BAD_TENSOR)}


@pytest.fixture(scope="module")
def references(reload_work):
    refs = {mix: h.MixReference(reload_work.config(mix), device="cuda") for mix in ("A", "B")}
    yield refs
    for ref in refs.values():
        ref.release()


@pytest.fixture(scope="module")
def server(fleet):
    return fleet.server(h.RELOAD_SERVER)


@pytest.fixture(scope="module")
def prompts(reload_work):
    return h.prompt_ids(reload_work.sources["fp16"], h.RELOAD_PROMPTS)


@pytest.fixture(scope="module")
def before(server, prompts) -> list[h.Generation]:
    """The server's outputs on mix A, before any reload."""
    return h.generate_batch(server.url, prompts)


def token_ids(generations: list[h.Generation]) -> list[list[int]]:
    return [g.output_ids for g in generations]


class Streamer(threading.Thread):
    """Sends the same batched /generate request back to back until stopped; records every reply."""

    def __init__(self, url: str, prompts: list[list[int]]):
        super().__init__(daemon=True)
        self.url, self.prompts, self.stop, self.replies = url, prompts, threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            t0 = time.time()
            try:
                ids = token_ids(h.generate_batch(self.url, self.prompts))
                self.replies.append({"t0": t0, "ids": ids, "error": None})
            except Exception as e:  # recorded: the test fails on any error
                self.replies.append({"t0": t0, "ids": None, "error": f"{type(e).__name__}: {e}"})


def stream_summary(replies: list[dict], out_a, out_b, t_done: float) -> dict:
    kinds = [
        "A" if r["ids"] == out_a else "B" if r["ids"] == out_b else "error" if r["error"] else "other" for r in replies
    ]
    return {
        "requests": len(kinds),
        "A": kinds.count("A"),
        "B": kinds.count("B"),
        "other": kinds.count("other"),
        "errors": [r["error"] for r in replies if r["error"]],
        "B_after_reload": sum(1 for k, r in zip(kinds, replies) if k == "B" and r["t0"] >= t_done),
    }


@pytest.fixture(scope="module")
def swap(server, prompts, before, reload_work) -> dict:
    """Stream requests for a second, reload the MLPs from B's fp8 source, stream a second more."""
    streamer = Streamer(server.url, prompts)
    streamer.start()
    try:
        time.sleep(1.0)
        t_reload = time.time()
        status, reply = client.request(f"{server.url}/mixed_precision/reload", reload_work.reload_bodies()["fp8_b"])
        t_done = time.time()
        time.sleep(1.0)
    finally:
        streamer.stop.set()
        streamer.join(timeout=120)
    after = h.generate_batch(server.url, prompts)
    return {
        "status": status,
        "reply": reply,
        "seconds": round(t_done - t_reload, 3),
        "after": after,
        "stream": stream_summary(streamer.replies, token_ids(before), token_ids(after), t_done),
    }


def test_before_reload_the_server_computes_mix_a(before, references, record):
    dev = references["A"].deviation(before)
    record.update(dev)
    assert dev["max_abs_dlogprob"] <= dev["tolerance"]


def test_reload_while_requests_stream(swap, record):
    stream = swap["stream"]
    record.update(
        status=swap["status"],
        reload_s=swap["seconds"],
        **{k: v for k, v in stream.items() if k != "errors"},
        errors=len(stream["errors"]),
    )
    reply = swap["reply"]
    assert swap["status"] == 200 and reply.get("status") == "reloaded", reply
    assert len(reply.get("layers", [])) == h.RELOAD_MLP_LAYERS, reply
    assert not stream["errors"], stream["errors"][:3]
    assert stream["other"] == 0, "a streamed request returned neither A's nor B's tokens"
    assert stream["B_after_reload"] > 0


def test_after_reload_the_server_computes_mix_b(swap, before, references, record):
    dev_b, dev_a = references["B"].deviation(swap["after"]), references["A"].deviation(swap["after"])
    record.update(
        dlogprob_vs_b=dev_b["max_abs_dlogprob"],
        tolerance_b=dev_b["tolerance"],
        dlogprob_vs_a=dev_a["max_abs_dlogprob"],
        tolerance_a=dev_a["tolerance"],
    )
    assert dev_b["max_abs_dlogprob"] <= dev_b["tolerance"]
    assert dev_a["max_abs_dlogprob"] > dev_a["tolerance"], "the outputs after the reload still fit mix A"
    assert token_ids(swap["after"]) != token_ids(before)


@pytest.mark.parametrize("source, code", list(REFUSALS.items()), ids=list(REFUSALS))
def test_damaged_source_is_refused_and_outputs_stay(source, code, swap, server, prompts, reload_work, record):
    status, reply = client.request(f"{server.url}/mixed_precision/reload", reload_work.reload_bodies()[source])
    record.update(status=status, stage=reply.get("stage") if isinstance(reply, dict) else None)
    assert status == 400 and isinstance(reply, dict) and reply.get("applied") is False, reply
    assert code in json.dumps(reply), reply
    assert token_ids(h.generate_batch(server.url, prompts)) == token_ids(swap["after"])


def test_scheme_change_answers_409_and_outputs_stay(swap, server, prompts, reload_work, record):
    status, reply = client.request(f"{server.url}/mixed_precision/reload", reload_work.reload_bodies()["scheme_change"])
    record["status"] = status
    assert status == 409 and len(reply.get("rebuild_layers", [])) == h.RELOAD_MLP_LAYERS, reply
    assert token_ids(h.generate_batch(server.url, prompts)) == token_ids(swap["after"])


def test_info_and_config_describe_mix_b(swap, server, reload_work, record):
    info = client.get_json(f"{server.url}/mixed_precision/info")
    status, config_text = client.request(f"{server.url}/mixed_precision/config")
    gate = info["modules"]["model.layers.0.mlp.gate_proj"]
    record.update(gate_method=gate.get("method"), reloads=len(info.get("reloads") or []))
    assert Path(gate["path"]).resolve() == reload_work.sources["fp8_b"].resolve(), gate
    assert gate["method"] == "Fp8LinearMethod", gate
    assert status == 200 and config_text == reload_work.reload_bodies()["fp8_b"]["config"]
