"""`sglang-mp sensitivity --config C`: the KLD each unit adds when it moves to a lower-precision source.

The table (cached per sources and text, so that a run resumes) is what `sglang-mp autoplan` optimizes.
"""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a YAML naming the sources (its rules are not used)")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the held-out excerpt in the package)")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the text to score")
    p.add_argument("--top-k", type=int, default=0, help="tokens per position the KLD lists (0: the whole vocabulary)")
    p.add_argument("--backend", choices=("auto", "cpu", "sglang"), default="auto", help="auto: sglang on a GPU")
    p.add_argument("--workdir", default=None, help="sglang backend: where server logs and plan directories go")
    p.add_argument("--cache-dir", default=None, help="where tables are kept (default ~/.cache/sglang-mp/sensitivity)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args) -> int:
    from ..quality.sensitivity import run_sensitivity
    from .eval import make_backend

    backend = make_backend(args.backend, args.workdir, args.config)
    try:
        table, path = run_sensitivity(
            args.config,
            backend,
            text_path=args.text,
            tokens=args.tokens,
            k=args.top_k,
            cache_dir=args.cache_dir,
            log=print,
        )
    finally:
        backend.close()
    print(json.dumps(table.to_json(), indent=1) if args.json else table.format())
    print(f"table: {path}")
    return 0
