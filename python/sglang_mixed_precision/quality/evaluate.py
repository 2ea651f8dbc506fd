"""`eval`'s work: score a mix and its 16-bit baseline on one text and compare them.

The backends (``cpu.CpuBackend``: reference path; ``server.ServerBackend``: SGLang servers) give
:class:`~.metrics.TokenScores`; the baseline is scored first (its top-k tokens), the mix at those
tokens. Default text: ``data/eval_python.txt``, an excerpt of a Python standard library module the
shipped small model was not trained on.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.config import MixedConfig, load_config
from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.plan import build_plan
from .metrics import Comparison, compare

DEFAULT_TEXT = Path(__file__).parents[1] / "data" / "eval_python.txt"
DEFAULT_TOKENS = 512
MIN_TOKENS = 16
PREDICTED_RE = re.compile(r"^#\s*predicted_kld_mean:\s*([0-9.eE+-]+)\s*$", re.M)


def read_text(path: str | Path | None) -> str:
    p = Path(path) if path else DEFAULT_TEXT
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise MixedPrecisionError(
            ErrorCode.MISSING_FILE,
            f"cannot read the evaluation text {p}: {e.strerror}",
            where=str(p),
            fix="pass --text with a readable UTF-8 file",
        ) from None


def text_ids(skeleton_path: Path, text: str, tokens: int, where: str = "--text") -> list[int]:
    """The first ``tokens`` token ids of ``text`` under the model's tokenizer."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(skeleton_path))(text)["input_ids"][:tokens]
    if len(ids) < MIN_TOKENS:
        raise MixedPrecisionError(
            ErrorCode.QUALITY_TEXT_TOO_SHORT,
            f"the evaluation text has {len(ids)} tokens; at least {MIN_TOKENS} are needed",
            where=where,
            fix="pass a longer --text file (a few thousand characters) or a larger --tokens",
        )
    return ids


def baseline_config(config: MixedConfig, label: str | None) -> MixedConfig:
    """Every linear from ``label`` (default: the 16-bit source): the model the mix is compared with."""
    return replace(config, default=label, default_origin="--baseline", rules=[], weight_mapping={})


def write_config(config: MixedConfig, label: str, path: Path) -> Path:
    """``config``'s sources (absolute paths) with every linear from ``label``, as a YAML file."""
    from ..core.autoplan import mix_yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(mix_yaml(config, {}, label))
    return path


def predicted_kld(config_path: str | Path) -> float | None:
    """The predicted mean KLD autoplan wrote into the YAML's header, if it did."""
    try:
        m = PREDICTED_RE.search(Path(config_path).read_text(encoding="utf-8"))
    except OSError:
        return None
    return float(m.group(1)) if m else None


@dataclass
class EvalResult:
    config: str
    baseline: str
    backend: str
    comparison: Comparison
    predicted_kld_mean: float | None = None

    def to_json(self, per_position: bool = True) -> dict:
        out = {"config": self.config, "baseline": self.baseline, "backend": self.backend}
        out.update(self.comparison.summary())
        if self.predicted_kld_mean is not None:
            out["predicted_kld_mean"] = self.predicted_kld_mean
            out["predicted_over_measured"] = (
                self.predicted_kld_mean / self.comparison.kld_mean if self.comparison.kld_mean else None
            )
        if per_position:
            out["kld_per_position"] = [round(float(x), 8) for x in self.comparison.kld]
        return out

    def table(self) -> str:
        s = self.comparison.summary()
        rows = [
            ("backend", self.backend),
            ("baseline", self.baseline),
            ("positions scored", s["positions"]),
            ("KLD mean (nats)", f"{s['kld_mean']:.6f}"),
            ("KLD p99 (nats)", f"{s['kld_p99']:.6f}"),
            ("KLD max (nats)", f"{s['kld_max']:.6f}"),
            ("top-1 agreement", f"{100 * s['top1_agreement']:.2f} %"),
            ("perplexity baseline", f"{s['ppl_baseline']:.4f}"),
            ("perplexity mix", f"{s['ppl_mix']:.4f}"),
            ("KLD over", s["kld_kind"]),
        ]
        if self.predicted_kld_mean is not None:
            rows.append(("predicted KLD mean", f"{self.predicted_kld_mean:.6f}"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def evaluate(
    config_path,
    backend,
    *,
    baseline: str | None = None,
    text_path=None,
    tokens: int = DEFAULT_TOKENS,
    k: int = 0,
    workdir: str | Path | None = None,
) -> EvalResult:
    """Compare the mix of ``config_path`` with its baseline; ``k`` 0 means the whole vocabulary."""
    config = load_config(config_path)
    mix_plan = build_plan(config)
    base_label = build_plan(baseline_config(config, baseline)).skeleton_label if baseline is None else baseline
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sglang-mp-eval-"))
    base_plan = build_plan(load_config(write_config(config, base_label, workdir / f"baseline-{base_label}.yaml")))
    ids = text_ids(mix_plan.skeleton_path, read_text(text_path), tokens)
    k = k or int(mix_plan.hf_config.get("vocab_size", 0)) or 20
    base = backend.score(base_plan, ids, k)
    mix = backend.score(mix_plan, ids, k, top_ids=base.top_ids)
    return EvalResult(
        str(config_path),
        base_label,
        backend.name,
        compare(base, mix),
        predicted_kld(config_path),
    )


def write_png(result: EvalResult, path: str | Path) -> None:
    """Two panels: the KLD at every position of the text, and its distribution (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kld = result.comparison.kld
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.plot(np.arange(len(kld)), kld, lw=0.8)
    ax1.axhline(result.comparison.kld_mean, color="k", ls="--", lw=0.8, label=f"mean {result.comparison.kld_mean:.4g}")
    ax1.set_xlabel("position in the text")
    ax1.set_ylabel("KLD (nats)")
    ax1.legend()
    positive = kld[kld > 0]
    if positive.size:
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max() + 1e-30), 40)
        ax2.hist(positive, bins=bins)
        ax2.set_xscale("log")
    ax2.set_xlabel("KLD per token (nats)")
    ax2.set_ylabel("tokens")
    fig.suptitle(f"{Path(result.config).name} vs {result.baseline} ({result.backend})", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def dump_json(result: EvalResult) -> str:
    return json.dumps(result.to_json(), indent=1)
