"""The GPU benchmark's bookkeeping on CPU: kernel tables from a trace, ratios and their spreads."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_bench_mix.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench_mix", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _trace(path: Path, kernels: list[tuple[str, int, float]], steps: int) -> Path:
    """A Kineto-style trace: ``steps`` graph replays, each launching ``kernels`` (name, grid x, us)."""
    events = []
    for s in range(steps):
        corr = 1000 + s
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "args": {"correlation": corr}})
        for name, grid, us in kernels:
            events.append({"ph": "X", "cat": "kernel", "name": name, "dur": us,
                           "args": {"correlation": corr, "grid": [grid, 1, 1], "block": [128, 1, 1]}})  # fmt: skip
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_kernel_table_counts_per_graph_replay(bench, tmp_path):
    t = bench.kernel_table(_trace(tmp_path / "a.trace.json.gz", [("gemm", 8, 10.0), ("moe", 4, 30.0)], steps=4))
    assert t["steps"] == 4 and t["graph_replays"] == 4
    assert t["gpu_us_per_step"] == pytest.approx(40.0) and t["kernels_per_step"] == pytest.approx(2.0)
    assert t["kernels"]["moe|grid=[4, 1, 1]|block=[128, 1, 1]"] == [1.0, 30.0]


def test_profile_diff_names_what_differs(bench, tmp_path):
    stock = bench.kernel_table(_trace(tmp_path / "s.trace.json.gz", [("gemm", 8, 10.0), ("moe", 4, 30.0)], 2))
    same = bench.kernel_table(_trace(tmp_path / "m.trace.json.gz", [("gemm", 8, 10.5), ("moe", 4, 30.0)], 2))
    other = bench.kernel_table(_trace(tmp_path / "o.trace.json.gz", [("gemm", 16, 10.0), ("moe", 4, 30.0)], 2))
    d = bench.profile_diff(same, stock)
    assert d["same_kernels"] and d["gpu_time_ratio"] == pytest.approx(40.5 / 40.0)
    d = bench.profile_diff(other, stock)
    assert not d["same_kernels"] and d["only_mixed"] == ["gemm|grid=[16, 1, 1]|block=[128, 1, 1]"]


def test_ratio_is_a_difference_only_when_spreads_do_not_overlap(bench):
    def results(a, b):
        rounds = lambda xs: [{"decode_tok_s_b1": x} for x in xs]  # noqa: E731
        return {"starts": [{"start": 1, "servers": {"A": {"rounds": rounds(a)}, "B": {"rounds": rounds(b)}}}]}

    c = bench.compare(results([99, 100, 101], [100, 102, 104]), "A", "B", "decode_tok_s_b1")
    assert c["ratio"] == pytest.approx(100 / 102) and not c["difference"]
    c = bench.compare(results([90, 91, 92], [100, 102, 104]), "A", "B", "decode_tok_s_b1")
    assert c["difference"] and c["a"] == [90, 91, 92, 3, 0]  # min, median, max, n valid, n invalid
    assert bench.compare(results([1], []), "A", "B", "decode_tok_s_b1") is None


RUN1 = Path(__file__).resolve().parents[1] / "bench" / "results" / "bench_mix_h200_run1"
# A real line of run 1's int4-wna16 server log (server_logs.tgz), SGLang 0.5.17 on an H200.
REAL_DECODE_LINE = (
    "[2026-12-02 11:44:22] Decode batch, #running-req: 64, #token: 3840, token usage: 0.02, cuda graph: True, "
    "gen throughput (token/s): 6723.13, #queue-req: 0"
)
REAL_PREFILL_LINE = (
    "[2026-12-02 11:44:22] Prefill batch, #new-seq: 64, #new-token: 1024, #cached-token: 0, token usage: 0.00, "
    "#running-req: 0, #queue-req: 0, #pending-token: 0, cuda graph: True, input throughput (token/s): 0.00"
)


def test_decode_lines_parsed_first_of_a_run_dropped():
    from sglang_mixed_precision.serving.client import decode_runs

    first = REAL_DECODE_LINE.replace("3840", "1280").replace("6723.13", "702.23")
    text = "\n".join([REAL_PREFILL_LINE, first, REAL_DECODE_LINE, REAL_DECODE_LINE.replace("6723.13", "6724.87")])
    runs = decode_runs(text)
    assert runs == [{"running": 64, "after_prefill": (64, 1024), "tok_s": [6723.13, 6724.87], "first_tok_s": 702.23}]


def test_decode_rate_from_a_real_log_is_the_servers_median(bench):
    import tarfile

    with tarfile.open(RUN1 / "server_logs.tgz") as tar:
        text = tar.extractfile("logs/int4-wna16.start1.log").read().decode()
    assert REAL_DECODE_LINE in text
    rate, lines = bench.log_decode_rate(text, 64)
    # the b64 runs of run 1 (3 rounds): 6723.13 6724.87 6668.78 | 6736.72 6694.89 | 6713.83 6686.27
    assert lines == 7 and rate == pytest.approx(6713.83)
    assert bench.log_decode_rate(text, 2) == (None, 0)


def test_wall_decode_rate_refuses_a_window_too_small_to_be_decode_steps(bench):
    assert bench.wall_decode_rate(64, 128, 1.00, 1.60)[0] == pytest.approx(64 * 128 / 0.6)
    for t_n, t_2n in ((1.0, 1.0), (1.0, 0.9), (1.0, 1.004)):  # equal, negative, under 5 ms
        rate, why = bench.wall_decode_rate(64, 128, t_n, t_2n)
        assert rate is None and "ms <" in why


def test_invalid_samples_are_not_counted(bench):
    rounds = [{"decode_tok_s_b64": 100.0}, {"decode_tok_s_b64": None}, {"decode_tok_s_b64": 104.0}]
    other = [{"decode_tok_s_b64": 200.0}] * 3
    results = {"starts": [{"start": 1, "servers": {"A": {"rounds": rounds}, "B": {"rounds": other}}}]}
    c = bench.compare(results, "A", "B", "decode_tok_s_b64")
    assert c["ratio"] == pytest.approx(102 / 200) and c["a"] == [100.0, 102.0, 104.0, 2, 1]
    assert "n=2/3; 1/0 invalid" in bench._fmt(c)


def test_from_logs_rebuilds_run1(bench, tmp_path):
    import shutil

    src = tmp_path / "run1"
    src.mkdir()
    shutil.copyfile(RUN1 / "bench_mix.raw.json", src / "bench_mix.json")  # the run's JSON as it wrote it
    shutil.copyfile(RUN1 / "server_logs.tgz", src / "server_logs.tgz")
    raw = json.loads((src / "bench_mix.json").read_text())
    raw_b64 = [m["decode_tok_s_b64"] for e in raw["starts"][0]["servers"].values() for m in e["rounds"]]
    assert max(raw_b64) > 1e12  # the defect being repaired
    results = bench.from_logs(src, src)
    assert json.loads((src / "bench_mix.raw.json").read_text()) == raw  # the original is kept
    servers = results["starts"][0]["servers"]
    assert len(servers) == 8
    for e in servers.values():
        assert e["weight_load_s"] > 0 and e["weight_mem_gib"] > 0 and e["load_overlaps"] == []
        for m in e["rounds"]:
            assert 1000 < m["decode_tok_s_b64"] < 50000 and m["decode_lines_b64"] >= 2
            client = m["decode_client_tok_s_b64"]
            assert client is None or abs(client / m["decode_tok_s_b64"] - 1) <= bench.CLIENT_LOG_DISAGREEMENT
    clamped = [
        m
        for e in servers.values()
        for m in e["rounds"]
        if "(clamped)" in m["invalid"].get("decode_client_tok_s_b64", "")
    ]
    assert len(clamped) == sum(1 for v in raw_b64 if v > 1e12)
    assert servers["stock-bf16"]["weight_mem_gib"] == pytest.approx(15.07)
    md = (src / "bench_mix.md").read_text()
    assert "e+12" not in md and "8,128,000" not in md and "n=3/3" in md


def test_load_overlaps_from_windows(bench):
    servers = {
        "a": {"load_window": ["2026-12-02 11:00:00", "2026-12-02 11:00:04"]},
        "b": {"load_window": ["2026-12-02 11:00:04", "2026-12-02 11:00:07"]},
        "c": {"load_window": ["2026-12-02 11:00:09", "2026-12-02 11:00:12"]},
        "d": {},
    }
    bench.mark_load_overlaps(servers)
    assert servers["a"]["load_overlaps"] == ["b"] and servers["b"]["load_overlaps"] == ["a"]
    assert servers["c"]["load_overlaps"] == [] and "load_overlaps" not in servers["d"]


def test_kernel_tables_written_at_the_top_of_out(bench, tmp_path):
    table = bench.kernel_table(_trace(tmp_path / "a.trace.json.gz", [("gemm", 8, 10.0)], steps=2))
    results = {"starts": [{"start": 1, "servers": {"stock-bf16": {"profile": table}, "mixed-bf16": {}}}]}
    bench.write_results(tmp_path, results)
    assert json.loads((tmp_path / "kernel_tables.json").read_text()) == {"stock-bf16.start1": table}


def test_stop_all_stops_every_server_within_one_grace(bench):
    import subprocess
    import time

    # each ignores SIGTERM for 2 s, as a draining server does; one grace for all, not one each
    cmd = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); time.sleep(60)"]
    procs = [subprocess.Popen(cmd, start_new_session=True) for _ in range(3)]
    time.sleep(1.0)
    t = time.time()
    bench.stop_all([bench.Running(f"s{i}", p, "", Path("x"), t) for i, p in enumerate(procs)], grace=2.0)
    assert all(p.poll() is not None for p in procs)
    assert time.time() - t < 5.0  # sequential stops would take 3 x 2 s + kills


def test_profile_posts_plain_text_and_finds_a_nested_trace(bench, tmp_path):
    """/start_profile answers "Start profiling." (text/plain) as SGLang 0.5.17 does; the trace appears
    in a folder below the requested one after a later batch."""
    import http.server
    import threading

    state = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/start_profile":
                state["dir"] = Path(body["output_dir"])
                reply, kind = b"Start profiling.\n", "text/plain"
            else:
                if "dir" in state:
                    nested = state["dir"] / "1796211852.37"
                    nested.mkdir(parents=True, exist_ok=True)
                    _trace(nested / "1796211852.37-TP-0-DECODE.trace.json.gz", [("moe", 4, 30.0)], steps=8)
                reply, kind = json.dumps([{"output_ids": [1]}] * len(body["input_ids"])).encode(), "application/json"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        table = bench.profile_decode(f"http://127.0.0.1:{server.server_port}", 1000, tmp_path / "p", timeout=20)
    finally:
        server.shutdown()
    assert table["steps"] == 8 and table["gpu_us_per_step"] == pytest.approx(30.0)


def test_log_archive_keeps_the_logs_of_earlier_commands(bench, tmp_path):
    import tarfile

    logs = tmp_path / "work" / "logs"
    logs.mkdir(parents=True)
    (logs / "a.start1.log").write_text("first")
    bench.archive_logs(tmp_path, [logs / "a.start1.log"])
    (logs / "b.start2.log").write_text("second")
    bench.archive_logs(tmp_path, [logs / "b.start2.log"])
    with tarfile.open(tmp_path / "server_logs.tgz") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == {
            "logs/a.start1.log": b"first",
            "logs/b.start2.log": b"second",
        }
    assert set(bench.saved_logs(tmp_path)) == {"a.start1.log", "b.start2.log"}


def test_serve_estimate_fits_the_documented_commands(bench):
    # bench/README.md: 4 servers x 2 starts, or 8 servers x 1 start, in one command of --deadline-s 540
    assert sum(bench.serve_plan_s(4, 3, "8", 2, False)) <= 540
    assert sum(bench.serve_plan_s(8, 3, "8", 1, False)) <= 540
    assert sum(bench.serve_plan_s(8, 3, "load-end", 1, False)) > 540  # the run-1 way does not fit


FAKE_SERVER = r"""
import gzip, http.server, json, sys, time
from pathlib import Path

