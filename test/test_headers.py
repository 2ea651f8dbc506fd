"""Checkpoint headers and files: the plan accepts exactly what safetensors' ``safe_open`` (and its
torch loader) accepts, and refuses everything else with a named error (never a traceback)."""

from __future__ import annotations

import builtins
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from sglang_mixed_precision.analyzer import analyze
from sglang_mixed_precision.core.config import parse_config
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.core.plan import build_plan
from sglang_mixed_precision.core.sources import _HEADER_CACHE
from sglang_mixed_precision.core.sources.safetensors import DTYPE_BITS, read_header
from sglang_mixed_precision.testing.shapegen import write_shape_checkpoint

CONFIG = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 128,
    "vocab_size": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
MAX_DATA = 1 << 20  # a mutated header may claim more: the file then stays short (truncated)


def write_st(path: Path, header, data_len: int | None = None, *, raw: bytes | None = None, length=None) -> Path:
    """A safetensors file: ``header`` (or ``raw`` JSON bytes), an 8-byte length (``length`` overrides
    it) and ``data_len`` zero bytes (default: up to the largest end offset, capped)."""
    text = raw if raw is not None else json.dumps(header).encode()
    if data_len is None:
        data_len = min(_data_end(header), MAX_DATA)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if length is None else length) + text)
        f.truncate(8 + len(text) + max(0, data_len))
    return path


def _data_end(header) -> int:
    ends = [0]
    if isinstance(header, dict):
        for entry in header.values():
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
                ends.append(offsets[1])
    return max(ends)


