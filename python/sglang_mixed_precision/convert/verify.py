"""Reload each written output with the independent dequantizers and measure it against the input.

Per quantized module: relative Frobenius error ||deq(W_q) - W|| / ||W||. Per kept module: the
tensor must be bit-identical. Reads one tensor at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.formats.fp8 import dequant_block as dequant_fp8_block
from ..core.formats.gptq import dequant as dequant_gptq
from ..core.naming import classify
from .gptq_pack import GPTQ_SUFFIXES
from .model_dir import InputModel
from .plan import ConversionPlan
from .writer import INDEX_FILE

# Default gates for --verify: fp8 e4m3 keeps ~3 mantissa bits (relative error ~2-3 %);
# int4 with 128-wide groups lands near 10 % on Gaussian weights, GPTQ a little above RTN.
DEFAULT_MAX_ERROR = {"fp8": 0.08, "int4": 0.30}


class OutputReader:
    """Tensors of a written output directory, given its tensor -> shard map."""

    def __init__(self, path: Path, weight_map: dict[str, str]):
        self.path = path
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    @classmethod
    def from_index(cls, path: Path) -> OutputReader:
        return cls(path, json.loads((path / INDEX_FILE).read_text())["weight_map"])

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, name: str) -> torch.Tensor:
        f = self.weight_map[name]
        if f not in self._handles:
            from safetensors import safe_open

            self._handles[f] = safe_open(str(self.path / f), "pt")
        return self._handles[f].get_tensor(name)

    def gptq_weight(self, module: str) -> torch.Tensor:
        """A GPTQ module's weight, dequantized to float32 [N, K]."""
        return dequant_gptq(*(self.read(f"{module}.{s}") for s in GPTQ_SUFFIXES))

    def release(self) -> None:
        self._handles.clear()


@dataclass
class OutputCheck:
    fmt: str
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative error
    problems: list[str] = field(default_factory=list)

    def by_role(self) -> dict[str, tuple[int, float, float]]:
        acc: dict[str, list[float]] = {}
        for m, e in self.errors.items():
            acc.setdefault(classify(m).role.value, []).append(e)
        return {r: (len(v), sum(v) / len(v), max(v)) for r, v in sorted(acc.items())}

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.errors.items(), key=lambda kv: -kv[1])[:n]


def relative_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((approx.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def _dequant(fmt: str, reader: OutputReader, module: str, block) -> torch.Tensor:
    if fmt == "fp8":
        return dequant_fp8_block(reader.read(f"{module}.weight"), reader.read(f"{module}.weight_scale_inv"), block)
    return reader.gptq_weight(module)


def _expected_tensors(fmt: str, module: str) -> list[str]:
    suffixes = ("weight", "weight_scale_inv") if fmt == "fp8" else GPTQ_SUFFIXES
    return [f"{module}.{s}" for s in suffixes]


def check_output(fmt: str, out_dir: Path, model: InputModel, plan: ConversionPlan) -> OutputCheck:
    reader = OutputReader.from_index(out_dir)
    check = OutputCheck(fmt)
    for module, meta in plan.quantized.items():
        missing = [t for t in _expected_tensors(fmt, module) if not reader.has(t)]
        if missing:
            check.problems.append(f"{fmt}: missing {', '.join(missing)}")
            continue
        check.errors[module] = relative_error(_dequant(fmt, reader, module, plan.fp8_block), model.read(meta.name))
        if len(check.errors) % 16 == 0:  # unmap what was read so far: bounded resident memory
            model.release()
            reader.release()
    for name in model.tensors:
        module = name.rsplit(".", 1)[0]
        if module in plan.quantized and name.endswith(".weight"):
            continue
        if not reader.has(name):
            check.problems.append(f"{fmt}: missing 16-bit tensor {name}")
        elif not torch.equal(reader.read(name), model.read(name)):
            check.problems.append(f"{fmt}: 16-bit tensor {name} differs from the input")
    return check


def format_check(check: OutputCheck) -> str:
    lines = [f"  {check.fmt}: {len(check.errors)} quantized modules, relative weight error by role"]
    for role, (n, mean, mx) in check.by_role().items():
        lines.append(f"    {role:<15} n={n:<5} mean={mean:.4f} max={mx:.4f}")
    lines += [f"    worst: {m} {e:.4f}" for m, e in check.worst(3)]
    lines += [f"    PROBLEM {p}" for p in check.problems[:20]]
    return "\n".join(lines)
