#!/usr/bin/env python3
"""GPU proof: tiny Qwen3 and Qwen3-MoE mixes served by SGLang 0.5.17 match a transformers reference.

Everything from nothing: generate tiny random-weight models (with clear greedy margins: on plain
random weights the top-2 logits are often within 0.01 nats, so no two correct bf16 implementations
agree token for token; see tinymodels.make_tiny_model), convert them (fp16/ fp8/ int4, RTN),
write the mixes, start each through ``launch_mixed_precision_server.py`` and check that

* ``/generate``, ``/v1/completions`` and ``/v1/chat/completions`` answer;
* greedy outputs match a reference computed with transformers on the same GPU from the same
  sources (16-bit layers as stored, quantized layers dequantized, fp8 layers' activations quantized
  per token-group of 128 as SGLang's W8A8 block kernels do): identical tokens for all-bf16 mixes,
  and for every mix the log-probabilities SGLang returns (prompt and generated tokens, teacher-forced
  through the reference) within the tolerance below;
* the weight memory SGLang holds (parameter bytes logged by the mixed loader after loading) is
  within 2% of the plan's per-rank bytes.

Tolerance. Both sides compute the same function; they differ by floating-point arithmetic only.
SGLang runs it in bf16 (unit roundoff u = 2^-8), the reference runs it in fp32. How far bf16
arithmetic alone moves the log-probabilities of *this* model is measured on the same GPU by running
the reference in bf16 and in fp32: delta = max |lp_bf16 - lp_fp32| over every compared position. SGLang's
kernels are also bf16 but sum in other orders, fuse norms/rotary and (fp8 layers) round activations
near e4m3 boundaries differently, so each of those contributes a deviation of the same order:
tolerance = 3 * delta + 0.02 nats (0.02 covers bf16 rounding of the log-probabilities themselves,
|lp| up to ~8 nats * 2^-8; reference.logprob_tolerance). The measured delta, tolerance and max
deviation are written per mix.

Usage (on the GPU machine, from the repository root, after ``source bench/gpu_setup.sh``, which
unpacks SGLang and the JIT kernel cache and installs this package so SGLang's workers see the plugin):
    python bench/gpu_serve_proof.py --out DIR [--only qwen3_moe/attn-fp8+experts-int4,all-bf16] [--parallel 6]
    python bench/gpu_serve_proof.py --out DIR --only qwen3_moe/attn-fp8+experts-int4 --entrypoints attn-fp8+experts-int4
--cpu-check runs everything up to starting SGLang on CPU (models, conversions, plans, the launcher's
validation and plan directory, SGLang's parser on every command, reference tokens bf16 vs fp32).
--entrypoints also serves those mixes' plan directories with plain ``python -m sglang.launch_server``
(greedy tokens must equal the launcher's), with ``--load-format dummy`` (must answer) and with
``sglang.Engine`` (tokens must equal the launcher's): three more server starts per mix.
--parallel N serves N mixes side by side on the GPU (a server start is mostly CPU work: all 12 mixes
took 413 s with 6 on an H100); each server gets its own ports and a capped KV cache.

Results: OUT/results.json and OUT/results.md (the card named), server logs in OUT/logs/. The
summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

from gpu_common import environment, make_log, parse_server_log  # noqa: E402

ARCHS = ("qwen3", "qwen3_moe")
# mix name -> (default source for linears, rules); "mlp" means the routed experts for MoE models.
MIXES = {
    "attn-bf16+mlp-fp8": ("fp16", [("model.layers.*.mlp.*", "fp8")]),
    "attn-fp8+experts-int4": ("fp16", [("model.layers.*.mlp.*", "int4"), ("model.layers.*.self_attn.*", "fp8")]),
    "attn-bf16+experts-int4": ("fp16", [("model.layers.*.mlp.*", "int4")]),
    "all-bf16": ("fp16", []),
    "all-fp8": ("fp8", []),
    "all-int4": ("int4", []),
}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "In the beginning the universe was created. This has made a lot of people",
    "def fibonacci(n):",
]
# KV cache capped: SGLang sizes it from the memory free when the server measures, so servers that
# start side by side (--parallel) must not take big pools while another one is measuring.
# One set of server settings: flags for the launcher and launch_server, keywords for sglang.Engine.
SERVER_SETTINGS = {
    "attention_backend": "triton",
    "sampling_backend": "pytorch",
    "disable_cuda_graph": True,
    "mem_fraction_static": 0.5,
    "max_total_tokens": 32768,
    "dtype": "bfloat16",
}
SERVER_FLAGS = [
    *(
        f
        for k, v in SERVER_SETTINGS.items()
        for f in (["--" + k.replace("_", "-")] if v is True else ["--" + k.replace("_", "-"), str(v)])
    ),
    "--log-level",
    "info",
]
REFERENCE_LOCK = threading.Lock()  # transformers sets torch's process-wide default dtype while it builds a model
PORTS_LOCK, PORTS_GIVEN = threading.Lock(), set()
MEMORY_TOLERANCE = 0.02


log = make_log("serve-proof")


@dataclass
class Result:
    name: str
    arch: str
    mix: str
    ok: bool = False
    error: str | None = None
    startup_s: float | None = None
    endpoints: dict = field(default_factory=dict)  # endpoint -> "ok" or error
    layers: str | None = None  # the loader's audit line (method classes)
    tokens_identical_bf16_ref: bool | None = None
    tokens_identical_fp32_ref: bool | None = None
    token_match_rate: float | None = None
    max_abs_dlogprob: float | None = None
    bf16_noise_delta: float | None = None
    tolerance: float | None = None
    weight_bytes: int | None = None
    plan_bytes: int | None = None
    weight_vs_plan: float | None = None
    checks: dict = field(default_factory=dict)  # criterion -> bool
    notes: list = field(default_factory=list)  # what went wrong outside the checks
    samples: list = field(default_factory=list)


def prepare_models(workdir: Path, archs: list[str]) -> dict[str, Path]:
    from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
    from sglang_mixed_precision.testing.tinymodels import make_tiny_model

    out = {}
    for arch in archs:
        base = workdir / arch
        if not (base / "bf16" / "config.json").is_file():
            log(f"{arch}: generating the tiny model")
            make_tiny_model(arch, base / "bf16", clear_margins=True)
        if not (base / "converted" / "int4" / "config.json").is_file():
            log(f"{arch}: converting to fp16/ fp8/ int4/ (rtn)")
            convert(
                ConvertOptions(
                    model_path=str(base / "bf16"),
                    output_dir=str(base / "converted"),
                    method="rtn",
                    overwrite=True,
                    progress=False,
                )
            )
        out[arch] = base / "converted"
    return out


def write_mix(converted: Path, mix: str) -> Path:
    import yaml

    default, rules = MIXES[mix]
    doc = {
        "mixed_precision": {
            "sources": {"fp16": "./fp16", "fp8": "./fp8", "int4": "./int4"},
            "default": default,
            "rules": [{"match": m, "source": s} for m, s in rules],
        }
    }
    path = converted / f"{mix}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---- one mix ----------------------------------------------------------------------------------
def fresh_port() -> int:
    """A free port no other server of this run was given. Every server also gets its own
    --nccl-port: SGLang's own pick (bind port 0, close) raced between servers starting side by
    side (EADDRINUSE at torch.distributed init in the H100 run of --parallel 6)."""
    from sglang_mixed_precision.serving import client

    with PORTS_LOCK:
        port = client.free_port()
        while port in PORTS_GIVEN:
            port = client.free_port()
        PORTS_GIVEN.add(port)
        return port


def run_mix(arch: str, mix: str, converted: Path, args, out: Path) -> Result:
    from sglang_mixed_precision.serving import client

    res = Result(f"{arch}/{mix}", arch, mix)
    config = write_mix(converted, mix)
    port = fresh_port()
    base = f"http://127.0.0.1:{port}"
    log_path = out / "logs" / f"{arch}__{mix}.log"
    plan_dir = out / "plans" / arch / mix
    cmd = [
        sys.executable,
        str(REPO / "launch_mixed_precision_server.py"),
        *launcher_argv(config, converted, plan_dir, port, args),
    ]
    log(f"{res.name}: starting {' '.join(cmd[1:])}")
    os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
    proc = client.start_server(cmd, log_path)
    try:
        res.startup_s = round(client.wait_until_ready(base, proc, args.step_timeout, log_path, progress=log), 1)
        log(f"{res.name}: ready after {res.startup_s}s")
        sglang_out = query_endpoints(base, res, args)
        compare_with_reference(config, sglang_out, res, args)
        read_log(log_path, res)
    except Exception as e:  # one mix failing must not stop the others
        res.error = f"{type(e).__name__}: {e}"
        log(f"{res.name}: FAILED {res.error}\n{traceback.format_exc()}")
        read_log(log_path, res)
        return res
    finally:
        client.stop_server(proc)
    if args.entrypoints and mix in args.entrypoints:
        check_entrypoints(res, plan_dir, sglang_out, args, out)
    decide(res)
    return res


def launcher_argv(config: Path, converted: Path, plan_dir: Path, port: int, args) -> list[str]:
    return [
        "--enable-mixed-precision",
        "--mixed-precision-config",
        str(config),
        "--model-path",
        str(converted / "fp16"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--nccl-port",
        str(fresh_port()),
        "--plan-dir",
        str(plan_dir),
        "--tp-size",
        str(args.tp_size),
        "--dp-size",
        str(args.dp_size),
        *SERVER_FLAGS,
        *args.sglang_arg,
    ]


def cpu_check(arch: str, mix: str, converted: Path, args, out: Path) -> Result:
    """Everything up to starting SGLang, on CPU: the launcher validates the plan and writes the plan
    directory, SGLang's own parser accepts the command (and the entry-point commands), and the
    reference picks the same greedy tokens in bf16 as in fp32 (what the token check relies on)."""
    import io

    from transformers import AutoTokenizer

    from sglang_mixed_precision.reference import greedy, plan_from_config, reference_pair
    from sglang_mixed_precision.serving import client, launcher

    res = Result(f"{arch}/{mix}", arch, mix)
    config = write_mix(converted, mix)
    plan_dir = out / "plans" / arch / mix
    try:
        cmd = launcher.sglang_command(launcher_argv(config, converted, plan_dir, 30000, args), out=io.StringIO())
        commands = [cmd[3:]]
        if mix in args.entrypoints:
            commands += [
                ["--model-path", str(plan_dir), *SERVER_FLAGS, *extra] for extra in ([], ["--load-format", "dummy"])
            ]
        problems = [p for p in map(client.sglang_argv_problem, commands) if p]
        res.checks["sglang_accepts_commands"] = not problems
        res.notes += problems
        plan = plan_from_config(config, tp_size=args.tp_size)
        pair = reference_pair(plan)
        tok = AutoTokenizer.from_pretrained(str(converted / "fp16"))
        ids = [tok(p)["input_ids"] for p in PROMPTS]
        res.tokens_identical_bf16_ref = all(
            greedy(pair.fp32, i, args.max_new_tokens)[0] == greedy(pair.bf16, i, args.max_new_tokens)[0] for i in ids
        )
        res.checks["reference_bf16_equals_fp32"] = res.tokens_identical_bf16_ref
        res.plan_bytes = plan_rank_bytes(plan)
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    res.ok = res.error is None and all(res.checks.values())
    log(f"{res.name}: cpu-check {'ok' if res.ok else 'FAILED'} {res.checks} {res.error or ''} {'; '.join(res.notes)}")
    return res


def query_endpoints(base: str, res: Result, args) -> list[dict]:
    """Greedy /generate on token ids (with log-probs), plus the two OpenAI endpoints."""
    from transformers import AutoTokenizer

    from sglang_mixed_precision.serving import client

    tok = AutoTokenizer.from_pretrained(str(Path(args.workdir) / res.arch / "converted" / "fp16"))
    outputs = []
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        r = client.post_json(f"{base}/generate", {"input_ids": ids, **greedy_request(args)}, timeout=args.step_timeout)
        meta = r["meta_info"]
        output = [(float(lp), int(t)) for lp, t, *_ in meta["output_token_logprobs"]]
        prompt_lps = [(None if lp is None else float(lp), int(t)) for lp, t, *_ in meta["input_token_logprobs"]]
        outputs.append(
            {
                "prompt": prompt,
                "prompt_ids": ids,
                "output_ids": [t for _, t in output],
                "output_logprobs": [lp for lp, _ in output],
                "input_logprobs": prompt_lps,
                "text": r["text"],
            }
        )
    res.endpoints["/generate"] = "ok"
    model_id = client.get_json(f"{base}/v1/models")["data"][0]["id"]
    comp = client.post_json(
        f"{base}/v1/completions",
        {"model": model_id, "prompt": PROMPTS[0], "max_tokens": args.max_new_tokens, "temperature": 0},
        timeout=args.step_timeout,
    )
    res.endpoints["/v1/completions"] = "ok" if comp["choices"] and comp["choices"][0]["text"] is not None else "empty"
    res.checks["completions_equals_generate"] = comp["choices"][0]["text"] == outputs[0]["text"]
    chat = client.post_json(
        f"{base}/v1/chat/completions",
        {
            "model": model_id,
            "temperature": 0,
            "max_tokens": args.max_new_tokens,
            "messages": [{"role": "user", "content": "Say hello."}],
        },
        timeout=args.step_timeout,
    )
    content = chat["choices"][0]["message"]["content"] if chat.get("choices") else None
    res.endpoints["/v1/chat/completions"] = "ok" if content is not None else "empty"
    res.samples = [{"prompt": o["prompt"], "text": o["text"], "output_ids": o["output_ids"]} for o in outputs] + [
        {"chat": content}
    ]
    return outputs


def greedy_request(args) -> dict:
    """The fields of a greedy request with log-probs, for /generate and Engine.generate alike."""
    return {
        "sampling_params": {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 1,
    }


def output_ids(reply: dict) -> list[int]:
    return [int(t) for _, t, *_ in reply["meta_info"]["output_token_logprobs"]]


# ---- the same mix through SGLang's own entry points --------------------------------------------
ENGINE_SCRIPT = r"""
import json, sys
import sglang as sgl
plan_dir, prompts, request, settings = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
engine = sgl.Engine(model_path=plan_dir, **settings)
try:
    replies = [engine.generate(input_ids=ids, **request) for ids in prompts]
    print("ENGINE_OUTPUT " + json.dumps([[int(t) for _, t, *_ in r["meta_info"]["output_token_logprobs"]] for r in replies]))
