"""``GET /mixed_precision/info``: what a worker reports of its rank, and the reply built from the plan.

:func:`worker_info` runs in a scheduler process (through the ``get_internal_state`` hook, :mod:`.hooks`);
:func:`build_info` runs in the main process and joins the active plan with rank 0's report.
"""

from __future__ import annotations

from .reload_worker import WORKER


def worker_info(scheduler) -> dict:
    """This rank's view: method class, parameter shapes and bytes of every planned layer; load stats."""
    from .loader import mixed_config_of

    runner = scheduler.tp_worker.model_runner
    model = runner.model
    config = mixed_config_of(model)
    layers = {}
    for prefix in config.plan.groups:
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        params = {
            n: {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")}
            for n, p in module.named_parameters(recurse=False)
        }
        layers[prefix] = {
            "method": config.methods.get(prefix, type(getattr(module, "quant_method", None)).__name__),
            "params": params,
            "bytes": sum(p.numel() * p.element_size() for p in module.parameters(recurse=False)),
        }
    stream = getattr(getattr(runner, "loader", None), "stream", None)
    load = None
    if stream is not None:
        load = {
            "bytes_read": dict(stream.bytes_read),
            "seconds": {k: round(v, 3) for k, v in stream.seconds.items()},
            "files": {k: len(v) for k, v in stream.files_opened.items()},
        }
    return {
        "tp_rank": getattr(scheduler, "tp_rank", 0),
        "tp_size": getattr(scheduler, "tp_size", 1),
        "config_path": WORKER.config_path or config.settings.config_path,
        "config_sha256": WORKER.config_sha256,
        "layers": layers,
        "load": load,
        "reloads": list(WORKER.reloads),
    }


def tp_split(plan, assignment) -> str:
    """How SGLang splits a module over TP ranks: column, row, vocab or replicated."""
    from ..core.naming import Role

    if plan.tp_size == 1:
        return "none (tp_size 1)"
    rank_shape = plan.geometry.rank_shape(assignment.ref.role, assignment.ref.group.rsplit(".", 1)[-1], plan.tp_size)
    if rank_shape is not None:
        return "column" if rank_shape.column_split else "row"
    if assignment.ref.role in (Role.EMBEDDING, Role.LM_HEAD):
        return "vocab"
    return "replicated"


def build_info(active, plan, worker: dict | None, worker_error: dict | None = None) -> dict:
    from ..core.report import summary

    layers = (worker or {}).get("layers", {})
    modules = {}
    for name, a in plan.modules.items():
        layer = layers.get(a.ref.group, {})
        modules[name] = {
            "label": a.label,
            "path": str(plan.sources[a.label].path),
            "scheme": a.scheme.label(),
            "layer": a.ref.group,
            "method": layer.get("method"),
            "bytes": a.nbytes,
            "rank_bytes": int(round(a.nbytes * plan.geometry.rank_fraction(a.ref, plan.tp_size))),
            "tp_split": tp_split(plan, a),
            "rule": a.rule,
        }
    totals = summary(plan)
    return {
        "config": {"path": str(active.config_path), "sha256": active.sha256, "origin": active.origin},
        "tp_size": plan.tp_size,
        "sources": {label: {"path": str(s.path), "scheme": s.scheme.label()} for label, s in plan.sources.items()},
        "modules": modules,
        "layers": {
            prefix: {
                "label": g.label,
                "scheme": g.scheme.label(),
                "members": len(g.members),
                **({"rank0": layers[prefix]} if prefix in layers else {}),
            }
            for prefix, g in plan.groups.items()
        },
        "totals": {"by_precision": totals["by_precision"], "per_rank": totals["per_rank"], "total": totals["total"]},
        "load": (worker or {}).get("load"),
        "reloads": active.reloads,
        "worker": None
        if worker is None
        else {k: worker.get(k) for k in ("tp_rank", "tp_size", "config_path", "config_sha256")},
        **({"worker_error": worker_error} if worker_error else {}),
        **({"worker_error": worker["error"]} if worker and "error" in worker else {}),
    }