def safetensors_accepts(path: Path) -> bool:
    """The oracle: safe_open with torch, and every tensor read, as SGLang's loader does."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            for name in names:
                f.get_tensor(name)
    except Exception:
        return False
    return True


def header_error(header=None, data_len=None, **kw) -> str:
    path = write_st(Path(os.environ["HEADER_TMP"]) / "model.safetensors", header, data_len, **kw)
    assert not safetensors_accepts(path), "the case must be one safetensors refuses"
    with pytest.raises(MixedPrecisionError) as e:
        read_header(path)
    assert e.value.code == "corrupt_safetensors" and e.value.where == str(path) and e.value.fix
    return str(e.value)


@pytest.fixture(autouse=True)
def _header_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADER_TMP", str(tmp_path))
    _HEADER_CACHE.clear()


def t(dtype="F32", shape=(2,), offsets=(0, 8), **extra) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


# ---- each rule of safetensors' reader, with its message -------------------------------------------
@pytest.mark.parametrize(
    "header,needle",
    [
        ({"a": t(), "b": t(offsets=(4, 12))}, "data_offsets of tensor 'b' [4, 12) overlap 'a', which ends at byte 8"),
        ({"a": t(), "b": t(offsets=(12, 20))}, "leave bytes [8, 12) after 'a' unused"),
        ({"a": t(offsets=(4, 12))}, "tensor 'a' starts at byte 4: the data section starts at 0"),
        ({"a": t(), "b": t(offsets=(0, 8))}, "overlap"),
        ({"a": t(shape=(3,))}, "tensor 'a': F32[3] does not fit bytes [0, 8) (it needs 12)"),
        ({"a": t(dtype="Q9")}, "tensor 'a': dtype 'Q9' is not a safetensors dtype"),
        ({"a": t(dtype="f32")}, "dtype 'f32' is not a safetensors dtype"),
        ({"a": t(dtype=32)}, "dtype 32 is not a safetensors dtype"),
        ({"a": t(offsets=(0,))}, "data_offsets must be two non-negative integers, found [0]"),
        ({"a": t(offsets=(0, 8, 8))}, "data_offsets must be two non-negative integers, found [0, 8, 8]"),
        ({"a": t(offsets=(0, 8.0))}, "found [0, 8.0]"),
        ({"a": t(offsets=(0, "8"))}, "found [0, '8']"),
        ({"a": {**t(), "data_offsets": {"start": 0}}}, "found {'start': 0}"),
        ({"a": t(shape=(-2,))}, "shape must be a list of non-negative integers, found [-2]"),
        ({"a": t(shape=(2.0,))}, "found [2.0]"),
        ({"a": t(shape=(True, 2))}, "found [True, 2]"),
        ({"a": {**t(), "shape": None}}, "found None"),
        ({"a": {"dtype": "F32", "shape": [2]}}, "tensor 'a': header entry lacks 'data_offsets'"),
        ({"a": [1, 2]}, "tensor 'a': header entry is a list of 2, not an object"),
        ({"a": None}, "tensor 'a': header entry is None, not an object"),
        ({"__metadata__": {"format": 1}, "a": t()}, "__metadata__ must be an object of strings, found {'format': 1}"),
        ({"__metadata__": ["pt"], "a": t()}, "__metadata__ must be an object of strings"),
        ({"a": t(dtype="F6_E2M3", shape=(4,), offsets=(0, 3))}, "dtype F6_E2M3 has no torch dtype"),
        ({"a": t(dtype="F4", shape=(3,), offsets=(0, 2))}, "F4[3] is 12 bits, not a whole number of bytes"),
        ({"a": t(dtype="F4", shape=(4, 1), offsets=(0, 2))}, "F4[4, 1]: torch stores F4 in pairs"),
        ({"a": t(shape=(2**63, 4), offsets=(0, 8))}, "shape [9223372036854775808, 4] overflows 64 bits"),
        ({"a": t(shape=(2**64,))}, "shape must be a list of non-negative integers"),
        ({"a": t(offsets=(8, 0))}, "starts at byte 8"),
    ],
)
def test_each_safetensors_rule_is_a_named_error(header, needle):
    assert needle in header_error(header, 8)


@pytest.mark.parametrize(
    "raw,needle",
    [
        (b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "key 'dtype' appears twice"),
        (b'{"__metadata__":{},"__metadata__":{},"a":' + json.dumps(t()).encode() + b"}", "__metadata__ appears twice"),
        (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', "not valid JSON"),
        (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,8]}}', "found [-0.0]"),
        (b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "not valid JSON"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e400}}', "out of range"),
        (b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "not valid UTF-8"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 126 + b"]" * 126 + b"}}", "deeper"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\x00', "not valid JSON"),
        (b"\xef\xbb\xbf" + json.dumps({"a": t()}).encode(), "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_json_that_serde_refuses(raw, needle):
    assert needle in header_error(raw=raw, data_len=8)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":["F32",[2],[0,8]]}',  # serde reads a struct from the list of its fields
        b'{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}',  # and an enum from a map
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1,"x":[2]}}',  # unknown fields, repeated
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 125 + b"]" * 125 + b"}}",
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        b' \n{"__metadata__":null,"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"y":18446744073709551616}}\t',
        b'{"b":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        b'{"a":{"dtype":"F4","shape":[4,4],"data_offsets":[0,8]}}',
        b'{"\\u0061":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}',
    ],
)
def test_what_safetensors_accepts_is_accepted(tmp_path, raw):
    path = write_st(tmp_path / "ok.safetensors", None, 8, raw=raw)
    assert safetensors_accepts(path)
    entries = read_header(path)
    assert sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()) == 8


def test_header_length_and_file_size(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(MixedPrecisionError, match="file has 2 bytes, less than the 8-byte header length"):
        read_header(path)
    assert "header length 100000001 exceeds safetensors' limit of 100000000 bytes" in header_error(
        {"a": t()}, 8, length=100_000_001
    )
    assert "header length 999 exceeds the file size" in header_error({"a": t()}, 8, length=999)
    assert "truncated: header describes" in header_error({"a": t()}, 4)
    assert "has trailing bytes" in header_error({"a": t()}, 9)


# ---- files and directories --------------------------------------------------------------------------
def model_dir(tmp_path: Path, **kw) -> Path:
    return write_shape_checkpoint(CONFIG, tmp_path / "m", **kw)


def plan_error(src: Path) -> MixedPrecisionError:
    with pytest.raises(MixedPrecisionError) as e:
        build_plan(parse_config(f"mixed_precision:\n  fp16_path: {src}\n", "/cfg/mix.yaml"))
    errors = e.value.errors if isinstance(e.value, ValidationErrors) else [e.value]
    assert all(x.fix for x in errors)
    return errors[0]


def test_a_safetensors_entry_that_is_a_directory(tmp_path):
    src = model_dir(tmp_path, index=False)
    (src / "extra.safetensors").mkdir()
    e = plan_error(src)
    assert e.code == "unreadable_file" and "extra.safetensors is a directory, not a file" in str(e)


def test_a_dangling_link(tmp_path):
    src = model_dir(tmp_path, index=False)
    (src / "model-00002-of-00001.safetensors").symlink_to(tmp_path / "gone.safetensors")
    e = plan_error(src)
    assert e.code == "missing_file"
    assert f"is a symbolic link to {tmp_path / 'gone.safetensors'}, which does not exist" in str(e)


def test_index_entries_that_are_not_file_names(tmp_path):
    src = model_dir(tmp_path)
    index = src / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    for bad, needle in (
        ({"a.weight": 3}, "maps 1 tensor(s) to something that is not a file name: 'a.weight': 3"),
        ({"a.weight": None}, "'a.weight': None"),
        ({"a.weight": ["x"]}, "'a.weight': ['x']"),
        ({"a.weight": ""}, "'a.weight': ''"),
        ({}, "has an empty weight_map"),
    ):
        index.write_text(json.dumps({**good, "weight_map": bad}))
        e = plan_error(src)
        assert e.code == "corrupt_index" and needle in str(e), bad
    index.write_text(json.dumps({"weight_map": [1]}))
    assert "weight_map is a list, not an object" in str(plan_error(src))
    shard = next(src.glob("*.safetensors"))
    weight_map = {k: "sub" for k in good["weight_map"]}
    (src / "sub").mkdir()
    index.write_text(json.dumps({"weight_map": weight_map}))
    e = plan_error(src)
    assert e.code == "unreadable_file" and "sub is a directory, not a file (listed in" in str(e)
    assert shard.exists()


def test_unreadable_files_and_directories(tmp_path, monkeypatch):
    src = model_dir(tmp_path)
    shard = next(src.glob("*.safetensors"))
    real_open = builtins.open

    def no_permission(file, *args, **kwargs):
        if Path(file) == shard:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)
    e = plan_error(src)
    assert e.code == "unreadable_file" and f"cannot read file {shard}: Permission denied" in str(e)
    assert "chmod" in e.fix
    monkeypatch.undo()

    real_listdir = os.listdir

    def no_listing(path="."):
        if Path(path) == src:
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", no_listing)
    e = plan_error(src)
    assert e.code == "unreadable_file" and f"cannot read checkpoint directory {src}: Permission denied" in str(e)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode (monkeypatched above instead)")
def test_unreadable_files_by_mode(tmp_path):
    src = model_dir(tmp_path)
    shard = next(src.glob("*.safetensors"))
    shard.chmod(0)
    try:
        assert plan_error(src).code == "unreadable_file"
    finally:
        shard.chmod(0o644)
    (src / "config.json").chmod(0)
    try:
        assert plan_error(src).code == "unreadable_file"
    finally:
        (src / "config.json").chmod(0o644)
    src.chmod(0)
    try:
        assert plan_error(src).code == "unreadable_file"
    finally:
        src.chmod(0o755)


def test_config_json_that_is_a_directory(tmp_path):
    src = model_dir(tmp_path)
    (src / "config.json").unlink()
    (src / "config.json").mkdir()
    e = plan_error(src)
    assert e.code == "unreadable_file" and "config.json is a directory, not a file" in str(e)


# ---- property: mutated headers and index files -------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, 2, 7, 8, 16, -1, -8, 2**63, 2**64 - 1, 2**64, 3.0, 0.5, -0.0])
    | st.integers(-(2**66), 2**66)
    | st.sampled_from(list(DTYPE_BITS) + ["f32", "Q9", "", "BF16 ", "F8_E4M3FN"])
    | st.text(max_size=4)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["dtype", "shape", "data_offsets", "__metadata__", "extra"]
RAW_EDITS = [
    b'"dtype":"F32","dtype"',
    b"-0",
    b"NaN",
    b"1e400",
    b'"\\ud800"',
    b"\xff",
    b"\x00",
    b"[" * 130,
    b"18446744073709551616",
    b'"__metadata__":{},',
    b",",
    b"}",
    b" ",
]


def _mutate(header: dict, ops, data) -> tuple[dict | None, bytes | None, int | None, int]:
    names = [n for n in header if n != "__metadata__"]
    raw, length, delta = None, None, 0
    for op in ops:
        name = data.draw(st.sampled_from(names)) if names else "x"
        entry = header.get(name) if isinstance(header.get(name), dict) else None
        if op == 0:  # a field gets any JSON value
            field = data.draw(st.sampled_from(FIELDS))
            target = header if field == "__metadata__" else entry
            if target is not None:
                target[field if field != "extra" else "x"] = data.draw(json_values)
        elif op == 1 and entry is not None:  # a field disappears
            entry.pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == 2 and entry is not None and _offsets(entry):  # offsets shift: overlaps, gaps, inversions
            i = data.draw(st.integers(0, 1))
            entry["data_offsets"][i] = max(
                0, entry["data_offsets"][i] + data.draw(st.sampled_from([-8, -2, -1, 1, 2, 8]))
            )
        elif op == 3 and len(names) > 1:  # two tensors swap offsets
            other = header.get(data.draw(st.sampled_from(names)))
            if entry is not None and isinstance(other, dict):
                entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
        elif op == 4 and entry is not None and isinstance(entry.get("shape"), list) and entry["shape"]:
            i = data.draw(st.integers(0, len(entry["shape"]) - 1))
            entry["shape"][i] = data.draw(
                st.sampled_from([0, 1, 2, -1, 2**63, entry["shape"][i] * 2, entry["shape"][i] // 2])
            )
        elif op == 5 and entry is not None:  # another dtype, same shape
            entry["dtype"] = data.draw(st.sampled_from(list(DTYPE_BITS)))
        elif op == 6:  # an entry disappears or a new one appears
            if data.draw(st.booleans()) and names:
                header.pop(name, None)
            else:
                header[data.draw(st.text(max_size=6))] = data.draw(json_values | st.just(dict(t())))
        elif op == 7 and entry is not None:  # the forms serde also reads
            if data.draw(st.booleans()):
                header[name] = [entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")]
            else:
                entry["dtype"] = {str(entry.get("dtype")): None}
        elif op == 8:  # raw bytes edited after serialisation
            raw = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
            at = data.draw(st.integers(0, len(raw)))
            cut = data.draw(st.integers(0, 3))
            raw = raw[:at] + data.draw(st.sampled_from(RAW_EDITS)) + raw[at + cut :]
        elif op == 10 and entry is not None:  # what safetensors ignores: unknown fields, key order
            entry[data.draw(st.sampled_from(["x", "offsets", "dtype_"]))] = data.draw(json_values)
            header = dict(reversed(list(header.items()))) if data.draw(st.booleans()) else header
        elif op == 11 and entry is not None and str(entry.get("dtype")) in DTYPE_BITS:  # a dtype of the same width
            bits = DTYPE_BITS[entry["dtype"]]
            entry["dtype"] = data.draw(st.sampled_from([d for d, b in DTYPE_BITS.items() if b == bits]))
        elif op == 12:  # metadata strings, or none
            header["__metadata__"] = data.draw(st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3)))
        elif op == 9:  # the length prefix or the file size is off
            if data.draw(st.booleans()):
                length = data.draw(st.sampled_from([0, 1, 7, 100_000_001, 2**63]))
            else:
                delta = data.draw(st.sampled_from([-9, -1, 1, 8]))
    return header, raw, length, delta


def _offsets(entry) -> bool:
    o = entry.get("data_offsets")
    return isinstance(o, list) and len(o) == 2 and all(type(x) is int for x in o)


FUZZ = settings(
    max_examples=1000, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    src = write_shape_checkpoint(CONFIG, tmp_path_factory.mktemp("base") / "m", index=False)
    shard = next(src.glob("*.safetensors"))
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return src, shard.name, json.loads(raw[8 : 8 + n])


def _outcomes(src: Path) -> tuple[bool, bool]:
    """(planned, analyzed): only the project's errors may escape."""
    _HEADER_CACHE.clear()
    results = []
    for run in (
        lambda: build_plan(parse_config(f"mixed_precision:\n  fp16_path: {src}\n", "/cfg/mix.yaml")),
        lambda: analyze(src),
    ):
        try:
            run()
            results.append(True)
        except MixedPrecisionError as e:
            assert e.code and str(e)
            results.append(False)
    return results[0], results[1]


