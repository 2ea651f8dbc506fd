"""Header-first checkpoint sources: safetensors single / sharded + index, torch .bin, formats."""

from __future__ import annotations

import json
import pathlib
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from ckpt_writers import load_state, write_fp8_checkpoint, write_gptq_checkpoint
from sglang_mixed_precision.core.errors import MixedPrecisionError
from sglang_mixed_precision.core.formats import detect_scheme, expected_tensors
from sglang_mixed_precision.core.sources import _HEADER_CACHE, CheckpointSource
from sglang_mixed_precision.core.sources.torch_bin import read_bin_tensors
from sglang_mixed_precision.tensors import TensorReader, read_tensor

TORCH_TO_ST = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.float8_e4m3fn: "F8_E4M3",
}


def clone(src, dst, skip=()):
    """A copy of a model dir made of symlinks, minus ``skip``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)
    return dst


def assert_matches_torch(source: CheckpointSource, state: dict):
    assert set(source.tensor_names) == set(state)
    for name, t in state.items():
        info = source.tensor(name)
        assert info.shape == tuple(t.shape) and info.dtype == TORCH_TO_ST[t.dtype], name
        assert info.nbytes == t.numel() * t.element_size()


def test_single_file_safetensors(tiny_qwen3):
    source = CheckpointSource("bf16", tiny_qwen3)
    assert_matches_torch(source, load_state(tiny_qwen3))
    assert source.scheme.label() == "bf16" and source.quant_config is None
    q = source.module_tensors("model.layers.0.self_attn.q_proj")
    assert list(q) == ["weight"] and q["weight"].shape == (512, 512)
    assert "model.layers.1.self_attn.k_norm" in source.module_names()


def test_sharded_safetensors_with_index(tiny_llama):
    source = CheckpointSource("bf16", tiny_llama)
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())["weight_map"]
    assert_matches_torch(source, load_state(tiny_llama))
    for name, fname in index.items():
        assert source.tensor(name).file.name == fname
    # data offsets point at the right bytes
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(read_tensor(source, name), load_file(str(tiny_llama / index[name]))[name])


def test_header_cache_parses_each_file_once(tiny_qwen3, monkeypatch):
    import sglang_mixed_precision.core.sources as sources_mod

    CheckpointSource("a", tiny_qwen3).scan()
    calls = []
    monkeypatch.setattr(sources_mod, "read_header", lambda p: calls.append(p) or {})
    assert len(CheckpointSource("b", tiny_qwen3).tensor_names) > 0
    assert calls == []
    assert any(key[0].startswith(str(tiny_qwen3)) for key in _HEADER_CACHE)


def test_open_handles_are_cached(tiny_qwen3):
    source = CheckpointSource("a", tiny_qwen3)
    file = source.tensor("model.norm.weight").file
    reader = TensorReader(source)
    assert reader.open(file) is reader.open(file)


@pytest.fixture(scope="module")
def bin_checkpoint(tiny_qwen3, tmp_path_factory):
    out = clone(tiny_qwen3, tmp_path_factory.mktemp("bin") / "m", skip=("model.safetensors",))
    state = load_state(tiny_qwen3)
    torch.save(state, out / "pytorch_model.bin")
    return out, state


def test_torch_bin_read_without_loading(bin_checkpoint, monkeypatch):
    out, state = bin_checkpoint
    # the shape reader never imports torch: hide it and read a fresh source
    monkeypatch.setitem(sys.modules, "torch", None)
    source = CheckpointSource("bin", out)
    names = set(source.tensor_names)
    monkeypatch.undo()
    assert names == set(state)
    assert_matches_torch(source, state)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(read_tensor(source, name), state[name])


def test_sharded_torch_bin_with_index(tiny_qwen3, tmp_path):
    out = clone(tiny_qwen3, tmp_path / "m", skip=("model.safetensors",))
    state, names = load_state(tiny_qwen3), sorted(load_state(tiny_qwen3))
    weight_map = {}
    for i in range(2):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        part = {n: state[n] for n in names[i::2]}
        torch.save(part, out / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = CheckpointSource("bin", out)
    assert_matches_torch(source, state)
    assert {source.tensor(n).file.name for n in names} == set(weight_map.values())


def test_corrupt_torch_bin(bin_checkpoint, tmp_path):
    out, _ = bin_checkpoint
    bad = clone(out, tmp_path / "bad", skip=("pytorch_model.bin",))
    data = (out / "pytorch_model.bin").read_bytes()
    (bad / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(MixedPrecisionError) as e:
        CheckpointSource("bin", bad).tensor_names
    assert e.value.code == "corrupt_checkpoint" and "pytorch_model.bin" in str(e.value)


def _rezip(src, dst, edit):
    """A copy of the zip ``src`` with each member's bytes passed through ``edit(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)))
    return dst


