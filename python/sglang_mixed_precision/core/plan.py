"""Skeleton + config + sources -> :class:`Plan`: every module resolved to a source and validated.

The model is the unquantized source (its config.json and its tensor list). Each module is
assigned a source (explicit ``weight_mapping`` name > first matching rule > ``default`` for linears
> the unquantized source), then checked before any GPU work: the source has its tensors, their
shapes agree with config.json under the source's format, members of one SGLang layer (q/k/v,
gate/up, all experts of a layer) share a scheme, and the per-rank shapes run on the scheme's
CUDA kernel at the given TP size. Independent problems are collected and raised together as
:class:`ValidationErrors`.
"""

from __future__ import annotations

import gc
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cache
from math import prod
from pathlib import Path

from .architectures import (
    ARCHITECTURES,
    ExpectedModule,
    architecture_for,
    class_problems,
    describe_missing,
    expected_modules,
    layer_ranges,
)
from .config import UNQUANTIZED_ALIASES, MappingEntry, MixedConfig, first_matching_rule
from .errors import EXAMPLES, ErrorCode, MixedPrecisionError, ValidationErrors, more
from .formats import DTYPE_BYTES, Scheme, TensorSpec, expected_tensors, module_scheme, rank_problems
from .geometry import ModelGeometry
from .naming import ModuleRef, Role, classify, layer_index
from .report import summary
from .sources import CheckpointSource, TensorInfo
from .sources.safetensors import corrupt_safetensors, entry_problem

# config.json keys that must agree between the skeleton and every other source.
ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_local_experts",
    "vocab_size",
    "tie_word_embeddings",
)


@dataclass(eq=False)
class ModuleAssignment:
    ref: ModuleRef
    label: str
    scheme: Scheme
    rule: str  # what decided the source: a weight_mapping entry, a rule, the default, ...
    shape: tuple[int, ...] | None  # logical 16-bit weight shape
    nbytes: int  # bytes of its tensors in its source
    params: int  # logical parameters (16-bit weight + bias)
    source: CheckpointSource = field(repr=False)

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """{suffix: TensorInfo} in its source (built on first use: planning reads raw headers)."""
        return self.source.module_tensors(self.ref.name)


@dataclass
class GroupAssignment:
    prefix: str  # SGLang layer prefix: model.layers.3.self_attn.qkv_proj, model.layers.3.mlp.experts, ...
    label: str  # the members' source label ("a+b" if they come from several sources of one scheme)
    scheme: Scheme
    members: list[str]
    role: Role

    @property
    def labels(self) -> list[str]:
        return self.label.split("+")


