"""bench/gpu_convert_bench.py --cpu-check: every phase (generate, fp8, rtn, gptq, compare) on the CPU
with a tiny model, through the same code the GPU run takes."""

from __future__ import annotations

import json

from test_gpu_bench_scripts import load


def test_cpu_check_runs_every_phase(tmp_path):
    bench = load("gpu_convert_bench")
    out = tmp_path / "out"
    rc = bench.main(["--cpu-check", "--workdir", str(tmp_path / "work"), "--out", str(out), "--budget", "2400"])
    r = json.loads((out / "gpu_convert_bench.json").read_text())
    assert rc == 0, {m: r.get(m) for m in ("fp8", "rtn", "gptq")}
    for m in ("fp8", "rtn", "gptq"):
        x = r[m]
        assert x["device"] == "cpu" and x["gbps_layers"] > 0 and len(x["layer_s"]) == 2
        assert x["peak_host_gib"] > 0 and x["bounds"]["host_above_baseline_gib"] > 0
        assert x["extrapolated_min"]["Qwen3-235B-A22B"] > x["extrapolated_min"]["Qwen3-30B-A3B"] > 0
    assert r["gptq"]["int4_method"]["calibration_sequences"] == 2
    # on the CPU both sides run the same kernels: batched and one at a time agree to the bit
    assert [e["values_differing"] for e in r["compare"]["experts"]] == [0.0, 0.0]
    md = (out / "gpu_convert_bench.md").read_text()
    assert md.startswith("# Conversion on CPU check") and "| gptq |" in md