def test_torch_bin_problems_name_the_file(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "ok.bin")
    short = _rezip(tmp_path / "ok.bin", tmp_path / "short.bin", lambda n, b: b[:8] if n.endswith("/data/0") else b)
    no_pickle = tmp_path / "nopkl.bin"
    with zipfile.ZipFile(no_pickle, "w") as z:
        z.writestr("archive/data/0", b"")
    torch.save({"p": pathlib.PurePosixPath("a")}, tmp_path / "object.bin")
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    for path, needle in (
        (short, "storage 0 of w has 8 bytes, needs 16"),
        (no_pickle, "no data.pkl in the archive"),
        (tmp_path / "object.bin", "unexpected global pathlib.PurePosixPath"),
        (tmp_path / "list.bin", "top-level object is a list, not a state dict"),
    ):
        with pytest.raises(MixedPrecisionError) as e:
            read_bin_tensors(path)
        assert e.value.code == "corrupt_checkpoint" and f"{path.name} is not a readable PyTorch state dict" in str(
            e.value
        )
        assert needle in str(e.value), path.name


def test_truncated_safetensors_is_reported_with_sizes(tiny_qwen3, tmp_path):
    bad = clone(tiny_qwen3, tmp_path / "bad", skip=("model.safetensors",))
    data = (tiny_qwen3 / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(MixedPrecisionError) as e:
        CheckpointSource("x", bad).tensor_names
    assert e.value.code == "corrupt_safetensors"
    assert "truncated" in str(e.value) and str(len(data) - 1000) in str(e.value) and str(len(data)) in str(e.value)


def _file(header: dict, data_bytes: int) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"x" * data_bytes


@pytest.mark.parametrize(
    "payload,needle",
    [
        (b"\x01\x02", "less than the 8-byte"),
        ((10**12).to_bytes(8, "little") + b"{}", "exceeds safetensors' limit of 100000000 bytes"),
        ((1000).to_bytes(8, "little") + b"{}", "header length 1000 exceeds the file size 10"),
        ((6).to_bytes(8, "little") + b"{nope}", "not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "header is a JSON array, not an object"),
        (_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 8), "does not fit"),
        (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12), "trailing bytes"),
        (
            _file({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, 8),
            "dtype 'Q9' is not a safetensors dtype",
        ),
        (_file({"a": {"dtype": "F32", "shape": [2]}}, 0), "tensor 'a': header entry lacks 'data_offsets'"),
    ],
)
def test_corrupt_safetensors_headers(tmp_path, payload, needle):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(MixedPrecisionError) as e:
        CheckpointSource("x", tmp_path).tensors
    assert e.value.code == "corrupt_safetensors" and needle in str(e.value) and "model.safetensors" in str(e.value)


def test_index_naming_a_missing_shard(tiny_llama, tmp_path):
    bad = clone(tiny_llama, tmp_path / "bad", skip=("model-00002-of-00009.safetensors",))
    source = CheckpointSource("x", bad)
    problems = source.scan()
    assert [p.code for p in problems] == ["missing_file"]
    assert "model-00002-of-00009.safetensors" in str(problems[0]) and "model.safetensors.index.json" in str(problems[0])
    with pytest.raises(MixedPrecisionError):
        source.tensor("model.norm.weight")


@pytest.mark.parametrize("index", ['{"weight_map": []}', '{"metadata": {}}', "not json"])
def test_corrupt_index(tiny_qwen3, tmp_path, index):
    bad = clone(tiny_qwen3, tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(index)
    problems = CheckpointSource("x", bad).scan()
    assert [p.code for p in problems] == ["corrupt_index"]
    assert f"{bad / 'model.safetensors.index.json'} has no valid weight_map" in str(problems[0])


def test_unknown_tensor_name(tiny_qwen3):
    with pytest.raises(MixedPrecisionError) as e:
        CheckpointSource("a", tiny_qwen3).tensor("model.ghost.weight")
    assert e.value.code == "missing_tensor" and "source 'a' has no tensor model.ghost.weight" in str(e.value)


@pytest.mark.parametrize(
    "file,text,needle",
    [
        ("config.json", "[]", "config.json is not a JSON object"),
        ("quantize_config.json", "{bits: 4", "quantize_config.json is not valid JSON"),
        ("quantize_config.json", "4", "quantize_config.json is not a JSON object"),
    ],
)
def test_corrupt_config_files(tiny_qwen3, tmp_path, file, text, needle):
    out = clone(tiny_qwen3, tmp_path / "m", skip=(file,))
    (out / file).write_text(text)
    with pytest.raises(MixedPrecisionError) as e:
        CheckpointSource("q", out).scheme
    assert (
        e.value.code == "corrupt_config"
        and needle in str(e.value)
        and f"restore the model's original {file}" in str(e.value)
    )


def test_index_and_files_disagree(tiny_qwen3, tmp_path):
    bad = clone(tiny_qwen3, tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.ghost.weight": "model.safetensors"}})
    )
    problems = CheckpointSource("x", bad).scan()
    assert [p.code for p in problems] == ["missing_tensor"] and "model.ghost.weight" in str(problems[0])


def test_missing_directory_config_and_weights(tmp_path):
    assert CheckpointSource("fp8", tmp_path / "nope").check_exists().code == "missing_source"
    (tmp_path / "empty").mkdir()
    assert CheckpointSource("fp8", tmp_path / "empty").check_exists().code == "missing_file"
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(MixedPrecisionError) as e:
        CheckpointSource("fp8", tmp_path / "empty").tensor_names
    assert e.value.code == "missing_file" and "no *.safetensors" in str(e.value)


# ---- formats ----------------------------------------------------------------------------------
def test_fp8_and_gptq_writers_match_the_format_specs(tiny_qwen3, tmp_path):
    fp8 = CheckpointSource("fp8", write_fp8_checkpoint(tiny_qwen3, tmp_path / "fp8"))
    gptq = CheckpointSource("int4", write_gptq_checkpoint(tiny_qwen3, tmp_path / "int4", shards=2))
    assert fp8.scheme.label() == "fp8-block128" and fp8.scheme.fp8_block == (128, 128)
    assert gptq.scheme.label() == "gptq-int4-g128" and gptq.quant_config["desc_act"] is False
    for source in (fp8, gptq):
        tensors = source.module_tensors("model.layers.0.mlp.down_proj")  # [N=512, K=1024]
        spec = expected_tensors(source.scheme, 512, 1024)
        for suffix, info in tensors.items():
            assert info.shape == spec[suffix].shape and info.dtype in spec[suffix].dtypes, (source.label, suffix)
        assert {s for s, t in spec.items() if not t.optional} <= set(tensors)
    # norms stay 16-bit in quantized sources
    assert gptq.module_tensors("model.norm")["weight"].dtype == "F16"


@pytest.mark.parametrize(
    "qc,needle",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "desc_act": False}, "asymmetric"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 256, "sym": True}, "group_size=256"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128, "sym": True}, "bits=3"),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "checkpoint_format": "marlin"},
            "checkpoint_format",
        ),
        ({"quant_method": "gptq", "group_size": 128}, "lacks bits"),
        ({"quant_method": "awq", "bits": 4}, "'awq'"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
        (["fp8"], "quantization_config is a list, not a mapping"),
        ({"quant_method": "compressed-tensors", "config_groups": {}}, "compressed-tensors config with 0 weight groups"),
        (
            {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
            "num_bits=4 type=int are not 8-bit float",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "group"}}},
            },
            "strategy 'group'",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {
                    "g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128]}}
                },
            },
            "block_structure [128] is not two positive integers",
        ),
    ],
)
def test_unsupported_schemes_say_why(qc, needle):
    with pytest.raises(MixedPrecisionError) as e:
        detect_scheme({"quantization_config": qc}, where="m/config.json")
    assert e.value.code == "unsupported_scheme" and needle in str(e.value) and "m/config.json" in str(e.value)