@FUZZ
@given(ops=st.lists(st.integers(0, 12), min_size=1, max_size=3), data=st.data())
def test_mutated_headers(base_checkpoint, tmp_path_factory, ops, data):
    src, shard_name, base = base_checkpoint
    work = tmp_path_factory.mktemp("mut", numbered=True)
    (work / "config.json").write_text((src / "config.json").read_text())
    header, raw, length, delta = _mutate(json.loads(json.dumps(base)), ops, data)
    text = raw if raw is not None else json.dumps(header).encode()
    data_len = min(_data_end(header), MAX_DATA) + delta
    path = write_st(work / shard_name, header, data_len, raw=text, length=length)
    accepted = safetensors_accepts(path)
    event(f"safetensors {'accepts' if accepted else 'refuses'}")
    try:
        read_header(path)
        header_ok = True
    except MixedPrecisionError as e:
        assert e.code in ("corrupt_safetensors", "unreadable_file"), e
        header_ok = False
    assert header_ok == accepted, "the header check must accept exactly what safetensors accepts"
    planned, analyzed = _outcomes(work)
    if not accepted:
        assert not planned and not analyzed


@st.composite
def index_edits(draw, names: list[str], files: list[str]):
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "drop", "add", "map", "index", "file"]))
        if kind == "value":
            value = draw(
                st.sampled_from(files + ["", ".", "nope.safetensors", "dir.safetensors", "link.safetensors", "../m"])
                | json_values
            )
            edits.append((kind, draw(st.sampled_from(names)), value))
        elif kind in ("drop", "add"):
            edits.append(
                (
                    kind,
                    draw(st.sampled_from(names)) if kind == "drop" else draw(st.text(max_size=8)),
                    draw(st.sampled_from(files)),
                )
            )
        elif kind == "map":
            edits.append((kind, None, draw(json_values)))
        elif kind == "index":
            edits.append(
                (kind, None, draw(st.sampled_from([b"", b"{", b"[]", b'{"weight_map": null}', b"\xff", b"{}"])))
            )
        else:
            edits.append(
                (kind, draw(st.sampled_from(files)), draw(st.sampled_from(["dir", "link", "gone", "truncate"])))
            )
    return edits


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    src = write_shape_checkpoint(CONFIG, tmp_path_factory.mktemp("sharded") / "m", shard_bytes=12_000)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src, index


