"""SGLang plugin entry point (``[project.entry-points."sglang.srt.plugins"] mixed_precision``).

SGLang runs ``register()`` in its main, scheduler, detokenizer and data-parallel processes (workers
are spawned, so only an entry point reaches them), then applies the registered hooks. It

* adds the quantization method ``mixed_precision`` (:class:`MixedPrecisionConfig`) to SGLang's
  method tables and to ``--quantization``'s choices;
* registers the hooks (:mod:`.hooks`): the mixed loader for mixed models, the family's own class for
  mixed models (``core.architectures``), the workers' reload and info hooks;
* in the main process, adds the ``/mixed_precision`` routes and the Engine methods (:mod:`.routes`).

No SGLang file is copied or edited.
"""

from __future__ import annotations

import logging
import multiprocessing

from ..core.errors import MixedPrecisionError
from . import QUANT_METHOD, compat
from .hooks import register_hooks

logger = logging.getLogger(__name__)


def register() -> None:
    """Idempotent: safe to call in every process and more than once."""
    try:
        register_hooks()  # resolves every SGLang target first: a missing one is an error naming it
    except MixedPrecisionError as e:
        # SGLang only logs what register() raises: keep the method registered so that a plan directory
        # still reaches MixedPrecisionConfig, whose from_config raises this error and stops the server.
        logger.error("mixed_precision: %s", e)
        compat.remember_incompatibility(e)
        register_quantization_method()
        raise
    register_quantization_method()
    if multiprocessing.parent_process() is not None:
        return  # a spawned SGLang subprocess: no HTTP server here
    from .routes import install

    try:
        install()  # /mixed_precision routes and Engine methods
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
