#!/usr/bin/env python3
"""Mixed vs stock SGLang on a Qwen3-30B-A3B-wide MoE: kernels per decode step, decode throughput, TTFT,
load time, weight memory and bytes read; and int4 experts against bf16 and fp8.

Model: a random Qwen3-MoE with Qwen3-30B-A3B's widths (hidden 2048, 32 q / 4 kv heads, head_dim 128,
128 experts of 768, top-8, vocab 151936) and --layers decoder layers, its tensors drawn on the GPU;
fp8 (block 128) and GPTQ int4 (RTN) sources made by the project's converter. Servers (--servers):

  stock-bf16   python -m sglang.launch_server on the 16-bit checkpoint
  mixed-bf16   the launcher, every module from the 16-bit source
  stock-fp8    python -m sglang.launch_server on the fp8 checkpoint
  mixed-fp8    the launcher, every linear from the fp8 source
  int4-auto    attention bf16 + experts int4, --int4-moe-kernel auto (the kernel the server picks)
  int4-wna16   attention bf16 + experts int4 on SGLang's Triton W4A16 MoE method
  experts-fp8  attention bf16 + experts fp8
  int4-dense   attention int4 (GPTQ-Marlin linears) + experts int4

All servers share the flags in SERVER_FLAGS (CUDA graphs on, SGLang's default) and run side by side on
the GPU; each is measured while the others sit idle (nothing else is sent to them). Per --phase:

  prepare  generate and convert the model (kept in --workdir; skipped when there), time the conversion
  serve    start the servers --stagger seconds apart (--starts starts in this command), then:
           greedy tokens (8 prompts x 64), a profile of decode steps (torch.profiler through SGLang's
           /start_profile, CUDA graphs on) of every server not yet profiled, and --rounds interleaved
           rounds (A B C ... A B C ...) of: decode tok/s at batch 1, 8, 64 (SGLang's own decode lines,
           --decode-log-interval 10, while an N- and a 2N-token request run; the wall-clock rate
           B*N / (t(2N) - t(N)) as a cross-check, refused below 5 ms); TTFT of a 2,048-token prompt.
           Skipped when --deadline-s leaves too little time (after a slow prepare, say).
  report   JSON + markdown from everything measured so far (also written after every step)

Results accumulate in --out/bench_mix.json across commands (copy the last one into --out first; each
server start is a sample); ratios are medians of the valid rounds, with the spread (min..max) and n of
each side; a ratio is called a difference only when the spreads do not overlap. --out receives only
bench_mix.json, bench_mix.md, kernel_tables.json and server_logs.tgz (logs and traces stay in --workdir).
--deadline-s (from the script's start) stops the servers and writes everything before a command limit.

--from-logs DIR rebuilds a saved run (bench_mix.json + server_logs.tgz) into --out: load time, weight
memory and decode tok/s from the server logs; starts nothing.

--cpu-check runs everything up to launching SGLang on CPU with a tiny model: generation, conversion,
mix YAMLs, plans (the launcher's validation), every server command checked by SGLang's own parser, and
the time the serve phase needs against --deadline-s.

Usage (GPU machine, repository root; one command of at most 10 minutes, see bench/README.md):
    source bench/gpu_setup.sh && python bench/gpu_bench_mix.py --workdir /root/bm --out $OUT/bench \
        --phase serve,report --servers stock-bf16,mixed-bf16,stock-fp8,mixed-fp8 --starts 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

from gpu_common import environment, make_log  # noqa: E402
from sglang_mixed_precision.serving.client import decode_runs, parse_server_log, weight_load_window  # noqa: E402

log = make_log("bench")

QWEN3_30B_A3B = dict(
    hidden=2048,
    vocab=151936,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
)
TINY = dict(hidden=512, vocab=2048, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2)


@dataclass(frozen=True)
class Server:
    kind: str  # stock | mixed
    source: str  # stock: the checkpoint served; mixed: the default source of linears
    experts: str | None = None  # mixed: the source of the routed experts when it differs
    kernel: str | None = None  # --int4-moe-kernel
    compare_to: str | None = None  # the server whose tokens / kernels / speed this one is held against


SERVERS = {
    "stock-bf16": Server("stock", "fp16"),
    "mixed-bf16": Server("mixed", "fp16", compare_to="stock-bf16"),
    "stock-fp8": Server("stock", "fp8"),
    "mixed-fp8": Server("mixed", "fp8", compare_to="stock-fp8"),
    "int4-auto": Server("mixed", "fp16", "int4", "auto", compare_to="mixed-bf16"),
    "int4-wna16": Server("mixed", "fp16", "int4", "wna16", compare_to="mixed-bf16"),
    "experts-fp8": Server("mixed", "fp16", "fp8", compare_to="mixed-bf16"),
    "int4-dense": Server("mixed", "int4", "int4", "auto", compare_to="int4-auto"),
}
BATCHES = (1, 8, 64)
DECODE_TOKENS = 128  # N: the server's decode lines of an N- and a 2N-token request; wall rate B*N / (t(2N) - t(N))
DECODE_LOG_INTERVAL = 10
MIN_DECODE_WINDOW_S = 0.005  # a wall-clock difference below this is timer noise, not N decode steps
CLIENT_LOG_DISAGREEMENT = 0.25  # a client-side rate this far from the server's own lines is not a measurement
SHORT_PROMPT = 16
LONG_PROMPT = 2048
GREEDY = (8, 64)  # prompts x tokens
PROFILE_STEPS = 8
PROFILE_BATCH = 8
SERVER_FLAGS = [
    "--attention-backend",
    "triton",
    "--sampling-backend",
    "pytorch",
    "--skip-tokenizer-init",  # requests carry token ids: no tokenizer work on either side
    "--disable-radix-cache",  # repeated prompts must prefill every time
    "--cuda-graph-max-bs-decode",  # every supported SGLang (the --cuda-graph-max-bs alias is gone since 0.5.20)
    str(max(BATCHES)),
    "--max-running-requests",
    str(max(BATCHES)),
    "--chunked-prefill-size",
    "4096",
    "--log-level",
    "info",
    "--decode-log-interval",  # SGLang's own decode tok/s line every 10 steps: the decode measurement
    str(DECODE_LOG_INTERVAL),
]
GOAL_RATIO = 0.99


# ---- the model ------------------------------------------------------------------------------------------
def write_random_checkpoint(hf_config: dict, out: Path, device: str, shard_bytes: int = 2 << 30) -> float:
    """Every tensor of a 16-bit checkpoint of ``hf_config`` drawn on ``device`` (linears N(0, 1/K), norms
    1), written as safetensors shards with an index; returns the seconds it took."""
    import torch
    from safetensors.torch import save_file

    from sglang_mixed_precision.testing.shapegen import tensor_specs

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    shards, shard, size = [], {}, 0
    for name, _, shape in tensor_specs(hf_config):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            t = (torch.randn(shape, generator=gen, device=device) / shape[-1] ** 0.5).to(torch.bfloat16)
        shard[name] = t.cpu()
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    weight_map = {}
    for i, tensors in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return time.time() - start


def prepare(work: Path, layers: int, tiny: bool, device: str, convert_device: str | None) -> dict:
    """The 16-bit model and its fp8 / int4 conversions in ``work`` (made once); returns timings."""
    from sglang_mixed_precision.testing.tinymodels import tiny_config, write_tokenizer

    src, conv = work / "model", work / "conv"
    info = {}
    if not (src / "model.safetensors.index.json").exists():
        shape = TINY if tiny else QWEN3_30B_A3B
        cfg = tiny_config("qwen3_moe", num_layers=layers, **shape).to_dict()
        cfg.pop("_name_or_path", None)
        cfg["architectures"] = ["Qwen3MoeForCausalLM"]  # what save_pretrained would write
        log(f"generating a {layers}-layer qwen3_moe ({'tiny' if tiny else 'Qwen3-30B-A3B widths'}) on {device}")
        info["generate_s"] = round(write_random_checkpoint(cfg, src, device), 1)
        (src / "config.json").write_text(json.dumps(cfg, indent=2))
        write_tokenizer(src, cfg["vocab_size"])
        (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    if not all((conv / f / "config.json").exists() for f in ("fp16", "fp8", "int4")):
        cmd = [sys.executable, "-m", "sglang_mixed_precision.cli", "convert", "--model_path", str(src),
               "--output_dir", str(conv), "--method", "rtn", "--no_check", "--no_progress"]  # fmt: skip
        if convert_device:
            cmd += ["--device", convert_device]
        log("converting: " + " ".join(cmd[3:]))
        t = time.time()
        subprocess.run(cmd, check=True)
        info["convert_s"] = round(time.time() - t, 1)
        info["convert_command"] = cmd[3:]
    info["bytes"] = {
        f: sum(p.stat().st_size for p in (conv / f).glob("*.safetensors")) for f in ("fp16", "fp8", "int4")
    }
    return info


def mix_yaml(work: Path, name: str) -> Path:
    import yaml

    s = SERVERS[name]
    conv = work / "conv"
    rules = [{"match": "model.layers.*.mlp.experts.*", "source": s.experts}] if s.experts else []
    doc = {"mixed_precision": {"sources": {f: str(conv / f) for f in ("fp16", "fp8", "int4")}, "default": s.source}}
    if rules:
        doc["mixed_precision"]["rules"] = rules
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def server_command(name: str, work: Path, port: int, mem_fraction: float, max_tokens: int) -> list[str]:
    s = SERVERS[name]
    common = ["--host", "127.0.0.1", "--port", str(port), "--nccl-port", str(port + 1000),
              "--mem-fraction-static", str(mem_fraction), "--max-total-tokens", str(max_tokens), *SERVER_FLAGS]  # fmt: skip
    if s.kind == "stock":
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(work / "conv" / s.source), *common]
    cmd = [sys.executable, str(REPO / "launch_mixed_precision_server.py"), "--enable-mixed-precision",
           "--mixed-precision-config", str(mix_yaml(work, name)), "--model-path", str(work / "conv" / "fp16"),
           "--plan-dir", str(work / "plans" / name)]  # fmt: skip
    if s.kind == "mixed" and s.kernel:
        cmd += ["--int4-moe-kernel", s.kernel]
    return cmd + common


def plan_numbers(work: Path, name: str) -> dict:
    """What the plan expects of a mixed server: bytes per rank (GPU weights) and bytes to read."""
    from sglang_mixed_precision.core.report import summary
    from sglang_mixed_precision.reference import plan_from_config

    s = summary(plan_from_config(mix_yaml(work, name)))
    return {"plan_rank_bytes": s["per_rank"][0]["bytes"], "plan_total_bytes": s["total"]["bytes"]}


# ---- talking to a server ---------------------------------------------------------------------------------
def generate(base: str, ids: list[list[int]], max_new: int, timeout: float = 600) -> tuple[float, list[dict]]:
    from sglang_mixed_precision.serving import client

    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    t = time.perf_counter()
    reply = client.post_json(f"{base}/generate", body, timeout=timeout)
    return time.perf_counter() - t, reply if isinstance(reply, list) else [reply]


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def log_decode_rate(text: str, batch: int) -> tuple[float | None, int]:
    """The median of the server's own decode tok/s lines at #running-req == ``batch`` in ``text`` (the
    first line of each run dropped: its interval spans the idle time and the prefill), and how many."""
    values = [v for run in decode_runs(text) if run["running"] == batch for v in run["tok_s"]]
    return (statistics.median(values) if values else None), len(values)


def wall_decode_rate(batch: int, n: int, t_n: float, t_2n: float) -> tuple[float | None, str | None]:
    """B*N / (t(2N) - t(N)): the N extra decode steps of the longer request; None and the reason when
    the difference is too small to be N decode steps (prefill noise larger than the decode time)."""
    window = t_2n - t_n
    if window < MIN_DECODE_WINDOW_S:
        return None, f"t({2 * n}) - t({n}) = {window * 1000:.2f} ms < {MIN_DECODE_WINDOW_S * 1000:.0f} ms"
    return batch * n / window, None


def read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def measure_round(base: str, vocab: int, log_path: Path) -> dict:
    """Decode tok/s at each batch size B from the server's own log lines while an N- and a 2N-token
    request of B sequences ran (``decode_tok_s_bB``, with ``decode_lines_bB`` lines), the wall-clock rate
    B*N / (t(2N) - t(N)) as a cross-check (``decode_wall_tok_s_bB``), and TTFT of a 2,048-token prompt
    (median of 3). A value that could not be measured is None with its reason in ``invalid``."""
    out: dict = {"invalid": {}}
    for b in BATCHES:
        ids = prompts(b, SHORT_PROMPT, vocab, seed=b)
        offset = log_path.stat().st_size
        t_n, _ = generate(base, ids, DECODE_TOKENS)
        t_2n, _ = generate(base, ids, 2 * DECODE_TOKENS)
        time.sleep(0.5)  # SGLang's scheduler writes its last decode line as the request returns
        rate, lines = log_decode_rate(read_from(log_path, offset), b)
        out[f"decode_tok_s_b{b}"], out[f"decode_lines_b{b}"] = rate, lines
        if rate is None:
            out["invalid"][f"decode_tok_s_b{b}"] = f"no decode line at #running-req {b} in the server log"
        wall, why = wall_decode_rate(b, DECODE_TOKENS, t_n, t_2n)
        out[f"decode_wall_tok_s_b{b}"] = wall
        if why:
            out["invalid"][f"decode_wall_tok_s_b{b}"] = why
    long = prompts(3, LONG_PROMPT, vocab, seed=7)
    out["ttft_s_2048"] = statistics.median(generate(base, [p], 1)[0] for p in long)
    return out


def warm_up(base: str, vocab: int) -> None:
    """Every request shape once (Triton JIT, CUDA-graph batch sizes) before anything is timed."""
    for b in BATCHES:
        generate(base, prompts(b, SHORT_PROMPT, vocab, seed=100 + b), 8)
    generate(base, prompts(1, LONG_PROMPT, vocab, seed=99), 1)


def greedy_ids(base: str, vocab: int) -> list[list[int]]:
    n, tokens = GREEDY
    _, replies = generate(base, prompts(n, 24, vocab, seed=1234), tokens)
    return [r["output_ids"] for r in replies]


def profile_decode(base: str, vocab: int, trace_dir: Path, timeout: float = 120.0) -> dict:
    """Kernels of PROFILE_STEPS decode steps at batch PROFILE_BATCH (CUDA graphs on): per step, each
    kernel's launches, grid and GPU time, and the GPU busy time of a step. SGLang's /start_profile
    answers plain text ("Start profiling."), not JSON; the trace is written under ``trace_dir`` (in
    folders of SGLang's choosing: searched recursively) once the profiled steps have run."""
    from sglang_mixed_precision.serving import client

    trace_dir.mkdir(parents=True, exist_ok=True)
    before = set(trace_dir.rglob("*.trace.json.gz"))
    body = {"output_dir": str(trace_dir), "num_steps": PROFILE_STEPS, "profile_by_stage": True,
            "activities": ["CPU", "GPU"], "with_stack": False, "record_shapes": False}  # fmt: skip
    status, reply = client.request(f"{base}/start_profile", body, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"/start_profile answered HTTP {status}: {str(reply)[:300]}")
    ids = prompts(PROFILE_BATCH, SHORT_PROMPT, vocab, seed=5)
    deadline = time.time() + timeout
    while time.time() < deadline:  # the trace is written once a later batch runs
        generate(base, ids, 48)
        new = sorted(p for p in trace_dir.rglob("*DECODE*.trace.json.gz") if p not in before)
        if new:
            time.sleep(2.0)  # let the exporter finish the file
            return kernel_table(new[0])
    found = sorted(str(p.relative_to(trace_dir)) for p in trace_dir.rglob("*") if p.is_file())
    raise RuntimeError(f"no decode trace under {trace_dir} within {timeout:.0f} s; files there: {found[:10]}")


def kernel_table(trace: Path) -> dict:
    """Per-step kernel statistics of a decode trace: {name|grid: [launches, us]} over the graph
    replays (or eager launches), the step count and the GPU time per step."""
    events = json.load(gzip.open(trace))["traceEvents"]
    runtime = {e["args"]["correlation"]: e["name"] for e in events
               if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}  # fmt: skip
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    graph_launches = {k["args"].get("correlation") for k in kernels
                      if runtime.get(k["args"].get("correlation"), "").startswith("cudaGraphLaunch")}  # fmt: skip
    steps = max(len(graph_launches), 1)
    table: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for k in kernels:
        key = f"{k['name'][:120]}|grid={k['args'].get('grid')}|block={k['args'].get('block')}"
        table[key][0] += 1
        table[key][1] += float(k.get("dur", 0.0))
    per_step = {key: [n / steps, round(us / steps, 2)] for key, (n, us) in table.items()}
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("python_function", "user_annotation")]
    return {
        "trace": trace.name,
        "steps": steps,
        "graph_replays": len(graph_launches),
        "gpu_us_per_step": round(sum(us for _, us in per_step.values()), 2),
        "kernels_per_step": round(sum(n for n, _ in per_step.values()), 2),
        "kernels": dict(sorted(per_step.items(), key=lambda kv: -kv[1][1])),
        "host_events": len(cpu),
    }


