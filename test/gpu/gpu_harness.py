"""What the GPU tests share with their CPU check: the tiny models and their conversions, the mixes,
the SGLang servers' commands, a fleet that starts servers side by side, and the comparison with the
transformers reference.

Everything up to starting SGLang runs anywhere: test_gpu_prepare.py runs it on CPU, SGLang's own
argument parser included. Starting servers needs the GPU machine (test/gpu/README.md).
"""

from __future__ import annotations

import atexit
import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sglang_mixed_precision.serving import client

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch_mixed_precision_server.py"

# ---- what is served --------------------------------------------------------------------------------
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
# Every other family (Llama, Qwen2 with q/k/v biases, Qwen2-MoE with its shared expert, Mixtral, a
# tied-embedding Qwen3): two mixes each, one with FP8-block attention, one with int4 MLP or experts
# (Mixtral's block_sparse_moe, Qwen2-MoE's shared expert with them), the rest bf16. Select them
# alone with -k "llama or qwen2 or mixtral or tied".
FAMILY_ARCHS = ("llama", "qwen2", "qwen2_moe", "mixtral", "qwen3_tied")
FAMILY_MIXES = {
    "attn-fp8": ("fp16", [("model.layers.*.self_attn.*", "fp8")]),
    "mlp-int4": ("fp16", [("model.layers.*.mlp.*", "int4")]),
}
# Every int4 MoE kernel passes the same correctness checks: the mixes with int4 experts run each one
# (--int4-moe-kernel; dense models ignore it: their int4 linears run GPTQ-Marlin).
# Every int4 MoE kernel choice is proven: all-int4 runs the launcher's default (auto).
INT4_MOE_KERNEL = {"attn-fp8+experts-int4": "wna16", "attn-bf16+experts-int4": "marlin"}
# The mix whose plan directory is also served by SGLang's own entry points (launch_server, Engine).
ENTRYPOINT_MIX = "attn-fp8+experts-int4"
# The converter's outputs served by stock SGLang, compared with the reference of the uniform mix.
STOCK_FORMATS = {"fp8": "all-fp8", "int4": "all-int4"}
# SGLang 0.5.17's GPTQ-Marlin MoE keeps fp16 scales and asserts on bf16 activations; its MoE-WNA16
# method serves the same int4 experts in bf16 (bench/results/gpu_convert_proof_h100.md).
STOCK_MOE_INT4_FLAGS = ("--quantization", "moe_wna16")
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "In the beginning the universe was created. This has made a lot of people",
    "def fibonacci(n):",
]
MAX_NEW_TOKENS = 16
MEMORY_TOLERANCE = 0.02  # GPU weight memory vs the plan's per-rank bytes

# One set of server settings: flags for the launcher and launch_server, keywords for sglang.Engine.
# KV cache capped: SGLang sizes it from the memory free when it measures, so servers starting side by
# side must not take big pools while another one measures. CUDA graphs off: the correctness checks
# compare eager kernels with the reference.
SERVER_SETTINGS = {
    "attention_backend": "triton",
    "sampling_backend": "pytorch",
    "disable_cuda_graph": True,
    "mem_fraction_static": 0.5,
    "max_total_tokens": 32768,
    "dtype": "bfloat16",
}
LOG_FLAGS = ("--log-level", "info")
SERVER_ENV = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}  # log-probs of the model's distribution, not the sampler's

# The reload test: a tiny Qwen3 whose MLP fp8 source is swapped while requests stream.
RELOAD_PROMPTS = [
    "The history of the river begins",
    "In the morning the market",
    "A compiler translates",
    "Mountains in the north",
]
# Radix cache off: a prompt served from cached KV takes another numeric path than a fresh prefill,
# which could change near-tied greedy tokens between the A/B classification and the stream. CUDA
# graphs on: an in-place reload must keep the captured graphs' weights valid, as in production.
RELOAD_SETTINGS = {
    **{k: v for k, v in SERVER_SETTINGS.items() if k != "disable_cuda_graph"},
    "disable_radix_cache": True,
}
RELOAD_MLP_LAYERS = 4  # 2 decoder layers x (gate_up_proj, down_proj)
RELOAD_SERVER = "reload/qwen3"


