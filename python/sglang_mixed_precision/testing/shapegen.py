"""Shape-only checkpoints: valid safetensors headers over sparse data, from a real config.json.

Planning reads headers only, so a 470 GB model can be planned from files that take a few MB of
disk: each shard is a real header followed by a hole (``truncate`` to the size the header
promises), which passes the header-vs-file-size check. Tensor names are those ``core.architectures``
expects of the config's family; quantized shards store exactly what the format modules expect (FP8 block weight
+ ``weight_scale_inv``; GPTQ ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from math import prod
from pathlib import Path

from ..core.architectures import ARCHITECTURES, ExpectedModule, expected_modules
from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.formats import DTYPE_BYTES, Scheme, config_dtype, quantization_config, release_tensors
from ..core.geometry import ModelGeometry
from ..core.naming import classify

DEFAULT_SHARD_BYTES = 5 * 2**30


def expected(hf_config: dict) -> dict[str, ExpectedModule]:
    """Every module (and its tensors) a checkpoint of ``hf_config`` holds, from the architecture table."""
    g = ModelGeometry.from_hf_config(hf_config)
    modules = expected_modules(hf_config, g)
    if modules is None:
        raise MixedPrecisionError(
            ErrorCode.UNSUPPORTED_ARCHITECTURE,
            f"no shape-only checkpoint for model_type {g.model_type!r}: its module names are not known",
            fix=f"use one of: {', '.join(ARCHITECTURES)}",
        )
    return modules


def module_names(hf_config: dict) -> Iterator[str]:
    """Checkpoint module names of a decoder-only model, in HF order."""
    yield from expected(hf_config)


def tensor_specs(hf_config: dict, scheme: Scheme | None = None) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor a checkpoint of ``scheme`` stores."""
    g = ModelGeometry.from_hf_config(hf_config)
    dense_dtype = (scheme and scheme.format.release_dense_dtype) or config_dtype(hf_config)
    for module in expected(hf_config).values():
        ref = classify(module.name)
        shape = g.weight_shape(ref)
        if shape is None:
            raise ValueError(f"no shape for {module.name} in a {g.model_type} config")
        if scheme is not None and scheme.quantized and ref.role.quantizable:
            for suffix, spec in release_tensors(scheme, *shape).items():
                yield f"{module.name}.{suffix}", spec.dtypes[0], spec.shape
        else:
            yield f"{module.name}.weight", dense_dtype, shape
        if "bias" in module.tensors:
            yield f"{module.name}.bias", dense_dtype, shape[:1]
        if "e_score_correction_bias" in module.tensors:  # DeepSeek-V3's router: one float32 per expert
            yield f"{module.name}.e_score_correction_bias", "F32", shape[:1]


def write_shape_checkpoint(
    hf_config: dict,
    out_dir: str | Path,
    scheme: Scheme | None = None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
    drop=None,
    index: bool = True,
) -> Path:
    """Write config.json, sparse safetensors shards and model.safetensors.index.json (unless not
    ``index``). ``drop(name)`` leaves tensors out: an incomplete checkpoint, for tests."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(hf_config)
    qc = quantization_config(scheme) if scheme is not None else None
    if qc:
        cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in tensor_specs(hf_config, scheme):
        if drop is not None and drop(name):
            continue
        n = DTYPE_BYTES[dtype] * prod(shape)
        if size + n > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += n
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += _write_sparse_shard(out / fname, tensors)
        weight_map.update(dict.fromkeys((t[0] for t in tensors), fname))
        if progress:
            progress(f"{out.name}: wrote {fname} ({len(tensors)} tensors)")
    if index:
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json))
    return out


def _write_sparse_shard(path: Path, tensors) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in tensors:
        n = DTYPE_BYTES[dtype] * prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no data blocks are allocated
    return offset
