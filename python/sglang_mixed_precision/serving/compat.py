"""The SGLang releases this package supports, and the few places where they differ.

Supported: SGLang 0.5.17 through 0.5.23. What differs between them is decided here from what the
installed SGLang offers (a function's parameters), not from its version number, so that a release
that backports a change keeps working. Known differences:

* 0.5.21: ``initialize_model_parallel`` takes no sizes any more; it reads the widths from the parallel
  context that ``runtime_context.publish(server_args, ranks=SpawnRanks(...))`` installs.
  ``initialize_dp_attention`` takes only the server args; sizing the gathered buffer from the model
  became ``init_dp_gathered_buffer(model_config)``.
* 0.5.21: ``init_model_parallel_group``'s ``use_mscclpp_allreduce`` became ``use_mscclpp``.
* 0.5.21: ``TpModelWorker.update_weights_from_disk`` is gone (the scheduler calls each model runner's
  weight updater directly). The reload hook targets ``WeightUpdater.update_weights_from_disk``, which
  every supported release calls for a disk update (:mod:`.hooks`).
* 0.5.20: the ``--cuda-graph-max-bs`` alias is gone; ``--cuda-graph-max-bs-decode`` works in all.

:func:`resolve` finds a dotted target the way SGLang's ``HookRegistry`` does and raises
``sglang_incompatible`` naming the target, the installed version and the supported range. SGLang's
registry itself only logs "Failed to apply hooks" for a target it cannot find.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ErrorCode, MixedPrecisionError

MIN_SGLANG = "0.5.17"
MAX_SGLANG = "0.5.23"  # the newest release the CPU suite passed with (README_MIXED_PRECISION.md, Compatibility)
SUPPORTED_RANGE = f"{MIN_SGLANG} to {MAX_SGLANG}"
CUDA_GRAPH_MAX_BS_FLAG = "--cuda-graph-max-bs-decode"  # accepted by every supported release


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:  # a source checkout on sys.path
        import sglang

        return getattr(sglang, "__version__", "unknown")


def _release(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        numbers.append(int(digits))
    return tuple(numbers)


def is_supported(version: str) -> bool:
    return _release(MIN_SGLANG) <= _release(version) <= _release(MAX_SGLANG)


def incompatible(target: str, problem: str) -> MixedPrecisionError:
    version = installed_version()
    return MixedPrecisionError(
        ErrorCode.SGLANG_INCOMPATIBLE,
        f"SGLang {version}: {target} {problem}; the plugin supports SGLang {SUPPORTED_RANGE}",
        where=target,
        fix=f"install a supported SGLang (pip install 'sglang>={MIN_SGLANG},<={MAX_SGLANG}'), "
        "or report the missing target for this release",
    )


def resolve(target: str):
    """The object at a dotted path ("package.module.Class.method"), as SGLang's HookRegistry finds it.

    A module SGLang cannot import here because a package it needs is missing (the CPU environment has
    no ``uvloop`` or ``setproctitle``: its scheduler and tokenizer processes cannot run, the model code
    can) is read instead: the target must be defined in its source (or a base class's), and a
    :class:`SourceFunction` carrying its parameters stands for it.
    """
    module_name, attrs = _split_module(target)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "sglang":
            raise incompatible(target, f"cannot be found (no module {e.name})") from None
        return _from_source(target, module_name, attrs)
    for i, attr in enumerate(attrs):
        if not hasattr(obj, attr):
            owner = ".".join([module_name, *attrs[:i]])
            raise incompatible(target, f"does not exist ({owner} has no {attr!r})")
        obj = getattr(obj, attr)
    return obj


def _split_module(target: str) -> tuple[str, list[str]]:
    """(the longest importable module path of ``target``, the attribute names after it)."""
    parts = target.split(".")
    module = parts[0]
    for i in range(1, len(parts)):
        candidate = ".".join(parts[: i + 1])
        try:
            spec = importlib.util.find_spec(candidate)
        except (ImportError, ValueError):  # the parent is a module, not a package
            spec = None
        if spec is None:
            return module, parts[i:]
        module = candidate
        if spec.submodule_search_locations is None:  # a module: what follows are attributes
            return module, parts[i + 1 :]
    return module, []


@dataclass(frozen=True)
class SourceFunction:
    """A function found in SGLang's source without importing its module."""

    target: str
    file: str
    parameters: tuple[str, ...]


def _from_source(target: str, module_name: str, attrs: list[str]) -> SourceFunction:
    found = _find_in_source(module_name, attrs, set())
    if found is None:
        raise incompatible(target, f"does not exist (not defined in {module_name} or its base classes)")
    node, file = found
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return SourceFunction(target, file, ())
    args = node.args
    return SourceFunction(target, file, tuple(a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)))