def drop_page_cache(work: Path) -> str:
    """Evict the checkpoints from the page cache so that weight loading reads the disk: the kernel's
    drop_caches when writable (root), else posix_fadvise(DONTNEED) on every checkpoint file."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "cold (drop_caches)"
    except OSError:
        pass
    for path in (work / "conv").rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "cold (posix_fadvise DONTNEED per file)"


# ---- a server start ---------------------------------------------------------------------------------------
@dataclass
class Running:
    name: str
    proc: object
    base: str
    log_path: Path
    started: float
    info: dict = field(default_factory=dict)


# Starting the servers one after the other until each had sized its KV pool took 55-60 s per server
# (launcher planning, imports, scheduler spawn: the weight load itself is 3-7 s), 8 minutes for 8 servers.
# They now start --stagger seconds apart, their start-ups overlapping. That is safe because the KV pool
# is fixed: SGLang takes min(--max-total-tokens, profiled) tokens, profiled from the memory free after
# its own weights minus (1 - --mem-fraction-static) x the memory free when it started. With 0.92 and
# 160,000 tokens (3.7 GiB of KV at these widths), the worst case on a 140 GiB card (a server that saw
# an empty GPU at start, so reserves 0.08 x 140 = 11 GiB, then all 8 mixes' weights, 70 GiB, and the
# other pools, 26 GiB, before it measured) still leaves ~30 GiB, less the other servers' CUDA contexts
# (~1-2 GiB each), for its 3.7 GiB pool: every server gets the same pool whatever the order. The stagger (> a warm weight load, 3-7 s) keeps the weight loads mostly apart; loads that
# overlapped another server's are named in "load_overlaps" (from the log lines), so a contended load
# time is never reported as a clean one. --stagger load-end starts each server only after the previous
# one logged "Load weight end" (uncontended loads, the slow way).
STOP_RESERVE_S = 60  # stopping every server (in parallel), parsing their logs, writing the results


def wait_for_line(log_path: Path, proc, needle: str, until: float) -> bool:
    while time.time() < until and proc.poll() is None:
        if needle in log_path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def start_servers(names: list[str], work: Path, start_no: int, args, deadline: float, running: list) -> None:
    """Start the servers ``args.stagger`` apart, each appended to ``running`` as it starts (so that the
    caller stops whatever started, whatever fails), and wait until all answer (or the deadline nears)."""
    from sglang_mixed_precision.serving import client

    for i, name in enumerate(names):
        port = 31000 + 10 * i
        cmd = server_command(name, work, port, args.mem_fraction, args.max_total_tokens)
        log_path = work / "logs" / f"{name}.start{start_no}.log"  # archived into --out: see archive_logs
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"start {start_no}: {name}: {' '.join(cmd[1:])}")
        proc = client.start_server(cmd, log_path)
        running.append(Running(name, proc, f"http://127.0.0.1:{port}", log_path, time.time()))
        if i + 1 < len(names):
            if args.stagger == "load-end":
                wait_for_line(log_path, proc, "Load weight end", min(time.time() + 240, deadline - STOP_RESERVE_S))
            else:
                time.sleep(float(args.stagger))
    for r in running:
        try:
            budget = max(deadline - STOP_RESERVE_S - time.time(), 1.0)
            client.wait_until_ready(r.base, r.proc, min(600, budget), r.log_path, progress=log)
            r.info["ready_since_start_s"] = round(time.time() - r.started, 1)
        except Exception as e:
            r.info["error"] = f"{type(e).__name__}: {e}"[-1500:]
            log(f"{r.name}: FAILED to start: {r.info['error'][:400]}")


def startup_s(text: str) -> float | None:
    """Seconds from SGLang's first timestamped log line to "The server is fired up and ready to roll!"
    (1 s resolution; the launcher's planning before SGLang starts is not in it)."""
    import re
    from datetime import datetime

    stamps = re.findall(r"^\[([\d-]+ [\d:]+)\]", text, re.MULTILINE)
    ready = re.search(r"^\[([\d-]+ [\d:]+)\] The server is fired up and ready to roll", text, re.MULTILINE)
    if not stamps or not ready:
        return None
    parse = lambda t: datetime.strptime(t, "%Y-%m-%d %H:%M:%S")  # noqa: E731
    return (parse(ready.group(1)) - parse(stamps[0])).total_seconds()


def facts_from_log(text: str) -> dict:
    """Weight load time and memory (SGLang's line), the mixed loader's lines, the load window and the
    start-up time."""
    facts = parse_server_log(text)
    window = weight_load_window(text)
    if window:
        facts["load_window"] = list(window)
    up = startup_s(text)
    if up is not None:
        facts["startup_s"] = up
    return facts


def log_facts(log_path: Path) -> dict:
    return facts_from_log(log_path.read_text(errors="replace"))


def mark_load_overlaps(servers: dict) -> None:
    """Per server, the others whose weight load (begin..end, 1 s resolution) overlapped its own."""
    windows = {n: e["load_window"] for n, e in servers.items() if e.get("load_window")}
    for name, (b, e) in windows.items():
        servers[name]["load_overlaps"] = sorted(
            o for o, (ob, oe) in windows.items() if o != name and b <= oe and ob <= e
        )


def stop_all(running: list, grace: float = 30.0) -> None:
    """SIGTERM every server at once, then wait for all within one ``grace`` (SIGKILL after)."""
    import contextlib

    from sglang_mixed_precision.serving import client

    for r in running:
        if r.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, signal.SIGTERM)
    until = time.time() + grace
    for r in running:
        client.stop_server(r.proc, grace=max(until - time.time(), 1.0))


