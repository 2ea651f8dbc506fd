"""The mixed-precision YAML -> :class:`MixedConfig` (typed, with the file and line of every entry).

Seed format (accepted verbatim)::

    mixed_precision:
      fp16_path: /models/Qwen3-235B-A22B
      fp8_path: /models/Qwen3-235B-A22B-FP8
      int4_path: /models/Qwen3-235B-A22B-GPTQ-Int4
      weight_mapping:
        model.layers.0.self_attn.q_proj.weight: fp16

Extensions (same ``mixed_precision:`` key)::

      sources: {bf16: ../Qwen3-235B-A22B, fp8: ../Qwen3-235B-A22B-FP8}   # any label -> path
      default: fp8                      # linears no rule or name maps
      rules:                            # first match wins; explicit weight_mapping names beat rules
        - {match: "model.layers.[0-3].self_attn.*", source: bf16}
        - {match: "re:model\\.layers\\.\\d+\\.mlp\\.experts\\..*", source: int4}
      skeleton: bf16                    # which unquantized source gives the model (optional)

Names may carry a tensor suffix (``.weight``) or not: the unit is the module. Labels ``fp16``,
``bf16`` and ``16bit`` mean the unquantized source unless a source has that exact label. In a glob
``*`` matches any characters (dots included), ``?`` one character and ``[a-b]`` / ``[1,4,10-20]``
a decimal number in those ranges. Rules and ``default`` decide linears (attention, MLP, experts);
norms, embeddings, lm_head and routers come from the unquantized source unless ``weight_mapping``
names them. Relative paths resolve against the YAML file's directory.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from .errors import ErrorCode, MixedPrecisionError, raise_all
from .naming import TENSOR_SUFFIXES, module_name
from .yaml_compose import NULL_TAG, Mapping, Scalar, Sequence, compose, no_gc

UNQUANTIZED_ALIASES = ("fp16", "bf16", "16bit")
SEED_PATH_KEYS = {"fp16_path": "fp16", "bf16_path": "bf16", "fp8_path": "fp8", "int4_path": "int4", "int8_path": "int8"}
# What each seed key's checkpoint must be (see formats.matches_format); a promise, checked by the plan.
SEED_FORMATS = {"fp16_path": "16bit", "bf16_path": "16bit", "fp8_path": "fp8", "int4_path": "int4", "int8_path": "int8"}
TOP_KEYS = ("mixed_precision",)
SECTION_KEYS = (*SEED_PATH_KEYS, "sources", "default", "rules", "weight_mapping", "skeleton", "model_path")
RULE_KEYS = ("match", "source")
_LABEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_RANGE_RE = re.compile(r"\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*")


@dataclass(frozen=True)
class SourceSpec:
    label: str
    path: Path
    origin: str  # "cfg.yaml:3 (fp8_path)"
    key: str | None = None  # the YAML key that declared it: "fp8_path", "sources.fast", "model_path"

    @property
    def promised_format(self) -> str | None:
        """The format the seed key promises (``fp8_path`` -> ``fp8``); None for free labels."""
        return SEED_FORMATS.get(self.key or "")


class MappingEntry(NamedTuple):
    """One weight_mapping line (a tuple: an explicit mapping has one per tensor, a million for big models)."""

    key: str  # as written (may carry a tensor suffix)
    module: str
    label: str
    file: str
    line: int  # 1-based

    @property
    def origin(self) -> str:
        return f"{self.file}:{self.line}"

    def describe(self) -> str:
        return f"weight_mapping {self.key!r} ({self.origin})"


@dataclass
class Rule:
    index: int  # 1-based position in ``rules``
    pattern: str
    label: str
    origin: str

    def __post_init__(self):
        self._regex, ranges = compile_pattern(self.pattern, self.origin)
        self._allowed = [_NumberSet(spans) for spans in ranges]  # one per [a-b] of a glob, in group order
        self._description = f"rule #{self.index} {self.pattern!r} ({self.origin})"

    def matches(self, module: str) -> bool:
        m = self._regex.fullmatch(module)
        if m is None:
            return False
        if self._allowed:
            for value, allowed in zip(m.groups(), self._allowed):
                if int(value) not in allowed:
                    return False
        return True

    def describe(self) -> str:
        return self._description


def first_matching_rule(rules: list[Rule], module: str) -> Rule | None:
    """The rule that decides ``module``: rules are tried in the order written, the first match wins."""
    return next((rule for rule in rules if rule.matches(module)), None)


@dataclass
class MixedConfig:
    path: Path | None
    sources: dict[str, SourceSpec]
    default: str | None = None
    default_origin: str | None = None
    rules: list[Rule] = field(default_factory=list)
    weight_mapping: dict[str, MappingEntry] = field(default_factory=dict)  # module -> entry
    skeleton: str | None = None  # label of the unquantized source that gives the model

    def where(self) -> str:
        return str(self.path) if self.path else "<config>"


class _NumberSet:
    """Membership in a layer range such as [0-3,10-93]."""

    def __init__(self, spans: tuple[tuple[int, int], ...]):
        self.spans = spans
        small = sum(hi - lo + 1 for lo, hi in spans) <= 4096
        self.values = frozenset(n for lo, hi in spans for n in range(lo, hi + 1)) if small else None

    def __contains__(self, n: int) -> bool:
        if self.values is not None:
            return n in self.values
        return any(lo <= n <= hi for lo, hi in self.spans)


def compile_pattern(pattern: str, origin: str = "<config>") -> tuple[re.Pattern, tuple]:
    """A rule's pattern -> (regex to fullmatch module names, numeric ranges of its capture groups)."""
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:]), ()
        except (re.error, OverflowError, RecursionError) as e:
            raise _bad_pattern(pattern, origin, f"invalid regular expression ({e})") from None
    glob = module_name(pattern) if pattern.rsplit(".", 1)[-1] in TENSOR_SUFFIXES else pattern
    out, ranges, i = [], [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            end = glob.find("]", i)
            body = glob[i + 1 : end] if end > 0 else ""
            if end < 0 or not _RANGE_RE.fullmatch(body):
                raise _bad_pattern(
                    pattern, origin, f"brackets must hold decimal layer ranges like [0-3] or [1,4,10-20], not [{body}"
                )
            ranges.append(_parse_ranges(body, pattern, origin))
            out.append(r"(?<!\d)(\d+)(?!\d)")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out)), tuple(ranges)