def _find_in_source(module_name: str, attrs: list[str], seen: set) -> tuple[ast.AST, str] | None:
    if (module_name, tuple(attrs)) in seen or not attrs:
        return None
    seen.add((module_name, tuple(attrs)))
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    node = _defined_in(tree.body, attrs[0])
    if node is None:
        return None
    if len(attrs) == 1:
        return node, spec.origin
    if not isinstance(node, ast.ClassDef):
        return None
    member = _defined_in(node.body, attrs[1])
    if member is not None:
        return (member, spec.origin) if len(attrs) == 2 else None
    for base in node.bases:  # inherited: look in the base class where the module imports it from
        if isinstance(base, ast.Name):
            origin = _imported_from(tree, base.id) or module_name
            found = _find_in_source(origin, [base.id, *attrs[1:]], seen)
            if found is not None:
                return found
    return None


def _defined_in(body: list[ast.stmt], name: str) -> ast.AST | None:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
    return None


def _imported_from(tree: ast.Module, name: str) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if any((alias.asname or alias.name) == name and alias.name == name for alias in node.names):
                return node.module
    return None


# SGLang's plugin loader logs what a plugin's register() raises and carries on; the model build then
# raises it again (MixedPrecisionConfig.from_config), so that the server stops with the named error.
_INCOMPATIBILITY: list[MixedPrecisionError] = []


def remember_incompatibility(error: MixedPrecisionError) -> None:
    _INCOMPATIBILITY[:] = [error]


def raise_if_incompatible() -> None:
    if _INCOMPATIBILITY:
        raise _INCOMPATIBILITY[0]


def check_parameters(target: str, function, leading: Sequence[str]) -> None:
    """``function`` takes ``leading`` as its first parameters (by name, in order)."""
    if isinstance(function, SourceFunction):
        names = list(function.parameters)
    else:
        try:
            names = list(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            raise incompatible(target, "is not a function") from None
    if names[: len(leading)] != list(leading):
        raise incompatible(target, f"takes ({', '.join(names)}), the plugin calls it with ({', '.join(leading)}, ...)")


# ---- parallel state (the CPU test harness sets up SGLang's groups as a scheduler does) -------------------
def _takes(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


def model_parallel_from_published_context() -> bool:
    """0.5.21 and later: ``initialize_model_parallel`` reads its widths from the published context."""
    from sglang.srt.distributed import initialize_model_parallel

    return not _takes(initialize_model_parallel, "tensor_model_parallel_size")


def init_model_parallel(server_args, world_rank: int) -> None:
    """SGLang's model-parallel groups for ``server_args.tp_size`` ranks (TP only), this process at ``world_rank``.

    ``init_distributed_environment`` must have run. Newer releases publish the server args first (the
    widths and this process's rank come from them); older ones take the size as an argument.
    """
    from sglang.srt.distributed import initialize_model_parallel

    if model_parallel_from_published_context():
        from sglang.srt.runtime_context import SpawnRanks, publish

        publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=world_rank))
        initialize_model_parallel()
    else:
        initialize_model_parallel(tensor_model_parallel_size=server_args.tp_size)


def publish_server_args(server_args, world_rank: int) -> None:
    """Make ``server_args`` the process's published config (keeping this process's rank where it counts)."""
    from sglang.srt.runtime_context import publish

    if model_parallel_from_published_context():
        from sglang.srt.runtime_context import SpawnRanks

        publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=world_rank))
    else:
        publish(server_args, role="scheduler")


def init_dp_attention(server_args, model_config) -> None:
    """SGLang's DP-attention state (required to build models such as Qwen3-MoE)."""
    from sglang.srt.layers import dp_attention

    if _takes(dp_attention.initialize_dp_attention, "model_config"):
        dp_attention.initialize_dp_attention(server_args, model_config)
    else:
        dp_attention.initialize_dp_attention(server_args)
        dp_attention.init_dp_gathered_buffer(model_config)


def cpu_group_options() -> dict:
    """``init_model_parallel_group`` options that keep a group on plain gloo (no NCCL, no custom all-reduce)."""
    from sglang.srt.distributed.parallel_state import init_model_parallel_group

    mscclpp = "use_mscclpp" if _takes(init_model_parallel_group, "use_mscclpp") else "use_mscclpp_allreduce"
    return {
        "use_pynccl": False,
        "use_custom_allreduce": False,
        mscclpp: False,
        "use_torch_symm_mem_allreduce": False,
    }
