#!/usr/bin/env python3
"""Compile SGLang's JIT int4 kernels once on a GPU machine and pack the build cache.

SGLang 0.5.17 builds GPTQ-Marlin (linear), its repack and the Marlin MoE kernel with nvcc on first
use (minutes each). Compiling them in parallel processes up front, then packing TVM_FFI_CACHE_DIR,
lets later runs start with warm kernels.

Usage: python bench/gpu_warm_jit.py --out DIR [--dtypes bfloat16,float16] [--skip-moe]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

KERNELS = {
    "gptq_marlin": "from sglang.kernels.ops.quantization.gptq_marlin import _jit_gptq_marlin_module as f; f(torch.{dtype})",
    "gptq_marlin_repack": "from sglang.kernels.ops.quantization.gptq_marlin_repack import _jit_gptq_marlin_repack_module as f; f()",
    "moe_wna16_marlin": "from sglang.kernels.ops.moe.moe_wna16_marlin import _jit_moe_wna16_marlin_module as f; f(torch.{dtype}, False, False)",
}


def jobs(dtypes: list[str], skip_moe: bool) -> list[tuple[str, str]]:
    out = [("gptq_marlin_repack", KERNELS["gptq_marlin_repack"])]
    for dt in dtypes:
        out.append((f"gptq_marlin[{dt}]", KERNELS["gptq_marlin"].format(dtype=dt)))
        if not skip_moe:
            out.append((f"moe_wna16_marlin[{dt}]", KERNELS["moe_wna16_marlin"].format(dtype=dt)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--timeout", type=float, default=540)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ["TVM_FFI_CACHE_DIR"])
    procs = {}
    t0 = time.time()
    for name, code in jobs(args.dtypes.split(","), args.skip_moe):
        log = open(out / f"jit_{name.replace('[', '_').replace(']', '')}.log", "w")
        procs[name] = (
            subprocess.Popen([sys.executable, "-c", f"import torch; {code}"], stdout=log, stderr=subprocess.STDOUT),
            log,
        )
    results = {}
    for name, (p, log) in procs.items():
        try:
            rc = p.wait(timeout=max(1.0, args.timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        results[name] = {"rc": rc, "done_after_s": round(time.time() - t0, 1)}
        print(f"{name}: rc={rc} after {results[name]['done_after_s']} s", flush=True)
    with tarfile.open(out / "jit-cache.tar.xz", "w:xz") as tar:
        tar.add(cache, arcname=".")
    results["cache_archive_bytes"] = (out / "jit-cache.tar.xz").stat().st_size
    (out / "warm_jit.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0 if all(r["rc"] == 0 for k, r in results.items() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
