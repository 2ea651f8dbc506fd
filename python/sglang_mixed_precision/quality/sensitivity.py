"""Per-unit sensitivity: the KLD a mix gains when one unit moves from 16-bit to a lower-precision source.

For every unit (attention, dense MLP or shared expert, routed experts of one layer: see
``core/autoplan.py``) and every source that holds it in a form the kernels run, the mix "everything
16-bit but this unit from that source" is scored against the 16-bit model on the text; its mean
KLD is the unit's predicted cost for autoplan, which adds the costs of the units it moves (the
units' errors are small and independent enough that KL divergences add to first order; ``eval``
of the chosen mix reports predicted against measured). The uniform mixes (every unit from one
source) are scored too.

The table is cached per (sources, text, k, backend): a JSON file named by the hash of the sources'
tensor headers, the text's token ids, k and the backend; it is rewritten after every measurement,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.autoplan import inventory, mix_yaml
from ..core.config import MixedConfig, load_config
from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.plan import build_plan
from .evaluate import DEFAULT_TOKENS, baseline_config, read_text, text_ids
from .metrics import compare

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sglang-mp" / "sensitivity"


def sources_fingerprint(plan) -> list:
    """What identifies the sources' weights: per label, its format and every tensor's header entry."""
    out = []
    for label, source in sorted(plan.sources.items()):
        h = hashlib.sha256()
        for name in sorted(source.tensor_names):
            t = source.tensor(name)
            h.update(f"{name}|{t.dtype}|{list(t.shape)}|{list(t.data_offsets)}|{Path(t.file).name}\n".encode())
        out.append([label, source.scheme.label(), h.hexdigest()])
    return out


def cache_key(plan, ids: list[int], k: int, backend_name: str) -> str:
    doc = {"v": CACHE_VERSION, "sources": sources_fingerprint(plan), "ids": ids, "k": k, "backend": backend_name}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class SensitivityTable:
    key: str
    baseline: str
    k: int
    tokens: int
    backend: str
    units: dict[str, dict[str, dict]] = field(default_factory=dict)  # unit -> label -> summary
    uniform: dict[str, dict] = field(default_factory=dict)  # label -> summary of the all-label mix

    def kld(self) -> dict[str, dict[str, float]]:
        """unit -> label -> mean KLD increase (what autoplan optimizes)."""
        return {u: {label: s["kld_mean"] for label, s in by.items()} for u, by in self.units.items()}

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "baseline": self.baseline,
            "k": self.k,
            "tokens": self.tokens,
            "backend": self.backend,
            "units": self.units,
            "uniform": self.uniform,
        }

    @classmethod
    def from_json(cls, d: dict) -> SensitivityTable:
        return cls(d["key"], d["baseline"], d["k"], d["tokens"], d["backend"], d["units"], d.get("uniform", {}))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)

    def format(self) -> str:
        labels = sorted({label for by in self.units.values() for label in by})
        lines = [f"mean KLD increase per unit (nats; baseline {self.baseline}, {self.tokens} tokens, {self.backend})"]
        lines.append("unit".ljust(32) + "".join(label.rjust(12) for label in labels))
        for unit, by in self.units.items():
            cells = "".join((f"{by[label]['kld_mean']:.6f}" if label in by else "-").rjust(12) for label in labels)
            lines.append(unit.ljust(32) + cells)
        if self.uniform:
            cells = "".join(
                (f"{self.uniform[label]['kld_mean']:.6f}" if label in self.uniform else "-").rjust(12)
                for label in labels
            )
            lines.append("(every unit)".ljust(32) + cells)
        return "\n".join(lines)


@dataclass
class Job:
    """One mix to score: a unit moved to a source, or every unit from one source (unit None)."""

    unit: str | None
    label: str
    config: Path


def plan_jobs(config: MixedConfig, workdir: Path, baseline: str) -> list[Job]:
    """The mixes a sensitivity run scores, each written as a YAML file under ``workdir``."""
    from ..core.autoplan import Choice

    inv = inventory(config, 1)
    jobs: list[Job] = []
    labels = []
    for unit in inv.units:
        for choice in unit.choices:
            if choice.label == baseline:
                continue
            labels.append(choice.label)
            path = workdir / f"{unit.name}--{choice.label}.yaml"
            path.write_text(mix_yaml(config, {unit.name: choice}, baseline))
            jobs.append(Job(unit.name, choice.label, path))
    for label in dict.fromkeys(labels):
        picks = {u.name: Choice(label, 0, 0.0) for u in inv.units if any(c.label == label for c in u.choices)}
        path = workdir / f"all--{label}.yaml"
        path.write_text(mix_yaml(config, picks, baseline))
        jobs.append(Job(None, label, path))
    return jobs


def run_sensitivity(
    config_path,
    backend,
    *,
    text_path=None,
    tokens: int = DEFAULT_TOKENS,
    k: int = 0,
    cache_dir: str | Path | None = None,
    log=print,
) -> tuple[SensitivityTable, Path]:
    """Measure (or resume) the table of ``config_path``'s sources; returns it and its cache file."""
    config = load_config(config_path)
    base_plan = build_plan(baseline_config(config, None))
    baseline = base_plan.skeleton_label
    ids = text_ids(base_plan.skeleton_path, read_text(text_path), tokens)
    k = k or int(base_plan.hf_config.get("vocab_size", 0)) or 20
    key = cache_key(base_plan, ids, k, backend.name)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"{key}.json"
    table = (
        SensitivityTable.from_json(json.loads(path.read_text()))
        if path.is_file()
        else SensitivityTable(key, baseline, k, len(ids), backend.name)
    )
    mixes = root / key
    mixes.mkdir(parents=True, exist_ok=True)
    base_yaml = mixes / f"all--{baseline}.yaml"
    base_yaml.write_text(mix_yaml(config, {}, baseline))
    jobs = plan_jobs(config, mixes, baseline)
    todo = [j for j in jobs if not _done(table, j)]
    log(f"sensitivity: {len(jobs)} mixes, {len(jobs) - len(todo)} cached in {path}")
    if not todo:
        return table, path
    plans = {j.config: build_plan(load_config(j.config)) for j in todo}
    baseline_plan = build_plan(load_config(base_yaml))
    if hasattr(backend, "prefetch"):
        backend.prefetch([baseline_plan, *plans.values()])
    base = backend.score(baseline_plan, ids, k)
    for n, job in enumerate(todo, 1):
        summary = compare(base, backend.score(plans[job.config], ids, k, top_ids=base.top_ids)).summary()
        if job.unit is None:
            table.uniform[job.label] = summary
        else:
            table.units.setdefault(job.unit, {})[job.label] = summary
        table.save(path)
        log(f"  [{n}/{len(todo)}] {job.unit or 'every unit'} <- {job.label}: KLD {summary['kld_mean']:.6f}")
    return table, path


def _done(table: SensitivityTable, job: Job) -> bool:
    if job.unit is None:
        return job.label in table.uniform
    return job.label in table.units.get(job.unit, {})


def load_table(
    config_path, *, text_path=None, tokens: int = DEFAULT_TOKENS, k: int = 0, backend_name: str, cache_dir=None
) -> tuple[SensitivityTable, Path]:
    """The cached table of these sources and text; a named error when no run measured it."""
    config = load_config(config_path)
    base_plan = build_plan(baseline_config(config, None))
    ids = text_ids(base_plan.skeleton_path, read_text(text_path), tokens)
    k = k or int(base_plan.hf_config.get("vocab_size", 0)) or 20
    key = cache_key(base_plan, ids, k, backend_name)
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{key}.json"
    if not path.is_file():
        raise MixedPrecisionError(
            ErrorCode.SENSITIVITY_MISSING,
            f"no sensitivity table of these sources, text ({len(ids)} tokens), k {k} and backend {backend_name}",
            where=str(path),
            fix=f"run `sglang-mp sensitivity --config {config_path}` with the same --text, --tokens, --top-k, "
            "--backend and --cache-dir first",
        )
    return SensitivityTable.from_json(json.loads(path.read_text())), path
