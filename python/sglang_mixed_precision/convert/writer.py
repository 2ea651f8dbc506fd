"""Streaming safetensors output: shards written tensor by tensor, an index, and resume state.

A shard's tensor bytes go to a body file as they arrive, so memory never holds more than the
tensor being written; closing the shard writes the safetensors header and appends the body.
Closed shards are recorded in ``.convert_state.json`` (file, size, tensor names); a rerun with the
same fingerprint verifies each recorded shard (present, of its size, a header that parses, the
recorded tensors) and skips the tensors of those that pass; a missing or damaged shard is dropped
and its tensors are written again, as is whatever was in flight. Every file is written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import torch

from ..core.errors import MixedPrecisionError
from ..core.sources.safetensors import read_header
from . import files

STATE_FILE = ".convert_state.json"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / bytes -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for unit, mult in (
        ("GIB", 2**30),
        ("MIB", 2**20),
        ("KIB", 2**10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
        ("B", 1),
    ):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def copy_body(body, out) -> None:
    """Append the body file to the shard inside the kernel (copy_file_range: no pass through user
    space; 512 MiB in 10 s instead of 19 s on a busy 2-core machine); a plain copy where the call is
    unavailable (another file system, an old kernel)."""
    out.flush()
    if hasattr(os, "copy_file_range"):
        try:
            while os.copy_file_range(body.fileno(), out.fileno(), 1 << 30):
                pass
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            body.seek(0)
    shutil.copyfileobj(body, out, 16 * 2**20)


class _OpenShard:
    """One shard being written: header entries in memory, data in a body file."""

    def __init__(self, path: Path):
        self.path = path
        self.body_path = path.with_name(path.name + ".body")
        self.body = open(self.body_path, "wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store {name} with dtype {t.dtype} in safetensors")
        data = tensor_bytes(t)
        self.body.write(data)
        n = data.nbytes
        self.entries[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.size, self.size + n],
        }
        self.size += n

    def close(self) -> None:
        self.body.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * ((-len(header)) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        tmp = files.tmp_path(self.path)
        try:
            with open(tmp, "wb") as out, open(self.body_path, "rb") as body:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                copy_body(body, out)
        except BaseException:
            tmp.unlink(missing_ok=True)  # give back the space a full disk needs before the rerun
            raise
        os.replace(tmp, self.path)
        self.body_path.unlink()

    def abort(self) -> None:
        self.body.close()
        self.body_path.unlink(missing_ok=True)


class ShardedWriter:
    """Writes one output model directory's tensors into size-bounded shards, resumably."""

    def __init__(self, out_dir: Path, max_shard_bytes: int, fingerprint: dict):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.fingerprint = fingerprint
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()
        self.done: set[str] = {n for s in self.state["shards"] for n in s["tensors"]}
        self._shard: _OpenShard | None = None
        self._clear_partials()

    # -- resume state -------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    def _load_state(self) -> dict:
        fresh = {"fingerprint": self.fingerprint, "shards": [], "complete": False}
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return fresh  # none yet, or torn: every shard is redone
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            return fresh
        try:
            return self._verified(state)
        except (KeyError, TypeError, AttributeError):
            return fresh  # a state file edited by hand or torn mid-entry: trust none of it

    def _verified(self, state: dict) -> dict:
        """Keep the recorded shards that are intact; drop the others (and the completion) so they are redone."""
        kept = [s for s in state.get("shards", []) if self._intact(s)]
        if len(kept) != len(state.get("shards", [])) or not self._index_matches(kept):
            state["complete"] = False
        state["shards"] = kept
        return state

    def _intact(self, shard: dict) -> bool:
        path = self.out_dir / shard["file"]
        why = shard_problem(path, shard)
        if why:
            print(f"convert: {self.out_dir.name}/{shard['file']}: {why}; writing its tensors again", file=sys.stderr)
        return not why

    def _index_matches(self, shards: list[dict]) -> bool:
        try:
            index = json.loads((self.out_dir / INDEX_FILE).read_text())
        except (OSError, ValueError):
            return False
        expected = {n: s["file"] for s in shards for n in s["tensors"]}
        return isinstance(index, dict) and index.get("weight_map") == expected

    def _save_state(self) -> None:
        files.write_text(self.state_path, json.dumps(self.state, indent=1))

    def _clear_partials(self) -> None:
        """Drop shards that were in flight when a previous run stopped, or that failed verification (unrecorded)."""
        recorded = {s["file"] for s in self.state["shards"]}
        for pattern in ("part-*.safetensors*", "model-*-of-*.safetensors", "*" + files.TMP_SUFFIX):
            for p in self.out_dir.glob(pattern):
                if p.name not in recorded and p.name != STATE_FILE:
                    p.unlink()

    def _next_index(self) -> int:
        """One past the highest number in a recorded shard's name (a dropped shard leaves a gap, not a clash)."""
        numbers = [int(m.group(1)) for s in self.state["shards"] if (m := re.search(r"-(\d+)", s["file"]))]
        return max(numbers, default=0) + 1

    @property
    def complete(self) -> bool:
        return bool(self.state.get("complete"))

    @property
    def resumed_shards(self) -> int:
        return len(self.state["shards"])

    def weight_map(self) -> dict[str, str]:
        """Tensor -> file of every closed shard."""
        return {n: s["file"] for s in self.state["shards"] for n in s["tensors"]}

    # -- writing ------------------------------------------------------------------------------
    def needs(self, name: str) -> bool:
        return name not in self.done

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.done:
            return
        if self._shard is None:
            idx = self._next_index()
            self._shard = _OpenShard(self.out_dir / f"part-{idx:05d}.safetensors")
        self._shard.add(name, t)
        self.done.add(name)
        if self._shard.size >= self.max_shard_bytes:
            self.close_shard()

    def close_shard(self) -> None:
        if self._shard is None:
            return
        shard = self._shard
        try:
            shard.close()
        except BaseException:
            self.abort()  # its body goes too: a full disk needs the space back before the rerun
            raise
        self._shard = None
        self.state["shards"].append(
            {
                "file": shard.path.name,
                "tensors": list(shard.entries),
                "bytes": shard.size,
                "file_bytes": shard.path.stat().st_size,
            }
        )
        self._save_state()

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self.done -= set(self._shard.entries)
            self._shard = None

    def finish(self) -> dict[str, str]:
        """Close the last shard, give shards their final names, write the index; return weight_map."""
        self.close_shard()
        shards = self.state["shards"]
        for i, s in enumerate(shards, 1):
            final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            if s["file"] != final:
                os.replace(self.out_dir / s["file"], self.out_dir / final)
                s["file"] = final
        weight_map = self.weight_map()
        index = {
            "metadata": {"total_size": sum(s["bytes"] for s in shards)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        files.write_text(self.out_dir / INDEX_FILE, json.dumps(index, indent=2))
        self.state["complete"] = True
        self._save_state()
        return weight_map


def shard_problem(path: Path, shard: dict) -> str | None:
    """Why a recorded shard cannot be trusted (None when it is as recorded)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if "file_bytes" in shard and size != shard["file_bytes"]:
        return f"{size} bytes, {shard['file_bytes']} recorded"
    try:
        names = set(read_header(path))
    except MixedPrecisionError as e:
        return e.detail
    if names != set(shard["tensors"]):
        return "holds other tensors than recorded"
    return None
