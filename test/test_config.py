"""YAML -> MixedConfig: seed format, extensions, patterns, and every config error with its line."""

from __future__ import annotations

import pytest

from sglang_mixed_precision.core.config import Rule, compile_pattern, load_config, parse_config
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors

SEED = """\
mixed_precision:
  fp16_path: /models/Qwen3-235B-A22B
  fp8_path: /models/Qwen3-235B-A22B-FP8
  int4_path: /models/Qwen3-235B-A22B-GPTQ-Int4
  weight_mapping:
    "model.layers.0.self_attn.q_proj.weight": "fp16"
    "model.layers.0.mlp.experts.0.gate_proj.weight": "int4"
    model.layers.1.self_attn.o_proj: fp8
"""


def codes(exc: MixedPrecisionError) -> list[str]:
    return exc.codes if isinstance(exc, ValidationErrors) else [exc.code]


def test_seed_format_verbatim():
    cfg = parse_config(SEED, "/cfg/mix.yaml")
    assert {k: str(v.path) for k, v in cfg.sources.items()} == {
        "fp16": "/models/Qwen3-235B-A22B",
        "fp8": "/models/Qwen3-235B-A22B-FP8",
        "int4": "/models/Qwen3-235B-A22B-GPTQ-Int4",
    }
    # tensor suffixes are stripped: the unit is the module
    assert {m: e.label for m, e in cfg.weight_mapping.items()} == {
        "model.layers.0.self_attn.q_proj": "fp16",
        "model.layers.0.mlp.experts.0.gate_proj": "int4",
        "model.layers.1.self_attn.o_proj": "fp8",
    }
    entry = cfg.weight_mapping["model.layers.0.self_attn.q_proj"]
    assert entry.origin == "/cfg/mix.yaml:6" and entry.key == "model.layers.0.self_attn.q_proj.weight"
    assert cfg.sources["fp8"].origin == "/cfg/mix.yaml:3 (fp8_path)"


def test_extended_sources_rules_default_and_relative_paths(tmp_path):
    text = """\
mixed_precision:
  sources: {base: ./bf16, fast: ../fp8}
  default: fast
  skeleton: base
  rules:
    - {match: "model.layers.[0-3].self_attn.*", source: base}
    - match: "re:model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts\\\\..*"
      source: 16bit
"""
    path = tmp_path / "sub" / "mix.yaml"
    path.parent.mkdir()
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.sources["base"].path == path.parent / "bf16"
    assert cfg.sources["fast"].path == path.parent / ".." / "fp8"
    assert cfg.default == "fast" and cfg.skeleton == "base"
    assert [(r.index, r.label) for r in cfg.rules] == [(1, "base"), (2, "16bit")]
    assert cfg.rules[0].matches("model.layers.3.self_attn.q_proj")
    assert not cfg.rules[0].matches("model.layers.4.self_attn.q_proj")
    assert cfg.rules[1].matches("model.layers.12.mlp.experts.7.up_proj")
    assert f"{path}:6" in cfg.rules[0].describe()


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("model.layers.[10-93].mlp.experts.*", "model.layers.10.mlp.experts.0.gate_proj", True),
        ("model.layers.[10-93].mlp.experts.*", "model.layers.93.mlp.experts.127.down_proj", True),
        ("model.layers.[10-93].mlp.experts.*", "model.layers.9.mlp.experts.0.gate_proj", False),
        ("model.layers.[10-93].mlp.experts.*", "model.layers.94.mlp.experts.0.gate_proj", False),
        ("model.layers.[10-93].mlp.experts.*", "model.layers.100.mlp.experts.0.gate_proj", False),
        ("model.layers.[1,4,7-8].mlp.*", "model.layers.4.mlp.down_proj", True),
        ("model.layers.[1,4,7-8].mlp.*", "model.layers.5.mlp.down_proj", False),
        ("model.layers.[1-3]*", "model.layers.12.mlp.down_proj", False),  # a range matches a whole number
        ("*.q_proj.weight", "model.layers.0.self_attn.q_proj", True),  # tensor suffix of a pattern is dropped
        ("model.layers.?.self_attn.*", "model.layers.7.self_attn.o_proj", True),
        ("model.layers.?.self_attn.*", "model.layers.17.self_attn.o_proj", False),
        ("model.embed_tokens", "model.embed_tokensX", False),
    ],
)
def test_glob_patterns(pattern, name, expected):
    assert Rule(1, pattern, "x", "<t>").matches(name) is expected


def test_bad_patterns_name_rule_and_line():
    text = "mixed_precision:\n  fp16_path: /a\n  rules:\n    - {match: 'model.layers.[a-z].*', source: fp16}\n    - {match: 're:(unclosed', source: fp16}\n"
    with pytest.raises(ValidationErrors) as e:
        parse_config(text, "m.yaml")
    assert e.value.codes == ["config_bad_pattern", "config_bad_pattern"]
    assert "m.yaml:4" in str(e.value) and "[0-3]" in str(e.value) and "m.yaml:5" in str(e.value)
    with pytest.raises(MixedPrecisionError) as e:
        compile_pattern("layers.[5-2].x")
    assert e.value.code == "config_bad_pattern" and "empty" in str(e.value)


