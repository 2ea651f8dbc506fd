"""Header-first checkpoint readers: one :class:`CheckpointSource` per checkpoint directory.

A source knows its tensors (name, file, dtype, shape, byte range) from safetensors headers
(single file, several files, or ``model.safetensors.index.json``) or from the pickle of
PyTorch ``.bin`` files (+ ``pytorch_model.bin.index.json``) — never from tensor data. Parsed
headers are cached per file (path, size, mtime), so planning the same sources twice is cheap;
tensor data is read by :mod:`sglang_mixed_precision.tensors` (torch), never here.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from functools import cached_property
from math import prod
from pathlib import Path
from typing import NamedTuple

from ..errors import ErrorCode, MixedPrecisionError, more, raise_all
from ..files import read_json_object, unreadable
from ..formats import DTYPE_BYTES, Scheme, detect_scheme, side_quantization_config
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
        start, stop = self.data_offsets  # checked against dtype x shape when the header was read
        return stop - start


# (path, size, mtime_ns) -> raw header entries; headers of big checkpoints are parsed once.
# Entries stay raw (json dicts) until a tensor is asked for: a plan touches a fraction of each source.
_HEADER_CACHE: dict[tuple[str, int, int], dict] = {}


def _file_entries(path: Path) -> dict:
    """{tensor name: raw header entry (dtype, shape, data_offsets; .bin adds storage)} of one weight file."""
    try:
        st = path.stat()
    except OSError as e:
        raise unreadable(path, e) from None
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


def _corrupt_index(index: Path, why: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.CORRUPT_INDEX,
        f"{index} {why}",
        where=str(index),
        fix="restore the checkpoint's index file (it maps each tensor to its file)",
    )


def _is_file_name(value) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and not value.endswith(("/", "\\"))


def _kind(value) -> str:
    return "a list" if isinstance(value, list) else "null" if value is None else f"a {type(value).__name__}"


def _not_a_file(path: Path) -> MixedPrecisionError:
    """Why ``path`` is not a readable regular file (missing, a dangling link, a directory, ...);
    the caller adds which source it belongs to."""
    if path.is_symlink() and not path.exists():
        return MixedPrecisionError(
            ErrorCode.MISSING_FILE, f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
        )
    if path.is_dir():
        return MixedPrecisionError(ErrorCode.UNREADABLE_FILE, f"{path} is a directory, not a file")
    if path.exists():
        return MixedPrecisionError(ErrorCode.UNREADABLE_FILE, f"{path} is not a regular file")
    return MixedPrecisionError(ErrorCode.MISSING_FILE, f"{path} is missing")


# HF's shard names: model-00002-of-00005.safetensors, pytorch_model-00001-of-00003.bin
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>safetensors|bin)$")


def _missing_shards(files: list[Path], index: Path | None) -> list[MixedPrecisionError]:
    """Shards that numbered names imply but nothing names (one deleted from a set without index)."""
    groups: dict[tuple[str, str, int, int], set[int]] = defaultdict(set)
    for file in files:
        m = _SHARD_RE.match(file.name)
        if m:
            groups[m["stem"], m["ext"], len(m["i"]), int(m["n"])].add(int(m["i"]))
    problems = []
    for (stem, ext, width, n), present in groups.items():
        count = n - len(present & set(range(1, n + 1))) if n <= 100_000 else 0
        if count <= 0:
            continue
        absent = [f"{stem}-{i:0{width}d}-of-{n:0{width}d}.{ext}" for i in range(1, n + 1) if i not in present]
        folder = files[0].parent
        names = f"{index.name} names" if index else "the directory holds"
        problems.append(
            MixedPrecisionError(
                ErrorCode.MISSING_FILE,
                f"{count} of {n} shards are missing from {folder} ({names} {n - count}): {more(absent, count)}",
                where=str(folder),
                fix="download the missing shards (or the whole checkpoint) again",
            )
        )
    return problems


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
        try:
            if not self.path.is_dir():
                what = "is not a directory" if self.path.exists() else "does not exist"
                return MixedPrecisionError(
                    ErrorCode.MISSING_SOURCE,
                    f"source {self.label!r}: checkpoint directory {self.path} {what}",
                    where=self.origin,
                    fix=f"point {self.label!r} at a model directory (or create it with `sglang-mp convert`)",
                )
            os.listdir(self.path)  # a directory without read permission looks empty to glob
            config = self.path / "config.json"
            if not config.is_file():
                problem = _not_a_file(config)
                return MixedPrecisionError(
                    problem.code,
                    f"source {self.label!r}: {problem.detail}",
                    where=self.origin,
                    fix="copy the model's config.json into the directory (it says the architecture and quantization)",
                )
        except OSError as e:
            return unreadable(self.path, e, "checkpoint directory")
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
            raw = index.read_bytes()
        except OSError as e:
            raise unreadable(index, e) from None
        try:
            weight_map = json_loads(raw)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is {_kind(weight_map)}, not an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise _corrupt_index(index, f"has no valid weight_map ({type(e).__name__}: {e})") from None
        if not weight_map:
            raise _corrupt_index(index, "has an empty weight_map: it names no tensor")
        try:
            named = set(weight_map.values())  # a few shard names for 100k tensors: check each once
        except TypeError:  # an unhashable value (a list, an object) is no file name
            named = None
        if named is not None and all(_is_file_name(f) for f in named):
            return weight_map
        bad = [f"{name!r}: {file!r}" for name, file in weight_map.items() if not _is_file_name(file)]
        if bad:
            raise _corrupt_index(
                index, f"maps {len(bad)} tensor(s) to something that is not a file name: {more(bad, len(bad))}"
            )
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
        problems += _missing_shards(files, index)
        for file in files:
            try:
                if not file.is_file():
                    problems.append(self._file_problem(file, index, weight_map))
                    continue
                entries = _file_entries(file)
            except MixedPrecisionError as e:
                problems.append(e)
                continue
            except OSError as e:
                problems.append(unreadable(file, e))
                continue
            if weight_map is None and not self._file_of.keys().isdisjoint(entries):
                problems.append(self._duplicates(file, entries))
            self._entry.update(entries)
            self._file_of.update(dict.fromkeys(entries, file))
        if weight_map is not None and not problems:
            problems += self._index_mismatches(index, weight_map)
        self._problems = problems
        return problems

    def _duplicates(self, file: Path, entries: dict) -> MixedPrecisionError:
        """Without an index nothing says which of two files holding a tensor counts."""
        twice = [n for n in entries if n in self._file_of]
        other = self._file_of[twice[0]]
        return MixedPrecisionError(
            ErrorCode.CORRUPT_SAFETENSORS,
            f"source {self.label!r}: {len(twice)} tensor(s) are in both {other.name} and {file.name}, and no "
            f"index says which counts: {more(twice)}",
            where=str(file),
            fix="remove the file that does not belong to this checkpoint (or restore its index)",
        )

    def _file_problem(self, file: Path, index: Path | None, weight_map: dict[str, str] | None) -> MixedPrecisionError:
        problem = _not_a_file(file)
        listed = ""
        if weight_map is not None:
            n = sum(1 for f in weight_map.values() if f == file.name)
            listed = f" (listed in {index.name} for {n} tensors)"
        return MixedPrecisionError(
            problem.code,
            f"source {self.label!r}: {problem.detail}{listed}",
            where=str(file),
            fix=f"download {file.name} into {self.path} again" + (f" or restore {index.name}" if index else ""),
        )

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
