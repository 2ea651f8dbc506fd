#!/usr/bin/env python3
"""Thin wrapper: `python launch_mixed_precision_server.py ARGS` is `sglang-mp launch ARGS`."""

import sys

from sglang_mixed_precision.cli import main

if __name__ == "__main__":
    sys.exit(main(["launch", *sys.argv[1:]]))
