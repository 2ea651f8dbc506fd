#!/usr/bin/env python3
"""The cost of mixing vs stock SGLang, side by side on one machine.

Workload: a random-weight Qwen3-MoE with Qwen3-30B-A3B layer shapes (hidden 2048, 32 q / 4 kv
heads, head_dim 128, 128 experts of 768, top-8, vocab 151936) and --layers decoder layers; bf16 /
fp8 / int4 sources made with the project's converter (rtn). Runs (--only takes names or groups):

  bf16:  stock-bf16, mixed-bf16    python -m sglang.launch_server on the uniform checkpoint, and
  fp8:   stock-fp8,  mixed-fp8     launch_mixed_precision_server.py with every module from that one
  int4:  stock-int4, mixed-int4    source (stock int4 with --quantization moe_wna16: its GPTQ-Marlin
                                   MoE keeps fp16 scales; the mixed loader's int4 experts default to
                                   MoE-WNA16 too, so both run the same kernels)
  mixes: mix-attnbf16-expint4, mix-attnfp8-expint4   real mixes
  prepare: only generate and convert the model

Measured per run: server ready time, weight load time and GPU weight memory (SGLang's "Load weight
end" line), TTFT (1-token request), decode tokens/s at batch 1 and 32 (median of --repeats), greedy
tokens of fixed prompts; for mixed runs also the parameter bytes the mixed loader logs, the bytes
it read (/mixed_precision/info) and the plan's bytes. Goals (the markdown lists what misses one):
stock vs mixed with one source: identical greedy tokens, decode tok/s mixed/stock >= 0.99 at
batch 1 and 32, TTFT and load time stock/mixed >= 0.99; every mixed run: GPU weight memory and
parameter bytes within 1% of the plan's per-rank bytes, bytes read <= 1.05 x the plan's bytes.

Time: each server start takes ~60 s on an H100 with a warm JIT cache (the first ~140 s), plus
~20 s of measurement; preparing 4 layers ~2-3 min. A full run (8 servers) is ~12 min, so split it
into commands under 9 minutes (--only prepare, then bf16,fp8, then int4,mixes) with the same
--out and --workdir: results of earlier commands are kept and merged, and runs already measured
there without error are not started again. --budget S skips runs that would not finish within S
seconds of the command's start (reported as not run): repeating a command finishes the rest.

--cpu-check runs everything up to launching SGLang on CPU (tiny shapes unless --shape is given):
generate, convert, write the mix YAMLs, plan them, build every server command (mixed ones through
the launcher, which validates the plan and writes the plan directory) and check it with SGLang's
own argument parser, then print what it would launch.

Usage (GPU machine, repository root, after ``source bench/gpu_setup.sh``; DIR and W outside the
command's own output folder so that later commands find them, then copy DIR back):
    python bench/gpu_bench_mix.py --out DIR --workdir W --only prepare
    python bench/gpu_bench_mix.py --out DIR --workdir W --only bf16,fp8 --budget 480
    python bench/gpu_bench_mix.py --out DIR --workdir W --only int4,mixes --budget 480
    python bench/gpu_bench_mix.py --out DIR --workdir W --only all --tp-size 2 --budget 480   (2 GPUs)
    python bench/gpu_bench_mix.py --out DIR --cpu-check
Results: DIR/bench_mix.json and DIR/bench_mix.md (the card named), written after every run;
server logs in DIR/logs/. The summary is printed last.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

from gpu_common import environment, make_log, parse_server_log  # noqa: E402

SHAPES = {
    "qwen3-30b-a3b": dict(
        hidden=2048,
        vocab=151936,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
    ),
    "tiny": {},  # tinymodels' defaults: hidden 512, 8 experts of 256, top-2
}
PROMPTS = [
    "The history of the river begins",
    "In the morning the market",
    "A compiler translates",
    "Mountains in the north",
]
GREEDY_TOKENS = 32
B1_TOKENS, B32_TOKENS = 128, 64  # decode tokens timed at batch 1 and batch 32
# Same flags for stock and mixed. Radix cache off: repeated prompts would otherwise skip prefill.
SERVER_FLAGS = [
    "--attention-backend",
    "triton",
    "--sampling-backend",
    "pytorch",
    "--mem-fraction-static",
    "0.6",
    "--dtype",
    "bfloat16",
    "--disable-radix-cache",
    "--cuda-graph-max-bs",
    "32",
    "--log-level",
    "info",
]
STOCK_INT4_FLAGS = ["--quantization", "moe_wna16"]
GOAL_RATIO = 0.99
MEMORY_TOLERANCE = 0.01
READ_LIMIT = 1.05
FIRST_START_S, START_S, MEASURE_S = 140, 60, 25  # per-run time estimate (H100)


@dataclass(frozen=True)
class Run:
    kind: str  # stock | mixed
    fmt: str  # the uniform format compared (bf16/fp8/int4), or "mix"
    default: str  # source label for linears ("fp16", "fp8", "int4")
    experts: str | None = None  # source of the routed experts when it differs


RUNS = {
    "stock-bf16": Run("stock", "bf16", "fp16"),
    "mixed-bf16": Run("mixed", "bf16", "fp16"),
    "stock-fp8": Run("stock", "fp8", "fp8"),
    "mixed-fp8": Run("mixed", "fp8", "fp8"),
    "stock-int4": Run("stock", "int4", "int4"),
    "mixed-int4": Run("mixed", "int4", "int4"),
    "mix-attnbf16-expint4": Run("mixed", "mix", "fp16", "int4"),
    "mix-attnfp8-expint4": Run("mixed", "mix", "fp8", "int4"),
}
GROUPS = {
    "bf16": ["stock-bf16", "mixed-bf16"],
    "fp8": ["stock-fp8", "mixed-fp8"],
    "int4": ["stock-int4", "mixed-int4"],
    "mixes": ["mix-attnbf16-expint4", "mix-attnfp8-expint4"],
    "prepare": [],
    "all": list(RUNS),
}


log = make_log("bench")


def selected_runs(only: str) -> list[str]:
    names = []
    for item in (s.strip() for s in only.split(",") if s.strip()):
        if item not in GROUPS and item not in RUNS:
            sys.exit(f"--only: {item!r} is neither a run ({', '.join(RUNS)}) nor a group ({', '.join(GROUPS)})")
        names += [n for n in GROUPS.get(item, [item]) if n not in names]
    return names


def run_key(name: str, tp: int, dp: int) -> str:
    return f"{name}-tp{tp}dp{dp}"


# ---- sources ---------------------------------------------------------------------------------------------
def prepare(work: Path, shape: str, layers: int) -> Path:
    """Generate the 16-bit model and convert it (skipped when there); returns the conversion dir."""
    from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
    from sglang_mixed_precision.testing.tinymodels import make_tiny_model

    src, conv = work / "model", work / "conv"
    if not (src / "config.json").exists():
        log(f"generating a {layers}-layer qwen3_moe with {shape} shapes")
        make_tiny_model("qwen3_moe", src, num_layers=layers, max_shard_size="2GB", **SHAPES[shape])
    if not all((conv / f / "config.json").exists() for f in ("fp16", "fp8", "int4")):
        log("converting with the project's converter (rtn)")
        convert(
            ConvertOptions(
                model_path=str(src), output_dir=str(conv), method="rtn", overwrite=True, check=False, progress=False
            )
        )
    return conv


def mix_config(work: Path, conv: Path, name: str) -> Path:
    import yaml

    run = RUNS[name]
    rules = [{"match": "model.layers.*.mlp.experts.*", "source": run.experts}] if run.experts else []
    doc = {
        "mixed_precision": {
            "sources": {f: str(conv / f) for f in ("fp16", "fp8", "int4")},
            "default": run.default,
            "rules": rules,
        }
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def plan_bytes(config: Path, tp: int) -> dict:
    """What the plan expects: bytes per rank (GPU weight memory) and in total (bytes to read)."""
    from sglang_mixed_precision.core.report import summary
    from sglang_mixed_precision.reference import plan_from_config

    s = summary(plan_from_config(config, tp_size=tp))
    return {
        "plan_rank_bytes": s["per_rank"][0]["bytes"],
        "plan_total_bytes": s["total"]["bytes"],
        "plan_by_precision": {r["precision"]: r["bytes"] for r in s["by_precision"]},
    }


def server_argv(name: str, work: Path, conv: Path, out: Path, port: int, args) -> list[str]:
    """The arguments after the program: stock SGLang's, or the launcher's for a mixed run."""
    run = RUNS[name]
    common = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tp-size",
        str(args.tp_size),
        "--dp-size",
        str(args.dp_size),
        *SERVER_FLAGS,
    ]
    if run.kind == "stock":
        extra = STOCK_INT4_FLAGS if run.fmt == "int4" else []
        return ["--model-path", str(conv / run.default), *common, *extra, *args.sglang_arg]
    plan_dir = out / "plans" / run_key(name, args.tp_size, args.dp_size)
    return [
        "--enable-mixed-precision",
        "--mixed-precision-config",
        str(mix_config(work, conv, name)),
        "--model-path",
        str(conv / "fp16"),
        "--plan-dir",
        str(plan_dir),
        *common,
        *args.sglang_arg,
    ]


def program(name: str) -> list[str]:
    if RUNS[name].kind == "stock":
        return [sys.executable, "-m", "sglang.launch_server"]
    return [sys.executable, str(REPO / "launch_mixed_precision_server.py")]


# ---- measurement -------------------------------------------------------------------------------------------
def prompt_ids(conv: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(conv / "fp16"))
    return [tok(p)["input_ids"] for p in PROMPTS]


def timed_generate(base: str, ids: list[list[int]], max_new: int) -> tuple[float, list[dict]]:
    from sglang_mixed_precision.serving import client

    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    t = time.perf_counter()
    reply = client.post_json(f"{base}/generate", body, timeout=600)
    return time.perf_counter() - t, reply


def measure(base: str, ids: list[list[int]], repeats: int) -> dict:
    one, batch = [ids[0]], [ids[i % len(ids)] for i in range(32)]
    cases = {
        "prefill_b1": (one, 1),
        "total_b1": (one, 1 + B1_TOKENS),
        "prefill_b32": (batch, 1),
        "total_b32": (batch, 1 + B32_TOKENS),
    }
    for request, n in cases.values():  # warm-up: Triton JIT and CUDA-graph shapes of every timed request
        timed_generate(base, request, n)
    t = {k: statistics.median(timed_generate(base, r, n)[0] for _ in range(repeats)) for k, (r, n) in cases.items()}
    _, greedy = timed_generate(base, ids, GREEDY_TOKENS)
    return {
        "ttft_s": round(t["prefill_b1"], 5),
        "decode_tok_s_b1": round(B1_TOKENS / max(t["total_b1"] - t["prefill_b1"], 1e-9), 2),
        "decode_tok_s_b32": round(32 * B32_TOKENS / max(t["total_b32"] - t["prefill_b32"], 1e-9), 2),
        "timings_s": {k: round(v, 5) for k, v in t.items()},
        "greedy_ids": [g["output_ids"] for g in greedy],
    }


def loader_bytes_read(base: str) -> dict:
    """Bytes the mixed loader read (rank 0, every source), from /mixed_precision/info."""
    from sglang_mixed_precision.serving import client

    try:
        load = client.get_json(f"{base}/mixed_precision/info").get("load") or {}
    except Exception as e:  # the timings already measured stay valid
        return {"bytes_read_error": f"{type(e).__name__}: {e}"}
    read = load.get("bytes_read")
    return {"bytes_read": sum(read.values()) if read else None, "bytes_read_by_source": read}


def run_one(name: str, work: Path, conv: Path, ids, out: Path, args) -> dict:
    from sglang_mixed_precision.serving import client

    key = run_key(name, args.tp_size, args.dp_size)
    port = client.free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = program(name) + server_argv(name, work, conv, out, port, args)
    res = {
        "run": name,
        "kind": RUNS[name].kind,
        "format": RUNS[name].fmt,
        "tp": args.tp_size,
        "dp": args.dp_size,
        "command": cmd,
    }
    if RUNS[name].kind == "mixed":
        res.update(plan_bytes(work / f"{name}.yaml", args.tp_size))
    log_path = out / "logs" / f"{key}.log"
    log(f"{key}: starting {' '.join(cmd[1:])}")
    proc = client.start_server(cmd, log_path)
    try:
        res["ready_s"] = round(client.wait_until_ready(base, proc, args.server_timeout, log_path, progress=log), 1)
        res.update(measure(base, ids, args.repeats))
        if RUNS[name].kind == "mixed":
            res.update(loader_bytes_read(base))
    except Exception as e:  # one failed run is reported, the others still run
        res["error"] = f"{type(e).__name__}: {e}"[-2000:]
        log(f"{key}: FAILED {res['error'][:300]}\n{traceback.format_exc()}")
    finally:
        client.stop_server(proc)
    res.update(parse_server_log(log_path.read_text(errors="replace")))
    return res


# ---- goals -----------------------------------------------------------------------------------------------
def memory_checks(r: dict) -> dict:
    """A mixed run's weight memory and bytes read against its plan (None where not measured)."""
    rank, total = r.get("plan_rank_bytes"), r.get("plan_total_bytes")
    gpu = r["weight_mem_gib"] * 2**30 / rank - 1 if rank and r.get("weight_mem_gib") is not None else None
    params = r["param_bytes"] / rank - 1 if rank and r.get("param_bytes") is not None else None
    read = r["bytes_read"] / total if total and r.get("bytes_read") is not None else None
    return {"gpu_mem_vs_plan": gpu, "param_bytes_vs_plan": params, "bytes_read_vs_plan": read}


