"""JSON side files of a checkpoint (config.json, index files, quantize_config.json), read with a named error."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ErrorCode, MixedPrecisionError


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ``corrupt_config`` naming the file if it is not one."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MixedPrecisionError(
            ErrorCode.CORRUPT_CONFIG,
            f"{path} is not valid JSON: {e}",
            where=str(path),
            fix=f"restore the model's original {Path(path).name}",
        ) from None
    if not isinstance(value, dict):
        raise MixedPrecisionError(
            ErrorCode.CORRUPT_CONFIG,
            f"{path} is not a JSON object",
            where=str(path),
            fix=f"restore the model's original {Path(path).name}",
        )
    return value
