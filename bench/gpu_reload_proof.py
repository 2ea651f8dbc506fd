#!/usr/bin/env python3
"""GPU proof of the runtime reload: swap the MLPs' fp8 source while requests stream.

From nothing: a tiny random-weight Qwen3 (bf16) and a copy with perturbed MLP weights, each
converted with the project's converter; the mix is {attention bf16, MLP fp8-block}. The server is
started with launch_mixed_precision_server.py, then:

1. greedy outputs of fixed prompts (A) and the reference of mix A (reference.py);
2. a thread streams /generate requests while POST /mixed_precision/reload points the MLPs at the
   second fp8 checkpoint (B): every request must succeed and return either A's or B's outputs;
   afterwards the outputs must match the reference of mix B and differ from A's;
3. a reload pointing at a truncated fp8 file and one at a file with a NaN scale are refused, and
   the outputs stay B's; a change of scheme (MLP -> int4) answers 409 with the MLP layers;
4. /mixed_precision/info and /mixed_precision/config describe mix B.

Usage: python bench/gpu_reload_proof.py --out DIR [--workdir W] [--port 30123]
Results: DIR/reload_proof.json and DIR/reload_proof.md (card named); the summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The history of the river begins", "In the morning the market", "A compiler translates",
           "Mountains in the north"]
MAX_NEW = 16
SERVER_FLAGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--mem-fraction-static", "0.5"]
MLP_LAYERS = 4  # 2 decoder layers x (gate_up_proj, down_proj)


def log(msg: str) -> None:
    print(f"[reload-proof {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- sources ----------------------------------------------------------------------------------------
def prepare(work: Path) -> dict[str, Path]:
    """bf16 model A, model B (perturbed MLPs), their conversions; skipped when already there."""
    import torch
    from safetensors.torch import load_file, save_file

    from sglang_mixed_precision.tinymodels import make_tiny_model

    model_a, model_b = work / "model_a", work / "model_b"
    if not (model_a / "config.json").exists():
        log("generating tiny Qwen3 A")
        make_tiny_model("qwen3", model_a, num_layers=2)
    if not (model_b / "config.json").exists():
        log("model B: A with perturbed MLP weights")
        shutil.copytree(model_a, model_b)
        gen = torch.Generator().manual_seed(1)
        for f in model_b.glob("*.safetensors"):
            state = load_file(str(f))
            for name, t in state.items():
                if ".mlp." in name and name.endswith(".weight"):
                    state[name] = (t.float() + t.float().std() * torch.randn(t.shape, generator=gen)).to(t.dtype)
            save_file(state, str(f), metadata={"format": "pt"})
    for name, src, formats in (("conv_a", model_a, "fp16,fp8,int4"), ("conv_b", model_b, "fp8")):
        if not (work / name / formats.split(",")[-1] / "config.json").exists():
            log(f"converting {src.name} -> {name} ({formats})")
            subprocess.run([sys.executable, "-m", "sglang_mixed_precision.cli", "convert", "--model_path", str(src),
                            "--output_dir", str(work / name), "--formats", formats, "--method", "rtn", "--overwrite",
                            "--no_progress"], check=True)
    fp8_b = work / "conv_b" / "fp8"
    return {"fp16": work / "conv_a" / "fp16", "fp8_a": work / "conv_a" / "fp8", "int4": work / "conv_a" / "int4",
            "fp8_b": fp8_b, "fp8_trunc": damaged_copy(fp8_b, work / "fp8_truncated", "truncate"),
            "fp8_nan": damaged_copy(fp8_b, work / "fp8_nan", "nan")}


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
    return (f"mixed_precision:\n  fp16_path: {paths['fp16']}\n"
            f"  sources: {{fp8: {paths[fp8]}, int4: {paths['int4']}}}\n"
            f"  rules:\n    - {{match: \"model.layers.*.mlp.*\", source: {mlp}}}\n")


# ---- HTTP ----------------------------------------------------------------------------------------------
def http(port: int, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def generate(port: int) -> list[list[int]]:
    body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
    status, out = http(port, "/generate", body)
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {out}")
    return [o["output_ids"] for o in out]


def wait_healthy(proc: subprocess.Popen, port: int, logf: Path, limit: float) -> float:
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited rc={proc.returncode}; log tail:\n{logf.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return time.time() - t0
        except Exception:
            time.sleep(1)
    raise TimeoutError(f"server not healthy after {limit} s; log tail:\n{logf.read_text()[-3000:]}")


class Streamer(threading.Thread):
    """Sends the same batched /generate request back to back until stopped; records every reply."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.replies = port, threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            t0 = time.time()
            try:
                self.replies.append({"t0": t0, "t1": time.time(), "ids": generate(self.port), "error": None})
            except Exception as e:  # recorded: the proof fails on any error
                self.replies.append({"t0": t0, "t1": time.time(), "ids": None, "error": str(e)})


