"""bench/config_scale.py on small files: the generated mappings parse, the results name every measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_config_scale_writes_its_results(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "config_scale.py"), "--workdir", str(tmp_path / "w")]
        + ["--mb", "1", "--repeats", "1", "--machine", "t", "--out", str(out)]
        + ["--compare-pythonpath", str(REPO / "python")],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(REPO / "python"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "config_scale_t.json").read_text())
    big = result["files"]["qwen3_235b_explicit"]
    assert big["lines"] > 36_000 and big["now"]["modules"] > 18_000
    assert big["now"]["cpu_s"]["median"] > 0 and big["now"]["peak_rss_mib"] > 10 and "before" in big
    synthetic = result["files"]["synthetic"]
    assert synthetic["bytes"] >= 2**20 and synthetic["now"]["modules"] * 4 == synthetic["lines"]
    text = (tmp_path / "w" / "qwen3_235b_explicit.yaml").read_text()
    mapping = yaml.safe_load(text)["mixed_precision"]["weight_mapping"]
    assert mapping["model.layers.93.mlp.experts.127.down_proj.weight"] == "int4"
    assert mapping["model.layers.0.self_attn.q_proj.weight"] == "fp8" and mapping["model.norm.weight"] == "fp16"
    md = (out / "config_scale_t.md").read_text()
    assert "| qwen3_235b_explicit (" in md and "less CPU" in md