@dataclass
class Plan:
    config: MixedConfig
    tp_size: int
    skeleton_label: str
    sources: dict[str, CheckpointSource]
    geometry: ModelGeometry
    modules: dict[str, ModuleAssignment]
    groups: dict[str, GroupAssignment]
    warnings: list[str] = field(default_factory=list)

    @property
    def skeleton(self) -> CheckpointSource:
        return self.sources[self.skeleton_label]

    @property
    def skeleton_path(self) -> Path:
        return self.skeleton.path

    @property
    def hf_config(self) -> dict:
        return self.skeleton.hf_config

    def group_for_prefix(self, prefix: str) -> GroupAssignment | None:
        """The group SGLang builds at ``prefix`` (a fused layer, or a member module's name)."""
        group = self.groups.get(prefix)
        if group is None and prefix in self.modules:
            group = self.groups.get(self.modules[prefix].ref.group)
        return group

    def tensors_by_source(self) -> dict[str, list[TensorInfo]]:
        """Exactly the tensors the loader must read, per source label."""
        out: dict[str, list[TensorInfo]] = defaultdict(list)
        for assignment in self.modules.values():
            out[assignment.label].extend(assignment.tensors.values())
        return dict(out)

    def bytes_by_scheme(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for assignment in self.modules.values():
            out[assignment.scheme.label()] += assignment.nbytes
        return dict(out)

    def to_json(self) -> dict:
        return {
            "tp_size": self.tp_size,
            "skeleton": {"label": self.skeleton_label, "path": str(self.skeleton_path)},
            "sources": {
                label: {"path": str(s.path), "scheme": s.scheme.to_json(), "quant_config": s.quant_config}
                for label, s in self.sources.items()
            },
            "summary": summary(self),
            "groups": {
                p: {"label": g.label, "scheme": g.scheme.label(), "role": g.role.value, "members": len(g.members)}
                for p, g in self.groups.items()
            },
            "modules": {
                name: {"label": a.label, "scheme": a.scheme.label(), "rule": a.rule} for name, a in self.modules.items()
            },
            "warnings": self.warnings,
        }


def build_plan(config: MixedConfig, tp_size: int = 1, skeleton: str | None = None) -> Plan:
    """Resolve and validate; raises :class:`ValidationErrors` listing every problem found. ``skeleton``
    (a source label) overrides the config's own: the serving launcher's --model-path names it."""
    if skeleton:
        config = replace(config, skeleton=skeleton)
    if not isinstance(tp_size, int) or tp_size < 1:
        raise MixedPrecisionError(
            ErrorCode.BAD_ARGUMENT,
            f"tp_size must be a positive integer, got {tp_size!r}",
            fix="pass --tp-size 1, 2, 4 or 8",
        )
    # Planning a 235B model allocates ~1M small objects that all stay alive; the cyclic collector
    # would rescan them over and over without finding garbage.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _Planner(config, tp_size).build()
    finally:
        if gc_was_enabled:
            gc.enable()


class _Problems:
    """Collects errors; many modules failing the same way become one message with examples."""

    def __init__(self):
        self.errors: list[MixedPrecisionError] = []
        self._buckets: dict[tuple, list] = {}

    def add(self, error: MixedPrecisionError) -> None:
        self.errors.append(error)

    def add_similar(self, key: tuple, example: str, make) -> None:
        """``make(examples, count)`` builds the error for every example sharing ``key``."""
        bucket = self._buckets.setdefault(key, [make, []])
        bucket[1].append(example)

    def flush(self) -> list[MixedPrecisionError]:
        for make, examples in self._buckets.values():
            self.errors.append(make(examples[:EXAMPLES], len(examples)))
        self._buckets.clear()
        return self.errors

    def raise_if_any(self) -> None:
        if self.flush():
            raise ValidationErrors(self.errors)


class _Planner:
    def __init__(self, config: MixedConfig, tp: int):
        self.config = config
        self.tp = tp
        self.problems = _Problems()
        self._shapes: dict[tuple, tuple | None] = {}
        self.sources = {
            label: CheckpointSource(label, spec.path, origin=spec.origin) for label, spec in config.sources.items()
        }
        self.warnings: list[str] = []
        self.conflicts = 0
        self.expected: dict[str, ExpectedModule] = {}  # what config.json implies ({} for an unknown family)
        self.absent: set[str] = set()  # expected modules the skeleton lacks
        self.incomplete: dict[str, list[str]] = defaultdict(list)  # label -> absent modules assigned to it

    def build(self) -> Plan:
        usable = self._check_sources()
        skeleton = self._choose_skeleton(usable)
        self._check_promised_formats(usable)  # also the likely cause when no 16-bit source is left
        if skeleton and self.sources[skeleton] in usable:
            self.skeleton = self.sources[skeleton]
            self._check_architectures(usable)
        self.problems.raise_if_any()
        self.skeleton = self.sources[skeleton]
        self.aliases = {a: skeleton for a in UNQUANTIZED_ALIASES if a not in self.sources}
        self._scan_headers()
        self.problems.raise_if_any()
        self.geometry = self._geometry()
        modules = self._assign_modules()
        groups = self._group(modules)
        self.problems.raise_if_any()
        return Plan(
            self.config,
            self.tp,
            skeleton,
            self.sources,
            self.geometry,
            modules,
            groups,
            self.warnings + self._unused_rules(modules),
        )

    # ---- sources ------------------------------------------------------------------------------
    def _check_sources(self) -> list[CheckpointSource]:
        """The sources whose directory and config.json are usable (the others' problems are recorded)."""
        usable = []
        for source in self.sources.values():
            problem = source.check_exists()
            if problem:
                self.problems.add(problem)
                continue
            try:
                _ = source.scheme  # reads config.json, detects the format
            except MixedPrecisionError as e:
                self.problems.add(e)
                continue
            usable.append(source)
        return usable

    def _check_promised_formats(self, usable: list[CheckpointSource]) -> None:
        """A seed key promises a format (``fp8_path``: FP8): a checkpoint of another format under it is
        an error. A free label that reads like a format (``sources: {my-fp8: ...}``) only gets a
        warning, as does one directory under two labels."""
        by_path: dict[Path, list[str]] = defaultdict(list)
        for source in usable:
            spec = self.config.sources[source.label]
            by_path[_resolved(source.path)].append(source.label)
            actual = _format_of(source.scheme)
            promised = spec.promised_format
            if promised is not None and promised != actual:
                self.problems.add(
                    MixedPrecisionError(
                        ErrorCode.SOURCE_LABEL_MISMATCH,
                        f"{spec.key} promises {_a(promised)} checkpoint, but {source.path} is "
                        f"{source.scheme.label()} (its config.json says so)",
                        where=spec.origin,
                        fix=f"point {spec.key} at the model's {_FORMAT_NAMES[promised]} checkpoint, or list this one "
                        f"under the key of its format ({_key_for(actual)}) or under 'sources:' with a label of your choice",
                    )
                )
            elif promised is None and (implied := _label_format(source.label)) not in (None, actual):
                self.warnings.append(
                    f"source label {source.label!r} ({spec.origin}) reads like {_a(implied)} checkpoint, but "
                    f"{source.path} is {source.scheme.label()}"
                )
        for path, labels in by_path.items():
            if len(labels) > 1:
                self.warnings.append(f"sources {', '.join(map(repr, labels))} are the same directory {path}")

    def _choose_skeleton(self, usable: list[CheckpointSource]) -> str:
        unquantized = [s.label for s in usable if not s.scheme.quantized]
        chosen = self.config.skeleton
        if chosen is not None and chosen not in self.sources:  # an alias (bf16) no source is labelled with
            chosen = unquantized[0] if unquantized else None
        if chosen is not None:
            source = self.sources[chosen]
            if source in usable and source.scheme.quantized:
                self.problems.add(
                    MixedPrecisionError(
                        ErrorCode.SKELETON_QUANTIZED,
                        f"skeleton {chosen!r} is a quantized checkpoint ({source.scheme.label()})",
                        where=source.origin,
                        fix="name the unquantized (16-bit) source as skeleton",
                    )
                )
            return chosen
        for preferred in UNQUANTIZED_ALIASES:
            if preferred in unquantized:
                return preferred
        if unquantized:
            return unquantized[0]
        if not self.problems.errors:
            self.problems.add(
                MixedPrecisionError(
                    ErrorCode.MISSING_SOURCE,
                    "no unquantized (16-bit) source: the plan takes the model's structure, norms, "
                    "embeddings and router from it",
                    where=self.config.where(),
                    fix="add fp16_path (or a 16-bit entry under sources) pointing at the BF16/FP16 checkpoint",
                )
            )
        return ""

    def _check_architectures(self, usable: list[CheckpointSource]) -> None:
        base = self.skeleton.hf_config
        for source in usable:
            if source is self.skeleton:
                continue
            cfg = source.hf_config
            diffs = [
                f"{k}: {cfg.get(k)!r} vs {base.get(k)!r}"
                for k in ARCHITECTURE_KEYS
                if k in cfg and k in base and cfg[k] != base[k]
            ]
            if diffs:
                self.problems.add(
                    MixedPrecisionError(
                        ErrorCode.ARCHITECTURE_MISMATCH,
                        f"source {source.label!r} is not the same model as skeleton {self.skeleton.label!r}: "
                        + "; ".join(diffs),
                        where=f"{source.path / 'config.json'} vs {self.skeleton.path / 'config.json'}",
                        fix=f"point {source.label!r} at a checkpoint of the same model (same config.json apart from quantization)",
                    )
                )

    def _scan_headers(self) -> None:
        for source in self.sources.values():
            for problem in source.scan():
                self.problems.add(problem)

    def _geometry(self) -> ModelGeometry:
        cfg_path = self.skeleton.path / "config.json"
        geometry = ModelGeometry.from_hf_config(self.skeleton.hf_config, where=str(cfg_path))
        for problem in geometry.tp_problems(self.tp):
            self.problems.add(
                MixedPrecisionError(
                    ErrorCode.TP_INDIVISIBLE,
                    f"tp_size {self.tp}: {problem}",
                    where=str(cfg_path),
                    fix=f"choose a --tp-size that divides the head and intermediate counts ({_valid_tps(geometry)})",
                )
            )
        for problem in class_problems(geometry):
            self.problems.add(
                MixedPrecisionError(
                    ErrorCode.MODEL_CLASS_CANNOT_LOAD,
                    f"{geometry.model_type}: {problem}",
                    where=str(cfg_path),
                    fix="give the checkpoint an lm_head of its own: copy model.embed_tokens.weight to lm_head.weight "
                    "in the 16-bit source and set tie_word_embeddings: false in every source's config.json",
                )
            )
        return geometry

    # ---- module assignment --------------------------------------------------------------------
    def _assign_modules(self) -> dict[str, ModuleAssignment]:
        names = self._model_modules()
        classify_fast = _TemplateClassifier()
        arch = architecture_for(self.geometry.model_type)
        cfg = self.skeleton.hf_config
        refs = {m: classify_fast(m) for m in names}
        if arch is not None:
            refs = {m: arch.regroup(ref, cfg) for m, ref in refs.items()}
        explicit = self._explicit(refs)
        if self.conflicts:  # the rest would follow one of the contradicting entries: report them alone
            self.problems.raise_if_any()
        default = self.config.default
        default_rule = f"default {default!r} ({self.config.default_origin})" if default else None
        skeleton_rule = f"unquantized source {self.skeleton.label!r} (not mapped)"
        rules = self.config.rules
        modules = {}
        for name, ref in refs.items():
            entry = explicit.get(name)
            if entry is not None:
                label, why = entry
            elif ref.role.quantizable and (rule := first_matching_rule(rules, name)) is not None:
                label, why = rule.label, rule.describe()
            elif ref.role.quantizable and default:
                label, why = default, default_rule
            else:
                label, why = self.skeleton.label, skeleton_rule
            assignment = self._assign(ref, self.aliases.get(label, label), why)
            if assignment is not None:
                modules[name] = assignment
        self._incomplete_sources()
        return modules

    # ---- completeness -------------------------------------------------------------------------
    def _model_modules(self) -> dict[str, None]:
        """The skeleton's modules and every module config.json implies that it lacks (each must then
        come from the source assigned to it)."""
        names = dict(self.skeleton.module_names())
        cfg = self.skeleton.hf_config
        expected = expected_modules(cfg, self.geometry)
        if expected is None:
            self.warnings.append(
                f"model_type {self.geometry.model_type!r} is not one whose modules the plan knows "
                f"({', '.join(ARCHITECTURES)}): it plans the modules the checkpoint holds, "
                "but cannot check that none is missing"
            )
            return names
        self.expected = expected
        self._extra_layers(names, architecture_for(self.geometry.model_type).extra_layers(cfg))
        self.absent = {name for name in expected if name not in names}
        names.update(dict.fromkeys(n for n in expected if n in self.absent))  # in the model's order
        return names

    def _extra_layers(self, names: dict[str, None], allowed: int) -> None:
        """Layers the checkpoint holds beyond num_hidden_layers: SGLang would skip them silently,
        so the weights and config.json are of different models."""
        limit = self.geometry.layers + allowed
        extra = sorted({i for i in map(layer_index, names) if i is not None and i >= limit})
        if extra:
            self.problems.add(
                MixedPrecisionError(
                    ErrorCode.ARCHITECTURE_MISMATCH,
                    f"source {self.skeleton.label!r} holds {layer_ranges(extra)}, but its config.json says "
                    f"num_hidden_layers={self.geometry.layers}",
                    where=f"{self.skeleton.path} ({self.skeleton.path / 'config.json'})",
                    fix="use the config.json that came with these weights (or the weights of this config.json)",
                )
            )

    def _incomplete_sources(self) -> None:
        for label, missing in self.incomplete.items():
            source = self.sources[label]
            g = self.geometry
            self.problems.add(
                MixedPrecisionError(
                    ErrorCode.MISSING_TENSOR,
                    f"source {label!r} lacks {len(missing)} module(s) that its config.json ({g.model_type}, "
                    f"{g.layers} layers{', MoE' if g.is_moe else ''}) implies: {describe_missing(missing, self.expected)}",
                    where=str(source.path),
                    fix="the checkpoint is incomplete (an interrupted download, a deleted shard?) or config.json "
                    "describes a bigger model: download the missing files again, or map these modules to a "
                    "source that has them",
                )
            )

    def _explicit(self, refs: dict[str, ModuleRef]) -> dict[str, tuple[str, str]]:
        """weight_mapping entries per module; a fused name (qkv_proj, experts) maps all its members and an
        expert's name (``...experts.3``) its projections. Entries that give one module two sources are
        ``config_conflict`` whatever their order."""
        members: dict[str, list[str]] = defaultdict(list)
        for name, ref in refs.items():
            if ref.group != name:
                members[ref.group].append(name)
            if ref.expert is not None:
                members[f"{ref.group}.{ref.expert}"].append(name)
        claims: dict[str, list[MappingEntry]] = defaultdict(list)
        for module, entry in self.config.weight_mapping.items():
            targets = [module] if module in refs else members.get(module)
            if not targets:
                self.problems.add_similar(
                    ("unknown_module",),
                    f"{entry.key!r} ({entry.origin})",
                    lambda ex, n: MixedPrecisionError(
                        ErrorCode.UNKNOWN_MODULE,
                        f"{n} weight_mapping name(s) match no module of the model: {more(ex, n)}",
                        where=f"{self.config.where()}; model {self.skeleton.path}",
                        fix="use checkpoint names such as model.layers.0.self_attn.q_proj(.weight) (see `sglang-mp analyze`)",
                    ),
                )
                continue
            for target in targets:
                claims[target].append(entry)
        out = {}
        for target, entries in claims.items():
            if len({self.aliases.get(e.label, e.label) for e in entries}) > 1:
                self._conflict(target, entries)
                continue
            entry = next((e for e in entries if e.module == target), entries[0])  # the most specific name
            out[target] = (entry.label, entry.describe())
        return out

    def _conflict(self, module: str, entries: list[MappingEntry]) -> None:
        self.conflicts += 1
        said = "; ".join(f"{e.key!r} ({e.origin}) says {e.label!r}" for e in entries)
        self.problems.add_similar(
            ("config_conflict", said),
            module,
            lambda ex, n: MixedPrecisionError(
                ErrorCode.CONFIG_CONFLICT,
                f"weight_mapping gives {n} module(s) two sources -- {said}: {more(ex, n)}",
                where=self.config.where(),
                fix="a module comes from one source: keep one of these entries (a fused name such as qkv_proj or "
                "experts maps every member, whatever order the entries are in)",
            ),
        )

    def _assign(self, ref: ModuleRef, label: str, why: str) -> ModuleAssignment | None:
        source = self.sources[label]
        entries = source.module_entries(ref.name)
        if not entries and ref.name in self.absent:
            self.incomplete[label].append(ref.name)
            return None
        if not entries:
            self.problems.add_similar(
                ("missing_tensor", label, why),
                ref.name,
                lambda ex, n: MixedPrecisionError(
                    ErrorCode.MISSING_TENSOR,
                    f"{n} module(s) assigned to source {label!r} have no tensors there: {more(ex, n)}",
                    where=f"{source.path} (assigned by {why})",
                    fix=f"map them to a source that has them (e.g. weight_mapping '<module>: {self.skeleton.label}') or narrow {why}",
                ),
            )
            return None
        scheme = module_scheme(source.scheme, entries)
        shape = self._logical_shape(ref)
        nbytes = 0
        for entry in entries.values():
            start, stop = entry["data_offsets"]
            nbytes += stop - start
        params = prod(shape) if shape is not None else 0
        bias = entries.get("bias")
        if bias is not None:
            params += prod(bias["shape"])
        assignment = ModuleAssignment(ref, label, scheme, why, shape, nbytes, params, source)
        if shape is not None:
            self._check_tensors(assignment, entries)
        expected = self.expected.get(ref.name)
        if expected is not None and len(expected.tensors) > 1:
            for suffix in expected.tensors:
                if suffix != "weight" and suffix not in entries:
                    self._missing_part(assignment, suffix)
        return assignment

    def _logical_shape(self, ref: ModuleRef) -> tuple[int, ...] | None:
        """config.json's shape for the module, checked against the skeleton's own weight."""
        key = (ref.role, ref.shard, ref.name.rsplit(".", 1)[-1])  # all weight_shape depends on
        expected = self._shapes.get(key, _UNSET)
        if expected is _UNSET:
            expected = self._shapes[key] = self.geometry.weight_shape(ref)
        weight = self.skeleton.module_entries(ref.name).get("weight")
        actual = tuple(weight["shape"]) if weight is not None else None
        if expected is None:
            return actual
        if actual is not None and actual != expected:
            self._shape_error(
                self.skeleton,
                ref.name + ".weight",
                weight,
                ref,
                expected,
                (weight["dtype"],),
                "config.json",
                f"the skeleton {self.skeleton.path} does not match its own config.json",
            )
        return expected

    def _check_tensors(self, a: ModuleAssignment, entries: dict[str, dict]) -> None:
        if len(a.shape) == 2:
            specs, required = _specs(a.scheme, a.shape[0], a.shape[1])
        else:
            weight = entries.get("weight")
            specs, required = _vector_spec(weight["dtype"] if weight else "BF16", a.shape)
        if not required <= entries.keys():
            for suffix in sorted(required - entries.keys()):
                self._missing_part(a, suffix)
        for suffix, entry in entries.items():
            checked = specs.get(suffix)
            if checked is None:
                continue
            spec, shape, numel = checked
            if entry["shape"] != shape or entry["dtype"] not in spec.dtypes:
                self._shape_error(
                    a.source, f"{a.name}.{suffix}", entry, a.ref, spec.shape, spec.dtypes, a.scheme.label(), a.rule
                )
            elif entry["data_offsets"][1] - entry["data_offsets"][0] != numel * DTYPE_BYTES[entry["dtype"]]:
                name = f"{a.name}.{suffix}"
                self.problems.add(corrupt_safetensors(a.source.file_of(name), entry_problem(name, entry)))

    def _missing_part(self, a: ModuleAssignment, suffix: str) -> None:
        src = a.source
        self.problems.add_similar(
            ("missing_part", a.label, suffix, a.scheme),
            a.name,
            lambda ex, n: MixedPrecisionError(
                ErrorCode.MISSING_TENSOR,
                f"{n} module(s) in source {src.label!r} ({a.scheme.label()}) lack their {suffix!r} tensor: {more(ex, n)}",
                where=str(src.path),
                fix=f"the checkpoint is incomplete for {a.scheme.label()}; re-export it or map these modules elsewhere",
            ),
        )

    def _shape_error(
        self, source: CheckpointSource, name: str, entry: dict, ref: ModuleRef, shape, dtypes, scheme_label, why
    ) -> None:
        actual = tuple(entry["shape"])
        key = ("shape_mismatch", source.label, name.rsplit(".", 1)[-1], actual, entry["dtype"], shape)
        file = source.file_of(name)
        self.problems.add_similar(
            key,
            name,
            lambda ex, n: MixedPrecisionError(
                ErrorCode.SHAPE_MISMATCH,
                f"{n} tensor(s) of source {source.label!r} are {entry['dtype']}{list(actual)}, but config.json "
                f"({ref.role.value}, {scheme_label}) needs {'/'.join(dtypes)}{list(shape)}: {more(ex, n)}",
                where=f"{file} (source {source.path}; {why})",
                fix="this checkpoint is of another model size or a different export; use the matching release or map these modules elsewhere",
            ),
        )

    # ---- groups -------------------------------------------------------------------------------
    def _group(self, modules: dict[str, ModuleAssignment]) -> dict[str, GroupAssignment]:
        members: dict[str, list[ModuleAssignment]] = defaultdict(list)
        for a in modules.values():
            members[a.ref.group].append(a)
        groups = {}
        for prefix, items in members.items():
            schemes = {a.scheme for a in items}
            if len(schemes) > 1:
                self._mixed_group(prefix, items)
                continue
            labels = sorted({a.label for a in items})
            scheme = items[0].scheme
            groups[prefix] = GroupAssignment(
                prefix, "+".join(labels), scheme, [a.name for a in items], items[0].ref.role
            )
            rules = sorted({a.rule for a in items})
            if scheme.quantized and groups[prefix].role in (Role.EMBEDDING, Role.LM_HEAD):
                self._quantized_vocab(groups[prefix], rules)
            elif scheme.quantized and not self._refused_by_architecture(groups[prefix], rules):
                self._check_rank_shapes(groups[prefix], rules)
        self._architecture_group_rules(groups)
        return groups

    def _refused_by_architecture(self, group: GroupAssignment, rules: list[str]) -> bool:
        """The family's SGLang model cannot load or run this layer in its precision (architectures.py)."""
        arch = architecture_for(self.geometry.model_type)
        why = arch.serving_refusal(group.prefix, group.role, _format_of(group.scheme)) if arch else None
        if why is None:
            return False
        leaf = group.prefix.rsplit(".", 1)[-1]
        self.problems.add_similar(
            ("architecture_refuses_scheme", leaf, group.scheme.label(), why),
            group.prefix,
            lambda ex, n, g=group: MixedPrecisionError(
                ErrorCode.ARCHITECTURE_REFUSES_SCHEME,
                f"SGLang's {self.geometry.model_type} model cannot serve {leaf} ({g.role.value}) in "
                f"{g.scheme.label()}: {why}; in {n} layer(s): {more(ex, n)}",
                where=f"source {g.label!r}; decided by {'; '.join(rules)}",
                fix=f"map {_layer_relative(g.members)} to a 16-bit or FP8 source (a rule "
                f"'model.layers.*.{_layer_relative(g.members[:1])}' before the one that gives them {g.scheme.label()})",
            ),
        )
        return True

    def _architecture_group_rules(self, groups: dict[str, GroupAssignment]) -> None:
        """Rules over several layers at once (one global setting the family's model reads for all)."""
        arch = architecture_for(self.geometry.model_type)
        for prefixes, why, fix in arch.plan_refusals(groups) if arch else ():
            self.problems.add(
                MixedPrecisionError(
                    ErrorCode.ARCHITECTURE_REFUSES_SCHEME,
                    f"SGLang's {self.geometry.model_type} model cannot serve this mix: {why}: {more(prefixes)}",
                    where=self.config.where(),
                    fix=fix,
                )
            )

    def _quantized_vocab(self, group: GroupAssignment, rules: list[str]) -> None:
        # SGLang builds embeddings and lm_head with no quantized method: it would fail at model
        # construction, after the workers started.
        self.problems.add(
            MixedPrecisionError(
                ErrorCode.QUANTIZED_VOCAB,
                f"{group.prefix} is {group.scheme.label()} in source {group.label!r}, but SGLang serves "
                "embeddings and lm_head only in 16 bits",
                where=f"{group.prefix} (decided by: {'; '.join(rules)})",
                fix=f"map {group.prefix} to a 16-bit source (official FP8 and GPTQ releases keep it 16-bit)",
            )
        )

    def _mixed_group(self, prefix: str, items: list[ModuleAssignment]) -> None:
        by_scheme: dict[str, list[str]] = defaultdict(list)
        for a in items:
            by_scheme[f"{a.scheme.label()} from {a.label!r}"].append(
                f"{a.name.rsplit(prefix.rsplit('.', 1)[0] + '.', 1)[-1]}"
            )
        parts = [f"{k}: {more(v)}" for k, v in by_scheme.items()]
        self.problems.add(
            MixedPrecisionError(
                ErrorCode.MIXED_GROUP,
                f"SGLang fuses {prefix} into one layer, but its members have different precisions -- "
                + "; ".join(parts),
                where=f"{prefix} (decided by: {'; '.join(sorted({a.rule for a in items}))})",
                fix="map every member of the fused layer (q/k/v, gate/up, or all experts of a layer) to the same precision",
            )
        )

    def _check_rank_shapes(self, group: GroupAssignment, rules: list[str]) -> None:
        problems = _rank_problems(self.geometry, group.role, group.prefix.rsplit(".", 1)[-1], group.scheme, self.tp)
        for problem in problems:
            key = ("tp_indivisible", group.scheme, group.role, group.prefix.rsplit(".", 1)[-1], problem)
            self.problems.add_similar(
                key,
                group.prefix,
                lambda ex, n, p=problem, g=group, rules=rules: MixedPrecisionError(
                    ErrorCode.TP_INDIVISIBLE,
                    f"{g.scheme.label()} at tp_size {self.tp}: {p}, in {n} layer(s): {more(ex, n)}",
                    where=f"source {g.label!r} ({g.role.value}); decided by {'; '.join(rules)}",
                    fix=f"use a --tp-size this precision can split ({_valid_tps(self.geometry, g)}) or map these layers to another precision",
                ),
            )

    def _unused_rules(self, modules: dict[str, ModuleAssignment]) -> list[str]:
        used = {a.rule for a in modules.values()}
        return [
            f"{r.describe()} decides no module: it matches no linear, or earlier rules / weight_mapping names take all it matches"
            for r in self.config.rules
            if r.describe() not in used
        ]


_UNSET = object()

# A source's format as labels and seed keys speak of it (formats finer than these are not promised).
_FORMAT_NAMES = {"16bit": "16-bit", "fp8": "FP8", "int4": "GPTQ-Int4", "int8": "GPTQ-Int8"}
_FORMAT_KEYS = {"16bit": "fp16_path", "fp8": "fp8_path", "int4": "int4_path", "int8": "int8_path"}
# Words of a free label that name a format ("bf16", "my-fp8", "gptq-int4", ...).
_LABEL_WORDS = {
    "fp8": "fp8",
    "int4": "int4",
    "w4a16": "int4",
    "int8": "int8",
    "bf16": "16bit",
    "fp16": "16bit",
    "16bit": "16bit",
    "fp32": "16bit",
}


def _a(fmt: str) -> str:
    """``an FP8``, ``a 16-bit``: the format's name with its article."""
    name = _FORMAT_NAMES[fmt]
    return ("an " if name[0] in "AEFHILMNORSX" else "a ") + name


def _layer_relative(modules: list[str]) -> str:
    """``self_attn.q_a_proj, self_attn.kv_a_proj_with_mqa``: module names inside their decoder layer."""
    return ", ".join(dict.fromkeys(re.sub(r"^.*?\.layers\.\d+\.", "", m) for m in modules))


def _format_of(scheme: Scheme) -> str:
    return scheme.format.precision_name(scheme) if scheme.quantized else "16bit"


def _key_for(fmt: str) -> str:
    return _FORMAT_KEYS.get(fmt, "sources")


def _label_format(label: str) -> str | None:
    """The format a free label names, if exactly one: ``my-fp8`` -> fp8; ``a`` -> None."""
    words = set(re.split(r"[^a-z0-9]+", label.lower()))
    found = {fmt for word, fmt in _LABEL_WORDS.items() if word in words}
    return found.pop() if len(found) == 1 else None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare as written
        return path


class _TemplateClassifier:
    """``naming.classify`` once per name template: the 36,000 expert projections of a 235B model
    are 3 templates (``model.layers.#.mlp.experts.#.gate_proj``); numbers are put back per name."""

    _DIGITS = re.compile(r"(?<=\.)\d+(?=\.|$)")

    def __init__(self):
        self._cache: dict[str, tuple] = {}

    def __call__(self, name: str) -> ModuleRef:
        template = self._DIGITS.sub("#", name)
        recipe = self._cache.get(template)
        if recipe is None:
            recipe = self._cache[template] = self._recipe(name)
        if recipe[0] is None:
            return classify(name)
        role, shard, keep, extra, layer_at, expert_at = recipe
        parts = name.split(".")
        group = name if keep is None else ".".join(parts[:keep]) + extra
        layer = int(parts[layer_at]) if layer_at is not None else None
        expert = int(parts[expert_at]) if expert_at is not None else None
        return ModuleRef(name, role, layer, group, shard, expert)

    @staticmethod
    def _recipe(name: str) -> tuple:
        """How classify's answer for ``name`` is built from its parts (None: not expressible)."""
        ref = classify(name)
        parts = name.split(".")
        layer_at = next((i + 1 for i, p in enumerate(parts[:-1]) if p == "layers" and parts[i + 1].isdigit()), None)
        expert_at = (
            next((i for i, p in enumerate(parts) if p.isdigit() and int(p) == ref.expert and i != layer_at), None)
            if ref.expert is not None
            else None
        )
        if ref.group == name:
            keep, extra = None, ""
        elif name.startswith(ref.group + "."):
            keep, extra = ref.group.count(".") + 1, ""
        else:
            keep, extra = len(parts) - 1, "." + ref.group.rsplit(".", 1)[-1]
        rebuilt = ModuleRef(
            name,
            ref.role,
            int(parts[layer_at]) if layer_at is not None else None,
            name if keep is None else ".".join(parts[:keep]) + extra,
            ref.shard,
            int(parts[expert_at]) if expert_at is not None else None,
        )
        if rebuilt != ref:
            return (None,) * 6
        return ref.role, ref.shard, keep, extra, layer_at, expert_at


_CheckedSpecs = tuple[dict[str, tuple[TensorSpec, list[int], int]], frozenset]


def _with_sizes(specs: dict[str, TensorSpec]) -> _CheckedSpecs:
    """Each spec with its shape as a list (header entries hold lists) and its element count,
    and the suffixes that must be present."""
    checked = {s: (spec, list(spec.shape), prod(spec.shape)) for s, spec in specs.items()}
    return checked, frozenset(s for s, spec in specs.items() if not spec.optional)


@cache
def _specs(scheme: Scheme, n: int, k: int) -> _CheckedSpecs:
    return _with_sizes(expected_tensors(scheme, n, k))


@cache
def _vector_spec(dtype: str, shape: tuple[int, ...]) -> _CheckedSpecs:
    return _with_sizes({"weight": TensorSpec((dtype,), shape)})


@cache
def _rank_problems(geometry: ModelGeometry, role: Role, leaf: str, scheme: Scheme, tp: int) -> tuple[str, ...]:
    rank_shape = geometry.rank_shape(role, leaf, tp)
    return tuple(rank_problems(scheme, rank_shape)) if rank_shape is not None else ()


def _valid_tps(geometry: ModelGeometry, group: GroupAssignment | None = None) -> str:
    ok = [
        tp
        for tp in (1, 2, 4, 8, 16)
        if not geometry.tp_problems(tp)
        and (
            group is None or not _rank_problems(geometry, group.role, group.prefix.rsplit(".", 1)[-1], group.scheme, tp)
        )
    ]
    return "valid here: " + ", ".join(map(str, ok)) if ok else "none of 1, 2, 4, 8, 16 works"
