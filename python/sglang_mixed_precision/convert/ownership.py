"""What the converter owns in its output directory, and the checks that keep it from touching anything else.

``OUTPUT/.sglang-mp-convert.json`` (the owner record) lists each entry the converter created there
(``fp16/``, ``fp8/``, ``int4/``, the mixed config, the report), written *before* the entry is
created, with the fingerprint of the conversion. ``--overwrite`` removes only those entries; a
rerun of the same conversion resumes. Before anything is touched, a run is refused when:

* the input and the output overlap: the same directory, one inside the other, or a link in the
  output (``OUTPUT/fp16 -> the input``) or in the input (a shard linked from an earlier output)
  that resolves into the other -- a link to the input counts as the input;
* the output holds something the converter did not write (no record, an entry it does not list,
  or a foreign file inside one of its directories);
* it holds another conversion and ``--overwrite`` was not given;
* it cannot be written (permissions, a file in the way).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ErrorCode, MixedPrecisionError, more
from . import files

OWNER_FILE = ".sglang-mp-convert.json"
RECORD_VERSION = 1
# Names the converter writes inside its directories (fp16/ also holds the input's shard names, recorded).
OWN_FILES = ("config.json", "model.safetensors.index.json", ".convert_state.json")
OWN_DIRS = ("fp16", "fp8", "int4")  # the owned entries that are directories (the others are files)
OWN_GLOBS = ("model-*-of-*.safetensors", "part-*.safetensors", "part-*.safetensors.body", "*" + files.TMP_SUFFIX)


@dataclass
class OwnerRecord:
    fingerprint: dict
    owned: list[str] = field(default_factory=list)  # top-level entries the converter created
    files: dict[str, list[str]] = field(default_factory=dict)  # further file names it wrote, per owned dir

    def to_json(self) -> dict:
        return {"version": RECORD_VERSION, "fingerprint": self.fingerprint, "owned": self.owned, "files": self.files}


def record_path(out: Path) -> Path:
    return Path(out) / OWNER_FILE


def load_record(out: Path) -> OwnerRecord | None:
    """The owner record, or None when there is none (or it is unreadable: then nothing counts as owned)."""
    try:
        doc = json.loads(record_path(out).read_text())
        return OwnerRecord(doc["fingerprint"], list(doc["owned"]), dict(doc.get("files", {})))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_record(out: Path, record: OwnerRecord) -> None:
    files.write_text(record_path(out), json.dumps(record.to_json(), indent=1))


def claim(out: Path, record: OwnerRecord, name: str, file_names: list[str] = ()) -> None:
    """Record ``name`` (and files of that name's directory) as the converter's before creating them."""
    changed = name not in record.owned
    if changed:
        record.owned.append(name)
    extra = sorted(set(file_names) - set(record.files.get(name, [])))
    if extra:
        record.files[name] = sorted({*record.files.get(name, []), *extra})
    if changed or extra:
        save_record(out, record)


# -- overlap with the input ---------------------------------------------------------------------
def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def input_locations(model_dir: Path) -> list[tuple[Path, Path]]:
    """(path as named, where it leads) for the input directory and every entry in it: where its bytes are."""
    root = Path(model_dir)
    return [(root, _real(root)), *((p, _real(p)) for p in sorted(root.iterdir()))]


def output_locations(out: Path) -> list[tuple[Path, Path]]:
    """(path as named, where it leads) for the output directory and every link inside it."""
    found = [(out, _real(out))]
    if out.is_dir():
        for dirpath, dirnames, filenames in os.walk(out):  # links to directories are listed, not followed
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    found.append((p, _real(p)))
    return found


def _how(model_dir: Path, out: Path, named: Path, target: Path, entry: Path, source: Path) -> str:
    if named != out:
        return f"{named} in the output leads into the input ({target})"
    if entry != model_dir:
        return f"the input's {entry.name} is {source}, inside the output"
    if target == source:
        return "the output directory is the input model directory"
    if source in target.parents:
        return "the output directory is inside the input model directory"
    return f"the input ({source}) is inside the output directory"


def overlap_error(
    model_dir: Path, out: Path, named: Path, target: Path, entry: Path, source: Path
) -> MixedPrecisionError:
    how = _how(model_dir, out, named, target, entry, source)
    outer = min((source, target), key=lambda p: len(p.parts))
    return MixedPrecisionError(
        ErrorCode.OUTPUT_OVERLAPS_INPUT,
        f"{how}: writing or --overwrite there could replace or delete the input",
        where=f"--model_path {model_dir} --output_dir {out}",
        fix=f"keep the input where it is and pass an --output_dir that neither holds nor lies inside it, "
        f"e.g. a new directory {outer.parent / (outer.name + '-converted')}",
    )


def check_separate(model_dir: Path, out: Path) -> None:
    """Refuse an output that is, holds, lies in, or links into the input (and an input linking into it)."""
    sources = input_locations(Path(model_dir))
    for named, target in output_locations(Path(out)):
        for entry, source in sources:
            if _overlap(target, source):
                raise overlap_error(Path(model_dir), Path(out), named, target, entry, source)


# -- what is in the output ------------------------------------------------------------------------
def _own_file(name: str, extra: list[str]) -> bool:
    if name in OWN_FILES or name in extra:
        return True
    return any(fnmatch.fnmatchcase(name, g) for g in OWN_GLOBS)


def foreign_entries(out: Path, record: OwnerRecord | None, side_files: tuple[str, ...]) -> list[str]:
    """Everything in ``out`` the converter did not write (paths relative to ``out``)."""
    owned = set(record.owned) if record else set()
    foreign = []
    for p in sorted(Path(out).iterdir()):
        if p.name in (OWNER_FILE, OWNER_FILE + files.TMP_SUFFIX) and record is not None:
            continue
        if p.name not in owned or p.is_symlink() or p.is_dir() != (p.name in OWN_DIRS):
            foreign.append(p.name)  # not created by the converter, or replaced since by something else
        elif p.is_dir():
            extra = [*side_files, *record.files.get(p.name, [])]
            for q in sorted(p.iterdir()):
                if q.is_dir() or q.is_symlink() or not _own_file(q.name, extra):
                    foreign.append(f"{p.name}/{q.name}")
    return foreign


def foreign_error(out: Path, foreign: list[str]) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.OUTPUT_NOT_EMPTY,
        f"the output directory holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} the converter "
        f"did not write: {more(foreign)}",
        where=str(out),
        fix="pass an --output_dir that does not exist yet or is empty (the converter never removes what it did "
        "not write, --overwrite included), or move those entries out yourself",
    )


def changed_settings(old: dict, new: dict) -> list[str]:
    return sorted(k for k in {*old, *new} if old.get(k) != new.get(k))


def other_conversion_error(out: Path, old: dict, new: dict) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.OUTPUT_NOT_EMPTY,
        f"the output directory holds another conversion (differs in: {', '.join(changed_settings(old, new))})",
        where=str(out),
        fix="rerun with that conversion's input and settings to resume it, pass --overwrite to replace it "
        "(only what the converter wrote there is removed), or pick a new --output_dir",
    )


def check_writable(out: Path) -> None:
    """The directory that will be written (or its nearest existing ancestor, where it is created)."""
    base = files.existing_ancestor(out)
    if not base.is_dir():
        raise MixedPrecisionError(
            ErrorCode.OUTPUT_NOT_DIR,
            f"{base} is not a directory, so {out} cannot be created",
            where=str(base),
            fix="pick an --output_dir whose parents are directories",
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise files.unwritable_error(out, str(base), f"{base} is not writable by this user")


# -- the decision -----------------------------------------------------------------------------------
def inspect_output(
    out: Path, model_dir: Path, fingerprint: dict, *, overwrite: bool, side_files: tuple[str, ...]
) -> OwnerRecord | None:
    """Every check, nothing touched: the owner record to resume or replace, or None for an empty output."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MixedPrecisionError(
            ErrorCode.OUTPUT_NOT_DIR,
            "the output path exists and is not a directory",
            where=str(out),
            fix="pick a new --output_dir",
        )
    check_separate(model_dir, out)
    check_writable(out)
    if not out.exists() or not any(out.iterdir()):
        return None
    record = load_record(out)
    foreign = foreign_entries(out, record, side_files)
    if foreign:
        raise foreign_error(out, foreign)
    if record.fingerprint != fingerprint and not overwrite:
        raise other_conversion_error(out, record.fingerprint, fingerprint)
    return record


def remove_owned(out: Path, record: OwnerRecord) -> None:
    """--overwrite: remove the entries of ``out`` the record lists (checked to hold nothing else).

    Only direct children are candidates: a record naming ``../x`` or an absolute path (edited by
    hand) reaches nothing outside the output."""
    owned = set(record.owned)
    for p in sorted(Path(out).iterdir()):
        if p.name not in owned:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def take_output(out: Path, record: OwnerRecord | None, fingerprint: dict, *, overwrite: bool) -> OwnerRecord:
    """After :func:`inspect_output` passed: replace (``--overwrite``), resume or start; the record to extend."""
    out = Path(out)
    if record is not None and overwrite:
        remove_owned(out, record)
        record = None
    if record is None or record.fingerprint != fingerprint:
        record = OwnerRecord(fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    save_record(out, record)
    return record
