"""Every hook the plugin places on SGLang, and every SGLang name it relies on later.

* ``get_model_loader`` (AROUND): a model whose quantization is ``mixed_precision`` loads through
  :class:`.loader.MixedPrecisionModelLoader`; ``--load-format dummy`` keeps SGLang's dummy loader
  (the model is still built with the mix's methods and kernels, only the weights are random);
* ``get_model_architecture`` (AROUND, under each name SGLang imports it by): a mixed model is built by
  its family's own class (``core.architectures``): SGLang 0.5.17 sends a Mixtral whose quantization
  is not in its short list to ``QuantMixtralForCausalLM`` (per-expert linears, no FusedMoE);
* ``WeightUpdater.update_weights_from_disk`` (AROUND): a request directory holding the reload marker
  (:mod:`.messages`) runs :func:`.reload_worker.execute_reload` instead of SGLang's whole-model
  reload; every other request goes to SGLang unchanged. Every supported release calls it for a disk
  update (through ``TpModelWorker`` up to 0.5.20, from the scheduler directly since 0.5.21);
* ``Scheduler.get_internal_state`` (AFTER): adds this rank's mixed-precision info (:mod:`.info`).

SGLang runs the plugin's ``register()`` in every process and applies the registered hooks afterwards;
its registry only logs a target it cannot find. :func:`register_hooks` therefore resolves every target
first, with the parameters each hook relies on, and every name in :data:`USED_LATER` (called only
when a reload or an /info request arrives): a missing one is a ``sglang_incompatible`` error at
start-up naming it, the installed SGLang and the supported range (:mod:`.compat`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..core.errors import ErrorCode, MixedPrecisionError, error_json
from . import QUANT_METHOD
from .messages import INFO_KEY, encode_reply, read_worker_request

logger = logging.getLogger(__name__)

LOADER_TARGET = "sglang.srt.model_loader.loader.get_model_loader"
WORKER_TARGET = (
    "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater.update_weights_from_disk"
)
# get_model_architecture as the loader and the rest of SGLang import it
ARCHITECTURE_TARGETS = (
    "sglang.srt.model_loader.loader.get_model_architecture",
    "sglang.srt.model_loader.utils.get_model_architecture",
    "sglang.srt.model_loader.get_model_architecture",
)
INTERNAL_STATE_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"
# Formats that name *how* to read local weights; the mixed loader reads the plan's sources itself.
MIXED_LOAD_FORMATS = ("auto", "safetensors", "pt")

# Names the plugin uses after start-up (a reload, /info, the quantization tables it extends).
USED_LATER = (
    "sglang.srt.layers.quantization.QUANTIZATION_METHODS",
    "sglang.srt.layers.quantization.BASE_QUANTIZATION_METHODS",
    "sglang.srt.server_args.QUANTIZATION_CHOICES",
    "sglang.srt.server_args.add_quantization_method_choices",
    "sglang.srt.managers.io_struct.UpdateWeightFromDiskReqInput",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_weights_from_disk",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.get_internal_state",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.config_value",
    "sglang.srt.distributed.parallel_state.get_tp_group",
    "sglang.srt.distributed.parallel_state.model_parallel_is_initialized",
    "sglang.srt.distributed.parallel_state.get_tensor_model_parallel_world_size",
    "sglang.srt.model_loader.loader.DefaultModelLoader",
    "sglang.srt.model_loader.loader.device_loading_context",
    "sglang.srt.models.registry.ModelRegistry.resolve_model_cls",
)


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


def select_family_class(original, model_config, *args, **kwargs):
    """AROUND hook of ``get_model_architecture``: a mixed model gets its family's class (the one
    ``core.architectures`` describes), not one SGLang picks for other quantizations."""
    model_class, resolved = original(model_config, *args, **kwargs)
    if getattr(model_config, "quantization", None) != QUANT_METHOD:
        return model_class, resolved
    from ..core.architectures import architecture_for

    family = architecture_for(getattr(model_config.hf_config, "model_type", "") or "")
    wanted = family.sglang_class if family is not None else ""
    if not wanted or resolved == wanted or wanted not in (getattr(model_config.hf_config, "architectures", None) or []):
        return model_class, resolved
    from sglang.srt.models.registry import ModelRegistry

    model_class, resolved = ModelRegistry.resolve_model_cls([wanted])
    model_config._resolved_model_arch = resolved
    logger.info("mixed_precision: building %s (SGLang chose another class for this quantization)", resolved)
    return model_class, resolved


def around_update_weights_from_disk(original, updater, model_path, *args, **kwargs):
    """AROUND hook of ``WeightUpdater.update_weights_from_disk``: mixed reload requests run
    :func:`.reload_worker.execute_reload`; every other request goes to SGLang unchanged."""
    try:
        request = read_worker_request(model_path)
    except (OSError, ValueError) as e:
        return False, _refusal(e)
    if request is None:
        return original(updater, model_path, *args, **kwargs)
    from .loader import mixed_config_of
    from .reload_worker import execute_reload, tp_agree

    model = updater.get_model()
    try:
        config = mixed_config_of(model)
    except MixedPrecisionError as e:  # a runner whose model is not the mix (a speculative draft model)
        return False, _refusal(e)
    reply = execute_reload(model, config, request, agree=tp_agree)
    return reply["success"], encode_reply(reply)


def _refusal(error: Exception) -> str:
    return encode_reply(
        {"success": False, "stage": "stage", "applied": False, "failures": [{"rank": 0, "error": error_json(error)}]}
    )


def after_get_internal_state(result, scheduler, *args, **kwargs):
    """AFTER hook of ``Scheduler.get_internal_state``: adds this rank's mixed-precision info."""
    from .info import worker_info

    try:
        result.internal_state[INFO_KEY] = worker_info(scheduler)
    except MixedPrecisionError as e:  # not a mixed model: say so rather than nothing
        result.internal_state[INFO_KEY] = {"error": error_json(e)}
    return result


