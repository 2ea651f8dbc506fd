"""The mix that fits a memory budget best: units, their choices, an exact optimizer, compact rules.

A *unit* is what can move to another source alone: per decoder layer the attention (q/k/v/o), the
dense MLP or the shared expert (gate/up/down), the routed experts (all of one layer). Units are
unions of SGLang's fused layers, so every choice keeps fused groups whole by construction. A unit's
*choices* are the sources that hold it in a form SGLang's kernels can run at the tensor-parallel
size (per-rank shapes checked with the same rules as the plan); each choice costs its bytes on one
rank and a predicted KL divergence increase (measured by ``sglang-mp sensitivity``; 0 for 16-bit).

:func:`optimize` picks one choice per unit minimizing the summed predicted KLD with the bytes per
rank within the capacity: a multiple-choice knapsack solved exactly by a dynamic program over the
Pareto frontier of (bytes, KLD) of the units seen so far (a state that is both heavier and no
better than another can never be part of a better solution, so dropping it keeps the optimum).
Embeddings, norms, routers and lm_head stay 16-bit and count as fixed bytes.

Imports neither torch nor SGLang.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import MixedConfig
from .errors import ErrorCode, MixedPrecisionError, more
from .naming import Role
from .plan import Plan, _rank_problems, build_plan

GIB = 1 << 30
UNIT_ROLES = (Role.ATTENTION, Role.DENSE_MLP, Role.SHARED_EXPERT, Role.ROUTED_EXPERT)
_LAYER_IN_NAME = re.compile(r"(?<=\.layers\.)(\d+)(?=\.)")


# ---- the optimization problem -------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    label: str  # source label
    bytes: int  # bytes on one rank
    kld: float  # predicted KL divergence increase over the 16-bit model (the unit moved alone)
    moved: bool = True  # False for the 16-bit source: the unit stays as in the baseline


@dataclass
class Unit:
    name: str  # model.layers.3.self_attn, model.layers.3.mlp, model.layers.3.mlp.experts
    kind: str  # "attention", "dense_mlp", "shared_expert", "routed_expert"
    layer: int
    choices: list[Choice]


@dataclass
class Solution:
    picks: dict[str, Choice]  # unit name -> choice
    bytes: int  # the units' bytes on one rank (fixed bytes not included)
    kld: float  # predicted KLD of the mix: the sum, corrected for interaction (see interaction_factor)
    additive: float = 0.0  # the plain sum of the units' KLDs
    moved: int = 0  # units not from the 16-bit source


def interaction_factor(moved: int, units: int, beta: float) -> float:
    """KLDs of units add to first order; measured, the uniform mixes come out lower than the sum of
    their units by a share ``beta`` (errors of different layers partly cancel). One coefficient per
    pair of moved units: the sum is scaled by 1 - beta * (m - 1) / (N - 1) for m of N units moved,
    exact for one unit alone (1) and for all of them (the uniform mixes, 1 - beta)."""
    if moved <= 1 or units <= 1:
        return 1.0
    return 1.0 - beta * (moved - 1) / (units - 1)


def optimize(units: list[Unit], capacity: int, beta: float = 0.0) -> Solution | None:
    """The choice per unit with the least predicted KLD, ``interaction_factor(m) * sum``, whose
    summed bytes <= ``capacity``; None if none fits.

    Exact: a state is a partial solution's (moved units, bytes, summed KLD); after each unit only
    the Pareto frontier of (bytes, KLD) per count of moved units is kept (a state heavier and no
    better than another with the same count can never lead to a better mix, since both get the same
    factor at the end), and states that cannot fit the remaining units' lightest choices are dropped.
    """
    # entries: (moved, bytes, kld, index of the parent state in the previous list, choice index)
    steps: list[list[tuple[int, int, float, int, int]]] = []
    states: list[tuple[int, int, float, int, int]] = [(0, 0, 0.0, -1, -1)]
    lightest = [0] * (len(units) + 1)
    for i in range(len(units) - 1, -1, -1):
        lightest[i] = lightest[i + 1] + min(c.bytes for c in units[i].choices)
    count_matters = beta > 0
    for i, unit in enumerate(units):
        room = capacity - lightest[i + 1]
        candidates = [
            ((m + c.moved) if count_matters else 0, b + c.bytes, k + c.kld, parent, ci)
            for parent, (m, b, k, _, _) in enumerate(states)
            for ci, c in enumerate(unit.choices)
            if b + c.bytes <= room
        ]
        if not candidates:
            return None
        candidates.sort(key=lambda s: (s[0], s[1], s[2]))
        kept, best, count = [], math.inf, -1
        for state in candidates:
            if state[0] != count:
                count, best = state[0], math.inf
            if state[2] < best:
                kept.append(state)
                best = state[2]
        steps.append(kept)
        states = kept
    if not units:
        return Solution({}, 0, 0.0)
    n = len(units)

    def predicted(state) -> float:
        moved = state[0] if count_matters else 0
        return interaction_factor(moved, n, beta) * state[2]

    index = min(range(len(states)), key=lambda j: (predicted(states[j]), states[j][1]))
    end = states[index]
    picks: dict[str, Choice] = {}
    for unit, kept in zip(reversed(units), reversed(steps)):
        _, _, _, parent, ci = kept[index]
        picks[unit.name] = unit.choices[ci]
        index = parent
    moved = sum(c.moved for c in picks.values())
    return Solution({u.name: picks[u.name] for u in units}, end[1], predicted(end), end[2], moved)


def fitted_interaction(units: dict[str, dict[str, float]], uniform: dict[str, float]) -> float:
    """beta of :func:`interaction_factor` from the sensitivity table: 1 - (the uniform mixes' KLDs)
    / (the sums of their units' KLDs), pooled over the sources; 0 when not measured, at most 0.9."""
    summed = sum(by[label] for by in units.values() for label in uniform if label in by)
    if not uniform or summed <= 0:
        return 0.0
    return min(0.9, max(0.0, 1.0 - sum(uniform.values()) / summed))


def smallest_bytes(units: list[Unit]) -> int:
    """The least bytes any assignment needs: the lightest choice of every unit."""
    return sum(min(c.bytes for c in u.choices) for u in units)


# ---- units and choices from the sources -----------------------------------------------------------
def unit_name(ref) -> str:
    """The unit a module moves with: its attention / MLP / shared expert block, or its layer's experts."""
    if ref.role is Role.ROUTED_EXPERT:
        return ref.group
    return ref.group.rsplit(".", 1)[0]


@dataclass
class Inventory:
    """What the optimizer needs from the sources: units with their bytes per choice, fixed bytes."""

    units: list[Unit]
    fixed_bytes: int  # per rank: embeddings, norms, routers, lm_head (16-bit)
    baseline_label: str
    tp_size: int
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why it offers no choice at all
    excluded: dict[str, list[str]] = field(default_factory=dict)  # label -> units it cannot run at this TP

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)


def source_plan(config: MixedConfig, label: str) -> Plan:
    """Every quantizable linear from ``label``, the rest as usual (validated at tp 1: TP rules are
    checked per unit by :func:`inventory`)."""
    return build_plan(replace(config, default=label, default_origin="autoplan", rules=[], weight_mapping={}), 1)


def inventory(config: MixedConfig, tp_size: int, kld: dict[str, dict[str, float]] | None = None) -> Inventory:
    """Units and choices of ``config``'s sources at ``tp_size``; ``kld[unit][label]`` the predicted
    increase of each non-16-bit choice (choices without one are left out, the 16-bit one costs 0)."""
    baseline = build_plan(replace(config, default=None, rules=[], weight_mapping={}), tp_size)
    geometry = baseline.geometry
    fixed = 0.0
    unit_meta: dict[str, tuple[str, int]] = {}
    for a in baseline.modules.values():
        if a.ref.role in UNIT_ROLES:
            unit_meta.setdefault(unit_name(a.ref), (a.ref.role.value, a.ref.layer))
        else:
            fixed += a.nbytes * geometry.rank_fraction(a.ref, tp_size)
    choices: dict[str, list[Choice]] = defaultdict(list)
    skipped: dict[str, str] = {}
    excluded: dict[str, list[str]] = defaultdict(list)
    for label in config.sources:
        try:
            plan = baseline if label == baseline.skeleton_label else source_plan(config, label)
        except MixedPrecisionError as e:
            skipped[label] = str(e).splitlines()[0]
            continue
        per_unit: dict[str, float] = defaultdict(float)
        runnable: dict[str, bool] = defaultdict(lambda: True)
        for prefix, group in plan.groups.items():
            if group.role not in UNIT_ROLES:
                continue
            leaf = prefix.rsplit(".", 1)[-1]
            if group.scheme.quantized and _rank_problems(geometry, group.role, leaf, group.scheme, tp_size):
                runnable[unit_name(plan.modules[group.members[0]].ref)] = False
        for a in plan.modules.values():
            if a.ref.role in UNIT_ROLES:
                per_unit[unit_name(a.ref)] += a.nbytes * geometry.rank_fraction(a.ref, tp_size)
        is_baseline = label == baseline.skeleton_label
        for name, nbytes in per_unit.items():
            if not runnable[name]:
                excluded[label].append(name)
                continue
            if is_baseline:
                choices[name].append(Choice(label, int(math.ceil(nbytes)), 0.0, moved=False))
                continue
            if kld is not None and label in kld.get(name, {}):
                cost = max(0.0, float(kld[name][label]))  # a measured decrease is noise: never a gain
            elif kld is None:
                cost = 0.0
            else:
                continue
            choices[name].append(Choice(label, int(math.ceil(nbytes)), cost))
    units = [
        Unit(name, kind, layer, sorted(choices[name], key=lambda c: (c.bytes, c.label)))
        for name, (kind, layer) in sorted(unit_meta.items(), key=lambda kv: (kv[1][1], kv[0]))
    ]
    return Inventory(units, int(math.ceil(fixed)), baseline.skeleton_label, tp_size, skipped, dict(excluded))


# ---- the budget ---------------------------------------------------------------------------------
@dataclass
class AutoPlan:
    solution: Solution
    inventory: Inventory
    budget_bytes: int
    kv_reserve_bytes: int

    @property
    def rank_bytes(self) -> int:
        """Weights on one rank (the units chosen plus the fixed 16-bit tensors)."""
        return self.solution.bytes + self.inventory.fixed_bytes

    def by_label(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for name, choice in self.solution.picks.items():
            out[choice.label].append(name)
        return dict(out)


def choose(inv: Inventory, budget_bytes: int, kv_reserve_bytes: int = 0, beta: float = 0.0) -> AutoPlan:
    """The best mix within ``budget_bytes`` per rank (weights + KV reserve); a named error with the
    smallest budget that fits when nothing does. ``beta``: see :func:`interaction_factor`."""
    capacity = budget_bytes - kv_reserve_bytes - inv.fixed_bytes
    solution = optimize(inv.units, capacity, beta) if capacity >= 0 else None
    if solution is None:
        need = inv.fixed_bytes + kv_reserve_bytes + smallest_bytes(inv.units)
        raise MixedPrecisionError(
            ErrorCode.AUTOPLAN_BUDGET_TOO_SMALL,
            f"no mix fits {budget_bytes / GIB:.3f} GiB per rank at tp_size {inv.tp_size}: the lightest one "
            f"needs {need / GIB:.3f} GiB ({inv.fixed_bytes / GIB:.3f} GiB of 16-bit embeddings, norms and lm_head, "
            f"{kv_reserve_bytes / GIB:.3f} GiB of KV reserve, {smallest_bytes(inv.units) / GIB:.3f} GiB for the "
            "lightest source of every unit)",
            where="--budget-gib",
            fix=f"pass --budget-gib {math.ceil(need / GIB * 1000) / 1000:.3f} or more, a larger --tp-size, "
            "a smaller --kv-cache-gib, or add a lower-precision source",
        )
    return AutoPlan(solution, inv, budget_bytes, kv_reserve_bytes)


# ---- compact YAML rules -----------------------------------------------------------------------------
def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> "0-3,7,9-10"."""
    spans: list[list[int]] = []
    for n in sorted(set(layers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


def compact_rules(picks: dict[str, Choice], baseline_label: str) -> list[tuple[str, str]]:
    """(glob, label) rules giving every unit its choice: one rule per unit template and source, the
    layers as a number range; units left to the 16-bit default need none."""
    by_template: dict[tuple[str, str], list[int]] = defaultdict(list)
    for name, choice in picks.items():
        if choice.label == baseline_label:
            continue
        layer = _LAYER_IN_NAME.search(name)
        if layer is None:
            by_template[(name + ".*", choice.label)].append(-1)
            continue
        template = name[: layer.start()] + "{}" + name[layer.end() :] + ".*"
        by_template[(template, choice.label)].append(int(layer.group(1)))
    rules = []
    for (template, label), layers in sorted(by_template.items()):
        if layers == [-1]:
            rules.append((template, label))
        else:
            rules.append((template.format(f"[{layer_ranges(layers)}]"), label))
    return rules


def mix_yaml(config: MixedConfig, picks: dict[str, Choice], baseline_label: str, header: str = "") -> str:
    """The mixed-precision YAML of ``picks``: the config's sources (absolute paths), the 16-bit
    default, compact rules."""
    lines = [f"# {line}" for line in header.splitlines()] + ["mixed_precision:"]
    free = {}
    for label, spec in config.sources.items():
        if spec.key and spec.key.endswith("_path") and "." not in spec.key:
            lines.append(f"  {spec.key}: {_quote(_absolute(config, spec.path))}")
        else:
            free[label] = spec
    if free:
        lines.append("  sources:")
        lines += [f"    {label}: {_quote(_absolute(config, spec.path))}" for label, spec in free.items()]
    lines.append(f"  default: {baseline_label}")
    rules = compact_rules(picks, baseline_label)
    if rules:
        lines.append("  rules:")
        lines += [f'    - {{match: "{glob}", source: {label}}}' for glob, label in rules]
    return "\n".join(lines) + "\n"


def _absolute(config: MixedConfig, path) -> str:
    """A source path as the config resolves it (relative to the YAML's directory)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and config.path is not None:
        p = Path(config.path).parent / p
    return str(p.absolute())


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def assigned_labels(plan: Plan) -> dict[str, str]:
    """unit name -> the source label a plan gives it (the units' members must agree)."""
    out: dict[str, set[str]] = defaultdict(set)
    for a in plan.modules.values():
        if a.ref.role in UNIT_ROLES:
            out[unit_name(a.ref)].add(a.label)
    return {name: "+".join(sorted(labels)) for name, labels in out.items()}


def unmeasured(inv_all: Inventory, kld: dict[str, dict[str, float]]) -> list[str]:
    """ "unit <- label" for every runnable non-16-bit choice the table has no measurement of."""
    return [
        f"{u.name} <- {c.label}"
        for u in inv_all.units
        for c in u.choices
        if c.label != inv_all.baseline_label and c.label not in kld.get(u.name, {})
    ]


def describe_units(units: list[Unit], limit: int = 5) -> str:
    return more([u.name for u in units], limit=limit)