def archive_logs(out: Path, paths: list[Path]) -> None:
    """The server logs as one file, --out/server_logs.tgz (a GPU command brings back few files, none
    deeper than two folders): the logs of earlier commands already in it are kept, ``paths`` added."""
    import io
    import tarfile

    archive = out / "server_logs.tgz"
    kept = {}
    if archive.exists():
        with tarfile.open(archive) as tar:
            kept = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for path in paths:
        kept[f"logs/{path.name}"] = path.read_bytes()
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in sorted(kept.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))


def time_left(deadline: float) -> float:
    return deadline - time.time()


def serve_phase(names, work: Path, out: Path, results: dict, args, vocab: int, deadline: float) -> None:
    """One start of ``names``: tokens, profiles, rounds; results written after every step, and the
    servers stopped with STOP_RESERVE_S left before ``deadline``."""
    from sglang_mixed_precision.serving import client

    start_no = 1 + max((s["start"] for s in results.get("starts", [])), default=0)
    page_cache = drop_page_cache(work) if args.cold else "warm (files read or written before this start)"
    sample = {"start": start_no, "page_cache": page_cache, "stagger": args.stagger, "servers": {}}
    results.setdefault("starts", []).append(sample)
    running: list[Running] = []
    try:
        start_servers(names, work, start_no, args, deadline, running)
        live = [r for r in running if "error" not in r.info]
        for r in running:
            entry = sample["servers"][r.name] = dict(r.info)
            entry.update(log_facts(r.log_path))
            if SERVERS[r.name].kind == "mixed":
                entry.update(plan_numbers(work, r.name))
        mark_load_overlaps(sample["servers"])
        write_results(out, results)
        for r in live:
            entry = sample["servers"][r.name]
            try:
                warm_up(r.base, vocab)
                entry["greedy_ids"] = greedy_ids(r.base, vocab)
                if SERVERS[r.name].kind == "mixed":
                    info = client.get_json(f"{r.base}/mixed_precision/info")
                    load = info.get("load") or {}
                    entry["bytes_read"] = load.get("bytes_read")
                    entry["methods"] = sorted({m["method"] for m in info["modules"].values() if m.get("method")})
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"[-1500:]
                log(f"{r.name}: {entry['error'][:300]}")
        write_results(out, results)
        live = [r for r in live if "error" not in sample["servers"][r.name]]
        profiled = {n for st in results["starts"] for n, e in st["servers"].items() if e.get("profile")}
        to_profile = [r for r in live if args.profile_every_start or r.name not in profiled]
        if to_profile:  # each server once (its first start that gets there), unless --profile-every-start
            for r in to_profile:
                if time_left(deadline) < STOP_RESERVE_S + 60:
                    log(f"deadline: no profile of {r.name}")
                    break
                entry = sample["servers"][r.name]
                try:
                    entry["profile"] = profile_decode(r.base, vocab, work / "profiles" / f"{r.name}.start{start_no}")
                    log(f"{r.name}: profiled {entry['profile']['gpu_us_per_step']} us/step")
                except Exception as e:
                    entry["profile_error"] = f"{type(e).__name__}: {e}"[-800:]
                    log(f"{r.name}: profile failed: {entry['profile_error'][:300]}")
                write_results(out, results)
        round_s = 0.0
        for k in range(args.rounds):  # interleaved: A B C ... A B C ...
            if time_left(deadline) < STOP_RESERVE_S + 1.5 * round_s:
                log(f"deadline: {k} of {args.rounds} rounds done")
                sample["rounds_cut_by_deadline"] = args.rounds - k
                break
            t = time.time()
            for r in live:
                try:
                    m = measure_round(r.base, vocab, r.log_path)
                    sample["servers"][r.name].setdefault("rounds", []).append(m)
                    log(
                        f"round {k + 1} {r.name}: "
                        + ", ".join(f"{x}={v:.4g}" for x, v in m.items() if isinstance(v, float))
                    )
                except Exception as e:
                    sample["servers"][r.name]["round_error"] = f"{type(e).__name__}: {e}"[-800:]
            round_s = time.time() - t
            write_results(out, results)
    finally:
        stop_all(running)
        for r in running:
            sample["servers"].setdefault(r.name, dict(r.info)).update(log_facts(r.log_path))
        mark_load_overlaps(sample["servers"])
        write_results(out, results)
        archive_logs(out, [r.log_path for r in running])


