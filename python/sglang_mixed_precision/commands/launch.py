"""`sglang-mp launch`: validate the plan, then start SGLang with the mix (other flags pass through).

``cli.main`` hands ``launch`` its raw argv (``main``): unknown flags must reach SGLang untouched,
which a subparser would reject. ``add_arguments`` serves the command listing.
"""

from __future__ import annotations

import argparse

from ..serving import launcher


def add_arguments(p: argparse.ArgumentParser) -> None:
    launcher.add_arguments(p)


def main(argv: list[str]) -> int:
    return launcher.main(argv)
