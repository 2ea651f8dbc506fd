"""Hand checkpoint tensors to an SGLang model the way its class accepts them.

Most tensors go through the model's own ``load_weights`` under their checkpoint names: the class
maps q/k/v, gate/up and every expert's projections onto its fused parameters. A few suffixes a
family's class never delivers (``core.architectures``: Llama renames every ``weight_scale_inv``
to ``weight_scale`` and then finds no such parameter) are given to the fused parameter's own
``weight_loader`` here, with the shard id the class's stacked mapping would have passed, so that
TP slicing and the fused layout stay SGLang's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..core.architectures import fed_directly
from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.naming import Role, classify, split_tensor_name

# checkpoint member of a fused layer -> the shard id SGLang's stacked_params_mapping passes
LINEAR_SHARD_IDS = {"q": "q", "k": "k", "v": "v", "gate": 0, "up": 1}


def deliver(model, weights: Iterable[tuple[str, object]]) -> None:
    """``model.load_weights(weights)``, with the tensors its class would drop fed directly."""
    config = getattr(model, "config", None)
    direct = fed_directly(getattr(config, "model_type", "") or "")
    if not direct:
        model.load_weights(weights)
        return
    model.load_weights(_feeding_directly(model, weights, direct))


def _feeding_directly(model, weights, direct: frozenset[str]) -> Iterator[tuple[str, object]]:
    """Pass ``weights`` through, loading those with a ``direct`` suffix on the way (while the
    consumer asks for the next tensor: a recorder wrapping ``weights`` still attributes the
    weight_loader call to the tensor being loaded)."""
    params = dict(model.named_parameters())
    for name, tensor in weights:
        module, suffix = split_tensor_name(name)
        if suffix in direct:
            load_into_fused_parameter(params, module, suffix, tensor)
        else:
            yield name, tensor


def load_into_fused_parameter(params: dict, module: str, suffix: str, tensor) -> str:
    """Load checkpoint tensor ``module.suffix`` into the SGLang parameter that holds it; returns its name."""
    ref = classify(module)
    if ref.role is Role.ROUTED_EXPERT:
        name = f"{ref.group}.{'w13' if ref.shard in ('w1', 'w3') else 'w2'}_{suffix}"
        param = _parameter(params, name, module, suffix)
        param.weight_loader(param, tensor, name, shard_id=ref.shard, expert_id=ref.expert)
        return name
    name = f"{ref.group}.{suffix}"
    param = _parameter(params, name, module, suffix)
    if ref.group == module:  # not fused (o_proj, down_proj)
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, LINEAR_SHARD_IDS[ref.shard])
    return name


def _parameter(params: dict, name: str, module: str, suffix: str):
    param = params.get(name)
    if param is None:
        raise MixedPrecisionError(
            ErrorCode.LOAD_AUDIT_FAILED,
            f"tensor {module}.{suffix} belongs in parameter {name}, which the model does not have",
            where=f"{module}.{suffix}",
            fix="the layer was built with another method than the plan's; check the plan and the skeleton agree",
        )
    return param
