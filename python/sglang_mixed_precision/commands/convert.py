"""`sglang-mp convert`: a 16-bit model -> fp16/ fp8/ int4/ model directories (+ a mixed config)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..convert.pipeline import CONFIG_NAME, FORMATS, ConvertOptions, convert
from ..convert.verify import DEFAULT_MAX_ERROR
from ..core.errors import ErrorCode, MixedPrecisionError

PRECISIONS = FORMATS  # each precision is read from the output of the same name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="16-bit Hugging Face model directory (safetensors)")
    p.add_argument("--output_dir", required=True, help="writes OUTPUT/fp16, OUTPUT/fp8, OUTPUT/int4")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma list of outputs to write (default: all)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="int4 quantizer (rtn: no calibration)")
    p.add_argument("--group_size", type=int, default=128, choices=(32, 64, 128, -1))
    p.add_argument("--desc_act", action="store_true", help="GPTQ act-order (writes the permuted g_idx)")
    p.add_argument(
        "--damp_percent", type=float, default=0.01, help="Hessian dampening, fraction of its mean diagonal (0 < d < 1)"
    )
    p.add_argument("--calib_file", help="calibration text (default: the corpus shipped in the package)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (>= 1)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (>= 8)")
    p.add_argument(
        "--min_expert_tokens",
        type=int,
        default=32,
        help="experts routed fewer calibration tokens fall back to round-to-nearest (reported)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave matching modules 16-bit in fp8/ and int4/ (whole fused group); repeatable",
    )
    p.add_argument("--max_shard_size", default="2GB", help="largest output shard: 2GB, 500MB, 1.5GiB or bytes (> 0)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier conversion in --output_dir (removes only what the converter wrote there)",
    )
    p.add_argument("--verify", action="store_true", help="fail unless every module reloads within the error bounds")
    p.add_argument("--no_check", action="store_true", help="skip reloading and measuring the outputs")
    p.add_argument("--max_error_fp8", type=float, default=DEFAULT_MAX_ERROR["fp8"])
    p.add_argument("--max_error_int4", type=float, default=DEFAULT_MAX_ERROR["int4"])
    p.add_argument("--no_progress", action="store_true")
    p.add_argument(
        "--device",
        default=None,
        help="where to quantize: cuda (the default when a GPU is visible; cuda:N for another GPU) or cpu",
    )
    p.add_argument(
        "--expert_batch",
        type=int,
        default=0,
        help="MoE experts per batched GPTQ pass (0: all within a memory budget on a GPU, one at a time on CPU)",
    )
    p.add_argument(
        "--overlap",
        choices=("auto", "on", "off"),
        default="auto",
        help="read the next layer and write shards in background threads (auto: on with a GPU)",
    )
    p.add_argument("--create_config", action="store_true", help=f"also write OUTPUT/{CONFIG_NAME}")
    p.add_argument("--attention_precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--mlp_precision", choices=PRECISIONS, default="fp8", help="dense MLP and shared experts")
    p.add_argument("--expert_precision", choices=PRECISIONS, default="int4", help="routed experts")


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        model_path=args.model_path,
        output_dir=args.output_dir,
        formats=tuple(dict.fromkeys(f.strip() for f in args.formats.split(",") if f.strip())),
        method=args.method,
        group_size=args.group_size,
        desc_act=args.desc_act,
        damp_percent=args.damp_percent,
        calib_file=args.calib_file,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        min_expert_tokens=args.min_expert_tokens,
        skip=list(args.skip),
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        verify=args.verify,
        check=not args.no_check,
        max_error_fp8=args.max_error_fp8,
        max_error_int4=args.max_error_int4,
        progress=not args.no_progress,
        device=args.device,
        expert_batch=args.expert_batch,
        overlap={"auto": None, "on": True, "off": False}[args.overlap],
    )


def mixed_config_yaml(
    attention: str, mlp: str, experts: str, sources: tuple[str, ...], model_type: str | None = None
) -> str:
    """The project's config format; rules are listed most specific first, in the names of the
    family of ``model_type`` (Mixtral's experts sit under block_sparse_moe and it has no dense MLP)."""
    import yaml

    from ..core.architectures import architecture_for

    for what, prec in (("attention", attention), ("mlp", mlp), ("expert", experts)):
        if prec not in sources:
            raise MixedPrecisionError(
                ErrorCode.BAD_PRECISION,
                f"--{what}_precision {prec} but {prec}/ is not being written",
                fix=f"add {prec} to --formats",
            )
    arch = architecture_for(model_type or "")
    moe = arch.moe if arch is not None and arch.moe_family else "mlp"
    rules = [
        {"match": f"model.layers.*.{moe}.experts.*", "source": experts},
        {
            "match": "model.layers.*.mlp.shared_expert*.*",
            "source": mlp,
        },  # Qwen2-MoE shared_expert, DeepSeek shared_experts
        {"match": "model.layers.*.mlp.*", "source": mlp},
        {"match": "model.layers.*.self_attn.*", "source": attention},
    ]
    if moe != "mlp":  # the family has no dense MLP and no shared expert under mlp
        rules = [r for r in rules if ".mlp." not in r["match"]]
    used = {"fp16"} | {r["source"] for r in rules}
    doc = {
        "mixed_precision": {
            "sources": {s: f"./{s}" for s in PRECISIONS if s in used},
            "default": "fp16",
            "rules": rules,
        }
    }
    return yaml.safe_dump(doc, sort_keys=False)


def input_model_type(opts: ConvertOptions) -> str | None:
    """The input's model_type (None when its config.json cannot be read: convert then names the problem)."""
    import json

    try:
        return json.loads((Path(opts.model_path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if args.create_config:  # checked before hours of conversion; written (and owned) by the converter
        opts.mixed_config = mixed_config_yaml(
            args.attention_precision, args.mlp_precision, args.expert_precision, opts.formats, input_model_type(opts)
        )
    report = convert(opts)
    if args.create_config:
        print(f"wrote {Path(opts.output_dir) / CONFIG_NAME}", file=sys.stderr)
    print(summary(report))
    return 0


def summary(report) -> str:
    lines = [f"converted {report.input_bytes / 2**20:.1f} MiB in {report.seconds:.1f}s -> {report.output_dir}"]
    m = report.int4_method
    if m.get("method") == "gptq":
        lines.append(
            f"int4 gptq: layer output error on held-out tokens, gptq {m.get('heldout_gptq_error', float('nan')):.4f}"
            f" vs rtn {m.get('heldout_rtn_error', float('nan')):.4f}"
        )
        if m.get("rtn_fallback"):
            lines.append(f"int4 gptq: {len(m['rtn_fallback'])} expert module(s) fell back to RTN (too few tokens)")
    for f, c in report.checks.items():
        worst = max(c.errors.values(), default=0.0)
        lines.append(f"{f}: {len(c.errors)} modules, max relative weight error {worst:.4f}, problems {len(c.problems)}")
    return "\n".join(lines)
