"""Reload planning: plan diff -> actions, request validation, the worker-side re-plan check."""

from __future__ import annotations

import json

import pytest

from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.core.reload_plan import (
    NOTHING,
    REBUILD,
    RELOAD,
    ReloadRequest,
    TensorLoad,
    config_sha256,
    diff_plans,
    parse_reload_request,
    plan_reload,
    rebuild_refusal,
    replan_in_worker,
)
from test_reload_helpers import mix  # noqa: F401  (session fixture)

MLP_LAYERS = {f"model.layers.{i}.mlp.{leaf}" for i in (0, 1) for leaf in ("gate_up_proj", "down_proj")}


def request_for(mix, text, name="new.yaml", **flags):
    return ReloadRequest(text, mix.root / name, inline=False, **flags)


# ---- plan diff ------------------------------------------------------------------------------------
def test_same_config_changes_nothing(mix):
    active = mix.plan(mix.yaml())
    diff = diff_plans(active, mix.plan(mix.yaml(), "other.yaml"))
    assert diff.counts() == {NOTHING: len(active.groups), RELOAD: 0, REBUILD: 0}


def test_new_fp8_source_for_mlp_reloads_exactly_the_mlp_layers(mix):
    active = mix.plan(mix.yaml())
    diff = diff_plans(active, mix.plan(mix.yaml(fp8=mix.fp8_b)))
    assert {c.prefix for c in diff.reload} == MLP_LAYERS
    assert not diff.rebuild
    gate_up = diff.layers["model.layers.0.mlp.gate_up_proj"]
    assert set(gate_up.changed) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    assert gate_up.old.endswith("(fp8-block128)") and gate_up.new.endswith("(fp8-block128)")
    assert diff.layers["model.layers.0.self_attn.qkv_proj"].action == NOTHING


def test_renaming_a_label_of_the_same_files_is_no_change(mix):
    text = mix.yaml().replace("fp8:", "fp8_release:").replace("source: fp8", "source: fp8_release")
    diff = diff_plans(mix.plan(mix.yaml()), mix.plan(text))
    assert diff.counts()[NOTHING] == len(diff.layers)


def test_a_symlink_to_the_same_source_is_no_change(mix):
    link = mix.root / "fp8_link"
    if not link.exists():
        link.symlink_to(mix.fp8_a)
    diff = diff_plans(mix.plan(mix.yaml()), mix.plan(mix.yaml(fp8=link)))
    assert diff.counts()[NOTHING] == len(diff.layers)


def test_scheme_change_is_a_rebuild_with_the_layers_listed(mix):
    active = mix.plan(mix.yaml())
    reload_plan = plan_reload(active, request_for(mix, mix.yaml(mlp="int4")))
    assert {c.prefix for c in reload_plan.diff.rebuild} == MLP_LAYERS
    assert all("fp8-block128 -> gptq-int4-g128" in c.reason for c in reload_plan.diff.rebuild)
    refusal = rebuild_refusal(reload_plan)
    assert refusal.code == "reload_needs_rebuild"
    assert "model.layers.0.mlp.gate_up_proj" in refusal.detail and '"restart": true' in refusal.fix


def test_gptq_source_change_is_refused_in_place(mix):
    active = mix.plan(mix.yaml(mlp="int4"))
    diff = diff_plans(active, mix.plan(mix.yaml(mlp="int4", int4=mix.int4_b)))
    assert {c.prefix for c in diff.rebuild} == MLP_LAYERS
    assert all("GPTQ-Marlin repacks" in c.reason for c in diff.rebuild)
    assert not diff.reload


def test_attention_back_to_bf16_from_fp8_is_a_rebuild_only_for_attention(mix):
    all_fp8 = mix.yaml().replace('"model.layers.*.mlp.*"', '"model.layers.*"')
    diff = diff_plans(mix.plan(all_fp8), mix.plan(mix.yaml()))
    rebuilt = {c.prefix for c in diff.rebuild}
    assert rebuilt == {f"model.layers.{i}.self_attn.{leaf}" for i in (0, 1) for leaf in ("qkv_proj", "o_proj")}
    assert not diff.reload


def test_another_model_is_refused(mix, tiny_llama):
    other = f"mixed_precision:\n  fp16_path: {tiny_llama}\n"
    with pytest.raises(MixedPrecisionError) as e:
        plan_reload(mix.plan(mix.yaml()), request_for(mix, other))
    assert e.value.code == "reload_model_mismatch"
    assert "model_type" in e.value.detail


def test_other_tp_size_is_refused(mix):
    with pytest.raises(MixedPrecisionError) as e:
        diff_plans(mix.plan(mix.yaml()), mix.plan(mix.yaml(), tp_size=2))
    assert e.value.code == "reload_model_mismatch" and "tp_size 2" in e.value.detail


# ---- request validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, needle",
    [
        ([], "JSON object"),
        ({}, "exactly one"),
        ({"config": "x", "config_path": "y"}, "exactly one"),
        ({"config": "  "}, "YAML text"),
        ({"config": 3}, "YAML text"),
        ({"config_path": ""}, "must be a path string"),
        ({"config": "a: 1", "restart": "yes"}, "'restart' must be true or false"),
        ({"config": "a: 1", "force": True}, "unknown field(s) 'force'"),
    ],
)
def test_bad_request_bodies(tmp_path, body, needle):
    with pytest.raises(MixedPrecisionError) as e:
        parse_reload_request(body, base_dir=tmp_path)
    assert e.value.code == "reload_bad_request"
    assert needle in e.value.detail


