"""One list of error codes: every raise uses it, every code is raised somewhere, the docs table is generated from it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sglang_mixed_precision.core.errors import (
    ErrorCode,
    MixedPrecisionError,
    ValidationErrors,
    error_json,
    http_status,
    markdown_table,
    more,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "sglang_mixed_precision"


def _calls(name: str):
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                yield path, node


def test_no_error_is_raised_with_a_string_literal_code():
    literal = [
        f"{p.relative_to(ROOT)}:{n.lineno}"
        for p, n in _calls("MixedPrecisionError")
        if n.args and isinstance(n.args[0], ast.Constant)
    ]
    assert literal == []


def test_every_code_is_used_in_the_package():
    used = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "ErrorCode":
                used.add(node.attr)
    unused = [c.name for c in ErrorCode if c.name not in used]
    assert unused == []


def test_docs_table_is_generated_from_the_enumeration():
    assert (ROOT / "docs" / "ERRORS.md").read_text() == markdown_table(), (
        "regenerate: sglang-mp errors --markdown > docs/ERRORS.md"
    )


def test_unknown_code_fails_where_it_is_raised():
    with pytest.raises(ValueError, match="not_a_code"):
        MixedPrecisionError("not_a_code", "x")


def test_status_and_json_come_from_the_code():
    e = MixedPrecisionError(ErrorCode.RELOAD_BUSY, "busy", where="w", fix="f")
    assert http_status(e) == 409 and e.code == "reload_busy"
    assert error_json(e) == {"code": "reload_busy", "message": "busy", "where": "w", "fix": "f"}
    assert http_status(KeyError("x")) == 500 and error_json(KeyError("x"))["code"] == "internal_error"
    several = ValidationErrors([e, MixedPrecisionError(ErrorCode.MISSING_FILE, "gone")])
    assert several.codes == ["reload_busy", "missing_file"]
    assert [x["code"] for x in error_json(several)["errors"]] == ["reload_busy", "missing_file"]


def test_more_lists_examples_and_counts_the_rest():
    assert more(["a", "b"]) == "a, b"
    assert more([str(i) for i in range(7)], limit=3) == "0, 1, 2 and 4 more"
    assert more(["a", "b"], 10, sep="; ") == "a; b and 8 more"


def _troubleshooting_rows() -> dict[str, tuple[str, str]]:
    """code -> (cause, fix) from the tables of the user guide's Troubleshooting section."""
    import re

    text = (ROOT / "README_MIXED_PRECISION.md").read_text()
    section = text.split("\n## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 3 or cells[0] in ("code", "---"):
            continue
        for code in re.findall(r"`([a-z0-9_]+)`", cells[0]):
            rows[code] = (cells[1], cells[2])
    return rows


def test_the_user_guide_gives_every_code_a_cause_and_a_fix():
    rows = _troubleshooting_rows()
    undocumented = [c.value for c in ErrorCode if c.value not in rows]
    assert undocumented == [], "add them to README_MIXED_PRECISION.md's Troubleshooting tables"
    empty = [code for code, (cause, fix) in rows.items() if not cause or not fix]
    assert empty == []
    unknown = sorted(set(rows) - {c.value for c in ErrorCode})
    assert unknown == []  # a renamed or removed code still listed
