#!/usr/bin/env python3
"""Peak RAM of a conversion vs the stated bound, on a generated model several times larger.

The converter holds one unit (a decoder layer, or the non-layer tensors) at a time, so its peak
resident memory should be about
    baseline (interpreter + torch + transformers) + 2 x the largest unit's 16-bit bytes
    + 48 bytes x the largest tensor's elements (its float32 / int64 working copies)
    [GPTQ: + 2 more units, 16 more bytes per element, + 24 bytes x K_max^2 for the Hessians]
    + 1.5 KiB x the output tensors (their names and headers, kept for the shard index and resume state)
    + 64 MiB slack (allocator, writer buffer)
and independent of the model's size but for the per-tensor term (44 MiB for the 600-layer model's
30k output tensors; ~320 MiB for Qwen3-235B-A22B's ~216k fp8 + int4 tensors, beside a 4 x 2.4 GB
unit term). This benchmark writes a small and a large Qwen3-shaped model
of the same layer shapes (the large one several times the bound), converts each in a child process
(fp8 + int4 rtn, and fp8 + int4 gptq) and reads the child's peak RSS. Writes
bench/results/convert_memory.{json,md}.

Usage: python bench/convert_memory.py [--hidden 512] [--layers 12,400] [--methods rtn,gptq]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys
from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
args = json.loads(sys.argv[1])
# Libraries in the baseline, not in the model's share: transformers' Qwen3 modeling module alone is
# ~170 MiB, imported by GPTQ's layer-by-layer calibration whatever the model's size.
import torch, safetensors, transformers, tqdm
from transformers.models.qwen3 import modeling_qwen3

def hwm():  # this process's peak RSS (VmHWM is per address space; ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
convert(ConvertOptions(**args))
peak = hwm()
print(json.dumps({"baseline": base, "peak": peak}))
"""


# The allocator's own working memory and the shard writer's 16 MiB copy buffer. Freed tensors go back
# to the OS between units (convert/allocator.py); before that the peak varied by +-10 MiB run to run.
SLACK = 64 * 2**20
# Names and safetensors headers of the tensors written (shard index, resume state): the fp8 + rtn
# peak grew by 1.04 KiB per output tensor from 12 to 600 layers (results/convert_memory.md).
PER_TENSOR = 1536
BOUND_TEXT = (
    "fp8 + rtn: baseline (Python, torch, transformers and its Qwen3 modeling module) + 2 x largest unit + 48 B x the largest tensor's "
    "elements + 1.5 KiB x output tensors + 64 MiB slack; gptq: baseline + 4 x largest unit + 64 B x the largest tensor's "
    "elements + 24 B x K_max^2 (Hessians and their inverse Cholesky factor) + 1.5 KiB x output tensors + 64 MiB slack"
)


def bound_above_baseline(method: str, unit_bytes: int, largest: int, k_max: int, tensors: int) -> int:
    """The stated bound. fp8 / rtn: the unit's 16-bit tensors and their outputs (2 x unit) plus
    float32 / int64 working copies of one tensor (48 B / element). GPTQ also holds the layer as a
    float32 transformers module (+2 x unit), GPTQ's working matrices (64 B / element) and, per
    input width K, two K x K float32 Hessians plus the inverse-Cholesky work (24 B x K^2). Both keep
    the names and headers of the ``tensors`` written (1.5 KiB each)."""
    kept = PER_TENSOR * tensors + SLACK
    if method == "gptq":
        return 4 * unit_bytes + 64 * largest + 24 * k_max**2 + kept
    return 2 * unit_bytes + 48 * largest + kept


def write_model(path: Path, hidden: int, layers: int) -> Path:
    """A random-weight Qwen3 model written shard by shard, never whole in memory."""
    import torch
    from safetensors.torch import save_file

    from sglang_mixed_precision.testing.tinymodels import tiny_config, write_tokenizer

    cfg = tiny_config(
        "qwen3",
        num_layers=layers,
        hidden=hidden,
        vocab=8192,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        intermediate_size=3 * hidden,
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    path.mkdir(parents=True)
    cfg.save_pretrained(str(path))
    write_tokenizer(path, 8192)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)

    h, i, q, kv = hidden, 3 * hidden, cfg.num_attention_heads * 128, cfg.num_key_value_heads * 128
    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731

    def layer(n):
        p = f"model.layers.{n}."
        return {
            p + "self_attn.q_proj.weight": rnd(q, h),
            p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h),
            p + "self_attn.o_proj.weight": rnd(h, q),
            p + "self_attn.q_norm.weight": ones(128),
            p + "self_attn.k_norm.weight": ones(128),
            p + "mlp.gate_proj.weight": rnd(i, h),
            p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
            p + "input_layernorm.weight": ones(h),
            p + "post_attention_layernorm.weight": ones(h),
        }

    def rest():
        return {"model.embed_tokens.weight": rnd(8192, h), "lm_head.weight": rnd(8192, h), "model.norm.weight": ones(h)}

    weight_map, n_shards = {}, layers + 1
    for n in range(1, n_shards + 1):  # one shard per layer, generated and saved one at a time
        tensors = rest() if n == 1 else layer(n - 2)
        f = f"model-{n:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(path / f), metadata={"format": "pt"})
        weight_map.update({k: f for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def measure(model: Path, out: Path, method: str) -> dict:
    """Convert (fp8 + int4 by `method`) in a child process; its baseline and peak RSS in bytes."""
    child_args = {
        "model_path": str(model),
        "output_dir": str(out),
        "formats": ["fp8", "int4"],
        "method": method,
        "check": False,
        "progress": False,
        "nsamples": 4,
        "seqlen": 256,
        "max_shard_size": "1GB",
    }
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(child_args)], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"conversion failed:\n{p.stderr[-3000:]}")
    tensors = sum(
        len(json.loads((out / f / "model.safetensors.index.json").read_text())["weight_map"]) for f in ("fp8", "int4")
    )
    shutil.rmtree(out)
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "seconds": time.time() - t0, "tensors": tensors}


