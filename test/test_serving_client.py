"""serving.client: the server-log parser the GPU tests and the bench read SGLang's and the mixed
loader's lines with, and the environment a started server gets."""

from __future__ import annotations

import sys

from sglang_mixed_precision.serving import client

SGLANG_LOAD_LINE = (
    "[2026-01-01 10:00:00 TP{r}] Load weight end. elapsed={s:.2f} s, type=Qwen3MoeForCausalLM, quant=fp8, "
    "avail mem=70.12 GB, mem usage={g:.2f} GB."
)


def test_parses_sglang_and_loader_log_lines():
    text = "\n".join(
        [
            SGLANG_LOAD_LINE.format(r=0, s=3.21, g=6.01),
            SGLANG_LOAD_LINE.format(r=1, s=3.5, g=6.02),
            "[TP0] mixed_precision audit: 10 tensors consumed once, 10 parameters loaded; layers: 2 Fp8LinearMethod",
            "[TP0] mixed_precision: weight memory 6450000000 bytes in parameters; plan 6449000000 bytes per rank (+0.02%)",
        ]
    )
    assert client.parse_server_log(text) == {
        "weight_load_s": 3.5,
        "weight_mem_gib": 6.02,
        "param_bytes": 6450000000,
        "logged_plan_bytes": 6449000000,
        "layers": "2 Fp8LinearMethod",
    }
    assert client.parse_server_log("nothing") == {}


def test_a_started_server_gets_the_extra_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_MP_INHERITED", "kept")
    log = tmp_path / "server.log"
    code = "import os; print(os.environ['SGLANG_MP_INHERITED'], os.environ['SGLANG_RETURN_ORIGINAL_LOGPROB'])"
    proc = client.start_server([sys.executable, "-c", code], log, env={"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"})
    assert proc.wait(timeout=60) == 0
    assert log.read_text().split() == ["kept", "1"]
