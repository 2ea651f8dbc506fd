"""A checkpoint's tensors by role (attention, dense MLP, shared / routed experts, router, norms,
embeddings, lm_head) and a mapping YAML choosing a precision per role.

A quantized checkpoint (GPTQ, FP8) is analyzed as what it is: each module's stored precision,
its bytes as stored, its logical shape from config.json. Exported configs use the seed keys
(``fp16_path`` / ``fp8_path`` / ``int4_path``; the analyzed checkpoint under the key of its own
format) and compact ``rules`` (one glob per role, verified to reproduce the per-module choice),
or, with ``explicit=True``, one ``weight_mapping`` line per tensor as the seed did.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import yaml

from .core.config import Rule, first_matching_rule
from .core.errors import ErrorCode, MixedPrecisionError
from .core.formats import DTYPE_BYTES, Scheme, all_formats, module_scheme, release_tensors, scheme_for_precision
from .core.geometry import ModelGeometry
from .core.naming import ModuleRef, Role, classify, module_name
from .core.plan import ARCHITECTURE_KEYS
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
    module_bytes: dict[str, int]  # as stored
    module_params: dict[str, int]  # logical parameters (a packed int4 weight counts its 16-bit elements)
    module_shapes: dict[str, tuple[int, ...] | None]  # logical 16-bit weight shape
    tensor_names: list[str]
    stats: dict[Role, RoleStats] = field(default_factory=dict)
    scheme: Scheme | None = None  # the checkpoint's format (config.json)
    stored: dict[str, str] = field(default_factory=dict)  # module -> the label it is stored as
    stored_schemes: dict[str, Scheme] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The label of the checkpoint itself ("fp16", "fp8", "int4"): its seed key in an export."""
        return precision_label(self.scheme) if self.scheme is not None else "fp16"


def precision_label(scheme: Scheme) -> str:
    """What a config calls a scheme's precision ("fp16", "fp8", "int4", "int8")."""
    return scheme.format.precision_name(scheme)


def analyze(model_path: str | Path) -> Analysis:
    """Classify every tensor of a checkpoint from its headers (index, safetensors or .bin), each
    module as what it is stored as."""
    source = CheckpointSource("model", Path(model_path).resolve())
    names = list(source.tensor_names)
    result = Analysis(source.path, {}, {}, {}, {}, names, scheme=source.scheme)
    geometry = _geometry(source)
    for module in source.module_names():
        ref = classify(module)
        tensors = source.module_tensors(module)
        stored = module_scheme(source.scheme, source.module_entries(module))
        shape = _logical_shape(geometry, ref, tensors, stored)
        stats = result.stats.setdefault(ref.role, RoleStats())
        stats.modules += 1
        stats.tensors += len(tensors)
        nbytes = sum(t.nbytes for t in tensors.values())
        bias = tensors.get("bias")
        params = prod(shape) + (bias.numel if bias else 0) if shape else sum(t.numel for t in tensors.values())
        stats.parameters += params
        stats.bytes += nbytes
        result.refs[module], result.module_bytes[module], result.module_params[module] = ref, nbytes, params
        result.module_shapes[module] = shape
        result.stored[module], result.stored_schemes[module] = precision_label(stored), stored
    return result


def _geometry(source: CheckpointSource) -> ModelGeometry | None:
    try:
        return ModelGeometry.from_hf_config(source.hf_config, where=str(source.path / "config.json"))
    except MixedPrecisionError:
        return None  # shapes then come from the stored tensors alone


def _logical_shape(geometry, ref: ModuleRef, tensors: dict, stored: Scheme) -> tuple[int, ...] | None:
    """config.json's 16-bit shape; else the stored weight's (a GPTQ qweight [K / pack, N] unpacked)."""
    shape = geometry.weight_shape(ref) if geometry is not None else None
    if shape is not None:
        return shape
    return stored.format.logical_shape(stored, {suffix: info.shape for suffix, info in tensors.items()})


