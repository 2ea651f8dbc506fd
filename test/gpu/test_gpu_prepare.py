"""The GPU tests' preparation, on CPU (not marked gpu: CI runs it).

Everything the gpu tests do before SGLang starts: the tiny models and their conversions, the mixes,
every server's command through the launcher (which validates the plan and writes the plan
directory) and SGLang's own argument parser, sglang.Engine's keywords, the reference facts the GPU
assertions rely on (greedy tokens the same in bf16 as in fp32; mix B's outputs outside mix A's
tolerance), the damaged reload sources, and the results record. Also: without CUDA the gpu tests
skip, with the reason.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_harness as h
from gpu_results import Recorder, markdown
from sglang_mixed_precision.core.errors import ErrorCode, MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.serving import client


def test_every_server_command_passes_the_launcher_and_sglangs_parser(serve_work, reload_work):
    specs = h.server_specs(h.all_server_names(), serve_work, reload_work)
    assert {s.name for s in specs} == set(h.all_server_names())
    problems, plan_dirs = {}, {}
    for i, spec in enumerate(specs):
        if spec.program == "engine":
            plan_dir, prompts = spec.args
            assert Path(plan_dir) == plan_dirs[spec.after], spec.name
            assert json.loads(prompts) == h.prompt_ids(serve_work.source(spec.name.split("/")[0], "fp16"))
            continue
        command = spec.sglang_command(30000 + 2 * i, 30001 + 2 * i, out=io.StringIO())
        assert command[1:3] == ["-m", "sglang.launch_server"], command
        problem = client.sglang_argv_problem(command[3:])
        if problem:
            problems[spec.name] = problem
        model_path = Path(command[command.index("--model-path") + 1])
        if spec.program == "launcher":
            plan_dirs[spec.name] = model_path
            qc = json.loads((model_path / "config.json").read_text())["quantization_config"]
            assert qc["quant_method"] == "mixed_precision", spec.name
            assert Path(qc["config_path"]) == Path(spec.args[spec.args.index("--mixed-precision-config") + 1])
        elif spec.after:  # stock SGLang on the plan directory its launcher server writes
            assert model_path == plan_dirs[spec.after], spec.name
    assert not problems
    assert len(plan_dirs) == len(h.mix_cases()) + 1  # every mix, and the reload server's
    assert len(h.mix_cases()) == len(h.ARCHS) * len(h.MIXES) + len(h.FAMILY_ARCHS) * len(h.FAMILY_MIXES)


def test_launcher_script_prints_the_command_it_would_start(serve_work, tmp_path):
    spec = h.available_specs(serve_work, None)[h.mix_server("qwen3_moe", h.ENTRYPOINT_MIX)]
    command = spec.command(30000, 30001)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(h.REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([*command, "--print-command"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    printed = p.stdout.strip().splitlines()[-1]
    plan_dir = serve_work.plan_dir("qwen3_moe", h.ENTRYPOINT_MIX)
    assert f"-m sglang.launch_server --model-path {plan_dir} " in printed
    assert "--nccl-port 30001" in printed and "--disable-cuda-graph" in printed


def test_engine_keywords_are_server_args_fields():
    from sglang_mixed_precision.serving.compat import server_args_fields

    fields = server_args_fields()
    assert "model_path" in fields and "tp_size" in fields
    assert set(h.engine_settings(30001)) <= fields
    assert h.engine_settings(30001)["nccl_port"] == 30001


@pytest.mark.parametrize(
    "arch, mix",
    [(a, h.ENTRYPOINT_MIX) for a in h.ARCHS] + [(a, m) for a in h.FAMILY_ARCHS for m in h.FAMILY_MIXES],
)
def test_reference_picks_the_same_tokens_in_bf16_and_fp32(arch, mix, serve_work):
    """The GPU tests require SGLang's greedy tokens to equal the reference's: only a fair demand
    where bf16 arithmetic does not change them (the tiny models' clear margins). Checked here on the
    Qwen3 mix that quantizes most differently (fp8 attention, int4 experts) and on every family's
    mixes; the GPU tests record both references' tokens for every mix."""
    reference = h.MixReference(serve_work.config(arch, mix), device="cpu")
    for prompt in h.prompt_ids(serve_work.source(arch, "fp16")):
        fp32, bf16 = reference.greedy(prompt, h.MAX_NEW_TOKENS)
        assert fp32 == bf16


def test_reload_sources_and_references_tell_a_from_b(reload_work):
    from sglang_mixed_precision.core.config import parse_config
    from sglang_mixed_precision.core.plan import build_plan

    bodies = reload_work.reload_bodies()
    with pytest.raises(MixedPrecisionError) as truncated:
        build_plan(parse_config(bodies["fp8_trunc"]["config"]))
    error = truncated.value
    assert str(ErrorCode.CORRUPT_SAFETENSORS) in (error.codes if isinstance(error, ValidationErrors) else [error.code])
    assert nan_scales(reload_work.sources["fp8_nan"]) == 1 and nan_scales(reload_work.sources["fp8_b"]) == 0
    build_plan(parse_config(bodies["scheme_change"]["config"]))  # a valid mix: the server must refuse it in place

    refs = {mix: h.MixReference(reload_work.config(mix), device="cpu") for mix in ("A", "B")}
    outputs_b = refs["B"].greedy_generations(h.prompt_ids(reload_work.sources["fp16"], h.RELOAD_PROMPTS), 2)
    within_b, against_a = refs["B"].deviation(outputs_b), refs["A"].deviation(outputs_b)
    assert within_b["max_abs_dlogprob"] <= within_b["tolerance"]
    assert against_a["max_abs_dlogprob"] > against_a["tolerance"]


def nan_scales(source: Path) -> int:
    from safetensors.torch import load_file

    return sum(
        int(t.isnan().sum())
        for f in sorted(source.glob("*.safetensors"))
        for name, t in load_file(str(f)).items()
        if name.endswith("weight_scale_inv")
    )


def test_results_record_names_the_card_and_every_outcome(tmp_path):
    rec = Recorder(tmp_path, {"card": "NVIDIA H200", "capability": "sm90", "gpus": 1, "torch": "2.11", "cuda": "13.0"})
    rec.servers = lambda: [
        {"server": "qwen3/all-bf16", "ready_s": 61.5, "log": "logs/qwen3__all-bf16.log", "error": None}
    ]
    rec.add(
        "test/gpu/test_gpu_serve.py::test_matches_reference[qwen3/all-bf16]", "passed", 1.5, {"tolerance": 0.06}, None
    )
    rec.add(
        "test/gpu/test_gpu_serve.py::test_matches_reference[qwen3/all-fp8]",
        "failed",
        2.0,
        {"tolerance": 0.1, "max_abs_dlogprob": 0.3},
        "AssertionError: assert 0.3 <= 0.1\nmore",
    )
    rec.add("test/gpu/test_gpu_reload.py::test_info_and_config_describe_mix_b", "error", 0.1, {}, "ServerFailed: x")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["counts"] == {"passed": 1, "failed": 1, "error": 1}
    assert doc["tests"][1]["measurements"] == {"tolerance": 0.1, "max_abs_dlogprob": 0.3}
    text = (tmp_path / "results.md").read_text()
    assert text == markdown(doc) and text.startswith("# GPU tests on NVIDIA H200")
    assert "## test_gpu_serve.py::test_matches_reference" in text
    assert "| case | result | s | tolerance | max_abs_dlogprob | message |" in text
    assert "| qwen3/all-fp8 | FAILED | 2 | 0.1 | 0.3 | AssertionError: assert 0.3 <= 0.1 |" in text
    assert "| - | ERROR | 0.1 | ServerFailed: x |" in text
    assert "| qwen3/all-bf16 | 61.5 | logs/qwen3__all-bf16.log | - |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the gpu tests run instead of skipping")
