"""Model-directory dressing for each output: config.json with quantization_config, side files, fp16 copy."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..core.formats import Scheme, quantization_config
from .model_dir import SIDE_FILES, InputModel
from .plan import ConversionPlan


def fp8_quantization_config(plan: ConversionPlan, dtype: str) -> dict:
    """fp8/'s quantization_config: block FP8, with what stayed 16-bit listed."""
    scheme = Scheme("fp8", dtype=dtype, fp8_block=plan.fp8_block, fp8_strategy="block")
    return quantization_config(scheme, not_converted=plan.kept + plan.skipped_groups)


def gptq_quantization_config(
    plan: ConversionPlan, dtype: str, *, desc_act: bool, damp_percent: float, method: str
) -> dict:
    """int4/'s quantization_config: GPTQ v1, with how it was made and what --skip left 16-bit."""
    scheme = Scheme("gptq", dtype=dtype, bits=4, group_size=plan.group_size, sym=True, desc_act=desc_act)
    return quantization_config(
        scheme,
        skipped_groups=plan.skipped_groups,
        damp_percent=damp_percent,
        quantizer=f"sglang-mixed-precision:{method}",
    )


def copy_side_files(src: InputModel, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src.path / name).exists():
            shutil.copy2(src.path / name, dst / name)


def write_config(src: InputModel, dst: Path, quantization_config: dict | None) -> None:
    cfg = dict(src.config)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link when on the same filesystem (no bytes copied), copy otherwise."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def write_fp16(src: InputModel, dst: Path, progress=print) -> None:
    """The original tensors, byte for byte: shards and index linked or copied, not re-encoded."""
    copy_side_files(src, dst)
    how = set()
    for f in src.files:
        how.add(link_or_copy(src.path / f, dst / f))
    index = src.path / "model.safetensors.index.json"
    if index.exists():
        shutil.copy2(index, dst / index.name)
    else:
        weight_map = dict(sorted(src.weight_map.items()))
        (dst / index.name).write_text(
            json.dumps({"metadata": {"total_size": src.total_bytes}, "weight_map": weight_map}, indent=2)
        )
    write_config(src, dst, None)
    progress(f"fp16: {len(src.files)} shard(s) {'/'.join(sorted(how))} into {dst}")
