"""Real SGLang models on CPU for the serving tests (one gloo process group per test process).

SGLang (0.5.17 to 0.5.23) builds and loads whole Qwen3 / Qwen3-MoE models on CPU once its distributed
groups, runtime context and DP-attention state exist; they are set up through
:mod:`sglang_mixed_precision.serving.compat`, which knows how each release wants it. Two CUDA-only details are pinned: the rotary
embedding takes its CPU path, and GPTQ-Marlin's constructor is told an SM90 GPU (it only asks the
capability to check kernel support). Marlin's weight repack needs CUDA, so loads with int4 layers
stop before ``process_weights_after_loading``.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import pytest

from sglang_mixed_precision.serving.client import free_port

sglang = pytest.importorskip("sglang")

MIXES = {
    # name: (default source, rules) -- sources fp16/fp8/int4 from the converter
    "attn_bf16_mlp_fp8": ("fp16", [("model.layers.*.mlp.*", "fp8")]),
    "attn_fp8_mlp_int4": ("fp16", [("model.layers.*.mlp.*", "int4"), ("model.layers.*.self_attn.*", "fp8")]),
    "attn_fp8_mlp_bf16": ("fp16", [("model.layers.*.self_attn.*", "fp8")]),
    "per_layer": (
        "fp16",
        [("model.layers.0.mlp.*", "int4"), ("model.layers.1.mlp.*", "fp8"), ("model.layers.1.self_attn.*", "int4")],
    ),
}


def init_sglang_group(server_args, rank: int, port: int) -> None:
    """Plugin registered, hooks applied, a gloo group of ``server_args.tp_size`` ranks, CPU-only details pinned."""
    import sglang.srt.layers.quantization.marlin_utils as marlin_utils
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.distributed import init_distributed_environment
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_mixed_precision.serving import compat
    from sglang_mixed_precision.serving.plugin import register

    register()
    HookRegistry.apply_hooks()
    world = server_args.tp_size
    init_distributed_environment(
        world_size=world, rank=rank, local_rank=rank, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo"
    )
    compat.init_model_parallel(server_args, rank)
    rope_base._is_cpu = True
    marlin_utils.get_device_capability = lambda *a, **k: (9, 0)


@functools.cache
def topology_model_dir() -> str:
    """A directory holding only a tiny Qwen3 config.json: the server args that size the groups need a model."""
    from sglang_mixed_precision.testing.tinymodels import tiny_config

    config = tiny_config("qwen3")
    config.architectures = ["Qwen3ForCausalLM"]
    path = tempfile.mkdtemp(prefix="sglang-mp-topology-")
    config.save_pretrained(path)
    return path


@functools.cache
def init_sglang_cpu() -> None:
    """The TP=1 group of this test process."""
    from sglang.srt.server_args import ServerArgs

    init_sglang_group(ServerArgs(model_path=topology_model_dir(), device="cpu"), 0, free_port())


def converted(model_dir: str, max_shard_size: str = "2GB") -> Path:
    """fp16/ fp8/ int4/ of a tiny model (RTN int4), once per test process: the mixes are written next
    to them, and the converter refuses an output holding files it did not write."""
    return _converted(str(model_dir), max_shard_size)


@functools.cache
def _converted(model_dir: str, max_shard_size: str) -> Path:
    from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert

    out = Path(model_dir).parent / f"converted-{max_shard_size}"
    convert(
        ConvertOptions(
            model_path=model_dir,
            output_dir=str(out),
            method="rtn",
            max_shard_size=max_shard_size,
            check=False,
            progress=False,
        )
    )
    return out


def write_mix(root: Path, name: str, default: str, rules: list[tuple[str, str]]) -> Path:
    import yaml

    doc = {
        "mixed_precision": {
            "sources": {"fp16": "./fp16", "fp8": "./fp8", "int4": "./int4"},
            "default": default,
            "rules": [{"match": m, "source": s} for m, s in rules],
        }
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def mix_config(model_dir: str, mix: str, max_shard_size: str = "2GB") -> Path:
    default, rules = MIXES[mix]
    return write_mix(converted(model_dir, max_shard_size), mix, default, rules)


def model_config(path: str | Path, dtype: str = "bfloat16"):
    """SGLang's ModelConfig for ``path`` in this process's TP=1 group."""
    from sglang.srt.server_args import ServerArgs

    init_sglang_cpu()
    return published_model_config(ServerArgs(model_path=str(path), device="cpu", dtype=dtype), dtype)


def published_model_config(server_args, dtype: str = "bfloat16", rank: int = 0):
    """SGLang's ModelConfig for ``server_args.model_path``, with the server args and DP state it needs published."""
    from sglang.srt.configs.model_config import ModelConfig

    from sglang_mixed_precision.serving import compat

    compat.publish_server_args(server_args, rank)
    config = ModelConfig(model_path=server_args.model_path, dtype=dtype)
    compat.init_dp_attention(server_args, config)
    return config