def test_without_cuda_the_gpu_tests_skip_with_the_reason(tmp_path):
    results = tmp_path / "results"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(Path(__file__).parent),
            "-m",
            "gpu",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SGLANG_MP_GPU_RESULTS": str(results)},
    )
    assert p.returncode == 0, p.stdout[-3000:]
    skipped = [line for line in p.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("no CUDA device" in line for line in skipped), p.stdout[-3000:]
    assert " passed" not in p.stdout and " failed" not in p.stdout
    assert not results.exists()  # nothing ran: no record written


# ---- the fleet's own bookkeeping, with stand-in processes (what SGLang does is the gpu tests' part) ----
STAND_IN_SERVER = (
    "import sys, http.server as s\n"
    "class H(s.BaseHTTPRequestHandler):\n"
    "    def do_GET(self): self.send_response(200); self.end_headers()\n"
    "s.HTTPServer(('127.0.0.1', int(sys.argv[sys.argv.index('--port') + 1])), H).serve_forever()"
)
STAND_INS = {
    "server": STAND_IN_SERVER,
    "crashes": "print('boom'); raise SystemExit(3)",
    "engine": "print('loading'); print('ENGINE_OUTPUT [[5, 6]]', flush=True)",
}


class StandIn(h.ServerSpec):
    def command(self, port: int, nccl_port: int) -> list[str]:
        return [sys.executable, "-c", STAND_INS[self.args[0]], "--port", str(port), "--nccl-port", str(nccl_port)]


def test_fleet_starts_dependents_after_their_server_and_reports_failures(tmp_path):
    specs = [
        StandIn("a", ("server",)),
        StandIn("broken", ("crashes",)),
        StandIn("a/engine", ("engine",), program="engine", after="a"),
        StandIn("broken/dependent", ("server",), program="sglang", after="broken"),
    ]
    with h.Fleet(specs, tmp_path / "logs", ports=h.Ports(), parallel=2, stagger_s=0.1, timeout=60, log=print) as fleet:
        assert client.request(fleet.server("a").url + "/health_generate", timeout=5)[0] == 200
        assert fleet.server("a/engine").result == [[5, 6]]
        with pytest.raises(h.ServerFailed, match=r"(?s)server broken did not start: .*code 3.*boom.*broken\.log"):
            fleet.server("broken")
        with pytest.raises(h.ServerFailed, match="server broken/dependent did not start: ServerFailed: server broken"):
            fleet.server("broken/dependent")
        with pytest.raises(KeyError, match="not part of this run"):
            fleet.server("other")
        running = fleet.servers["a"].proc
        ports = {fleet.servers[n].port for n in ("a", "broken", "a/engine")}
    assert running.poll() is not None  # stopped on leaving the fleet
    assert len(ports) == 3 and fleet.servers["broken/dependent"].proc is None
    assert [r["server"] for r in fleet.summary() if r["error"]] == ["broken", "broken/dependent"]