# ---- results ----------------------------------------------------------------------------------------------
# decode_client_tok_s_bB: run 1's client-side rate B*(N-1) / (t(N) - t(1)), kept (invalid samples marked)
# only in results rebuilt by --from-logs.
CROSS_CHECKS = [f"decode_{kind}_tok_s_b{b}" for kind in ("wall", "client") for b in BATCHES]
METRICS = [f"decode_tok_s_b{b}" for b in BATCHES] + ["ttft_s_2048"] + CROSS_CHECKS


def _rounds(results: dict, name: str) -> list[dict]:
    return [m for s in results.get("starts", []) for m in s["servers"].get(name, {}).get("rounds", [])]


def samples(results: dict, name: str, metric: str) -> list[float]:
    """The valid samples of ``metric``: rounds that measured it (None marks an invalid sample)."""
    return [m[metric] for m in _rounds(results, name) if m.get(metric) is not None]


def invalid_count(results: dict, name: str, metric: str) -> int:
    return sum(1 for m in _rounds(results, name) if metric in m and m[metric] is None)


def compare(results: dict, a: str, b: str, metric: str) -> dict | None:
    """a vs b: ratio of medians of the valid samples, each side's spread, [min, median, max, n valid,
    n invalid], and whether the spreads overlap."""
    xa, xb = samples(results, a, metric), samples(results, b, metric)
    if not xa or not xb:
        return None
    ma, mb = statistics.median(xa), statistics.median(xb)
    overlap = not (min(xa) > max(xb) or max(xa) < min(xb))
    side = lambda xs, m, name: [min(xs), m, max(xs), len(xs), invalid_count(results, name, metric)]  # noqa: E731
    return {"ratio": ma / mb, "a": side(xa, ma, a), "b": side(xb, mb, b), "difference": not overlap}


