"""The GPU benchmark's bookkeeping on CPU: kernel tables from a trace, ratios and their spreads."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_bench_mix.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench_mix", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _trace(path: Path, kernels: list[tuple[str, int, float]], steps: int) -> Path:
    """A Kineto-style trace: ``steps`` graph replays, each launching ``kernels`` (name, grid x, us)."""
    events = []
    for s in range(steps):
        corr = 1000 + s
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "args": {"correlation": corr}})
        for name, grid, us in kernels:
            events.append({"ph": "X", "cat": "kernel", "name": name, "dur": us,
                           "args": {"correlation": corr, "grid": [grid, 1, 1], "block": [128, 1, 1]}})  # fmt: skip
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_kernel_table_counts_per_graph_replay(bench, tmp_path):
    t = bench.kernel_table(_trace(tmp_path / "a.trace.json.gz", [("gemm", 8, 10.0), ("moe", 4, 30.0)], steps=4))
    assert t["steps"] == 4 and t["graph_replays"] == 4
    assert t["gpu_us_per_step"] == pytest.approx(40.0) and t["kernels_per_step"] == pytest.approx(2.0)
    assert t["kernels"]["moe|grid=[4, 1, 1]|block=[128, 1, 1]"] == [1.0, 30.0]


def test_profile_diff_names_what_differs(bench, tmp_path):
    stock = bench.kernel_table(_trace(tmp_path / "s.trace.json.gz", [("gemm", 8, 10.0), ("moe", 4, 30.0)], 2))
    same = bench.kernel_table(_trace(tmp_path / "m.trace.json.gz", [("gemm", 8, 10.5), ("moe", 4, 30.0)], 2))
    other = bench.kernel_table(_trace(tmp_path / "o.trace.json.gz", [("gemm", 16, 10.0), ("moe", 4, 30.0)], 2))
    d = bench.profile_diff(same, stock)
    assert d["same_kernels"] and d["gpu_time_ratio"] == pytest.approx(40.5 / 40.0)
    d = bench.profile_diff(other, stock)
    assert not d["same_kernels"] and d["only_mixed"] == ["gemm|grid=[16, 1, 1]|block=[128, 1, 1]"]


def test_ratio_is_a_difference_only_when_spreads_do_not_overlap(bench):
    def results(a, b):
        rounds = lambda xs: [{"decode_tok_s_b1": x} for x in xs]  # noqa: E731
        return {"starts": [{"start": 1, "servers": {"A": {"rounds": rounds(a)}, "B": {"rounds": rounds(b)}}}]}

    c = bench.compare(results([99, 100, 101], [100, 102, 104]), "A", "B", "decode_tok_s_b1")
    assert c["ratio"] == pytest.approx(100 / 102) and not c["difference"]
    c = bench.compare(results([90, 91, 92], [100, 102, 104]), "A", "B", "decode_tok_s_b1")
    assert c["difference"] and c["a"] == [90, 91, 92, 3]
    assert bench.compare(results([1], []), "A", "B", "decode_tok_s_b1") is None
