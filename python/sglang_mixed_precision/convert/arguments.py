"""The converter's arguments, checked all at once before the input is read or anything is written.

Each rule names the flag, the value given and the range it must be in; every problem of one run
is reported together (``validation_failed`` lists them).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.errors import ErrorCode, MixedPrecisionError, raise_all

FORMATS = ("fp16", "fp8", "int4")
METHODS = ("gptq", "rtn")
GROUP_SIZES = (32, 64, 128, -1)
MIN_SEQLEN = 8  # shorter windows carry too little context for the calibration forward


def bad_argument(flag: str, value, rule: str, fix: str | None = None) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.BAD_ARGUMENT,
        f"{flag} {value!r}: {rule}",
        where=flag,
        fix=fix or f"pass {flag} {rule}",
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_int(flag: str, value, minimum: int) -> list[MixedPrecisionError]:
    if _is_int(value) and value >= minimum:
        return []
    return [bad_argument(flag, value, f"must be an integer >= {minimum}")]


def check_fraction(flag: str, value) -> list[MixedPrecisionError]:
    """Strictly between 0 and 1 (GPTQ's dampening: 0 leaves H singular, 1 drowns it)."""
    if _is_number(value) and 0 < value < 1:
        return []
    return [bad_argument(flag, value, "must be a number strictly between 0 and 1", f"pass {flag} 0.01 (the default)")]


def check_positive(flag: str, value) -> list[MixedPrecisionError]:
    if _is_number(value) and value > 0:
        return []
    return [bad_argument(flag, value, "must be a finite number > 0")]


def shard_bytes(value) -> int:
    """--max_shard_size in bytes: '2GB', '500MB', '1.5GiB' or a byte count, > 0."""
    from .writer import parse_size

    try:
        n = parse_size(value)
    except (ValueError, OverflowError, AttributeError):
        n = None
    if n is None or n <= 0:
        raise bad_argument(
            "--max_shard_size",
            value,
            "must be a positive size such as 2GB, 500MB, 1.5GiB or a byte count",
            "pass --max_shard_size 2GB (the default)",
        )
    return n


def check_formats(formats) -> list[MixedPrecisionError]:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        return [
            MixedPrecisionError(
                ErrorCode.BAD_FORMAT,
                f"unknown output format(s) {bad}" if bad else "no output format given",
                where="--formats",
                fix=f"choose from {', '.join(FORMATS)} (comma-separated)",
            )
        ]
    return []


def check_choices(opts) -> list[MixedPrecisionError]:
    errors = check_formats(opts.formats)
    if opts.method not in METHODS:
        errors.append(
            MixedPrecisionError(
                ErrorCode.BAD_METHOD,
                f"unknown int4 method {opts.method!r}",
                where="--method",
                fix="use --method gptq or --method rtn",
            )
        )
    if opts.group_size not in GROUP_SIZES or not _is_int(opts.group_size):
        errors.append(
            MixedPrecisionError(
                ErrorCode.BAD_GROUP_SIZE,
                f"group_size {opts.group_size} is not supported",
                where="--group_size",
                fix="use --group_size 32, 64, 128 or -1",
            )
        )
    return errors


def check_paths(opts) -> list[MixedPrecisionError]:
    errors = []
    for flag, value in (("--model_path", opts.model_path), ("--output_dir", opts.output_dir)):
        if not isinstance(value, (str, Path)) or not str(value).strip():
            errors.append(bad_argument(flag, value, "must name a directory"))
    if opts.skip is not None and any(not isinstance(p, str) or not p.strip() for p in opts.skip):
        errors.append(bad_argument("--skip", opts.skip, "each pattern must be a non-empty glob"))
    return errors


def check_calib_file(calib_file) -> list[MixedPrecisionError]:
    """The file exists, is a file, can be read, and holds text."""
    if calib_file is None:
        return []
    p = Path(calib_file)

    def missing(why: str) -> list[MixedPrecisionError]:
        return [
            MixedPrecisionError(
                ErrorCode.CALIB_FILE_MISSING,
                f"calibration file {why}",
                where=str(p),
                fix="pass a UTF-8 text file to --calib_file, or omit it to use the bundled corpus",
            )
        ]

    if not p.exists():
        return missing("not found")
    if not p.is_file():
        return missing("is not a regular file")
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        return missing(f"cannot be read: {e.strerror or e}")
    if not head.strip():
        return [
            MixedPrecisionError(
                ErrorCode.CALIB_TOO_SHORT,
                "calibration file is empty",
                where=str(p),
                fix="pass a longer --calib_file (a few thousand words of text like the model's use)",
            )
        ]
    return []


def check_options(opts) -> None:
    """Every argument of ``opts`` (a ConvertOptions): all problems together, before anything is read or written."""
    errors = check_choices(opts) + check_paths(opts)
    errors += check_fraction("--damp_percent", opts.damp_percent)
    errors += check_int("--nsamples", opts.nsamples, 1)
    errors += check_int("--seqlen", opts.seqlen, MIN_SEQLEN)
    errors += check_int("--min_expert_tokens", opts.min_expert_tokens, 0)
    errors += check_int("--expert_batch", opts.expert_batch, 0)
    errors += check_positive("--max_error_fp8", opts.max_error_fp8)
    errors += check_positive("--max_error_int4", opts.max_error_int4)
    try:
        shard_bytes(opts.max_shard_size)
    except MixedPrecisionError as e:
        errors.append(e)
    errors += check_calib_file(opts.calib_file)
    raise_all(errors)
