"""What the GPU scripts of bench/ share, off the GPU: gpu_common's stop on a machine without a GPU.
The benchmark's own bookkeeping is tested in test_bench_mix.py; the GPU proofs are pytest tests (test/gpu)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """A script of bench/ as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_scripts_stop_on_a_machine_without_a_gpu(monkeypatch):
    import torch

    common = load("gpu_common")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        common.environment(cpu_check=False)
    assert str(e.value) == (
        "no CUDA device: run this on the GPU machine (source bench/gpu_setup.sh first), or pass --cpu-check"
    )
    assert common.environment(cpu_check=True)["gpus"] == 0