port, tok_s = int(sys.argv[1]), float(sys.argv[2])
def log(msg):
    print(time.strftime("[%Y-%m-%d %H:%M:%S] ") + msg, flush=True)
log("server_args=ServerArgs(decode_log_interval=10)")
log("Load weight begin. avail mem=139.00 GB")
log("Load weight end. elapsed=1.50 s, type=Qwen3MoeForCausalLM, avail mem=120.00 GB, mem usage=15.07 GB.")
state = {}

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def reply(self, body, kind="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path == "/mixed_precision/info":
            return self.reply({"load": {"bytes_read": {"fp16": 1000}}, "modules": {"a": {"method": "UnquantizedLinearMethod"}}})
        self.reply({})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/start_profile":
            state["dir"] = Path(body["output_dir"])
            return self.reply(b"Start profiling.\n", "text/plain")
        b, n = len(body["input_ids"]), body["sampling_params"]["max_new_tokens"]
        log(f"Prefill batch, #new-seq: {b}, #new-token: {b * len(body['input_ids'][0])}, #cached-token: 0")
        for step in range(10, n, 10):
            log(f"Decode batch, #running-req: {b}, #token: {b * step}, cuda graph: True, gen throughput (token/s): {tok_s * b if step > 10 else 1.0:.2f}, #queue-req: 0")
        if "dir" in state:
            nested = state.pop("dir") / "1.0"
            nested.mkdir(parents=True, exist_ok=True)
            ev = [{"ph": "X", "cat": "kernel", "name": "k", "dur": 5.0, "args": {"correlation": 1, "grid": [1, 1, 1], "block": [1, 1, 1]}}]
            with gzip.open(nested / "1.0-TP-0-DECODE.trace.json.gz", "wt") as f:
                json.dump({"traceEvents": ev}, f)
        time.sleep(0.001 * n)
        self.reply([{"output_ids": list(range(n))}] * b)

log("The server is fired up and ready to roll!")
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _fake_fleet(bench, tmp_path, monkeypatch, tok_s: dict):
    """serve_phase against stand-ins for SGLang servers (same log lines, same endpoints), so that the
    start, profile, rounds, deadline, stop and archive steps run on CPU."""
    import argparse

    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    names = list(tok_s)
    monkeypatch.setattr(
        bench, "server_command", lambda name, work, port, *a: [sys.executable, str(script), str(port), str(tok_s[name])]
    )
    monkeypatch.setattr(bench, "plan_numbers", lambda work, name: {"plan_total_bytes": 1000, "plan_rank_bytes": 1000})
    args = argparse.Namespace(cold=False, stagger="0.5", mem_fraction=0.92, max_total_tokens=1000, rounds=2,
                              profile_every_start=False)  # fmt: skip
    return names, args


def test_serve_phase_against_stand_in_servers(bench, tmp_path, monkeypatch):
    import time

    names, args = _fake_fleet(bench, tmp_path, monkeypatch, {"stock-bf16": 100.0, "mixed-bf16": 110.0})
    out, results = tmp_path / "out", {}
    out.mkdir()
    bench.serve_phase(names, tmp_path / "work", out, results, args, 1000, time.time() + 300)
    servers = results["starts"][0]["servers"]
    for name, per_seq in (("stock-bf16", 100.0), ("mixed-bf16", 110.0)):
        e = servers[name]
        assert e["weight_load_s"] == 1.5 and e["weight_mem_gib"] == 15.07 and e["load_window"]
        assert len(e["rounds"]) == 2 and e["profile"]["gpu_us_per_step"] == pytest.approx(5.0)
        for m in e["rounds"]:
            for b in bench.BATCHES:  # the first line of each request's run (1.0) never counts
                assert m[f"decode_tok_s_b{b}"] == pytest.approx(per_seq * b) and m[f"decode_lines_b{b}"] > 0
                assert m[f"decode_wall_tok_s_b{b}"] is None or m[f"decode_wall_tok_s_b{b}"] > 0
    assert servers["mixed-bf16"]["bytes_read"] == {"fp16": 1000}
    assert set(json.loads((out / "kernel_tables.json").read_text())) == {"stock-bf16.start1", "mixed-bf16.start1"}
    assert set(bench.saved_logs(out)) == {"stock-bf16.start1.log", "mixed-bf16.start1.log"}
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_mix.json",
        "bench_mix.md",
        "kernel_tables.json",
        "server_logs.tgz",
    ]
    summary = results["summary"]["mixed-bf16 vs stock-bf16"]["decode_tok_s_b64"]
    assert summary["ratio"] == pytest.approx(1.1)


def test_serve_phase_stops_before_the_deadline(bench, tmp_path, monkeypatch):
    import time

    names, args = _fake_fleet(bench, tmp_path, monkeypatch, {"stock-bf16": 100.0, "mixed-bf16": 110.0})
    monkeypatch.setattr(bench, "STOP_RESERVE_S", 5)
    out, results = tmp_path / "out", {}
    out.mkdir()
    began = time.time()
    bench.serve_phase(names, tmp_path / "work", out, results, args, 1000, began + 8)
    assert time.time() - began < 8 + 2
    start = results["starts"][0]
    assert start["rounds_cut_by_deadline"] >= 1
    assert all("profile" not in e for e in start["servers"].values())  # no time for profiles either
    assert all(e["weight_load_s"] == 1.5 for e in start["servers"].values())  # parsed before the stop
    assert json.loads((out / "bench_mix.json").read_text())["starts"][0]["servers"]["stock-bf16"]["weight_mem_gib"]
