"""`sglang-mp`: one command line for every tool of the project.

Each subcommand lives in ``commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; this module only dispatches, so the top-level scripts stay thin.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .core.errors import MixedPrecisionError

SUBCOMMANDS = {
    "plan": "Resolve and validate a mixed-precision config; print memory per precision / layer / TP rank",
    "analyze": "Classify a checkpoint's tensors and export a mapping YAML",
    "convert": "Make fp16/ fp8/ int4/ checkpoints (and a mixed config) from a 16-bit model",
    "launch": "Validate the plan, then start SGLang with the mix (flags pass through to SGLang)",
    "demo": "Generate a small model, convert it, plan a mix and serve or run it",
    "plandir": "Write a plan directory servable by plain `python -m sglang.launch_server`",
    "errors": "List every error code with its HTTP status and meaning",
    "eval": "Quality of a mix against the 16-bit model: KL divergence, top-1 agreement, perplexity",
    "sensitivity": "Measure the KL divergence each unit adds in each lower-precision source (cached, resumable)",
    "autoplan": "Choose the mix of least predicted KL divergence that fits a memory budget per rank",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglang-mp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=name)
        _command(name).add_arguments(p)
    return parser


def _command(name: str):
    return importlib.import_module(f"sglang_mixed_precision.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `launch` forwards unknown flags to SGLang untouched, so it parses its own argv.
    if argv[:1] == ["launch"]:
        return _command("launch").main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(_command(args._module).run(args) or 0)
    except MixedPrecisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
