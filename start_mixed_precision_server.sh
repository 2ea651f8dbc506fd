#!/usr/bin/env bash
# Start SGLang with a mixed-precision config; takes the same flags as launch_mixed_precision_server.py.
# Without --enable-mixed-precision it behaves exactly like `python -m sglang.launch_server`.
set -euo pipefail
exec python3 "$(dirname "$0")/launch_mixed_precision_server.py" "$@"
