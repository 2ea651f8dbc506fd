"""Header-first checkpoint readers: one :class:`CheckpointSource` per checkpoint directory.

A source knows its tensors (name, file, dtype, shape, byte range) from safetensors headers
(single file, several files, or ``model.safetensors.index.json``) or from the pickle of
PyTorch ``.bin`` files (+ ``pytorch_model.bin.index.json``) — never from tensor data. Parsed
headers are cached per file (path, size, mtime), so planning the same sources twice is cheap;
tensor data is read by :mod:`sglang_mixed_precision.tensors` (torch), never here.
"""

from __future__ import annotations

import os
from functools import cached_property
from math import prod
from pathlib import Path
from typing import NamedTuple

from ..errors import ErrorCode, MixedPrecisionError, raise_all
from ..formats import DTYPE_BYTES, Scheme, detect_scheme, side_quantization_config
from ..jsonfiles import read_json_object
from ..naming import TENSOR_SUFFIXES
from .safetensors import corrupt_safetensors, entry_problem, json_loads, read_header
from .torch_bin import read_bin_tensors

SAFETENSORS_INDEX = "model.safetensors.index.json"
_SUFFIX_SET = frozenset(TENSOR_SUFFIXES)
_EMPTY: dict = {}
BIN_INDEX = "pytorch_model.bin.index.json"


class TensorInfo(NamedTuple):
    name: str
    file: Path
    dtype: str  # safetensors dtype name: BF16, F16, F32, F8_E4M3, I32, ...
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # byte range in the file's data section (in the storage for .bin)
    storage: str | None = None  # .bin only: the zip storage key holding the bytes

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


# (path, size, mtime_ns) -> raw header entries; headers of big checkpoints are parsed once.
# Entries stay raw (json dicts) until a tensor is asked for: a plan touches a fraction of each source.
_HEADER_CACHE: dict[tuple[str, int, int], dict] = {}


