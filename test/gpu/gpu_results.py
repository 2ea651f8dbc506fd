"""The GPU tests' record: each test's outcome and measurements in results.json, and a markdown
summary (results.md) naming the card, one table per test function, and the servers started.

Written after every test, so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import json
import platform
import tarfile
import time
from collections import defaultdict
from pathlib import Path


def describe_machine() -> dict:
    """Card, GPU count and versions (torch.cuda and SGLang)."""
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node()}
    if torch.cuda.is_available():
        out.update(
            card=torch.cuda.get_device_name(0),
            gpus=torch.cuda.device_count(),
            capability="sm{}{}".format(*torch.cuda.get_device_capability(0)),
        )
    else:
        out.update(card=f"no CUDA device ({platform.processor() or platform.machine()})", gpus=0, capability="-")
    try:
        import sglang

        out["sglang"] = getattr(sglang, "__version__", "?")
    except ImportError:
        out["sglang"] = None
    return out


class Recorder:
    def __init__(self, directory: Path, environment: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.environment, self.started = environment, time.time()
        self.tests: list[dict] = []
        self.servers = list  # replaced by the fleet's summary once servers start

    def add(self, nodeid: str, outcome: str, seconds: float, measurements: dict, message: str | None) -> None:
        file, _, name = nodeid.rpartition("::")
        self.tests.append(
            {
                "test": name,
                "file": Path(file).name,
                "outcome": outcome,
                "seconds": round(seconds, 2),
                "measurements": measurements,
                "message": message[:2000] if message else None,
            }
        )
        self.save()

    def document(self) -> dict:
        counts = defaultdict(int)
        for t in self.tests:
            counts[t["outcome"]] += 1
        return {
            "environment": self.environment,
            "seconds": round(time.time() - self.started, 1),
            "counts": dict(counts),
            "tests": self.tests,
            "servers": self.servers(),
        }

    def save(self) -> None:
        doc = self.document()
        (self.directory / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (self.directory / "results.md").write_text(markdown(doc))

    def pack_logs(self, logs: Path) -> Path | None:
        """logs/ as one archive beside the results (the logs themselves stay)."""
        files = sorted(p for p in Path(logs).glob("*.log") if p.is_file())
        if not files:
            return None
        archive = self.directory / "server_logs.tgz"
        with tarfile.open(archive, "w:gz") as tar:
            for f in files:
                tar.add(f, arcname=f"logs/{f.name}")
        return archive


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value).replace("|", "/").replace("\n", " ")


def row(values: list) -> str:
    return "| " + " | ".join(map(cell, values)) + " |"


def markdown(doc: dict) -> str:
    env, counts = doc["environment"], doc["counts"]
    tally = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no test recorded"
    lines = [
        f"# GPU tests on {env.get('card')}",
        "",
        f"{env.get('card')} ({env.get('capability')}) x {env.get('gpus')}; torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, sglang {env.get('sglang')}. {tally} in {doc['seconds']:.0f} s.",
    ]
    by_function: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for t in doc["tests"]:
        by_function[(t["file"], t["test"].split("[", 1)[0])].append(t)
    for (file, function), tests in by_function.items():
        keys = list(dict.fromkeys(k for t in tests for k in t["measurements"]))
        lines += ["", f"## {file}::{function}", ""]
        lines.append(row(["case", "result", "s", *keys, "message"]))
        lines.append("|---" * (4 + len(keys)) + "|")
        for t in tests:
            case = t["test"][len(function) + 1 : -1] if "[" in t["test"] else "-"
            message = t["message"].splitlines()[0][:160] if t["message"] else None
            measured = [t["measurements"].get(k) for k in keys]
            lines.append(row([case, t["outcome"].upper(), t["seconds"], *measured, message]))
    if doc["servers"]:
        lines += ["", "## Servers", "", "| server | ready s | log | error |", "|---|---|---|---|"]
        for s in doc["servers"]:
            error = s["error"].splitlines()[0][:160] if s["error"] else None
            lines.append(row([s["server"], s["ready_s"], s["log"], error]))
    return "\n".join(lines) + "\n"