def comparisons(runs: dict) -> list[dict]:
    """Stock vs mixed of each uniform format and parallel layout measured."""
    rows = []
    for tp, dp in sorted({(r["tp"], r["dp"]) for r in runs.values()}):
        for fmt in ("bf16", "fp8", "int4"):
            s, m = runs.get(run_key(f"stock-{fmt}", tp, dp)), runs.get(run_key(f"mixed-{fmt}", tp, dp))
            if not (s and m) or "error" in s or "error" in m:
                continue
            load = (
                (s["weight_load_s"] / m["weight_load_s"]) if s.get("weight_load_s") and m.get("weight_load_s") else None
            )
            rows.append(
                {
                    "format": fmt,
                    "tp": tp,
                    "dp": dp,
                    "identical_greedy_tokens": s["greedy_ids"] == m["greedy_ids"],
                    "decode_b1_mixed_over_stock": m["decode_tok_s_b1"] / s["decode_tok_s_b1"],
                    "decode_b32_mixed_over_stock": m["decode_tok_s_b32"] / s["decode_tok_s_b32"],
                    "ttft_stock_over_mixed": s["ttft_s"] / m["ttft_s"],
                    "load_time_stock_over_mixed": load,
                }
            )
    return rows


def misses(runs: dict, rows: list[dict]) -> list[str]:
    """Every goal a measured quantity misses, in words."""
    out = []
    for r in rows:
        where = f"{r['format']} tp{r['tp']}dp{r['dp']}"
        if not r["identical_greedy_tokens"]:
            out.append(f"{where}: greedy tokens differ between stock and mixed")
        for k in (
            "decode_b1_mixed_over_stock",
            "decode_b32_mixed_over_stock",
            "ttft_stock_over_mixed",
            "load_time_stock_over_mixed",
        ):
            if r[k] is None:
                out.append(f"{where}: {k} not measured")
            elif r[k] < GOAL_RATIO:
                out.append(f"{where}: {k} = {r[k]:.3f} < {GOAL_RATIO}")
    for key, r in runs.items():
        if "error" in r:
            out.append(f"{key}: failed ({r['error'][:120]})")
        if r["kind"] != "mixed" or "error" in r or r.get("mode") == "cpu-check":
            continue
        c = memory_checks(r)
        for k in ("gpu_mem_vs_plan", "param_bytes_vs_plan"):
            if c[k] is None:
                out.append(f"{key}: {k} not measured")
            elif abs(c[k]) > MEMORY_TOLERANCE:
                out.append(f"{key}: {k} {100 * c[k]:+.2f}% (goal within +-{100 * MEMORY_TOLERANCE:.0f}%)")
        if c["bytes_read_vs_plan"] is None:
            out.append(f"{key}: bytes_read_vs_plan not measured")
        elif c["bytes_read_vs_plan"] > READ_LIMIT:
            out.append(f"{key}: bytes read {c['bytes_read_vs_plan']:.3f} x plan (goal <= {READ_LIMIT})")
    return out


