"""The converter returns freed tensor memory to the OS between units (convert/allocator.py)."""

from __future__ import annotations

import subprocess
import sys

from sglang_mixed_precision.convert import pipeline
from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert

# 40 blocks of 2 MiB freed while the last one stays in use: with glibc's dynamic threshold they
# came from the heap below a live block, which cannot shrink; pinned, each was its own mapping.
RETAINED = r"""
import sys, torch
from sglang_mixed_precision.convert.allocator import pin_mmap_threshold

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
x = torch.ones(4 << 20, dtype=torch.uint8)  # freeing a 4 MiB mapping raises the dynamic threshold past 2 MiB
del x
base = rss_mib()
blocks = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(40)]
last = blocks[-1]
del blocks
print(rss_mib() - base)
"""


def retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", RETAINED, mode], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def test_pinned_threshold_returns_freed_tensors_to_the_os():
    assert retained_mib("default") > 60  # the failure the pin exists for: ~80 MiB kept
    assert retained_mib("pin") < 16


def test_convert_says_when_the_allocator_cannot_be_pinned(tiny_qwen3, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "pin_mmap_threshold", lambda: False)
    convert(ConvertOptions(str(tiny_qwen3), str(tmp_path / "o"), formats=["fp8"], progress=False, check=False))
    captured = capsys.readouterr()
    assert "cannot be told to return freed tensors to the OS" in captured.out + captured.err
