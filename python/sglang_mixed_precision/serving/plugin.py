"""SGLang plugin entry point (``[project.entry-points."sglang.srt.plugins"] mixed_precision``).

SGLang runs ``register()`` in its main, scheduler, detokenizer and data-parallel processes (workers
are spawned, so only an entry point reaches them), then applies the registered hooks. It

* adds the quantization method ``mixed_precision`` (:class:`MixedPrecisionConfig`) to SGLang's
  method tables and to ``--quantization``'s choices;
* wraps ``get_model_loader`` so that a model whose quantization is ``mixed_precision`` loads through
  :class:`MixedPrecisionModelLoader`. ``--load-format dummy`` keeps SGLang's dummy loader: the model
  is still built with the mix's methods and kernels, only the weights are random;
* installs the runtime (:mod:`.runtime`): ``/mixed_precision`` routes and the workers' reload hooks.

No SGLang file is copied or edited.
"""

from __future__ import annotations

import logging

from ..core.errors import ErrorCode, MixedPrecisionError
from . import QUANT_METHOD

logger = logging.getLogger(__name__)

LOADER_TARGET = "sglang.srt.model_loader.loader.get_model_loader"
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
