"""`sglang-mp eval --config C`: what a mix costs in quality against the 16-bit model.

Both are scored teacher-forced on the same text: KL divergence per token (mean, 99th percentile),
top-1 agreement, perplexity of both. ``--backend cpu`` runs the reference path (small models);
``--backend sglang`` serves the baseline and the mix with SGLang and reads their log-probs.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="the mix's YAML")
    p.add_argument("--baseline", default=None, help="source label to compare with (default: the 16-bit source)")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the held-out excerpt in the package)")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the text to score")
    p.add_argument("--top-k", type=int, default=0, help="tokens per position the KLD lists (0: the whole vocabulary)")
    p.add_argument("--backend", choices=("auto", "cpu", "sglang"), default="auto", help="auto: sglang on a GPU")
    p.add_argument("--workdir", default=None, help="sglang backend: where server logs and plan directories go")
    p.add_argument("--json", action="store_true", help="print the result (per-position KLD included) as JSON")
    p.add_argument("--png", default=None, help="write a plot: KLD per position and its distribution")


def make_backend(kind: str, workdir: str | None, config: str):
    from .demo import gpu_ready

    if kind == "auto":
        kind = "cpu" if gpu_ready() else "sglang"
    if kind == "cpu":
        from ..quality.cpu import CpuBackend

        return CpuBackend()
    from ..quality.server import ServerBackend

    return ServerBackend(Path(workdir or Path(config).resolve().parent / "sglang-mp-eval"))


def run(args) -> int:
    from ..core.errors import ErrorCode, MixedPrecisionError
    from ..quality.evaluate import dump_json, evaluate, write_png

    if args.tokens < 2 or args.top_k < 0:
        raise MixedPrecisionError(
            ErrorCode.BAD_ARGUMENT,
            f"--tokens {args.tokens} / --top-k {args.top_k} out of range",
            fix="--tokens 2 or more, --top-k 0 (the whole vocabulary) or more",
        )
    backend = make_backend(args.backend, args.workdir, args.config)
    try:
        result = evaluate(
            args.config,
            backend,
            baseline=args.baseline,
            text_path=args.text,
            tokens=args.tokens,
            k=args.top_k,
            workdir=getattr(backend, "workdir", None),
        )
    finally:
        backend.close()
    print(dump_json(result) if args.json else result.table())
    if args.png:
        write_png(result, args.png)
        if not args.json:
            print(f"plot: {args.png}")
    return 0
