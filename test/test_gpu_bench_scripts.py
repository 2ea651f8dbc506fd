"""The GPU scripts off the GPU: gpu_bench_mix.py and gpu_reload_proof.py through their --cpu-check
modes, their server paths against fake_sglang_server.py (SGLang's routes and reply shapes, computed
on CPU) and their log parsing against SGLang's and the loader's own log formats; the serve proof's
entry-point checks with SGLang's processes replaced."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fake_sglang_server import load_script as load

FAKE_SERVER = [sys.executable, str(Path(__file__).with_name("fake_sglang_server.py"))]


@pytest.fixture(scope="module")
def proof():
    return load("gpu_reload_proof")


@pytest.fixture(scope="module")
def bench():
    return load("gpu_bench_mix")


@pytest.fixture(scope="module")
def reload_work(tmp_path_factory):
    """Sources of the reload proof, made by the first test that runs it."""
    return str(tmp_path_factory.mktemp("reload_work"))


# ---- reload proof -------------------------------------------------------------------------------------------
def test_reload_proof_cpu_check_passes_every_request_through_the_route_code(proof, tmp_path, reload_work):
    assert proof.main(["--out", str(tmp_path), "--workdir", reload_work, "--cpu-check"]) == 0
    doc = json.loads((tmp_path / "reload_proof.json").read_text())
    assert doc["passed"] and doc["steps"][-1] == "info"
    assert {"reload_200", "fp8_trunc_refused", "fp8_nan_refused", "scheme_change_409", "config_is_b"} <= set(
        doc["checks"]
    )
    assert doc["reload_fp8_nan"]["reply"]["stage"] == "stage"  # refused by the workers' staging, not the plan
    assert "sglang.launch_server" in doc["launch_command"]
    assert "**PASSED**" in (tmp_path / "reload_proof.md").read_text()


def test_reload_proof_server_path_against_a_fake_server(proof, tmp_path, reload_work, monkeypatch):
    monkeypatch.setattr(proof, "environment", lambda cpu_check: {"card": "fake card", "versions": ""})
    command = proof.launch_command
    monkeypatch.setattr(proof, "launch_command", lambda *a: FAKE_SERVER + command(*a)[2:])
    monkeypatch.setenv("FAKE_SGLANG_REFERENCE", "1")
    assert proof.main(["--out", str(tmp_path), "--workdir", reload_work]) == 0
    doc = json.loads((tmp_path / "reload_proof.json").read_text())
    assert doc["mode"] == "gpu" and doc["passed"], doc["checks"]
    assert doc["stream"]["B_after_reload"] > 0 and doc["stream"]["A"] > 0
    assert doc["dev_b_vs_ref_a"]["max_abs_dlogprob"] > doc["dev_b_vs_ref_a"]["tolerance"]
    md = (tmp_path / "reload_proof.md").read_text()
    assert "fake card" in md and "fp8_nan: HTTP 400" in md and "scheme_change: HTTP 409" in md


def test_a_proof_cut_short_keeps_its_steps(proof, tmp_path, reload_work, monkeypatch):
    monkeypatch.setattr(proof, "environment", lambda cpu_check: {"card": "fake card", "versions": ""})
    monkeypatch.setattr(proof, "launch_command", lambda *a: [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert proof.main(["--out", str(tmp_path), "--workdir", reload_work]) == 1
    doc = json.loads((tmp_path / "reload_proof.json").read_text())
    assert doc["steps"] == ["sources"] and "exited with code 3" in doc["error"] and not doc["passed"]
    assert "**FAILED**" in (tmp_path / "reload_proof.md").read_text()


# ---- bench mix ----------------------------------------------------------------------------------------------------
SGLANG_LOAD_LINE = (
    "[2026-01-01 10:00:00 TP{r}] Load weight end. elapsed={s:.2f} s, type=Qwen3MoeForCausalLM, quant=fp8, "
    "avail mem=70.12 GB, mem usage={g:.2f} GB."
)


def test_bench_parses_sglang_and_loader_log_lines(bench):
    text = "\n".join(
        [
            SGLANG_LOAD_LINE.format(r=0, s=3.21, g=6.01),
            SGLANG_LOAD_LINE.format(r=1, s=3.5, g=6.02),
            "[TP0] mixed_precision audit: 10 tensors consumed once, 10 parameters loaded; layers: 2 Fp8LinearMethod",
            "[TP0] mixed_precision: weight memory 6450000000 bytes in parameters; plan 6449000000 bytes per rank (+0.02%)",
        ]
    )
    assert bench.parse_server_log(text) == {
        "weight_load_s": 3.5,
        "weight_mem_gib": 6.02,
        "param_bytes": 6450000000,
        "logged_plan_bytes": 6449000000,
        "layers": "2 Fp8LinearMethod",
    }
    assert bench.parse_server_log("nothing") == {}


def test_serve_proof_entrypoint_checks_compare_with_the_launchers_tokens(tmp_path, monkeypatch):
    serve = load("gpu_serve_proof")
    from sglang_mixed_precision.serving import client

    launched = []
    replies = {"plain": [7, 8, 9], "dummy": [1, 1, 1]}

    monkeypatch.setattr(client, "start_server", lambda cmd, log: launched.append(cmd) or SimpleNamespace(cmd=cmd))
    monkeypatch.setattr(client, "wait_until_ready", lambda *a, **k: 1.0)
    monkeypatch.setattr(client, "stop_server", lambda proc: None)

    def generate(url, payload, timeout):
        ids = replies["dummy" if "--load-format" in launched[-1] else "plain"]
        return {"meta_info": {"output_token_logprobs": [[-0.5, t, None] for t in ids]}}

    monkeypatch.setattr(client, "post_json", generate)
    engine_argv = []

    def run_engine(argv, **kw):
        engine_argv.append(argv)
        return SimpleNamespace(stdout="loading\nENGINE_OUTPUT [[7, 8, 4]]\n", stderr="")

    monkeypatch.setattr(serve.subprocess, "run", run_engine)
    (tmp_path / "logs").mkdir()
    res = serve.Result("qwen3/m", "qwen3", "m")
    args = SimpleNamespace(max_new_tokens=3, step_timeout=5.0)
    serve.check_entrypoints(res, tmp_path / "plan", [{"prompt_ids": [1, 2], "output_ids": [7, 8, 9]}], args, tmp_path)

    assert [c[1:3] for c in launched] == [["-m", "sglang.launch_server"]] * 2
    assert all(c[c.index("--model-path") + 1] == str(tmp_path / "plan") for c in launched)
    assert "--load-format" not in launched[0] and launched[1][-2:] == ["--load-format", "dummy"]
    assert engine_argv[0][3] == str(tmp_path / "plan") and json.loads(engine_argv[0][4]) == [[1, 2]]
    engine_settings = json.loads(engine_argv[0][6])  # the servers' settings, and a port of its own
    assert engine_settings.pop("nccl_port") not in {int(c[c.index("--nccl-port") + 1]) for c in launched}
    assert engine_settings == serve.SERVER_SETTINGS
    assert res.checks == {
        "launch_server_plan_dir_same_tokens": True,
        "load_format_dummy_answers": True,
        "engine_plan_dir_same_tokens": False,
    }  # the Engine's third token differs
    assert "`sglang.Engine` False" in serve.markdown(
        {
            "card": "c",
            "capability": "sm90",
            "gpus": 1,
            "torch": "t",
            "cuda": "c",
            "sglang": "s",
            "tp_size": 1,
            "dp_size": 1,
        },
        [res],
        1.0,
    )


def test_serve_proof_cpu_check_plans_validates_and_compares_reference_tokens(tmp_path):
    serve = load("gpu_serve_proof")
    argv = [
        "--out",
        str(tmp_path / "out"),
        "--workdir",
        str(tmp_path / "work"),
        "--cpu-check",
        "--only",
        "qwen3_moe/attn-fp8+experts-int4",
        "--entrypoints",
        "attn-fp8+experts-int4",
        "--max-new-tokens",
        "4",
    ]
    assert serve.main(argv) == 0
    (res,) = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert res["checks"] == {"sglang_accepts_commands": True, "reference_bf16_equals_fp32": True}
    plan_dir = tmp_path / "out" / "plans" / "qwen3_moe" / "attn-fp8+experts-int4"
    assert (
        json.loads((plan_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "mixed_precision"
    )


def test_gpu_scripts_stop_on_a_machine_without_a_gpu(monkeypatch):
    import torch

    common = load("gpu_common")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        common.environment(cpu_check=False)
    assert str(e.value) == (
        "no CUDA device: run this on the GPU machine (source bench/gpu_setup.sh first), or pass --cpu-check"
    )
    assert common.environment(cpu_check=True)["gpus"] == 0
