"""`sglang-mp autoplan --config C --budget-gib X --tp-size N [--kv-cache-gib K]`: the best mix for a budget.

Per unit the source that minimizes the predicted KLD (the sensitivity table's measured increases,
added up) while every rank's weights and KV reserve fit the budget: an exact optimizer (see
core/autoplan.py). Writes the mix as compact rules; prints the predicted KLD and the bytes per rank.
"""

from __future__ import annotations

from pathlib import Path

GIB = 1 << 30


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a YAML naming the sources (as given to `sensitivity`)")
    p.add_argument("--budget-gib", type=float, required=True, help="GPU memory per rank for weights + KV reserve")
    p.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=1)
    p.add_argument("--kv-cache-gib", type=float, default=0.0, help="KV cache reserve per rank")
    p.add_argument("--output", "-o", default=None, help="where the YAML goes (default: print it)")
    p.add_argument("--text", default=None, help="as given to `sensitivity`")
    p.add_argument("--tokens", type=int, default=512, help="as given to `sensitivity`")
    p.add_argument("--top-k", type=int, default=0, help="as given to `sensitivity`")
    p.add_argument("--backend", choices=("auto", "cpu", "sglang"), default="auto", help="whose table to use")
    p.add_argument("--cache-dir", default=None, help="as given to `sensitivity`")


def backend_name(kind: str) -> str:
    from ..quality.cpu import CpuBackend
    from .demo import gpu_ready

    if kind == "auto":
        kind = "cpu" if gpu_ready() else "sglang"
    return CpuBackend.name if kind == "cpu" else "sglang"


def check_args(args) -> None:
    from ..core.errors import ErrorCode, MixedPrecisionError

    if not args.budget_gib > 0 or args.kv_cache_gib < 0 or args.tp_size < 1:
        raise MixedPrecisionError(
            ErrorCode.BAD_ARGUMENT,
            f"--budget-gib {args.budget_gib}, --kv-cache-gib {args.kv_cache_gib}, --tp-size {args.tp_size}",
            fix="a positive budget, a KV reserve of 0 or more, a tensor-parallel size of 1 or more",
        )


def run(args) -> int:
    from ..core.autoplan import choose, fitted_interaction, interaction_factor, inventory, mix_yaml, unmeasured
    from ..core.config import load_config
    from ..core.errors import ErrorCode, MixedPrecisionError, more
    from ..quality.sensitivity import load_table

    check_args(args)
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and "predicted_kld_mean" not in out.read_text(errors="replace"):
        raise MixedPrecisionError(
            ErrorCode.OUTPUT_UNWRITABLE,
            f"{out} exists and was not written by autoplan",
            where=str(out),
            fix="choose another --output (an earlier autoplan YAML is replaced)",
        )
    table, table_path = load_table(
        args.config,
        text_path=args.text,
        tokens=args.tokens,
        k=args.top_k,
        backend_name=backend_name(args.backend),
        cache_dir=args.cache_dir,
    )
    config = load_config(args.config)
    inv = inventory(config, args.tp_size, table.kld())
    missing = unmeasured(inventory(config, args.tp_size), table.kld())
    if missing:
        raise MixedPrecisionError(
            ErrorCode.SENSITIVITY_MISSING,
            f"the sensitivity table lacks {len(missing)} unit/source pair(s): {more(missing)}",
            where=str(table_path),
            fix=f"run `sglang-mp sensitivity --config {args.config}` again: it resumes where it stopped",
        )
    beta = fitted_interaction(table.kld(), {label: s["kld_mean"] for label, s in table.uniform.items()})
    plan = choose(inv, int(args.budget_gib * GIB), int(args.kv_cache_gib * GIB), beta)
    factor = interaction_factor(plan.solution.moved, len(inv.units), beta)
    header = "\n".join(
        [
            f"written by sglang-mp autoplan --budget-gib {args.budget_gib} --tp-size {args.tp_size} "
            f"--kv-cache-gib {args.kv_cache_gib}",
            f"predicted_kld_mean: {plan.solution.kld:.8g}",
            f"sum of the units' KLDs {plan.solution.additive:.8g} x interaction factor {factor:.4f} "
            f"({plan.solution.moved} of {len(inv.units)} units moved, beta {beta:.4f})",
            f"weights per rank: {plan.rank_bytes} bytes ({plan.rank_bytes / GIB:.4f} GiB); "
            f"with KV reserve {(plan.rank_bytes + plan.kv_reserve_bytes) / GIB:.4f} GiB of {args.budget_gib} GiB",
            f"sensitivity table: {table_path}",
        ]
    )
    text = mix_yaml(config, plan.solution.picks, inv.baseline_label, header)
    counts = {label: len(units) for label, units in sorted(plan.by_label().items())}
    print(
        f"predicted KLD mean: {plan.solution.kld:.6f} nats (the units' measured increases summed, "
        f"{plan.solution.additive:.6f}, x {factor:.4f} for {plan.solution.moved} of {len(inv.units)} units moved; "
        f"beta {beta:.4f} fitted on the uniform mixes)"
    )
    print(
        f"per rank: weights {plan.rank_bytes / GIB:.4f} GiB + KV reserve {plan.kv_reserve_bytes / GIB:.4f} GiB "
        f"of {args.budget_gib} GiB (tp_size {args.tp_size})"
    )
    print("units per source: " + ", ".join(f"{label} {n}" for label, n in counts.items()))
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)
        print(f"wrote {out}; measure it with: sglang-mp eval --config {out}")
    return 0