def test_unknown_key_names_line_and_suggests():
    text = "mixed_precision:\n  fp16_path: /a\n  fp8_pth: /b\n"
    with pytest.raises(MixedPrecisionError) as e:
        parse_config(text, "mix.yaml")
    assert e.value.code == "config_unknown_key"
    assert "'fp8_pth'" in str(e.value) and "mix.yaml:3" in str(e.value) and "did you mean 'fp8_path'" in str(e.value)


def test_unknown_rule_key_and_top_level_key():
    text = "mixed_precision:\n  fp16_path: /a\n  rules:\n    - {match: '*', sorce: fp16}\nserver: {}\n"
    with pytest.raises(ValidationErrors) as e:
        parse_config(text, "mix.yaml")
    assert set(e.value.codes) == {"config_unknown_key"}
    assert (
        "'sorce'" in str(e.value)
        and "mix.yaml:4" in str(e.value)
        and "'server'" in str(e.value)
        and "mix.yaml:5" in str(e.value)
    )


def test_bad_label_everywhere_it_can_appear():
    text = """\
mixed_precision:
  fp16_path: /a
  fp8_path: /b
  default: fp9
  rules:
    - {match: "*.experts.*", source: int4}
  weight_mapping:
    model.layers.0.self_attn.q_proj.weight: fp-8
"""
    with pytest.raises(ValidationErrors) as e:
        parse_config(text, "mix.yaml")
    assert e.value.codes == ["config_bad_label"] * 3
    msg = str(e.value)
    assert "'fp9'" in msg and "mix.yaml:4" in msg and "did you mean 'fp8'" in msg
    assert "'int4'" in msg and "mix.yaml:6" in msg
    assert "'fp-8'" in msg and "mix.yaml:8" in msg


def test_aliases_are_accepted_labels():
    cfg = parse_config(
        "mixed_precision:\n  sources: {base: /a, q: /b}\n  weight_mapping: {model.norm: bf16, lm_head: 16bit, model.embed_tokens: fp16}\n"
    )
    assert {e.label for e in cfg.weight_mapping.values()} == {"bf16", "16bit", "fp16"}


def test_yaml_syntax_error_has_line_and_column():
    with pytest.raises(MixedPrecisionError) as e:
        parse_config("mixed_precision:\n  fp16_path: /a\n   fp8_path: [unclosed\n", "bad.yaml")
    assert e.value.code == "config_syntax" and "bad.yaml:3" in str(e.value)


@pytest.mark.parametrize(
    "text,code,needle",
    [
        ("", "config_syntax", "empty"),
        ("just a string\n", "config_syntax", "mapping"),
        ("other: 1\n", "config_unknown_key", "'other'"),
        ("mixed_precision: {}\n", "config_no_sources", "no checkpoint source"),
        ("mixed_precision:\n  fp16_path: /a\n  fp16_path: /b\n", "config_duplicate_key", "twice"),
        ("mixed_precision:\n  fp16_path: /a\n  sources: {fp16: /b}\n", "config_duplicate_label", "defined twice"),
        ("mixed_precision:\n  fp16_path: [1, 2]\n", "config_syntax", "non-empty string"),
        ("mixed_precision:\n  fp16_path: /a\n  rules: {match: x}\n", "config_syntax", "must be a list"),
        ("mixed_precision:\n  fp16_path: /a\n  rules:\n    - {match: x}\n", "config_syntax", "lacks source"),
        ("mixed_precision:\n  sources: {'bad label': /a}\n", "config_bad_label", "'bad label'"),
        (
            "mixed_precision:\n  fp16_path: /a\n  fp8_path: /b\n  weight_mapping:\n    model.x.weight: fp16\n    model.x.bias: fp8\n",
            "config_conflict",
            "model.x",
        ),
        ("{}\n", "config_syntax", "no 'mixed_precision:' section"),
        ("a: \x00\n", "config_syntax", "YAML syntax error: ReaderError"),
        (
            "mixed_precision:\n  fp8_path: /b\n  sources: {model: /c}\n  model_path: /m\n",
            "config_duplicate_label",
            "label 'model' is taken",
        ),
        (
            "mixed_precision:\n  fp16_path: /a\n  rules:\n    - {match: 're:(', source: fp16}\n",
            "config_bad_pattern",
            "invalid regular expression",
        ),
    ],
)
def test_config_error_catalogue(text, code, needle):
    with pytest.raises(MixedPrecisionError) as e:
        parse_config(text, "c.yaml")
    assert code in codes(e.value)
    assert needle in str(e.value) and "fix:" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(MixedPrecisionError) as e:
        load_config(tmp_path / "nope.yaml")
    assert e.value.code == "missing_file" and "nope.yaml" in str(e.value)
    assert "`--mixed-precision-config`" in e.value.fix  # the launcher's flag, not only sglang-mp's


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("mixed_precision:\n  fp16_path: /mod\xe8le\n".encode("latin-1"))
    with pytest.raises(MixedPrecisionError) as e:
        load_config(path)
    assert (
        e.value.code == "config_syntax"
        and f"cannot read config file {path}" in str(e.value)
        and "UTF-8" in str(e.value)
    )


