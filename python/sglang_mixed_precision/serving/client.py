"""Start an SGLang server process, wait for it and talk to its HTTP API (stdlib only).

Used by ``sglang-mp demo``, the launcher, the GPU tests (test/gpu) and the benchmarks in bench/;
imports no SGLang, except :func:`sglang_argv_problem`, which asks SGLang's own argument parser.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], log_path: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run ``cmd`` in its own process group, output to ``log_path``; ``env`` is added to this process's."""
    log = open(log_path, "w")
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
    )


def stop_server(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM the server's process group (SGLang's workers included), SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


def log_tail(log_path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_ready(
    base_url: str,
    proc: subprocess.Popen,
    timeout: float,
    log_path: str | Path | None = None,
    progress=print,
    every: float = 30.0,
) -> float:
    """Poll ``/health_generate`` until it answers 200; returns the seconds waited.

    Raises ``RuntimeError`` (with the log's tail) if the process exits or ``timeout`` passes.
    """
    start = last = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {proc.returncode}:\n{log_tail(log_path) if log_path else ''}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/health_generate", timeout=10) as r:
                if r.status == 200:
                    return time.time() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        now = time.time()
        if now - start > timeout:
            raise RuntimeError(
                f"the server was not ready after {timeout:.0f}s:\n{log_tail(log_path) if log_path else ''}"
            )
        if now - last >= every:
            progress(f"  ... waiting for the server ({now - start:.0f}s)")
            last = now
        time.sleep(1.0)


def parse_server_log(text: str) -> dict:
    """SGLang's weight-load line (every rank: the slowest and largest kept) and the mixed loader's
    audit line (method classes per layer) and parameter-memory line (bytes held vs the plan's)."""
    out = {}
    loads = re.findall(r"Load weight end\. elapsed=([\d.]+) s.*?mem usage=([\d.]+) GB", text)
    if loads:
        out["weight_load_s"] = max(float(s) for s, _ in loads)
        out["weight_mem_gib"] = max(float(m) for _, m in loads)  # SGLang's "GB" is GiB (bytes / 2**30)
    memory = re.findall(r"mixed_precision: weight memory (\d+) bytes in parameters; plan (\d+) bytes", text)
    if memory:
        out["param_bytes"] = max(int(p) for p, _ in memory)
        out["logged_plan_bytes"] = max(int(q) for _, q in memory)
    audit = re.findall(r"mixed_precision audit: .*", text)
    if audit:
        out["layers"] = audit[-1].split("layers: ", 1)[-1]
    return out


_DECODE_LINE = re.compile(
    r"^\[(?P<time>[\d-]+ [\d:]+)\] Decode batch, #running-req: (?P<running>\d+),.*?"
    r"gen throughput \(token/s\): (?P<tok_s>[\d.]+)",
    re.MULTILINE,
)
_PREFILL_LINE = re.compile(r"^\[[\d-]+ [\d:]+\] Prefill batch, #new-seq: (\d+), #new-token: (\d+)", re.MULTILINE)


def decode_runs(text: str) -> list[dict]:
    """SGLang's own decode throughput, from its "Decode batch ... gen throughput (token/s): X" lines
    (one every --decode-log-interval decode steps), grouped into runs: consecutive lines at one
    #running-req. Each run: ``running`` (the batch), ``tok_s`` (every line's value but the first, whose
    interval spans the idle time and prefill before the batch started) and ``after_prefill`` ((seqs,
    tokens) of the last prefill before the run, None if none)."""
    events = sorted(
        [(m.start(), "decode", m) for m in _DECODE_LINE.finditer(text)]
        + [(m.start(), "prefill", m) for m in _PREFILL_LINE.finditer(text)],
        key=lambda e: e[0],
    )
    runs: list[dict] = []
    prefill, current = None, None
    for _, kind, m in events:
        if kind == "prefill":
            prefill, current = (int(m.group(1)), int(m.group(2))), None
            continue
        running = int(m.group("running"))
        if current is None or current["running"] != running:
            current = {"running": running, "after_prefill": prefill, "tok_s": [], "first_tok_s": float(m["tok_s"])}
            runs.append(current)
        else:
            current["tok_s"].append(float(m.group("tok_s")))
    return runs


def weight_load_window(text: str) -> tuple[str, str] | None:
    """The timestamps (as logged, 1 s resolution) of SGLang's "Load weight begin" and "Load weight end"
    lines: which servers loaded at the same time."""
    begin = re.search(r"^\[([\d-]+ [\d:]+)\] Load weight begin", text, re.MULTILINE)
    end = re.search(r"^\[([\d-]+ [\d:]+)\] Load weight end", text, re.MULTILINE)
    return (begin.group(1), end.group(1)) if begin and end else None


def post_json(url: str, payload: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None


def get_json(url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def request(url: str, payload: dict | None = None, timeout: float = 120.0) -> tuple[int, object]:
    """(HTTP status, body) of a GET, or of a POST of ``payload`` as JSON.

    Error statuses are returned, not raised: callers that check a refusal (400, 409) need them.
    The body is parsed when the server says it is JSON, else returned as text.
    """
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, kind, raw = r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        status, kind, raw = e.code, e.headers.get_content_type(), e.read()
    text = raw.decode(errors="replace")
    return status, json.loads(text) if kind == "application/json" else text


def sglang_argv_problem(argv: list[str]) -> str | None:
    """Why SGLang's server argument parser rejects ``argv`` (the arguments after
    ``-m sglang.launch_server``); None when it accepts them. Checks flags without starting anything."""
    import argparse
    import contextlib
    import io

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang.launch_server", exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        printed = errors.getvalue().strip().splitlines()  # argparse prints the usage, then the error
        return printed[-1] if printed else str(e)
    return None
