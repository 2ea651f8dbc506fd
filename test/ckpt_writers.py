"""Round-to-nearest FP8-block and GPTQ writers for tests: quantized sources of a tiny bf16 model.

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

from sglang_mixed_precision.naming import classify, split_tensor_name

FP8_MAX = 448.0
_COPY = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def is_quantizable_linear(name: str, tensor: torch.Tensor) -> bool:
    module, suffix = split_tensor_name(name)
    return suffix == "weight" and tensor.dim() == 2 and classify(module).role.quantizable


def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    bn, bk = block
    n, k = w.shape
    pad = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk, dtype=torch.float32)
    pad[:n, :k] = w.float()
    blocks = pad.view(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(pad)[:n, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.float().contiguous()


def gptq_quantize(w: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Symmetric RTN in the GPTQ v1 layout (zero point 2^(bits-1), stored minus one)."""
    n, k = w.shape
    pack, maxq = 32 // bits, (1 << bits) - 1
    g = k if group == -1 else group
    wt = w.float().t().contiguous()  # [K, N]
    grouped = wt.view(k // g, g, n)
    scale = (grouped.abs().amax(dim=1) / (maxq // 2 + 0.5)).clamp(min=1e-8)  # [G, N]
    zero = (maxq + 1) // 2
    q = (torch.round(grouped / scale[:, None, :]) + zero).clamp(0, maxq).to(torch.int64).view(k, n)
    qweight = torch.zeros(k // pack, n, dtype=torch.int64)
    for j in range(pack):
        qweight |= q[j::pack] << (bits * j)
    zeros = torch.full((k // g, n), zero - 1, dtype=torch.int64)
    qzeros = torch.zeros(k // g, n // pack, dtype=torch.int64)
    for j in range(pack):
        qzeros |= zeros[:, j::pack] << (bits * j)
    return {
        "qweight": _as_int32(qweight),
        "qzeros": _as_int32(qzeros),
        "scales": scale.to(torch.float16),
        "g_idx": (torch.arange(k, dtype=torch.int32) // g),
    }


def _as_int32(packed: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (held in int64) as the int32 bit pattern GPTQ stores."""
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


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
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def write_fp8_checkpoint(src: Path, out: Path, *, block=(128, 128), shards: int = 1, only=None) -> Path:
    """FP8-block copy of ``src``; ``only(module)`` limits which linears are quantized."""
    src, state = Path(src), {}
    for name, t in load_state(src).items():
        if is_quantizable_linear(name, t) and (only is None or only(split_tensor_name(name)[0])):
            q, s = fp8_block_quantize(t, block)
            state[name], state[name + "_scale_inv"] = q, s
        else:
            state[name] = t.contiguous()
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return _write(Path(out), src, state, qc, "bfloat16", shards)


def write_gptq_checkpoint(src: Path, out: Path, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                          desc_act: bool = False, shards: int = 1, only=None, config_overrides: dict | None = None) -> Path:
    """GPTQ v1 copy of ``src``; non-quantized tensors become fp16 as in the official GPTQ releases.
    ``config_overrides`` writes a different quantization_config than the data (unsupported-scheme tests)."""
    src, state = Path(src), {}
    for name, t in load_state(src).items():
        module, _ = split_tensor_name(name)
        if is_quantizable_linear(name, t) and (only is None or only(module)):
            for suffix, value in gptq_quantize(t, bits, group_size).items():
                state[f"{module}.{suffix}"] = value.contiguous()
        else:
            state[name] = t.to(torch.float16).contiguous()
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
          "damp_percent": 0.01, "checkpoint_format": "gptq", **(config_overrides or {})}
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
