"""Shapes and dtypes of a PyTorch ``.bin`` (zip + pickle) checkpoint, read without torch.

The pickle inside the zip rebuilds tensors through ``torch._utils._rebuild_tensor_v2`` from
storages named by persistent ids; a restricted unpickler records those calls instead of
running them, so neither torch nor any tensor data is loaded.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from math import prod
from pathlib import Path
from typing import NamedTuple

from ..errors import ErrorCode, MixedPrecisionError
from ..formats import DTYPE_BYTES

_STORAGE_DTYPES = {
    "BFloat16Storage": "BF16",
    "HalfStorage": "F16",
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
    "IntStorage": "I32",
    "LongStorage": "I64",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "Float8_e4m3fnStorage": "F8_E4M3",
    "Float8_e5m2Storage": "F8_E5M2",
}


class BinTensor(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    storage: str  # zip entry key of the storage ("archive/data/<key>" holds the bytes)
    offset: int  # element offset into the storage


class _Storage(NamedTuple):
    dtype: str
    key: str
    numel: int


class _StorageType(NamedTuple):
    name: str


def _rebuild_tensor(storage, storage_offset, size, stride, *args):
    return BinTensor(storage.dtype, tuple(size), storage.key, storage_offset)


def _rebuild_parameter(data, *args):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _ShapeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a state dict")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type = pid[1]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return _Storage(_STORAGE_DTYPES[storage_type.name], str(pid[2]), int(pid[4]))


def _corrupt(path: Path, why: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.CORRUPT_CHECKPOINT,
        f"{path.name} is not a readable PyTorch state dict: {why}",
        where=str(path),
        fix="re-save it with torch.save (zip format) or convert it to safetensors",
    )


def read_bin_tensors(path: Path) -> dict[str, BinTensor]:
    """{name: BinTensor} of a torch.save'd state dict, checking every storage is present and long enough."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise _corrupt(path, "no data.pkl in the archive")
            prefix = pkl[: -len("data.pkl")]
            with zf.open(pkl) as f:
                state = _ShapeUnpickler(f).load()
            sizes = {
                n[len(prefix) + len("data/") :]: zf.getinfo(n).file_size
                for n in names
                if n.startswith(prefix + "data/")
            }
    except zipfile.BadZipFile as e:
        raise _corrupt(path, f"not a zip archive or truncated ({e}); legacy non-zip torch files are not read") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, KeyError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise _corrupt(path, f"top-level object is a {type(state).__name__}, not a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, BinTensor)}
    for name, t in tensors.items():
        need = (t.offset + prod(t.shape)) * DTYPE_BYTES[t.dtype]
        if sizes.get(t.storage, -1) < need:
            raise _corrupt(path, f"storage {t.storage} of {name} has {sizes.get(t.storage, 0)} bytes, needs {need}")
    return tensors