finally:
    engine.shutdown()
"""


def check_entrypoints(res: Result, plan_dir: Path, outputs: list[dict], args, out: Path) -> None:
    """The plan directory the launcher wrote, served by plain ``python -m sglang.launch_server`` and by
    ``sglang.Engine``: the same greedy tokens as through the launcher (same kernels, same weights);
    and with ``--load-format dummy``: the mix builds and answers without reading a weight."""
    prompts = [o["prompt_ids"] for o in outputs]
    expected = [o["output_ids"] for o in outputs]
    res.checks["launch_server_plan_dir_same_tokens"] = serve_plan_dir(res, plan_dir, prompts, args, out, []) == expected
    dummy = serve_plan_dir(res, plan_dir, prompts, args, out, ["--load-format", "dummy"])
    res.checks["load_format_dummy_answers"] = dummy is not None and all(
        len(ids) == args.max_new_tokens for ids in dummy
    )
    log(f"{res.name}: sglang.Engine on the plan directory")
    settings = {**SERVER_SETTINGS, "nccl_port": fresh_port()}
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            ENGINE_SCRIPT,
            str(plan_dir),
            json.dumps(prompts),
            json.dumps(greedy_request(args)),
            json.dumps(settings),
        ],
        capture_output=True,
        text=True,
        timeout=args.step_timeout,
    )
    (out / "logs" / f"{res.arch}__{res.mix}__engine.log").write_text(p.stdout + p.stderr)
    line = [s for s in p.stdout.splitlines() if s.startswith("ENGINE_OUTPUT ")]
    res.checks["engine_plan_dir_same_tokens"] = bool(line) and json.loads(line[-1].split(" ", 1)[1]) == expected


def serve_plan_dir(
    res: Result, plan_dir: Path, prompts: list[list[int]], args, out: Path, extra: list[str]
) -> list[list[int]] | None:
    """Greedy output ids of `prompts` from stock ``sglang.launch_server`` on the plan directory; None if it fails."""
    from sglang_mixed_precision.serving import client

    port = fresh_port()
    base = f"http://127.0.0.1:{port}"
    tag = "dummy" if extra else "plain"
    log_path = out / "logs" / f"{res.arch}__{res.mix}__launch_server_{tag}.log"
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(plan_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--nccl-port",
        str(fresh_port()),
        *SERVER_FLAGS,
        *extra,
    ]
    log(f"{res.name}: {' '.join(cmd[1:])}")
    proc = client.start_server(cmd, log_path)
    try:
        client.wait_until_ready(base, proc, args.step_timeout, log_path, progress=log)
        return [
            output_ids(
                client.post_json(
                    f"{base}/generate", {"input_ids": ids, **greedy_request(args)}, timeout=args.step_timeout
                )
            )
            for ids in prompts
        ]
    except Exception as e:
        res.notes.append(f"launch_server ({tag}): {type(e).__name__}: {e}")
        return None
    finally:
        client.stop_server(proc)


def compare_with_reference(config: Path, outputs: list[dict], res: Result, args) -> None:
    import torch

    from sglang_mixed_precision.reference import (
        greedy,
        logprob_deviation,
        logprob_tolerance,
        plan_from_config,
        reference_pair,
    )

    plan = plan_from_config(config, tp_size=args.tp_size)
    with REFERENCE_LOCK:
        pair = reference_pair(plan, device="cuda")
    dev, noise = logprob_deviation(pair, map(scored_sequence, outputs))
    same16, same32, matches, total = True, True, 0, 0
    for o in outputs:
        ref16, _ = greedy(pair.bf16, o["prompt_ids"], len(o["output_ids"]))
        ref32, _ = greedy(pair.fp32, o["prompt_ids"], len(o["output_ids"]))
        same16 &= ref16 == o["output_ids"]
        same32 &= ref32 == o["output_ids"]
        matches += sum(a == b for a, b in zip(ref32, o["output_ids"]))
        total += len(o["output_ids"])
        o["reference_fp32_ids"], o["reference_bf16_ids"] = ref32, ref16
    res.max_abs_dlogprob = round(dev, 5)
    res.bf16_noise_delta = round(noise, 5)
    res.tolerance = round(logprob_tolerance(noise), 5)
    res.tokens_identical_bf16_ref, res.tokens_identical_fp32_ref = same16, same32
    res.token_match_rate = round(matches / max(total, 1), 4)
    res.plan_bytes = plan_rank_bytes(plan)
    del pair
    torch.cuda.empty_cache()


def scored_sequence(o: dict):
    """Prompt and generated tokens, with SGLang's log-prob of every token after the first at the
    position that predicts it (reference.logprob_deviation's input)."""
    from sglang_mixed_precision.reference import scored_continuation

    ids, scored = scored_continuation(o["prompt_ids"], o["output_ids"], o["output_logprobs"])
    return ids, [(i - 1, t, lp) for i, (lp, t) in enumerate(o["input_logprobs"]) if lp is not None and i > 0] + scored


def plan_rank_bytes(plan) -> int:
    from sglang_mixed_precision.core.report import summary

    return summary(plan)["per_rank"][0]["bytes"]


def read_log(log_path: Path, res: Result) -> None:
    """The loader's audit line (method classes) and parameter bytes."""
    try:
        facts = parse_server_log(log_path.read_text(errors="replace"))
    except OSError:
        return
    res.layers = facts.get("layers", res.layers)
    if "param_bytes" in facts:
        res.weight_bytes = facts["param_bytes"]
        res.plan_bytes = res.plan_bytes or facts["logged_plan_bytes"]
        res.weight_vs_plan = round((res.weight_bytes - res.plan_bytes) / res.plan_bytes, 5)


def decide(res: Result) -> None:
    res.checks["endpoints_answer"] = all(v == "ok" for v in res.endpoints.values()) and len(res.endpoints) == 3
    res.checks["logprobs_within_tolerance"] = res.max_abs_dlogprob is not None and res.max_abs_dlogprob <= res.tolerance
    if res.mix == "all-bf16":
        res.checks["tokens_identical"] = bool(res.tokens_identical_bf16_ref or res.tokens_identical_fp32_ref)
    res.checks["weight_memory_within_2pct"] = (
        res.weight_vs_plan is not None and abs(res.weight_vs_plan) <= MEMORY_TOLERANCE
    )
    required = [k for k in res.checks if k != "completions_equals_generate"]
    res.ok = all(res.checks[k] for k in required)


# ---- report -----------------------------------------------------------------------------------
def markdown(env: dict, results: list[Result], seconds: float) -> str:
    lines = [
        "# GPU serve proof",
        "",
        f"Card: **{env['card']}** ({env['capability']}) x {env['gpus']}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"sglang {env['sglang']}; tp_size {env['tp_size']}, dp_size {env['dp_size']}; total {seconds:.0f}s.",
        "",
        "Tolerance per mix: 3 x (max |log-prob| difference between the reference in bf16 and in fp32 on this GPU) + 0.02 nats.",
        "",
        "| model | mix | pass | startup s | endpoints | tokens = ref (bf16 / fp32) | max abs dlogprob | tolerance | weights vs plan | layers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ends = (
            "ok" if r.endpoints and all(v == "ok" for v in r.endpoints.values()) else (r.error or str(r.endpoints))[:60]
        )
        ends = ends.replace("\n", " ").replace("|", "/")  # one table row
        mem = (
            f"{r.weight_bytes} / {r.plan_bytes} ({100 * r.weight_vs_plan:+.2f}%)"
            if r.weight_vs_plan is not None
            else "-"
        )
        lines.append(
            f"| {r.arch} | {r.mix} | {'PASS' if r.ok else 'FAIL'} | {r.startup_s} | {ends} | "
            f"{r.tokens_identical_bf16_ref} / {r.tokens_identical_fp32_ref} ({r.token_match_rate}) | "
            f"{r.max_abs_dlogprob} | {r.tolerance} | {mem} | {r.layers or '-'} |"
        )
    checked = [r for r in results if "engine_plan_dir_same_tokens" in r.checks]
    if checked:
        lines += [
            "",
            "SGLang's own entry points on the plan directory the launcher wrote (same greedy tokens as "
            "through the launcher; --load-format dummy builds the mix and answers without reading weights):",
            "",
        ]
        lines += [
            f"- {r.arch}/{r.mix}: `python -m sglang.launch_server` {r.checks['launch_server_plan_dir_same_tokens']}, "
            f"`--load-format dummy` {r.checks['load_format_dummy_answers']}, `sglang.Engine` "
            f"{r.checks['engine_plan_dir_same_tokens']}" + (f" ({'; '.join(r.notes)})" if r.notes else "")
            for r in checked
        ]
    return "\n".join(lines) + "\n"


def write_results(out: Path, env: dict, results: list[Result], seconds: float) -> None:
    (out / "results.json").write_text(
        json.dumps(
            {"environment": env, "seconds": round(seconds, 1), "results": [asdict(r) for r in results]}, indent=2
        )
    )
    (out / "results.md").write_text(markdown(env, results, seconds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--workdir", default=None, help="models and conversions (default: OUT/work)")
    ap.add_argument("--only", default="", help="comma list of substrings of 'arch/mix' names to run (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--step-timeout", type=float, default=900.0, help="seconds per server start / request")
    ap.add_argument("--tp-size", type=int, default=1, help="tensor parallelism (GPUs per replica)")
    ap.add_argument("--dp-size", type=int, default=1, help="data-parallel replicas")
    ap.add_argument(
        "--entrypoints",
        default="",
        help="comma list of mixes also served from their plan directory by plain "
        "`python -m sglang.launch_server` (also with --load-format dummy) and by sglang.Engine",
    )
    ap.add_argument("--cpu-check", action="store_true", help="everything up to starting SGLang, on CPU (see cpu_check)")
    ap.add_argument(
        "--sglang-arg",
        action="append",
        default=[],
        help="extra SGLang flag (repeat; e.g. --sglang-arg=--skip-server-warmup)",
    )
    ap.add_argument(
        "--parallel", type=int, default=1, help="mixes served side by side on the GPU (server starts are mostly CPU)"
    )
    args = ap.parse_args(argv)
    args.entrypoints = [m.strip() for m in args.entrypoints.split(",") if m.strip()]
    started = time.time()
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    args.workdir = str(Path(args.workdir).resolve()) if args.workdir else str(out / "work")
    env = environment(args.cpu_check)
    env.update(tp_size=args.tp_size, dp_size=args.dp_size)
    log(f"card: {env['card']} ({env['capability']}); sglang {env['sglang']}; JIT cache {env['jit_cache']}")
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    runs = [(a, m) for a in ARCHS for m in MIXES if not wanted or any(w in f"{a}/{m}" for w in wanted)]
    converted = prepare_models(Path(args.workdir), sorted({a for a, _ in runs}))
    results = []
    # cpu-check builds references outside REFERENCE_LOCK: one at a time
    with ThreadPoolExecutor(max_workers=1 if args.cpu_check else max(1, args.parallel)) as pool:
        step = cpu_check if args.cpu_check else run_mix
        futures = [pool.submit(step, arch, mix, converted[arch], args, out) for arch, mix in runs]
        for future in futures:
            results.append(future.result())
            r = results[-1]
            log(
                f"{r.name}: {'PASS' if r.ok else 'FAIL'} dlogprob {r.max_abs_dlogprob} (tol {r.tolerance}), weights {r.weight_vs_plan}"
            )
            seconds = time.time() - started
            write_results(out, env, results, seconds)  # after every mix: a run cut short keeps what it measured
    print("\n" + markdown(env, results, seconds))
    passed = sum(r.ok for r in results)
    print(f"SUMMARY: {passed}/{len(results)} mixes passed on {env['card']} in {seconds:.0f}s -> {out / 'results.md'}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
