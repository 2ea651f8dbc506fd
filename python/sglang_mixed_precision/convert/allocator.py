"""Freed tensor memory goes back to the OS between units (glibc's malloc).

glibc serves a block from mmap only above its mmap threshold, and raises that threshold to the size
of every mmapped block that is freed (up to 32 MiB). After the first unit every tensor of a layer is
therefore carved from the heap, and the freed middle of the heap stays resident: the converter's
peak then depends on how the previous units happened to fragment it. Measured on a 24-layer
fp8 + gptq conversion (hidden 512): peak RSS 915 / 920 MiB in two runs, ~100 MiB still resident
between units; with the threshold pinned at 128 KiB: 843 / 844 MiB, back to the baseline after every
unit (bench/results/convert_memory.md has the bound it is checked against).

The price is a fresh mapping (page faults) per tensor between 128 KiB and 32 MiB; larger ones are
mapped by glibc either way. On bench/convert_throughput.py's model (hidden 1024, 1-6 MiB tensors),
runs on 2 cores (three without, four with the pin): fp8 0.61-0.79 -> 0.42-0.49 GB/s, rtn
0.20-0.23 -> 0.11-0.14 GB/s, gptq 0.009-0.011 -> 0.008 GB/s. A bounded, repeatable peak is worth more to a conversion that must
fit next to other work than the time.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns the dynamic threshold off
PINNED_THRESHOLD = 128 * 1024  # glibc's initial value


def pin_mmap_threshold(nbytes: int = PINNED_THRESHOLD) -> bool:
    """Fix malloc's mmap threshold at ``nbytes`` for the rest of the process. False where the C
    library has no glibc ``mallopt`` (musl, macOS): the allocator then keeps its own policy."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, nbytes) == 1)
