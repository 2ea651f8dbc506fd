"""The GPU benchmark off the GPU: gpu_bench_mix.py's --cpu-check (every run's command through the
launcher and SGLang's own argument parser, the mixed runs planned), its time budget and goal
bookkeeping, and gpu_common's stop on a machine without a GPU. The GPU proofs are pytest tests
(test/gpu)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """A script of bench/ as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("gpu_bench_mix")


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
