"""How the converter writes a file: atomically, and with named errors for a full disk or a denied write.

Every file lands under a temporary name (``NAME.tmp``) and is renamed over its final name once
complete, so a kill, a full disk or a denied write never leaves a half-written file under a name
a reader trusts, and a file that is linked elsewhere (fp16/ hard-links the input's shards) is
replaced, never written through.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import ErrorCode, MixedPrecisionError

TMP_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full filesystem, or the user's quota on it
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def write_bytes(path: Path, data: bytes) -> None:
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def copy_file(src: Path, dst: Path) -> None:
    tmp = tmp_path(dst)
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link when on the same filesystem (no bytes copied), copy otherwise; either replaces ``dst``."""
    tmp = tmp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        how = "linked"
    except OSError:
        shutil.copy2(src, tmp)
        how = "copied"
    os.replace(tmp, dst)
    return how


# -- space ----------------------------------------------------------------------------------------
def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a new directory would be created)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_error(out: Path, needed: int, what: str) -> MixedPrecisionError:
    free = free_bytes(out)
    need = f"the outputs need about {human(needed)} more, " if needed > 0 else ""
    more = f"at least {human(max(needed - free, 0) or needed)}" if needed > 0 else "space"
    return MixedPrecisionError(
        ErrorCode.DISK_FULL,
        f"no space left on the output's filesystem {what}: {need}{human(free)} is free",
        where=str(out),
        fix=f"free {more} there (or raise the quota), then rerun the same command: it resumes, keeping the "
        "shards already finished",
    )


def check_space(out: Path, needed: int) -> None:
    """Refuse before writing when the output's filesystem cannot hold what is left to write."""
    if needed > free_bytes(out):
        raise disk_full_error(out, needed, "before writing")


def unwritable_error(out: Path, path: str | None, reason: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.OUTPUT_UNWRITABLE,
        f"cannot write the output: {reason}",
        where=path or str(out),
        fix=f"give this user write permission on {out} (chmod u+w, or chown), or pick another --output_dir "
        "(a new directory); rerunning the same command then resumes",
    )


def _inside(path: str | None, root: Path) -> bool:
    if path is None:
        return True  # a write on an open file (no name): only outputs are open for writing
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return True
    except ValueError:
        return False


@contextmanager
def output_errors(out: Path, needed: int) -> Iterator[None]:
    """Turn a full disk or a denied write under ``out`` into named errors (the cause is kept)."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE:
            raise disk_full_error(out, needed, f"while writing ({os.strerror(e.errno)})") from e
        if e.errno in DENIED and _inside(e.filename, out):
            raise unwritable_error(out, e.filename, os.strerror(e.errno)) from e
        raise