def _index_oracle(work: Path) -> bool:
    """What a loader reading the index would accept: every named file a readable safetensors file."""
    try:
        weight_map = json.loads((work / "model.safetensors.index.json").read_bytes())["weight_map"]
        files = set(weight_map.values())
    except Exception:
        return False
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in files):
        return False
    return all((work / f).is_file() and safetensors_accepts(work / f) for f in files)


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_index_files(sharded_checkpoint, tmp_path_factory, data):
    src, index = sharded_checkpoint
    files = sorted(set(index["weight_map"].values()))
    edits = data.draw(index_edits(sorted(index["weight_map"]), files))
    work = tmp_path_factory.mktemp("idx", numbered=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (work / f.name).symlink_to(f)
    (work / "config.json").write_text((src / "config.json").read_text())
    (work / "dir.safetensors").mkdir()
    (work / "link.safetensors").symlink_to(work / "gone")
    doc: object = json.loads(json.dumps(index))
    raw = None
    for kind, key, value in edits:
        if kind == "value" and isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
            doc["weight_map"][key] = value
        elif kind == "drop" and isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
            doc["weight_map"].pop(key, None)
        elif kind == "add" and isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
            doc["weight_map"][key] = value
        elif kind == "map" and isinstance(doc, dict):
            doc["weight_map"] = value
        elif kind == "index":
            raw = value
        elif kind == "file":
            target = work / key
            if target.is_dir() and not target.is_symlink():
                target.rmdir()
            else:
                target.unlink(missing_ok=True)
            if value == "dir":
                target.mkdir()
            elif value == "link":
                target.symlink_to(work / "gone")
            elif value == "truncate":
                target.write_bytes((src / key).read_bytes()[:100])
    (work / "model.safetensors.index.json").write_bytes(raw if raw is not None else json.dumps(doc).encode())
    accepted = _index_oracle(work)
    planned, analyzed = _outcomes(work)
    event(f"loader {'accepts' if accepted else 'refuses'}, plan {'passes' if planned else 'refuses'}")
    if not accepted:
        assert not planned and not analyzed


def test_the_oracle_sees_what_it_should(tmp_path):
    """The property tests' oracle itself: it accepts a good file and refuses a bad one."""
    good = write_st(tmp_path / "a.safetensors", {"a": t()}, 8)
    bad = write_st(tmp_path / "b.safetensors", {"a": t(), "b": t(offsets=(4, 12))}, 12)
    assert safetensors_accepts(good) and not safetensors_accepts(bad)


def test_the_unmutated_checkpoints_plan_and_analyze(base_checkpoint, sharded_checkpoint):
    assert _outcomes(base_checkpoint[0]) == (True, True)
    assert _outcomes(sharded_checkpoint[0]) == (True, True)


def test_one_tensor_in_two_files_without_index(tmp_path):
    src = model_dir(tmp_path, index=False)
    shard = next(src.glob("*.safetensors"))
    (src / "copy.safetensors").write_bytes(shard.read_bytes())
    e = plan_error(src)
    assert e.code == "corrupt_safetensors" and f"are in both copy.safetensors and {shard.name}" in str(e)
    assert "no index says which counts: model.embed_tokens.weight" in str(e)