def choose_precisions(
    analysis: Analysis, *, attention=None, mlp=None, expert=None, shared_expert=None
) -> dict[str, str]:
    """module -> label ("fp16", "fp8", "int4") for every linear; everything else stays 16-bit. A role
    left None keeps what the checkpoint stores (16 bits for a 16-bit model)."""
    per_role = {
        Role.ATTENTION: attention,
        Role.DENSE_MLP: mlp,
        Role.ROUTED_EXPERT: expert,
        Role.SHARED_EXPERT: shared_expert or mlp,
    }
    for role, value in per_role.items():
        if value is not None and value not in PRECISIONS:
            raise MixedPrecisionError(
                ErrorCode.BAD_ARGUMENT,
                f"precision {value!r} for {role.value} is not one of {', '.join(PRECISIONS)}",
                fix="use fp16 (= bf16 / 16bit, the unquantized source), fp8 or int4",
            )
    norm = {p: ("fp16" if p in ("bf16", "16bit") else p) for p in PRECISIONS}
    out = {}
    for module, ref in analysis.refs.items():
        value = per_role.get(ref.role)
        if ref.role not in per_role:
            out[module] = "fp16"
        elif value is None:
            out[module] = analysis.stored.get(module, "fp16")
        else:
            out[module] = norm[value]
    return out


def estimated_bytes(analysis: Analysis, module: str, label: str) -> int:
    """Bytes of a module stored as ``label``: as stored when that is its precision; its 16-bit size
    or the official release layout otherwise."""
    shape = analysis.module_shapes.get(module)
    if label == analysis.stored.get(module, "fp16") or shape is None or len(shape) != 2:
        return analysis.module_bytes[module]
    if label == "fp16":
        return analysis.module_params[module] * 2
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
    fp16_path: str | None = None,
    explicit: bool = False,
) -> str:
    """The mixed-precision YAML for ``choice`` (module -> label). The analyzed checkpoint goes under
    the key of its own format; a quantized one needs ``fp16_path`` (the model's 16-bit release)."""
    base = analysis.model_path
    paths = {"fp16": fp16_path, "fp8": fp8_path, "int4": int4_path}
    paths[analysis.label] = str(base)
    if paths["fp16"] is None:
        raise MixedPrecisionError(
            ErrorCode.BAD_ARGUMENT,
            f"{base} is a {analysis.scheme.label()} checkpoint: a mix needs the model's 16-bit checkpoint too "
            "(its norms, embeddings, lm_head and router)",
            fix="pass --fp16_path <the 16-bit release of this model>",
        )
    section: dict = {"fp16_path": str(paths["fp16"])}
    used = set(choice.values())
    stem = str(paths["fp16"])
    if "fp8" in used:
        section["fp8_path"] = str(paths["fp8"] or f"{stem}-FP8")
    if "int4" in used:
        section["int4_path"] = str(paths["int4"] or f"{stem}-GPTQ-Int4")
    for label in sorted(used - {"fp16", "fp8", "int4"}):  # a stored int8
        section[f"{label}_path"] = str(base)
    rules = [] if explicit else compact_rules(analysis, choice)
    if rules:
        section["rules"] = [{"match": p, "source": label} for p, label in rules]
    elif explicit or used != {"fp16"}:  # seed style, or choices no role-wide glob reproduces
        section["weight_mapping"] = {
            t: choice[module_name(t)] for t in analysis.tensor_names if module_name(t) in choice
        }
    header = f"# Generated by `sglang-mp analyze --model_path {base}`; check the paths.\n"
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
                "stored": "+".join(sorted({analysis.stored_schemes[m].label() for m in modules})),
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
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise MixedPrecisionError(
            ErrorCode.OUTPUT_UNWRITABLE,
            f"cannot write the plot {out}: {e.strerror or e}",
            where=str(out),
            fix="choose a path in a directory you can write",
        ) from None
    finally:
        plt.close(fig)
    return out


def find_16bit_source(model_path: str | Path) -> Path | None:
    """The 16-bit checkpoint of the same model beside a quantized one (the converter's ``fp16/`` next
    to ``int4/``; ``Qwen3-8B`` next to ``Qwen3-8B-FP8``), if exactly one sibling directory is one."""
    path = Path(model_path).resolve()
    try:
        cfg = CheckpointSource("model", path).hf_config
        siblings = [d for d in path.parent.iterdir() if d != path and (d / "config.json").is_file()]
    except (MixedPrecisionError, OSError):
        return None
    found = []
    for d in sorted(siblings):
        try:
            other = CheckpointSource("candidate", d)
            if other.scheme.quantized:
                continue
            if all(other.hf_config.get(k) == cfg.get(k) for k in ARCHITECTURE_KEYS if k in cfg):
                found.append(d)
        except MixedPrecisionError:
            continue
    return found[0] if len(found) == 1 else None
