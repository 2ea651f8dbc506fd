"""The GPU proof script's non-GPU parts: the commands it would run and its report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_convert_proof.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_convert_proof", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_prints_stock_sglang_commands(tmp_path, capsys):
    mod = load()
    assert mod.main(["--out", str(tmp_path), "--dry-run", "--moe-int4-quantization", "moe_wna16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    servers = [l for l in lines if "sglang.launch_server" in l]
    assert len(servers) == 4
    assert all("--attention-backend triton" in l and "--disable-cuda-graph" in l for l in servers)
    assert sum("--quantization moe_wna16" in l for l in servers) == 1  # only the MoE int4 case
    assert any(l.endswith("qwen3_moe/converted/int4 --attention-backend triton --sampling-backend pytorch "
                          "--disable-cuda-graph --mem-fraction-static 0.5 --port 30000 --quantization moe_wna16") for l in servers)
    assert sum("sglang_mixed_precision.cli convert" in l for l in lines) == 2
    assert not (tmp_path / "results.json").exists()


def test_markdown_names_gpu_and_failures():
    mod = load()
    results = [{"model": "qwen3", "format": "fp8", "extra": [], "ok": True, "startup_s": 30.0, "generate_s": 0.2, "answer": " Paris"},
               {"model": "qwen3_moe", "format": "int4", "extra": ["--quantization", "moe_wna16"], "ok": False, "error": "server not healthy"}]
    md = mod.markdown(results, "NVIDIA H100 80GB HBM3", "rtn")
    assert "NVIDIA H100 80GB HBM3" in md and "| qwen3 | fp8 |  | yes | 30.0 | 0.2 |  Paris |" in md
    assert "| NO |" in md and "server not healthy" in md