def _file_entries(path: Path) -> dict:
    """{tensor name: raw header entry (dtype, shape, data_offsets; .bin adds storage)} of one weight file."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    cached = _HEADER_CACHE.get(key)
    if cached is None:
        cached = _bin_entries(path) if path.suffix == ".bin" else read_header(path)
        _HEADER_CACHE[key] = cached
    return cached


def _bin_entries(path: Path) -> dict[str, dict]:
    out = {}
    for name, t in read_bin_tensors(path).items():
        itemsize = DTYPE_BYTES[t.dtype]
        offsets = [t.offset * itemsize, (t.offset + prod(t.shape)) * itemsize]
        out[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": offsets, "storage": t.storage}
    return out


def _info(name: str, path: Path, entry: dict) -> TensorInfo:
    problem = entry_problem(name, entry)
    if problem:
        raise corrupt_safetensors(path, problem)
    return TensorInfo(
        name, path, entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"]), entry.get("storage")
    )


class CheckpointSource:
    """One checkpoint directory under a label of the mixed config.

    ``origin`` says where the config declared it (``cfg.yaml:4 (fp8_path)``) for messages.
    """

    def __init__(self, label: str, path: str | os.PathLike, *, origin: str | None = None):
        self.label = label
        self.path = Path(path)
        self.origin = origin or str(self.path)
        self._problems: list[MixedPrecisionError] | None = None
        self._entry: dict[str, dict] = {}  # tensor name -> raw header entry (dtype, shape, data_offsets)
        self._file_of: dict[str, Path] = {}  # tensor name -> file
        self._infos: dict[str, TensorInfo] = {}

    def __repr__(self) -> str:
        return f"CheckpointSource({self.label!r}, {str(self.path)!r})"

    # ---- directory and config ---------------------------------------------------------------
    def check_exists(self) -> MixedPrecisionError | None:
        if not self.path.is_dir():
            what = "is not a directory" if self.path.exists() else "does not exist"
            return MixedPrecisionError(
                ErrorCode.MISSING_SOURCE,
                f"source {self.label!r}: checkpoint directory {self.path} {what}",
                where=self.origin,
                fix=f"point {self.label!r} at a model directory (or create it with `sglang-mp convert`)",
            )
        if not (self.path / "config.json").is_file():
            return MixedPrecisionError(
                ErrorCode.MISSING_FILE,
                f"source {self.label!r}: {self.path / 'config.json'} is missing",
                where=self.origin,
                fix="copy the model's config.json into the directory (it says the architecture and quantization)",
            )
        return None

    def _require(self) -> None:
        problem = self.check_exists()
        if problem:
            raise problem

    @cached_property
    def hf_config(self) -> dict:
        self._require()
        return read_json_object(self.path / "config.json")

    @cached_property
    def quant_config(self) -> dict | None:
        """config.json's ``quantization_config``, or the side file older exports keep it in (a format's own)."""
        qc = self.hf_config.get("quantization_config")
        return side_quantization_config(self.path) if qc is None else qc

    @cached_property
    def scheme(self) -> Scheme:
        where = f"{self.path / 'config.json'} (source {self.label!r})"
        return detect_scheme({**self.hf_config, "quantization_config": self.quant_config}, where=where)

    # ---- tensors ---------------------------------------------------------------------------
    def weight_files(self) -> tuple[list[Path], Path | None, dict[str, str] | None]:
        """(data files, index file or None, index weight_map or None)."""
        self._require()
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.path / index_name
            if index.is_file():
                weight_map = self._read_index(index)
                return [self.path / f for f in sorted(set(weight_map.values()))], index, weight_map
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("pytorch_model*.bin"))
        if not files:
            raise MixedPrecisionError(
                ErrorCode.MISSING_FILE,
                f"source {self.label!r}: no *.safetensors, {SAFETENSORS_INDEX} or pytorch_model*.bin in {self.path}",
                where=self.origin,
                fix="point the source at a directory holding the checkpoint's weight files",
            )
        return files, None, None

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json_loads(index.read_bytes())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise MixedPrecisionError(
                ErrorCode.CORRUPT_INDEX,
                f"{index} has no valid weight_map ({e})",
                where=str(index),
                fix="restore the checkpoint's index file (it maps each tensor to its file)",
            ) from None
        return weight_map

    def scan(self) -> list[MixedPrecisionError]:
        """Parse every header once; return the problems found (missing / corrupt files) instead of raising."""
        if self._problems is not None:
            return self._problems
        problems: list[MixedPrecisionError] = []
        try:
            files, index, weight_map = self.weight_files()
        except MixedPrecisionError as e:
            self._problems = [e]
            return self._problems
        for file in files:
            if not file.is_file():
                n = sum(1 for f in weight_map.values() if f == file.name) if weight_map else 0
                problems.append(
                    MixedPrecisionError(
                        ErrorCode.MISSING_FILE,
                        f"source {self.label!r}: {file.name} is listed in {index.name} ({n} tensors) but missing",
                        where=str(file),
                        fix=f"download {file.name} into {self.path}",
                    )
                )
                continue
            try:
                entries = _file_entries(file)
            except MixedPrecisionError as e:
                problems.append(e)
                continue
            self._entry.update(entries)
            self._file_of.update(dict.fromkeys(entries, file))
        if weight_map is not None and not problems:
            problems += self._index_mismatches(index, weight_map)
        self._problems = problems
        return problems

    def _index_mismatches(self, index: Path, weight_map: dict[str, str]) -> list[MixedPrecisionError]:
        names: dict[str, str] = {}
        for file in dict.fromkeys(self._file_of.values()):
            names.update(dict.fromkeys(_file_entries(file), file.name))
        if names == weight_map:  # the usual case, compared in C
            return []
        absent = [n for n, f in weight_map.items() if names.get(n) != f]
        if not absent:
            return []
        shown = ", ".join(f"{n} (in {weight_map[n]})" for n in absent[:5])
        return [
            MixedPrecisionError(
                ErrorCode.MISSING_TENSOR,
                f"source {self.label!r}: {len(absent)} tensor(s) listed in {index.name} are not in the named file's header: {shown}",
                where=str(index),
                fix="the index and the weight files are from different exports; download them again together",
            )
        ]

    def _checked(self) -> None:
        if self._problems == []:
            return
        problems = self.scan()
        if problems:
            raise_all(problems)

    @property
    def tensor_names(self):
        """Names of every tensor the checkpoint stores (a view; no TensorInfo is built)."""
        self._checked()
        return self._file_of.keys()

    def tensor(self, name: str) -> TensorInfo:
        info = self._infos.get(name)
        if info is not None:
            return info
        self._checked()
        file = self._file_of.get(name)
        if file is None:
            raise MixedPrecisionError(
                ErrorCode.MISSING_TENSOR,
                f"source {self.label!r} has no tensor {name}",
                where=str(self.path),
                fix="check the tensor name or map the module to another source",
            )
        info = self._infos[name] = _info(name, file, self._entry[name])
        return info

    def file_of(self, name: str) -> Path:
        self._checked()
        return self._file_of[name]

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor as a TensorInfo (builds them all: planning uses ``module_tensors``)."""
        return {name: self.tensor(name) for name in self.tensor_names}

    def module_entries(self, module: str) -> dict[str, dict]:
        """{suffix: raw header entry} of one module ({} if the checkpoint has none of its tensors);
        what planning reads, without building a TensorInfo per tensor."""
        return self._by_module.get(module, _EMPTY)

    @cached_property
    def _by_module(self) -> dict[str, dict[str, dict]]:
        """module -> {suffix: raw header entry}, in checkpoint order."""
        self._checked()
        out: dict[str, dict[str, dict]] = {}
        suffixes = _SUFFIX_SET
        for name, entry in self._entry.items():
            module, _, suffix = name.rpartition(".")
            if not module or suffix not in suffixes:
                module, suffix = name, ""
            group = out.get(module)
            if group is None:
                out[module] = {suffix: entry}
            else:
                group[suffix] = entry
        return out

    def module_tensors(self, module: str) -> dict[str, TensorInfo]:
        """{suffix: TensorInfo} of one module ({} if the checkpoint has none of its tensors)."""
        return {
            suffix: self.tensor(f"{module}.{suffix}" if suffix else module) for suffix in self.module_entries(module)
        }

    def module_names(self) -> dict[str, None]:
        """Module names in checkpoint order (tensor suffixes stripped), as an ordered set."""
        return dict.fromkeys(self._by_module)
