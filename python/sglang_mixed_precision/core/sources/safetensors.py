"""Read a safetensors header (JSON after an 8-byte little-endian length) without touching tensor data,
accepting exactly the files ``safe_open(..., framework="pt")`` and its ``get_tensor`` accept.

The rules mirror safetensors 0.8's reader (``SafeTensors::read_metadata`` and ``Metadata::validate``
in ``safetensors/src/tensor.rs``; the JSON is read by serde_json) and its torch binding:

- the file holds at least the 8-byte length; the length is at most 100,000,000 and fits the file;
- the header is UTF-8 JSON (no NaN / Infinity, no lone ``\\uD800`` surrogates, numbers within a
  double's range, at most 127 nested containers), an object whose ``__metadata__`` (at most once)
  is null or an object of strings, and whose every other value is a tensor: ``dtype`` (one of
  :data:`DTYPE_BITS`), ``shape`` (unsigned 64-bit integers) and ``data_offsets`` (two of them),
  each key at most once, other keys ignored (serde also takes ``[dtype, shape, data_offsets]``);
- sorted by offsets, the tensors tile the data section from byte 0 without gap or overlap, each
  spanning exactly its dtype x shape (a whole number of bytes, no 64-bit overflow);
- the data section ends where the file ends;
- torch has a dtype for it (not F6) and F4's last dimension is even (stored as pairs).
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

try:  # headers of a 235B checkpoint set are ~30 MB of JSON; orjson parses them faster when installed
    from orjson import JSONDecodeError as _OrjsonError
    from orjson import loads as _orjson_loads
except ImportError:
    _orjson_loads = None

from ..errors import ErrorCode, MixedPrecisionError
from ..files import unreadable
from ..formats import DTYPE_BYTES

json_loads = _orjson_loads or json.loads  # for side files (index) whose dialect does not matter

MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
U64_MAX = 2**64 - 1
MAX_JSON_DEPTH = 127  # serde_json's recursion limit as safetensors meets it
METADATA_KEY = "__metadata__"
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")
# safetensors' Dtype::bitsize (every dtype it knows)
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
NO_TORCH_DTYPE = ("F6_E2M3", "F6_E3M2")  # safe_open(framework="pt") raises "Dtype not understood"


class _Rejected(ValueError):
    """Why safetensors refuses a header (turned into ``corrupt_safetensors`` naming the file)."""


def corrupt_safetensors(path: Path, why: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.CORRUPT_SAFETENSORS,
        f"{path.name} is truncated or corrupt: {why}",
        where=str(path),
        fix="download or convert this file again (compare its size with the original's)",
    )


def read_header(path: Path) -> dict[str, dict]:
    """Tensor entries of a safetensors file ({name: {dtype, shape, data_offsets}}), validated as
    safetensors validates them; raises ``corrupt_safetensors`` (or ``unreadable_file``) naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt_safetensors(path, f"file has {size} bytes, less than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise corrupt_safetensors(
                    path, f"header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes"
                )
            if 8 + n > size:
                raise corrupt_safetensors(path, f"header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise unreadable(path, e) from None
    try:
        entries, spans = _entries_and_spans(raw)
        data_end = _check_layout(entries, spans)
    except _Rejected as e:
        raise corrupt_safetensors(path, str(e)) from None
    expected = 8 + n + data_end
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise corrupt_safetensors(path, f"{what}: header describes {expected} bytes, file has {size}")
    return entries


# ---- JSON as serde_json reads it -----------------------------------------------------------------
def _parse_json(raw: bytes):
    # orjson agrees with serde_json on everything but "-0" (an integer for orjson, a float for serde),
    # \u escapes (which may spell a key twice) and duplicate keys; those headers take the strict path.
    if _orjson_loads is not None and b"-0" not in raw and b"\\u" not in raw:
        try:
            value = _orjson_loads(raw)
        except _OrjsonError:
            value = None  # the strict parser says why
        else:
            if _keys_unique(raw, value):
                return value
    return _strict_loads(raw)


def _keys_unique(raw: bytes, value) -> bool:
    """True when no tensor repeats a field and ``__metadata__`` appears at most once: each such key
    is written once per object, so counting its quoted spelling in the raw bytes proves it."""
    if not isinstance(value, dict):
        return True
    if raw.count(b'"' + METADATA_KEY.encode() + b'"') > (METADATA_KEY in value):
        return False
    n = len(value) - (METADATA_KEY in value)
    return all(raw.count(f'"{k}"'.encode()) <= n for k in TENSOR_FIELDS)


class _Duplicates(dict):
    """A JSON object that repeated keys (serde refuses repeats of the fields it knows)."""

    repeated: frozenset = frozenset()


def _object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen, repeated = set(), set()
        for key, _ in pairs:
            (repeated if key in seen else seen).add(key)
        obj = _Duplicates(obj)
        obj.repeated = frozenset(repeated)
    return obj


def _int(text: str):
    if text == "-0":
        return -0.0  # serde_json reads -0 as a float
    value = int(text)
    if -(2**63) <= value <= U64_MAX:
        return value
    return _float(text)  # beyond 64 bits serde_json falls back to a double


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _constant(text: str):
    raise ValueError(f"{text} is not a JSON value")


def _strict_loads(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Rejected(f"header is not valid UTF-8 ({e})") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_object, parse_int=_int, parse_float=_float, parse_constant=_constant
        )
        if "\\u" in text:  # a lone surrogate escape decodes in Python; serde_json refuses it
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise _Rejected("header is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeEncodeError) as e:
        raise _Rejected(f"header is not valid JSON ({e})") from None
    return value


# ---- entries -------------------------------------------------------------------------------------
def header_entries(raw: bytes) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a header's JSON bytes (``__metadata__``
    dropped); raises :class:`_Rejected` for anything safetensors refuses."""
    entries, spans = _entries_and_spans(raw)
    _check_layout(entries, spans)
    return entries


def _entries_and_spans(raw: bytes) -> tuple[dict[str, dict], list[tuple[int, int, int, str]]]:
    """The checked entries and their (start, end, bytes dtype x shape need, name)."""
    header = _parse_json(raw)
    if not isinstance(header, dict):
        raise _Rejected(f"header is a JSON {_json_kind(header)}, not an object")
    if METADATA_KEY in getattr(header, "repeated", ()):
        raise _Rejected(f"{METADATA_KEY} appears twice")
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _Rejected(f"{METADATA_KEY} must be an object of strings, found {_short(metadata)}")
    spans = []
    sizes: dict[tuple[str, str], int] = {}  # (dtype, str(shape)) checked -> bytes; str() tells [1] from [True]
    for name, entry in header.items():
        # the usual entry, of a dtype and shape seen already: only its offsets are left to check
        if type(entry) is dict and len(entry) == 3:
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if type(dtype) is str and type(shape) is list and type(offsets) is list and len(offsets) == 2:
                nbytes = sizes.get((dtype, str(shape)))
                start, end = offsets
                if nbytes is not None and type(start) is int and type(end) is int and 0 <= start <= U64_MAX:
                    if 0 <= end <= U64_MAX:
                        spans.append((start, end, nbytes, name))
                        continue
        if type(entry) is not dict or len(entry) != 3 or type(entry.get("dtype")) is dict:
            entry = header[name] = _normalized_entry(name, entry)
        else:
            _check_entry(name, entry)
        nbytes = sizes[entry["dtype"], str(entry["shape"])] = _nbytes(name, entry)
        spans.append((*entry["data_offsets"], nbytes, name))
    return header, spans


def _normalized_entry(name: str, entry) -> dict:
    """An entry in one of the forms serde also reads, as a plain dict; checked."""
    if isinstance(entry, list):  # serde reads a struct from a sequence of its fields
        if len(entry) != 3:
            raise _Rejected(f"tensor {name!r}: header entry is a list of {len(entry)}, not an object")
        entry = dict(zip(TENSOR_FIELDS, entry))
    elif not isinstance(entry, dict):
        raise _Rejected(f"tensor {name!r}: header entry is {_short(entry)}, not an object")
    repeated = sorted(set(getattr(entry, "repeated", ())) & set(TENSOR_FIELDS))
    if repeated:
        raise _Rejected(f"tensor {name!r}: key {repeated[0]!r} appears twice in its header entry")
    extra = [v for k, v in entry.items() if k not in TENSOR_FIELDS]
    if extra and 2 + max(_depth(v) for v in extra) > MAX_JSON_DEPTH:
        raise _Rejected(f"tensor {name!r}: header nests deeper than {MAX_JSON_DEPTH} levels")
    entry = dict(entry)
    dtype = entry.get("dtype")
    if isinstance(dtype, dict) and len(dtype) == 1 and next(iter(dtype.values())) is None:
        entry["dtype"] = next(iter(dtype))  # serde's map form of an enum variant: {"F32": null}
    _check_entry(name, entry)
    return entry


def _check_entry(name: str, entry: dict) -> None:
    missing = [k for k in TENSOR_FIELDS if k not in entry]
    if missing:
        raise _Rejected(f"tensor {name!r}: header entry lacks {' and '.join(map(repr, missing))}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPE_BITS:
        raise _Rejected(f"tensor {name!r}: dtype {_short(dtype)} is not a safetensors dtype ({', '.join(DTYPE_BITS)})")
    if type(shape) is not list or not all(type(d) is int and 0 <= d <= U64_MAX for d in shape):
        raise _Rejected(f"tensor {name!r}: shape must be a list of non-negative integers, found {_short(shape)}")
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int and 0 <= o <= U64_MAX for o in offsets):
        raise _Rejected(f"tensor {name!r}: data_offsets must be two non-negative integers, found {_short(offsets)}")


def _check_layout(entries: dict[str, dict], spans: list[tuple[int, int, int, str]]) -> int:
    """Where the data section ends; sorted by offsets, the tensors must tile it exactly, each spanning
    its dtype x shape (safetensors' validate)."""
    start, previous = 0, None
    for s, e, nbytes, name in sorted(spans):
        if s != start:
            if previous is None:
                raise _Rejected(f"tensor {name!r} starts at byte {s}: the data section starts at 0 with no gap")
            what = (
                f"overlap {previous!r}, which ends at byte {start}"
                if s < start
                else f"leave bytes [{start}, {s}) after {previous!r} unused"
            )
            raise _Rejected(f"data_offsets of tensor {name!r} [{s}, {e}) {what}: tensors must tile the data section")
        if e < s:
            raise _Rejected(f"tensor {name!r}: data_offsets [{s}, {e}) end before they start")
        if e - s != nbytes:
            entry = entries[name]
            raise _Rejected(
                f"tensor {name!r}: {entry['dtype']}{entry['shape']} does not fit bytes [{s}, {e}) (it needs {nbytes})"
            )
        start, previous = e, name
    return start


def _nbytes(name: str, entry: dict) -> int:
    dtype, shape = entry["dtype"], entry["shape"]
    numel = 1
    for dim in shape:  # safetensors multiplies in order and fails on the first 64-bit overflow
        numel *= dim
        if numel > U64_MAX:
            raise _Rejected(f"tensor {name!r}: shape {shape} overflows 64 bits")
    bits = numel * DTYPE_BITS[dtype]
    if bits > U64_MAX:
        raise _Rejected(f"tensor {name!r}: {dtype}{shape} overflows 64 bits")
    if bits % 8:
        raise _Rejected(f"tensor {name!r}: {dtype}{shape} is {bits} bits, not a whole number of bytes")
    if dtype in NO_TORCH_DTYPE:
        raise _Rejected(f"tensor {name!r}: dtype {dtype} has no torch dtype (safetensors cannot load it for torch)")
    if dtype == "F4" and (not shape or shape[-1] % 2):
        raise _Rejected(f"tensor {name!r}: F4{shape}: torch stores F4 in pairs, so the last dimension must be even")
    return bits // 8


def _depth(value) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d + 1)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def entry_problem(name: str, meta: dict) -> str | None:
    """Why one header entry (of a ``.bin`` file: safetensors entries are checked when read) is
    malformed; None if its byte range fits its dtype x shape."""
    try:
        start, stop = meta["data_offsets"]
        if start < 0 or prod(meta["shape"]) * DTYPE_BYTES[meta["dtype"]] != stop - start:
            return f"tensor {name}: {meta['dtype']}{meta['shape']} does not fit bytes [{start}, {stop})"
    except (KeyError, TypeError, ValueError) as e:
        return f"tensor {name}: malformed header entry ({type(e).__name__}: {e})"
    return None