def _parse_ranges(body: str, pattern: str, origin: str) -> tuple[tuple[int, int], ...]:
    spans = []
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if lo_i > hi_i:
            raise _bad_pattern(pattern, origin, f"range [{part}] is empty (start above end)")
        spans.append((lo_i, hi_i))
    return tuple(spans)


def _bad_pattern(pattern: str, origin: str, why: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.CONFIG_BAD_PATTERN,
        f"rule pattern {pattern!r}: {why}",
        where=origin,
        fix="use a glob like 'model.layers.[0-3].self_attn.*' or 're:<python regex>'",
    )


# ---- YAML -> MixedConfig ------------------------------------------------------------------------
def load_config(path: str | Path) -> MixedConfig:
    path = Path(path)
    text = read_config_text(
        path,
        missing_fix="pass the path of your mixed-precision YAML (`--config`, or the launcher's `--mixed-precision-config`)",
    )
    return parse_config(text, path)


def read_config_text(path: Path, *, missing_fix: str) -> str:
    """The UTF-8 text of a config file; ``missing_fix`` differs per entry point (CLI flag, reload request)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MixedPrecisionError(
            ErrorCode.MISSING_FILE, f"config file {path} does not exist", where=str(path), fix=missing_fix
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise MixedPrecisionError(
            ErrorCode.CONFIG_SYNTAX,
            f"cannot read config file {path}: {e}",
            where=str(path),
            fix="pass a UTF-8 YAML file",
        ) from None


def parse_config(text: str, path: str | Path | None = None) -> MixedConfig:
    """Parse YAML text; ``path`` names the file in messages and anchors relative source paths."""
    parser = _Parser(Path(path) if path is not None else None)
    with no_gc():
        config = parser.parse(text)
    if parser.errors:
        raise_all(parser.errors)
    return config


class _Parser:
    def __init__(self, path: Path | None):
        self.path = path
        self.file = str(path) if path else "<config>"
        self.base = path.parent if path else Path.cwd()
        self.errors: list[MixedPrecisionError] = []

    # -- helpers
    def at(self, node, key: str | None = None) -> str:
        line = f"{self.file}:{node.line + 1}"
        return f"{line} ({key})" if key else line

    def resolve(self, raw: str) -> Path:
        """``~`` expanded (left as is for unknown users), relative paths against the YAML's directory."""
        path = Path(os.path.expanduser(raw))
        return path if path.is_absolute() else self.base / path

    def fail(self, code: str, message: str, node, fix: str, key: str | None = None) -> None:
        self.errors.append(MixedPrecisionError(code, message, where=self.at(node, key), fix=fix))

    def mapping(self, node, what: str, known: tuple[str, ...]) -> dict[str, tuple]:
        """{key: (key node, value node)} of a YAML mapping, reporting unknown / duplicate keys."""
        if not isinstance(node, Mapping):
            self.fail(
                ErrorCode.CONFIG_SYNTAX,
                f"{what} must be a mapping, found {_kind(node)}",
                node,
                f"write {what} as 'key: value' lines",
            )
            return {}
        out = {}
        for key_node, value_node in node.value:
            if type(key_node) is Scalar and key_node.value and key_node.tag != NULL_TAG:  # the usual key, fast
                key = key_node.value
            else:
                key = self.string(key_node, f"a key of {what}")
                if key is None:
                    continue
            if known and key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(
                    ErrorCode.CONFIG_UNKNOWN_KEY,
                    f"unknown key {key!r} in {what}",
                    key_node,
                    f"{hint}known keys: {', '.join(known)}",
                    key,
                )
                continue
            if key in out:
                self.fail(
                    ErrorCode.CONFIG_DUPLICATE_KEY,
                    f"key {key!r} appears twice in {what}",
                    key_node,
                    "keep one entry per key",
                    key,
                )
                continue
            out[key] = (key_node, value_node)
        return out

    def string(self, node, what: str) -> str | None:
        if not isinstance(node, Scalar) or node.tag == NULL_TAG or node.value == "":
            self.fail(
                ErrorCode.CONFIG_SYNTAX,
                f"{what} must be a non-empty string, found {_kind(node)}",
                node,
                f"write {what} as plain text",
            )
            return None
        return node.value

    def label(self, node, what: str) -> str | None:
        value = self.string(node, what)
        if value is not None and not _LABEL_RE.fullmatch(value):
            self.fail(
                ErrorCode.CONFIG_BAD_LABEL,
                f"{what} {value!r} is not a valid source label",
                node,
                "labels are letters, digits, '_', '-', '.', '+' (e.g. fp8, int4, bf16)",
            )
            return None
        return value

    # -- sections
    def parse(self, text: str) -> MixedConfig:
        empty = MixedConfig(self.path, {})
        try:
            root = compose(text)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{self.file}:{mark.line + 1}:{mark.column + 1}" if mark else self.file
            self.errors.append(
                MixedPrecisionError(
                    ErrorCode.CONFIG_SYNTAX,
                    f"YAML syntax error: {e.problem or e}",
                    where=where,
                    fix="fix the YAML at that line (indentation, quotes, colons)",
                )
            )
            return empty
        except (yaml.YAMLError, RecursionError, ValueError) as e:
            self.errors.append(
                MixedPrecisionError(
                    ErrorCode.CONFIG_SYNTAX,
                    f"YAML syntax error: {type(e).__name__}: {e}",
                    where=self.file,
                    fix="fix the YAML syntax",
                )
            )
            return empty
        if root is None:
            self.errors.append(
                MixedPrecisionError(
                    ErrorCode.CONFIG_SYNTAX,
                    "the config is empty",
                    where=self.file,
                    fix="start the file with 'mixed_precision:' and its sources",
                )
            )
            return empty
        top = self.mapping(root, "the config's top level", TOP_KEYS)
        if "mixed_precision" not in top:
            if not self.errors:
                self.fail(
                    ErrorCode.CONFIG_SYNTAX,
                    "the config has no 'mixed_precision:' section",
                    root,
                    "put the sources, rules and weight_mapping under a top-level 'mixed_precision:' key",
                )
            return empty
        section = self.mapping(top["mixed_precision"][1], "mixed_precision", SECTION_KEYS)
        config = MixedConfig(self.path, self.sources(section))
        known = set(config.sources) | set(UNQUANTIZED_ALIASES)
        if "default" in section:
            key_node, node = section["default"]
            config.default = self.known_label(node, "default", known)
            config.default_origin = self.at(key_node, "default")
        if "skeleton" in section:
            config.skeleton = self.known_label(section["skeleton"][1], "skeleton", known)
        if "model_path" in section:
            config.skeleton = self.model_path(section["model_path"], config)
        if "rules" in section and not _is_null(section["rules"][1]):
            config.rules = self.rules(section["rules"][1], known)
        if "weight_mapping" in section and not _is_null(section["weight_mapping"][1]):
            config.weight_mapping = self.weight_mapping(section["weight_mapping"][1], known)
        if not config.sources and not self.errors:
            self.fail(
                ErrorCode.CONFIG_NO_SOURCES,
                "mixed_precision names no checkpoint source",
                top["mixed_precision"][0],
                "add fp16_path / fp8_path / int4_path or a 'sources: {label: path}' mapping",
            )
        return config

    def sources(self, section: dict) -> dict[str, SourceSpec]:
        out: dict[str, SourceSpec] = {}

        def add(label: str, path_node, key_node, key: str):
            raw = self.string(path_node, key)
            if raw is None:
                return
            if label in out:
                self.fail(
                    ErrorCode.CONFIG_DUPLICATE_LABEL,
                    f"source label {label!r} is defined twice ({out[label].origin} and here)",
                    key_node,
                    "give each checkpoint its own label",
                    key,
                )
                return
            out[label] = SourceSpec(label, self.resolve(raw), self.at(key_node, key), key)

        for key, label in SEED_PATH_KEYS.items():
            if key in section:
                add(label, section[key][1], section[key][0], key)
        if "sources" in section and not _is_null(section["sources"][1]):
            for key, (key_node, value_node) in self.mapping(section["sources"][1], "sources", ()).items():
                if not _LABEL_RE.fullmatch(key):
                    self.fail(
                        ErrorCode.CONFIG_BAD_LABEL,
                        f"source label {key!r} is not a valid label",
                        key_node,
                        "labels are letters, digits, '_', '-', '.', '+' (e.g. fp8, int4, bf16)",
                        key,
                    )
                    continue
                add(key, value_node, key_node, f"sources.{key}")
        return out

    def known_label(self, node, what: str, known: set[str]) -> str | None:
        value = self.label(node, what)
        if value is None or value in known:
            return value
        close = difflib.get_close_matches(value, sorted(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        self.fail(
            ErrorCode.CONFIG_BAD_LABEL,
            f"{what} uses label {value!r}, which is no source of this config",
            node,
            f"{hint}use one of: {', '.join(sorted(known))} (or add '{value}' under sources)",
            what,
        )
        return None

    def model_path(self, entry: tuple, config: MixedConfig) -> str | None:
        key_node, node = entry
        raw = self.string(node, "model_path")
        if raw is None:
            return None
        path = self.resolve(raw)
        for spec in config.sources.values():
            if spec.path == path:
                return spec.label
        if "model" in config.sources:
            self.fail(
                ErrorCode.CONFIG_DUPLICATE_LABEL,
                "model_path names a directory no source uses, and label 'model' is taken",
                key_node,
                "set model_path to one of the source paths, or use 'skeleton: <label>'",
                "model_path",
            )
            return None
        config.sources["model"] = SourceSpec("model", path, self.at(key_node, "model_path"), "model_path")
        return "model"

    def rules(self, node, known: set[str]) -> list[Rule]:
        if not isinstance(node, Sequence):
            self.fail(
                ErrorCode.CONFIG_SYNTAX,
                f"rules must be a list, found {_kind(node)}",
                node,
                "write rules as '- {match: \"model.layers.*.mlp.experts.*\", source: int4}' items",
            )
            return []
        rules = []
        for i, item in enumerate(node.value, start=1):
            reported = len(self.errors)
            fields = self.mapping(item, f"rule #{i}", RULE_KEYS)
            missing = [k for k in RULE_KEYS if k not in fields]
            if missing:
                if len(self.errors) == reported:  # a misspelled key was reported already
                    self.fail(
                        ErrorCode.CONFIG_SYNTAX,
                        f"rule #{i} lacks {' and '.join(missing)}",
                        item,
                        "each rule needs 'match: <glob or re:regex>' and 'source: <label>'",
                    )
                continue
            pattern = self.string(fields["match"][1], f"rule #{i} match")
            label = self.known_label(fields["source"][1], f"rule #{i} source", known)
            if pattern is None or label is None:
                continue
            try:
                rules.append(Rule(i, pattern, label, self.at(item)))
            except MixedPrecisionError as e:
                self.errors.append(e)
        return rules

    def weight_mapping(self, node, known: set[str]) -> dict[str, MappingEntry]:
        out: dict[str, MappingEntry] = {}
        for key, (key_node, value_node) in self.mapping(node, "weight_mapping", ()).items():
            label = value_node.value if _is_known(value_node, known) else None  # the common case, checked fast
            if label is None:
                label = self.known_label(value_node, f"weight_mapping[{key!r}]", known)
            if label is None:
                continue
            entry = MappingEntry(key, module_name(key), label, self.file, key_node.line + 1)
            previous = out.get(entry.module)
            if previous is not None and previous.label != label:
                self.fail(
                    ErrorCode.CONFIG_CONFLICT,
                    f"module {entry.module} is mapped to {previous.label!r} by {previous.key!r} "
                    f"({previous.origin}) and to {label!r} by {key!r}",
                    key_node,
                    "a module (all its tensors) comes from one source: keep one of the two entries",
                    key,
                )
                continue
            out[entry.module] = entry
        return out


def _is_known(node, known: set[str]) -> bool:
    """A scalar naming a known label (labels are never empty or null-like, so no other check is due)."""
    return type(node) is Scalar and node.value in known and node.tag != NULL_TAG


def _is_null(node) -> bool:
    """An empty section (``weight_mapping:`` with nothing under it) is an empty mapping."""
    return isinstance(node, Scalar) and node.tag == NULL_TAG


def _kind(node) -> str:
    if isinstance(node, Mapping):
        return "a mapping"
    if isinstance(node, Sequence):
        return "a list"
    if isinstance(node, Scalar):
        return "nothing" if node.tag == NULL_TAG or node.value == "" else f"{node.value!r}"
    return type(node).__name__
