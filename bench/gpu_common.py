"""What the GPU benchmarks share: a timestamped log and a description of the machine they ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_log(tag: str):
    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


def environment(cpu_check: bool) -> dict:
    """Card, GPU count and versions (for the results); off the GPU only with --cpu-check. On the GPU
    the package is installed first if SGLang's workers could not load its plugin."""
    import torch

    if cpu_check:
        return {
            "card": f"CPU check on {platform.processor() or platform.machine()} (no GPU)",
            "gpus": 0,
            "capability": "-",
            "torch": torch.__version__,
            "sglang": "-",
            "cuda": None,
            "jit_cache": None,
            "versions": f"torch {torch.__version__}",
        }
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on the GPU machine (source bench/gpu_setup.sh first), or pass --cpu-check")
    try:
        import sglang
    except ImportError:
        sys.exit("sglang is not importable: source bench/gpu_setup.sh (or pip install sglang==0.5.17)")
    if "mixed_precision" not in {ep.name for ep in entry_points(group="sglang.srt.plugins")}:
        # PYTHONPATH off: the SGLang bundle's `kernels` package breaks setuptools' metadata step.
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
            check=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
    version = getattr(sglang, "__version__", "?")
    return {
        "card": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "capability": "sm{}{}".format(*torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "sglang": version,
        "cuda": torch.version.cuda,
        "jit_cache": os.environ.get("TVM_FFI_CACHE_DIR"),
        "versions": f"torch {torch.__version__}, CUDA {torch.version.cuda}, sglang {version}",
    }
