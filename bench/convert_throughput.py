#!/usr/bin/env python3
"""Conversion throughput (GB/s of 16-bit input) for fp8 block, int4 RTN and int4 GPTQ on this CPU.

Generates a Qwen3-shaped random model, then times each output format on its own (reload check
off, so only quantize + write is measured). Writes bench/results/convert_throughput.{json,md}.

Usage: python bench/convert_throughput.py [--hidden 1024] [--layers 4] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    import torch

    from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
    from sglang_mixed_precision.testing.tinymodels import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="convert_tp_"))
    try:
        model = make_tiny_model("qwen3", tmp / "bf16", num_layers=args.layers, hidden=args.hidden, vocab=4096)
        cases = [("fp8 block", "fp8", "rtn"), ("int4 rtn", "int4", "rtn"), ("int4 gptq", "int4", "gptq")]
        rows = []
        for label, fmt, method in cases:
            times = []
            for rep in range(args.repeats):  # the first run also pays imports and page cache warm-up
                out = tmp / f"{label.replace(' ', '_')}_{rep}"
                opts = ConvertOptions(
                    str(model),
                    str(out),
                    formats=(fmt,),
                    method=method,
                    check=False,
                    progress=False,
                    nsamples=args.nsamples,
                    seqlen=args.seqlen,
                )
                t0 = time.perf_counter()
                report = convert(opts)
                times.append(time.perf_counter() - t0)
                shutil.rmtree(out)
            dt = min(times)
            rows.append(
                {
                    "case": label,
                    "seconds": round(dt, 2),
                    "runs_s": [round(t, 2) for t in times],
                    "input_gb": report.input_bytes / 1e9,
                    "gb_per_s": report.input_bytes / 1e9 / dt,
                    **({"calibration_tokens": args.nsamples * args.seqlen} if method == "gptq" else {}),
                }
            )
            print(f"{label}: best {dt:.2f}s of {len(times)}, {rows[-1]['gb_per_s']:.3f} GB/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    machine = cpu_name()
    result = {
        "machine": machine,
        "torch_threads": torch.get_num_threads(),
        "model": f"qwen3 hidden={args.hidden} layers={args.layers} (bf16, random weights)",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convert_throughput.json").write_text(json.dumps(result, indent=2))
    md = [
        f"# Conversion throughput on {machine}",
        "",
        f"Model: {result['model']}, "
        f"{rows[0]['input_gb'] * 1e3:.0f} MB of 16-bit input; each format converted on its own, "
        f"reload check off; best of {args.repeats} runs.",
        "",
        "| case | seconds | GB/s of input |",
        "|---|---|---|",
    ]
    md += [
        f"| {r['case']}{' (' + str(r['calibration_tokens']) + ' calibration tokens)' if 'calibration_tokens' in r else ''} "
        f"| {r['seconds']} | {r['gb_per_s']:.3f} |"
        for r in rows
    ]
    (out / "convert_throughput.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
