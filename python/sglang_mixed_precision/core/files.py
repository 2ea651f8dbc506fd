"""Reading a checkpoint's files with named errors: JSON side files (config.json, quantize_config.json)
and the error for a file that exists but cannot be read."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ErrorCode, MixedPrecisionError


def unreadable(path: Path, error: OSError, what: str = "file") -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.UNREADABLE_FILE,
        f"cannot read {what} {path}: {error.strerror or error}",
        where=str(path),
        fix="give the serving user read access (chmod a+r on files, a+rx on directories), or copy the checkpoint",
    )


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ``corrupt_config`` naming the file if it is not one."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise unreadable(Path(path), e) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
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
