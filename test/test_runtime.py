"""Runtime reload executor and routes on CPU: a fake model with SGLang's fused parameter layout,
real safetensors sources, and the HTTP routes driven through FastAPI's test client."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from ckpt_writers import rewrite_checkpoint
from sglang_mixed_precision.core.errors import MixedPrecisionError, error_json
from sglang_mixed_precision.core.naming import classify, split_tensor_name
from sglang_mixed_precision.core.reload_plan import ReloadRequest, config_sha256, plan_reload
from sglang_mixed_precision.serving import hooks, messages, reload_worker, restart, routes, service
from sglang_mixed_precision.tensors import read_tensor
from test_reload_helpers import mix  # noqa: F401  (session fixture)

SHARD_ORDER = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}


class FakeModel(torch.nn.Module):
    """One submodule per SGLang layer of the plan; fused members stacked along dim 0 like
    qkv_proj / gate_up_proj; ``load_weights`` takes checkpoint names as SGLang models do."""

    def __init__(self, plan):
        super().__init__()
        self.offsets: dict[str, int] = {}  # checkpoint tensor name -> row offset in its fused parameter
        for prefix, group in plan.groups.items():
            members = sorted(group.members, key=lambda m: SHARD_ORDER.get(plan.modules[m].ref.shard, 0))
            module = self._make(prefix)
            for suffix in plan.modules[members[0]].tensors:
                parts = [
                    read_tensor(plan.sources[plan.modules[m].label], plan.modules[m].tensors[suffix].name)
                    for m in members
                ]
                row = 0
                for m, part in zip(members, parts):
                    self.offsets[plan.modules[m].tensors[suffix].name] = row
                    row += part.shape[0]
                param = torch.nn.Parameter(
                    torch.cat(parts) if len(parts) > 1 else parts[0].clone(), requires_grad=False
                )
                param.weight_loader = _row_loader
                module.register_parameter(suffix, param)

    def _make(self, prefix: str) -> torch.nn.Module:
        parent = self
        for part in prefix.split("."):
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        return parent

    def load_weights(self, weights):
        for name, tensor in weights:
            module, suffix = split_tensor_name(name)
            param = getattr(self.get_submodule(classify(module).group), suffix)
            param.weight_loader(param, tensor, self.offsets[name])

    def state(self) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().view(torch.uint8).clone() if p.element_size() == 1 else p.detach().clone()
            for n, p in self.named_parameters()
        }


def _row_loader(param, loaded, row):
    param.data[row : row + loaded.shape[0]].copy_(loaded)


def changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


MLP_PARAMS = {
    f"model.layers.{i}.mlp.{leaf}.{s}"
    for i in (0, 1)
    for leaf in ("gate_up_proj", "down_proj")
    for s in ("weight", "weight_scale_inv")
}


def fp8_mlp_request(mix, fp8_dir):
    active = mix.plan(mix.yaml())
    reload_plan = plan_reload(active, ReloadRequest(mix.yaml(fp8=fp8_dir), mix.root / "new.yaml", False))
    return active, reload_plan


# ---- executor: stage / agree / apply ------------------------------------------------------------------
def test_reload_copies_new_mlp_weights_and_nothing_else(mix):
    active, reload_plan = fp8_mlp_request(mix, mix.fp8_b)
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    before = model.state()
    reply = reload_worker.execute_reload(model, config, reload_plan.worker_request())
    assert reply["success"], reply
    after = model.state()
    assert changed(before, after) == MLP_PARAMS
    expected = FakeModel(reload_plan.plan).state()
    assert not changed(expected, after)
    assert config.plan is not active and reply["bytes_read"] == reload_plan.bytes


def corrupt_copy(mix, name, edit):
    return rewrite_checkpoint(mix.fp8_b, mix.root / name, edit)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])


@pytest.mark.parametrize(
    "damage, code",
    [
        ("truncate", "corrupt_safetensors"),
        ("delete", "missing_file"),
        ("nan", "reload_bad_tensor"),
    ],
)
def test_damaged_source_is_refused_before_anything_is_applied(mix, damage, code):
    def edit(state):
        if damage == "nan":
            state["model.layers.1.mlp.down_proj.weight_scale_inv"][0, 0] = float("nan")

    source = corrupt_copy(mix, f"fp8_{damage}", edit)
    active, reload_plan = fp8_mlp_request(mix, source)  # planned while the files are whole
    if damage == "truncate":
        truncate(source / "model.safetensors")
    elif damage == "delete":
        (source / "model.safetensors").unlink()
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    before = model.state()
    reply = reload_worker.execute_reload(model, config, reload_plan.worker_request())
    assert not reply["success"] and reply["stage"] == "stage" and reply["applied"] is False
    # the worker's re-plan or its staging names the problem (a plan error may wrap it)
    assert f"'code': '{code}'" in str(reply["failures"][0]["error"])
    if damage == "nan":
        assert "down_proj.weight_scale_inv" in reply["failures"][0]["error"]["message"]
    assert not changed(before, model.state())
    assert config.plan is active


def test_stage_alone_reads_and_checks_without_a_model(mix):
    source = corrupt_copy(mix, "fp8_trunc_stage", lambda s: None)
    _, reload_plan = fp8_mlp_request(mix, source)
    truncate(source / "model.safetensors")
    with pytest.raises(MixedPrecisionError) as e:
        reload_worker.stage_tensors(reload_plan)
    assert e.value.code == "corrupt_safetensors" and "model.safetensors" in e.value.where


def test_stage_refuses_a_file_deleted_after_planning(mix):
    source = corrupt_copy(mix, "fp8_deleted_stage", lambda s: None)
    _, reload_plan = fp8_mlp_request(mix, source)
    (source / "model.safetensors").unlink()
    with pytest.raises(MixedPrecisionError) as e:
        reload_worker.stage_tensors(reload_plan)
    assert e.value.code == "missing_file" and "disappeared after the reload was planned" in e.value.detail
    assert e.value.where == str(source / "model.safetensors")


def test_a_planned_layer_the_model_lacks_is_refused(mix):
    model = FakeModel(mix.plan(mix.yaml()))
    with pytest.raises(MixedPrecisionError) as e:
        reload_worker.layer_parameters(model, ["model.layers.0.mlp.gate_up_proj", "model.layers.9.mlp.down_proj"])
    assert e.value.code == "reload_layer_missing" and "model.layers.9.mlp.down_proj" in e.value.detail


def test_failure_while_copying_restores_the_old_weights(mix):
    active, reload_plan = fp8_mlp_request(mix, mix.fp8_b)
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    before = model.state()
    calls = []

    def failing_loader(param, loaded, row):
        calls.append(row)
        if len(calls) > 3:  # some parameters are already overwritten by now
            raise RuntimeError("device copy failed")
        _row_loader(param, loaded, row)

    for name, param in model.named_parameters():
        if ".mlp." in name:
            param.weight_loader = failing_loader
    reply = reload_worker.execute_reload(model, config, reload_plan.worker_request())
    assert not reply["success"] and reply["stage"] == "apply"
    assert reply["failures"][0]["error"]["code"] == "reload_apply_failed"
    assert len(calls) > 3
    assert not changed(before, model.state())
    assert config.plan is active


def test_a_tensor_the_model_ignores_fails_the_reload(mix):
    active, reload_plan = fp8_mlp_request(mix, mix.fp8_b)
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    before = model.state()
    original = model.load_weights
    model.load_weights = lambda weights: original((n, t) for n, t in weights if "down_proj" not in n)
    reply = reload_worker.execute_reload(model, config, reload_plan.worker_request())
    assert not reply["success"] and "reached no parameter" in reply["failures"][0]["error"]["message"]
    assert not changed(before, model.state())


def test_other_rank_failing_to_stage_keeps_every_rank_untouched(mix):
    active, reload_plan = fp8_mlp_request(mix, mix.fp8_b)
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    before = model.state()
    rank1_error = json.dumps(error_json(MixedPrecisionError("corrupt_safetensors", "rank 1 saw a bad file")))

    def agree(ok, message):
        return [(0, ok, message), (1, False, rank1_error)]

    reply = reload_worker.execute_reload(model, config, reload_plan.worker_request(), agree=agree)
    assert not reply["success"] and reply["stage"] == "stage"
    assert reply["failures"] == [{"rank": 1, "error": json.loads(rank1_error)}]
    assert not changed(before, model.state())


def test_other_rank_failing_to_apply_rolls_this_rank_back(mix):
    active, reload_plan = fp8_mlp_request(mix, mix.fp8_b)
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    before = model.state()
    votes = iter([None, json.dumps({"code": "reload_apply_failed", "message": "rank 1 copy failed"})])

    def agree(ok, message):
        other = next(votes)
        return [(0, ok, message), (1, other is None, other or "")]

    reply = reload_worker.execute_reload(model, config, reload_plan.worker_request(), agree=agree)
    assert not reply["success"] and reply["stage"] == "apply"
    assert not changed(before, model.state())
    assert config.plan is active


# ---- the SGLang hook and the reply encoding -------------------------------------------------------
def test_hook_passes_ordinary_updates_to_sglang(tmp_path):
    seen = []
    result = hooks.around_update_weights_from_disk(
        lambda u, path, fmt, **kw: seen.append((path, fmt, kw)) or (True, "sglang"),
        object(),
        str(tmp_path),
        "auto",
        recapture_cuda_graph=False,
    )
    assert result == (True, "sglang") and seen == [(str(tmp_path), "auto", {"recapture_cuda_graph": False})]


def test_hook_runs_the_executor_for_reload_requests(mix, tmp_path, monkeypatch):
    from sglang_mixed_precision.serving import loader

    active, reload_plan = fp8_mlp_request(mix, mix.fp8_b)
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    monkeypatch.setattr(loader, "mixed_config_of", lambda m: config)
    (tmp_path / messages.RELOAD_MARKER).write_text(json.dumps(reload_plan.worker_request()))
    updater = SimpleNamespace(get_model=lambda: model)  # SGLang's WeightUpdater, as far as the hook reads it
    sglang_called = []
    ok, message = hooks.around_update_weights_from_disk(
        lambda *a: sglang_called.append(a), updater, str(tmp_path), "auto", recapture_cuda_graph=False
    )
    assert ok and not sglang_called
    assert "|" not in message
    assert messages.decode_worker_reply(ok, message)["layers"] == 4


def test_reply_from_a_worker_without_the_hook_is_an_error():
    with pytest.raises(MixedPrecisionError) as e:
        messages.decode_worker_reply(False, "Failed to get weights iterator: no config.json.")
    assert e.value.code == "reload_worker_missing" and "serving.hooks" in e.value.fix


def test_dp_replies_merge_and_any_failure_fails():
    good = messages.encode_reply({"success": True, "layers": 2})
    bad = messages.encode_reply(
        {"success": False, "stage": "stage", "failures": [{"rank": 0, "error": {"message": "a|b"}}]}
    )
    merged = messages.decode_worker_reply(False, f"{good} | {bad}")
    assert not merged["success"] and merged["failures"][0]["error"]["message"] == "a|b"


# ---- routes ----------------------------------------------------------------------------------------------
class InProcessBackend(service.Backend):
    """The workers, in this process: the request directory goes straight to the executor."""

    def __init__(self, model, config):
        self.model, self.config, self.sent = model, config, 0

    async def send_reload(self, request_dir):
        self.sent += 1
        return hooks.around_update_weights_from_disk(
            None, SimpleNamespace(get_model=lambda: self.model), request_dir, "auto"
        )

    async def worker_info(self):
        return [
            {
                "tp_rank": 0,
                "tp_size": 1,
                "config_path": None,
                "config_sha256": None,
                "layers": {"model.layers.0.mlp.gate_up_proj": {"method": "Fp8LinearMethod", "params": {}, "bytes": 1}},
                "load": {"bytes_read": {"fp8": 123}, "seconds": {"fp8": 0.5}, "files": {"fp8": 1}},
            }
        ]


@pytest.fixture
def server(mix, tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sglang_mixed_precision.serving import loader

    cfg_path = mix.write("served.yaml", mix.yaml())
    active = mix.plan(cfg_path.read_text(), "served.yaml")
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    monkeypatch.setattr(loader, "mixed_config_of", lambda m: config)
    monkeypatch.setenv(restart.RESTART_FILE_ENV, str(tmp_path / "restart.json"))
    runtime = service.MixedPrecisionRuntime(
        service.ActiveMix(cfg_path.read_text(), cfg_path, 1), InProcessBackend(model, config)
    )
    app = FastAPI()
    routes.add_routes(app, lambda: runtime)
    routes.add_routes(app, lambda: runtime)  # idempotent
    return SimpleNamespace(client=TestClient(app), runtime=runtime, model=model, config=config, tmp=tmp_path)


def test_routes_are_added_once(server):
    paths = [r.path for r in server.client.app.router.routes]
    assert paths.count("/mixed_precision/reload") == 1


def test_info_and_config_describe_the_active_mix(server, mix):
    info = server.client.get("/mixed_precision/info").json()
    gate = info["modules"]["model.layers.0.mlp.gate_proj"]
    assert gate["label"] == "fp8" and gate["path"] == str(mix.fp8_a) and gate["scheme"] == "fp8-block128"
    assert gate["method"] == "Fp8LinearMethod" and gate["layer"] == "model.layers.0.mlp.gate_up_proj"
    assert gate["bytes"] == 1024 * 512 + 8 * 4 * 4
    assert info["modules"]["model.layers.0.self_attn.q_proj"]["scheme"] == "bf16"
    precisions = {row["precision"] for row in info["totals"]["by_precision"]}
    assert precisions == {"bf16", "fp8-block128"}
    assert info["load"]["bytes_read"] == {"fp8": 123}
    assert info["config"]["sha256"] == config_sha256(mix.yaml())
    assert server.client.get("/mixed_precision/config").text == mix.yaml()


def test_reload_route_swaps_the_mlp_source(server, mix):
    before = server.model.state()
    r = server.client.post("/mixed_precision/reload", json={"config": mix.yaml(fp8=mix.fp8_b)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "reloaded" and len(body["layers"]) == 4
    assert changed(before, server.model.state()) == MLP_PARAMS
    assert server.client.get("/mixed_precision/config").text == mix.yaml(fp8=mix.fp8_b)
    info = server.client.get("/mixed_precision/info").json()
    assert info["modules"]["model.layers.1.mlp.down_proj"]["path"] == str(mix.fp8_b)
    assert info["config"]["origin"] == "reload" and len(info["reloads"]) == 1
    # the same config again changes nothing and reaches no worker
    sent = server.runtime.backend.sent
    again = server.client.post("/mixed_precision/reload", json={"config": mix.yaml(fp8=mix.fp8_b)})
    assert again.json()["status"] == "unchanged" and server.runtime.backend.sent == sent


def test_reload_route_refuses_a_corrupt_source_and_keeps_serving_the_old_one(server, mix):
    source = corrupt_copy(mix, "fp8_route_trunc", lambda s: None)
    truncate(source / "model.safetensors")
    before = server.model.state()
    r = server.client.post("/mixed_precision/reload", json={"config": mix.yaml(fp8=source)})
    assert r.status_code == 400
    body = r.json()
    assert body["success"] is False and body["applied"] is False
    assert "corrupt_safetensors" in json.dumps(body["error"])
    assert not changed(before, server.model.state())
    assert server.client.get("/mixed_precision/config").text == mix.yaml()


def test_reload_route_scheme_change_409_then_managed_restart(server, mix):
    r = server.client.post("/mixed_precision/reload", json={"config": mix.yaml(mlp="int4")})
    assert r.status_code == 409
    layers = {c["layer"] for c in r.json()["rebuild_layers"]}
    assert layers == {f"model.layers.{i}.mlp.{leaf}" for i in (0, 1) for leaf in ("gate_up_proj", "down_proj")}
    assert not (server.tmp / "restart.json").exists()
    r = server.client.post("/mixed_precision/reload", json={"config": mix.yaml(mlp="int4"), "restart": True})
    assert r.status_code == 202 and r.json()["status"] == "restart_requested"
    request = restart.read_restart_request(server.tmp / "restart.json")
    assert open(request["config_path"]).read() == mix.yaml(mlp="int4")
    assert request["config_sha256"] == config_sha256(mix.yaml(mlp="int4"))
    os.remove(request["config_path"])


def test_reload_route_dry_run_and_bad_input(server, mix):
    before = server.model.state()
    r = server.client.post("/mixed_precision/reload", json={"config": mix.yaml(fp8=mix.fp8_b), "dry_run": True})
    assert r.status_code == 200 and r.json()["would"] == "reload" and r.json()["diff"]["counts"]["reload"] == 4
    assert not changed(before, server.model.state())
    assert server.client.post("/mixed_precision/reload", content=b"{not json").status_code == 400
    r = server.client.post("/mixed_precision/reload", json={"config": mix.yaml(mlp="fp9")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "config_bad_label"
    r = server.client.post("/mixed_precision/reload", json={"config": mix.yaml(fp8=mix.root / "missing")})
    assert r.status_code == 400 and "missing_source" in [e["code"] for e in r.json()["error"]["errors"]]


def test_restart_without_a_launcher_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(restart.RESTART_FILE_ENV, raising=False)
    with pytest.raises(MixedPrecisionError) as e:
        restart.request_restart("mixed_precision: {}", tmp_path / "c.yaml", inline=True)
    assert e.value.code == "restart_unavailable"
    assert restart.read_restart_request(tmp_path / "none.json") is None


def test_a_second_reload_while_one_runs_is_busy(server, mix):
    import asyncio

    async def while_locked():
        async with server.runtime._lock:
            return await server.runtime.reload({"config": mix.yaml(fp8=mix.fp8_b)})

    status, body = asyncio.run(while_locked())
    assert status == 409 and body["error"]["code"] == "reload_busy"
    assert body["error"]["message"] == "another reload is in progress"


def test_reload_planning_leaves_the_event_loop_free(server, mix, monkeypatch):
    import asyncio
    import time

    slow_plan = service.plan_reload

    def plan_reload(*a, **k):  # planning that takes a while, like reading a 235B mix's headers
        time.sleep(0.5)
        return slow_plan(*a, **k)

    monkeypatch.setattr(service, "plan_reload", plan_reload)

    async def reload_while_ticking():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        ticker = asyncio.create_task(tick())
        status, _ = await server.runtime.reload({"config": mix.yaml(fp8=mix.fp8_b)})
        ticker.cancel()
        return status, ticks

    status, ticks = asyncio.run(reload_while_ticking())
    assert status == 200 and ticks >= 10  # blocking planning would leave the ticker at 0-1


def test_a_malformed_restart_request_is_refused(tmp_path):
    marker = tmp_path / "restart.json"
    marker.write_text(json.dumps(["not", "a", "request"]))
    with pytest.raises(MixedPrecisionError) as e:
        restart.read_restart_request(marker)
    assert e.value.code == "restart_bad_request" and "is not a restart request" in e.value.detail


def test_active_mix_comes_from_the_plan_directory(tmp_path, mix):
    cfg = mix.write("plandir.yaml", mix.yaml())
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "mixed_precision", "config_path": str(cfg)}})
    )
    active = service.active_mix_from_model_path(tmp_path, 1)
    assert active.config_text == mix.yaml() and active.config_path == cfg
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(MixedPrecisionError) as e:
        service.active_mix_from_model_path(tmp_path, 1)
    assert e.value.code == "not_mixed_precision"


def test_active_mix_whose_yaml_is_gone_is_a_missing_file(tmp_path):
    gone = tmp_path / "gone.yaml"
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "mixed_precision", "config_path": str(gone)}})
    )
    with pytest.raises(MixedPrecisionError) as e:
        service.active_mix_from_model_path(tmp_path, 1)
    assert e.value.code == "missing_file" and f"config file {gone} does not exist" in str(e.value)
    assert "sglang-mp plandir" in e.value.fix


def test_hooks_register_once():
    from sglang.srt.plugins.hook_registry import HookRegistry

    saved = {k: list(v) for k, v in HookRegistry._hooks.items()}
    try:
        hooks.register_hooks()
        hooks.register_hooks()
        for hook in hooks.HOOKS:
            assert [h for _, h, _ in HookRegistry._hooks[hook.target]].count(hook.function) == 1, hook.target
    finally:
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(saved)


def scheduler_weight_updater(model):
    """SGLang's own scheduler-side path for a disk update, with the model runner replaced by ``model``:
    ``SchedulerWeightUpdaterManager.update_weights_from_disk`` -> (``TpModelWorker`` up to 0.5.20) ->
    the runner's ``WeightUpdater.update_weights_from_disk`` (hooked). Every method on the way is
    SGLang's, bound to stand-ins for the objects a real scheduler holds."""
    import types

    from sglang.srt.managers import tp_worker
    from sglang.srt.managers.scheduler_components.weight_updater import SchedulerWeightUpdaterManager
    from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

    updater = SimpleNamespace(get_model=lambda: model)
    runner = SimpleNamespace(model=model)
    runner.weight_updater = SimpleNamespace(
        update_weights_from_disk=types.MethodType(WeightUpdater.update_weights_from_disk, updater)
    )
    worker = SimpleNamespace(model_runner=runner, weight_update_runners=lambda: [("target", runner)])
    if hasattr(tp_worker.TpModelWorker, "update_weights_from_disk"):  # 0.5.20 and earlier
        worker.update_weights_from_disk = types.MethodType(tp_worker.TpModelWorker.update_weights_from_disk, worker)
    manager = SimpleNamespace(
        tp_worker=worker,
        draft_worker=None,
        metrics_collector=None,
        flush_cache=lambda **kw: True,
        scheduler=SimpleNamespace(record_weight_version_change=lambda **kw: None),
    )
    for name, member in vars(SchedulerWeightUpdaterManager).items():
        if callable(member) and name != "__init__":
            setattr(manager, name, types.MethodType(member, manager))
    return manager