def profile_diff(pa: dict, pb: dict) -> dict:
    """Same kernels (name, grid, block) and launches per step, and the GPU time per step of both."""
    ka, kb = pa["kernels"], pb["kernels"]
    only_a = sorted(set(ka) - set(kb))
    only_b = sorted(set(kb) - set(ka))
    launches = [k for k in set(ka) & set(kb) if abs(ka[k][0] - kb[k][0]) > 1e-6]
    return {"same_kernels": not only_a and not only_b and not launches, "only_mixed": only_a[:10],
            "only_stock": only_b[:10], "launch_count_differs": launches[:10],
            "gpu_us_per_step": [pa["gpu_us_per_step"], pb["gpu_us_per_step"]],
            "gpu_time_ratio": pa["gpu_us_per_step"] / max(pb["gpu_us_per_step"], 1e-9)}  # fmt: skip


def summarize(results: dict) -> dict:
    summary = {}
    for name, s in SERVERS.items():
        if not s.compare_to:
            continue
        row = {m: compare(results, name, s.compare_to, m) for m in METRICS}
        first = next((st["servers"] for st in results.get("starts", []) if name in st["servers"]), {})
        a, b = first.get(name, {}), first.get(s.compare_to, {})
        if a.get("greedy_ids") and b.get("greedy_ids"):
            row["greedy_identical"] = a["greedy_ids"] == b["greedy_ids"]
            row["greedy_match_rate"] = statistics.mean(
                sum(x == y for x, y in zip(p, q)) / max(len(q), 1) for p, q in zip(a["greedy_ids"], b["greedy_ids"])
            )
        if a.get("profile") and b.get("profile"):
            row["profile"] = profile_diff(a["profile"], b["profile"])
        for key in ("weight_mem_gib", "weight_load_s"):  # per start: start 1 cold with --cold, later ones warm
            ratios = [
                (st["start"], st["servers"][name][key] / st["servers"][s.compare_to][key])
                for st in results.get("starts", [])
                if st["servers"].get(name, {}).get(key) and st["servers"].get(s.compare_to, {}).get(key)
            ]
            if ratios:
                row[f"{key}_ratio_by_start"] = dict(ratios)
        if a.get("bytes_read") and a.get("plan_total_bytes"):
            row["bytes_read_vs_plan"] = sum(a["bytes_read"].values()) / a["plan_total_bytes"]
        summary[f"{name} vs {s.compare_to}"] = row
    return summary


