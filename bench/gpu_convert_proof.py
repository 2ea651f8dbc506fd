#!/usr/bin/env python3
"""GPU proof: fp8/ and int4/ made by the converter load in stock SGLang and answer /generate.

Generates a tiny Qwen3 and a tiny Qwen3-MoE, converts them (rtn by default), then for each of
fp8/ and int4/ of each model starts plain `python -m sglang.launch_server`, waits for /health,
posts one greedy /generate and stops the server. Writes results.json and results.md to --out.

Usage: python bench/gpu_convert_proof.py --out DIR [--method rtn|gptq] [--moe-int4-quantization moe_wna16]
       python bench/gpu_convert_proof.py --out DIR --dry-run   # print the commands, run nothing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The capital of France is"
MODELS = ("qwen3", "qwen3_moe")
FORMATS = ("fp8", "int4")


def server_command(model_dir: Path, port: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_dir),
        "--attention-backend",
        "triton",
        "--sampling-backend",
        "pytorch",
        "--disable-cuda-graph",
        "--mem-fraction-static",
        "0.5",
        "--port",
        str(port),
        *extra,
    ]


def convert_command(model_dir: Path, out: Path, method: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sglang_mixed_precision.cli",
        "convert",
        "--model_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--method",
        method,
        "--formats",
        "fp8,int4",
        "--overwrite",
        "--no_progress",
        "--verify",
    ]


def plan_cases(work: Path, quant_flag_moe_int4: str | None) -> list[dict]:
    cases = []
    for arch in MODELS:
        for fmt in FORMATS:
            extra = []
            if arch == "qwen3_moe" and fmt == "int4" and quant_flag_moe_int4:
                extra = ["--quantization", quant_flag_moe_int4]
            cases.append({"model": arch, "format": fmt, "dir": str(work / arch / "converted" / fmt), "extra": extra})
    return cases


def run_case(case: dict, out: Path, args) -> dict:
    from sglang_mixed_precision.serving import client

    port = client.free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = server_command(Path(case["dir"]), port, case["extra"])
    log_path = out / f"server_{case['model']}_{case['format']}.log"
    res = {**case, "command": " ".join(cmd), "log": log_path.name, "ok": False}
    proc = client.start_server(cmd, log_path)
    try:
        res["startup_s"] = round(client.wait_until_ready(base, proc, args.start_timeout, log_path), 1)
        t1 = time.time()
        reply = client.post_json(
            f"{base}/generate",
            {"text": PROMPT, "sampling_params": {"max_new_tokens": 16, "temperature": 0}},
            timeout=args.request_timeout,
        )
        res["generate_s"] = round(time.time() - t1, 2)
        res["answer"] = reply.get("text", reply)
        res["ok"] = isinstance(res["answer"], str)
    except Exception as e:  # a failed case is recorded; the other cases still run
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        client.stop_server(proc)
    return res


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except Exception as e:
        return f"unknown ({e})"


def markdown(results: list[dict], gpu: str, method: str) -> str:
    lines = [
        f"# Converter GPU proof (stock SGLang) on {gpu}",
        "",
        f"int4 method: {method}",
        "",
        "| model | format | flags | ok | startup s | generate s | answer / error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ans = (r.get("answer") if r["ok"] else r.get("error", "")) or ""
        ans = str(ans).replace("|", "\\|").replace("\n", " ")[:80]
        lines.append(
            f"| {r['model']} | {r['format']} | {' '.join(r['extra'])} | {'yes' if r['ok'] else 'NO'} "
            f"| {r.get('startup_s', '')} | {r.get('generate_s', '')} | {ans} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", help="where models are generated (default: OUT/work)")
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    ap.add_argument(
        "--moe-int4-quantization", default=None, help="e.g. moe_wna16: --quantization for the MoE int4 server"
    )
    ap.add_argument("--start-timeout", type=float, default=540)
    ap.add_argument("--request-timeout", type=float, default=120)
    ap.add_argument("--convert-timeout", type=float, default=300)
    ap.add_argument("--only", help="comma list of model:format to run, e.g. qwen3:fp8")
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = ap.parse_args(argv)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    cases = plan_cases(work, args.moe_int4_quantization)
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if f"{c['model']}:{c['format']}" in keep]
    converts = [convert_command(work / arch / "bf16", work / arch / "converted", args.method) for arch in MODELS]
    if args.dry_run:
        for arch in MODELS:
            print(f"# generate tinymodels.make_tiny_model({arch!r}, {work / arch / 'bf16'})")
        for c in converts:
            print(" ".join(c))
        for c in cases:
            print(" ".join(server_command(Path(c["dir"]), 30000, c["extra"])))
        return 0

    from sglang_mixed_precision.testing.tinymodels import make_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    steps = {}
    for arch, cmd in zip(MODELS, converts):
        t0 = time.time()
        make_tiny_model(arch, work / arch / "bf16")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.convert_timeout)
        (out / f"convert_{arch}.log").write_text(p.stdout + p.stderr)
        steps[arch] = {"convert_s": round(time.time() - t0, 1), "rc": p.returncode}
        if p.returncode:
            print(f"convert {arch} failed (rc {p.returncode}); see convert_{arch}.log", file=sys.stderr)
    results = []
    for c in cases:
        print(f"== {c['model']} {c['format']} {' '.join(c['extra'])}", flush=True)
        results.append(
            run_case(c, out, args) if steps[c["model"]]["rc"] == 0 else {**c, "ok": False, "error": "conversion failed"}
        )
        print(
            json.dumps({k: results[-1].get(k) for k in ("ok", "startup_s", "generate_s", "answer", "error")}),
            flush=True,
        )
    gpu = gpu_name()
    (out / "results.json").write_text(
        json.dumps({"gpu": gpu, "method": args.method, "convert": steps, "cases": results}, indent=2)
    )
    (out / "results.md").write_text(markdown(results, gpu, args.method))
    print(markdown(results, gpu, args.method))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