@pytest.mark.parametrize(
    "qc,label",
    [
        (None, "bf16"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8-block128"),
        ({"quant_method": "fp8"}, "fp8-tensor"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}},
            },
            "fp8-channel",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block"}}},
            },
            "fp8-block128",
        ),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": True}, "gptq-int4-gall"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 64, "sym": True, "desc_act": True}, "gptq-int8-g64-act"),
    ],
)
def test_detected_schemes(qc, label):
    cfg = {"dtype": "bfloat16"} if qc is None else {"quantization_config": qc}
    assert detect_scheme(cfg).label() == label


def test_old_quantize_config_json(tiny_qwen3, tmp_path):
    out = clone(tiny_qwen3, tmp_path / "m", skip=("config.json",))
    cfg = json.loads((tiny_qwen3 / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": 128, "sym": True, "desc_act": False})
    )
    assert CheckpointSource("q", out).scheme.label() == "gptq-int4-g128"


def _bin_with_pid(path, pid):
    """A zip in torch.save's layout whose data.pkl is {"w": <persistent id ``pid``>}."""
    import io
    import pickle

    class Storage:  # stands in for the tensor torch would pickle by persistent id
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return pid if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Storage()})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", b"\0" * 16)
    return path


@pytest.mark.parametrize(
    "pid,needle",
    [
        ("tensor0", "UnpicklingError: unexpected persistent id 'tensor0'"),
        (("storage", "BFloat16Storage", "0", "cpu", 8), "UnpicklingError: unsupported storage type 'BFloat16Storage'"),
    ],
)
def test_torch_bin_bad_persistent_ids_name_the_file(tmp_path, pid, needle):
    """A storage reference that is not torch's ('storage', torch.<X>Storage, key, location, numel)."""
    path = _bin_with_pid(tmp_path / "pytorch_model.bin", pid)
    with pytest.raises(MixedPrecisionError) as e:
        read_bin_tensors(path)
    assert e.value.code == "corrupt_checkpoint" and e.value.where == str(path)
    assert e.value.detail == f"pytorch_model.bin is not a readable PyTorch state dict: {needle}"
    assert "torch.save" in e.value.fix and "safetensors" in e.value.fix
