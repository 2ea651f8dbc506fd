#!/usr/bin/env python3
"""Parse large explicit per-tensor mappings and time it: wall, CPU and peak memory of `parse_config`.

Two YAML files are generated under --workdir: Qwen3-235B-A22B's explicit mapping (one
`weight_mapping` line per tensor of the BF16 release, as `sglang-mp analyze --explicit` writes it)
and a synthetic mapping of --mb megabytes (per-tensor GPTQ names over as many MoE layers as it
takes). Each is parsed in a fresh process (peak RSS is that process's), --repeats times. With
--compare-pythonpath the same is measured for another checkout of the package (e.g. the code
before libyaml was used), and the speed-up is reported.

    python bench/config_scale.py --workdir /tmp/config_scale --machine cpu \
        --compare-pythonpath /path/to/older/checkout/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "python"
sys.path.insert(0, str(HERE))

# One measurement, in a child process: (wall s, CPU s, peak RSS MiB, entries) as JSON on stdout.
_CHILD = """
import json, resource, sys, time
from sglang_mixed_precision.core.config import parse_config
text = open(sys.argv[1], encoding="utf-8").read()
t, c = time.perf_counter(), time.process_time()
cfg = parse_config(text, sys.argv[1])
wall, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps([wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, len(cfg.weight_mapping)]))
"""


def qwen3_235b_mapping(path: Path) -> int:
    """The explicit mapping `analyze --explicit` writes for Qwen3-235B-A22B (experts int4, attention fp8)."""
    from plan_scale import QWEN3_235B
    from sglang_mixed_precision.core.naming import Role, classify, module_name
    from sglang_mixed_precision.testing.shapegen import tensor_specs

    label = {Role.ROUTED_EXPERT: "int4", Role.ATTENTION: "fp8"}
    lines = ["mixed_precision:", "  fp16_path: /models/Qwen3-235B-A22B", "  fp8_path: /models/Qwen3-235B-A22B-FP8"]
    lines += ["  int4_path: /models/Qwen3-235B-A22B-GPTQ-Int4", "  weight_mapping:"]
    for name, _, _ in tensor_specs(QWEN3_235B):
        lines.append(f"    {name}: {label.get(classify(module_name(name)).role, 'fp16')}")
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 5


def synthetic_mapping(path: Path, megabytes: int) -> int:
    """Per-tensor GPTQ names (qweight, qzeros, scales, g_idx) of 128 experts per layer, until the
    file holds ``megabytes`` MiB."""
    target, size, n, layer = megabytes * 2**20, 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("mixed_precision:\n  fp16_path: /m/bf16\n  int4_path: /m/int4\n  weight_mapping:\n")
        while size < target:
            for e in range(128):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                        line = f"    model.layers.{layer}.mlp.experts.{e}.{proj}.{suffix}: int4\n"
                        f.write(line)
                        size += len(line)
                        n += 1
            layer += 1
    return n


def measure(pythonpath: Path, yaml_path: Path, repeats: int, timeout: int) -> dict:
    runs = []
    for _ in range(repeats):
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(yaml_path)], env=env, capture_output=True, text=True, timeout=timeout
        )
        if out.returncode != 0:
            raise SystemExit(f"parse failed with {pythonpath}:\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    walls, cpus, rss = ([r[i] for r in runs] for i in range(3))
    return {
        "wall_s": {"median": statistics.median(walls), "min": min(walls), "runs": walls},
        "cpu_s": {"median": statistics.median(cpus), "min": min(cpus), "runs": cpus},
        "peak_rss_mib": max(rss),
        "modules": runs[0][3],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/config_scale")
    ap.add_argument("--machine", default="cpu", help="name for the results file")
    ap.add_argument("--mb", type=int, default=50, help="size of the synthetic mapping (MiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-pythonpath", help="another checkout's python/ directory to measure as 'before'")
    ap.add_argument("--compare-label", help="what the comparison is, for the results (default: its path)")
    ap.add_argument("--compare-repeats", type=int, default=1, help="runs of the comparison (it may take minutes)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one parse may take")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.mb < 1 or args.repeats < 1 or args.compare_repeats < 1 or args.timeout < 1:
        ap.error("--mb, --repeats, --compare-repeats and --timeout must be at least 1")

    import yaml

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    files = {"qwen3_235b_explicit": work / "qwen3_235b_explicit.yaml", "synthetic": work / f"explicit_{args.mb}mb.yaml"}
    lines = {
        "qwen3_235b_explicit": qwen3_235b_mapping(files["qwen3_235b_explicit"]),
        "synthetic": synthetic_mapping(files["synthetic"], args.mb),
    }
    result = {
        "benchmark": "config_scale",
        "machine": {
            "name": args.machine,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "libyaml": bool(yaml.__with_libyaml__),
            "load_average_1min_start": os.getloadavg()[0],
        },
        "files": {},
    }
    for key, path in files.items():
        entry = {"lines": lines[key], "bytes": path.stat().st_size}
        print(f"{key}: {lines[key]} entries, {entry['bytes'] / 2**20:.1f} MiB; parsing", flush=True)
        entry["now"] = measure(PACKAGE, path, args.repeats, args.timeout)
        if args.compare_pythonpath:
            print(f"{key}: parsing with {args.compare_pythonpath}", flush=True)
            entry["before"] = measure(Path(args.compare_pythonpath), path, args.compare_repeats, args.timeout)
        result["files"][key] = entry
    result["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    result["compared"] = args.compare_label or args.compare_pythonpath
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"config_scale_{args.machine}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"config_scale_{args.machine}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    m, compared = r["machine"], r.get("compared")
    rows = []
    for key, f in r["files"].items():
        for when in ("before", "now"):
            if when in f:
                x = f[when]
                rows.append(
                    f"| {key} ({f['lines']} lines, {f['bytes'] / 2**20:.1f} MiB) | {when} | "
                    f"{x['cpu_s']['median']:.2f} | {x['wall_s']['median']:.2f} | {x['peak_rss_mib']:.0f} |"
                )
    speed = [
        f"- {key}: {f['before']['cpu_s']['median'] / f['now']['cpu_s']['median']:.1f}x less CPU, "
        f"{f['before']['peak_rss_mib'] / f['now']['peak_rss_mib']:.1f}x less peak memory"
        for key, f in r["files"].items()
        if "before" in f
    ]
    before = f"'before' is `parse_config` of {compared}." if compared else "No 'before' was measured."
    return f"""# Parsing large explicit mappings ({m["name"]})

Machine: {m["cpus"]} CPU cores ({m["processor"]}), Python {m["python"]}, libyaml {"yes" if m["libyaml"] else "no"};
1-minute load average {m["load_average_1min_start"]:.1f} at the start, {m["load_average_1min_end"]:.1f} at the end
(the cores are shared: CPU time is what parsing costs, wall time includes waiting). Each parse runs in a fresh
process; peak RSS includes the interpreter and the YAML text. {before}

| file | code | CPU s (median) | wall s (median) | peak RSS MiB |
|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(speed)}
"""


if __name__ == "__main__":
    raise SystemExit(main())