def test_model_path_picks_or_adds_the_skeleton():
    cfg = parse_config("mixed_precision:\n  fp16_path: /a\n  fp8_path: /b\n  model_path: /a\n")
    assert cfg.skeleton == "fp16" and set(cfg.sources) == {"fp16", "fp8"}
    cfg = parse_config("mixed_precision:\n  fp8_path: /b\n  model_path: /m\n")
    assert cfg.skeleton == "model" and str(cfg.sources["model"].path) == "/m"


@pytest.mark.parametrize(
    "lines",
    [
        ["model.x.weight: fp16", "model.x: fp8"],
        ["model.x: fp8", "model.x.weight: fp16"],
        ["model.x.bias: fp16", "model.x.weight: fp8"],
    ],
)
def test_a_tensor_and_its_module_conflict_whatever_the_order(lines):
    text = "mixed_precision:\n  fp16_path: /a\n  fp8_path: /b\n  weight_mapping:\n" + "".join(
        f"    {x}\n" for x in lines
    )
    with pytest.raises(MixedPrecisionError) as e:
        parse_config(text, "c.yaml")
    assert e.value.code == "config_conflict"
    first, second = (x.split(": ") for x in lines)
    assert f"module model.x is mapped to {first[1]!r} by {first[0]!r} (c.yaml:5) and to {second[1]!r}" in str(e.value)
    assert e.value.where == "c.yaml:6 (" + second[0] + ")"


def _explicit_mapping(n_layers: int, bad_at: dict[int, str]) -> tuple[str, dict[int, tuple[int, str]]]:
    """A per-tensor mapping of a MoE model (4 tensors x 3 projections x 64 experts per layer); the
    entries numbered in ``bad_at`` get that label. Returns (text, {entry number: (its line, its key)})."""
    head = "mixed_precision:\n  fp16_path: /a\n  int4_path: /b\n  weight_mapping:\n"
    out, lines, n = [head], {}, 0
    for layer in range(n_layers):
        for e in range(64):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                    key = f"model.layers.{layer}.mlp.experts.{e}.{proj}.{suffix}"
                    out.append(f"    {key}: {bad_at.get(n, 'int4')}\n")
                    lines[n] = (5 + n, key)
                    n += 1
    return "".join(out), lines


def test_a_large_explicit_mapping_keeps_its_line_numbers():
    """200k entries (about 11 MB): the C loader composes it, and a bad label near the end and one
    in the middle are still reported at their lines."""
    text, lines = _explicit_mapping(260, {100_000: "fp9", 199_000: "int5"})
    assert len(lines) > 199_000 and len(text) > 11_000_000
    with pytest.raises(ValidationErrors) as e:
        parse_config(text, "big.yaml")
    assert e.value.codes == ["config_bad_label", "config_bad_label"]
    first, second = e.value.errors
    assert first.where == "big.yaml:{} (weight_mapping['{}'])".format(*lines[100_000])
    assert lines[100_000] == (100_005, "model.layers.130.mlp.experts.13.up_proj.qweight")
    assert "uses label 'fp9'" in str(first) and "use one of: 16bit, bf16, fp16, int4" in first.fix
    assert second.where == "big.yaml:{} (weight_mapping['{}'])".format(*lines[199_000]) and "'int5'" in str(second)
    cfg = parse_config(text.replace(": fp9\n", ": int4\n").replace(": int5\n", ": int4\n"), "big.yaml")
    entry = cfg.weight_mapping["model.layers.259.mlp.experts.63.down_proj"]
    assert entry.label == "int4" and entry.origin == f"big.yaml:{lines[len(lines) - 1][0]}"


def test_the_c_loader_is_used_when_installed():
    import yaml

    from sglang_mixed_precision.core import yaml_compose

    assert yaml_compose.LOADER is (yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("mixed_precision:\n  fp16_path: *nope\n", "found undefined alias 'nope'"),
        ("mixed_precision: &a\n  fp16_path: &a /x\n", "duplicate anchor 'a'"),
        ("mixed_precision:\n  fp16_path: /a\n---\nother: 1\n", "expected a single document, but found another"),
    ],
)
def test_composer_errors_are_syntax_errors(text, needle):
    with pytest.raises(MixedPrecisionError) as e:
        parse_config(text, "c.yaml")
    assert e.value.code == "config_syntax" and needle in str(e.value) and "c.yaml:" in str(e.value)


def test_anchors_and_aliases_resolve_like_yaml_compose():
    cfg = parse_config("mixed_precision:\n  fp16_path: &m /a\n  sources: {copy: *m}\n", "c.yaml")
    assert str(cfg.sources["copy"].path) == "/a" and str(cfg.sources["fp16"].path) == "/a"
