"""The 16-bit input model directory: config, tensor -> shard map, headers, and input checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import MixedPrecisionError

# Architectures whose tensor names naming.classify() understands and whose decoder layers the
# calibration forward can run through transformers.
SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
)
SIXTEEN_BIT = ("BF16", "F16", "F32")
QUANTIZED_SUFFIXES = ("qweight", "qzeros", "weight_scale_inv", "weight_scale", "input_scale", "weight_packed")
# Files that make a directory a usable model besides its weights (copied to every output).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    file: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I32": 4, "I64": 8, "I8": 1, "U8": 1}.get(self.dtype, 4)
        n = 1
        for d in self.shape:
            n *= d
        return n * size


class InputModel:
    """A Hugging Face model directory with safetensors weights, read header-first."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles: dict[str, object] = {}
        self._check_is_model_dir()
        self.config: dict = json.loads((self.path / "config.json").read_text())

    def _check_is_model_dir(self) -> None:
        p = self.path
        if not p.is_dir():
            raise MixedPrecisionError("not_a_model_dir", "the model path is not a directory", where=str(p),
                                      fix="pass --model_path pointing at a Hugging Face model directory")
        if not (p / "config.json").exists():
            raise MixedPrecisionError("not_a_model_dir", "no config.json in the model directory", where=str(p),
                                      fix="pass the directory that holds config.json and the *.safetensors weights")
        if not list(p.glob("*.safetensors")):
            has_bin = bool(list(p.glob("*.bin")))
            raise MixedPrecisionError(
                "not_a_model_dir",
                "no *.safetensors weights in the model directory" + (" (only .bin files)" if has_bin else ""),
                where=str(p),
                fix="save the model with safe_serialization=True (model.save_pretrained(dir)) and retry",
            )

    # -- tensors ------------------------------------------------------------------------------
    @cached_property
    def weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        from safetensors import safe_open

        files = sorted(f.name for f in self.path.glob("*.safetensors"))
        out: dict[str, str] = {}
        for f in files:
            with safe_open(str(self.path / f), "pt") as h:
                for k in h.keys():
                    out[k] = f
        return out

    @cached_property
    def tensors(self) -> dict[str, TensorMeta]:
        out = {}
        for name, file in self.weight_map.items():
            s = self._handle(file).get_slice(name)
            out[name] = TensorMeta(name, file, s.get_dtype(), tuple(s.get_shape()))
        return out

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            path = self.path / file
            if not path.exists():
                raise MixedPrecisionError("missing_shard", f"the index names {file}, which does not exist",
                                          where=str(path), fix="restore the missing shard or fix model.safetensors.index.json")
            self._handles[file] = safe_open(str(path), "pt")
        return self._handles[file]

    def read(self, name: str):
        """One tensor, read from its shard (memory-mapped; only this tensor is materialised)."""
        return self._handle(self.weight_map[name]).get_tensor(name)

    def release(self) -> None:
        self._handles.clear()

    # -- checks -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type", "?")

    def check_supported(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise MixedPrecisionError(
                "unsupported_architecture",
                f"architecture {self.architecture} is not supported by the converter",
                where=str(self.path / "config.json"),
                fix=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            )

    def check_not_quantized(self) -> None:
        qc = self.config.get("quantization_config")
        if qc:
            raise MixedPrecisionError(
                "already_quantized",
                f"the input is already quantized (quantization_config.quant_method={qc.get('quant_method')!r})",
                where=str(self.path / "config.json"),
                fix="convert from the original 16-bit (bf16/fp16) model, or use this checkpoint directly as a source",
            )
        for t in self.tensors.values():
            suffix = t.name.rsplit(".", 1)[-1]
            if suffix in QUANTIZED_SUFFIXES or t.dtype not in SIXTEEN_BIT:
                raise MixedPrecisionError(
                    "already_quantized",
                    f"tensor {t.name} is {t.dtype} / '{suffix}', not a 16-bit weight",
                    where=f"{self.path / t.file}:{t.name}",
                    fix="convert from the original 16-bit (bf16/fp16) model",
                )
