"""Model-directory dressing for each output: config.json with quantization_config, side files, fp16 copy."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .model_dir import SIDE_FILES, InputModel
from .plan import ConversionPlan


def fp8_quantization_config(plan: ConversionPlan) -> dict:
    """Qwen3-FP8 / DeepSeek-V3 block layout, as SGLang's Fp8Config reads it."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(plan.fp8_block),
        "modules_to_not_convert": plan.kept + plan.skipped_groups,
    }


def gptq_quantization_config(plan: ConversionPlan, *, desc_act: bool, damp_percent: float, method: str) -> dict:
    """GPTQ v1 fields as GPTQModel writes them; SGLang reads bits, group_size, desc_act, sym,
    lm_head, dynamic and checkpoint_format. ``dynamic`` "-:" rules keep --skip groups 16-bit."""
    import re

    dynamic = {f"-:{re.escape(g)}$": {} for g in plan.skipped_groups}
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": plan.group_size,
        "sym": True,
        "desc_act": desc_act,
        "damp_percent": damp_percent,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "dynamic": dynamic,
        "quantizer": [f"sglang-mixed-precision:{method}"],
    }


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