@dataclass(frozen=True)
class Hook:
    target: str
    function: object
    kind: str  # a HookType member name
    leading: tuple[str, ...]  # the target's first parameters, which the hook passes on or reads


HOOKS = (
    Hook(LOADER_TARGET, select_model_loader, "AROUND", ("load_config", "model_config")),
    *(Hook(target, select_family_class, "AROUND", ("model_config",)) for target in ARCHITECTURE_TARGETS),
    Hook(WORKER_TARGET, around_update_weights_from_disk, "AROUND", ("self", "model_path", "load_format")),
    Hook(INTERNAL_STATE_TARGET, after_get_internal_state, "AFTER", ("self", "recv_req")),
)


def resolve_targets() -> dict[str, object]:
    """{target: the SGLang object} of every hook and every name in :data:`USED_LATER`; raises
    ``sglang_incompatible`` naming the first one the installed SGLang lacks."""
    from .compat import check_parameters, resolve

    found = {}
    for hook in HOOKS:
        found[hook.target] = resolve(hook.target)
        check_parameters(hook.target, found[hook.target], hook.leading)
    for name in USED_LATER:
        found[name] = resolve(name)
    return found


def warn_if_untested_release() -> None:
    from .compat import SUPPORTED_RANGE, installed_version, is_supported

    version = installed_version()
    if not is_supported(version):
        logger.warning(
            "mixed_precision: SGLang %s is outside the tested range %s; every hook target resolved, "
            "but the plugin has not been tested with it",
            version,
            SUPPORTED_RANGE,
        )


def register_hooks() -> None:
    """Resolve every target, then register each hook once (idempotent)."""
    from sglang.srt.plugins.hook_registry import HookType

    resolve_targets()
    warn_if_untested_release()
    for hook in HOOKS:
        register_hook_once(hook.target, hook.function, HookType[hook.kind])


def register_hook_once(target: str, hook, kind) -> None:
    """Register ``hook`` on ``target`` unless it already is (``register()`` may run twice in one process)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, [])):
        HookRegistry.register(target, hook, kind)
