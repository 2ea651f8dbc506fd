"""`sglang-mp analyze --model_path M [--export_config out.yaml] [--attention_precision ...] ...`:
classify a checkpoint's tensors, print counts and bytes per role, export a mapping YAML."""

from __future__ import annotations

import json

from ..analyzer import PRECISIONS


def add_arguments(parser) -> None:
    parser.add_argument("--model_path", "--model-path", required=True, help="16-bit checkpoint directory")
    parser.add_argument("--export_config", "--export-config", help="write a mixed-precision YAML here")
    for role, default in (("attention", "fp16"), ("mlp", "fp16"), ("expert", "fp16"), ("shared_expert", None)):
        parser.add_argument(
            f"--{role}_precision",
            f"--{role.replace('_', '-')}-precision",
            choices=PRECISIONS,
            default=default,
            help=f"precision of {role.replace('_', ' ')} linears"
            + (" (default: --mlp_precision)" if default is None else ""),
        )
    parser.add_argument("--fp8_path", "--fp8-path", help="FP8 checkpoint path to export (default: <model_path>-FP8)")
    parser.add_argument(
        "--int4_path", "--int4-path", help="GPTQ-Int4 checkpoint path to export (default: <model_path>-GPTQ-Int4)"
    )
    parser.add_argument(
        "--explicit", action="store_true", help="export one weight_mapping line per tensor instead of rules"
    )
    parser.add_argument("--plot", help="write a PNG of bytes per layer stacked by precision (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print the role table as JSON")


def run(args) -> int:
    from ..analyzer import analyze, choose_precisions, export_config, plot_bytes_per_layer, role_table
    from ..core.report import human_bytes

    analysis = analyze(args.model_path)
    choice = choose_precisions(
        analysis,
        attention=args.attention_precision,
        mlp=args.mlp_precision,
        expert=args.expert_precision,
        shared_expert=args.shared_expert_precision,
    )
    rows = role_table(analysis, choice)
    if args.json:
        print(json.dumps({"model_path": str(analysis.model_path), "roles": rows}, indent=1))
    else:
        print(f"{analysis.model_path}: {len(analysis.tensor_names)} tensors, {len(analysis.refs)} modules")
        header = (
            f"{'role':<14}{'modules':>9}{'tensors':>9}{'parameters':>16}{'bytes':>12}  {'precision':<10}{'planned':>12}"
        )
        print(header + "\n" + "-" * len(header))
        for r in rows:
            print(
                f"{r['role']:<14}{r['modules']:>9}{r['tensors']:>9}{r['parameters']:>16,}{human_bytes(r['bytes']):>12}  "
                f"{r['precision']:<10}{human_bytes(r['planned_bytes']):>12}"
            )
        total, planned = sum(r["bytes"] for r in rows), sum(r["planned_bytes"] for r in rows)
        print(f"total: {human_bytes(total)} as stored, {human_bytes(planned)} with the chosen precisions")
    if args.export_config:
        text = export_config(analysis, choice, fp8_path=args.fp8_path, int4_path=args.int4_path, explicit=args.explicit)
        with open(args.export_config, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.export_config}")
    if args.plot:
        print(f"wrote {plot_bytes_per_layer(analysis, choice, args.plot)}")
    return 0
