"""Model-directory dressing for each output: config.json with quantization_config, side files, fp16 copy.

Every file is written atomically (files.py): a rerun never finds a half-written one under its name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.formats import Scheme, quantization_config
from . import files
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
            files.copy_file(src.path / name, dst / name)


def write_config(src: InputModel, dst: Path, quantization_config: dict | None) -> None:
    cfg = dict(src.config)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    files.write_text(dst / "config.json", json.dumps(cfg, indent=2) + "\n")


def write_fp16(src: InputModel, dst: Path, progress=print) -> None:
    """The original tensors, byte for byte: shards and index linked or copied, not re-encoded."""
    copy_side_files(src, dst)
    how = set()
    for f in src.files:
        how.add(files.link_or_copy(src.path / f, dst / f))
    index = src.path / "model.safetensors.index.json"
    if index.exists():
        files.copy_file(index, dst / index.name)
    else:
        weight_map = dict(sorted(src.weight_map.items()))
        files.write_text(
            dst / index.name,
            json.dumps({"metadata": {"total_size": src.total_bytes}, "weight_map": weight_map}, indent=2),
        )
    write_config(src, dst, None)
    progress(f"fp16: {len(src.files)} shard(s) {'/'.join(sorted(how))} into {dst}")


# -- how much the outputs take -----------------------------------------------------------------
def _fp8_bytes(shape: tuple[int, ...], block: tuple[int, int]) -> int:
    n, k = shape
    return n * k + 4 * math.ceil(n / block[0]) * math.ceil(k / block[1])  # e4m3 weight + f32 tile scales


def _int4_bytes(shape: tuple[int, ...], group_size: int) -> int:
    n, k = shape
    groups = math.ceil(k / (k if group_size == -1 else group_size))
    return n * k // 2 + groups * n * 2 + groups * n // 2 + 4 * k  # qweight, f16 scales, qzeros, g_idx


def estimate_bytes(src: InputModel, plan: ConversionPlan, formats: tuple[str, ...], fp16_links: bool) -> int:
    """About what fp16/ fp8/ int4/ take on disk (fp16/ nothing when its shards are hard links)."""
    quantized = {f"{m}.weight": t.shape for m, t in plan.quantized.items()}
    kept = sum(t.nbytes for n, t in src.tensors.items() if n not in quantized)
    total = 0
    if "fp16" in formats and not fp16_links:
        total += src.total_bytes
    if "fp8" in formats:
        total += kept + sum(_fp8_bytes(s, plan.fp8_block) for s in quantized.values())
    if "int4" in formats:
        total += kept + sum(_int4_bytes(s, plan.group_size or 128) for s in quantized.values())
    return total


def bytes_on_disk(out: Path, formats: tuple[str, ...]) -> int:
    """What an earlier run already wrote there (hard links to the input cost nothing)."""
    total = 0
    for f in formats:
        for p in (Path(out) / f).glob("*"):
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and st.st_nlink == 1:
                total += st.st_size
    return total
