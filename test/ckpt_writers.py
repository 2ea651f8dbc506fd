"""Round-to-nearest FP8-block and GPTQ writers for tests: quantized sources of a tiny bf16 model,
quantized and packed by the converter's own functions (only the checkpoint assembly lives here).

Layouts follow the official releases: FP8 ``weight`` float8_e4m3fn + ``weight_scale_inv`` f32 per
[128, 128] block (quant_method fp8); GPTQ v1 ``qweight`` int32 [K/8, N], ``qzeros`` int32
[groups, N/8] (stored zero - 1), ``scales`` f16 [groups, N], ``g_idx`` int32 [K].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sglang_mixed_precision.convert.fp8_block import quantize_fp8_block
from sglang_mixed_precision.convert.gptq_pack import rtn_quantize
from sglang_mixed_precision.core.naming import classify, split_tensor_name

_COPY = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def is_quantizable_linear(name: str, tensor: torch.Tensor) -> bool:
    module, suffix = split_tensor_name(name)
    return suffix == "weight" and tensor.dim() == 2 and classify(module).role.quantizable


def _write(out: Path, src: Path, state: dict[str, torch.Tensor], quant_config: dict, dtype: str, shards: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quant_config
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in _COPY:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    names = sorted(state)
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def write_fp8_checkpoint(src: Path, out: Path, *, block=(128, 128), shards: int = 1, only=None) -> Path:
    """FP8-block copy of ``src``; ``only(module)`` limits which linears are quantized."""
    src, state = Path(src), {}
    for name, t in load_state(src).items():
        if is_quantizable_linear(name, t) and (only is None or only(split_tensor_name(name)[0])):
            state[name], state[name + "_scale_inv"] = quantize_fp8_block(t, block)
        else:
            state[name] = t.contiguous()
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return _write(Path(out), src, state, qc, "bfloat16", shards)


def write_gptq_checkpoint(
    src: Path,
    out: Path,
    *,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    shards: int = 1,
    only=None,
    config_overrides: dict | None = None,
) -> Path:
    """GPTQ v1 copy of ``src``; non-quantized tensors become fp16 as in the official GPTQ releases.
    ``config_overrides`` writes a different quantization_config than the data (unsupported-scheme tests)."""
    src, state = Path(src), {}
    for name, t in load_state(src).items():
        module, _ = split_tensor_name(name)
        if is_quantizable_linear(name, t) and (only is None or only(module)):
            state.update(rtn_quantize(t, group_size).as_dict(module))
        else:
            state[name] = t.to(torch.float16).contiguous()
    qc = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "sym": sym,
        "desc_act": desc_act,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
        **(config_overrides or {}),
    }
    return _write(Path(out), src, state, qc, "float16", shards)


def rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A copy of a single-file checkpoint whose state dict went through ``edit(state)`` (tests of
    broken sources: dropped tensors, wrong shapes)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    state = load_state(src)
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
