"""`sglang-mp launch`: validate the plan, then start SGLang with the mix (other flags pass through).

``cli.main`` hands ``launch`` its raw argv (``main``): unknown flags must reach SGLang untouched,
which a subparser would reject. ``add_arguments`` / ``run`` serve the command listing.
"""

from __future__ import annotations

import argparse

from ..serving import launcher


def add_arguments(p: argparse.ArgumentParser) -> None:
    launcher.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    """The parsed form (no pass-through flags): rebuild the arguments the launcher would have got."""
    defaults = vars(launcher.build_parser().parse_args([]))
    argv = []
    for dest, value in vars(args).items():
        if dest not in defaults or value == defaults[dest]:
            continue
        flag = "--" + dest.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return launcher.main(argv)


def main(argv: list[str]) -> int:
    return launcher.main(argv)
