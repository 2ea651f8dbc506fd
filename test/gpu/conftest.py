"""The GPU tests' session: the `gpu` marker's skip without CUDA, the options, the results record and
the SGLang servers every selected test asks for (test/gpu/README.md).

A test marked ``servers(name, ...)`` queries those servers; the ``fleet`` fixture starts all of them
up front, side by side, once the models are prepared, and stops them at the end of the session.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

import gpu_harness as h
from gpu_results import Recorder, describe_machine

RESULTS_ENV, WORKDIR_ENV = "SGLANG_MP_GPU_RESULTS", "SGLANG_MP_GPU_WORKDIR"
SERVERS = pytest.StashKey[list]()
RECORDER = pytest.StashKey[Recorder]()
MEASUREMENTS = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("gpu", "GPU tests (test/gpu; options read when test/gpu is on the command line)")
    group.addoption(
        "--gpu-results",
        metavar="DIR",
        default=os.environ.get(RESULTS_ENV),
        help=f"write results.json, results.md and the server logs here (or ${RESULTS_ENV}; default: pytest's temp dir)",
    )
    group.addoption(
        "--gpu-workdir",
        metavar="DIR",
        default=os.environ.get(WORKDIR_ENV),
        help=f"tiny models and conversions, reused when present (or ${WORKDIR_ENV}; default: pytest's temp dir)",
    )
    group.addoption(
        "--gpu-parallel", type=int, default=6, help="servers starting at once (a start is mostly CPU work; default 6)"
    )
    group.addoption(
        "--gpu-start-timeout", type=float, default=600.0, help="seconds a server may take to start (default 600)"
    )


def no_gpu_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: the gpu tests run on the GPU machine (test/gpu/README.md)"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = no_gpu_reason() if gpu_items else None
    for item in gpu_items if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_finish(session):
    """The servers the selected gpu tests ask for, in test order; the record when any will run."""
    gpu_items = [item for item in session.items if item.get_closest_marker("gpu")]
    names: list[str] = []
    if not gpu_items or no_gpu_reason():
        session.config.stash[SERVERS] = names
        return
    for item in gpu_items:
        for mark in item.iter_markers("servers"):
            names += [n for n in mark.args if n not in names]
    session.config.stash[SERVERS] = names
    session.config.stash[RECORDER] = Recorder(results_dir(session.config), describe_machine())


def results_dir(config) -> Path:
    given = config.getoption("gpu_results", default=None)
    return Path(given).resolve() if given else Path(tempfile.mkdtemp(prefix="sglang-mp-gpu-results-"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    measurements = item.stash.get(MEASUREMENTS, {})
    if call.when == "call":  # before the report is made: junit.xml gets them as properties
        item.user_properties += [(k, v) for k, v in measurements.items()]
    outcome = yield
    report = outcome.get_result()
    recorder = item.config.stash.get(RECORDER, None)
    if recorder is None or item.get_closest_marker("gpu") is None:
        return
    if report.when == "call" or not report.passed:
        state = "error" if report.failed and report.when != "call" else report.outcome
        message = None if report.passed else report.longreprtext
        recorder.add(item.nodeid, state, report.duration, dict(measurements), message)


def pytest_sessionfinish(session):
    recorder = session.config.stash.get(RECORDER, None)
    if recorder is not None:
        recorder.save()
        recorder.pack_logs(recorder.directory / "logs")


def pytest_terminal_summary(terminalreporter, config):
    recorder = config.stash.get(RECORDER, None)
    if recorder is not None:
        terminalreporter.write_line(f"gpu results: {recorder.directory / 'results.md'} (and results.json, logs/)")


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture
def record(request) -> dict:
    """A dict the test fills with what it measured: results.json / results.md, junit.xml properties."""
    values: dict = {}
    request.node.stash[MEASUREMENTS] = values
    return values


@pytest.fixture(scope="session")
def recorder(request) -> Recorder:
    return request.config.stash[RECORDER]


@pytest.fixture(scope="session")
def progress(request):
    """Progress lines on the terminal while output is captured (servers take minutes to start)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def log(message: str) -> None:
        line = f"[gpu {time.strftime('%H:%M:%S')}] {message}"
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, flush=True)

    return log


@pytest.fixture(scope="session")
def workdir(request, tmp_path_factory) -> Path:
    given = request.config.getoption("gpu_workdir", default=None)
    return Path(given).resolve() if given else tmp_path_factory.mktemp("gpu-work")


@pytest.fixture(scope="session")
def serve_work(request, workdir, progress) -> h.ServeWork:
    """The models of the selected servers' architectures (all when no server is selected: the CPU checks)."""
    archs = h.archs_of(request.config.stash.get(SERVERS, []))
    return h.prepare_serve(workdir / "serve", log=progress, archs=archs)


@pytest.fixture(scope="session")
def reload_work(workdir, progress) -> h.ReloadWork:
    return h.prepare_reload(workdir / "reload", log=progress)


@pytest.fixture(scope="session")
def ports() -> h.Ports:
    return h.Ports()


@pytest.fixture(scope="session")
def fleet(request, recorder, ports, progress):
    """Every server the selected tests ask for, started side by side; all stopped at the end."""
    from sglang_mixed_precision.serving.launcher import check_plugin_installed

    check_plugin_installed()  # stock launch_server on a plan directory needs the entry point too
    names = request.config.stash.get(SERVERS, [])
    serve = request.getfixturevalue("serve_work") if any(n != h.RELOAD_SERVER for n in names) else None
    reload = request.getfixturevalue("reload_work") if h.RELOAD_SERVER in names else None
    specs = h.server_specs(names, serve, reload)
    progress(f"starting {len(specs)} server(s), {request.config.getoption('gpu_parallel')} at a time")
    fleet = h.fleet_from_options(specs, request, recorder, ports, progress)
    recorder.servers = fleet.summary
    with fleet:
        yield fleet
