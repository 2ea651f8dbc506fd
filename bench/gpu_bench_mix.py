#!/usr/bin/env python3
"""The cost of mixing vs stock SGLang, side by side in one run on one GPU.

Workload: a random-weight model with Qwen3-30B-A3B layer shapes (hidden 2048, 32 q / 4 kv heads,
head_dim 128, 128 experts of 768, top-8, vocab 151936) and --layers decoder layers; bf16 / fp8 /
int4 sources made with the project's converter (rtn). For every run: load time and GPU weight
memory (SGLang's own "Load weight end" line), TTFT, decode tokens/s at batch 1 and batch 32,
greedy tokens of fixed prompts; for mixed runs also the loader's bytes read per source and the
plan's bytes.

Runs (select with --only, comma-separated):
  stock-bf16, stock-fp8, stock-int4         python -m sglang.launch_server on the uniform checkpoint
  mixed-bf16, mixed-fp8, mixed-int4         launch_mixed_precision_server.py, all modules from one source
  mix-attnbf16-expint4, mix-attnfp8-expint4 launch_mixed_precision_server.py, mixed precisions

Usage: python bench/gpu_bench_mix.py --out DIR [--workdir W] [--layers 4] [--only ...]
Results: DIR/bench_mix.json and DIR/bench_mix.md (card named); the summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(
    hidden=2048,
    vocab=151936,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
)
PROMPTS = [
    "The history of the river begins",
    "In the morning the market",
    "A compiler translates",
    "Mountains in the north",
]
RUNS = {
    "stock-bf16": ("stock", "fp16"),
    "mixed-bf16": ("mixed", {"default": "fp16"}),
    "stock-fp8": ("stock", "fp8"),
    "mixed-fp8": ("mixed", {"default": "fp8"}),
    "stock-int4": ("stock", "int4"),
    "mixed-int4": ("mixed", {"default": "int4"}),
    "mix-attnbf16-expint4": ("mixed", {"default": "fp16", "experts": "int4"}),
    "mix-attnfp8-expint4": ("mixed", {"default": "fp8", "experts": "int4"}),
}
SERVER_FLAGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--mem-fraction-static", "0.6"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(work: Path, layers: int) -> None:
    """Generate the 16-bit model and convert it; skipped when already there."""
    from sglang_mixed_precision.tinymodels import make_tiny_model

    src = work / "model"
    if not (src / "config.json").exists():
        log(f"generating a {layers}-layer model with Qwen3-30B-A3B shapes")
        s = SHAPES
        make_tiny_model(
            "qwen3_moe", src, num_layers=layers, hidden=s["hidden"], vocab=s["vocab"],
            num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
            intermediate_size=s["intermediate_size"], moe_intermediate_size=s["moe_intermediate_size"],
            num_experts=s["num_experts"], num_experts_per_tok=s["num_experts_per_tok"], max_shard_size="2GB",
        )
    if not (work / "conv" / "int4" / "config.json").exists():
        log("converting with the project's converter (rtn)")
        subprocess.run([sys.executable, "-m", "sglang_mixed_precision.cli", "convert", "--model_path", str(src),
                        "--output_dir", str(work / "conv"), "--method", "rtn", "--overwrite"], check=True)


def mix_config(work: Path, name: str, spec: dict) -> Path:
    conv = work / "conv"
    rules = []
    if "experts" in spec:
        rules.append({"match": "model.layers.*.mlp.experts.*", "source": spec["experts"]})
    cfg = {"mixed_precision": {"sources": {"fp16": str(conv / "fp16"), "fp8": str(conv / "fp8"), "int4": str(conv / "int4")},
                               "default": spec["default"], "rules": rules}}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    return path


def http(port: int, path: str, body: dict | None = None, timeout: float = 300) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else {"raw": raw.decode()}


def wait_healthy(proc: subprocess.Popen, port: int, logf: Path, limit: float) -> float:
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited rc={proc.returncode}; log tail:\n{logf.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return time.time() - t0
        except Exception:
            time.sleep(1)
    raise TimeoutError(f"server not healthy after {limit} s; log tail:\n{logf.read_text()[-3000:]}")


def generate(port: int, text, max_new: int) -> tuple[float, list]:
    body = {"text": text, "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    t = time.time()
    r = http(port, "/generate", body)
    return time.time() - t, r if isinstance(r, list) else [r]


def measure(port: int) -> dict:
    generate(port, PROMPTS, 8)  # warm-up: Triton JIT and allocator
    generate(port, [PROMPTS[0]] * 32, 8)
    ttft = statistics.median(generate(port, PROMPTS[0], 1)[0] for _ in range(5))
    t1, _ = generate(port, PROMPTS[0], 129)
    t32, _ = generate(port, [PROMPTS[i % len(PROMPTS)] for i in range(32)], 65)
    _, greedy = generate(port, PROMPTS, 32)
    return {
        "ttft_s": ttft,
        "decode_tok_s_b1": 128 / max(t1 - ttft, 1e-9),
        "decode_tok_s_b32": 32 * 64 / max(t32 - ttft, 1e-9),
        "greedy_ids": [g.get("output_ids") for g in greedy],
        "greedy_text": [g.get("text") for g in greedy],
    }


def parse_log(text: str) -> dict:
    out = {}
    m = re.search(r"Load weight end\. elapsed=([\d.]+) s.*?mem usage=([\d.]+) GB", text)
    if m:
        out["weight_load_s"], out["weight_mem_gb"] = float(m.group(1)), float(m.group(2))
    out["loader_lines"] = [ln.strip() for ln in text.splitlines() if "bytes read" in ln or "mixed-precision plan" in ln.lower()][-12:]
    return out


def plan_bytes(cfg: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "sglang_mixed_precision.cli", "plan", "--config", str(cfg), "--json"],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def run_one(name: str, work: Path, out: Path, port: int, limit: float) -> dict:
    kind, spec = RUNS[name]
    conv = work / "conv"
    if kind == "stock":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(conv / spec)]
        cfg = None
    else:
        cfg = mix_config(work, name, spec)
        cmd = [sys.executable, str(ROOT / "launch_mixed_precision_server.py"), "--enable-mixed-precision",
               "--mixed-precision-config", str(cfg), "--model-path", str(conv / "fp16")]
    cmd += SERVER_FLAGS + ["--port", str(port)]
    logf = out / f"server_{name}.log"
    log(f"{name}: starting")
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = wait_healthy(proc, port, logf, limit)
        res = {"run": name, "ready_s": ready, **measure(port)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    res.update(parse_log(logf.read_text()))
    if cfg is not None:
        p = plan_bytes(cfg)
        res["plan_total_bytes"] = p.get("totals", {}).get("bytes")
        res["plan"] = {k: p[k] for k in ("by_precision", "bytes_by_source") if k in p}
    log(f"{name}: ready {ready:.1f}s, ttft {res['ttft_s'] * 1e3:.1f} ms, b1 {res['decode_tok_s_b1']:.1f} tok/s")
    return res


def ratios(results: dict) -> list[dict]:
    rows = []
    for fmt in ("bf16", "fp8", "int4"):
        s, m = results.get(f"stock-{fmt}"), results.get(f"mixed-{fmt}")
        if not (s and m) or "error" in s or "error" in m:
            continue
        rows.append({
            "format": fmt,
            "identical_greedy_tokens": s["greedy_ids"] == m["greedy_ids"],
            "decode_b1_ratio": m["decode_tok_s_b1"] / s["decode_tok_s_b1"],
            "decode_b32_ratio": m["decode_tok_s_b32"] / s["decode_tok_s_b32"],
            "ttft_ratio_stock_over_mixed": s["ttft_s"] / m["ttft_s"],
            "weight_load_time_ratio_mixed_over_stock": (m.get("weight_load_s") or 0) / max(s.get("weight_load_s") or 1e-9, 1e-9),
            "weight_mem_gb": [s.get("weight_mem_gb"), m.get("weight_mem_gb")],
        })
    return rows


def markdown(card: str, layers: int, results: dict, rows: list[dict]) -> str:
    lines = [f"# Mixed vs stock SGLang — {card}", "",
             f"Model: random weights, Qwen3-30B-A3B layer shapes, {layers} layers. One run, one card.", "",
             "| run | ready s | weight load s | weight GB | plan GB | TTFT ms | tok/s b1 | tok/s b32 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} |||||||")
            continue
        plan_gb = f"{r['plan_total_bytes'] / 1e9:.3f}" if r.get("plan_total_bytes") else ""
        lines.append(f"| {name} | {r['ready_s']:.1f} | {r.get('weight_load_s', '')} | {r.get('weight_mem_gb', '')} | {plan_gb} | "
                     f"{r['ttft_s'] * 1e3:.1f} | {r['decode_tok_s_b1']:.1f} | {r['decode_tok_s_b32']:.1f} |")
    lines += ["", "| format | identical greedy tokens | decode b1 mixed/stock | decode b32 mixed/stock | TTFT stock/mixed | load time mixed/stock |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['identical_greedy_tokens']} | {r['decode_b1_ratio']:.3f} | {r['decode_b32_ratio']:.3f} | "
                     f"{r['ttft_ratio_stock_over_mixed']:.3f} | {r['weight_load_time_ratio_mixed_over_stock']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/mp-bench")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--only", default=",".join(RUNS))
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--server-timeout", type=float, default=240)
    args = ap.parse_args()
    import torch

    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    prepare(work, args.layers)
    results_path = out / "bench_mix.json"
    results = {}
    for name in args.only.split(","):
        try:
            results[name] = run_one(name, work, out, args.port, args.server_timeout)
        except Exception as e:  # one failed run is reported, the others still run
            results[name] = {"run": name, "error": f"{type(e).__name__}: {e}"[-2000:]}
            log(f"{name}: FAILED {results[name]['error'][:300]}")
    rows = ratios(results)
    results_path.write_text(json.dumps({"card": card, "layers": args.layers, "shapes": SHAPES, "runs": results, "ratios": rows}, indent=2))
    md = markdown(card, args.layers, results, rows)
    (out / "bench_mix.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
