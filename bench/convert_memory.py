#!/usr/bin/env python3
"""Peak RAM of a conversion vs the stated bound, on a generated model several times larger.

The converter holds one unit (a decoder layer, or the non-layer tensors) at a time, so its peak
resident memory should be about
    baseline (interpreter + torch + libraries) + 2 x the largest unit's 16-bit bytes
    + 48 bytes x the largest tensor's elements (its float32 / int64 working copies)
    [+ 24 bytes x K_max^2 for GPTQ's Hessians and inverse-Cholesky factor]
and independent of the model's size. This benchmark writes a Qwen3-shaped model whose weights are
many times that bound, converts it in a child process (fp8 + int4 rtn, and fp8 + int4 gptq) and
reads the child's peak RSS. Writes bench/results/convert_memory.{json,md}.

Usage: python bench/convert_memory.py [--hidden 2048] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
args = json.loads(sys.argv[1])
import torch, safetensors, transformers, tqdm  # count library memory in the baseline, not the model

def hwm():  # this process's peak RSS (VmHWM is per address space; ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
convert(ConvertOptions(**args))
peak = hwm()
print(json.dumps({"baseline": base, "peak": peak}))
"""


def bound_above_baseline(method: str, unit_bytes: int, largest: int, k_max: int) -> int:
    """The stated bound. fp8 / rtn: the unit's 16-bit tensors and their outputs (2 x unit) plus
    float32 / int64 working copies of one tensor (48 B / element). GPTQ also holds the layer as a
    float32 transformers module (+2 x unit), GPTQ's working matrices (64 B / element) and, per
    input width K, two K x K float32 Hessians plus the inverse-Cholesky work (24 B x K^2)."""
    if method == "gptq":
        return 4 * unit_bytes + 64 * largest + 24 * k_max**2
    return 2 * unit_bytes + 48 * largest


def write_model(path: Path, hidden: int, layers: int) -> Path:
    """A random-weight Qwen3 model written shard by shard, never whole in memory."""
    import torch
    from safetensors.torch import save_file

    from sglang_mixed_precision.tinymodels import tiny_config, write_tokenizer

    cfg = tiny_config("qwen3", num_layers=layers, hidden=hidden, vocab=8192, num_attention_heads=hidden // 128,
                      num_key_value_heads=max(1, hidden // 512), intermediate_size=3 * hidden)
    cfg.architectures = ["Qwen3ForCausalLM"]
    path.mkdir(parents=True)
    cfg.save_pretrained(str(path))
    write_tokenizer(path, 8192)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)

    weight_map = {}
    h, i, q, kv = hidden, 3 * hidden, cfg.num_attention_heads * 128, cfg.num_key_value_heads * 128
    shards = [{"model.embed_tokens.weight": rnd(8192, h), "lm_head.weight": rnd(8192, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}]
    for l in range(layers):
        p = f"model.layers.{l}."
        shards.append({p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                       p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                       p + "self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
                       p + "self_attn.k_norm.weight": torch.ones(128, dtype=torch.bfloat16),
                       p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h), p + "mlp.down_proj.weight": rnd(h, i),
                       p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for n, tensors in enumerate(shards, 1):
        f = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / f), metadata={"format": "pt"})
        weight_map.update({k: f for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from convert_throughput import cpu_name

    from sglang_mixed_precision.convert.model_dir import InputModel
    from sglang_mixed_precision.convert.plan import build_plan

    tmp = Path(tempfile.mkdtemp(prefix="convert_mem_"))
    try:
        model = write_model(tmp / "bf16", args.hidden, args.layers)
        src = InputModel(model)
        plan = build_plan(src, skip=[], group_size=128, fp8_block=(128, 128))
        unit_bytes = max(sum(src.tensors[n].nbytes for n in u.tensors) for u in plan.units)
        k_max = max(t.shape[1] for t in plan.quantized.values())
        largest = max(t.shape[0] * t.shape[1] for t in plan.quantized.values())

        rows = []
        for method in ("rtn", "gptq"):
            out = tmp / f"out_{method}"
            child_args = {"model_path": str(model), "output_dir": str(out), "formats": ["fp8", "int4"], "method": method,
                          "check": False, "progress": False, "nsamples": 4, "seqlen": 256, "max_shard_size": "1GB"}
            p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(child_args)], capture_output=True, text=True)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            m = json.loads(p.stdout.strip().splitlines()[-1])
            bound = m["baseline"] + bound_above_baseline(method, unit_bytes, largest, k_max)
            rows.append({"method": method, "baseline_mb": m["baseline"] / 2**20, "peak_mb": m["peak"] / 2**20,
                         "bound_mb": bound / 2**20, "within_bound": m["peak"] <= bound})
            print(rows[-1], flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model_mb = src.total_bytes / 2**20
    result = {"machine": cpu_name(), "model": f"qwen3 hidden={args.hidden} layers={args.layers} bf16",
              "model_mb": model_mb, "largest_unit_mb": unit_bytes / 2**20,
              "k_max": k_max,
              "largest_tensor_elements": largest,
              "bound": "rtn/fp8: baseline + 2 x largest unit + 48 B x largest tensor's elements; gptq: baseline + 4 x largest unit + 64 B x largest tensor's elements + 24 B x K_max^2", "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convert_memory.json").write_text(json.dumps(result, indent=2))
    md = [f"# Conversion peak memory on {result['machine']}", "",
          f"Model: {result['model']}, {model_mb:.0f} MiB of weights; largest unit {unit_bytes / 2**20:.0f} MiB. "
          f"Bound (see bound_above_baseline): fp8 + rtn: baseline (Python + torch + transformers) + 2 x largest unit "
          f"+ 48 B x the largest tensor's elements; gptq: baseline + 4 x largest unit + 64 B x the largest tensor's "
          f"elements + 24 B x K_max^2 (K_max = {k_max}: Hessians and their inverse Cholesky factor). "
          f"Peak RSS is VmHWM of the converting process. Neither depends on the number of layers.", "",
          "| int4 method (+ fp8) | baseline MiB | peak RSS MiB | bound MiB | model MiB | within bound |", "|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {r['bound_mb']:.0f} | {model_mb:.0f} | {r['within_bound']} |"
           for r in rows]
    (out / "convert_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
