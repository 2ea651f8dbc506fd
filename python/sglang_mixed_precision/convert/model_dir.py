"""The 16-bit input model directory: config, tensor -> shard map, headers, and input checks.

Headers, tensor reads and the shard handles are those of :class:`CheckpointSource`, the reader
planning uses; this adds the converter's input checks.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ..core.architectures import describe_missing_tensors, expected_modules, missing_16bit_tensors
from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.formats import FLOAT_DTYPES
from ..core.geometry import ModelGeometry
from ..core.sources import CheckpointSource, TensorInfo
from ..tensors import TensorReader

# Architectures whose tensor names naming.classify() understands and whose decoder layers the
# calibration forward can run through transformers.
SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV3ForCausalLM",
)
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


class InputModel:
    """A Hugging Face model directory with safetensors weights, read header-first."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._check_is_model_dir()
        self.source = CheckpointSource("input", self.path)
        self._reader = TensorReader(self.source)
        self.config: dict = self.source.hf_config

    def _check_is_model_dir(self) -> None:
        p = self.path
        if not p.is_dir():
            raise MixedPrecisionError(
                ErrorCode.NOT_A_MODEL_DIR,
                "the model path is not a directory",
                where=str(p),
                fix="pass --model_path pointing at a Hugging Face model directory",
            )
        if not (p / "config.json").exists():
            raise MixedPrecisionError(
                ErrorCode.NOT_A_MODEL_DIR,
                "no config.json in the model directory",
                where=str(p),
                fix="pass the directory that holds config.json and the *.safetensors weights",
            )
        if not list(p.glob("*.safetensors")):
            has_bin = bool(list(p.glob("*.bin")))
            raise MixedPrecisionError(
                ErrorCode.NOT_A_MODEL_DIR,
                "no *.safetensors weights in the model directory" + (" (only .bin files)" if has_bin else ""),
                where=str(p),
                fix="save the model with safe_serialization=True (model.save_pretrained(dir)) and retry",
            )

    # -- tensors ------------------------------------------------------------------------------
    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.source.tensors

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor -> shard file name."""
        return {name: t.file.name for name, t in self.tensors.items()}

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @cached_property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str):
        """One tensor, read from its shard (memory-mapped; only this tensor is materialised)."""
        return self._reader.read(name)

    def release(self) -> None:
        self._reader.close()

    # -- checks -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type", "?")

    def check_supported(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise MixedPrecisionError(
                ErrorCode.UNSUPPORTED_ARCHITECTURE,
                f"architecture {self.architecture} is not supported by the converter",
                where=str(self.path / "config.json"),
                fix=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            )

    def check_complete(self) -> None:
        """Every tensor config.json implies is in the input (or nothing is written): a missing shard or
        layer would otherwise become an incomplete fp16/ fp8/ int4/."""
        config = self.path / "config.json"
        geometry = ModelGeometry.from_hf_config(self.config, where=str(config))
        expected = expected_modules(self.config, geometry)
        if expected is None:
            return
        missing = missing_16bit_tensors(expected, self.source.tensor_names)
        if missing:
            raise MixedPrecisionError(
                ErrorCode.MISSING_TENSOR,
                f"the input lacks {len(missing)} tensor(s) that its config.json ({geometry.model_type}, "
                f"{geometry.layers} layers) implies: {describe_missing_tensors(missing, expected)}",
                where=str(self.path),
                fix="the model is incomplete (an interrupted download, a deleted shard?): download it again",
            )

    def check_not_quantized(self) -> None:
        qc = self.config.get("quantization_config")
        if qc:
            raise MixedPrecisionError(
                ErrorCode.ALREADY_QUANTIZED,
                f"the input is already quantized (quantization_config.quant_method={qc.get('quant_method')!r})",
                where=str(self.path / "config.json"),
                fix="convert from the original 16-bit (bf16/fp16) model, or use this checkpoint directly as a source",
            )
        for t in self.tensors.values():
            suffix = t.name.rsplit(".", 1)[-1]
            if suffix in QUANTIZED_SUFFIXES or t.dtype not in FLOAT_DTYPES:
                raise MixedPrecisionError(
                    ErrorCode.ALREADY_QUANTIZED,
                    f"tensor {t.name} is {t.dtype} / '{suffix}', not a 16-bit weight",
                    where=f"{t.file}:{t.name}",
                    fix="convert from the original 16-bit (bf16/fp16) model",
                )