def kernel_tables(results: dict) -> dict:
    """{server.startN: kernel table} of every profiled server (one small file at the top of --out)."""
    return {
        f"{name}.start{st['start']}": e["profile"]
        for st in results.get("starts", [])
        for name, e in st["servers"].items()
        if e.get("profile")
    }


def write_results(out: Path, results: dict) -> None:
    results["summary"] = summarize(results)
    (out / "bench_mix.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "bench_mix.md").write_text(markdown(results))
    tables = kernel_tables(results)
    if tables:
        (out / "kernel_tables.json").write_text(json.dumps(tables, indent=1))


def _fmt(c: dict | None, ttft: bool = False) -> str:
    if not c:
        return "-"
    lo_a, med_a, hi_a, n_a = c["a"][:4]
    n_b = c["b"][3]
    bad = c["a"][4:5] + c["b"][4:5]  # invalid samples of each side (absent in older results)
    fmt = (lambda v: f"{v * 1000:.1f} ms") if ttft else (lambda v: f"{v:,.0f}")
    flag = " (differs)" if c["difference"] else ""
    invalid = f"; {bad[0]}/{bad[1]} invalid" if any(bad) else ""
    return f"**{c['ratio']:.3f}**{flag} ({fmt(med_a)} [{fmt(lo_a)}..{fmt(hi_a)}], n={n_a}/{n_b}{invalid})"


def rebuilt_note(results: dict) -> list[str]:
    note = results.get("rebuilt_from_logs")
    if not note:
        return []
    return [
        f"Rebuilt from the saved server logs by `--from-logs` ({note['at']}): load time, weight memory and "
        f"decode tok/s from the servers' own lines (decode_log_interval {note.get('decode_log_interval', '?')}: "
        "each round's decode tok/s is the median of that run's lines past its first); the client-side rates "
        "of the run are the 'client' cross-checks, invalid samples marked. The original JSON: bench_mix.raw.json.",
        "",
    ]


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [
        f"# Mixed vs stock SGLang: {env.get('card', '?')}",
        "",
        f"{env.get('versions', '')}; model: {results.get('model', '?')}; flags: `{' '.join(results.get('flags', ['?']))}` "
        f"(CUDA graphs on); {len(results.get('starts', []))} server start(s) per configuration, "
        "rounds interleaved across servers, the others idle while one is measured.",
        "",
        *rebuilt_note(results),
        "Ratios are medians of the valid samples of rounds (first vs second); in brackets the first's median "
        "and spread, then n = valid samples of each side and how many were invalid (never counted as numbers). "
        "'differs' only where the two spreads do not overlap. Decode tok/s: the server's own decode lines "
        "at #running-req = B; 'wall' columns: B*N / (t(2N) - t(N)) measured by the client.",
        "",
        "| comparison | decode b1 | decode b8 | decode b64 | TTFT 2048 | greedy | kernels/step | GPU us/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results.get("summary", {}).items():
        prof = row.get("profile") or {}
        same = "-" if not prof else ("same" if prof["same_kernels"] else "DIFFER")
        gpu = "-" if not prof else f"{prof['gpu_us_per_step'][0]:.0f} / {prof['gpu_us_per_step'][1]:.0f}"
        greedy = "-" if "greedy_identical" not in row else f"{row['greedy_match_rate']:.2f}"
        lines.append(
            f"| {key} | {_fmt(row.get('decode_tok_s_b1'))} | {_fmt(row.get('decode_tok_s_b8'))} | "
            f"{_fmt(row.get('decode_tok_s_b64'))} | {_fmt(row.get('ttft_s_2048'), ttft=True)} | {greedy} | {same} | {gpu} |"
        )
    checks = [m for m in CROSS_CHECKS if any(row.get(m) for row in results.get("summary", {}).values())]
    if checks:
        lines += ["", "Cross-checks of decode tok/s measured by the client:", "",
                  "| comparison | " + " | ".join(m.replace("_tok_s_", " ") for m in checks) + " |",
                  "|---|" + "---|" * len(checks)]  # fmt: skip
        for key, row in results.get("summary", {}).items():
            lines.append(f"| {key} | " + " | ".join(_fmt(row.get(m)) for m in checks) + " |")
    lines += ["", "Per server and start: weight memory, weight load time, bytes read", ""]
    for st in results.get("starts", []):
        lines.append(f"Start {st['start']}, page cache {st.get('page_cache', '?')}:")
        for name, e in st["servers"].items():
            read = sum(e["bytes_read"].values()) / 2**30 if e.get("bytes_read") else None
            lines.append(
                f"- {name}: weights {e.get('weight_mem_gib', '?')} GiB, load {e.get('weight_load_s', '?')} s, "
                + (f"read {read:.2f} GiB (plan {e.get('plan_total_bytes', 0) / 2**30:.2f}), " if read else "")
                + f"SGLang start-up {e.get('startup_s', '?')} s"
                + (f", load overlapped {', '.join(e['load_overlaps'])}" if e.get("load_overlaps") else "")
                + (f"; ERROR {e['error'][:200]}" if e.get("error") else "")
            )
    if results.get("prepare"):
        lines += ["", f"Preparation: {json.dumps(results['prepare'])}"]
    return "\n".join(lines) + "\n"


# ---- CPU check --------------------------------------------------------------------------------------------
def cpu_check(work: Path, names: list[str], args) -> int:
    from sglang_mixed_precision.serving.client import sglang_argv_problem

    prep = prepare(work, 2, tiny=True, device="cpu", convert_device=None)
    log(f"prepared on CPU: {prep}")
    problems = []
    for i, name in enumerate(names):
        cmd = server_command(name, work, 31000 + 10 * i, args.mem_fraction, args.max_total_tokens)
        if SERVERS[name].kind == "mixed":
            printed = subprocess.run(cmd + ["--print-command"], capture_output=True, text=True)
            if printed.returncode:
                problems.append(f"{name}: launcher refused: {printed.stderr[-800:]}")
                continue
            log(f"{name}: plan {plan_numbers(work, name)}")
        else:
            problem = sglang_argv_problem(cmd[3:])
            if problem:
                problems.append(f"{name}: {problem}")
    need = sum(serve_plan_s(len(names), args.rounds, args.stagger, args.starts, args.profile_every_start))
    log(f"{args.starts} serve phase(s) of {len(names)} server(s) x {args.rounds} round(s), --stagger {args.stagger}: ~{need:.0f} s "
        f"of --deadline-s {args.deadline_s:.0f}")  # fmt: skip
    if need > args.deadline_s:
        problems.append(
            f"the serve phase(s) need ~{need:.0f} s, over --deadline-s {args.deadline_s:.0f}: fewer --servers"
        )
    for p in problems:
        log("PROBLEM " + p)
    print(f"cpu check: {len(names)} server commands, {len(problems)} problem(s)")
    return 1 if problems else 0


# ---- results rebuilt from saved server logs ------------------------------------------------------------------
def saved_logs(src: Path) -> dict[str, str]:
    """{file name: text} of the server logs in ``src``: server_logs.tgz and/or a logs/ folder."""
    import tarfile

    logs = {p.name: p.read_text(errors="replace") for p in sorted((src / "logs").glob("*.log"))}
    if (src / "server_logs.tgz").exists():
        with tarfile.open(src / "server_logs.tgz") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".log"):
                    logs.setdefault(Path(member.name).name, tar.extractfile(member).read().decode(errors="replace"))
    return logs


def rounds_from_log(text: str, rounds: list[dict]) -> None:
    """Fill the decode tok/s of ``rounds`` from a server log that has no offsets per round: the runs of
    decode lines at #running-req == B that follow a prefill of B prompts of SHORT_PROMPT tokens (the
    rounds' requests; warm-up and greedy runs differ in tokens or have no line past the first), the
    last len(rounds) of them in order. A client-side rate from before the fix (B*(N-1) / (t(N) - t(1)),
    where a slow 1-token request made the difference tiny or negative) moves to decode_client_tok_s_bB
    and is marked invalid where its window is under MIN_DECODE_WINDOW_S or it disagrees with the
    server's own lines by more than CLIENT_LOG_DISAGREEMENT."""
    for b in BATCHES:
        runs = [r for r in decode_runs(text) if r["running"] == b and r["after_prefill"] == (b, b * SHORT_PROMPT)]
        runs = [r for r in runs if r["tok_s"]][-len(rounds) :] if rounds else []
        for m, run in zip(rounds[-len(runs) :] if runs else [], runs):
            m.setdefault("invalid", {})
            key, client_key = f"decode_tok_s_b{b}", f"decode_client_tok_s_b{b}"
            if client_key not in m and key in m:
                m[client_key] = m[key]
            m[key], m[f"decode_lines_b{b}"] = statistics.median(run["tok_s"]), len(run["tok_s"])
            client_rate = m.get(client_key)
            if client_rate is None:
                continue
            window = b * (DECODE_TOKENS - 1) / client_rate
            if window < MIN_DECODE_WINDOW_S:
                m["invalid"][client_key] = f"t(N) - t(1) = {window * 1000:.2g} ms (clamped): {client_rate:.4g} tok/s"
                m[client_key] = None
            elif abs(client_rate / m[key] - 1) > CLIENT_LOG_DISAGREEMENT:
                m["invalid"][client_key] = f"{client_rate:.4g} tok/s, the server's lines {m[key]:.4g}"
                m[client_key] = None


def from_logs(src: Path, out: Path) -> dict:
    """Results rebuilt from a saved run: its bench_mix.json plus its server logs (load time, weight
    memory, load windows, decode tok/s from the server's own lines). The original JSON is kept as
    bench_mix.raw.json beside the rebuilt one."""
    import shutil

    raw = src / "bench_mix.raw.json"
    if not raw.exists():
        shutil.copyfile(src / "bench_mix.json", raw)
    results = json.loads(raw.read_text())
    logs = saved_logs(src)
    for st in results.get("starts", []):
        for name, entry in st["servers"].items():
            text = logs.get(f"{name}.start{st['start']}.log")
            if text is None:
                entry["log_missing"] = True
                continue
            entry.update(facts_from_log(text))
            # run 1 started the servers one by one, then waited for each in turn: its "ready since
            # start" is when the wait reached a server, not a start-up time (startup_s is, from the log)
            entry.pop("ready_since_start_s", None)
            rounds_from_log(text, entry.get("rounds", []))
        mark_load_overlaps(st["servers"])
    import re

    intervals = {int(m) for text in logs.values() for m in re.findall(r"decode_log_interval=(\d+)", text)}
    results["rebuilt_from_logs"] = {
        "logs": sorted(logs),
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "decode_log_interval": sorted(intervals)[0] if len(intervals) == 1 else sorted(intervals),
    }
    # the run's flags were not recorded in its JSON: those of the script at the time (SGLang's default
    # decode_log_interval, as its logs say)
    at = SERVER_FLAGS.index("--decode-log-interval")
    results.setdefault("flags", SERVER_FLAGS[:at] + SERVER_FLAGS[at + 2 :])
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, results)
    return results


