#!/usr/bin/env python3
"""Conversion speed on the GPU: fp8, int4 RTN and GPTQ on a Qwen3-30B-A3B-wide MoE, with peak memory.

Model: a random Qwen3-MoE with Qwen3-30B-A3B's widths (hidden 2048, 32 q / 4 kv heads, 128 experts of
768, top-8, vocab 151936) and --layers decoder layers, drawn on the GPU and written as a bf16 checkpoint
(it stays in the page cache: the rates are those of a page-cached input). Phases (--phases):

  generate  write the checkpoint and a calibration text long enough for --nsamples x --seqlen tokens
  fp8       sglang-mp convert --formats fp8 --device cuda
  rtn       sglang-mp convert --formats int4 --method rtn --device cuda
  gptq      sglang-mp convert --formats int4 --method gptq --device cuda (--nsamples x --seqlen tokens)
  compare   GPTQ of --compare-experts experts of real shape (gate/up 1536 x 2048, 4096 routed tokens
            each) batched on the GPU and one at a time on the CPU: differing 4-bit values, relative
            weight difference, and each side's layer-output error proxy tr(D H D^T) / tr(W H W^T)

Each conversion runs in its own process (so its peak RSS is its own); its convert_report.json gives the
seconds per unit, torch.cuda.max_memory_allocated and the peak RSS, set against the bounds stated in
README_MIXED_PRECISION.md (converter section). Rates are GB/s (10^9 bytes) of 16-bit input: over the
whole run (process start to exit) and over the decoder layers alone (the rate per layer), extrapolated to
Qwen3-30B-A3B (61 GB of bf16) and Qwen3-235B-A22B (470 GB) by bytes. Every phase gets what is left of
--budget seconds; a conversion that runs out is reported as timed out with the layers it finished.

--cpu-check runs every phase on the CPU with a tiny model (2 layers, hidden 512, 8 experts).

Usage (GPU machine, repository root; about 4-6 minutes on one H200 with 12 layers):
    source bench/gpu_setup.sh && python bench/gpu_convert_bench.py --workdir /root/gcb --out $OUT/convert
Writes $OUT/convert/gpu_convert_bench.{json,md} (the card is named in both).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

from gpu_bench_mix import QWEN3_30B_A3B, TINY, write_random_checkpoint  # noqa: E402
from gpu_common import environment, make_log  # noqa: E402

log = make_log("convert-bench")
TARGETS = {"Qwen3-30B-A3B": 61e9, "Qwen3-235B-A22B": 470e9}  # bytes of the bf16 release
GOALS = {"fp8": 2.0, "rtn": 2.0, "gptq": 0.3}  # GB/s of input (issue 15)
PHASES = ("generate", "fp8", "rtn", "gptq", "compare")
METHODS = {
    "fp8": ["--formats", "fp8"],
    "rtn": ["--formats", "int4", "--method", "rtn"],
    "gptq": ["--formats", "int4", "--method", "gptq"],
}
EXPERT_BATCH_BYTES = 16 * 2**30  # calibration.EXPERT_BATCH_BYTES (the bound counts it)


# ---- the model ------------------------------------------------------------------------------------------
def generate(work: Path, layers: int, tiny: bool, device: str, calib_tokens: int) -> dict:
    from sglang_mixed_precision.testing.tinymodels import tiny_config, write_tokenizer

    src = work / "model"
    info = {}
    if not (src / "model.safetensors.index.json").exists():
        cfg = tiny_config("qwen3_moe", num_layers=layers, **(TINY if tiny else QWEN3_30B_A3B)).to_dict()
        cfg.pop("_name_or_path", None)
        cfg["architectures"] = ["Qwen3MoeForCausalLM"]
        log(f"generating a {layers}-layer qwen3_moe on {device}")
        info["generate_s"] = round(write_random_checkpoint(cfg, src, device), 1)
        (src / "config.json").write_text(json.dumps(cfg, indent=2))
        write_tokenizer(src, cfg["vocab_size"])
    info["calib_file"] = str(calibration_file(work, src, calib_tokens))
    info["input_bytes"] = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    return info


def calibration_file(work: Path, src: Path, tokens: int) -> Path:
    """The bundled corpus repeated until it gives ``tokens`` (+ the held-out eighth) with the model's tokenizer."""
    from transformers import AutoTokenizer

    from sglang_mixed_precision.testing.tinymodels import corpus_text

    path = work / "calib.txt"
    text = corpus_text()
    per_copy = len(AutoTokenizer.from_pretrained(str(src))(text)["input_ids"])
    copies = math.ceil(tokens * 1.25 / per_copy) + 1
    path.write_text("\n".join([text] * copies))
    return path


