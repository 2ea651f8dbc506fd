"""Teacher-forced scores of a mix from SGLang servers (the GPU backend).

One ``/generate`` request per model and text: ``input_ids`` the text, ``return_logprob`` with
``logprob_start_len`` 0, so SGLang returns for every input position the log-prob of the token that
is there (``input_token_logprobs``) and, as asked, the ``top_logprobs_num`` most likely tokens
(``input_top_logprobs``) or the log-probs of given token ids (``input_token_ids_logprobs``). Entry
``i`` of these lists is the distribution that predicts token ``i``; entry 0 has none. The baseline
is asked for its top-k; a mix for its log-probs at the union of the baseline's top-k ids (one list
for the whole request, as SGLang takes it) and its own top-1, from which the baseline's k per
position are picked.

Servers: :class:`ServerBackend` starts one server per mix through the launcher; a mix that differs
from a running server's plan only in layers that reload in place (same scheme, another source:
``core.reload_plan.diff_plans``) is loaded with ``POST /mixed_precision/reload`` instead of a new
server. The request building and response parsing are plain functions, tested on CPU with recorded
response shapes; starting servers needs a GPU.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ErrorCode, MixedPrecisionError
from .metrics import TokenScores

# Server settings for scoring: CUDA graphs off (prefill-only requests do not use them), no radix
# cache (every scoring prefills the whole text), a small KV cache (texts of a few hundred tokens) so
# that several servers fit side by side on one GPU.
SERVER_FLAGS = (
    "--attention-backend", "triton",
    "--sampling-backend", "pytorch",
    "--disable-cuda-graph",
    "--disable-radix-cache",
    "--skip-server-warmup",
    "--mem-fraction-static", "0.5",
    "--max-total-tokens", "8192",
    "--dtype", "bfloat16",
)  # fmt: skip
SERVER_ENV = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}  # the model's log-probs, not the sampler's


# ---- requests and responses ---------------------------------------------------------------------
def logprob_request(ids: list[int], *, top_k: int = 0, token_ids: list[int] | None = None) -> dict:
    """The /generate body scoring ``ids`` teacher-forced (one new token, greedy, ignored)."""
    body = {
        "input_ids": list(ids),
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": max(1, top_k),
    }
    if token_ids:
        body["token_ids_logprob"] = list(token_ids)
    return body


def _bad(message: str, where: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.QUALITY_BAD_RESPONSE,
        message,
        where=where,
        fix="use SGLang 0.5.17 (input log-probs with logprob_start_len 0); check the server log",
    )


def _entries(meta: dict, key: str, n: int, where: str) -> list:
    values = meta.get(key)
    if not isinstance(values, list) or len(values) != n:
        got = "missing" if values is None else f"{len(values)} entries" if isinstance(values, list) else type(values)
        raise _bad(f"meta_info.{key} should have one entry per input token ({n}), got {got}", where)
    return values


def _triples(entry, key: str, pos: int, where: str) -> list[tuple[float, int]]:
    """[[logprob, token_id, text?], ...] -> [(logprob, token_id)]."""
    if not isinstance(entry, list) or not entry:
        raise _bad(f"meta_info.{key}[{pos}] is {entry!r:.60}, expected a list of [logprob, token_id, text]", where)
    out = []
    for item in entry:
        if not isinstance(item, (list, tuple)) or len(item) < 2 or item[0] is None:
            raise _bad(f"meta_info.{key}[{pos}] holds {item!r:.60}, expected [logprob, token_id, text]", where)
        out.append((float(item[0]), int(item[1])))
    return out


def parse_scores(
    response: dict, ids: list[int], k: int, top_ids: np.ndarray | None = None, *, where: str = "/generate"
) -> TokenScores:
    """TokenScores from a /generate answer to :func:`logprob_request`.

    Baseline (``top_ids`` None): its top-``k`` from ``input_top_logprobs``. Mix: its log-probs at
    ``top_ids`` [T-1, k] from ``input_token_ids_logprobs``; its argmax from its own top-1.
    """
    meta = response.get("meta_info") if isinstance(response, dict) else None
    if not isinstance(meta, dict):
        raise _bad("the answer has no meta_info", where)
    n = len(ids)
    tokens = _entries(meta, "input_token_logprobs", n, where)
    tops = _entries(meta, "input_top_logprobs", n, where)
    target = []
    for pos in range(1, n):
        (lp, tid), *_ = _triples([tokens[pos]], "input_token_logprobs", pos, where)
        # SGLang reports the ids of the last vocabulary entry and above as 0 (its image-token clip)
        if tid != ids[pos] and tid != 0:
            raise _bad(f"input_token_logprobs[{pos}] scores token {tid}, the text has {ids[pos]} there", where)
        target.append(lp)
    own_top = [_triples(tops[pos], "input_top_logprobs", pos, where) for pos in range(1, n)]
    argmax = np.array([max(t)[1] for t in own_top])
    if top_ids is None:
        if any(len(t) < k for t in own_top):
            raise _bad(f"input_top_logprobs lists fewer than the {k} tokens asked for", where)
        ordered = [sorted(t, reverse=True)[:k] for t in own_top]
        top_lp = np.array([[lp for lp, _ in t] for t in ordered])
        top = np.array([[tid for _, tid in t] for t in ordered])
    else:
        top = np.asarray(top_ids)
        listed = _entries(meta, "input_token_ids_logprobs", n, where)
        rows = []
        for pos in range(1, n):
            by_id = {tid: lp for lp, tid in _triples(listed[pos], "input_token_ids_logprobs", pos, where)}
            missing = [int(t) for t in top[pos - 1] if int(t) not in by_id]
            if missing:
                raise _bad(f"input_token_ids_logprobs[{pos}] lacks token(s) {missing[:5]} that were asked for", where)
            rows.append([by_id[int(t)] for t in top[pos - 1]])
        top_lp = np.array(rows)
    return TokenScores(list(ids), np.array(target), top, top_lp, argmax, top.shape[1], None)


def union_ids(top_ids: np.ndarray) -> list[int]:
    return sorted({int(t) for t in np.asarray(top_ids).ravel()})


# ---- servers -----------------------------------------------------------------------------------------
@dataclass
class RunningServer:
    config: Path
    plan: object
    proc: subprocess.Popen
    url: str
    log: Path
    reloads: int = 0


@dataclass
class ServerBackend:
    """Scores mixes through SGLang servers started with the launcher (one GPU, TP 1 by default)."""

    workdir: Path
    start_timeout: float = 900.0
    extra_flags: tuple[str, ...] = ()
    log: Callable[[str], None] = print
    parallel: int = 6  # servers starting at once (a start is mostly CPU work)
    name: str = "sglang"
    servers: list[RunningServer] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # what each score cost: a start or a reload
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: int = 0

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def score(self, plan, ids: list[int], k: int, top_ids: np.ndarray | None = None) -> TokenScores:
        server = self.server_for(plan)
        return self.score_on(server, ids, k, top_ids)

    def score_on(self, server: RunningServer, ids, k, top_ids=None) -> TokenScores:
        from ..serving import client

        body = logprob_request(
            ids, top_k=k if top_ids is None else 1, token_ids=None if top_ids is None else union_ids(top_ids)
        )
        return parse_scores(
            client.post_json(f"{server.url}/generate", body, timeout=600), ids, k, top_ids, where=server.url
        )

    def server_for(self, plan) -> RunningServer:
        """A running server serving ``plan``'s tensors already; else one whose plan reloads into
        ``plan`` in place (same schemes layer by layer); else a new one."""
        from ..core.reload_plan import REBUILD, diff_plans

        config = _config_path(plan)
        reloadable = None
        for server in list(self.servers):
            try:
                diff = diff_plans(server.plan, plan)
            except MixedPrecisionError:
                continue
            if not diff.of(REBUILD) and not diff.reload:
                return server
            if not diff.of(REBUILD) and reloadable is None:
                reloadable = server
        if reloadable is not None:
            self.reload(reloadable, config, plan)
            return reloadable
        return self.start(config, plan)

    def prefetch(self, plans: list) -> None:
        """Start servers for ``plans`` side by side (``parallel`` starting at once), so that scoring
        them one by one waits for none; plans a running server reloads into share it instead."""
        from concurrent.futures import ThreadPoolExecutor

        from ..core.reload_plan import REBUILD, diff_plans

        distinct: list = []
        for plan in plans:
            if all(diff_plans(p, plan).of(REBUILD) for p in distinct):
                distinct.append(plan)
        with ThreadPoolExecutor(self.parallel) as pool:
            list(pool.map(lambda p: self.start(_config_path(p), p), distinct))

    def reload(self, server: RunningServer, config: Path, plan) -> None:
        from ..serving import client

        started = time.time()
        status, body = client.request(f"{server.url}/mixed_precision/reload", {"config_path": str(config)}, timeout=600)
        if status != 200:
            raise _bad(f"reload to {config} answered HTTP {status}: {str(body)[:500]}", server.url)
        server.config, server.plan = config, plan
        server.reloads += 1
        self.events.append({"kind": "reload", "config": str(config), "seconds": round(time.time() - started, 2)})

    def start(self, config: Path, plan) -> RunningServer:
        from ..serving import client

        with self._lock:
            port, nccl = client.free_port(), client.free_port()
            self._started += 1  # names unique also when servers start side by side
            name = f"{self._started:03d}-{config.stem}"
        cmd = [*launcher_command(), *server_argv(config, self.workdir / f"plan-{name}", port, nccl, self.extra_flags)]
        log = self.workdir / f"server-{name}.log"
        started = time.time()
        self.log(f"starting a server for {config.name} (log: {log})")
        proc = client.start_server(cmd, log, env=SERVER_ENV)
        try:
            client.wait_until_ready(
                f"http://127.0.0.1:{port}", proc, self.start_timeout, log, progress=self.log, every=60
            )
        except Exception:
            client.stop_server(proc)
            raise
        server = RunningServer(config, plan, proc, f"http://127.0.0.1:{port}", log)
        with self._lock:
            self.servers.append(server)
            self.events.append({"kind": "start", "config": str(config), "seconds": round(time.time() - started, 1)})
        return server

    def stop(self, server: RunningServer) -> None:
        from ..serving import client

        client.stop_server(server.proc)
        with self._lock:
            if server in self.servers:
                self.servers.remove(server)

    def close(self) -> None:
        for server in list(self.servers):
            self.stop(server)


def server_argv(config: Path, plan_dir: Path, port: int, nccl_port: int, extra=()) -> list[str]:
    """The launcher's arguments for a scoring server of ``config``."""
    return [
        "--enable-mixed-precision",
        "--mixed-precision-config",
        str(config),
        "--plan-dir",
        str(plan_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--nccl-port",
        str(nccl_port),
        *SERVER_FLAGS,
        *extra,
    ]


def launcher_command() -> list[str]:
    """`sglang-mp launch` in this Python: validates the plan, writes the plan directory, execs SGLang."""
    return [sys.executable, "-m", "sglang_mixed_precision.cli", "launch"]


def _config_path(plan) -> Path:
    path = plan.config.path
    if path is None or not Path(path).is_file():
        raise MixedPrecisionError(
            ErrorCode.BAD_ARGUMENT,
            "a mix scored by a server must be a YAML file (the launcher reads it)",
            fix="write the mix to a file and plan it with load_config",
        )
    return Path(path)
