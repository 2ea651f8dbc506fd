"""What a plan costs: modules, parameters and bytes by precision, by layer and per TP rank.

Per-rank bytes follow SGLang's sharding: column/row-parallel linears, experts, embeddings and
lm_head are split over the ranks, k/v are replicated once ``tp > num_key_value_heads``, norms
and routers are replicated (see ``ModelGeometry.rank_fraction``).
"""

from __future__ import annotations

from collections import defaultdict

NON_LAYER = "other"  # embeddings, final norm, lm_head


def summary(plan) -> dict:
    """Machine-readable tables (what ``sglang-mp plan --json`` prints under "summary")."""
    by_precision: dict[str, dict[str, int]] = defaultdict(lambda: {"modules": 0, "parameters": 0, "bytes": 0})
    by_layer: dict[object, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_source: dict[str, dict[str, int]] = defaultdict(lambda: {"modules": 0, "bytes": 0})
    rank_bytes: dict[str, float] = defaultdict(float)
    geometry, tp = plan.geometry, plan.tp_size
    for a in plan.modules.values():
        precision, nbytes = a.scheme.label(), a.nbytes
        row = by_precision[precision]
        row["modules"] += 1
        row["parameters"] += a.params
        row["bytes"] += nbytes
        by_layer[a.ref.layer if a.ref.layer is not None else NON_LAYER][precision] += nbytes
        by_source[a.label]["modules"] += 1
        by_source[a.label]["bytes"] += nbytes
        rank_bytes[precision] += nbytes * geometry.rank_fraction(a.ref, tp)
    layers = sorted((k for k in by_layer if k != NON_LAYER), key=int) + ([NON_LAYER] if NON_LAYER in by_layer else [])
    per_rank = {p: int(round(b)) for p, b in rank_bytes.items()}
    return {
        "total": {
            "modules": len(plan.modules),
            "parameters": sum(r["parameters"] for r in by_precision.values()),
            "bytes": sum(r["bytes"] for r in by_precision.values()),
        },
        "by_precision": [
            {"precision": p, **r} for p, r in sorted(by_precision.items(), key=lambda kv: -kv[1]["bytes"])
        ],
        "by_source": [{"label": label, **r} for label, r in by_source.items()],
        "by_layer": [
            {"layer": layer, "bytes": dict(by_layer[layer]), "total": sum(by_layer[layer].values())} for layer in layers
        ],
        "per_rank": [{"rank": r, "bytes": sum(per_rank.values()), "by_precision": per_rank} for r in range(tp)],
    }


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def fmt(row):
        return "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def format_tables(plan) -> str:
    s = summary(plan)
    precisions = [r["precision"] for r in s["by_precision"]]
    lines = [
        f"Plan: {s['total']['modules']} modules, {s['total']['parameters']:,} parameters, "
        f"{human_bytes(s['total']['bytes'])} of weights; skeleton {plan.skeleton_label!r} ({plan.skeleton_path}); tp_size {plan.tp_size}",
        "",
        "Sources:",
        _table(
            ["label", "scheme", "modules", "bytes", "path"],
            [
                [
                    r["label"],
                    plan.sources[r["label"]].scheme.label(),
                    r["modules"],
                    human_bytes(r["bytes"]),
                    plan.sources[r["label"]].path,
                ]
                for r in s["by_source"]
            ],
        ),
        "",
        "By precision:",
        _table(
            ["precision", "modules", "parameters", "bytes"],
            [
                [r["precision"], r["modules"], f"{r['parameters']:,}", human_bytes(r["bytes"])]
                for r in s["by_precision"]
            ],
        ),
        "",
        "By layer:",
        _table(
            ["layer", *precisions, "total"],
            [
                [
                    r["layer"],
                    *(human_bytes(r["bytes"].get(p, 0)) if r["bytes"].get(p) else "-" for p in precisions),
                    human_bytes(r["total"]),
                ]
                for r in s["by_layer"]
            ],
        ),
        "",
        f"Per TP rank (tp_size {plan.tp_size}; weights only, no KV cache or activations):",
        _table(
            ["rank", *precisions, "total"],
            [
                [r["rank"], *(human_bytes(r["by_precision"].get(p, 0)) for p in precisions), human_bytes(r["bytes"])]
                for r in s["per_rank"]
            ],
        ),
    ]
    if plan.warnings:
        lines += ["", "Warnings:", *(f"  - {w}" for w in plan.warnings)]
    return "\n".join(lines)
