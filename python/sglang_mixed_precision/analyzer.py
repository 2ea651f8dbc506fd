"""A checkpoint's tensors by role (attention, dense MLP, shared / routed experts, router, norms,
embeddings, lm_head) and a mapping YAML choosing a precision per role.

Exported configs use the seed keys (``fp16_path`` / ``fp8_path`` / ``int4_path``) and compact
``rules`` (one glob per role, verified to reproduce the per-module choice), or, with
``explicit=True``, one ``weight_mapping`` line per tensor as the seed did.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import yaml

from .core.config import Rule, first_matching_rule
from .core.errors import ErrorCode, MixedPrecisionError
from .core.formats import DTYPE_BYTES, all_formats, release_tensors, scheme_for_precision
from .core.naming import ModuleRef, Role, classify, module_name
from .core.sources import CheckpointSource

PRECISIONS = tuple(name for fmt in all_formats() for name in fmt.precision_names)
ROLE_ORDER = (
    Role.ATTENTION,
    Role.DENSE_MLP,
    Role.SHARED_EXPERT,
    Role.ROUTED_EXPERT,
    Role.ROUTER,
    Role.NORM,
    Role.EMBEDDING,
    Role.LM_HEAD,
    Role.OTHER,
)


@dataclass
class RoleStats:
    modules: int = 0
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0


@dataclass
class Analysis:
    model_path: Path
    refs: dict[str, ModuleRef]  # module -> classification
    module_bytes: dict[str, int]
    module_params: dict[str, int]
    module_shapes: dict[str, tuple[int, ...] | None]
    tensor_names: list[str]
    stats: dict[Role, RoleStats] = field(default_factory=dict)


def analyze(model_path: str | Path) -> Analysis:
    """Classify every tensor of a checkpoint from its headers (index, safetensors or .bin)."""
    source = CheckpointSource("model", Path(model_path).resolve())
    names = list(source.tensor_names)
    result = Analysis(source.path, {}, {}, {}, {}, names)
    for module in source.module_names():
        ref = classify(module)
        tensors = source.module_tensors(module)
        weight = tensors.get("weight")
        stats = result.stats.setdefault(ref.role, RoleStats())
        stats.modules += 1
        stats.tensors += len(tensors)
        nbytes = sum(t.nbytes for t in tensors.values())
        params = sum(t.numel for t in tensors.values())
        stats.parameters += params
        stats.bytes += nbytes
        result.refs[module], result.module_bytes[module], result.module_params[module] = ref, nbytes, params
        result.module_shapes[module] = weight.shape if weight is not None else None
    return result


def choose_precisions(
    analysis: Analysis, *, attention="fp16", mlp="fp16", expert="fp16", shared_expert=None
) -> dict[str, str]:
    """module -> label ("fp16", "fp8", "int4") for every linear; everything else stays 16-bit."""
    per_role = {
        Role.ATTENTION: attention,
        Role.DENSE_MLP: mlp,
        Role.ROUTED_EXPERT: expert,
        Role.SHARED_EXPERT: shared_expert or mlp,
    }
    for role, value in per_role.items():
        if value not in PRECISIONS:
            raise MixedPrecisionError(
                ErrorCode.BAD_ARGUMENT,
                f"precision {value!r} for {role.value} is not one of {', '.join(PRECISIONS)}",
                fix="use fp16 (= bf16 / 16bit, the unquantized source), fp8 or int4",
            )
    norm = {p: ("fp16" if p in ("bf16", "16bit") else p) for p in PRECISIONS}
    return {m: norm[per_role[ref.role]] if ref.role in per_role else "fp16" for m, ref in analysis.refs.items()}


def estimated_bytes(analysis: Analysis, module: str, label: str) -> int:
    """Bytes of a module stored as ``label`` (its real size for 16 bits; the release layout otherwise)."""
    shape = analysis.module_shapes.get(module)
    if label == "fp16" or shape is None or len(shape) != 2:
        return analysis.module_bytes[module]
    # the official releases' layout of that precision (fp8 block 128, GPTQ int4 group 128)
    specs = release_tensors(scheme_for_precision(label), shape[0], shape[1])
    return sum(prod(spec.shape) * DTYPE_BYTES[spec.dtypes[0]] for spec in specs.values())


# ---- compact rules ------------------------------------------------------------------------------
def _generalize(ref: ModuleRef) -> str:
    """model.layers.3.mlp.experts.7.up_proj -> model.layers.*.mlp.experts.*.up_proj"""
    parts = ref.name.split(".")
    out = []
    for i, part in enumerate(parts):
        numeric_slot = part.isdigit() and i > 0 and parts[i - 1] in ("layers", "experts", "h", "blocks")
        out.append("*" if numeric_slot else part)
    return ".".join(out)


def _resolve(rules: list[Rule], ref: ModuleRef) -> str:
    """The label ``rules`` give ``ref`` when the planner reads them (non-linears and unmatched: fp16)."""
    rule = first_matching_rule(rules, ref.name) if ref.role.quantizable else None
    return rule.label if rule else "fp16"


def compact_rules(analysis: Analysis, choice: dict[str, str]) -> list[tuple[str, str]]:
    """(glob, label) rules, most specific first, that reproduce ``choice`` for every module."""
    exact: dict[str, str] = {}
    for module, ref in analysis.refs.items():
        if ref.role.quantizable and choice[module] != "fp16":
            exact.setdefault(_generalize(ref), choice[module])
    collapsed: dict[str, str] = {}
    for pattern, label in exact.items():
        parent = pattern.rsplit(".", 1)[0]
        collapsed.setdefault((parent if parent.endswith("*") else parent + ".*") if "*" in pattern else pattern, label)
    for candidate in (collapsed, exact):
        ordered = sorted(candidate.items(), key=lambda kv: (-kv[0].count("."), kv[0]))
        rules = [Rule(i, p, label, "<export>") for i, (p, label) in enumerate(ordered, 1)]
        if all(_resolve(rules, ref) == choice[m] for m, ref in analysis.refs.items()):
            return ordered
    return []  # no role-wide globs fit: the caller writes explicit names


def export_config(
    analysis: Analysis,
    choice: dict[str, str],
    *,
    fp8_path: str | None = None,
    int4_path: str | None = None,
    explicit: bool = False,
) -> str:
    """The mixed-precision YAML for ``choice`` (module -> label)."""
    base = analysis.model_path
    section: dict = {"fp16_path": str(base)}
    used = set(choice.values())
    if "fp8" in used:
        section["fp8_path"] = str(fp8_path or f"{base}-FP8")
    if "int4" in used:
        section["int4_path"] = str(int4_path or f"{base}-GPTQ-Int4")
    rules = [] if explicit else compact_rules(analysis, choice)
    if rules:
        section["rules"] = [{"match": p, "source": label} for p, label in rules]
    elif explicit or used != {"fp16"}:  # seed style, or choices no role-wide glob reproduces
        section["weight_mapping"] = {
            t: choice[module_name(t)] for t in analysis.tensor_names if module_name(t) in choice
        }
    header = f"# Generated by `sglang-mp analyze --model_path {base}`; check the fp8/int4 paths.\n"
    return header + yaml.safe_dump({"mixed_precision": section}, sort_keys=False, width=200)


# ---- reports ------------------------------------------------------------------------------------
def role_table(analysis: Analysis, choice: dict[str, str]) -> list[dict]:
    rows = []
    for role in ROLE_ORDER:
        stats = analysis.stats.get(role)
        if not stats:
            continue
        modules = [m for m, r in analysis.refs.items() if r.role is role]
        labels = sorted({choice[m] for m in modules})
        rows.append(
            {
                "role": role.value,
                "modules": stats.modules,
                "tensors": stats.tensors,
                "parameters": stats.parameters,
                "bytes": stats.bytes,
                "precision": "+".join(labels),
                "planned_bytes": sum(estimated_bytes(analysis, m, choice[m]) for m in modules),
            }
        )
    return rows


def bytes_per_layer(analysis: Analysis, choice: dict[str, str]) -> dict[object, dict[str, int]]:
    """{layer (or "other"): {label: estimated bytes}} for the plot."""
    out: dict[object, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for module, ref in analysis.refs.items():
        out[ref.layer if ref.layer is not None else "other"][choice[module]] += estimated_bytes(
            analysis, module, choice[module]
        )
    return out


def plot_bytes_per_layer(analysis: Analysis, choice: dict[str, str], out_png: str | Path) -> Path:
    """A PNG: bytes per decoder layer, stacked by precision."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MixedPrecisionError(
            ErrorCode.MISSING_DEPENDENCY,
            "--plot needs matplotlib, which is not installed",
            fix="pip install matplotlib",
        ) from None
    per_layer = bytes_per_layer(analysis, choice)
    layers = sorted(k for k in per_layer if k != "other")
    labels = sorted({label for v in per_layer.values() for label in v})
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.12 + 3), 4))
    bottom = [0.0] * len(layers)
    for label in labels:
        heights = [per_layer[layer].get(label, 0) / 2**20 for layer in layers]
        ax.bar(layers, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("MiB of weights")
    ax.set_title(f"{analysis.model_path.name}: bytes per layer by precision")
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
