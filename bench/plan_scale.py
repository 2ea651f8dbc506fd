#!/usr/bin/env python3
"""Plan + validate a Qwen3-235B-A22B-sized mix of three shape-only sources and time it.

Writes sparse checkpoints (BF16, FP8-block128, GPTQ-Int4-g128; valid headers, no data) under
--workdir, then times `load_config` + `build_plan` (cold: headers parsed; warm: header cache
hit) and the report, and writes bench/results/plan_scale_<machine>.{json,md}.

    python bench/plan_scale.py --workdir /tmp/plan_scale --machine cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from sglang_mixed_precision.core.config import load_config
from sglang_mixed_precision.core.formats import Scheme
from sglang_mixed_precision.core.plan import build_plan
from sglang_mixed_precision.core.report import format_tables, summary
from sglang_mixed_precision.testing.shapegen import write_shape_checkpoint

# Qwen3-235B-A22B's config.json (the dimensions planning depends on).
QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "torch_dtype": "bfloat16",
    "hidden_size": 4096,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
}
SCHEMES = {
    "bf16": None,
    "fp8": Scheme("fp8", dtype="BF16", fp8_block=(128, 128), fp8_strategy="block"),
    "int4": Scheme("gptq", dtype="F16", bits=4, group_size=128, sym=True, desc_act=False),
}
CONFIG = """\
mixed_precision:
  fp16_path: {root}/Qwen3-235B-A22B
  fp8_path: {root}/Qwen3-235B-A22B-FP8
  int4_path: {root}/Qwen3-235B-A22B-GPTQ-Int4
  default: fp8
  rules:
    - {{match: "model.layers.[0-3].self_attn.*", source: fp16}}
    - {{match: "model.layers.[10-93].mlp.experts.*", source: int4}}
  weight_mapping:
    model.layers.5.self_attn.qkv_proj: int4
"""
DIRS = {"bf16": "Qwen3-235B-A22B", "fp8": "Qwen3-235B-A22B-FP8", "int4": "Qwen3-235B-A22B-GPTQ-Int4"}


def generate(root: Path) -> None:
    for key, scheme in SCHEMES.items():
        out = root / DIRS[key]
        if (out / "model.safetensors.index.json").exists():
            print(f"reusing {out}", flush=True)
            continue
        t = time.perf_counter()
        write_shape_checkpoint(QWEN3_235B, out, scheme)
        print(f"generated {out} in {time.perf_counter() - t:.1f} s", flush=True)


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): CPU time shows the cost when other
    work shares the two cores."""
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - t, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/plan_scale")
    ap.add_argument("--machine", default="cpu", help="name for the results file")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs (cold: the header cache is cleared first)")
    ap.add_argument("--tp-size", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    root = Path(args.workdir)
    generate(root)
    cfg_path = root / "mix.yaml"
    cfg_path.write_text(CONFIG.format(root=root))

    import sglang_mixed_precision.core.sources as sources

    cold, warm, cold_cpu = [], [], []
    for i in range(args.repeats):
        sources._HEADER_CACHE.clear()
        plan, dt, cpu = timed(lambda: build_plan(load_config(cfg_path), tp_size=args.tp_size))
        cold.append(dt)
        cold_cpu.append(cpu)
        _, dt, _ = timed(lambda: build_plan(load_config(cfg_path), tp_size=args.tp_size))
        warm.append(dt)
        print(
            f"run {i + 1}: plan + validation cold {cold[-1]:.3f} s ({cpu:.3f} s CPU), warm {warm[-1]:.3f} s", flush=True
        )
    _, report_s, _ = timed(lambda: format_tables(plan))
    load = os.getloadavg()[0]
    s = summary(plan)
    disk = sum(f.stat().st_blocks * 512 for d in DIRS.values() for f in (root / d).iterdir())
    apparent = sum(f.stat().st_size for d in DIRS.values() for f in (root / d).iterdir())
    result = {
        "benchmark": "plan_scale",
        "machine": {
            "name": args.machine,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "model": "Qwen3-235B-A22B shapes (94 layers, hidden 4096, 128 experts, moe_intermediate 1536, 64 q / 4 kv heads)",
        "sources": {
            k: {
                "scheme": (v.label() if v else "bf16"),
                "tensors": len(plan.sources[{"bf16": "fp16"}.get(k, k)].tensor_names),
            }
            for k, v in SCHEMES.items()
        },
        "tp_size": args.tp_size,
        "modules": len(plan.modules),
        "groups": len(plan.groups),
        "plan_validate_cold_s": {"min": min(cold), "median": statistics.median(cold), "runs": cold},
        "plan_validate_cold_cpu_s": {"min": min(cold_cpu), "median": statistics.median(cold_cpu), "runs": cold_cpu},
        "load_average_1min": load,
        "plan_validate_warm_s": {"min": min(warm), "median": statistics.median(warm), "runs": warm},
        "report_s": report_s,
        "target_s": 2.0,
        "bytes_by_precision": {r["precision"]: r["bytes"] for r in s["by_precision"]},
        "per_rank_bytes": s["per_rank"][0]["bytes"],
        "checkpoint_apparent_bytes": apparent,
        "checkpoint_disk_bytes": disk,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"plan_scale_{args.machine}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"plan_scale_{args.machine}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    def gib(b):
        return f"{b / 2**30:.1f} GiB"

    rows = "\n".join(f"| {p} | {gib(b)} |" for p, b in r["bytes_by_precision"].items())
    return f"""# Plan + validation at Qwen3-235B-A22B scale ({r["machine"]["name"]})

Machine: {r["machine"]["cpus"]} CPU cores ({r["machine"]["processor"]}), Python {r["machine"]["python"]}; 1-minute load average {r["load_average_1min"]:.1f} at the end of the runs.
Model: {r["model"]}. Three shape-only sources ({", ".join(f"{k}: {v['tensors']} tensors" for k, v in r["sources"].items())}),
{gib(r["checkpoint_apparent_bytes"])} apparent, {r["checkpoint_disk_bytes"] / 2**20:.1f} MiB on disk (sparse).
Mix: layers 0-3 attention bf16, experts of layers 10-93 GPTQ-Int4, layer 5 qkv int4, everything else FP8-block128; tp_size {r["tp_size"]}.

| measure ({len(r["plan_validate_cold_s"]["runs"])} runs) | median s | min s |
|---|---|---|
| load_config + build_plan, cold (headers parsed), wall | {r["plan_validate_cold_s"]["median"]:.3f} | {r["plan_validate_cold_s"]["min"]:.3f} |
| same, CPU time of the planning process | {r["plan_validate_cold_cpu_s"]["median"]:.3f} | {r["plan_validate_cold_cpu_s"]["min"]:.3f} |
| load_config + build_plan, warm (header cache), wall | {r["plan_validate_warm_s"]["median"]:.3f} | {r["plan_validate_warm_s"]["min"]:.3f} |
| report tables, wall | {r["report_s"]:.3f} | |
| target | < {r["target_s"]} | |

Wall time counts whatever else shares the two cores (see the load average above); the CPU time
of the process is what planning itself costs.

{r["modules"]} modules in {r["groups"]} SGLang layers; {gib(r["per_rank_bytes"])} of weights per TP rank.

| precision | bytes |
|---|---|
{rows}
"""


if __name__ == "__main__":
    raise SystemExit(main())