def test_inline_config_is_anchored_in_the_active_directory(tmp_path):
    request = parse_reload_request({"config": "mixed_precision: {}", "dry_run": True}, base_dir=tmp_path)
    assert request.inline and request.dry_run and not request.restart
    assert request.anchor.parent == tmp_path
    assert request.sha256 == config_sha256("mixed_precision: {}")


def test_config_path_relative_and_missing(tmp_path):
    (tmp_path / "cfg.yaml").write_text("mixed_precision: {}\n")
    request = parse_reload_request({"config_path": "cfg.yaml", "restart": True}, base_dir=tmp_path)
    assert request.anchor == tmp_path / "cfg.yaml" and request.restart and not request.inline
    with pytest.raises(MixedPrecisionError) as e:
        parse_reload_request({"config_path": "absent.yaml"}, base_dir=tmp_path)
    assert e.value.code == "missing_file"


def test_bad_yaml_and_unknown_label_raise_the_config_errors(mix):
    active = mix.plan(mix.yaml())
    with pytest.raises(MixedPrecisionError) as e:
        plan_reload(active, request_for(mix, "mixed_precision: [unclosed"))
    assert e.value.code == "config_syntax"
    with pytest.raises(MixedPrecisionError) as e:
        plan_reload(active, request_for(mix, mix.yaml(mlp="fp9")))
    assert e.value.code == "config_bad_label" and "fp9" in e.value.detail


def test_missing_source_directory_is_a_plan_error(mix):
    with pytest.raises(ValidationErrors) as e:
        plan_reload(mix.plan(mix.yaml()), request_for(mix, mix.yaml(fp8=mix.root / "nowhere")))
    assert "missing_source" in e.value.codes


# ---- the reload plan and its worker-side check -------------------------------------------------------
def test_reload_plan_lists_every_tensor_of_the_changed_layers(mix):
    reload_plan = plan_reload(mix.plan(mix.yaml()), request_for(mix, mix.yaml(fp8=mix.fp8_b)))
    names = {t.name for t in reload_plan.loads}
    expected = {
        f"model.layers.{i}.mlp.{p}.{s}"
        for i in (0, 1)
        for p in ("gate_proj", "up_proj", "down_proj")
        for s in ("weight", "weight_scale_inv")
    }
    assert names == expected
    assert all(str(mix.fp8_b) in t.file for t in reload_plan.loads)
    weight = next(t for t in reload_plan.loads if t.name == "model.layers.0.mlp.gate_proj.weight")
    assert (
        weight.dtype == "F8_E4M3" and weight.shape == (1024, 512) and weight.layer == "model.layers.0.mlp.gate_up_proj"
    )
    assert reload_plan.bytes == sum(
        (1 if t.dtype == "F8_E4M3" else 4) * t.shape[0] * t.shape[1] for t in reload_plan.loads
    )


def test_worker_request_round_trips_and_replans_identically(mix):
    active = mix.plan(mix.yaml())
    reload_plan = plan_reload(active, request_for(mix, mix.yaml(fp8=mix.fp8_b)))
    request = json.loads(json.dumps(reload_plan.worker_request()))
    again = replan_in_worker(active, request)
    assert again.layers == reload_plan.layers and again.loads == reload_plan.loads
    assert [TensorLoad.from_json(d) for d in request["loads"]] == reload_plan.loads


def test_worker_refuses_when_sources_changed_since_validation(mix):
    active = mix.plan(mix.yaml())
    request = plan_reload(active, request_for(mix, mix.yaml(fp8=mix.fp8_b))).worker_request()
    request["loads"] = request["loads"][1:]
    with pytest.raises(MixedPrecisionError) as e:
        replan_in_worker(active, request)
    assert e.value.code == "reload_sources_changed"


def test_worker_refuses_a_tampered_request(mix):
    active = mix.plan(mix.yaml())
    request = plan_reload(active, request_for(mix, mix.yaml(fp8=mix.fp8_b))).worker_request()
    request["config_text"] += "\n# edited"
    with pytest.raises(MixedPrecisionError) as e:
        replan_in_worker(active, request)
    assert e.value.code == "reload_bad_request" and "sha256" in e.value.detail


def test_worker_refuses_a_request_of_another_kind(mix):
    request = plan_reload(mix.plan(mix.yaml()), request_for(mix, mix.yaml(fp8=mix.fp8_b))).worker_request()
    del request["loads"]
    with pytest.raises(MixedPrecisionError) as e:
        replan_in_worker(mix.plan(mix.yaml()), request)
    assert e.value.code == "reload_bad_request" and "malformed reload request (missing ['loads'])" in e.value.detail


def test_worker_refuses_a_rebuild(mix):
    active = mix.plan(mix.yaml())
    request = plan_reload(active, request_for(mix, mix.yaml(mlp="int4"))).worker_request()
    with pytest.raises(MixedPrecisionError) as e:
        replan_in_worker(active, request)
    assert e.value.code == "reload_needs_rebuild"
