"""Every hook the plugin places on SGLang: its target, its kind, and the function.

* ``get_model_loader`` (AROUND): a model whose quantization is ``mixed_precision`` loads through
  :class:`.loader.MixedPrecisionModelLoader`; ``--load-format dummy`` keeps SGLang's dummy loader
  (the model is still built with the mix's methods and kernels, only the weights are random);
* ``update_weights_from_disk`` (AROUND): a request directory holding the reload marker
  (:mod:`.messages`) runs :func:`.reload_worker.execute_reload` instead of SGLang's whole-model
  reload; every other request goes to SGLang unchanged;
* ``Scheduler.get_internal_state`` (AFTER): adds this rank's mixed-precision info (:mod:`.info`).

SGLang runs the plugin's ``register()`` in every process and applies the registered hooks afterwards.
"""

from __future__ import annotations

import logging

from ..core.errors import ErrorCode, MixedPrecisionError, error_json
from . import QUANT_METHOD
from .messages import INFO_KEY, encode_reply, read_worker_request

logger = logging.getLogger(__name__)

LOADER_TARGET = "sglang.srt.model_loader.loader.get_model_loader"
WORKER_TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.update_weights_from_disk"
INTERNAL_STATE_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"
# Formats that name *how* to read local weights; the mixed loader reads the plan's sources itself.
MIXED_LOAD_FORMATS = ("auto", "safetensors", "pt")


def select_model_loader(original, load_config, model_config=None, *args, **kwargs):
    """AROUND hook of ``get_model_loader``: the mixed loader for mixed models, SGLang's otherwise."""
    if model_config is None or getattr(model_config, "quantization", None) != QUANT_METHOD:
        return original(load_config, model_config, *args, **kwargs)
    load_format = getattr(load_config.load_format, "value", load_config.load_format)
    if load_format == "dummy":
        return original(load_config, model_config, *args, **kwargs)
    if load_format not in MIXED_LOAD_FORMATS:
        raise MixedPrecisionError(
            ErrorCode.LOAD_FORMAT_UNSUPPORTED,
            f"--load-format {load_format} cannot load a mixed-precision plan",
            fix=f"use --load-format auto (or dummy to skip reading weights); "
            f"the mixed loader reads each source itself ({', '.join(MIXED_LOAD_FORMATS)})",
        )
    from .loader import MixedPrecisionModelLoader

    logger.info("mixed_precision: loading through MixedPrecisionModelLoader")
    return MixedPrecisionModelLoader(load_config)


def around_update_weights_from_disk(original, worker, recv_req, *args, **kwargs):
    """AROUND hook of ``TpModelWorker.update_weights_from_disk``: mixed reload requests run
    :func:`.reload_worker.execute_reload`; every other request goes to SGLang unchanged."""
    try:
        request = read_worker_request(recv_req.model_path)
    except (OSError, ValueError) as e:
        return False, encode_reply(
            {"success": False, "stage": "stage", "applied": False, "failures": [{"rank": 0, "error": error_json(e)}]}
        )
    if request is None:
        return original(worker, recv_req, *args, **kwargs)
    from .loader import mixed_config_of
    from .reload_worker import execute_reload, tp_agree

    model = worker.model_runner.model
    reply = execute_reload(model, mixed_config_of(model), request, agree=tp_agree)
    return reply["success"], encode_reply(reply)


def after_get_internal_state(result, scheduler, *args, **kwargs):
    """AFTER hook of ``Scheduler.get_internal_state``: adds this rank's mixed-precision info."""
    from .info import worker_info

    try:
        result.internal_state[INFO_KEY] = worker_info(scheduler)
    except MixedPrecisionError as e:  # not a mixed model: say so rather than nothing
        result.internal_state[INFO_KEY] = {"error": error_json(e)}
    return result


def register_hook_once(target: str, hook, kind) -> None:
    """Register ``hook`` on ``target`` unless it already is (``register()`` may run twice in one process)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, [])):
        HookRegistry.register(target, hook, kind)


def register_loader_hook() -> None:
    from sglang.srt.plugins.hook_registry import HookType

    register_hook_once(LOADER_TARGET, select_model_loader, HookType.AROUND)


def register_worker_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookType

    register_hook_once(WORKER_TARGET, around_update_weights_from_disk, HookType.AROUND)
    register_hook_once(INTERNAL_STATE_TARGET, after_get_internal_state, HookType.AFTER)
