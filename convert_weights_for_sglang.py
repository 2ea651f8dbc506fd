#!/usr/bin/env python3
"""Thin wrapper: `python convert_weights_for_sglang.py ARGS` is `sglang-mp convert ARGS`."""

import sys

from sglang_mixed_precision.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
