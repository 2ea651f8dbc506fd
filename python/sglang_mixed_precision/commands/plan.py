"""`sglang-mp plan --config C [--tp-size N] [--json]`: resolve and validate a mix before launch."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument(
        "--config", required=True, help="mixed-precision YAML (mixed_precision: sources, rules, weight_mapping)"
    )
    parser.add_argument(
        "--tp-size", "--tp", dest="tp_size", type=int, default=1, help="tensor-parallel size to validate for"
    )
    parser.add_argument("--json", action="store_true", help="print the plan (assignments, tables) as JSON")


def run(args) -> int:
    from ..core.config import load_config
    from ..core.plan import build_plan
    from ..core.report import format_tables

    plan = build_plan(load_config(args.config), tp_size=args.tp_size)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(format_tables(plan))
    return 0