# ---- results -------------------------------------------------------------------------------------------
def fmt(value, spec: str = "", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale if scale != 1.0 else value, spec)


def markdown(doc: dict) -> str:
    env, runs, rows = doc["environment"], doc["runs"], doc["comparisons"]
    lines = [
        f"# Mixed vs stock SGLang — {env['card']}",
        "",
        f"{env['card']} x {env['gpus']}; {env['versions']}. Model: random weights, {doc['shape']} shapes, "
        f"{doc['layers']} layers. Mode: {doc['mode']}.",
        "",
        "| run | ready s | load s | GPU weight GiB | param bytes | plan bytes/rank | GPU mem vs plan | params vs plan "
        "| bytes read / plan | TTFT ms | tok/s b1 | tok/s b32 | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in runs.items():
        c = memory_checks(r) if r["kind"] == "mixed" else {}
        lines.append(
            f"| {key} | {fmt(r.get('ready_s'))} | {fmt(r.get('weight_load_s'))} | {fmt(r.get('weight_mem_gib'))} | "
            f"{fmt(r.get('param_bytes'))} | {fmt(r.get('plan_rank_bytes'))} | {fmt(c.get('gpu_mem_vs_plan'), '+.2%')} | "
            f"{fmt(c.get('param_bytes_vs_plan'), '+.2%')} | {fmt(c.get('bytes_read_vs_plan'), '.3f')} | "
            f"{fmt(r.get('ttft_s'), '.1f', 1e3)} | {fmt(r.get('decode_tok_s_b1'), '.1f')} | "
            f"{fmt(r.get('decode_tok_s_b32'), '.1f')} | {(r.get('error') or '')[:80]} |"
        )
    lines += [
        "",
        f"Stock vs mixed (goal: identical tokens, every ratio >= {GOAL_RATIO}):",
        "",
        "| format | tp | dp | identical greedy tokens | decode b1 mixed/stock | decode b32 mixed/stock "
        "| TTFT stock/mixed | load time stock/mixed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['tp']} | {r['dp']} | {r['identical_greedy_tokens']} | "
            f"{r['decode_b1_mixed_over_stock']:.3f} | {r['decode_b32_mixed_over_stock']:.3f} | "
            f"{r['ttft_stock_over_mixed']:.3f} | {fmt(r['load_time_stock_over_mixed'], '.3f')} |"
        )
    if doc["mode"] == "cpu-check":
        lines += ["", "cpu-check: nothing measured; the SGLang commands a GPU run would start:", ""]
        lines += [f"- {key}: `{' '.join(r['sglang_command'])}`" for key, r in runs.items()]
    else:
        lines += ["", "Goals missed:" if doc["misses"] else "Goals missed: none among the runs measured."]
        lines += [f"- {m}" for m in doc["misses"]]
    if doc["not_run"]:
        lines += ["", f"Not run yet: {', '.join(doc['not_run'])}."]
    return "\n".join(lines) + "\n"


class Results:
    """bench_mix.json / .md in --out, merged with the runs an earlier command left there."""

    def __init__(self, out: Path, env: dict, args, mode: str):
        self.path = out / "bench_mix.json"
        self.doc = {"environment": env, "shape": args.shape, "layers": args.layers, "mode": mode, "runs": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if (old.get("shape"), old.get("layers"), old.get("mode")) == (args.shape, args.layers, mode):
                self.doc["runs"] = old.get("runs", {})

    def add(self, key: str, result: dict) -> None:
        self.doc["runs"][key] = {**result, "card": self.doc["environment"]["card"]}
        self.save()

    def save(self) -> None:
        runs = self.doc["runs"]
        self.doc["comparisons"] = comparisons(runs) if self.doc["mode"] == "gpu" else []
        self.doc["misses"] = misses(runs, self.doc["comparisons"]) if self.doc["mode"] == "gpu" else []
        self.doc["not_run"] = [n for n in RUNS if not any(r["run"] == n for r in runs.values())]
        self.path.write_text(json.dumps(self.doc, indent=2))
        self.path.with_suffix(".md").write_text(markdown(self.doc))


# ---- modes -----------------------------------------------------------------------------------------------
def estimate_s(n: int) -> int:
    return 0 if n == 0 else FIRST_START_S + (n - 1) * START_S + n * MEASURE_S


def run_gpu(names: list[str], work: Path, conv: Path, out: Path, results: Results, args, started: float) -> None:
    ids = prompt_ids(conv)
    servers = 0
    for name in names:
        key = run_key(name, args.tp_size, args.dp_size)
        if "error" not in results.doc["runs"].get(key, {"error": None}):
            log(f"{key}: already measured in {results.path} (a new --out measures again)")
            continue
        needed = (START_S if servers else FIRST_START_S) + MEASURE_S
        if args.budget and time.time() - started + needed > args.budget:
            log(f"{key}: skipped, ~{needed}s would pass the --budget of {args.budget:.0f}s")
            continue
        servers += 1
        r = run_one(name, work, conv, ids, out, args)
        results.add(key, r)
        log(
            f"{key}: {'FAILED' if 'error' in r else 'done'}; ttft {fmt(r.get('ttft_s'), '.1f', 1e3)} ms, "
            f"b1 {fmt(r.get('decode_tok_s_b1'), '.1f')} tok/s, b32 {fmt(r.get('decode_tok_s_b32'), '.1f')} tok/s"
        )


def run_cpu_check(names: list[str], work: Path, conv: Path, out: Path, results: Results, args) -> None:
    """Every command the GPU run would start, resolved and checked, and the plans of the mixed runs."""
    from sglang_mixed_precision.serving import client, launcher

    for name in names:
        key = run_key(name, args.tp_size, args.dp_size)
        argv = server_argv(name, work, conv, out, 30000, args)
        # The launcher validates the plan and writes the plan directory, as it does before starting SGLang.
        cmd = launcher.sglang_command(argv, out=io.StringIO())
        res = {
            "run": name,
            "kind": RUNS[name].kind,
            "format": RUNS[name].fmt,
            "tp": args.tp_size,
            "dp": args.dp_size,
            "mode": "cpu-check",
            "command": program(name) + argv,
            "sglang_command": cmd,
        }
        if RUNS[name].kind == "mixed":
            res.update(plan_bytes(work / f"{name}.yaml", args.tp_size))
        problem = client.sglang_argv_problem(cmd[3:])
        if problem:
            res["error"] = f"SGLang rejects the command: {problem}"
        results.add(key, res)
        log(f"{key}: would launch {' '.join(cmd)}" + (f"\n  ERROR {res['error']}" if problem else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results directory (kept runs are merged)")
    ap.add_argument("--workdir", default=None, help="model and conversions (default: OUT/work)")
    ap.add_argument(
        "--shape", choices=SHAPES, default=None, help="model shapes (default: qwen3-30b-a3b; tiny with --cpu-check)"
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--only", default="all", help=f"comma list of runs or groups ({', '.join(GROUPS)})")
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--dp-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median)")
    ap.add_argument(
        "--budget", type=float, default=0, help="seconds this command may take; runs that would not fit are skipped"
    )
    ap.add_argument("--server-timeout", type=float, default=400, help="seconds to wait for a server to be ready")
    ap.add_argument("--cpu-check", action="store_true", help="everything up to launching SGLang, on CPU")
    ap.add_argument("--sglang-arg", action="append", default=[], help="extra SGLang flag for every server (repeat)")
    args = ap.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.cpu_check else "qwen3-30b-a3b")
    started = time.time()
    names = selected_runs(args.only)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir).resolve() if args.workdir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    mode = "cpu-check" if args.cpu_check else "gpu"
    results = Results(out, environment(args.cpu_check), args, mode)
    log(
        f"{len(names)} run(s) at tp {args.tp_size} dp {args.dp_size}: {', '.join(names) or 'none (prepare only)'}; "
        f"estimated {estimate_s(len(names))}s of servers on an H100 (+ preparing the model once)"
    )
    try:
        conv = prepare(work, args.shape, args.layers)
        if args.cpu_check:
            run_cpu_check(names, work, conv, out, results, args)
        else:
            run_gpu(names, work, conv, out, results, args, started)
    finally:
        results.save()
    doc = results.doc
    print("\n" + markdown(doc))
    failed = [k for k, r in doc["runs"].items() if "error" in r]
    print(
        f"SUMMARY: {len(doc['runs'])} run(s) recorded ({mode}, {doc['environment']['card']}), {len(failed)} failed, "
        f"{len(doc['misses'])} goal(s) missed, not run: {', '.join(doc['not_run']) or 'none'}; "
        f"{time.time() - started:.0f}s -> {results.path.with_suffix('.md')}",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