def model_geometry(model: Path) -> dict:
    from sglang_mixed_precision.convert.model_dir import InputModel
    from sglang_mixed_precision.convert.plan import build_plan

    src = InputModel(model)
    plan = build_plan(src, skip=[], group_size=128, fp8_block=(128, 128))
    return {
        "model_bytes": src.total_bytes,
        "unit_bytes": max(sum(src.tensors[n].nbytes for n in u.tensors) for u in plan.units),
        "k_max": max(t.shape[1] for t in plan.quantized.values()),
        "largest": max(t.shape[0] * t.shape[1] for t in plan.quantized.values()),
    }


def markdown(result: dict) -> str:
    md = [
        f"# Conversion peak memory on {result['machine']}",
        "",
        f"Qwen3-shaped bf16 models, hidden {result['hidden']}, largest unit {result['largest_unit_mb']:.1f} MiB, "
        f"K_max {result['k_max']}. Bound: {result['bound']}. Peak RSS is VmHWM of the converting process "
        "(fp8 and int4 written in one pass). The bound's weight terms do not depend on the number of layers: "
        "only its 1.5 KiB per output tensor does.",
        "",
        "| int4 method (+ fp8) | layers | output tensors | model MiB | baseline MiB | peak RSS MiB | bound MiB | model / bound | within bound | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['method']} | {r['layers']} | {r['tensors']} | {r['model_mb']:.0f} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
        f"{r['bound_mb']:.0f} | {r['model_mb'] / r['bound_mb']:.1f}x | {r['within_bound']} | {r['seconds']:.0f} |"
        for r in result["rows"]
    ]
    md += ["", growth(result["rows"])]
    return "\n".join(md) + "\n"


def margin(row: dict) -> str:
    gap = row["bound_mb"] - row["peak_mb"]
    return f"{gap:.1f} MiB under the bound" if gap >= 0 else f"{-gap:.1f} MiB OVER the bound"


def growth(rows: list[dict]) -> str:
    """How much the peak grows from the smallest to the largest model, per method."""
    parts = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["layers"])
        small, large = mine[0], mine[-1]
        if small is large:
            continue
        parts.append(
            f"{method}: +{large['peak_mb'] - small['peak_mb']:.0f} MiB from {small['layers']} to {large['layers']} layers "
            f"({100 * (large['peak_mb'] - small['peak_mb']) / large['model_mb']:.1f}% of the large model's weights; "
            f"{margin(large)})"
        )
    return "Peak growth with the model: " + "; ".join(parts) + "." if parts else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", default="12,400", help="comma list: a small and a large model of the same shapes")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from convert_throughput import cpu_name

    rows, geo = [], None
    for layers in (int(x) for x in args.layers.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="convert_mem_"))
        try:
            model = write_model(tmp / "bf16", args.hidden, layers)
            geo = model_geometry(model)
            for method in args.methods.split(","):
                m = measure(model, tmp / f"out_{method}", method)
                bound = m["baseline"] + bound_above_baseline(
                    method, geo["unit_bytes"], geo["largest"], geo["k_max"], m["tensors"]
                )
                rows.append(
                    {
                        "method": method,
                        "layers": layers,
                        "tensors": m["tensors"],
                        "model_mb": geo["model_bytes"] / 2**20,
                        "baseline_mb": m["baseline"] / 2**20,
                        "peak_mb": m["peak"] / 2**20,
                        "bound_mb": bound / 2**20,
                        "within_bound": m["peak"] <= bound,
                        "seconds": round(m["seconds"], 1),
                    }
                )
                print(rows[-1], flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "machine": cpu_name(),
        "hidden": args.hidden,
        "largest_unit_mb": geo["unit_bytes"] / 2**20,
        "k_max": geo["k_max"],
        "largest_tensor_elements": geo["largest"],
        "bound": BOUND_TEXT,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convert_memory.json").write_text(json.dumps(result, indent=2))
    (out / "convert_memory.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
