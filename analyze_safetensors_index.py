#!/usr/bin/env python3
"""Thin wrapper: `python analyze_safetensors_index.py ARGS` is `sglang-mp analyze ARGS`."""

import sys

from sglang_mixed_precision.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
