"""`sglang-mp plandir`: write a plan directory that plain SGLang serves as the mix.

sglang-mp plandir --config mix.yaml --output /models/mix
python -m sglang.launch_server --model-path /models/mix          # or sglang.Engine(model_path=...)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..serving.settings import DEFAULT_INT4_MOE_KERNEL, INT4_MOE_KERNELS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the mixed-precision YAML")
    p.add_argument("--output", required=True, help="directory to write (config.json, tokenizer, plan; no weights)")
    p.add_argument(
        "--tp-size", type=int, default=1, help="tensor-parallel size to validate for (SGLang re-plans for its own)"
    )
    p.add_argument("--model-path", help="the mix's 16-bit source, if the config does not say which source is the model")
    p.add_argument(
        "--int4-moe-kernel",
        choices=INT4_MOE_KERNELS,
        default=DEFAULT_INT4_MOE_KERNEL,
        help="int4 experts: Triton WNA16 (default; runs in bf16 models) or GPTQ-Marlin MoE (fp16 models only)",
    )
    p.add_argument("--quiet", action="store_true", help="do not print the plan's tables")


def run(args: argparse.Namespace) -> int:
    from ..core.report import format_tables
    from ..serving.launcher import skeleton_label
    from ..serving.plandir import make_plan_dir

    config = Path(args.config).expanduser().resolve()
    skeleton = skeleton_label(config, Path(args.model_path)) if args.model_path else None
    plan, path = make_plan_dir(
        config, args.output, tp_size=args.tp_size, skeleton=skeleton, int4_moe_kernel=args.int4_moe_kernel
    )
    if not args.quiet:
        print(format_tables(plan))
    print(f"wrote plan directory {path}\nserve it with: python -m sglang.launch_server --model-path {path}")
    return 0
