"""Checkpoints and configs shared by the reload tests: a tiny Qwen3 in bf16, two fp8-block sources
with different MLP weights, two GPTQ sources, and YAML for the mixes between them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckpt_writers import rewrite_checkpoint, write_fp8_checkpoint, write_gptq_checkpoint
from sglang_mixed_precision.core.config import parse_config
from sglang_mixed_precision.core.plan import build_plan

MLP_FP8 = """
mixed_precision:
  fp16_path: {bf16}
  sources: {{fp8: {fp8}, int4: {int4}}}
  rules:
    - {{match: "model.layers.*.mlp.*", source: {mlp}}}
"""


def perturb_mlp(state: dict) -> None:
    """Another model's MLP weights (same shapes): what the second fp8 checkpoint is made from."""
    gen = torch.Generator().manual_seed(7)
    for name, t in state.items():
        if ".mlp." in name and name.endswith(".weight"):
            state[name] = (t.float() + 0.5 * t.float().std() * torch.randn(t.shape, generator=gen)).to(t.dtype)


class Mix:
    def __init__(self, root: Path, bf16: Path):
        self.root = root
        self.bf16 = bf16
        perturbed = rewrite_checkpoint(bf16, root / "bf16_b", perturb_mlp)
        self.fp8_a = write_fp8_checkpoint(bf16, root / "fp8_a")
        self.fp8_b = write_fp8_checkpoint(perturbed, root / "fp8_b")
        self.int4_a = write_gptq_checkpoint(bf16, root / "int4_a")
        self.int4_b = write_gptq_checkpoint(perturbed, root / "int4_b")

    def yaml(self, mlp: str = "fp8", fp8: Path | None = None, int4: Path | None = None) -> str:
        return MLP_FP8.format(bf16=self.bf16, fp8=fp8 or self.fp8_a, int4=int4 or self.int4_a, mlp=mlp)

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def plan(self, text: str, name: str = "active.yaml", tp_size: int = 1):
        return build_plan(parse_config(text, self.root / name), tp_size=tp_size)


@pytest.fixture(scope="session")
def mix(tiny_qwen3, tmp_path_factory) -> Mix:
    return Mix(tmp_path_factory.mktemp("reload_mix"), tiny_qwen3)