def serve_estimate_s(n: int, rounds: int, stagger: str, profile: bool = True) -> float:
    """Seconds one start of ``n`` servers needs, STOP_RESERVE_S included. From run 1 on an H200: 45-75 s
    from a server's process start to ready (launcher, imports, CUDA graphs), warm-up and greedy tokens
    ~5 s, a profile ~10 s, and a round (an N- and a 2N-token request at 3 batch sizes, 3 TTFTs) ~5 s
    per server."""
    gap = 60 if stagger == "load-end" else float(stagger)
    return gap * (n - 1) + 75 + n * (5 + (10 if profile else 0)) + rounds * n * 5 + STOP_RESERVE_S


def serve_plan_s(n: int, rounds: int, stagger: str, starts: int, profile_every_start: bool) -> list[float]:
    """The estimate of each of ``starts`` starts (only the first profiles, unless every start does)."""
    return [serve_estimate_s(n, rounds, stagger, k == 0 or profile_every_start) for k in range(starts)]


def main(argv: list[str] | None = None) -> int:
    began = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="model and sources (kept across commands)")
    ap.add_argument("--out", required=True, help="results (bench_mix.json / .md, kernel_tables.json, server logs)")
    ap.add_argument("--phase", default="prepare,serve,report")
    ap.add_argument("--servers", default=",".join(SERVERS), help="a subset per command: e.g. 4 servers x 2 starts")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--starts", type=int, default=1, help="server starts in this command (each a sample)")
    ap.add_argument("--mem-fraction", type=float, default=0.92)
    ap.add_argument("--max-total-tokens", type=int, default=160000)
    ap.add_argument("--stagger", default="8", help="seconds between server starts, or load-end (see start_servers)")
    ap.add_argument("--deadline-s", type=float, default=540,
                    help="stop the servers and write everything this many seconds after the command began")  # fmt: skip
    ap.add_argument("--convert-device", default=None, help="the converter's --device (default: its own)")
    ap.add_argument("--profile-every-start", action="store_true")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoints from the page cache before the start")
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--from-logs", metavar="DIR", help="rebuild the results of a saved run (DIR: bench_mix.json and "
                    "server_logs.tgz or logs/) into --out; starts nothing")  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.stagger != "load-end":
        try:
            float(args.stagger)
        except ValueError:
            ap.error(f"--stagger {args.stagger!r}: seconds (e.g. 8) or load-end")
    if args.from_logs:
        if not (Path(args.from_logs) / "bench_mix.json").exists():
            ap.error(f"--from-logs {args.from_logs}: no bench_mix.json there")
        from_logs(Path(args.from_logs), out)
        print((out / "bench_mix.md").read_text())
        return 0
    if not args.workdir:
        ap.error("--workdir is required (except with --from-logs)")
    work = Path(args.workdir)
    deadline = began + args.deadline_s
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        ap.error(f"unknown server(s) {unknown}; known: {', '.join(SERVERS)}")
    if args.cpu_check:
        return cpu_check(work, names, args)
    # a SIGTERM (a command limit) unwinds like an error: the servers are stopped and the results written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results_path = out / "bench_mix.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["environment"] = environment(False)
    results["model"] = f"qwen3_moe, Qwen3-30B-A3B widths, {args.layers} layers, random weights"
    results["flags"] = SERVER_FLAGS
    phases = [p.strip() for p in args.phase.split(",")]
    if "prepare" in phases:
        results.setdefault("prepare", {}).update(prepare(work, args.layers, False, "cuda", args.convert_device))
        write_results(out, results)
    if "serve" in phases:
        need = serve_estimate_s(len(names), args.rounds, args.stagger)
        if time_left(deadline) < need:
            log(f"serve skipped: {time_left(deadline):.0f} s left before --deadline-s, {need:.0f} s needed for "
                f"{len(names)} servers x {args.rounds} rounds; run --phase serve,report in the next command")  # fmt: skip
            results.setdefault("skipped", []).append({"phase": "serve", "left_s": round(time_left(deadline))})
        else:
            vocab = json.loads((work / "model" / "config.json").read_text())["vocab_size"]
            for k in range(args.starts):  # each a new start of every server, while the deadline allows
                need = serve_estimate_s(len(names), args.rounds, args.stagger, k == 0 or args.profile_every_start)
                if k and time_left(deadline) < need:
                    log(
                        f"deadline: {k} of {args.starts} starts done ({time_left(deadline):.0f} s left, {need:.0f} needed)"
                    )
                    results.setdefault("skipped", []).append({"phase": "serve", "starts_left": args.starts - k})
                    break
                try:
                    serve_phase(names, work, out, results, args, vocab, deadline)
                except Exception:
                    log("serve phase failed:\n" + traceback.format_exc())
    write_results(out, results)
    print((out / "bench_mix.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    threading.stack_size(8 << 20)
    sys.exit(main())