@contextlib.contextmanager
def without_postprocess():
    """Marlin repacks on CUDA only: stop int4 loads after load_weights and the audit."""
    import sglang_mixed_precision.serving.loader as loader_module

    original = loader_module.process_weights_after_loading
    loader_module.process_weights_after_loading = lambda model, device: None
    try:
        yield
    finally:
        loader_module.process_weights_after_loading = original


def load_on_cpu(path: str | Path, *, load_format: str = "auto", postprocess: bool = True):
    """(model, loader) of ``path`` in this process's TP=1 group."""
    return load_model(model_config(path), load_format=load_format, postprocess=postprocess)


def load_model(config, *, load_format: str = "auto", postprocess: bool = True):
    """(model, loader) through SGLang's get_model_loader, as a scheduler does."""
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader import loader as loader_module

    # Looked up now, after apply_hooks(): the plugin's hook replaced the module attribute.
    loader = loader_module.get_model_loader(load_config=LoadConfig(load_format=load_format), model_config=config)
    with contextlib.nullcontext() if postprocess else without_postprocess(), keep_default_dtype():
        model = loader.load_model(model_config=config, device_config=DeviceConfig("cpu", 0))
    return model, loader


@contextlib.contextmanager
def keep_default_dtype():
    """SGLang's set_default_torch_dtype does not restore the dtype when loading raises (the audit
    tests make it raise): without this, later tests in the session would create bf16 tensors."""
    import torch

    dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def methods_by_prefix(model) -> dict[str, str]:
    return {
        name: type(m.quant_method).__name__
        for name, m in model.named_modules()
        if getattr(m, "quant_method", None) is not None
    }


def read_source_tensor(plan, name: str):
    """The tensor ``name`` straight from the file of the source the plan assigns it to."""
    from safetensors import safe_open

    from sglang_mixed_precision.core.naming import split_tensor_name

    assignment = plan.modules[split_tensor_name(name)[0]]
    info = assignment.tensors[split_tensor_name(name)[1]]
    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(name)


def tp_worker(rank: int, world: int, port: int, plan_dir: str, queue) -> None:
    """One TP rank on CPU (spawned): load the plan directory, report its audit and its shards."""
    import sglang.srt.distributed.parallel_state as parallel_state
    import torch
    from sglang.srt.server_args import ServerArgs

    from sglang_mixed_precision.serving import compat
    from sglang_mixed_precision.serving.plugin import register

    try:
        # CPU groups: no NCCL / custom all-reduce communicators.
        parallel_state.init_model_parallel_group = functools.partial(
            parallel_state.init_model_parallel_group, **compat.cpu_group_options()
        )
        register()  # before ServerArgs: some releases read the plan directory's config.json already there
        server_args = ServerArgs(model_path=plan_dir, device="cpu", tp_size=world)
        init_sglang_group(server_args, rank, port)
        config = published_model_config(server_args, rank=rank)
        model, loader = load_model(config, postprocess=False)
        # Through a file: tensors sent over the queue would outlive this process's shared memory.
        shards = Path(plan_dir).parent / f"rank{rank}.pt"
        torch.save({k: v.detach().clone() for k, v in model.named_parameters() if ".layers.1." in k}, shards)
        queue.put((rank, loader.report.ok, loader.report.summary(), str(shards)))
    except BaseException as e:  # the parent must hear about it rather than time out
        queue.put((rank, False, f"{type(e).__name__}: {e}", None))


def run_ranks(worker, plan_dir, world: int = 2, timeout: float = 240) -> list[tuple]:
    """Spawn ``world`` TP ranks running ``worker(rank, world, port, plan_dir, queue)`` and return
    their reports sorted by rank; a rank that hangs is killed after ``timeout``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, str(plan_dir), queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return sorted((queue.get(timeout=timeout) for _ in procs), key=lambda r: r[0])
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