def test_a_reload_reaches_the_hook_through_sglangs_scheduler(mix, tmp_path, monkeypatch):
    """The request SGLang's tokenizer sends is handled by SGLang's scheduler code, which ends in the hook."""
    from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

    from serving_harness import init_sglang_cpu
    from sglang_mixed_precision.serving import loader

    init_sglang_cpu()  # plugin registered and SGLang's hooks applied
    active, reload_plan = fp8_mlp_request(mix, mix.fp8_b)
    model, config = FakeModel(active), SimpleNamespace(plan=active)
    monkeypatch.setattr(loader, "mixed_config_of", lambda m: config)
    messages.write_worker_request(tmp_path, reload_plan.worker_request())
    before = model.state()
    manager = scheduler_weight_updater(model)
    out = manager.update_weights_from_disk(
        UpdateWeightFromDiskReqInput(model_path=str(tmp_path), load_format="auto", flush_cache=False)
    )
    reply = messages.decode_worker_reply(out.success, out.message)
    assert out.success and reply["layers"] == 4, out.message
    assert changed(before, model.state()) == MLP_PARAMS


SCALE = "model.layers.1.mlp.down_proj.weight_scale_inv"  # F32 [4, 8]: one per 128x128 block of [512, 1024]


@pytest.mark.parametrize(
    "change, says, fix",
    [
        ("drop", "cannot be read (SafetensorError: ", "the file is damaged; download or convert it again"),
        (
            "dtype",
            "is torch.float64, the plan read F32 from its header",
            "the file changed after planning; send the reload again",
        ),
        (
            "shape",
            "has shape [4, 4], the plan expects [4, 8]",
            "the file changed after planning; send the reload again",
        ),
    ],
    ids=["drop", "dtype", "shape"],
)
def test_stage_refuses_a_tensor_rewritten_after_planning(mix, change, says, fix):
    """The file is whole (its header parses) but the tensor is gone / another dtype / another shape."""
    from safetensors.torch import save_file

    from ckpt_writers import load_state

    source = corrupt_copy(mix, f"fp8_rewritten_{change}", lambda s: None)
    _, reload_plan = fp8_mlp_request(mix, source)  # planned from the original header
    state = load_state(source)
    assert tuple(state[SCALE].shape) == (4, 8)
    if change == "drop":
        del state[SCALE]
    elif change == "dtype":
        state[SCALE] = state[SCALE].double()
    else:
        state[SCALE] = state[SCALE][:, :4].contiguous()
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MixedPrecisionError) as e:
        reload_worker.stage_tensors(reload_plan)
    assert e.value.code == "reload_bad_tensor"
    assert e.value.detail.startswith(f"tensor {SCALE} (source 'fp8'): {says}"), e.value.detail
    assert e.value.where == str(source / "model.safetensors") and e.value.fix == fix
