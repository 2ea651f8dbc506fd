"""The GPU proof script's non-GPU parts: the commands it would run and its report."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from fake_sglang_server import load_script


def load():
    return load_script("gpu_convert_proof")


def test_dry_run_prints_stock_sglang_commands(tmp_path, capsys):
    mod = load()
    assert mod.main(["--out", str(tmp_path), "--dry-run", "--moe-int4-quantization", "moe_wna16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    servers = [line for line in lines if "sglang.launch_server" in line]
    assert len(servers) == 4
    assert all("--attention-backend triton" in line and "--disable-cuda-graph" in line for line in servers)
    assert sum("--quantization moe_wna16" in line for line in servers) == 1  # only the MoE int4 case
    assert any(
        line.endswith(
            "qwen3_moe/converted/int4 --attention-backend triton --sampling-backend pytorch "
            "--disable-cuda-graph --mem-fraction-static 0.5 --port 30000 --quantization moe_wna16"
        )
        for line in servers
    )
    assert sum("sglang_mixed_precision.cli convert" in line for line in lines) == 2
    assert not (tmp_path / "results.json").exists()


def test_markdown_names_gpu_and_failures():
    mod = load()
    results = [
        {
            "model": "qwen3",
            "format": "fp8",
            "extra": [],
            "ok": True,
            "startup_s": 30.0,
            "generate_s": 0.2,
            "answer": " Paris",
        },
        {
            "model": "qwen3_moe",
            "format": "int4",
            "extra": ["--quantization", "moe_wna16"],
            "ok": False,
            "error": "server not healthy",
        },
    ]
    md = mod.markdown(results, "NVIDIA H100 80GB HBM3", "rtn")
    assert "NVIDIA H100 80GB HBM3" in md and "| qwen3 | fp8 |  | yes | 30.0 | 0.2 |  Paris |" in md
    assert "| NO |" in md and "server not healthy" in md


def test_a_case_starts_the_server_and_asks_generate(tmp_path, monkeypatch):
    mod = load()
    fake = Path(__file__).with_name("fake_sglang_server.py")
    monkeypatch.setattr(
        mod,
        "server_command",
        lambda model_dir, port, extra: [
            sys.executable,
            str(fake),
            "--model-path",
            str(model_dir),
            "--port",
            str(port),
            *extra,
        ],
    )
    case = mod.plan_cases(tmp_path, None)[0]
    res = mod.run_case(case, tmp_path, SimpleNamespace(start_timeout=60, request_timeout=30))
    assert res["ok"] and res["answer"] == "" and res["startup_s"] >= 0 and "error" not in res
    assert "Load weight end" in (tmp_path / res["log"]).read_text()


def test_a_server_that_exits_is_recorded_as_failed(tmp_path, monkeypatch):
    mod = load()
    monkeypatch.setattr(
        mod, "server_command", lambda *a: [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    )
    res = mod.run_case(
        mod.plan_cases(tmp_path, None)[0], tmp_path, SimpleNamespace(start_timeout=60, request_timeout=30)
    )
    assert not res["ok"] and "exited with code 3" in res["error"] and "boom" in res["error"]
