"""SGLang plugin entry point (``[project.entry-points."sglang.srt.plugins"] mixed_precision``).

SGLang runs ``register()`` in its main, scheduler, detokenizer and data-parallel processes (workers
are spawned, so only an entry point reaches them), then applies the registered hooks. It

* adds the quantization method ``mixed_precision`` (:class:`MixedPrecisionConfig`) to SGLang's
  method tables and to ``--quantization``'s choices;
* wraps ``get_model_loader`` so that a model whose quantization is ``mixed_precision`` loads through
  :class:`MixedPrecisionModelLoader`. ``--load-format dummy`` keeps SGLang's dummy loader: the model
  is still built with the mix's methods and kernels, only the weights are random;
* wraps ``get_model_architecture`` so that a mixed model is built by its family's own class
  (``core.architectures``): SGLang 0.5.17 sends a Mixtral whose quantization is not in its short
  list to ``QuantMixtralForCausalLM`` (per-expert linears, no FusedMoE);
* installs the runtime (:mod:`.runtime`): ``/mixed_precision`` routes and the workers' reload hooks.

No SGLang file is copied or edited.
"""

from __future__ import annotations

import logging

from ..core.errors import ErrorCode, MixedPrecisionError
from . import QUANT_METHOD

logger = logging.getLogger(__name__)

LOADER_TARGET = "sglang.srt.model_loader.loader.get_model_loader"
# get_model_architecture as the loader and the rest of SGLang import it
ARCHITECTURE_TARGETS = (
    "sglang.srt.model_loader.loader.get_model_architecture",
    "sglang.srt.model_loader.utils.get_model_architecture",
    "sglang.srt.model_loader.get_model_architecture",
)
# Formats that name *how* to read local weights; the mixed loader reads the plan's sources itself.
MIXED_LOAD_FORMATS = ("auto", "safetensors", "pt")


def register() -> None:
    """Idempotent: safe to call in every process and more than once."""
    register_quantization_method()
    register_loader_hook()
    from .runtime import install

    try:
        install()  # /mixed_precision routes (main process), reload and info hooks (workers)
    except ImportError as e:  # an SGLang install without its HTTP server (uvicorn, fastapi): serving as an Engine only
        logger.warning("mixed_precision: runtime routes not installed (%s); serving and loading are unaffected", e)


def register_quantization_method() -> None:
    from sglang.srt.layers import quantization
    from sglang.srt.server_args import QUANTIZATION_CHOICES, add_quantization_method_choices

    from .quant_config import MixedPrecisionConfig

    quantization.QUANTIZATION_METHODS[QUANT_METHOD] = MixedPrecisionConfig
    quantization.BASE_QUANTIZATION_METHODS[QUANT_METHOD] = MixedPrecisionConfig
    if QUANT_METHOD not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([QUANT_METHOD])


def register_loader_hook() -> None:
    from sglang.srt.plugins.hook_registry import HookType

    register_hook_once(LOADER_TARGET, select_model_loader, HookType.AROUND)
    for target in ARCHITECTURE_TARGETS:
        register_hook_once(target, select_family_class, HookType.AROUND)


def register_hook_once(target: str, hook, kind) -> None:
    """Register ``hook`` on ``target`` unless it already is (``register()`` may run twice in one process)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, [])):
        HookRegistry.register(target, hook, kind)


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