# ---- a conversion -----------------------------------------------------------------------------------------
def convert(work: Path, method: str, device: str, args, timeout: float) -> dict:
    out = work / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "sglang_mixed_precision.cli", "convert", "--model_path", str(work / "model"),
           "--output_dir", str(out), "--device", device, "--no_check", "--no_progress", *METHODS[method]]  # fmt: skip
    if method == "gptq":
        cmd += ["--calib_file", str(work / "calib.txt"), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    log(f"{method}: {' '.join(cmd[3:])} (timeout {timeout:.0f} s)")
    start = time.time()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "python"), os.environ.get("PYTHONPATH")])),
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return timed_out(stderr, time.time() - start, work)
    wall = time.time() - start
    if proc.returncode:
        return {"error": proc.stderr[-3000:], "wall_s": round(wall, 1)}
    report = json.loads((out / "convert_report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # the disk holds the input and one output at a time
    return summarize_run(report, wall, work)


def timed_out(stderr: str, seconds: float, work: Path) -> dict:
    """What a conversion that ran out of time did: its layers' seconds, from its per-unit log lines."""
    layer_s = [
        float(line.split(" in ")[1].split()[0]) for line in stderr.splitlines() if line.startswith("convert: layer ")
    ]
    sizes = layer_bytes(work / "model")
    steady = layer_s[1:] or layer_s
    rate = (sum(sizes.values()) / len(sizes) / 1e9) / (sum(steady) / len(steady)) if steady else None
    return {"timed_out_after_s": round(seconds, 1), "layer_s": layer_s, "gbps_layers_partial": sig(rate) if rate else None,
            "tail": stderr[-2000:]}  # fmt: skip


def summarize_run(report: dict, wall: float, work: Path) -> dict:
    units = report["unit_seconds"]
    layer_s = [s for label, s in units.items() if label.startswith("layer ")]
    sizes = layer_bytes(work / "model")
    gb = report["input_bytes"] / 1e9
    layers_gb = sum(sizes.values()) / 1e9
    steady = layer_s[1:] or layer_s  # the first layer pays for warm-up (kernels, allocator)
    per_layer_gb = layers_gb / max(len(sizes), 1)
    rate_layers = per_layer_gb / (sum(steady) / len(steady)) if steady else None
    return {
        "device": report["device"],
        "wall_s": round(wall, 1),
        "convert_s": round(report["seconds"], 1),
        "input_gb": round(gb, 2),
        "gbps_wall": sig(gb / wall),
        "gbps_convert": sig(gb / report["seconds"]),
        "layer_s": layer_s,
        "layer_gb": round(per_layer_gb, 3),
        "gbps_layers": sig(rate_layers) if rate_layers else None,
        "peak_device_gib": gib(report.get("peak_device_bytes")),
        "peak_host_gib": gib(report.get("peak_host_bytes")),
        "int4_method": {k: v for k, v in report.get("int4_method", {}).items() if not isinstance(v, dict)},
        "extrapolated_min": {
            name: round(b / 1e9 / rate_layers / 60, 1) if rate_layers else None for name, b in TARGETS.items()
        },
    }


def layer_bytes(src: Path) -> dict[int, int]:
    """16-bit bytes per decoder layer, from the shards' headers."""
    from sglang_mixed_precision.core.sources import CheckpointSource

    out: dict[int, int] = {}
    for name, t in CheckpointSource("input", src).tensors.items():
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            out[layer] = out.get(layer, 0) + t.nbytes
    return out


def sig(x: float) -> float:
    """Three significant digits (a tiny CPU check's rates are far below 0.001 GB/s)."""
    return float(f"{x:.3g}")


def gib(n) -> float | None:
    return round(n / 2**30, 2) if n else None


# ---- the stated bounds ------------------------------------------------------------------------------------
def bounds(work: Path, method: str, args, baseline_host: int | None) -> dict:
    """The README's bounds for this model: device and host bytes (host above the process baseline)."""
    from sglang_mixed_precision.core.sources import CheckpointSource

    tensors = CheckpointSource("input", work / "model").tensors
    sizes = layer_bytes(work / "model")
    unit = max(sizes.values())
    largest = max(t.numel for n, t in tensors.items() if ".layers." in n)
    cfg = json.loads((work / "model" / "config.json").read_text())
    acts = (args.nsamples + max(1, args.nsamples // 7)) * args.seqlen * cfg["hidden_size"] * 4
    outputs = len(tensors) * (4 if method != "fp8" else 2)
    if method == "gptq":
        device = 6 * unit + 8 * acts + EXPERT_BATCH_BYTES
    else:
        device = 5 * unit + 32 * largest
    host = 2 * unit + 4 * largest + 1536 * outputs + 64 * 2**20
    return {"device_gib": gib(device), "host_above_baseline_gib": gib(host), "baseline_host_gib": gib(baseline_host)}


def baseline_host(device: str) -> int | None:
    """Peak RSS of a process that imports what the converter imports and opens the device."""
    code = (
        "import torch, transformers, safetensors, sglang_mixed_precision.convert.pipeline\n"
        "from transformers.models.qwen3_moe import modeling_qwen3_moe\n"
        f"d = torch.device({device!r})\n"
        "torch.zeros(1, device=d); torch.cuda.synchronize() if d.type == 'cuda' else None\n"
        "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


# ---- GPU against CPU on real shapes ----------------------------------------------------------------------
def compare(device: str, experts: int, tiny: bool) -> dict:
    import torch

    from sglang_mixed_precision.convert.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_batched
    from sglang_mixed_precision.core.formats.gptq import unpack_int

    hidden, inter = (512, 256) if tiny else (2048, 768)
    tokens = 512 if tiny else 4096
    g = torch.Generator().manual_seed(0)
    w = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    hs = []
    for _ in range(experts):
        x = torch.randn(tokens, hidden, generator=g) * torch.rand(hidden, generator=g).pow(3) * 4
        acc = HessianAccumulator(hidden)
        acc.add(x)
        hs.append(acc.hessian)
    h = torch.stack(hs)
    t = time.time()
    gpu = gptq_quantize_batched(w.to(device), h.to(device))
    gpu_s = time.time() - t
    rows, t = [], time.time()
    for e in range(experts):
        cpu = gptq_quantize(w[e], h[e])
        qa, qb = unpack_int(cpu.tensors.qweight), unpack_int(gpu.tensors[e].qweight.cpu())
        dq_gpu = gpu.dequantized[e].cpu()

        def loss(dq, e=e):
            d = dq - w[e]
            return float(((d @ h[e]) * d).sum() / ((w[e] @ h[e]) * w[e]).sum())

        rows.append({
            "values_differing": round(float((qa != qb).float().mean()), 6),
            "max_step_difference": int((qa - qb).abs().max()),
            "relative_weight_difference": round(float((cpu.dequantized - dq_gpu).norm() / cpu.dequantized.norm()), 6),
            "loss_cpu": round(loss(cpu.dequantized), 6),
            "loss_gpu": round(loss(dq_gpu), 6),
        })  # fmt: skip
    return {"shape": [2 * inter, hidden], "tokens": tokens, "gpu_batched_s": round(gpu_s, 2),
            "cpu_one_at_a_time_s": round(time.time() - t, 2), "experts": rows}  # fmt: skip


# ---- other quantizers ------------------------------------------------------------------------------------
def other_quantizers() -> dict:
    """Whether GPTQModel or llm-compressor could run here: importable, or in a local package index
    (/opt/pypi*/simple/<name>/, /opt/pypi*/files/<name>-*)."""
    found = {}
    for pkg, names in (
        ("gptqmodel", ("gptqmodel", "GPTQModel")),
        ("llmcompressor", ("llmcompressor", "llm-compressor")),
    ):
        local = []
        for root in glob.glob("/opt/pypi*"):
            for n in names:
                local += glob.glob(f"{root}/simple/{n}") + glob.glob(f"{root}/files/{n.replace('-', '_')}-*")
        found[pkg] = {"importable": importlib.util.find_spec(pkg) is not None, "local_index": local[:5]}
    return found


# ---- results ---------------------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [
        f"# Conversion on {env['card']}",
        "",
        f"{r['model']}; input page-cached; {env['versions']}; budget {r['budget_s']} s, used {r.get('used_s')} s.",
        "",
        "| method | GB/s whole run | GB/s per layer (goal) | s per layer | peak GPU GiB (bound) | peak RSS GiB"
        " (baseline + bound) | Qwen3-30B-A3B min | Qwen3-235B-A22B min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ("fp8", "rtn", "gptq"):
        x = r.get(m)
        if not x:
            continue
        if "gbps_layers" not in x:
            lines.append(f"| {m} | {json.dumps({k: v for k, v in x.items() if k != 'tail'})[:300]} |||||||")
            continue
        b = x.get("bounds", {})
        steady = x["layer_s"][1:] or x["layer_s"]
        lines.append(
            f"| {m} | {x['gbps_wall']} | {x['gbps_layers']} ({GOALS[m]}) | {sum(steady) / len(steady):.2f} "
            f"| {x['peak_device_gib']} ({b.get('device_gib')}) | {x['peak_host_gib']} "
            f"({b.get('baseline_host_gib')} + {b.get('host_above_baseline_gib')}) "
            f"| {x['extrapolated_min']['Qwen3-30B-A3B']} | {x['extrapolated_min']['Qwen3-235B-A22B']} |"
        )
    lines += ["", "Minutes for the two releases are their bf16 bytes at the per-layer rate; Qwen3-235B-A22B's layers are"
              " wider (hidden 4096, experts of 1536), so its GPTQ minutes are an estimate by bytes, not a measurement."]  # fmt: skip
    g = r.get("gptq", {}).get("int4_method")
    if g:
        lines += ["", f"GPTQ held-out layer-output error {g.get('heldout_gptq_error')} vs RTN {g.get('heldout_rtn_error')}"
                  f" ({g.get('calibration_sequences')} x {g.get('seqlen')} calibration tokens)."]  # fmt: skip
    c = r.get("compare")
    if c:
        lines += ["", f"GPU batched vs CPU one at a time, {len(c['experts'])} experts of {c['shape']} "
                  f"({c['tokens']} tokens each): GPU {c['gpu_batched_s']} s, CPU {c['cpu_one_at_a_time_s']} s", "",
                  "| expert | 4-bit values differing | max step | relative weight difference | loss CPU | loss GPU |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for i, e in enumerate(c["experts"]):
            lines.append(
                f"| {i} | {e['values_differing']} | {e['max_step_difference']} | {e['relative_weight_difference']} "
                f"| {e['loss_cpu']} | {e['loss_gpu']} |"
            )
    others = r.get("other_quantizers", {})
    if not any(v["importable"] or v["local_index"] for v in others.values()):
        lines += ["", "GPTQModel / llm-compressor: neither installed nor in a local package index here: no comparison."]
    else:
        lines += ["", f"Other quantizers available: {json.dumps(others)} (not compared by this script)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="the generated model and calibration text (kept)")
    ap.add_argument("--out", required=True, help="gpu_convert_bench.json / .md")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--compare-experts", type=int, default=4)
    ap.add_argument("--budget", type=float, default=560, help="seconds for all phases (one command <= 10 min)")
    ap.add_argument("--cpu-check", action="store_true", help="every phase on the CPU with a tiny model")
    args = ap.parse_args(argv)
    start = time.time()
    tiny = args.cpu_check
    device = "cpu" if tiny else "cuda"
    if tiny:
        args.layers, args.nsamples, args.seqlen, args.compare_experts = 2, 2, 64, 2
    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    shape = "tiny (hidden 512, 8 experts of 256, top-2)" if tiny else "Qwen3-30B-A3B widths"
    r = {"environment": environment(tiny), "model": f"qwen3_moe, {shape}, {args.layers} layers, random weights",
         "budget_s": args.budget, "other_quantizers": other_quantizers()}  # fmt: skip
    failed = []

    def left() -> float:
        return args.budget - (time.time() - start)

    def save() -> None:
        r["used_s"] = round(time.time() - start, 1)
        (out / "gpu_convert_bench.json").write_text(json.dumps(r, indent=1))
        (out / "gpu_convert_bench.md").write_text(markdown(r))

    r["generate"] = generate(work, args.layers, tiny, device, args.nsamples * args.seqlen)
    save()
    base = baseline_host(device)
    reserve = 30 if "compare" in phases else 0
    for m in ("fp8", "rtn", "gptq"):
        if m in phases:
            r[m] = convert(work, m, device, args, left() - reserve)
            if "gbps_layers" in r[m]:
                r[m]["bounds"] = bounds(work, m, args, base)
            else:
                failed.append(m)
            log(f"{m}: {json.dumps({k: v for k, v in r[m].items() if k not in ('tail', 'error')})}")
            save()
    if "compare" in phases:
        r["compare"] = compare(device, args.compare_experts, tiny)
        save()
    print((out / "gpu_convert_bench.md").read_text())
    if failed:
        log(f"phases without a result: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
