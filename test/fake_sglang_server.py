"""A CPU stand-in for an SGLang server, to run the GPU scripts' server paths in tests.

Takes the arguments of ``python -m sglang.launch_server`` or of ``launch_mixed_precision_server.py``
(--model-path, --port, --enable-mixed-precision, --mixed-precision-config, --tp-size) and answers
the routes the bench scripts use with SGLang's reply shapes: /health_generate, /generate (input_ids
or text, greedy, log-probs) and, for a mix, /mixed_precision/info, /config and /reload driven by the
project's MixedPrecisionRuntime. With FAKE_SGLANG_REFERENCE=1 a mix generates with the transformers
reference of its active plan (swapped by a successful reload); otherwise every server generates by
a fixed pseudo-random rule (fast). It prints the log lines the scripts parse (SGLang's "Load weight
end", the mixed loader's memory and audit lines).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {"fp8": "Fp8LinearMethod", "gptq": "GPTQMarlinLinearMethod", "unquantized": "UnquantizedLinearMethod"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Mix:
    """The served mix: its plan, reference model and runtime (reload swaps the model)."""

    def __init__(self, config: Path, tp: int):
        from sglang_mixed_precision.reference import build_reference_model, plan_from_config
        from sglang_mixed_precision.serving import runtime as rt

        self.build = lambda plan: build_reference_model(plan, simulate_w8a8=True)
        self.plan = plan_from_config(config, tp_size=tp)
        self.model = self.build(self.plan)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        active = rt.ActiveMix(config.read_text(), config, tp)
        self.runtime = self.call(self._make_runtime(rt, active))

    async def _make_runtime(self, rt, active):  # its asyncio.Lock belongs to this loop
        return rt.MixedPrecisionRuntime(active, Backend(self))

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def generate(self, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float]]]:
        """One request on one model: a reload lands between requests, as SGLang's update lock drains them."""
        from sglang_mixed_precision.reference import greedy

        model, out = self.model, []
        for ids in prompts:
            tokens, logits = greedy(model, ids, max_new)
            lps = logits.log_softmax(-1)
            out.append((tokens, [float(lps[j, t]) for j, t in enumerate(tokens)]))
        return out


class Backend:
    """The workers: stage as gpu_reload_proof's --cpu-check does, then swap the reference model."""

    def __init__(self, mix: Mix):
        self.mix = mix
        self.staging = load_script("gpu_reload_proof").StagingBackend(mix.plan)

    async def send_reload(self, request_dir: str) -> tuple[bool, str]:
        ok, message = await self.staging.send_reload(request_dir)
        if ok:
            self.mix.plan = self.staging.plan
            self.mix.model = self.mix.build(self.mix.plan)
        return ok, message

    async def worker_info(self) -> list[dict]:
        from sglang_mixed_precision.core.report import summary

        plan = self.mix.plan
        layers = {prefix: {"method": METHODS[g.scheme.kind]} for prefix, g in plan.groups.items()}
        read = {r["label"]: r["bytes"] for r in summary(plan)["by_source"]}
        return [{"layers": layers, "load": {"bytes_read": read}}]


def pseudo_generate(prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float]]]:
    return [([(sum(ids) * 31 + 7 * i) % 1000 for i in range(max_new)], [-1.0] * max_new) for ids in prompts]


def print_load_lines(args, mix: Mix | None) -> None:
    from sglang_mixed_precision.core.report import summary

    if mix is None:
        nbytes = sum(f.stat().st_size for f in Path(args.model_path).glob("*.safetensors"))
    else:
        nbytes = summary(mix.plan)["per_rank"][0]["bytes"]
        kinds = sorted({METHODS[g.scheme.kind] for g in mix.plan.groups.values()})
        print(f"mixed_precision audit: 1 tensors consumed once, 1 parameters loaded; layers: {', '.join(kinds)}")
        print(f"mixed_precision: weight memory {nbytes} bytes in parameters; plan {nbytes} bytes per rank (+0.00%)")
    print(
        f"Load weight end. elapsed=0.25 s, type=Fake, avail mem=70.00 GB, mem usage={nbytes / 2**30:.2f} GB.",
        flush=True,
    )


def handler(mix: Mix | None):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, status: int, body, kind: str = "application/json") -> None:
            data = (json.dumps(body) if kind == "application/json" else body).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health_generate":
                self.reply(200, {})
            elif mix and self.path == "/mixed_precision/info":
                self.reply(200, mix.call(mix.runtime.info()))
            elif mix and self.path == "/mixed_precision/config":
                self.reply(200, mix.runtime.config_text(), "application/yaml")
            else:
                self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/generate":
                self.reply(200, self.generate(body))
            elif mix and self.path == "/mixed_precision/reload":
                self.reply(*mix.call(mix.runtime.reload(body)))
            else:
                self.reply(404, {"detail": "Not Found"})

        def generate(self, body: dict):
            prompts = body["input_ids"] if "input_ids" in body else [ord(c) for c in body["text"]]
            batched = isinstance(prompts[0], list)
            reference = mix is not None and os.environ.get("FAKE_SGLANG_REFERENCE") == "1"
            results = (mix.generate if reference else pseudo_generate)(
                prompts if batched else [prompts], body["sampling_params"]["max_new_tokens"]
            )
            out = [
                {
                    "text": "",
                    "output_ids": tokens,
                    "meta_info": {"output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, tokens)]},
                }
                for tokens, lps in results
            ]
            return out if batched else out[0]

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--model-path", "--port", "--mixed-precision-config", "--tp-size"):
        ap.add_argument(flag)
    ap.add_argument("--enable-mixed-precision", action="store_true")
    args, _ = ap.parse_known_args()
    mix = Mix(Path(args.mixed_precision_config), int(args.tp_size or 1)) if args.enable_mixed_precision else None
    print_load_lines(args, mix)
    ThreadingHTTPServer(("127.0.0.1", int(args.port)), handler(mix)).serve_forever()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "python"))
    main()