def flags(settings: dict) -> list[str]:
    """SGLang's command-line flags for settings given as ServerArgs keywords."""
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def log_to_stdout(message: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- server names -------------------------------------------------------------------------------------
def mix_server(arch: str, mix: str) -> str:
    return f"{arch}/{mix}"


def plan_dir_server(arch: str, mix: str, load: str) -> str:
    """Stock ``sglang.launch_server`` on the plan directory the launcher wrote; load: "weights" or "dummy"."""
    return f"{arch}/{mix}/launch_server-{load}"


def engine_run(arch: str, mix: str) -> str:
    """``sglang.Engine`` on the plan directory the launcher wrote (a one-shot process, not a server)."""
    return f"{arch}/{mix}/engine"


def stock_server(arch: str, fmt: str) -> str:
    return f"stock/{arch}/{fmt}"


def mixes_of(arch: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """The mixes served for ``arch``, their rules in its family's names (Mixtral's MLP is block_sparse_moe)."""
    if arch in ARCHS:
        return MIXES
    from sglang_mixed_precision.core.architectures import architecture_for
    from sglang_mixed_precision.testing.tinymodels import tiny_config

    family = architecture_for(tiny_config(arch).model_type)
    block = family.moe if family.moe_family else family.mlp
    return {
        mix: (default, [(m.replace(".mlp.", f".{block}."), src) for m, src in rules])
        for mix, (default, rules) in FAMILY_MIXES.items()
    }


def archs_of(names: list[str]) -> tuple[str, ...]:
    """The architectures whose models the servers ``names`` serve (the reload server has its own)."""
    known = (*ARCHS, *FAMILY_ARCHS)
    found = []
    for name in names:
        parts = name.split("/")
        arch = parts[1] if parts[0] == "stock" else parts[0]
        if arch in known and arch not in found:
            found.append(arch)
    return tuple(found)


def mix_cases() -> list[tuple[str, str]]:
    """(arch, mix) of every mix server."""
    return [(a, m) for a in (*ARCHS, *FAMILY_ARCHS) for m in mixes_of(a)]


def all_server_names() -> list[str]:
    names = [mix_server(a, m) for a, m in mix_cases()]
    names += [plan_dir_server(a, ENTRYPOINT_MIX, load) for a in ARCHS for load in ("weights", "dummy")]
    names += [engine_run(a, ENTRYPOINT_MIX) for a in ARCHS]
    names += [stock_server(a, f) for a in ARCHS for f in STOCK_FORMATS]
    return [*names, RELOAD_SERVER]


# ---- preparation: models, conversions, mixes ------------------------------------------------------------
@dataclass(frozen=True)
class ServeWork:
    """Tiny models of every architecture, converted to fp16/ fp8/ int4/, and a YAML per mix."""

    root: Path

    def converted(self, arch: str) -> Path:
        return self.root / arch / "converted"

    def source(self, arch: str, label: str) -> Path:
        """The converter's output directory of one format ("fp16", "fp8", "int4")."""
        return self.converted(arch) / label

    def config(self, arch: str, mix: str) -> Path:
        return self.converted(arch) / f"{mix}.yaml"

    def plan_dir(self, arch: str, mix: str) -> Path:
        return self.root / "plans" / arch / mix


def prepare_serve(root: Path, log=log_to_stdout, archs: tuple[str, ...] = ()) -> ServeWork:
    """Generate (clear greedy margins: see tinymodels.make_tiny_model) and convert each architecture,
    then write every mix; what is already there is reused. ``archs``: only these (default: all)."""
    work = ServeWork(Path(root).resolve())
    for arch in archs or (*ARCHS, *FAMILY_ARCHS):
        model = work.root / arch / "bf16"
        if not (model / "config.json").is_file():
            log(f"{arch}: generating the tiny model")
            make_model(arch, model, clear_margins=True)
        convert_once(model, work.converted(arch), ("fp16", "fp8", "int4"), log)
        for mix, (default, rules) in mixes_of(arch).items():
            write_mix(work.converted(arch), mix, default, rules)
    return work


def make_model(arch: str, out: Path, **kwargs) -> None:
    from sglang_mixed_precision.testing.tinymodels import make_tiny_model

    make_tiny_model(arch, out, **kwargs)


def convert_once(model: Path, out: Path, formats: tuple[str, ...], log=log_to_stdout) -> None:
    """The project's converter (rtn, verified); skipped when every format is there."""
    from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert

    if all((out / f / "config.json").is_file() for f in formats):
        return
    log(f"converting {model} -> {out} ({', '.join(formats)}, rtn)")
    options = ConvertOptions(
        model_path=str(model),
        output_dir=str(out),
        formats=formats,
        method="rtn",
        overwrite=True,
        verify=True,
        progress=False,
    )
    convert(options)


def write_mix(converted: Path, mix: str, default: str, rules: list[tuple[str, str]]) -> Path:
    import yaml

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


@dataclass(frozen=True)
class ReloadWork:
    """A tiny Qwen3 A, a copy B with perturbed MLP weights, their conversions and two damaged copies
    of B's fp8 source (a truncated file, a NaN scale)."""

    root: Path

    @property
    def sources(self) -> dict[str, Path]:
        r = self.root
        return {
            "fp16": r / "conv_a" / "fp16",
            "fp8_a": r / "conv_a" / "fp8",
            "int4": r / "conv_a" / "int4",
            "fp8_b": r / "conv_b" / "fp8",
            "fp8_trunc": r / "fp8_truncated",
            "fp8_nan": r / "fp8_nan",
        }

    def mix_yaml(self, fp8: str, mlp: str = "fp8") -> str:
        """The mix {attention bf16, MLP from `mlp`} with the fp8 source `fp8` (a key of sources)."""
        import yaml

        paths = self.sources
        doc = {
            "mixed_precision": {
                "fp16_path": str(paths["fp16"]),
                "sources": {"fp8": str(paths[fp8]), "int4": str(paths["int4"])},
                "rules": [{"match": "model.layers.*.mlp.*", "source": mlp}],
            }
        }
        return yaml.safe_dump(doc, sort_keys=False)

    def config(self, mix: str) -> Path:
        """The YAML file of mix "A" or "B"."""
        return self.root / f"mix_{mix.lower()}.yaml"

    def reload_bodies(self) -> dict[str, dict]:
        """The POST /mixed_precision/reload bodies, in the order the test sends them."""
        return {
            "fp8_b": {"config": self.mix_yaml("fp8_b")},
            "fp8_trunc": {"config": self.mix_yaml("fp8_trunc")},
            "fp8_nan": {"config": self.mix_yaml("fp8_nan")},
            "scheme_change": {"config": self.mix_yaml("fp8_b", mlp="int4")},
        }

    @property
    def plan_dir(self) -> Path:
        return self.root / "plan"


def prepare_reload(root: Path, log=log_to_stdout) -> ReloadWork:
    work = ReloadWork(Path(root).resolve())
    model_a, model_b = work.root / "model_a", work.root / "model_b"
    if not (model_a / "config.json").is_file():
        log("reload: generating tiny Qwen3 A")
        make_model("qwen3", model_a, num_layers=2)
    if not (model_b / "config.json").is_file():
        log("reload: model B, A with perturbed MLP weights")
        perturbed_copy(model_a, model_b)
    convert_once(model_a, work.root / "conv_a", ("fp16", "fp8", "int4"), log)
    convert_once(model_b, work.root / "conv_b", ("fp8",), log)
    sources = work.sources
    damaged_copy(sources["fp8_b"], sources["fp8_trunc"], "truncate")
    damaged_copy(sources["fp8_b"], sources["fp8_nan"], "nan")
    work.config("A").write_text(work.mix_yaml("fp8_a"))
    work.config("B").write_text(work.mix_yaml("fp8_b"))
    return work


def perturbed_copy(src: Path, dst: Path) -> None:
    """`src` with noise of one standard deviation added to every MLP weight (written to a temporary
    directory first: an interrupted run leaves no half-made model behind)."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    gen = torch.Generator().manual_seed(1)
    for f in sorted(tmp.glob("*.safetensors")):
        state = load_file(str(f))
        for name, t in state.items():
            if ".mlp." in name and name.endswith(".weight"):
                state[name] = (t.float() + t.float().std() * torch.randn(t.shape, generator=gen)).to(t.dtype)
        save_file(state, str(f), metadata={"format": "pt"})
    tmp.rename(dst)


def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of an fp8 source whose first weight file is truncated ("truncate"), or which holds a
    NaN in an MLP weight_scale_inv ("nan"); kept when already made."""
    from safetensors.torch import load_file, save_file

    if (dst / "config.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    files = sorted(tmp.glob("*.safetensors"))
    if how == "truncate":
        files[0].write_bytes(files[0].read_bytes()[:-4096])
    else:
        for f in files:
            state = load_file(str(f))
            name = next((n for n in state if ".mlp." in n and n.endswith("weight_scale_inv")), None)
            if name:
                state[name] = state[name].clone()
                state[name].view(-1)[0] = float("nan")
                save_file(state, str(f), metadata={"format": "pt"})
                break
        else:
            raise RuntimeError(f"no MLP weight_scale_inv in {src}")
    tmp.rename(dst)
    return dst


# ---- servers' commands ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSpec:
    """One process of the run and what must be ready before it starts (the server that writes the
    plan directory it serves). program "launcher" (launch_mixed_precision_server.py) and "sglang"
    (python -m sglang.launch_server) are servers, args their flags (the fleet adds the address);
    "engine" is a one-shot ``sglang.Engine`` run, args (plan directory, prompts as JSON)."""

    name: str
    args: tuple[str, ...]
    program: str = "launcher"
    after: str | None = None

    def command(self, port: int, nccl_port: int) -> list[str]:
        if self.program == "engine":
            plan_dir, prompts = self.args
            request, settings = json.dumps(greedy_request()), json.dumps(engine_settings(nccl_port))
            return [sys.executable, "-c", ENGINE_SCRIPT, plan_dir, prompts, request, settings]
        program = [str(LAUNCHER)] if self.program == "launcher" else ["-m", "sglang.launch_server"]
        return [sys.executable, *program, *self.args, *address_flags(port, nccl_port)]

    def sglang_command(self, port: int, nccl_port: int, out) -> list[str]:
        """The command SGLang's server starts with; through the launcher this validates the plan and
        writes the plan directory, as the launcher does before it starts SGLang."""
        from sglang_mixed_precision.serving import launcher

        command = self.command(port, nccl_port)
        return launcher.sglang_command(command[2:], out=out) if self.program == "launcher" else command


def address_flags(port: int, nccl_port: int) -> list[str]:
    """Every server its own --nccl-port: SGLang's own pick (bind port 0, close) raced between servers
    starting side by side (EADDRINUSE at torch.distributed init)."""
    return ["--host", "127.0.0.1", "--port", str(port), "--nccl-port", str(nccl_port)]


def available_specs(serve: ServeWork | None, reload: ReloadWork | None) -> dict[str, ServerSpec]:
    specs = {}
    common = (*flags(SERVER_SETTINGS), *LOG_FLAGS)
    if serve is not None:
        for arch, mix in mix_cases():
            specs[mix_server(arch, mix)] = ServerSpec(
                mix_server(arch, mix),
                (
                    "--enable-mixed-precision",
                    "--mixed-precision-config",
                    str(serve.config(arch, mix)),
                    "--model-path",
                    str(serve.source(arch, "fp16")),
                    "--plan-dir",
                    str(serve.plan_dir(arch, mix)),
                    *(("--int4-moe-kernel", INT4_MOE_KERNEL[mix]) if mix in INT4_MOE_KERNEL else ()),
                    *common,
                ),
            )
        for arch in ARCHS:
            for load in ("weights", "dummy"):
                name = plan_dir_server(arch, ENTRYPOINT_MIX, load)
                extra = ("--load-format", "dummy") if load == "dummy" else ()
                specs[name] = ServerSpec(
                    name,
                    ("--model-path", str(serve.plan_dir(arch, ENTRYPOINT_MIX)), *common, *extra),
                    program="sglang",
                    after=mix_server(arch, ENTRYPOINT_MIX),
                )
            prompts = json.dumps(prompt_ids(serve.source(arch, "fp16")))
            specs[engine_run(arch, ENTRYPOINT_MIX)] = ServerSpec(
                engine_run(arch, ENTRYPOINT_MIX),
                (str(serve.plan_dir(arch, ENTRYPOINT_MIX)), prompts),
                program="engine",
                after=mix_server(arch, ENTRYPOINT_MIX),
            )
            for fmt in STOCK_FORMATS:
                extra = STOCK_MOE_INT4_FLAGS if arch == "qwen3_moe" and fmt == "int4" else ()
                specs[stock_server(arch, fmt)] = ServerSpec(
                    stock_server(arch, fmt),
                    ("--model-path", str(serve.source(arch, fmt)), *common, *extra),
                    program="sglang",
                )
    if reload is not None:
        specs[RELOAD_SERVER] = ServerSpec(
            RELOAD_SERVER,
            (
                "--enable-mixed-precision",
                "--mixed-precision-config",
                str(reload.config("A")),
                "--model-path",
                str(reload.sources["fp16"]),
                "--plan-dir",
                str(reload.plan_dir),
                *flags(RELOAD_SETTINGS),
                *LOG_FLAGS,
            ),
        )
    return specs


def server_specs(names: list[str], serve: ServeWork | None, reload: ReloadWork | None) -> list[ServerSpec]:
    """The specs of `names`, servers that others wait for first."""
    specs = available_specs(serve, reload)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise KeyError(f"unknown server(s) {unknown}; known: {sorted(specs)}")
    return sorted((specs[n] for n in names), key=lambda s: s.after is not None)


# ---- the fleet ------------------------------------------------------------------------------------------
class ServerFailed(RuntimeError):
    pass


@dataclass
class Server:
    """A started process of the fleet; ready_s: seconds until it answered (an Engine run: until it
    finished, its greedy output ids in result)."""

    spec: ServerSpec
    log_path: Path
    port: int | None = None
    command: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    ready_s: float | None = None
    error: str | None = None
    result: list | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


class Ports:
    """Free ports, none handed out twice in this process (a port is free until its server binds it)."""

    def __init__(self):
        self._given: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            port = client.free_port()
            while port in self._given:
                port = client.free_port()
            self._given.add(port)
            return port


class Fleet:
    """SGLang servers started side by side: at most `parallel` starting at once (a start is mostly
    CPU work), `stagger_s` apart (each sizes its KV cache from the memory free when it measures).
    ``server(name)`` waits until that one is ready, so tests query the first servers while the
    others still start. Leaving the context stops every server; each log stays in `log_dir`."""

    def __init__(
        self,
        specs: list[ServerSpec],
        log_dir: Path,
        *,
        ports: Ports,
        parallel: int = 6,
        stagger_s: float = 3.0,
        timeout: float = 600.0,
        env: dict[str, str] | None = None,
        log=log_to_stdout,
    ):
        self.log_dir, self.ports, self.timeout, self.env, self.log = Path(log_dir), ports, timeout, env, log
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.servers = {s.name: Server(s, self.log_dir / (s.name.replace("/", "__") + ".log")) for s in specs}
        self.parallel, self.stagger_s = max(1, parallel), stagger_s
        self._futures: dict = {}
        self._lock, self._stagger = threading.Lock(), threading.Lock()
        self._next_start, self._closing = 0.0, False

    def __enter__(self) -> Fleet:
        self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="sglang-start")
        for name, server in self.servers.items():  # one by one: a dependent looks its dependency up here
            self._futures[name] = self._pool.submit(self._bring_up, server)
        atexit.register(self.stop)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        atexit.unregister(self.stop)

    def server(self, name: str) -> Server:
        """The ready server `name`; ServerFailed (with its log's tail) if it did not start."""
        if name not in self._futures:
            raise KeyError(f"server {name!r} is not part of this run (no selected test asks for it)")
        try:
            self._futures[name].result()
        except Exception:
            server = self.servers[name]
            where = f"\nlog: {server.log_path}" if server.proc is not None else ""
            raise ServerFailed(f"server {name} did not start: {server.error}{where}") from None
        return self.servers[name]

    def stop(self) -> None:
        with self._lock:
            self._closing = True
        procs = [s.proc for s in self.servers.values() if s.proc is not None]
        if procs:
            with ThreadPoolExecutor(max_workers=len(procs)) as pool:
                list(pool.map(client.stop_server, procs))
        if self._futures:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def summary(self) -> list[dict]:
        return [
            {
                "server": s.spec.name,
                "ready_s": s.ready_s,
                "log": str(s.log_path.relative_to(self.log_dir.parent)),
                "command": shlex.join(s.command) if s.command else None,
                "error": s.error,
            }
            for s in self.servers.values()
        ]

    def _bring_up(self, server: Server) -> None:
        name = server.spec.name
        try:
            if server.spec.after:
                self.server(server.spec.after)
            self._start(server)
            if server.spec.program == "engine":
                seconds = self._finish_engine(server)
            else:
                seconds = client.wait_until_ready(
                    server.url,
                    server.proc,
                    self.timeout,
                    server.log_path,
                    progress=lambda m: self.log(f"{name}: {m.strip()}"),
                    every=60,
                )
            server.ready_s = round(seconds, 1)
            self.log(f"{name}: {'finished' if server.result is not None else 'ready'} after {server.ready_s}s")
        except Exception as e:
            server.error = f"{type(e).__name__}: {e}"
            self.log(f"{name}: FAILED {server.error.splitlines()[0]} (log: {server.log_path})")
            if server.proc is not None:
                client.stop_server(server.proc)  # its GPU memory back for the others
            raise

    def _finish_engine(self, server: Server) -> float:
        """Wait for an Engine run; its output ids from the ENGINE_OUTPUT line it printed."""
        started = time.monotonic()
        try:
            code = server.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"sglang.Engine did not finish in {self.timeout:.0f}s") from None
        lines = [line for line in server.log_text().splitlines() if line.startswith(ENGINE_OUTPUT)]
        if code or not lines:
            raise RuntimeError(f"sglang.Engine exited with code {code}:\n{client.log_tail(server.log_path)}")
        server.result = json.loads(lines[-1][len(ENGINE_OUTPUT) :])
        return time.monotonic() - started

    def _start(self, server: Server) -> None:
        with self._stagger:
            time.sleep(max(0.0, self._next_start - time.monotonic()))
            self._next_start = time.monotonic() + self.stagger_s
        with self._lock:
            if self._closing:
                raise ServerFailed("the run ended before this server started")
            server.port = self.ports.take()
            server.command = server.spec.command(server.port, self.ports.take())
            self.log(f"{server.spec.name}: starting {shlex.join(server.command[1:])}")
            server.proc = client.start_server(server.command, server.log_path, env=self.env)


# ---- requests ------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """One greedy /generate reply: the prompt, the output tokens and SGLang's log-probs."""

    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    input_logprobs: list[tuple[float | None, int]]
    text: str


def greedy_request(max_new_tokens: int = MAX_NEW_TOKENS, prompt_logprobs: bool = True) -> dict:
    """The fields of a greedy request with log-probs, for /generate and Engine.generate alike."""
    request = {
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
        "return_logprob": True,
    }
    if prompt_logprobs:
        request.update(logprob_start_len=0, top_logprobs_num=1)
    return request


def generation(prompt_ids: list[int], reply: dict) -> Generation:
    meta = reply["meta_info"]
    output = [(float(lp), int(t)) for lp, t, *_ in meta["output_token_logprobs"]]
    prompt = [(None if lp is None else float(lp), int(t)) for lp, t, *_ in meta.get("input_token_logprobs") or []]
    return Generation(list(prompt_ids), [t for _, t in output], [lp for lp, _ in output], prompt, reply.get("text", ""))


def generate_each(url: str, prompts: list[list[int]], timeout: float = 300.0) -> list[Generation]:
    """One greedy request per prompt, prompt log-probs included."""
    return [
        generation(ids, client.post_json(f"{url}/generate", {"input_ids": ids, **greedy_request()}, timeout=timeout))
        for ids in prompts
    ]


def generate_batch(url: str, prompts: list[list[int]], timeout: float = 300.0) -> list[Generation]:
    """Every prompt in one request (output log-probs only)."""
    replies = client.post_json(
        f"{url}/generate", {"input_ids": prompts, **greedy_request(prompt_logprobs=False)}, timeout=timeout
    )
    return [generation(ids, r) for ids, r in zip(prompts, replies)]


def prompt_ids(model_dir: Path, prompts: list[str] = PROMPTS) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [tok(p)["input_ids"] for p in prompts]


# ---- sglang.Engine on a plan directory -------------------------------------------------------------------
ENGINE_OUTPUT = "ENGINE_OUTPUT "
ENGINE_SCRIPT = r"""
import json, sys
import sglang as sgl
plan_dir, prompts, request, settings = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
engine = sgl.Engine(model_path=plan_dir, **settings)
try:
    replies = [engine.generate(input_ids=ids, **request) for ids in prompts]
    ids = [[int(t) for _, t, *_ in r["meta_info"]["output_token_logprobs"]] for r in replies]
    print("ENGINE_OUTPUT " + json.dumps(ids), flush=True)
finally:
    engine.shutdown()
"""


def engine_settings(nccl_port: int) -> dict:
    """sglang.Engine's keywords: the servers' settings and a port of its own."""
    return {**SERVER_SETTINGS, "nccl_port": nccl_port}


# ---- the reference -------------------------------------------------------------------------------------
class MixReference:
    """One mix's transformers reference in fp32 and bf16 (fp8 activations quantized as SGLang's W8A8
    kernels do): greedy tokens, and how far a bf16 implementation's log-probs may be from it."""

    def __init__(self, config: Path, device: str):
        from sglang_mixed_precision.reference import plan_from_config, reference_pair

        self.plan = plan_from_config(config)
        self.pair = reference_pair(self.plan, device)

    def greedy(self, prompt: list[int], max_new: int) -> tuple[list[int], list[int]]:
        """(fp32 reference's tokens, bf16 reference's tokens)."""
        from sglang_mixed_precision.reference import greedy

        return greedy(self.pair.fp32, prompt, max_new)[0], greedy(self.pair.bf16, prompt, max_new)[0]

    def greedy_generations(self, prompts: list[list[int]], max_new: int) -> list[Generation]:
        """The fp32 reference's own greedy tokens and log-probs, shaped like SGLang's replies."""
        from sglang_mixed_precision.reference import greedy

        out = []
        for ids in prompts:
            tokens, logits = greedy(self.pair.fp32, ids, max_new)
            lps = logits.log_softmax(-1)
            out.append(Generation(ids, tokens, [float(lps[j, t]) for j, t in enumerate(tokens)], [], ""))
        return out

    def deviation(self, generations: list[Generation]) -> dict:
        """Max |log-prob| distance of the generations' tokens (prompt tokens too where the reply has
        their log-probs) from this mix's fp32 reference, and the tolerance (reference.logprob_tolerance)."""
        from sglang_mixed_precision.reference import logprob_deviation, logprob_tolerance

        dev, noise = logprob_deviation(self.pair, map(scored_sequence, generations))
        return {
            "max_abs_dlogprob": round(dev, 5),
            "bf16_noise": round(noise, 5),
            "tolerance": round(logprob_tolerance(noise), 5),
        }

    def compare(self, generations: list[Generation]) -> dict:
        """Log-prob deviation and whether the greedy tokens are the reference's, in fp32 and in bf16."""
        matched = total = 0
        same32 = same16 = True
        for g in generations:
            ref32, ref16 = self.greedy(g.prompt_ids, len(g.output_ids))
            same32 &= ref32 == g.output_ids
            same16 &= ref16 == g.output_ids
            matched += sum(a == b for a, b in zip(ref32, g.output_ids))
            total += len(g.output_ids)
        return {
            **self.deviation(generations),
            "tokens_equal_fp32_ref": same32,
            "tokens_equal_bf16_ref": same16,
            "token_match_rate": round(matched / max(total, 1), 4),
        }

    def release(self) -> None:
        import torch

        del self.pair
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def scored_sequence(g: Generation):
    """Prompt and generated tokens with SGLang's log-prob of every token after the first at the
    position that predicts it (reference.logprob_deviation's input)."""
    from sglang_mixed_precision.reference import scored_continuation

    ids, scored, prompt_len = scored_continuation(g.prompt_ids, g.output_ids, g.output_logprobs)
    prompt = [(i - 1, t, lp) for i, (lp, t) in enumerate(g.input_logprobs) if lp is not None and i > 0]
    return ids, prompt + scored, prompt_len


def plan_rank_bytes(config: Path) -> int:
    """The plan's weight bytes on one rank (tp 1): what the server's parameters must hold."""
    from sglang_mixed_precision.core.config import load_config
    from sglang_mixed_precision.core.plan import build_plan
    from sglang_mixed_precision.core.report import summary

    return summary(build_plan(load_config(config)))["per_rank"][0]["bytes"]


def check_against_reference(config_path, outputs, record: dict) -> None:
    """The served greedy tokens and log-probs against the transformers reference of the mix at
    ``config_path`` (on the GPU): tokens equal to the fp32 or bf16 reference, log-probs within tolerance."""
    reference = MixReference(config_path, device="cuda")
    try:
        result = reference.compare(outputs)
    finally:
        reference.release()
    record.update(result)
    assert result["tokens_equal_fp32_ref"] or result["tokens_equal_bf16_ref"], (
        f"greedy tokens differ from the reference (match rate {result['token_match_rate']})"
    )
    assert result["max_abs_dlogprob"] <= result["tolerance"]


def fleet_from_options(specs, request, recorder, ports, log) -> Fleet:
    """A Fleet of ``specs`` with the session's options (--gpu-parallel, --gpu-start-timeout), logs
    under the results directory and the servers' environment."""
    return Fleet(
        specs,
        recorder.directory / "logs",
        ports=ports,
        parallel=request.config.getoption("gpu_parallel"),
        timeout=request.config.getoption("gpu_start_timeout"),
        env=SERVER_ENV,
        log=log,
    )
