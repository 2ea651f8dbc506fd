"""The plan directory: a model directory plain SGLang serves as the mix.

It holds the skeleton's 16-bit ``config.json`` with ``quantization_config: {quant_method:
mixed_precision, config_path: <abs YAML>, tp_size: N, ...}``, the tokenizer and generation files,
and ``mixed_precision_plan.json`` (the resolved plan, for people). No weights: with the plugin
installed, ``python -m sglang.launch_server --model-path <dir>`` and ``sglang.Engine(model_path=<dir>)``
rebuild the plan from the YAML in every process and stream each tensor from its source.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..core.errors import ErrorCode, MixedPrecisionError
from . import QUANT_METHOD
from .methods import int4_moe_kernels
from .settings import DEFAULT_INT4_MOE_KERNEL, PlanSettings

PLAN_FILE = "mixed_precision_plan.json"
# Files SGLang's tokenizer manager and chat templates read from the model directory.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def plan_config_json(plan, settings: PlanSettings) -> dict:
    """The skeleton's config.json with the mixed quantization_config in place of its own."""
    cfg = {k: v for k, v in plan.hf_config.items() if k not in ("quantization_config", "compression_config")}
    cfg["quantization_config"] = settings.to_quantization_config()
    return cfg


def write_plan_dir(plan, settings: PlanSettings, out_dir: str | Path) -> Path:
    """Write (or refresh) the plan directory for ``plan``; returns its path."""
    out = Path(out_dir).expanduser().resolve()
    _check_target(out)
    side_files = _side_files(plan)
    if not any(name.startswith("tokenizer") for name in side_files):  # checked before anything is written
        raise MixedPrecisionError(
            ErrorCode.PLAN_DIR_NO_TOKENIZER,
            "no source holds tokenizer files",
            where=str(plan.skeleton_path),
            fix="copy the model's tokenizer files into its 16-bit directory",
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(plan_config_json(plan, settings), indent=2) + "\n")
    for name, src in side_files.items():
        shutil.copyfile(src, out / name)
    plan_json = plan.to_json()
    plan_json["settings"] = settings.to_quantization_config()
    plan_json["int4_moe_kernels"] = int4_moe_kernels(plan, settings.int4_moe_kernel)
    (out / PLAN_FILE).write_text(json.dumps(plan_json, indent=2, default=str) + "\n")
    return out


def make_plan_dir(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    tp_size: int = 1,
    skeleton: str | None = None,
    int4_moe_kernel: str = DEFAULT_INT4_MOE_KERNEL,
):
    """Load and validate ``config_path`` at ``tp_size``, then write its plan directory: (plan, path)."""
    from ..core.config import load_config
    from ..core.plan import build_plan

    config_path = Path(config_path).expanduser().resolve()
    plan = build_plan(load_config(config_path), tp_size=tp_size, skeleton=skeleton)
    int4_moe_kernels(plan, int4_moe_kernel)  # an explicit kernel that cannot run some experts: refused here
    settings = PlanSettings(str(config_path), tp_size, skeleton, int4_moe_kernel)
    return plan, write_plan_dir(plan, settings, out_dir)


def is_plan_dir(path: str | Path) -> bool:
    return _mixed_quantization_config(path) is not None


def saved_settings(path: str | Path) -> PlanSettings | None:
    """The settings a plan directory was written with; None when ``path`` is no plan directory."""
    qc = _mixed_quantization_config(path)
    return None if qc is None else PlanSettings.from_quantization_config(qc)


def _mixed_quantization_config(path: str | Path) -> dict | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except ValueError:
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def _check_target(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise MixedPrecisionError(
            ErrorCode.PLAN_DIR_TARGET,
            f"{out} exists and is not a directory",
            where=str(out),
            fix="choose a new directory for the plan",
        )
    weights = [p.name for pattern in WEIGHT_PATTERNS for p in out.glob(pattern)]
    if weights or ((out / "config.json").is_file() and not is_plan_dir(out)):
        raise MixedPrecisionError(
            ErrorCode.PLAN_DIR_TARGET,
            f"{out} is a model directory ({', '.join(weights[:3]) or 'config.json'}); "
            "writing a plan there would hide it",
            where=str(out),
            fix="write the plan directory somewhere else (an empty or new directory)",
        )


def _side_files(plan) -> dict[str, Path]:
    """Tokenizer / generation files to copy: the skeleton's, or else the first source's that has them."""
    sources = [plan.skeleton, *(s for label, s in plan.sources.items() if label != plan.skeleton_label)]
    found = {}
    for name in SIDE_FILES:
        src = next((s.path / name for s in sources if (s.path / name).is_file()), None)
        if src is not None:
            found[name] = src
    return found
