"""Runtime reload, planning side: what changes between the running plan and a new config.

A reload request names a new mixed-precision YAML (inline or by path). Before any worker is asked
to touch a weight, the new config is planned against the running model and compared with the
active plan, SGLang layer by SGLang layer (``qkv_proj``, ``gate_up_proj``, ``experts``, ...):

* ``nothing`` -- every member's tensors come from the same files and byte ranges as now;
* ``reload``  -- same scheme, other source: the layer's parameters keep their shapes and kernel,
  so the new tensors are copied into them in place while the server keeps serving;
* ``rebuild`` -- the layer needs new parameters (another scheme, e.g. fp8 -> int4) or its method
  rewrites its weights after loading (GPTQ-Marlin repack, fused-MoE layouts, fp8 per-channel /
  per-tensor scales), so a copy from the checkpoint would not match what the kernel reads. Such a
  reload is refused (HTTP 409) unless the caller asks for a managed restart.

The result, :class:`ReloadPlan`, lists exactly the checkpoint tensors each worker must read, with
the dtype and shape the new plan promises; it travels to the workers as JSON. This module imports
neither SGLang nor torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from math import prod
from pathlib import Path
from typing import Any

from .config import parse_config, read_config_text
from .errors import ErrorCode, MixedPrecisionError, more, raise_all
from .formats import DTYPE_BYTES
from .naming import Role
from .plan import ARCHITECTURE_KEYS, Plan, build_plan

NOTHING, RELOAD, REBUILD = "nothing", "reload", "rebuild"
ACTIONS = (NOTHING, RELOAD, REBUILD)
REQUEST_KEYS = ("config", "config_path", "restart", "dry_run")
INLINE_NAME = "(inline reload config).yaml"  # names an inline YAML in messages; anchors its relative paths
EXAMPLES = 8  # changed modules listed per layer before "and N more"


# ---- where a module's tensors come from ---------------------------------------------------------
def module_origin(assignment, real_path: Callable[[Path], str]) -> tuple:
    """What identifies a module's stored tensors: file, byte range, dtype and shape of each one.

    Two plans whose modules have equal origins load identical bytes, whatever the labels are called.
    ``real_path`` resolves a weight file (cached by the caller: a model has far fewer files than tensors).
    """
    return tuple(
        sorted(
            (suffix, real_path(info.file), tuple(info.data_offsets), info.dtype, tuple(info.shape))
            for suffix, info in assignment.tensors.items()
        )
    )


# ---- plan diff ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerChange:
    """What a reload does to one SGLang layer."""

    prefix: str
    action: str  # nothing | reload | rebuild
    reason: str
    old: str  # "label (scheme)" now serving
    new: str  # "label (scheme)" the new config asks for
    changed: tuple[str, ...] = ()  # member modules whose tensors come from elsewhere

    def to_json(self) -> dict:
        return {
            "layer": self.prefix,
            "action": self.action,
            "reason": self.reason,
            "old": self.old,
            "new": self.new,
            "changed_modules": list(self.changed),
        }


@dataclass
class PlanDiff:
    layers: dict[str, LayerChange]

    def of(self, action: str) -> list[LayerChange]:
        return [c for c in self.layers.values() if c.action == action]

    @property
    def reload(self) -> list[LayerChange]:
        return self.of(RELOAD)

    @property
    def rebuild(self) -> list[LayerChange]:
        return self.of(REBUILD)

    def counts(self) -> dict[str, int]:
        return {a: len(self.of(a)) for a in ACTIONS}

    def to_json(self, include_unchanged: bool = False) -> dict:
        return {
            "counts": self.counts(),
            "layers": [c.to_json() for c in self.layers.values() if include_unchanged or c.action != NOTHING],
        }


def _describe(group) -> str:
    return f"{group.label} ({group.scheme.label()})"


def same_model_problems(old: Plan, new: Plan) -> list[MixedPrecisionError]:
    """Why ``new`` cannot be loaded into the model built for ``old`` (empty if it can)."""
    problems = []
    if new.tp_size != old.tp_size:
        problems.append(
            MixedPrecisionError(
                ErrorCode.RELOAD_MODEL_MISMATCH,
                f"the new plan is for tp_size {new.tp_size}, the server runs tp_size {old.tp_size}",
                fix="plan the reload for the running tensor-parallel size",
            )
        )
    base, cfg = old.hf_config, new.hf_config
    diffs = [
        f"{k}: {cfg.get(k)!r} (new) vs {base.get(k)!r} (running)"
        for k in ARCHITECTURE_KEYS
        if cfg.get(k) != base.get(k)
    ]
    if diffs:
        problems.append(
            MixedPrecisionError(
                ErrorCode.RELOAD_MODEL_MISMATCH,
                "the new config describes another model than the one being served: " + "; ".join(diffs),
                where=str(new.skeleton_path / "config.json"),
                fix="point the new config's sources at checkpoints of the served model",
            )
        )
    missing = sorted(set(old.groups) - set(new.groups))
    extra = sorted(set(new.groups) - set(old.groups))
    if (missing or extra) and not diffs:
        shown = ", ".join((missing + extra)[:EXAMPLES])
        problems.append(
            MixedPrecisionError(
                ErrorCode.RELOAD_MODEL_MISMATCH,
                f"the new plan's layers differ from the running model's ({len(missing)} missing, {len(extra)} unknown): {shown}",
                where=str(new.skeleton_path),
                fix="use sources of the served model (same tensor names)",
            )
        )
    return problems


def diff_plans(old: Plan, new: Plan) -> PlanDiff:
    """Per SGLang layer: nothing, reload in place, or rebuild (with the reason)."""
    problems = same_model_problems(old, new)
    if problems:
        raise_all(problems)
    real_path = cache(lambda file: str(Path(file).resolve()))
    layers = {}
    for prefix, old_group in old.groups.items():
        new_group = new.groups[prefix]
        changed = tuple(
            m
            for m in new_group.members
            if m not in old.modules
            or module_origin(old.modules[m], real_path) != module_origin(new.modules[m], real_path)
        )
        old_d, new_d = _describe(old_group), _describe(new_group)
        if new_group.scheme != old_group.scheme:
            action, reason = (
                REBUILD,
                (
                    f"scheme changes {old_group.scheme.label()} -> {new_group.scheme.label()}: "
                    "the layer needs other parameters and another kernel"
                ),
            )
        elif not changed:
            action, reason = NOTHING, "same tensors (files and byte ranges) as now"
        else:
            scheme = new_group.scheme
            refusal = scheme.format.in_place_refusal(scheme, moe=new_group.role is Role.ROUTED_EXPERT)
            action, reason = (
                (REBUILD, refusal) if refusal else (RELOAD, f"same scheme, {len(changed)} module(s) from new tensors")
            )
        layers[prefix] = LayerChange(prefix, action, reason, old_d, new_d, changed)
    return PlanDiff(layers)


# ---- request validation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReloadRequest:
    config_text: str
    anchor: Path  # the YAML's path (inline: a name in the active config's directory): anchors relative paths
    inline: bool
    restart: bool = False
    dry_run: bool = False

    @property
    def sha256(self) -> str:
        return config_sha256(self.config_text)


def config_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _bad_request(message: str, fix: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.RELOAD_BAD_REQUEST, message, where="POST /mixed_precision/reload body", fix=fix
    )


def parse_reload_request(body: Any, *, base_dir: Path) -> ReloadRequest:
    """The JSON body of ``POST /mixed_precision/reload`` -> :class:`ReloadRequest`.

    ``{"config": "<yaml text>"}`` or ``{"config_path": "/path/cfg.yaml"}``, optionally with
    ``"restart": true`` (rebuild through a managed restart when needed) and ``"dry_run": true``
    (report the actions, change nothing). Relative paths resolve against ``base_dir`` (the active
    config's directory).
    """
    usage = 'send {"config": "<yaml>"} or {"config_path": "<file>"} (optional: "restart": true, "dry_run": true)'
    if not isinstance(body, dict):
        raise _bad_request(f"the body must be a JSON object, got {type(body).__name__}", usage)
    unknown = sorted(set(body) - set(REQUEST_KEYS))
    if unknown:
        raise _bad_request(
            f"unknown field(s) {', '.join(map(repr, unknown))}", f"known fields: {', '.join(REQUEST_KEYS)}"
        )
    for flag in ("restart", "dry_run"):
        if flag in body and not isinstance(body[flag], bool):
            raise _bad_request(f"{flag!r} must be true or false, got {body[flag]!r}", usage)
    has_text, has_path = body.get("config") is not None, body.get("config_path") is not None
    if has_text == has_path:
        raise _bad_request("give exactly one of 'config' (inline YAML) and 'config_path'", usage)
    flags = {"restart": body.get("restart", False), "dry_run": body.get("dry_run", False)}
    if has_text:
        text = body["config"]
        if not isinstance(text, str) or not text.strip():
            raise _bad_request("'config' must be the YAML text of a mixed-precision config", usage)
        return ReloadRequest(text, Path(base_dir) / INLINE_NAME, True, **flags)
    raw = body["config_path"]
    if not isinstance(raw, str) or not raw:
        raise _bad_request("'config_path' must be a path string", usage)
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    text = read_config_text(path, missing_fix="pass the path of a mixed-precision YAML readable by the server")
    return ReloadRequest(text, path, False, **flags)


def plan_of(text: str, anchor: Path, tp_size: int, skeleton: str | None = None) -> Plan:
    """Parse and plan a config text as if it were the file ``anchor`` (headers only)."""
    return build_plan(parse_config(text, anchor), tp_size=tp_size, skeleton=skeleton)


# ---- the reload plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorLoad:
    """One checkpoint tensor a worker must read for an in-place reload."""

    layer: str  # SGLang layer prefix it feeds
    name: str  # checkpoint tensor name, as the model's load_weights expects it
    file: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    label: str

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "name": self.name,
            "file": self.file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "label": self.label,
        }

    @classmethod
    def from_json(cls, d: dict) -> TensorLoad:
        return cls(d["layer"], d["name"], d["file"], d["dtype"], tuple(d["shape"]), d["label"])


@dataclass
class ReloadPlan:
    """Everything a reload decided before touching a worker."""

    diff: PlanDiff
    plan: Plan  # the new plan
    config_text: str
    anchor: Path
    loads: list[TensorLoad] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return config_sha256(self.config_text)

    @property
    def layers(self) -> list[str]:
        return [c.prefix for c in self.diff.reload]

    @property
    def bytes(self) -> int:
        return sum(DTYPE_BYTES[load.dtype] * prod(load.shape) for load in self.loads)

    def worker_request(self, skeleton: str | None = None) -> dict:
        """What each worker receives: the config to re-plan and the tensors it must end up reading."""
        return {
            "kind": "sglang_mixed_precision.reload",
            "config_text": self.config_text,
            "anchor": str(self.anchor),
            "sha256": self.sha256,
            "tp_size": self.plan.tp_size,
            "skeleton": skeleton,
            "layers": self.layers,
            "loads": [t.to_json() for t in self.loads],
        }


def reload_loads(diff: PlanDiff, new: Plan) -> list[TensorLoad]:
    """The tensors of every member of every layer to reload (whole layers: a fused parameter is
    rewritten shard by shard, so unchanged members of a changed layer are read again too)."""
    loads = []
    for change in diff.reload:
        for member in new.groups[change.prefix].members:
            assignment = new.modules[member]
            for info in assignment.tensors.values():
                loads.append(
                    TensorLoad(
                        change.prefix, info.name, str(info.file), info.dtype, tuple(info.shape), assignment.label
                    )
                )
    return loads


def plan_reload(active: Plan, request: ReloadRequest, skeleton: str | None = None) -> ReloadPlan:
    """Plan ``request`` against the running ``active`` plan; raises the plan's errors
    (``ValidationErrors`` / ``MixedPrecisionError``) when the new config is invalid for this model."""
    new = plan_of(request.config_text, request.anchor, active.tp_size, skeleton)
    diff = diff_plans(active, new)
    return ReloadPlan(diff, new, request.config_text, request.anchor, reload_loads(diff, new))


def rebuild_refusal(reload_plan: ReloadPlan) -> MixedPrecisionError:
    """The 409 answer: these layers need a rebuild (a managed restart), not an in-place reload."""
    layers = reload_plan.diff.rebuild
    shown = more([f"{c.prefix}: {c.reason}" for c in layers], limit=EXAMPLES, sep="; ")
    return MixedPrecisionError(
        ErrorCode.RELOAD_NEEDS_REBUILD,
        f"{len(layers)} layer(s) cannot be reloaded in place: {shown}",
        where=str(reload_plan.anchor),
        fix='send the request again with "restart": true (managed restart by launch_mixed_precision_server.py), '
        "or keep these layers' current sources",
    )


def check_worker_request(request: dict) -> None:
    """A worker's sanity check of what the main process sent (it may come from another version)."""
    required = ("kind", "config_text", "anchor", "sha256", "tp_size", "layers", "loads")
    missing = [k for k in required if k not in request]
    if missing or request.get("kind") != "sglang_mixed_precision.reload":
        raise MixedPrecisionError(
            ErrorCode.RELOAD_BAD_REQUEST,
            f"malformed reload request (missing {missing or 'kind'})",
            fix="send reloads through POST /mixed_precision/reload",
        )
    if config_sha256(request["config_text"]) != request["sha256"]:
        raise MixedPrecisionError(
            ErrorCode.RELOAD_BAD_REQUEST,
            "the reload request's config does not match its sha256",
            fix="send reloads through POST /mixed_precision/reload",
        )


def replan_in_worker(active: Plan, request: dict) -> ReloadPlan:
    """Re-plan the request where the weights live and check it agrees with what was validated.

    Sources are read again here (headers only): if files changed between validation and the reload,
    the layer lists differ and the reload is refused rather than loading something else.
    """
    check_worker_request(request)
    reload_plan = plan_reload(
        active, ReloadRequest(request["config_text"], Path(request["anchor"]), False), request.get("skeleton")
    )
    if reload_plan.diff.rebuild:
        raise rebuild_refusal(reload_plan)
    expected = [TensorLoad.from_json(d) for d in request["loads"]]
    if reload_plan.layers != list(request["layers"]) or reload_plan.loads != expected:
        raise MixedPrecisionError(
            ErrorCode.RELOAD_SOURCES_CHANGED,
            "the sources changed between validation and the reload "
            f"(validated {len(request['layers'])} layer(s), the worker now plans {len(reload_plan.layers)})",
            where=str(request["anchor"]),
            fix="send the reload again once the checkpoint files are in place",
        )
    return reload_plan
