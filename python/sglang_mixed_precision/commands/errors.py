"""`sglang-mp errors [--markdown]`: every error code, its HTTP status and what it means."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print docs/ERRORS.md (the table the docs ship)")


def run(args) -> int:
    from ..core.errors import ErrorCode, markdown_table

    if args.markdown:
        print(markdown_table(), end="")
        return 0
    width = max(len(c.value) for c in ErrorCode)
    for code in ErrorCode:
        print(f"{code.value:<{width}}  {code.status}  {code.meaning}")
    return 0
