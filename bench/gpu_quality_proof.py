"""GPU proof of eval, sensitivity and autoplan on the small trained model, through SGLang servers.

    source bench/gpu_setup.sh && python bench/gpu_quality_proof.py --out $OUT
    python bench/gpu_quality_proof.py --cpu-check --out /tmp/quality-cpu     # the same steps on CPU

1. convert the shipped small Qwen3-MoE (data/small_model) with the project's converter: fp16/,
   fp8/ (block 128) and int4/ (GPTQ, calibrated on held-out standard library text);
2. sensitivity: every unit (attention and routed experts of each of the 4 layers) moved alone to
   fp8 and to int4, and the uniform fp8 and int4 mixes, scored against the 16-bit model on the
   held-out text (whole-vocabulary KLD: k = 1024) -- one SGLang server per mix, started side by
   side (a scheme change cannot reload in place);
3. autoplan at three budgets between the lightest and the heaviest mix; each chosen mix served and
   measured with eval;
4. checks: fp8 KLD < int4 KLD; measured KLD falls as the budget grows; predicted within 25% of
   measured; and (GPU only) the served uniform mixes' KLD against the reference path's.

Writes ``gpu_quality_proof.json`` and ``gpu_quality_proof.md`` (the card named) and the server
logs (``logs/``) under --out. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import environment, make_log

GIB = 1 << 30
BUDGET_FRACTIONS = (0.1, 0.4, 0.7)  # of the way from the lightest mix to the all-16-bit one
PREDICTION_TOLERANCE = 0.25


def budgets(inv) -> list[int]:
    """Three budgets per rank strictly between the lightest mix and the all-16-bit one."""
    light = inv.fixed_bytes + sum(min(c.bytes for c in u.choices) for u in inv.units)
    heavy = inv.fixed_bytes + sum(max(c.bytes for c in u.choices) for u in inv.units)
    return [int(light + f * (heavy - light)) for f in BUDGET_FRACTIONS]


def write_autoplan_mixes(config_path: Path, inv, out_dir: Path, beta: float) -> list[dict]:
    from sglang_mixed_precision.core.autoplan import choose, mix_yaml
    from sglang_mixed_precision.core.config import load_config

    config = load_config(config_path)
    mixes = []
    for budget in budgets(inv):
        plan = choose(inv, budget, 0, beta)
        path = out_dir / f"autoplan-{budget}.yaml"
        header = f"autoplan at {budget} bytes per rank\npredicted_kld_mean: {plan.solution.kld:.8g}"
        path.write_text(mix_yaml(config, plan.solution.picks, inv.baseline_label, header))
        mixes.append(
            {
                "config": path,
                "budget_bytes": budget,
                "rank_bytes": plan.rank_bytes,
                "predicted_kld_mean": plan.solution.kld,
                "predicted_additive": plan.solution.additive,
                "units": {label: len(v) for label, v in sorted(plan.by_label().items())},
                "picks": {u: c.label for u, c in plan.solution.picks.items()},
            }
        )
    return mixes


def keep_only(backend, plan) -> None:
    """Stop every server but the one serving ``plan``'s tensors (GPU memory back for the next mixes)."""
    from sglang_mixed_precision.core.reload_plan import diff_plans

    for server in list(getattr(backend, "servers", [])):
        diff = diff_plans(server.plan, plan)
        if diff.reload or diff.rebuild:
            backend.stop(server)


