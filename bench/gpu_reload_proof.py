#!/usr/bin/env python3
"""GPU proof of the runtime reload: swap the MLPs' fp8 source while requests stream.

From nothing: a tiny random-weight Qwen3 (bf16) and a copy with perturbed MLP weights, each
converted with the project's converter; the mix is {attention bf16, MLP fp8-block}. The server is
started with launch_mixed_precision_server.py, then:

1. greedy outputs (token ids and log-probabilities) of fixed prompts on mix A;
2. a thread streams /generate requests while POST /mixed_precision/reload points the MLPs at the
   second fp8 checkpoint (B): every request must succeed and return either A's or B's tokens;
3. a reload pointing at a truncated fp8 file and one at a file with a NaN scale are refused, and
   the outputs stay B's; a change of scheme (MLP -> int4) answers 409 with the MLP layers;
4. /mixed_precision/info and /mixed_precision/config describe mix B.

Which mix the server computes is judged on log-probabilities, not on greedy tokens: random-weight
models have near-ties that bf16 kernels break differently from any reference. SGLang's log-prob of
every generated token is compared with the transformers reference of mix A and of mix B
(reference.py, teacher-forced, fp8 activations quantized as the W8A8 kernels do). Tolerance, as in
gpu_serve_proof.py (reference.logprob_tolerance): 3 x (max |log-prob| difference between the reference in bf16 and in fp32) +
0.02 nats. Before the reload the server must be within tolerance of A; after it, within tolerance
of B and outside tolerance of A.

--cpu-check runs everything up to launching SGLang on CPU: sources, references (a couple of
tokens), the launch command (the launcher validates the plan and writes the plan directory), and
every reload request through the /mixed_precision/reload route's own code (MixedPrecisionRuntime)
with the workers' staging step (re-plan, read and check every tensor) in place of SGLang.

Usage (GPU machine, from the repository root, after ``source bench/gpu_setup.sh``):
    python bench/gpu_reload_proof.py --out DIR [--workdir W]
    python bench/gpu_reload_proof.py --out DIR --cpu-check
Results: DIR/reload_proof.json and DIR/reload_proof.md (the card named), written after every
step; the server log in DIR/logs/. The summary is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

from gpu_common import environment, make_log  # noqa: E402

PROMPTS = [
    "The history of the river begins",
    "In the morning the market",
    "A compiler translates",
    "Mountains in the north",
]
MAX_NEW = 16
CPU_CHECK_NEW = 2  # reference tokens per prompt in --cpu-check
# Radix cache off: a prompt served from cached KV takes another numeric path than a fresh prefill,
# which could change near-tied greedy tokens between the A/B classification and the stream.
SERVER_FLAGS = [
    "--attention-backend",
    "triton",
    "--sampling-backend",
    "pytorch",
    "--mem-fraction-static",
    "0.5",
    "--max-total-tokens",
    "32768",
    "--dtype",
    "bfloat16",
    "--disable-radix-cache",
    "--log-level",
    "info",
]
MLP_LAYERS = 4  # 2 decoder layers x (gate_up_proj, down_proj)


log = make_log("reload-proof")


# ---- sources ----------------------------------------------------------------------------------------
def prepare(work: Path) -> dict[str, Path]:
    """bf16 model A, model B (perturbed MLPs), their conversions; skipped when already there."""
    model_a, model_b = work / "model_a", work / "model_b"
    if not (model_a / "config.json").exists():
        from sglang_mixed_precision.testing.tinymodels import make_tiny_model

        log("generating tiny Qwen3 A")
        make_tiny_model("qwen3", model_a, num_layers=2)
    if not (model_b / "config.json").exists():
        log("model B: A with perturbed MLP weights")
        perturbed_copy(model_a, model_b)
    convert_once(model_a, work / "conv_a", ("fp16", "fp8", "int4"))
    convert_once(model_b, work / "conv_b", ("fp8",))
    fp8_b = work / "conv_b" / "fp8"
    return {
        "fp16": work / "conv_a" / "fp16",
        "fp8_a": work / "conv_a" / "fp8",
        "int4": work / "conv_a" / "int4",
        "fp8_b": fp8_b,
        "fp8_trunc": damaged_copy(fp8_b, work / "fp8_truncated", "truncate"),
        "fp8_nan": damaged_copy(fp8_b, work / "fp8_nan", "nan"),
    }


def perturbed_copy(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(1)
    for f in dst.glob("*.safetensors"):
        state = load_file(str(f))
        for name, t in state.items():
            if ".mlp." in name and name.endswith(".weight"):
                state[name] = (t.float() + t.float().std() * torch.randn(t.shape, generator=gen)).to(t.dtype)
        save_file(state, str(f), metadata={"format": "pt"})


def convert_once(model: Path, out: Path, formats: tuple[str, ...]) -> None:
    from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert

    if all((out / f / "config.json").is_file() for f in formats):
        return
    log(f"converting {model.name} -> {out.name} ({', '.join(formats)}, rtn)")
    convert(
        ConvertOptions(
            model_path=str(model), output_dir=str(out), formats=formats, method="rtn", overwrite=True, progress=False
        )
    )


def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of an fp8 source whose first weight file is truncated, or holds a NaN MLP scale."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    files = sorted(dst.glob("*.safetensors"))
    if how == "truncate":
        f = files[0]
        f.write_bytes(f.read_bytes()[:-4096])
        return dst
    for f in files:
        state = load_file(str(f))
        name = next((n for n in state if ".mlp." in n and n.endswith("weight_scale_inv")), None)
        if name:
            state[name] = state[name].clone()
            state[name].view(-1)[0] = float("nan")
            save_file(state, str(f), metadata={"format": "pt"})
            return dst
    raise RuntimeError(f"no MLP weight_scale_inv in {src}")


def mix_yaml(paths: dict[str, Path], fp8: str, mlp: str = "fp8") -> str:
    import yaml

    doc = {
        "mixed_precision": {
            "fp16_path": str(paths["fp16"]),
            "sources": {"fp8": str(paths[fp8]), "int4": str(paths["int4"])},
            "rules": [{"match": "model.layers.*.mlp.*", "source": mlp}],
        }
    }
    return yaml.safe_dump(doc, sort_keys=False)


def reload_bodies(paths: dict[str, Path]) -> dict[str, dict]:
    """The POST /mixed_precision/reload bodies, in the order the proof sends them."""
    return {
        "fp8_b": {"config": mix_yaml(paths, "fp8_b")},
        "fp8_trunc": {"config": mix_yaml(paths, "fp8_trunc")},
        "fp8_nan": {"config": mix_yaml(paths, "fp8_nan")},
        "scheme_change": {"config": mix_yaml(paths, "fp8_b", mlp="int4")},
    }


# ---- reference -------------------------------------------------------------------------------------------
class Reference:
    """transformers models of one mix in fp32 and bf16 (fp8 activations quantized as SGLang's W8A8 kernels do)."""

    def __init__(self, config: Path, device: str):
        from sglang_mixed_precision.reference import load_tokenizer, plan_from_config, reference_pair

        self.plan = plan_from_config(config)
        self.tokenizer = load_tokenizer(self.plan)
        self.pair = reference_pair(self.plan, device)

    def prompt_ids(self) -> list[list[int]]:
        return [self.tokenizer(p)["input_ids"] for p in PROMPTS]

    def greedy_samples(self, max_new: int) -> list[dict]:
        """The fp32 reference's own greedy tokens and log-probs, shaped like SGLang's replies."""
        from sglang_mixed_precision.reference import greedy

        samples = []
        for ids in self.prompt_ids():
            tokens, logits = greedy(self.pair.fp32, ids, max_new)
            lps = logits.log_softmax(-1)
            samples.append(
                {
                    "prompt_ids": ids,
                    "output_ids": tokens,
                    "output_logprobs": [float(lps[j, t]) for j, t in enumerate(tokens)],
                }
            )
        return samples

    def deviation(self, samples: list[dict]) -> dict:
        """Max |log-prob| distance of the samples' generated tokens from this mix, and the tolerance."""
        from sglang_mixed_precision.reference import logprob_deviation, logprob_tolerance, scored_continuation

        dev, noise = logprob_deviation(
            self.pair, [scored_continuation(s["prompt_ids"], s["output_ids"], s["output_logprobs"]) for s in samples]
        )
        return {
            "max_abs_dlogprob": round(dev, 5),
            "bf16_noise": round(noise, 5),
            "tolerance": round(logprob_tolerance(noise), 5),
        }


def within(d: dict) -> bool:
    return d["max_abs_dlogprob"] <= d["tolerance"]


# ---- what each reply must look like (the GPU run and --cpu-check judge replies with the same code) --------
def reload_applied(status: int, reply) -> bool:
    return (
        status == 200
        and isinstance(reply, dict)
        and reply.get("status") == "reloaded"
        and len(reply.get("layers", [])) == MLP_LAYERS
    )


def refused(status: int, reply, code: str) -> bool:
    return status == 400 and isinstance(reply, dict) and reply.get("applied") is False and code in json.dumps(reply)


def rebuild_refused(status: int, reply) -> bool:
    return status == 409 and isinstance(reply, dict) and len(reply.get("rebuild_layers", [])) == MLP_LAYERS


def info_names(info: dict, source: Path) -> bool:
    gate = info["modules"]["model.layers.0.mlp.gate_proj"]
    return Path(gate["path"]).resolve() == source.resolve()


REFUSALS = {"fp8_trunc": "corrupt_safetensors", "fp8_nan": "reload_bad_tensor"}


# ---- results --------------------------------------------------------------------------------------------
class Results:
    """The proof's record; written (JSON + markdown) after every step so a run cut short keeps it."""

    def __init__(self, out: Path, env: dict, mode: str):
        self.out, self.started = out, time.time()
        self.data: dict = {"environment": env, "mode": mode, "prompts": PROMPTS, "checks": {}, "steps": []}

    def check(self, name: str, ok: bool) -> None:
        self.data["checks"][name] = bool(ok)
        log(f"  {name}: {'pass' if ok else 'FAIL'}")

    def step(self, name: str, **values) -> None:
        self.data.update(values)
        self.data["steps"].append(name)
        self.save()

    @property
    def passed(self) -> bool:
        checks = self.data["checks"]
        return bool(checks) and all(checks.values()) and "error" not in self.data

    def save(self) -> None:
        self.data["seconds"] = round(time.time() - self.started, 1)
        self.data["passed"] = self.passed
        (self.out / "reload_proof.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "reload_proof.md").write_text(markdown(self.data))


def markdown(d: dict) -> str:
    env = d["environment"]
    lines = [
        f"# Runtime reload proof ({env['card']})",
        "",
        f"Mode: {d['mode']}; {env.get('versions', '')}; {d.get('seconds', 0):.0f} s; steps done: "
        f"{', '.join(d['steps']) or 'none'}.",
        "",
        "Tiny Qwen3 (2 layers), mix {attention bf16, MLP fp8-block}; MLP fp8 source swapped A -> B while "
        f"requests stream; greedy, {d.get('max_new_tokens', MAX_NEW)} new tokens, {len(PROMPTS)} prompts.",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in d["checks"].items()]
    lines.append("")
    served = "reference B's own greedy tokens" if d["mode"] == "cpu-check" else "after reload"
    for key, label in (
        ("dev_a_vs_ref_a", "before reload vs ref A"),
        ("dev_b_vs_ref_b", f"{served} vs ref B"),
        ("dev_b_vs_ref_a", f"{served} vs ref A"),
    ):
        if key in d:
            v = d[key]
            lines.append(f"- {label}: max |dlogprob| {v['max_abs_dlogprob']} (tolerance {v['tolerance']})")
    if "reload" in d:
        lines.append(f"- reload: HTTP {d['reload']['status']} in {d['reload']['seconds']:.2f} s")
    if "stream" in d:
        s = d["stream"]
        lines.append(
            f"- streamed requests: {s['requests']} (A {s['A']}, B {s['B']}, other {s['other']}, "
            f"errors {len(s['errors'])}, B after the reload {s['B_after_reload']})"
        )
    statuses = [
        f"{name}: HTTP {d[f'reload_{name}']['status']}"
        for name in ("fp8_trunc", "fp8_nan", "scheme_change")
        if f"reload_{name}" in d
    ]
    if statuses:
        lines.append(f"- refusals: {'; '.join(statuses)}")
    if "error" in d:
        lines.append(f"- error: `{d['error'][:300]}`")
    lines += ["", f"**{'PASSED' if d.get('passed') else 'FAILED'}**"]
    return "\n".join(lines) + "\n"


# ---- the GPU run -------------------------------------------------------------------------------------------
def generate(base: str, prompt_ids: list[list[int]], timeout: float = 300) -> list[dict]:
    """Greedy /generate of every prompt in one batch: output ids and their log-probs."""
    from sglang_mixed_precision.serving import client

    reply = client.post_json(
        f"{base}/generate",
        {
            "input_ids": prompt_ids,
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
        },
        timeout=timeout,
    )
    return [
        {
            "prompt_ids": ids,
            "output_ids": list(r["output_ids"]),
            "output_logprobs": [float(lp) for lp, *_ in r["meta_info"]["output_token_logprobs"]],
        }
        for ids, r in zip(prompt_ids, reply)
    ]


def token_ids(samples: list[dict]) -> list[list[int]]:
    return [s["output_ids"] for s in samples]


class Streamer(threading.Thread):
    """Sends the same batched /generate request back to back until stopped; records every reply."""

    def __init__(self, base: str, prompt_ids: list[list[int]]):
        super().__init__(daemon=True)
        self.base, self.prompt_ids, self.stop, self.replies = base, prompt_ids, threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            t0 = time.time()
            try:
                ids = token_ids(generate(self.base, self.prompt_ids))
                self.replies.append({"t0": t0, "t1": time.time(), "ids": ids, "error": None})
            except Exception as e:  # recorded: the proof fails on any error
                self.replies.append({"t0": t0, "t1": time.time(), "ids": None, "error": str(e)})


def stream_summary(replies: list[dict], out_a, out_b, t_done: float) -> dict:
    kinds = [
        "A" if r["ids"] == out_a else "B" if r["ids"] == out_b else ("error" if r["error"] else "other")
        for r in replies
    ]
    return {
        "requests": len(kinds),
        "A": kinds.count("A"),
        "B": kinds.count("B"),
        "other": kinds.count("other"),
        "errors": [r["error"] for r in replies if r["error"]],
        "B_after_reload": sum(1 for k, r in zip(kinds, replies) if k == "B" and r["t0"] >= t_done),
    }


def launch_command(cfg_a: Path, paths: dict[str, Path], port: int, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch_mixed_precision_server.py"),
        "--enable-mixed-precision",
        "--mixed-precision-config",
        str(cfg_a),
        "--model-path",
        str(paths["fp16"]),
        "--plan-dir",
        str(out / "plan"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *SERVER_FLAGS,
        *extra,
    ]


def run_gpu(res: Results, paths, cfg_a: Path, refs: dict[str, Reference], args, out: Path) -> None:
    from sglang_mixed_precision.serving import client

    port = client.free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = launch_command(cfg_a, paths, port, out, args.sglang_arg)
    log_path = out / "logs" / "server_reload_proof.log"
    log(f"starting the server on mix A: {' '.join(cmd[1:])}")
    os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"  # log-probs of the model's distribution, not the sampler's
    proc = client.start_server(cmd, log_path)
    try:
        res.step(
            "server_ready", ready_s=round(client.wait_until_ready(base, proc, args.limit, log_path, progress=log), 1)
        )
        prompt_ids = refs["A"].prompt_ids()
        samples_a = generate(base, prompt_ids)
        dev_a = refs["A"].deviation(samples_a)
        res.check("a_matches_ref_a", within(dev_a))
        res.step("mix_a", dev_a_vs_ref_a=dev_a, outputs_a=token_ids(samples_a))
        stream_and_reload(res, base, prompt_ids, samples_a, refs, reload_bodies(paths)["fp8_b"])
        out_b = res.data["outputs_b"]
        bodies = reload_bodies(paths)
        for name, code in REFUSALS.items():
            log(f"reload pointing at {name} (must be refused)")
            status, reply = client.request(f"{base}/mixed_precision/reload", bodies[name])
            res.check(f"{name}_refused", refused(status, reply, code))
            res.check(f"{name}_outputs_unchanged", token_ids(generate(base, prompt_ids)) == out_b)
            res.step(name, **{f"reload_{name}": {"status": status, "reply": reply}})
        log("scheme change MLP fp8 -> int4 (must answer 409)")
        status, reply = client.request(f"{base}/mixed_precision/reload", bodies["scheme_change"])
        res.check("scheme_change_409", rebuild_refused(status, reply))
        res.check("outputs_unchanged_after_409", token_ids(generate(base, prompt_ids)) == out_b)
        res.step("scheme_change", reload_scheme_change={"status": status, "reply": reply})
        info = client.get_json(f"{base}/mixed_precision/info")
        _, config_text = client.request(f"{base}/mixed_precision/config")
        gate = info["modules"]["model.layers.0.mlp.gate_proj"]
        res.check("info_names_fp8_b", info_names(info, paths["fp8_b"]) and gate["method"] == "Fp8LinearMethod")
        res.check("config_is_b", config_text == bodies["fp8_b"]["config"])
        res.step(
            "info",
            info_sample={
                "gate_proj": gate,
                "totals": info["totals"]["by_precision"],
                "load": info.get("load"),
                "reloads": info.get("reloads"),
                "config": info["config"],
            },
        )
    finally:
        client.stop_server(proc)


def stream_and_reload(res: Results, base: str, prompt_ids, samples_a, refs, body: dict) -> None:
    from sglang_mixed_precision.serving import client

    log("streaming requests while reloading the MLPs from fp8 B")
    streamer = Streamer(base, prompt_ids)
    streamer.start()
    time.sleep(1.0)
    t_reload = time.time()
    status, reply = client.request(f"{base}/mixed_precision/reload", body)
    t_done = time.time()
    time.sleep(1.0)
    streamer.stop.set()
    streamer.join(timeout=120)
    samples_b = generate(base, prompt_ids)
    out_a, out_b = token_ids(samples_a), token_ids(samples_b)
    stream = stream_summary(streamer.replies, out_a, out_b, t_done)
    dev_b, dev_b_a = refs["B"].deviation(samples_b), refs["A"].deviation(samples_b)
    res.check("reload_200", reload_applied(status, reply))
    res.check("b_matches_ref_b", within(dev_b))
    res.check("b_is_not_a", not within(dev_b_a))
    res.check("outputs_changed", out_b != out_a)
    res.check("stream_no_errors", not stream["errors"])
    res.check("stream_only_a_or_b", stream["other"] == 0 and stream["B_after_reload"] > 0)
    res.step(
        "reload_b",
        reload={"status": status, "reply": reply, "seconds": round(t_done - t_reload, 3)},
        outputs_b=out_b,
        dev_b_vs_ref_b=dev_b,
        dev_b_vs_ref_a=dev_b_a,
        stream=stream,
    )


# ---- --cpu-check ----------------------------------------------------------------------------------------------
class StagingBackend:
    """The workers' first reload phase on CPU: re-plan and stage (read and check every tensor of
    the changed layers), then report as a worker would; no model is touched."""

    def __init__(self, plan):
        self.plan = plan

    async def send_reload(self, request_dir: str) -> tuple[bool, str]:
        from sglang_mixed_precision.core.reload_plan import replan_in_worker
        from sglang_mixed_precision.serving import runtime as rt

        request = rt.read_worker_request(request_dir)
        try:
            staged = rt.stage_tensors(replan_in_worker(self.plan, request))
            self.plan = staged.plan.plan
            reply = {
                "success": True,
                "layers": len(staged.plan.layers),
                "bytes_read": staged.bytes,
                "seconds": round(staged.seconds, 3),
            }
        except Exception as e:
            reply = {
                "success": False,
                "stage": "stage",
                "applied": False,
                "failures": [{"rank": 0, "error": rt.error_json(e)}],
            }
        return reply["success"], json.dumps({rt.REPLY_KEY: reply})

    async def worker_info(self) -> list[dict]:
        return []


def run_cpu_check(res: Results, paths, cfg_a: Path, refs: dict[str, Reference], args, out: Path) -> None:
    from sglang_mixed_precision.serving import launcher
    from sglang_mixed_precision.serving import runtime as rt

    samples = {k: ref.greedy_samples(CPU_CHECK_NEW) for k, ref in refs.items()}
    dev_b, dev_b_a = refs["B"].deviation(samples["B"]), refs["A"].deviation(samples["B"])
    res.check("reference_b_within_own_tolerance", within(dev_b))
    res.check("references_a_b_differ", not within(dev_b_a))
    res.step(
        "references",
        dev_b_vs_ref_b=dev_b,
        dev_b_vs_ref_a=dev_b_a,
        reference_outputs={k: token_ids(s) for k, s in samples.items()},
    )

    cmd = launcher.sglang_command(launch_command(cfg_a, paths, 30000, out, args.sglang_arg)[2:], out=io.StringIO())
    log(f"would launch: {' '.join(cmd)}")
    plan_dir = Path(cmd[cmd.index("--model-path") + 1])
    res.step("launch_command", launch_command=cmd)

    active = rt.active_mix_from_model_path(plan_dir, 1)
    runtime = rt.MixedPrecisionRuntime(active, StagingBackend(active.active_plan()))
    bodies = reload_bodies(paths)
    status, reply = asyncio.run(runtime.reload(bodies["fp8_b"]))
    res.check("reload_200", reload_applied(status, reply))
    res.step("reload_b", reload={"status": status, "reply": reply, "seconds": 0.0})
    for name, code in REFUSALS.items():
        status, reply = asyncio.run(runtime.reload(bodies[name]))
        res.check(f"{name}_refused", refused(status, reply, code))
        res.step(name, **{f"reload_{name}": {"status": status, "reply": reply}})
    status, reply = asyncio.run(runtime.reload(bodies["scheme_change"]))
    res.check("scheme_change_409", rebuild_refused(status, reply))
    res.step("scheme_change", reload_scheme_change={"status": status, "reply": reply})
    info = asyncio.run(runtime.info())
    res.check("info_names_fp8_b", info_names(info, paths["fp8_b"]))
    res.check("config_is_b", runtime.config_text() == bodies["fp8_b"]["config"])
    res.step(
        "info", info_sample={"gate_proj": info["modules"]["model.layers.0.mlp.gate_proj"], "config": info["config"]}
    )


# ---- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--workdir", default=None, help="sources and configs (default: OUT/work)")
    ap.add_argument("--limit", type=float, default=400, help="seconds to wait for the server")
    ap.add_argument("--cpu-check", action="store_true", help="everything up to launching SGLang, on CPU")
    ap.add_argument("--sglang-arg", action="append", default=[], help="extra SGLang flag (repeat)")
    args = ap.parse_args(argv)
    import torch

    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir).resolve() if args.workdir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    res = Results(out, environment(args.cpu_check), "cpu-check" if args.cpu_check else "gpu")
    res.data["max_new_tokens"] = CPU_CHECK_NEW if args.cpu_check else MAX_NEW
    try:
        paths = prepare(work)
        res.step("sources", sources={k: str(v) for k, v in paths.items()})
        configs = {}
        for name, fp8 in (("A", "fp8_a"), ("B", "fp8_b")):
            configs[name] = work / f"mix_{name.lower()}.yaml"
            configs[name].write_text(mix_yaml(paths, fp8))
        device = "cuda" if torch.cuda.is_available() and not args.cpu_check else "cpu"
        log(f"reference models of mix A and mix B ({device})")
        refs = {name: Reference(path, device) for name, path in configs.items()}
        (run_cpu_check if args.cpu_check else run_gpu)(res, paths, configs["A"], refs, args, out)
    except Exception as e:  # recorded: the results so far stay on disk
        res.data["error"] = f"{type(e).__name__}: {e}"
        log(f"FAILED {res.data['error']}\n{traceback.format_exc()}")
    res.save()
    print("\n" + markdown(res.data))
    checks = res.data["checks"]
    print(
        f"SUMMARY: reload proof ({res.data['mode']}) {'PASSED' if res.passed else 'FAILED'} on {res.data['environment']['card']} "
        f"in {res.data['seconds']:.0f}s: "
        + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in checks.items())
        + f" -> {out / 'reload_proof.md'}",
        flush=True,
    )
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
