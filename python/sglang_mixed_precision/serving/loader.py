"""``MixedPrecisionModelLoader``: load a mixed plan into the model SGLang built for it.

SGLang's ``DefaultModelLoader`` reads every weight file of one directory. The mixed loader keeps its
model construction and replaces only the weight stream: per source, it opens the files that hold
planned tensors (one cached handle per file), reads exactly the planned keys and hands them to the
model's own ``load_weights`` under their checkpoint names (``q_proj.qweight``,
``experts.3.up_proj.weight_scale_inv``...), which SGLang maps onto its fused parameters (the few a
family's class would drop are fed to their parameters directly: :mod:`.delivery`). The load is
recorded and audited (:mod:`.audit`) before the methods' ``process_weights_after_loading`` (Marlin
repack, FP8 scale layout) run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from itertools import groupby

import torch
from sglang.srt.model_loader.loader import DefaultModelLoader, device_loading_context

from ..core.errors import ErrorCode, MixedPrecisionError
from ..tensors import TensorReader
from .audit import LoadRecorder, audit_model
from .delivery import deliver
from .quant_config import MixedPrecisionConfig

logger = logging.getLogger(__name__)


class PlanWeightStream:
    """Iterable of ``(checkpoint tensor name, tensor)``: exactly the plan's tensors, source by source.

    Counts what it reads: ``yielded`` (tensor name -> times), ``bytes_read`` and ``files_opened``
    per source label.
    """

    def __init__(self, plan):
        self.plan = plan
        self.yielded: Counter = Counter()
        self.bytes_read: Counter = Counter()
        self.files_opened: dict[str, set[str]] = defaultdict(set)
        self.seconds: dict[str, float] = {}

    def __iter__(self):
        for label, infos in self.plan.tensors_by_source().items():
            yield from self._read_source(label, infos)

    def _read_source(self, label: str, infos):
        source = self.plan.sources[label]
        reader = TensorReader(source)
        start = time.perf_counter()
        try:
            # File by file, in storage order: each file is opened once and read front to back.
            in_order = sorted(infos, key=lambda i: (str(i.file), i.data_offsets[0]))
            for file, in_file in groupby(in_order, key=lambda i: i.file):
                handle = reader.open(file)
                self.files_opened[label].add(str(file))
                read = handle.__getitem__ if isinstance(handle, dict) else handle.get_tensor
                for info in in_file:
                    tensor = read(info.name)
                    self.yielded[info.name] += 1
                    self.bytes_read[label] += tensor.numel() * tensor.element_size()
                    yield info.name, tensor
        finally:
            reader.close()
            self.seconds[label] = time.perf_counter() - start
        logger.info(
            "mixed_precision: source %r (%s): read %d tensors, %.1f MiB from %d file(s) in %.2fs",
            label,
            source.path,
            len(infos),
            self.bytes_read[label] / 2**20,
            len(self.files_opened[label]),
            self.seconds[label],
        )


def mixed_config_of(model: torch.nn.Module) -> MixedPrecisionConfig:
    """The MixedPrecisionConfig the model was built with."""
    config = getattr(model, "quant_config", None)
    if isinstance(config, MixedPrecisionConfig):
        return config
    for module in model.modules():
        config = getattr(module, "quant_config", None)
        if isinstance(config, MixedPrecisionConfig):
            return config
    raise MixedPrecisionError(
        ErrorCode.LOADER_WITHOUT_PLAN,
        f"{type(model).__name__} was not built with the mixed_precision config",
        fix="serve a plan directory (quantization_config.quant_method: mixed_precision)",
    )


def process_weights_after_loading(model: torch.nn.Module, target_device: torch.device) -> None:
    """Let every layer's method prepare its weights for its kernel (as SGLang's default loader does)."""
    for _, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            with device_loading_context(module, target_device):
                method.process_weights_after_loading(module)


class MixedPrecisionModelLoader(DefaultModelLoader):
    """SGLang's default loader with the plan's weight stream and a post-load audit."""

    def __init__(self, load_config):
        super().__init__(load_config)
        self.stream: PlanWeightStream | None = None
        self.report = None
        self.weight_bytes: int | None = None

    def download_model(self, model_config) -> None:
        """Sources are local directories named by the plan: nothing to download."""

    def _get_all_weights(self, model_config, model):
        self.stream = PlanWeightStream(mixed_config_of(model).plan)
        return self.stream

    def load_weights_and_postprocess(self, model, weights, target_device):
        if not isinstance(weights, PlanWeightStream):
            raise MixedPrecisionError(
                ErrorCode.LOADER_STREAM,
                "the mixed loader loads only its plan's weight stream",
                fix="load a mixed model through SGLang's get_model_loader (the plugin selects this loader)",
            )
        config = mixed_config_of(model)
        refuse_fused_shared_experts(model, config)
        recorder = LoadRecorder(model)
        try:
            deliver(model, recorder.track(weights))
        finally:
            recorder.detach()
        self.report = audit_model(model, config, recorder, weights.yielded)
        self.report.raise_if_failed(where=config.settings.config_path)
        logger.info(
            "%s; read %s",
            self.report.summary(),
            ", ".join(f"{label}: {n / 2**20:.1f} MiB" for label, n in sorted(weights.bytes_read.items())),
        )
        process_weights_after_loading(model, target_device)
        self.weight_bytes = log_weight_memory(model, config.plan)


def refuse_fused_shared_experts(model: torch.nn.Module, config: MixedPrecisionConfig) -> None:
    """DeepSeek-V3 on CUDA loads its shared expert as routed expert n_routed_experts of the FusedMoE
    unless --disable-shared-experts-fusion is given (the launcher gives it): one layer of one scheme,
    while the plan gives mlp.shared_experts its own. Refused before any weight is read."""
    fused = getattr(model, "num_fused_shared_experts", 0) or 0
    if fused > 0:
        raise MixedPrecisionError(
            ErrorCode.SHARED_EXPERTS_FUSED,
            f"{type(model).__name__} fused {fused} shared expert(s) into each routed experts layer, but the plan "
            "loads mlp.shared_experts as layers of their own",
            where=config.settings.config_path,
            fix="serve with --disable-shared-experts-fusion (launch_mixed_precision_server.py adds it)",
        )


def log_weight_memory(model: torch.nn.Module, plan) -> int:
    """Bytes the model's parameters hold after loading, next to what the plan expects per rank."""
    from ..core.report import summary

    held = sum(p.numel() * p.element_size() for p in model.parameters())
    planned = summary(plan)["per_rank"][0]["bytes"]
    logger.info(
        "mixed_precision: weight memory %d bytes in parameters; plan %d bytes per rank (%+.2f%%)",
        held,
        planned,
        100.0 * (held - planned) / max(planned, 1),
    )
    return held
