"""The small trained Qwen3-MoE shipped in the package, and its conversions (demo, quality tests, GPU proof).

``data/small_model``: 4 layers, hidden 256, 4 experts of 128 (top 2), vocabulary 1024, trained on
the Python standard library's sources by ``bench/train_small_model.py`` (see its README).
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parents[1] / "data"
SMALL_MODEL = DATA / "small_model"
CALIB_TEXT = DATA / "calib_python.txt"
# GPTQ calibration: 16 x 256 tokens of held-out standard library text (the text has ~9k tokens)
CALIB_NSAMPLES, CALIB_SEQLEN = 16, 256
FORMATS = ("fp16", "fp8", "int4")


def small_model_path() -> Path:
    if not (SMALL_MODEL / "model.safetensors").is_file():
        raise FileNotFoundError(f"the small model is not installed at {SMALL_MODEL}")
    return SMALL_MODEL


def convert_small_model(
    out_dir: str | Path, method: str = "gptq", progress: bool = False, mixed_config: str | None = None
) -> Path:
    """fp16/ fp8/ int4/ of the small model under ``out_dir`` (kept when already there), and the
    converter's mix config ``mixed_config`` when given (a conversion without it, or with another
    one, is redone: the converter owns that file, so a rerun may replace it)."""
    from ..convert.pipeline import CONFIG_NAME, ConvertOptions, convert

    out = Path(out_dir)
    config = out / CONFIG_NAME
    config_kept = mixed_config is None or (config.is_file() and config.read_text() == mixed_config)
    if config_kept and all((out / f / "config.json").is_file() for f in FORMATS):
        return out
    convert(
        ConvertOptions(
            model_path=str(small_model_path()),
            output_dir=str(out),
            method=method,
            calib_file=str(CALIB_TEXT),
            nsamples=CALIB_NSAMPLES,
            seqlen=CALIB_SEQLEN,
            overwrite=True,
            progress=progress,
            mixed_config=mixed_config,
        )
    )
    return out


def uniform_config(converted: str | Path, label: str, name: str | None = None) -> Path:
    """A YAML with every linear from ``label`` (``fp16`` gives the 16-bit model), beside the sources."""
    converted = Path(converted)
    path = converted / (name or f"all-{label}.yaml")
    sources = "\n".join(f"    {f}: ./{f}" for f in FORMATS)
    path.write_text(f"mixed_precision:\n  sources:\n{sources}\n  default: {label}\n")
    return path
