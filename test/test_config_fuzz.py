"""Property-based fuzzing: whatever text the config loader gets, only MixedPrecisionError escapes."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_mixed_precision.core.config import SECTION_KEYS, MixedConfig, parse_config
from sglang_mixed_precision.core.errors import MixedPrecisionError

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))

names = st.sampled_from(["fp16", "bf16", "fp8", "int4", "16bit", "x", "", "fp 8", "-", "*"]) | st.text(max_size=12)
patterns = st.sampled_from(
    [
        "model.layers.*.self_attn.*",
        "model.layers.[0-3].mlp.*",
        "re:model\\.layers\\.\\d+",
        "re:(",
        "[",
        "[9-1]",
        "layers.[a]",
        "*",
        "?",
        "[1,2,3-5]",
        "[",
        "re:*",
    ]
) | st.text(max_size=20)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | names | patterns
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3), max_leaves=8
)
rules = st.lists(
    st.dictionaries(st.sampled_from(["match", "source", "extra"]), patterns | names | values, max_size=3), max_size=3
)
sections = st.fixed_dictionaries(
    {},
    optional={
        "fp16_path": values,
        "fp8_path": names,
        "int4_path": names,
        "default": names,
        "skeleton": names,
        "sources": st.dictionaries(names, names | values, max_size=3),
        "rules": rules | values,
        "weight_mapping": st.dictionaries(names | patterns, names | values, max_size=4),
        "model_path": names,
        "typo_key": values,
    },
)
documents = st.dictionaries(st.sampled_from(["mixed_precision", "other"]), sections | values, min_size=0, max_size=2)


def _check(text: str) -> None:
    try:
        cfg = parse_config(text, "fuzz.yaml")
    except MixedPrecisionError as e:
        assert e.code and str(e)
    else:
        assert isinstance(cfg, MixedConfig) and cfg.sources


@FUZZ
@given(documents)
def test_structured_documents_raise_only_project_errors(doc):
    _check(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_arbitrary_text_raises_only_project_errors(text):
    _check(text)


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                "mixed_precision:",
                "  fp16_path: /a",
                "  fp8_path: /b",
                "  rules:",
                "    - {match: '*', source: fp8}",
                "    - match: 'model.layers.[0-3].*'",
                "      source: fp16",
                "  weight_mapping:",
                "    a.weight: fp8",
                "  default: int4",
                "  sources: {x: /c}",
                "  &a [*a]",
                "  - - -",
                "  key: !!python/object:os.system x",
                "  date: 2001-13-45",
                "  {[",
                "\t",
                "  default: !!binary AAAA",
                "  sources: *undefined",
            ]
        ),
        max_size=12,
    )
)
def test_line_soup_raises_only_project_errors(lines):
    _check("\n".join(lines) + "\n")


def test_section_keys_are_what_the_fuzzer_exercises():
    assert {"fp16_path", "fp8_path", "int4_path", "sources", "rules", "default", "weight_mapping"} <= set(SECTION_KEYS)