# ---- comparisons ------------------------------------------------------------------------------------------
def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Mean fraction of greedy tokens that agree with the reference before the first divergence."""
    return sum(prefix_match(o, r) / MAX_NEW for o, r in zip(outputs, reference)) / len(outputs)


def reference_ids(config_text: str, anchor: Path) -> list[list[int]]:
    """Greedy ids of the reference forward (transformers, each layer's weights from its source)."""
    from sglang_mixed_precision.config import parse_config
    from sglang_mixed_precision.plan import build_plan
    from sglang_mixed_precision.reference import generate_reference

    anchor.write_text(config_text)
    plan = build_plan(parse_config(config_text, anchor), tp_size=1)
    out = generate_reference(plan, PROMPTS, MAX_NEW)
    return [[int(t) for t in item.output_ids] for item in out]


# ---- the proof -----------------------------------------------------------------------------------------------
def run(work: Path, out: Path, port: int, limit: float) -> dict:
    paths = prepare(work)
    yaml_a, yaml_b = mix_yaml(paths, "fp8_a"), mix_yaml(paths, "fp8_b")
    cfg_a = work / "mix_a.yaml"
    cfg_a.write_text(yaml_a)
    log("reference outputs of mix A and mix B")
    ref_a, ref_b = reference_ids(yaml_a, work / "ref_a.yaml"), reference_ids(yaml_b, work / "ref_b.yaml")
    res: dict = {"prompts": PROMPTS, "max_new_tokens": MAX_NEW, "checks": {}}
    checks = res["checks"]

    cmd = [sys.executable, str(ROOT / "launch_mixed_precision_server.py"), "--enable-mixed-precision",
           "--mixed-precision-config", str(cfg_a), "--model-path", str(paths["fp16"]), "--port", str(port), *SERVER_FLAGS]
    logf = out / "server_reload_proof.log"
    log("starting the server on mix A")
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        res["ready_s"] = wait_healthy(proc, port, logf, limit)
        out_a = generate(port)
        res["agreement_a_vs_ref_a"] = agreement(out_a, ref_a)
        res["refs_differ"] = ref_a != ref_b

        log("streaming requests while reloading the MLPs from fp8 B")
        streamer = Streamer(port)
        streamer.start()
        time.sleep(1.0)
        t_reload = time.time()
        status, reply = http(port, "/mixed_precision/reload", {"config": yaml_b})
        t_done = time.time()
        time.sleep(1.0)
        streamer.stop.set()
        streamer.join(timeout=60)
        res["reload"] = {"status": status, "reply": reply, "seconds": t_done - t_reload}
        out_b = generate(port)
        res["agreement_b_vs_ref_b"], res["agreement_b_vs_ref_a"] = agreement(out_b, ref_b), agreement(out_b, ref_a)
        kinds = ["A" if r["ids"] == out_a else "B" if r["ids"] == out_b else ("error" if r["error"] else "other")
                 for r in streamer.replies]
        res["stream"] = {"requests": len(kinds), "A": kinds.count("A"), "B": kinds.count("B"),
                         "other": kinds.count("other"), "errors": [r["error"] for r in streamer.replies if r["error"]],
                         "B_after_reload": sum(1 for k, r in zip(kinds, streamer.replies) if k == "B" and r["t0"] >= t_done)}
        checks["reload_200"] = status == 200 and isinstance(reply, dict) and reply.get("status") == "reloaded" \
            and len(reply.get("layers", [])) == MLP_LAYERS
        checks["outputs_changed"] = out_b != out_a
        checks["b_matches_ref_b"] = res["agreement_b_vs_ref_b"] >= 0.75 and res["agreement_b_vs_ref_b"] > res["agreement_b_vs_ref_a"]
        checks["a_matched_ref_a"] = res["agreement_a_vs_ref_a"] >= 0.75
        checks["stream_no_errors"] = not res["stream"]["errors"]
        checks["stream_only_a_or_b"] = res["stream"]["other"] == 0 and res["stream"]["B_after_reload"] > 0

        for name in ("fp8_trunc", "fp8_nan"):
            log(f"reload pointing at {name} (must be refused)")
            status, reply = http(port, "/mixed_precision/reload", {"config": mix_yaml(paths, name)})
            after = generate(port)
            res[f"reload_{name}"] = {"status": status, "reply": reply}
            checks[f"{name}_refused"] = status == 400 and isinstance(reply, dict) and reply.get("applied") is False
            checks[f"{name}_outputs_unchanged"] = after == out_b
        expected_code = "corrupt_safetensors"
        checks["fp8_trunc_names_corruption"] = expected_code in json.dumps(res["reload_fp8_trunc"]["reply"])
        checks["fp8_nan_refused_by_workers"] = "reload_bad_tensor" in json.dumps(res["reload_fp8_nan"]["reply"])

        log("scheme change MLP fp8 -> int4 (must answer 409)")
        status, reply = http(port, "/mixed_precision/reload", {"config": mix_yaml(paths, "fp8_b", mlp="int4")})
        res["reload_scheme_change"] = {"status": status, "reply": reply}
        checks["scheme_change_409"] = status == 409 and len(reply.get("rebuild_layers", [])) == MLP_LAYERS
        checks["outputs_unchanged_after_409"] = generate(port) == out_b

        _, info = http(port, "/mixed_precision/info")
        _, config_text = http(port, "/mixed_precision/config")
        gate = info["modules"]["model.layers.0.mlp.gate_proj"]
        res["info_sample"] = {"gate_proj": gate, "totals": info["totals"]["by_precision"], "load": info.get("load"),
                              "reloads": info.get("reloads"), "config": info["config"]}
        checks["info_names_fp8_b"] = gate["path"] == str(paths["fp8_b"]) and gate["method"] == "Fp8LinearMethod"
        checks["config_is_b"] = config_text == yaml_b
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    res["passed"] = all(checks.values())
    return res


def markdown(card: str, res: dict) -> str:
    lines = [f"# Runtime reload proof ({card})", "",
             "Tiny Qwen3 (2 layers), mix {attention bf16, MLP fp8-block}; MLP fp8 source swapped A -> B while "
             f"requests stream; greedy, {MAX_NEW} new tokens, {len(PROMPTS)} prompts.", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in res["checks"].items()]
    s = res.get("stream", {})
    lines += ["", f"- reload: HTTP {res['reload']['status']} in {res['reload']['seconds']:.2f} s",
              f"- streamed requests: {s.get('requests')} (A {s.get('A')}, B {s.get('B')}, other {s.get('other')}, "
              f"errors {len(s.get('errors', []))})",
              f"- agreement with the reference (mean greedy prefix): A vs ref A {res['agreement_a_vs_ref_a']:.2f}, "
              f"B vs ref B {res['agreement_b_vs_ref_b']:.2f}, B vs ref A {res['agreement_b_vs_ref_a']:.2f}",
              f"- truncated source: HTTP {res['reload_fp8_trunc']['status']}; NaN scale: HTTP {res['reload_fp8_nan']['status']}; "
              f"scheme change: HTTP {res['reload_scheme_change']['status']}",
              "", f"**{'PASSED' if res['passed'] else 'FAILED'}**"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default=None, help="sources and configs (default: OUT/work)")
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--limit", type=float, default=300, help="seconds to wait for the server")
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    t0 = time.time()
    res = run(work, out, args.port, args.limit)
    res.update(card=card, total_s=time.time() - t0)
    (out / "reload_proof.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "reload_proof.md").write_text(markdown(card, res))
    print(markdown(card, res))
    print(f"[reload-proof] {'PASSED' if res['passed'] else 'FAILED'} on {card} in {res['total_s']:.0f} s: "
          + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in res["checks"].items()), flush=True)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
