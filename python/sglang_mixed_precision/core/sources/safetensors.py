"""Read a safetensors header (json after an 8-byte little-endian length) without touching tensor data."""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

try:  # headers of a 235B checkpoint set are ~30 MB of JSON; orjson parses them faster when installed
    from orjson import loads as json_loads
except ImportError:
    json_loads = json.loads

from ..errors import ErrorCode, MixedPrecisionError
from ..formats import DTYPE_BYTES

# A header larger than this is not a real checkpoint's (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def corrupt_safetensors(path: Path, why: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.CORRUPT_SAFETENSORS,
        f"{path.name} is truncated or corrupt: {why}",
        where=str(path),
        fix="download or convert this file again (compare its size with the original's)",
    )


def read_header(path: Path) -> dict[str, dict]:
    """Tensor entries of a safetensors file ({name: {dtype, shape, data_offsets}}), checked
    against the file's size; raises ``corrupt_safetensors`` naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt_safetensors(path, f"file has {size} bytes, less than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise corrupt_safetensors(path, f"header length {n} exceeds the file size {size}")
        raw = f.read(n)
    try:
        header = json_loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt_safetensors(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt_safetensors(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_end = _check_entries(path, header)
    expected = 8 + n + data_end
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise corrupt_safetensors(path, f"{what}: header describes {expected} bytes, file has {size}")
    return header


def _check_entries(path: Path, header: dict) -> int:
    """Where the data section ends (the largest end offset). Each entry's own dtype x shape is
    checked against its byte range when a plan uses it (``entry_problem``)."""
    try:
        return max((meta["data_offsets"][1] for meta in header.values()), default=0)
    except (KeyError, TypeError, IndexError) as e:
        raise corrupt_safetensors(path, f"malformed header entry ({type(e).__name__}: {e})") from None


def entry_problem(name: str, meta: dict) -> str | None:
    """Why one header entry is malformed (None if its byte range fits its dtype x shape)."""
    try:
        start, stop = meta["data_offsets"]
        if start < 0 or prod(meta["shape"]) * DTYPE_BYTES[meta["dtype"]] != stop - start:
            return f"tensor {name}: {meta['dtype']}{meta['shape']} does not fit bytes [{start}, {stop})"
    except (KeyError, TypeError, ValueError) as e:
        return f"tensor {name}: malformed header entry ({type(e).__name__}: {e})"
    return None