def checks(result: dict) -> list[dict]:
    out = []
    u = result["uniform"]
    out.append(
        {
            "check": "fp8 KLD < int4 KLD (every unit)",
            "ok": u["fp8"]["kld_mean"] < u["int4"]["kld_mean"],
            "detail": f"fp8 {u['fp8']['kld_mean']:.6f} < int4 {u['int4']['kld_mean']:.6f}",
        }
    )
    measured = [m["measured"]["kld_mean"] for m in result["autoplan"]]
    out.append(
        {
            "check": "measured KLD falls as the budget grows",
            "ok": all(a > b for a, b in zip(measured, measured[1:])),
            "detail": " > ".join(f"{x:.6f}" for x in measured),
        }
    )
    for m in result["autoplan"]:
        pred, meas = m["predicted_kld_mean"], m["measured"]["kld_mean"]
        err = (pred - meas) / meas if meas > 0 else (0.0 if pred == 0 else float("inf"))
        out.append(
            {
                "check": f"predicted within {PREDICTION_TOLERANCE:.0%} of measured at {m['budget_bytes']} bytes",
                "ok": abs(err) <= PREDICTION_TOLERANCE,
                "detail": f"predicted {pred:.6f}, measured {meas:.6f} ({err:+.1%})",
            }
        )
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Quality proof: eval, sensitivity, autoplan ({env['card']})",
        "",
        f"Model: the shipped small Qwen3-MoE (4 layers, 4 experts); text: {result['tokens']} tokens of held-out "
        f"standard library source; KLD over {result['kld_kind']}; backend: {result['backend']}; "
        f"{result['seconds']:.0f} s in all. {env['versions']}.",
        "",
        "## Checks",
        "",
        "| check | result | |",
        "|---|---|---|",
    ]
    lines += [f"| {c['check']} | {'pass' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in result["checks"]]
    lines += [
        "",
        "## Uniform mixes",
        "",
        "| mix | KLD mean | KLD p99 | top-1 | ppl mix | ppl 16-bit |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in result["uniform"].items():
        lines.append(
            f"| every unit {label} | {s['kld_mean']:.6f} | {s['kld_p99']:.6f} | {100 * s['top1_agreement']:.2f} % "
            f"| {s['ppl_mix']:.3f} | {s['ppl_baseline']:.3f} |"
        )
    labels = sorted({label for by in result["sensitivity"].values() for label in by})
    lines += ["", "## Sensitivity (mean KLD increase, nats)", "", "| unit | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---|" * len(labels))
    for unit, by in result["sensitivity"].items():
        lines.append(f"| {unit} | " + " | ".join(f"{by[label]['kld_mean']:.6f}" for label in labels) + " |")
    lines += [
        "",
        "## Autoplan",
        "",
        f"Predicted: the units' KLDs summed, x (1 - beta (m - 1) / (N - 1)) for m of N units moved, beta "
        f"{result['interaction_beta']:.4f} fitted on the uniform mixes (core/autoplan.py).",
        "",
        "| budget per rank (bytes) | weights per rank | units per source | sum of units | predicted KLD | measured KLD | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in result["autoplan"]:
        units = ", ".join(f"{k} {v}" for k, v in m["units"].items())
        lines.append(
            f"| {m['budget_bytes']} | {m['rank_bytes']} | {units} | {m['predicted_additive']:.6f} | {m['predicted_kld_mean']:.6f} "
            f"| {m['measured']['kld_mean']:.6f} | {100 * m['measured']['top1_agreement']:.2f} % |"
        )
    if result.get("reference"):
        lines += [
            "",
            "## Served vs reference path (uniform mixes)",
            "",
            "| mix | served KLD | reference KLD |",
            "|---|---|---|",
        ]
        for label, r in result["reference"].items():
            lines.append(f"| every unit {label} | {r['served']:.6f} | {r['reference']:.6f} |")
    if result.get("servers"):
        starts = [e for e in result["servers"] if e["kind"] == "start"]
        reloads = [e for e in result["servers"] if e["kind"] == "reload"]
        lines += ["", f"Servers started: {len(starts)}; in-place reloads: {len(reloads)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/results/quality_proof")
    p.add_argument("--cpu-check", action="store_true", help="run every step on CPU through the reference path")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--parallel", type=int, default=8, help="servers starting at once")
    p.add_argument("--workdir", default=None, help="conversions and plan directories (default: a temp dir)")
    args = p.parse_args(argv)

    from sglang_mixed_precision.core.autoplan import fitted_interaction, inventory
    from sglang_mixed_precision.core.config import load_config
    from sglang_mixed_precision.core.plan import build_plan
    from sglang_mixed_precision.quality.cpu import CpuBackend
    from sglang_mixed_precision.quality.evaluate import evaluate
    from sglang_mixed_precision.quality.sensitivity import run_sensitivity
    from sglang_mixed_precision.testing.small_model import convert_small_model, uniform_config

    log = make_log("quality")
    started = time.time()
    env = environment(args.cpu_check)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sglang-mp-quality-"))
    log(f"converting the small model (GPTQ) into {work / 'converted'}")
    converted = convert_small_model(work / "converted", method="gptq")
    sources = uniform_config(converted, "fp16", "sources.yaml")
    if args.cpu_check:
        backend = CpuBackend()
    else:
        from sglang_mixed_precision.quality.server import ServerBackend

        backend = ServerBackend(work / "servers", parallel=args.parallel, log=log)
    result: dict = {"environment": env, "tokens": args.tokens, "backend": backend.name}
    try:
        log("sensitivity")
        table, _ = run_sensitivity(sources, backend, tokens=args.tokens, cache_dir=work / "sensitivity", log=log)
        result["sensitivity"], result["uniform"] = table.units, table.uniform
        inv = inventory(load_config(sources), 1, table.kld())
        beta = fitted_interaction(table.kld(), {label: s["kld_mean"] for label, s in table.uniform.items()})
        result["interaction_beta"] = beta
        mixes = write_autoplan_mixes(sources, inv, work, beta)
        baseline_plan = build_plan(load_config(work / "sensitivity" / table.key / f"all--{table.baseline}.yaml"))
        keep_only(backend, baseline_plan)
        if hasattr(backend, "prefetch"):
            backend.prefetch([build_plan(load_config(m["config"])) for m in mixes])
        for m in mixes:
            log(f"eval of the autoplan mix at {m['budget_bytes']} bytes (predicted {m['predicted_kld_mean']:.6f})")
            r = evaluate(m["config"], backend, tokens=args.tokens, workdir=work / "eval")
            m["measured"] = r.comparison.summary()
            m["config"] = str(m["config"])
            m["yaml"] = Path(m["config"]).read_text()
        result["autoplan"] = mixes
        result["kld_kind"] = mixes[0]["measured"]["kld_kind"]
        result["servers"] = getattr(backend, "events", [])
    finally:
        backend.close()
        if not args.cpu_check:
            logs = out / "logs"
            logs.mkdir(exist_ok=True)
            for f in (work / "servers").glob("server-*.log"):
                shutil.copy(f, logs / f.name)
    if not args.cpu_check:
        log("the uniform mixes through the reference path (CPU, fp32), against the served numbers")
        ref = CpuBackend()
        result["reference"] = {}
        for label in ("fp8", "int4"):
            r = evaluate(uniform_config(converted, label), ref, tokens=args.tokens, workdir=work / "eval-ref")
            result["reference"][label] = {
                "served": result["uniform"][label]["kld_mean"],
                "reference": r.comparison.kld_mean,
            }
    result["checks"] = checks(result)
    result["seconds"] = round(time.time() - started, 1)
    (out / "gpu_quality_proof.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_quality_proof.md").write_text(markdown(result))
    print(markdown(result))
    failed = [c for c in result["checks"] if not c["ok"]]
    log(
        f"{len(result['checks']) - len(failed)}/{len(result['checks'])} checks passed in {result['seconds']:.0f}s -> {out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
