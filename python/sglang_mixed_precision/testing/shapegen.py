"""Shape-only checkpoints: valid safetensors headers over sparse data, from a real config.json.

Planning reads headers only, so a 470 GB model can be planned from files that take a few MB of
disk: each shard is a real header followed by a hole (``truncate`` to the size the header
promises), which passes the header-vs-file-size check. Tensor names follow the Qwen3 / Qwen3-MoE /
Llama layouts; quantized shards store exactly what the format modules expect (FP8 block weight
+ ``weight_scale_inv``; GPTQ ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from math import prod
from pathlib import Path

from ..core.formats import DTYPE_BYTES, Scheme, config_dtype, quantization_config, release_tensors
from ..core.geometry import ModelGeometry
from ..core.naming import classify

DEFAULT_SHARD_BYTES = 5 * 2**30


def module_names(hf_config: dict) -> Iterator[str]:
    """Checkpoint module names of a decoder-only model, in HF order."""
    g = ModelGeometry.from_hf_config(hf_config)
    qk_norm = g.model_type.startswith("qwen3")
    yield "model.embed_tokens"
    for i in range(g.layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{proj}"
        if qk_norm:
            yield f"{p}.self_attn.q_norm"
            yield f"{p}.self_attn.k_norm"
        if g.is_moe_layer(i):
            yield f"{p}.mlp.gate"
            for e in range(g.num_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    yield f"{p}.mlp.experts.{e}.{proj}"
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield f"{p}.mlp.{proj}"
        yield f"{p}.post_attention_layernorm"
    yield "model.norm"
    if not g.tie_word_embeddings:
        yield "lm_head"


def tensor_specs(hf_config: dict, scheme: Scheme | None = None) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor a checkpoint of ``scheme`` stores."""
    g = ModelGeometry.from_hf_config(hf_config)
    dense_dtype = (scheme and scheme.format.release_dense_dtype) or config_dtype(hf_config)
    for module in module_names(hf_config):
        ref = classify(module)
        shape = g.weight_shape(ref)
        if shape is None:
            raise ValueError(f"no shape for {module} in a {g.model_type} config")
        if scheme is not None and scheme.quantized and ref.role.quantizable:
            for suffix, spec in release_tensors(scheme, *shape).items():
                yield f"{module}.{suffix}", spec.dtypes[0], spec.shape
        else:
            yield f"{module}.weight", dense_dtype, shape


def write_shape_checkpoint(
    hf_config: dict,
    out_dir: str | Path,
    scheme: Scheme | None = None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
) -> Path:
    """Write config.json, sparse safetensors shards and model.safetensors.index.json."""
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
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
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
