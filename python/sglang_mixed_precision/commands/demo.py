"""`sglang-mp demo`: a small model, converted, planned as a mix, then served (or run on CPU).

1. take the small Qwen3-MoE shipped in the package (trained on the Python standard library's
   sources, see data/small_model/README.md), or with ``--arch`` generate a tiny random-weight one
   (Qwen3, Qwen3-MoE, Llama, Qwen2, Qwen2-MoE, Mixtral, a tied-embedding Qwen3, DeepSeek-V3);
2. convert it to fp16/ fp8/ int4/ (GPTQ int4 calibrated on held-out standard library text for the
   trained model, round-to-nearest for a random one: seconds either way);
3. write a mix: attention fp8, routed experts (or the dense MLP) int4, the rest bf16; plan it;
4. with an NVIDIA GPU and SGLang: start ``launch_mixed_precision_server.py`` on it and ask ``/generate``;
   without: generate through the reference path (transformers, each layer from its source) and say
   what serving needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from ..testing.tinymodels import ARCHITECTURES

RANDOM_PROMPTS = ["The capital of France is", "Once upon a time"]
# the trained model writes Python: prompts it can continue
SMALL_PROMPTS = ["def read_lines(path):\n", "class Stack:\n    def __init__(self"]
SMALL = "small"
# What the rest of the MLP (dense layers, shared experts) comes from, where the default does not fit:
# DeepSeek-V3 gets the mix its users ask for, int4 experts with FP8 attention and shared experts
# (SGLang serves its MLA attention and shared experts in FP8 or 16 bits, not int4: architectures.py).
MLP_PRECISION = {"deepseek_v3": "fp8"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="sglang-mp-demo", help="where the model, its conversions and the mix go")
    p.add_argument(
        "--arch",
        choices=(SMALL, *ARCHITECTURES),
        default=SMALL,
        help="small: the trained Qwen3-MoE shipped in the package; else a tiny random-weight model",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cpu", action="store_true", help="use the reference path even if a GPU is present")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument(
        "--server-timeout",
        type=float,
        default=1200.0,
        help="seconds to wait for SGLang (the first start builds the GPTQ-Marlin kernels: minutes)",
    )


def say(msg: str) -> None:
    print(msg, flush=True)


def step(n: int, msg: str) -> float:
    say(f"\n[{n}/4] {msg}")
    return time.time()


def prompts(arch: str) -> list[str]:
    return SMALL_PROMPTS if arch == SMALL else RANDOM_PROMPTS


def prepare(workdir: Path, arch: str) -> Path:
    """Steps 1-3: model, conversions, mix config; returns the config path."""
    from ..convert.pipeline import CONFIG_NAME, FORMATS, ConvertOptions, convert
    from ..testing.tinymodels import make_tiny_model
    from .convert import mixed_config_yaml

    if arch == SMALL:
        return prepare_small(workdir)
    t = step(1, f"tiny {arch} model -> {workdir / 'bf16'}")
    if not (workdir / "bf16" / "config.json").is_file():
        make_tiny_model(arch, workdir / "bf16")
    say(f"      done in {time.time() - t:.1f}s")
    t = step(2, "converting to fp16/ fp8/ int4/ (int4: round-to-nearest GPTQ format)")
    # The format `convert --create_config` writes; a MoE keeps the rest of its MLP (the router, a
    # shared expert) 16-bit. The converter writes it, so a rerun of the demo may replace it
    # (--overwrite removes only its own files).
    model_type = tiny_model_type(workdir)
    mlp = MLP_PRECISION.get(arch, "fp16" if is_moe(model_type) else "int4")
    convert(
        ConvertOptions(
            model_path=str(workdir / "bf16"),
            output_dir=str(workdir / "converted"),
            method="rtn",
            overwrite=True,
            progress=False,
            mixed_config=mixed_config_yaml(
                attention="fp8", mlp=mlp, experts="int4", sources=FORMATS, model_type=model_type
            ),
        )
    )
    say(f"      done in {time.time() - t:.1f}s")
    config = workdir / "converted" / CONFIG_NAME
    return config


def tiny_model_type(workdir: Path) -> str:
    """The model_type of the tiny model in ``workdir/bf16`` (``--arch`` names like qwen3_tied are not one)."""
    return json.loads((workdir / "bf16" / "config.json").read_text())["model_type"]


def describe_mix(arch: str, workdir: Path) -> str:
    if arch == SMALL:
        return "attention fp8, experts int4, the rest bf16"
    if arch in MLP_PRECISION:
        return f"attention fp8, routed experts int4, dense and shared-expert MLPs {MLP_PRECISION[arch]}, the rest bf16"
    return f"attention fp8, {'experts' if is_moe(tiny_model_type(workdir)) else 'MLP'} int4, the rest bf16"


def prepare_small(workdir: Path) -> Path:
    from ..convert.pipeline import CONFIG_NAME, FORMATS
    from ..testing.small_model import convert_small_model, small_model_path
    from .convert import mixed_config_yaml

    t = step(1, f"the small trained Qwen3-MoE shipped in the package: {small_model_path()}")
    say(f"      done in {time.time() - t:.1f}s")
    t = step(2, "converting to fp16/ fp8/ int4/ (int4: GPTQ, calibrated on held-out standard library text)")
    # written by the converter as with --create_config, so a rerun may replace it
    mix = mixed_config_yaml(attention="fp8", mlp="fp16", experts="int4", sources=FORMATS, model_type="qwen3_moe")
    convert_small_model(workdir / "converted", method="gptq", mixed_config=mix)
    say(f"      done in {time.time() - t:.1f}s")
    return workdir / "converted" / CONFIG_NAME


def is_moe(model_type: str) -> bool:
    from ..core.architectures import architecture_for

    arch = architecture_for(model_type)
    return arch is not None and arch.moe_family


def gpu_ready() -> str | None:
    """Why SGLang cannot serve here (None if it can)."""
    import torch

    if not torch.cuda.is_available():
        return "no NVIDIA GPU is visible (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed (pip install 'sglang==0.5.17')"
    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor < 80:
        return f"the GPU is SM{major}{minor}; FP8-block and GPTQ-Marlin kernels need SM80 or newer"
    return None


def serve(config: Path, workdir: Path, args) -> int:
    from ..serving import client, launcher

    port = args.port or client.free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = launcher.sglang_command(
        [
            "--enable-mixed-precision",
            "--mixed-precision-config",
            str(config),
            "--plan-dir",
            str(workdir / "plan"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--mem-fraction-static",
            "0.5",
            "--disable-cuda-graph",
        ]
    )
    log = workdir / "server.log"
    say(f"      starting SGLang (log: {log}); the first start builds the GPTQ-Marlin kernels, which takes minutes")
    proc = client.start_server(cmd, log)
    try:
        waited = client.wait_until_ready(base, proc, args.server_timeout, log, progress=say)
        say(f"      ready after {waited:.0f}s")
        for prompt in prompts(args.arch):
            out = client.post_json(
                f"{base}/generate",
                {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": args.max_new_tokens}},
            )
            say(f"      {prompt!r} -> {out['text']!r}")
    finally:
        client.stop_server(proc)
    return 0


def run_reference(config: Path, plan, args, why: str) -> int:
    from ..reference import generate_reference

    say(f"      serving with SGLang is not possible here: {why}")
    say(
        "      generating through the reference path instead (transformers; every layer's weights from its source,"
        " fp8/int4 dequantized, fp8 activations quantized as the W8A8 kernels do)"
    )
    for out in generate_reference(plan, prompts(args.arch), args.max_new_tokens, simulate_w8a8=True):
        say(f"      {out.prompt!r} -> {out.text!r}")
    say(
        "\nTo serve this mix with SGLang's kernels you need an NVIDIA GPU (SM80+, e.g. A100/H100) and sglang==0.5.17:\n"
        f"  python launch_mixed_precision_server.py --enable-mixed-precision --mixed-precision-config {config} "
        f"--model-path {config.parent / 'fp16'} --port 30000"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from ..core.report import format_tables
    from ..reference import plan_from_config

    started = time.time()
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = prepare(workdir, args.arch)
    step(3, f"mix {config}: {describe_mix(args.arch, workdir)}")
    plan = plan_from_config(config)
    say(format_tables(plan))
    (workdir / "plan.json").write_text(json.dumps(plan.to_json(), indent=1, default=str))
    step(4, "serving")
    why = "--cpu was given" if args.cpu else gpu_ready()
    rc = run_reference(config, plan, args, why) if why else serve(config, workdir, args)
    say(f"\ndemo finished in {time.time() - started:.0f}s")
    return rc
