"""The installed SGLang against what the plugin hooks and calls: every target resolves, a missing one is a
named error at registration (never only SGLang's log line), and the version differences compat.py handles."""

from __future__ import annotations

import logging

import pytest

from sglang_mixed_precision.core.errors import MixedPrecisionError
from sglang_mixed_precision.serving import compat, hooks

pytest.importorskip("sglang")


def test_every_hook_and_used_name_resolves_against_the_installed_sglang():
    found = hooks.resolve_targets()
    assert set(found) == {h.target for h in hooks.HOOKS} | set(hooks.USED_LATER)
    for hook in hooks.HOOKS:  # functions, or (modules this environment cannot import) found in the source
        target = found[hook.target]
        assert isinstance(target, compat.SourceFunction) or (callable(target) and not isinstance(target, type))
    assert compat.is_supported(compat.installed_version()), compat.installed_version()


@pytest.fixture
def clean_registry():
    from sglang.srt.plugins.hook_registry import HookRegistry

    saved = {k: list(v) for k, v in HookRegistry._hooks.items()}
    yield HookRegistry
    HookRegistry._hooks.clear()
    HookRegistry._hooks.update(saved)


@pytest.mark.parametrize(
    "target, says",
    [
        (
            "sglang.srt.model_loader.loader.no_such_function",
            "does not exist (sglang.srt.model_loader.loader has no 'no_such_function')",
        ),
        ("sglang.srt.no_such_module.function", "does not exist (sglang.srt has no 'no_such_module')"),
        (  # a module this environment cannot import: read from its source
            "sglang.srt.managers.scheduler.Scheduler.no_such_method",
            "does not exist (not defined in sglang.srt.managers.scheduler or its base classes)",
        ),
    ],
)
def test_a_missing_hook_target_stops_registration_with_a_named_error(monkeypatch, clean_registry, target, says):
    from sglang_mixed_precision.serving import plugin
    from sglang_mixed_precision.serving.quant_config import MixedPrecisionConfig

    missing = hooks.Hook(target, hooks.after_get_internal_state, "AFTER", ())
    monkeypatch.setattr(hooks, "HOOKS", (*hooks.HOOKS, missing))
    monkeypatch.setattr(compat, "_INCOMPATIBILITY", [])
    clean_registry._hooks.clear()
    with pytest.raises(MixedPrecisionError) as e:
        plugin.register()
    # SGLang's plugin loader only logs that: building a mixed model raises it again, so the server stops.
    with pytest.raises(MixedPrecisionError) as again:
        MixedPrecisionConfig.from_config({"quant_method": "mixed_precision", "config_path": "unused.yaml"})
    assert again.value is e.value
    version = compat.installed_version()
    assert e.value.code == "sglang_incompatible" and e.value.where == target
    assert e.value.detail.startswith(f"SGLang {version}: {target} {says}"), e.value.detail
    assert e.value.detail.endswith(f"the plugin supports SGLang {compat.SUPPORTED_RANGE}")
    assert f"sglang>={compat.MIN_SGLANG},<={compat.MAX_SGLANG}" in e.value.fix
    assert not clean_registry._hooks  # nothing registered: the error comes before any hook


def test_a_target_whose_parameters_changed_is_a_named_error(monkeypatch):
    changed = hooks.Hook(hooks.LOADER_TARGET, hooks.select_model_loader, "AROUND", ("model_config", "load_config"))
    monkeypatch.setattr(hooks, "HOOKS", (changed,))
    with pytest.raises(MixedPrecisionError) as e:
        hooks.resolve_targets()
    assert e.value.code == "sglang_incompatible"
    assert "takes (load_config, model_config), the plugin calls it with (model_config, load_config, ...)" in str(
        e.value
    )


def test_a_module_sglang_cannot_import_here_is_read_from_its_source(monkeypatch):
    """Without uvloop / setproctitle (the CPU environment) the scheduler and tokenizer modules do not
    import; their targets are then checked in SGLang's source, base classes included."""
    import importlib

    real = importlib.import_module

    def without_uvloop(name, *args):
        if name == "sglang.srt.managers.tokenizer_manager":
            raise ModuleNotFoundError("No module named 'uvloop'", name="uvloop")
        return real(name, *args)

    monkeypatch.setattr(compat.importlib, "import_module", without_uvloop)
    target = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
    found = compat.resolve(f"{target}.get_internal_state")  # defined in a mixin base class
    assert isinstance(found, compat.SourceFunction) and found.parameters == ("self",)
    assert found.file.endswith("tokenizer_control_mixin.py")
    compat.check_parameters(f"{target}.config_value", compat.resolve(f"{target}.config_value"), ("self", "name"))
    with pytest.raises(MixedPrecisionError) as e:
        compat.resolve(f"{target}.no_such_method")
    assert e.value.code == "sglang_incompatible" and "not defined in sglang.srt.managers.tokenizer_manager" in str(
        e.value
    )


def test_the_tp_worker_reload_target_of_older_releases_is_caught_where_it_is_gone():
    """The hook target 0.5.17's code allowed: gone since 0.5.21, where it is a start-up error."""
    target = "sglang.srt.managers.tp_worker.TpModelWorker.update_weights_from_disk"
    if compat._release(compat.installed_version()) < (0, 5, 21):
        compat.check_parameters(target, compat.resolve(target), ("self", "recv_req"))
    else:
        with pytest.raises(MixedPrecisionError) as e:
            compat.resolve(target)
        assert e.value.code == "sglang_incompatible" and "TpModelWorker.update_weights_from_disk does not exist" in str(
            e.value
        )


def test_supported_versions():
    assert compat.is_supported("0.5.17") and compat.is_supported("0.5.23") and compat.is_supported("0.5.20.post1")
    assert not compat.is_supported("0.5.16") and not compat.is_supported("0.5.24") and not compat.is_supported("0.6.0")


def test_an_untested_release_with_every_target_present_only_warns(monkeypatch, clean_registry, caplog):
    monkeypatch.setattr(compat, "installed_version", lambda: "0.6.0")
    with caplog.at_level(logging.WARNING, logger=hooks.__name__):
        hooks.register_hooks()
    assert "SGLang 0.6.0 is outside the tested range 0.5.17 to 0.5.23" in caplog.text
    assert all(h.function in [f for _, f, _ in clean_registry._hooks[h.target]] for h in hooks.HOOKS)


def test_cuda_graph_flag_is_accepted_by_sglang(tmp_path):
    from sglang_mixed_precision.serving.client import sglang_argv_problem

    argv = ["--model-path", str(tmp_path), compat.CUDA_GRAPH_MAX_BS_FLAG, "64"]
    assert sglang_argv_problem(argv) is None
    assert sglang_argv_problem(["--model-path", str(tmp_path), "--cuda-graph-max-batch", "64"]) is not None


def test_cpu_group_options_name_parameters_sglang_takes():
    import inspect

    from sglang.srt.distributed.parallel_state import init_model_parallel_group

    accepted = inspect.signature(init_model_parallel_group).parameters
    assert set(compat.cpu_group_options()) <= set(accepted)


def test_benchmark_server_flags_are_accepted_by_sglang(tmp_path):
    from sglang_mixed_precision.serving.client import sglang_argv_problem
    from test_gpu_bench_scripts import load

    bench = load("gpu_bench_mix")
    assert compat.CUDA_GRAPH_MAX_BS_FLAG in bench.SERVER_FLAGS
    assert sglang_argv_problem(["--model-path", str(tmp_path), *bench.SERVER_FLAGS]) is None
