"""The GPU scripts off the GPU: gpu_bench_mix.py and gpu_reload_proof.py through their --cpu-check
modes, their server paths against fake_sglang_server.py (SGLang's routes and reply shapes, computed
on CPU) and their log parsing against SGLang's and the loader's own log formats; the serve proof's
entry-point checks with SGLang's processes replaced."""

from __future__ import annotations

import json
import sys
import time
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
def test_bench_cpu_check_resolves_every_command(bench, tmp_path):
    assert bench.main(["--out", str(tmp_path), "--cpu-check", "--layers", "1", "--tp-size", "2"]) == 0
    doc = json.loads((tmp_path / "bench_mix.json").read_text())
    assert len(doc["runs"]) == len(bench.RUNS) and not doc["not_run"]
    stock_int4 = doc["runs"]["stock-int4-tp2dp1"]["sglang_command"]
    assert "--quantization" in stock_int4 and stock_int4[stock_int4.index("--quantization") + 1] == "moe_wna16"
    mixed = doc["runs"]["mix-attnfp8-expint4-tp2dp1"]
    assert mixed["sglang_command"][mixed["sglang_command"].index("--model-path") + 1].endswith(
        "plans/mix-attnfp8-expint4-tp2dp1"
    )
    assert mixed["plan_rank_bytes"] < mixed["plan_total_bytes"]  # planned for tp 2
    assert all("error" not in r for r in doc["runs"].values())


def test_bench_server_path_against_a_fake_server(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "environment", lambda cpu_check: {"card": "fake card", "gpus": 1, "versions": ""})
    monkeypatch.setattr(bench, "program", lambda name: FAKE_SERVER)
    argv = ["--out", str(tmp_path), "--shape", "tiny", "--layers", "1", "--repeats", "1"]
    assert bench.main(argv + ["--only", "bf16"]) == 0
    assert bench.main(argv + ["--only", "mix-attnfp8-expint4"]) == 0  # a second command: results merge
    first = json.loads((tmp_path / "bench_mix.json").read_text())
    assert bench.main(argv + ["--only", "bf16"]) == 0  # measured already: no server starts again
    doc = json.loads((tmp_path / "bench_mix.json").read_text())
    assert doc["runs"] == first["runs"]
    assert set(doc["runs"]) == {"stock-bf16-tp1dp1", "mixed-bf16-tp1dp1", "mix-attnfp8-expint4-tp1dp1"}
    for r in doc["runs"].values():
        assert r["ttft_s"] > 0 and r["decode_tok_s_b1"] > 0 and r["decode_tok_s_b32"] > 0 and r["weight_load_s"] == 0.25
    mix = doc["runs"]["mix-attnfp8-expint4-tp1dp1"]
    assert mix["param_bytes"] == mix["plan_rank_bytes"] and mix["bytes_read"] == mix["plan_total_bytes"]
    [row] = doc["comparisons"]
    assert row["format"] == "bf16" and row["identical_greedy_tokens"] is True
    assert row["load_time_stock_over_mixed"] == 1.0
    # the fake's "mem usage" is rounded to 0.01 GiB like SGLang's: far off for a model of a few MB
    assert any(m.startswith("mix-attnfp8-expint4-tp1dp1: gpu_mem_vs_plan") for m in doc["misses"])
    assert not any("bytes_read_vs_plan" in m or "param_bytes_vs_plan" in m for m in doc["misses"])
    md = (tmp_path / "bench_mix.md").read_text()
    assert (
        "fake card" in md and "- mix-attnfp8-expint4-tp1dp1: gpu_mem_vs_plan" in md and "Not run yet: stock-fp8" in md
    )


def test_bench_budget_skips_runs_that_would_not_fit(bench, tmp_path, monkeypatch):
    clock, started = [1000.0], []

    def run_one(name, *a):  # a server start and its measurements, slower than estimated, on a fake clock
        clock[0] += bench.FIRST_START_S + bench.MEASURE_S + 60
        started.append(name)
        return {"run": name, "kind": "stock", "tp": 1, "dp": 1}

    monkeypatch.setattr(bench, "time", SimpleNamespace(time=lambda: clock[0], strftime=time.strftime))
    monkeypatch.setattr(bench, "prompt_ids", lambda conv: [[1, 2]])
    monkeypatch.setattr(bench, "run_one", run_one)
    budget = bench.FIRST_START_S + bench.START_S + 2 * bench.MEASURE_S + 10  # two runs as estimated, not as measured
    args = SimpleNamespace(tp_size=1, dp_size=1, budget=budget, shape="tiny", layers=1)
    results = bench.Results(tmp_path, {"card": "c", "gpus": 1, "versions": ""}, args, "gpu")
    bench.run_gpu(["stock-bf16", "mixed-bf16", "stock-fp8"], tmp_path, tmp_path, tmp_path, results, args, clock[0])
    assert started == ["stock-bf16"]
    assert json.loads((tmp_path / "bench_mix.json").read_text())["not_run"][:2] == ["mixed-bf16", "stock-fp8"]


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


def test_bench_misses_name_each_goal(bench):
    stock = {
        "run": "stock-fp8",
        "kind": "stock",
        "tp": 1,
        "dp": 1,
        "greedy_ids": [[1]],
        "decode_tok_s_b1": 100.0,
        "decode_tok_s_b32": 1000.0,
        "ttft_s": 0.010,
        "weight_load_s": 2.0,
    }
    mixed = {
        **stock,
        "run": "mixed-fp8",
        "kind": "mixed",
        "decode_tok_s_b1": 98.0,
        "ttft_s": 0.0101,
        "weight_mem_gib": 1.0,
        "param_bytes": 2**30,
        "plan_rank_bytes": 2**30 * 1.02,
        "plan_total_bytes": 100,
        "bytes_read": 110,
    }
    runs = {"stock-fp8-tp1dp1": stock, "mixed-fp8-tp1dp1": mixed}
    rows = bench.comparisons(runs)
    text = "\n".join(bench.misses(runs, rows))
    assert "decode_b1_mixed_over_stock = 0.980" in text and "ttft_stock_over_mixed = 0.990" not in text
    assert "decode_b32" not in text and "greedy" not in text
    assert "gpu_mem_vs_plan -1.96%" in text and "bytes read 1.100 x plan" in text


# ---- serve proof: SGLang's own entry points on the plan directory ------------------------------------------
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
